"""Idempotent stages: the whole pipeline SIGKILLed at random points and rerun gives the selection and
metrics of a run never killed, and a rerun after success writes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_stages import FAST, make_tiny

from semisup_tasks.store import Store

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"dataset": "tiny", **FAST, "augment": "affine", "teacher_epochs": 30, "checkpoint_every_steps": 3}
KILLS_PER_SEED = 2
STAGE_MANIFESTS = 11  # plan, teacher, baseline, oracle, thresholds, select, trainset, the two students,
# evaluate, register


def _committed(root: Path, run_id: str) -> list[Path]:
    return list((root / "runs" / run_id).rglob("_SUCCESS.json"))


def _start(store_uri: str, run_id: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "semisup_tasks", "run", "--store", store_uri, "--run-id", run_id,
           "--params-json", json.dumps(PARAMS)]
    # its own process group: the kill takes the DataLoader workers with it, as a lost node would
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(store_uri: str, run_id: str) -> None:
    proc = _start(store_uri, run_id)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]


def _outcome(store: Store, run_id: str) -> tuple[pa.Table, dict]:
    """The run's selection and its metrics without what names the run or the clock."""
    metrics = store.read_json(f"runs/{run_id}/evaluate/metrics.json")
    metrics.pop("run_id"), metrics.pop("finished_at")
    metrics = json.loads(json.dumps(metrics).replace(f"/runs/{run_id}/", "/runs/RUN/"))  # output URIs
    return store.read_table(f"runs/{run_id}/select/selection.parquet"), metrics


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One store with the tiny data and a run never killed."""
    root = tmp_path_factory.mktemp("kill") / "store"
    store = Store.from_uri(f"file://{root}")
    make_tiny(store)
    _finish(f"file://{root}", "clean")
    assert len(_committed(root, "clean")) == STAGE_MANIFESTS
    return root, store


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_pipeline_killed_at_random_points_and_rerun_equals_a_clean_run(clean, seed):
    root, store = clean
    run_id, rng = f"killed-{seed}", np.random.default_rng(seed)
    killed_in = []
    for target in sorted(rng.integers(0, STAGE_MANIFESTS, KILLS_PER_SEED)):
        proc = _start(f"file://{root}", run_id)
        # somewhere in the stage after the target-th committed one: every part of the pipeline gets hit
        while proc.poll() is None and len(_committed(root, run_id)) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.25))
        if proc.poll() is not None:  # finished first: nothing left to kill
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        killed_in.append(len(_committed(root, run_id)))
    assert killed_in, "every attempt finished before its kill"
    _finish(f"file://{root}", run_id)
    selection, metrics = _outcome(store, run_id)
    clean_selection, clean_metrics = _outcome(store, "clean")
    assert selection.equals(clean_selection)
    assert metrics == clean_metrics
    # no resume point outlives its committed model (a write cut by the kill may leave a hidden temp
    # file, which no listing or reader ever sees)
    assert not [p for p in (root / "runs" / run_id).rglob("*.pt") if "checkpoints" in p.parts]
    print(f"seed {seed}: killed with {killed_in} of {STAGE_MANIFESTS} stages committed")


def test_a_rerun_after_success_writes_nothing(clean):
    root, _ = clean
    before = _snapshot(root)
    _finish(f"file://{root}", "clean")
    assert _snapshot(root) == before
