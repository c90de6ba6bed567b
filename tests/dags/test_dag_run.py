"""semisup_retrain run by Airflow itself (``dag.test()`` in a fresh process, SQLite metadata DB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("run_dag_script.py")


def run_dag(conf: dict, tmp_path: Path, timeout: int = 600) -> dict:
    out = tmp_path / "dagrun.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "semisup_retrain", json.dumps(conf), str(out)],
                          env=os.environ.copy(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_user_error_fails_the_run_at_once_without_retries(airflow_db, tmp_path):
    store = tmp_path / "empty-store"
    store.mkdir()
    run = run_dag({"store": f"file://{store}", "dataset": "no-such-dataset"}, tmp_path)
    states = {ti["task_id"]: ti for ti in run["tis"]}
    assert run["state"] == "failed"
    assert states["plan"]["state"] == "failed"
    assert states["plan"]["try_number"] == 1, "a user error must not be retried"
    for task_id in ("train_teacher", "train_baseline", "train_oracle", "evaluate"):
        assert states[task_id]["state"] == "upstream_failed"
