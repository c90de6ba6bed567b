"""Drops under a real scheduler (``airflow standalone``, tests/airflow_server.py): ``backfill`` over three
dated landing folders registers exactly three drops, and again still three; a new drop's asset event
starts semisup_retrain, whose gate (SEMISUP_MIN_NEW_IMAGES set high here) skips it after plan."""

from __future__ import annotations

import time

import numpy as np
from airflow_server import AirflowServer

from semisup_tasks import datasets
from semisup_tasks.images import encode_png
from semisup_tasks.store import Store

DAYS = ("2026-01-05", "2026-01-06", "2026-01-07")


def png(rng, cls: int) -> bytes:
    img = rng.integers(0, 60, (12, 12), dtype=np.uint8)
    img[:, 1 + cls * 4:3 + cls * 4] = 255
    return encode_png(img)


def runs(server: AirflowServer, dag_id: str, run_type: str) -> list[dict]:
    body = server.get(f"/api/v2/dags/{dag_id}/dagRuns?limit=100&run_type={run_type}")
    return body["dag_runs"]


def wait_runs(server: AirflowServer, dag_id: str, run_type: str, count: int, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = runs(server, dag_id, run_type)
        if len(found) >= count and all(r["state"] in ("success", "failed") for r in found):
            return found
        time.sleep(3)
    raise AssertionError(f"{dag_id}: {runs(server, dag_id, run_type)}\n{server.log_tail()}")


def post_backfill(server: AirflowServer, body: dict) -> dict:
    """POST /api/v2/backfills, retried while Airflow answers 409 (the previous backfill, its runs done, not yet
    marked complete by the scheduler); ``request`` itself retries SQLite's "database is locked"."""
    for _ in range(40):
        status, answer = server.request("POST", "/api/v2/backfills", body)
        if status != 409:
            assert status == 200, answer
            return answer
        time.sleep(2)
    raise AssertionError(f"backfill still refused: {answer}")


def test_backfill_ingests_three_days_once_and_a_new_drop_triggers_a_gated_retrain(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    rng = np.random.default_rng(0)
    rows = lambda p, n: [(f"{p}-{i}", png(rng, i % 3), i % 3) for i in range(n)]  # noqa: E731
    # the retrain's default dataset name, so an asset-triggered run (default params) finds it
    datasets.write_dataset(store, "mnist-demo", "v1", ["a", "b", "c"], 1, [12, 12],
                           {"train": rows("train", 6), "val": rows("val", 3), "test": rows("test", 3)}, source="t")
    for i, day in enumerate(DAYS):
        for j in range(2 + i):
            store.write_bytes(f"landing/{day}/img-{j}.png", png(rng, j % 3))
    env = {"SEMISUP_STORE": store.uri, "SEMISUP_MIN_NEW_IMAGES": "1000000"}
    with AirflowServer(tmp_path / "home", extra_env=env).start(dag_ids=("semisup_ingest", "semisup_retrain")) as af:
        for dag_id in ("semisup_retrain", "semisup_ingest"):
            status, _ = af.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
            assert status == 200
        backfill = {"dag_id": "semisup_ingest", "from_date": f"{DAYS[0]}T00:00:00Z",
                    "to_date": f"{DAYS[-1]}T00:00:00Z", "max_active_runs": 3}
        post_backfill(af, backfill)
        first = wait_runs(af, "semisup_ingest", "backfill", 3)
        assert sorted(r["logical_date"][:10] for r in first) == list(DAYS)
        assert all(r["state"] == "success" for r in first)
        assert datasets.list_drops(store) == list(DAYS)

        # the new drops' events started the retrain (events arriving while one runs queue the next, so one
        # or two runs); each gate skipped everything after plan
        wait_runs(af, "semisup_retrain", "asset_triggered", 1)
        time.sleep(10)
        retrains = wait_runs(af, "semisup_retrain", "asset_triggered", 1)
        for retrain in retrains:
            assert retrain["state"] == "success"
            states = af.task_states("semisup_retrain", retrain["dag_run_id"])
            assert states["plan[-1]"] == "success" and states["gate[-1]"] == "success"
            assert states["train_teacher[-1]"] == "skipped" and states["register[-1]"] == "skipped"
            plan = af.xcom("semisup_retrain", retrain["dag_run_id"], "plan")
            assert plan["new_images"] == plan["images"] > 0 and plan["gate"]["run"] is False
        events = af.get("/api/v2/assets/events?limit=100")["asset_events"]
        extras = sorted((e["extra"]["drop_id"], e["extra"]["images"]) for e in events if e.get("extra"))
        assert extras == [(d, 2 + i) for i, d in enumerate(DAYS)]

        snapshot = {k: store.read_bytes(k) for k in store.list("drops")}
        post_backfill(af, {**backfill, "reprocess_behavior": "completed"})
        time.sleep(5)
        again = wait_runs(af, "semisup_ingest", "backfill", 3)
        for run in again:
            assert af.task_states("semisup_ingest", run["dag_run_id"])["ingest[-1]"] == "skipped"
        assert datasets.list_drops(store) == list(DAYS)
        assert {k: store.read_bytes(k) for k in store.list("drops")} == snapshot
        time.sleep(10)  # time for a (wrong) second asset-triggered retrain to be created
        assert len(runs(af, "semisup_retrain", "asset_triggered")) == len(retrains)
        assert len(af.get("/api/v2/assets/events?limit=100")["asset_events"]) == 3
