"""The semisup AirflowPlugin: loaded by Airflow, UI parts only, report view behind Airflow auth."""

from __future__ import annotations

import pytest
from semisup_operator import SemisupReportLink, report_view_path


def test_airflow_loads_the_plugin_and_nothing_else_from_plugins():
    from airflow import plugins_manager

    plugins, errors = plugins_manager._get_plugins()
    assert errors == {}
    (plugin,) = [p for p in plugins if p.name == "semisup"]
    assert [m.__name__ for m in plugin.macros] == ["semisup_run_prefix"]
    assert plugin.fastapi_apps[0]["url_prefix"] == "/semisup"
    assert not plugin.operator_extra_links and not plugin.global_operator_extra_links


def test_run_prefix_macro():
    from semisup_plugin import semisup_run_prefix

    assert semisup_run_prefix("s3://b/semisup/", "r1") == "s3://b/semisup/runs/r1"
    # the same sanitised prefix the stages write to, for Airflow's run ids
    assert semisup_run_prefix("file:///s", "manual__2026-01-01T00:00:00+00:00") == \
        "file:///s/runs/manual__2026-01-01T00_00_00_00_00"


def test_report_link_points_at_the_plugin_view():
    path = report_view_path("", "semisup_retrain", "manual__2026-01-01T00:00:00+00:00", "evaluate")
    assert path == ("/semisup/dags/semisup_retrain/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00"
                    "/tasks/evaluate/report")
    assert SemisupReportLink().name == "semisup report"


@pytest.fixture
def client():
    from fastapi.testclient import TestClient
    from semisup_plugin import create_app

    return TestClient(create_app())


def test_report_view_requires_login(client):
    response = client.get("/dags/semisup_retrain/runs/r1/tasks/evaluate/report")
    assert response.status_code == 401


def test_report_view_404_without_a_published_report(airflow_db, client):
    client.app.dependency_overrides[client.app.state.semisup_access] = lambda: None
    response = client.get("/dags/semisup_retrain/runs/r1/tasks/evaluate/report")
    assert response.status_code == 404 and "no report" in response.text


def test_render_report_escapes_text():
    from semisup_plugin import render_report

    assert render_report("s3://b/r/report.html", b"<h1>x</h1>") == ("text/html", "<h1>x</h1>")
    media, body = render_report("file:///r/report.md", b"<script>")
    assert media == "text/html" and "&lt;script&gt;" in body
