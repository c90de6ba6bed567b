"""Run one DAG with ``dag.test()`` in this (fresh) process and write what happened as JSON.

Usage: python run_dag_script.py DAG_ID CONF_JSON OUT_JSON [LOGICAL_DATES]

With LOGICAL_DATES (ISO dates or datetimes, comma-separated) it runs the DAG once per date, in order,
in this one process, and writes ``{"runs": [report, ...]}``; each report then also lists the asset
events that run emitted (``asset_events``: asset name and extra).

Expects the Airflow environment (AIRFLOW_HOME with a migrated DB, DAGS/PLUGINS folders) to be set.
"""

from __future__ import annotations

import json
import os
import sys


def main(dag_id: str, conf: str, out: str, logical_dates: str | None = None) -> int:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if dag_id not in bag.dags:
        raise SystemExit(f"{dag_id} not found; import errors: {bag.import_errors}")
    if logical_dates is None:
        report = _report(dag_id, bag.dags[dag_id].test(run_conf=json.loads(conf)))
    else:
        from datetime import UTC, datetime

        runs = []
        for text in logical_dates.split(","):
            when = datetime.fromisoformat(text)
            dr = bag.dags[dag_id].test(run_conf=json.loads(conf), logical_date=when.replace(tzinfo=when.tzinfo or UTC))
            runs.append(_report(dag_id, dr))
        report = {"runs": runs}
    with open(out, "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    return 0


def _report(dag_id: str, dr) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        from airflow.models.taskinstance import TaskInstance
        from sqlalchemy import select

        tis = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == dr.run_id)
        ).all()
        xcoms = session.scalars(
            select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == dr.run_id)
        ).all()
        from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF

        rendered = session.scalars(select(RTIF).where(RTIF.dag_id == dag_id, RTIF.run_id == dr.run_id)).all()
        from airflow.models.asset import AssetEvent, AssetModel

        events = session.execute(
            select(AssetModel.name, AssetEvent.extra, AssetEvent.source_task_id)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == dr.run_id)
            .order_by(AssetEvent.id)
        ).all()
        return {
            "run_id": dr.run_id,
            "logical_date": dr.logical_date.isoformat() if dr.logical_date else None,
            "state": str(dr.state),
            "tis": [
                {"task_id": ti.task_id, "map_index": ti.map_index, "state": str(ti.state),
                 "try_number": ti.try_number, "rendered_map_index": ti.rendered_map_index}
                for ti in tis
            ],
            "xcom": {f"{x.task_id}[{x.map_index}].{x.key}": XComModel.deserialize_value(x) for x in xcoms},
            "rendered": {f"{r.task_id}[{r.map_index}]": r.rendered_fields for r in rendered},
            "asset_events": [{"asset": name, "extra": extra, "task_id": task_id} for name, extra, task_id in events],
        }


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
