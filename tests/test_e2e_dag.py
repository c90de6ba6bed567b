"""End to end: the demo data through the real semisup_retrain DAG, run by Airflow (``dag.test()``).

Everything Airflow runs in fresh subprocesses with a private AIRFLOW_HOME (SQLite), this checkout's
dags/ and plugins/, and a temporary store; epochs are tiny so the run takes a few minutes on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_DAG = ROOT / "tests" / "dags" / "run_dag_script.py"
MODELS = ("teacher", "baseline", "student_pretrained", "student", "oracle")
# short training, enough to be far above chance (10%) so a broken stage shows
CONF = {"teacher_epochs": 6, "pretrain_epochs": 2, "finetune_epochs": 6, "k": 100, "p": 2}
SECRET = "e2e-secret-access-key-7f3a"

pytestmark = pytest.mark.slow


def _env(airflow_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("AIRFLOW")]:
        del env[key]
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        # like scripts/airflow_env.sh: the checkout importable; Airflow itself adds plugins/ to sys.path
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_semisup_retrain_end_to_end(tmp_path, kind, request):
    """On the embedded file store, and on a real S3-protocol server (moto on 127.0.0.1) with the
    credentials in the environment only; the outputs are then read back with standard tools."""
    if kind == "s3":
        endpoint = request.getfixturevalue("s3_server")
        request.getfixturevalue("monkeypatch").setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        import boto3

        boto3.client("s3").create_bucket(Bucket="semisup-dag")
        store = "s3://semisup-dag/store"
    else:
        store = f"file://{tmp_path / 'store'}"
    env = _env(tmp_path / "airflow")
    _run([sys.executable, "-m", "semisup_tasks", "demo-data", "--store", store], env, timeout=900)
    _run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env, timeout=600)

    out = tmp_path / "dagrun.json"
    _run([sys.executable, str(RUN_DAG), "semisup_retrain", json.dumps({**CONF, "store": store}), str(out)],
         env, timeout=3000)
    run = json.loads(out.read_text())

    not_ok = [(t["task_id"], t["map_index"], t["state"]) for t in run["tis"] if t["state"] != "success"]
    assert run["state"] == "success" and not not_ok, not_ok
    xcom = run["xcom"]

    # score is mapped over the plan's shard groups, one labelled task instance per group
    groups = xcom["plan[-1].return_value"]["score_groups"]
    scores = sorted((t for t in run["tis"] if t["task_id"] == "score"), key=lambda t: t["map_index"])
    assert len(scores) == groups >= 2  # the demo's four shards, two per group
    assert [t["rendered_map_index"] for t in scores] == [f"shard group {g}" for g in range(groups)]
    assert sum(xcom[f"score[{g}].return_value"]["images"] for g in range(groups)) == 3793
    assert not [k for k in xcom if k.startswith("plan[") and not k.endswith("return_value")]  # one document

    # the metrics document, under runs/<run id>/evaluate/ in the store
    from semisup_tasks.store import Store

    metrics_uri = xcom["evaluate[-1].return_value"]["metrics"]
    assert metrics_uri.startswith(f"{store}/runs/") and metrics_uri.endswith("/evaluate/metrics.json")
    metrics = Store.from_uri(store).read_json(metrics_uri.removeprefix(f"{store}/"))
    models = metrics["models"]
    for name in MODELS:
        assert name in models, f"{name} missing from {sorted(models)}"
        assert 0.0 <= models[name]["top1"] <= 1.0
    assert models["teacher"]["top1"] > 0.3 and models["student"]["top1"] > 0.3
    if kind == "s3":
        # Parquet outputs are plain objects a standard S3 client reads; no credential went anywhere
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="testing",
                               secret_key=SECRET, region="us-east-1")
        selection_key = xcom["select[-1].return_value"]["selection"].removeprefix("s3://")
        assert pq.read_table(selection_key, filesystem=fs).num_rows == metrics["selection"]["selected_pairs"] > 0
        assert SECRET not in json.dumps(run), "a credential reached XCom or a rendered template"

    # the "semisup report" extra link, and the plugin view serving the report it points at
    link = xcom["evaluate[-1]._link_SemisupReportLink"]
    assert link.startswith("/semisup/dags/semisup_retrain/runs/") and link.endswith("/tasks/evaluate/report")
    view = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'plugins')!r})\n"
        "from fastapi.testclient import TestClient\n"
        "from semisup_plugin import create_app\n"
        "client = TestClient(create_app())\n"
        "client.app.dependency_overrides[client.app.state.semisup_access] = lambda: None\n"
        "r = client.get(sys.argv[1].removeprefix('/semisup'))\n"
        "print(r.status_code, r.headers.get('content-type'), len(r.text))\n"
    )
    status = _run([sys.executable, "-c", view, link], env, timeout=300).stdout.strip().splitlines()[-1].split()
    assert status[0] == "200" and status[1].startswith("text/html") and int(status[-1]) > 100, status
