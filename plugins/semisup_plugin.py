"""The ``semisup`` Airflow plugin: UI-side parts only (Airflow 3 loads no operators from plugins).

It registers:

* a FastAPI app under ``/semisup`` serving a run's report
  (``/semisup/dags/{dag_id}/runs/{run_id}/tasks/{task_id}/report``), the target of the
  "semisup report" extra link that :class:`semisup_operator.SemisupStageOperator` shows on the
  ``evaluate`` task. The view serves only the document whose URI that task returned
  (its result's ``report`` field) and requires the caller to be allowed to read the DAG's XComs: Airflow does
  not authenticate plugin apps itself.
* an external view "semisup report" on every DAG run page (``destination="dag_run"``): the UI fills
  ``{DAG_ID}`` and ``{RUN_ID}`` into its href and shows the same report as the evaluate task's link.
* a ``semisup_run_prefix`` macro: ``{{ macros.semisup.semisup_run_prefix(params.store, run_id) }}``.
"""

# No `from __future__ import annotations`: FastAPI must see the real types of the view's
# parameters, which are imported inside create_app().
import html
from typing import Any

from airflow.plugins_manager import AirflowPlugin

REPORT_TASK_ID = "evaluate"  # the task of semisup_retrain whose result names the run's report
RESULT_XCOM_KEY = "return_value"  # the evaluate stage's result document; its "report" field is the URI
MAX_REPORT_BYTES = 20 * 1024 * 1024


def semisup_run_prefix(store: str, run_id: str) -> str:
    """The store URI prefix one pipeline run writes to."""
    from semisup_tasks.store import run_prefix

    return f"{store.rstrip('/')}/{run_prefix(run_id)}"


def read_uri(uri: str) -> bytes:
    """Read one document from a store URI (``file://`` or ``s3://``)."""
    from semisup_tasks.store import Store

    parent, _, name = uri.rstrip("/").rpartition("/")
    if not parent or not name:
        raise ValueError(f"Report URI {uri!r} does not name a document.")
    return Store.from_uri(parent).read_bytes(name)


def render_report(uri: str, data: bytes) -> tuple[str, str]:
    """(media type, body) for a report document."""
    text = data.decode("utf-8", errors="replace")
    if uri.endswith((".html", ".htm")):
        return "text/html", text
    if uri.endswith(".json"):
        return "application/json", text
    title = html.escape(uri.rsplit("/", 1)[-1])
    return "text/html", (f"<!doctype html><meta charset='utf-8'><title>{title}</title>"
                         f"<pre style='white-space:pre-wrap'>{html.escape(text)}</pre>")


def create_app() -> Any:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.common.db.common import SessionDep
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from airflow.models.xcom import XComModel
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import Response
    from sqlalchemy import select

    app = FastAPI(title="semisup", description="semisup pipeline reports")
    # the caller must be logged in to Airflow and allowed to read this DAG's XComs
    can_read_xcoms = requires_access_dag("GET", DagAccessEntity.XCOM)
    app.state.semisup_access = can_read_xcoms  # tests override it via app.dependency_overrides

    @app.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}/report", dependencies=[Depends(can_read_xcoms)])
    def report(dag_id: str, run_id: str, task_id: str, session: SessionDep) -> Response:
        row = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
                XComModel.map_index == -1, XComModel.key == RESULT_XCOM_KEY,
            )
        ).first()
        result = XComModel.deserialize_value(row) if row is not None else None
        uri = result.get("report") if isinstance(result, dict) else None
        if not isinstance(uri, str) or not uri:
            raise HTTPException(404, f"Task {task_id} of run {run_id} has published no report yet.")
        try:
            data = read_uri(uri)
        except Exception as exc:  # store errors come in many types
            raise HTTPException(502, f"Could not read the report {uri}: {exc}") from None
        if len(data) > MAX_REPORT_BYTES:
            raise HTTPException(413, f"The report {uri} is larger than {MAX_REPORT_BYTES} bytes.")
        media_type, body = render_report(uri, data)
        return Response(content=body, media_type=media_type)

    return app


class SemisupPlugin(AirflowPlugin):
    name = "semisup"
    macros = [semisup_run_prefix]
    # the run's report from the DAG run page; the UI substitutes {DAG_ID} and {RUN_ID} (URL-encoded)
    external_views = [{
        "name": "semisup report",
        "href": f"/semisup/dags/{{DAG_ID}}/runs/{{RUN_ID}}/tasks/{REPORT_TASK_ID}/report",
        "destination": "dag_run",
        "url_route": "semisup_report",
    }]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # Built on first use, so workers and the DAG processor, which load plugins too but never
        # serve HTTP, don't import the API server's modules.
        global _APP
        if _APP is None:
            _APP = create_app()
        return [{"app": _APP, "url_prefix": "/semisup", "name": "semisup reports"}]


_APP: Any = None
