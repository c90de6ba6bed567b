"""semisup_retrain on a real Airflow deployment, driven only through its REST API.

``airflow standalone`` (fixture ``airflow_server``: 127.0.0.1, free port, private AIRFLOW_HOME,
SQLite, LocalExecutor at parallelism 2) runs the DAG triggered by ``POST /api/v2/dags/.../dagRuns``
with a conf (fixture ``semisup_rest_run``, shared with the browser test). A bad conf is refused
before anything runs: a value that breaks a param's JSON schema is a 400 at trigger time and no DAG
run exists; an unknown key passes Airflow (params have no ``additionalProperties``) and fails the
``plan`` task, without retries, before any training starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from semisup_tasks.store import Store, run_prefix

DAG = "semisup_retrain"
MODELS = ("teacher", "baseline", "student_pretrained", "student", "oracle")

pytestmark = pytest.mark.slow


def _counts(server) -> tuple[int, int]:
    """(DAG runs, task instances) of semisup_retrain, as the API lists them."""
    runs = server.get(f"/api/v2/dags/{DAG}/dagRuns?limit=1")["total_entries"]
    tis = server.get(f"/api/v2/dags/{DAG}/dagRuns/~/taskInstances?limit=1")["total_entries"]
    return runs, tis


def test_rest_triggered_run_succeeds(airflow_server, semisup_rest_run):
    server, run_id, store = airflow_server, semisup_rest_run["run_id"], semisup_rest_run["store"]
    run = semisup_rest_run["run"]
    assert run["state"] == "success", server.task_states(DAG, run_id)
    assert run["run_type"] == "manual" and run["triggered_by"] == "rest_api"
    assert run["conf"] == semisup_rest_run["conf"]  # the conf as sent, store included

    tis = server.task_instances(DAG, run_id)
    not_ok = [(t["task_id"], t["map_index"], t["state"]) for t in tis if t["state"] != "success"]
    assert not not_ok and len(tis) > 10, not_ok
    assert len([t for t in tis if t["task_id"] == "score"]) >= 2  # mapped over the plan's shard groups

    # the metrics the evaluate task wrote to the store, where its XCom says
    evaluate = server.xcom(DAG, run_id, "evaluate")
    assert evaluate["metrics"] == f"{store}/{run_prefix(run_id)}/evaluate/metrics.json"
    metrics = Store.from_uri(store).read_json(f"{run_prefix(run_id)}/evaluate/metrics.json")
    assert metrics["run_id"] == run_id
    assert {k: metrics["params"][k] for k in ("k", "p", "teacher_epochs")} == {"k": 100, "p": 2, "teacher_epochs": 6}
    for name in MODELS:
        assert 0.0 <= metrics["models"][name]["top1"] <= 1.0, name
    assert metrics["models"]["teacher"]["top1"] > 0.3 and metrics["models"]["student"]["top1"] > 0.3

    # register: the student became the first version of the model and, with no champion yet, the champion
    registered = server.xcom(DAG, run_id, "register")
    assert registered["run_id"] == run_id and registered["version"] == "v1", registered
    assert registered["promoted"] is True and "first champion" in registered["reason"], registered


def test_report_link_is_served_only_to_logged_in_users(airflow_server, semisup_rest_run):
    server, run_id = airflow_server, semisup_rest_run["run_id"]
    url = server.extra_links(DAG, run_id, "evaluate")["semisup report"]
    assert url == f"{server.url}/semisup/dags/{DAG}/runs/{server.quote(run_id)}/tasks/evaluate/report"
    path = url.removeprefix(server.url)
    status, page = server.request("GET", path)
    assert status == 200 and "Models (held-out test set)" in page and "data:image/png;base64," in page
    # plugin apps get no authentication from Airflow: the view's own check must refuse strangers
    status, body = server.request("GET", path, auth=False)
    assert status in (401, 403) and "Models" not in str(body), (status, body)
    # a viewer may read XComs, so may read the report
    assert server.request("GET", path, auth="viewer")[0] == 200


def test_dag_run_page_links_the_report(airflow_server, semisup_rest_run):
    """The plugin's external view on the DAG run page: its href, filled in as the UI does, is the
    same report the evaluate task's extra link opens."""
    server, run_id = airflow_server, semisup_rest_run["run_id"]
    plugins = {p["name"]: p for p in server.get("/api/v2/plugins")["plugins"]}
    views = [v for v in plugins["semisup"]["external_views"] if v["destination"] == "dag_run"]
    assert [v["name"] for v in views] == ["semisup report"], views
    href = views[0]["href"].replace("{DAG_ID}", server.quote(DAG)).replace("{RUN_ID}", server.quote(run_id))
    assert "{" not in href
    link = server.extra_links(DAG, run_id, "evaluate")["semisup report"]
    status, page = server.request("GET", href)
    assert status == 200 and page == server.request("GET", link.removeprefix(server.url))[1]
    assert f"semisup run {run_id}" in page


@pytest.mark.parametrize(("conf", "param", "reason"), [
    ({"k": 0}, "k", "less than the minimum of 1"),
    ({"k": "ten"}, "k", "is not of type 'integer'"),
    ({"teacher_epochs": -3}, "teacher_epochs", "less than the minimum"),
    ({"augment": "mirror"}, "augment", "is not one of"),
])
def test_bad_conf_value_is_rejected_at_trigger(airflow_server, conf, param, reason):
    server = airflow_server
    before = _counts(server)
    status, body = server.request("POST", f"/api/v2/dags/{DAG}/dagRuns", body={"logical_date": None, "conf": conf})
    assert status == 400, (status, body)
    # one readable message that names the param and the broken rule
    assert f"Invalid input for param {param}:" in body["detail"] and reason in body["detail"], body
    assert _counts(server) == before, "a rejected conf created a DAG run or a task instance"


def test_unknown_conf_key_fails_at_plan_before_any_training(airflow_server, semisup_rest_run):
    """Airflow accepts keys it has no param for (a DAG run is created); the operator validates the
    run's params as PipelineParams, which rejects unknown keys: ``plan`` fails on its first try
    (AirflowFailException, no retry) with the typo and its correction, and nothing downstream runs."""
    server, store = airflow_server, semisup_rest_run["store"]  # after the good run: max_active_runs=1
    status, run = server.request("POST", f"/api/v2/dags/{DAG}/dagRuns",
                                 body={"logical_date": None, "conf": {"store": store, "teacher_epoch": 6}})
    assert status == 200, (status, run)
    run_id = run["dag_run_id"]
    final = server.wait_run(DAG, run_id, timeout=600)
    states = server.task_states(DAG, run_id)
    assert final["state"] == "failed", states
    assert states["plan[-1]"] == "failed", states
    started = {k: s for k, s in states.items() if k != "plan[-1]" and s not in (None, "upstream_failed")}
    assert started == {}, f"tasks ran after a bad conf: {started}"
    plan = next(t for t in server.task_instances(DAG, run_id) if t["task_id"] == "plan")
    assert plan["try_number"] == 1, "a bad param must not be retried"
    log = server.task_log(DAG, run_id, "plan")
    assert "Unknown parameter(s) teacher_epoch (did you mean teacher_epochs?)" in log, log[-3000:]
    # and no stage wrote anything for this run
    assert not (Path(store.removeprefix("file://")) / run_prefix(run_id)).exists()
