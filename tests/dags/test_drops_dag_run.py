"""semisup_ingest and the retrain gate run by Airflow itself (``dag.test()`` in a fresh process, SQLite).

Three dated landing folders ingested by three runs make exactly three drops and three ``semisup-drops``
events carrying the drop id and image count; the same three days again change nothing and emit nothing.
A retrain whose gate says no skips everything after it, visibly, and the run succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from semisup_tasks import datasets
from semisup_tasks.images import encode_png
from semisup_tasks.store import Store

SCRIPT = Path(__file__).with_name("run_dag_script.py")
DAYS = ("2026-01-05", "2026-01-06", "2026-01-07")


def run_dag(dag_id: str, conf: dict, tmp_path: Path, dates: list[str] | None = None,
            timeout: int = 300) -> tuple[dict, str]:
    out = tmp_path / f"{dag_id}-run.json"
    args = [sys.executable, str(SCRIPT), dag_id, json.dumps(conf), str(out)] + ([",".join(dates)] if dates else [])
    proc = subprocess.run(args, env=os.environ.copy(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout + proc.stderr


def png(rng: np.random.Generator, cls: int) -> bytes:
    img = rng.integers(0, 60, (12, 12), dtype=np.uint8)
    img[:, 1 + cls * 4:3 + cls * 4] = 255
    return encode_png(img)


def states(run: dict) -> dict[str, str]:
    return {ti["task_id"]: ti["state"] for ti in run["tis"]}


def test_ingest_three_days_twice_registers_three_drops_and_emits_three_events(airflow_db, tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    rng = np.random.default_rng(0)
    for i, day in enumerate(DAYS):
        for j in range(3 + i):
            store.write_bytes(f"landing/{day}/img-{j}.png", png(rng, j % 3))
    # the day after has nothing landed: a skip, not a failure
    dates = [*DAYS, "2026-01-08", *DAYS]
    report, _ = run_dag("semisup_ingest", {"store": store.uri}, tmp_path, dates)
    first, nothing, again = report["runs"][:3], report["runs"][3], report["runs"][4:]

    assert [r["state"] for r in report["runs"]] == ["success"] * 7  # skipped tasks, successful runs
    assert [states(r)["ingest"] for r in first] == ["success"] * 3
    assert [r["asset_events"] for r in first] == [
        [{"asset": "semisup-drops", "task_id": "ingest",
          "extra": {"drop_id": day, "images": 3 + i, "skipped": 0, "date": day, "store": store.uri}}]
        for i, day in enumerate(DAYS)]
    assert datasets.list_drops(store) == list(DAYS)

    assert states(nothing)["ingest"] == "skipped" and nothing["asset_events"] == []
    snapshot = {k: store.read_bytes(k) for k in store.list("drops")}
    # the second pass: new runs for the same three days, each skipped, nothing emitted, nothing written
    assert [r["logical_date"][:10] for r in again] == list(DAYS)
    assert [states(r)["ingest"] for r in again] == ["skipped"] * 3
    assert all(r["asset_events"] == [] for r in again)
    assert datasets.list_drops(store) == list(DAYS)
    assert {k: store.read_bytes(k) for k in store.list("drops")} == snapshot


def test_a_retrain_with_too_few_new_images_is_skipped_after_the_gate_and_succeeds(airflow_db, tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    rng = np.random.default_rng(1)

    def rows(prefix: str, n: int):
        return [(f"{prefix}-{i}", png(rng, i % 3), i % 3) for i in range(n)]

    datasets.write_dataset(store, "tiny", "v1", ["a", "b", "c"], 1, [12, 12],
                           {"train": rows("train", 6), "val": rows("val", 3), "test": rows("test", 3)},
                           source="test")
    datasets.write_drop(store, "d1", [(f"i{i}.png", png(rng, i % 3)) for i in range(5)], source="test")
    run, output = run_dag("semisup_retrain", {"store": store.uri, "dataset": "tiny", "min_new_images": 6},
                          tmp_path)
    st = states(run)
    assert run["state"] == "success"
    assert st["plan"] == "success" and st["gate"] == "success"
    assert {t: s for t, s in st.items() if t not in ("plan", "gate")} == \
        {t: "skipped" for t in st if t not in ("plan", "gate")}
    assert run["xcom"]["plan[-1].return_value"]["gate"]["run"] is False
    assert run["xcom"]["plan[-1].return_value"]["new_images"] == 5
    assert "only 5 new image(s) (no champion yet), fewer than min_new_images=6" in output  # the visible reason
    assert [k.split("/")[2] for k in store.list("runs")] == ["plan", "plan"]  # nothing trained
