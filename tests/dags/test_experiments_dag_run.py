"""semisup_experiments run by Airflow itself (``dag.test()``, SQLite) on the demo data with the ``ci`` grid.

Every mapped shared model, cell and transfer task succeeds; each teacher is trained once and adopted by the
cells that use it (their scores come from one cache per teacher); REPRODUCTION.md, results and plots are
written; the same experiment id run again trains nothing and rewrites no record."""

from __future__ import annotations

import io
from collections import Counter

from PIL import Image
from test_drops_dag_run import run_dag

from semisup_tasks import experiments
from semisup_tasks.demo import build_demo
from semisup_tasks.store import Store


def _mapped(run: dict) -> Counter:
    return Counter((ti["task_id"], ti["state"]) for ti in run["tis"])


def test_experiments_dag_runs_the_ci_grid_then_resumes_without_retraining(airflow_db, tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    build_demo(store)
    conf = {"store": store.uri, "experiment": "ci", "grid": "ci"}
    (tmp_path / "first").mkdir()
    run, _ = run_dag("semisup_experiments", conf, tmp_path / "first", timeout=900)
    plan = experiments.load_plan(store, "ci")
    grid = plan["grid"]
    n_cells, n_shared = len(plan["cells"]), len(plan["shared"])
    assert run["state"] == "success"
    assert _mapped(run)[("cell", "success")] == n_cells == 4 * len(grid["seeds"])  # base, k=20, pool 0.5, weak
    assert _mapped(run)[("shared_model", "success")] == n_shared
    assert _mapped(run)[("transfer", "success")] == len(grid["seeds"])
    labels = {ti["rendered_map_index"] for ti in run["tis"] if ti["task_id"] == "cell"}
    assert labels == set(plan["cells"])  # the UI names each mapped cell

    # shared: a teacher per (arch, seed, weak or not), a baseline per seed; cells adopt them, never retrain
    kinds = Counter(s["kind"] for s in plan["shared"].values())
    assert kinds == {"teacher": 2 * len(grid["seeds"]), "baseline": len(grid["seeds"])}
    assert not [k for k in store.list("runs") if k.startswith("runs/exp-ci-c-") and "/teacher/model.pt" in k]
    trained = {j: store.read_json(f"experiments/ci/shared/{j}.json") for j in plan["shared"]}
    for spec in plan["cells"].values():
        result = store.read_json(f"runs/{spec['run_id']}/teacher/_SUCCESS.json")["result"]
        assert result["model_key"] == trained[spec["uses"]["teacher"]]["model_key"]
    # scores are cached per teacher: as many score prefixes as teachers, not as cells
    prefixes = {k.split("/")[2] for k in store.list("cache/scores")}
    assert len(prefixes) == kinds["teacher"]

    # the pool fraction's drops are nested subsets of the originals, with their truth
    small = [d for d in plan["cells"].values() if d["setting"]["pool_fraction"] == 0.5][0]["params"]["drops"]
    assert all(d.endswith("-pool-0.5") for d in small)

    results = store.read_json("experiments/ci/results.json")
    assert set(results["studies"]) == set(grid["studies"])
    for study, points in results["studies"].items():
        for point in points:
            top1 = point["summary"]["student.top1"]
            assert top1["n"] == len(grid["seeds"]) and 0 <= top1["mean"] <= 1, (study, point)
    assert set(results["transfer"]["summary"]) == {"scratch", "baseline", "student"}
    text = store.read_bytes("experiments/ci/REPRODUCTION.md").decode()
    assert "| rec6-weak-teacher |" in text and "| transfer |" in text and "plots/study-k.png" in text
    for key in store.list("experiments/ci/plots"):
        assert Image.open(io.BytesIO(store.read_bytes(key))).size[0] > 300

    # the same experiment again: every task succeeds, nothing is retrained or rewritten
    records = {k: (store.read_bytes(k), (tmp_path / "store" / k).stat().st_mtime_ns)
               for k in store.list("experiments/ci") if "/cells/" in k or "/shared/" in k or "/transfer/" in k}
    models = {k: (tmp_path / "store" / k).stat().st_mtime_ns for k in store.list("runs") if k.endswith("model.pt")}
    (tmp_path / "again").mkdir()
    again, _ = run_dag("semisup_experiments", conf, tmp_path / "again", timeout=600)
    assert again["state"] == "success" and _mapped(again)[("cell", "success")] == n_cells
    assert {k: (store.read_bytes(k), (tmp_path / "store" / k).stat().st_mtime_ns) for k in records} == records
    assert {k: (tmp_path / "store" / k).stat().st_mtime_ns for k in models} == models

    # a grid without transfer: the empty transfer map is skipped, the aggregate still runs
    small_grid = {"seeds": [0], "base": experiments.CI_GRID["base"], "studies": {}, "transfer": None}
    (tmp_path / "small").mkdir()
    small, _ = run_dag("semisup_experiments", {**conf, "experiment": "small", "grid": small_grid},
                       tmp_path / "small", timeout=600)
    states = {ti["task_id"]: ti["state"] for ti in small["tis"]}
    assert small["state"] == "success" and states["transfer"] == "skipped" and states["aggregate"] == "success"
    assert store.exists("experiments/small/REPRODUCTION.md")
    # a grid named by a file path is refused: it would read the worker's files
    (tmp_path / "path").mkdir()
    refused, output = run_dag("semisup_experiments", {**conf, "experiment": "path", "grid": "/etc/hostname"},
                              tmp_path / "path", timeout=300)
    assert refused["state"] == "failed" and "is not a named grid" in output
