"""End to end: the demo data through the real semisup_retrain DAG, run by Airflow (``dag.test()``).

Everything Airflow runs in fresh subprocesses with a private AIRFLOW_HOME (SQLite), this checkout's
dags/ and plugins/, and a temporary store; epochs are tiny so the run takes a few minutes on CPU.
Once on the embedded file store, once on an S3 server behind a proxy that fails about 5% of the
requests: the second run must give the first one's selection and metrics, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from semisup_tasks.store import Store, run_prefix

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


def _run(cmd: list[str], env: dict[str, str], timeout: int,
         output: list[str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if output is not None:  # everything a command printed, for the credential check
        output += [proc.stdout, proc.stderr]
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _dag_run(home: Path, store: str) -> dict:
    """The demo data and one semisup_retrain run on ``store``; Airflow lives in ``home/airflow``."""
    env = _env(home / "airflow")
    output: list[str] = []
    _run([sys.executable, "-m", "semisup_tasks", "demo-data", "--store", store], env, 900, output)
    _run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env, 600, output)
    out = home / "dagrun.json"
    _run([sys.executable, str(RUN_DAG), "semisup_retrain", json.dumps({**CONF, "store": store}), str(out)],
         env, 3000, output)
    run = json.loads(out.read_text())
    return {"run": run, "store": store, "env": env, "output": output, "airflow_home": home / "airflow"}


def _check_run(result: dict) -> dict:
    """What every run must show; returns its metrics document."""
    run, store, env = result["run"], result["store"], result["env"]
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
    metrics_uri = xcom["evaluate[-1].return_value"]["metrics"]
    assert metrics_uri.startswith(f"{store}/runs/") and metrics_uri.endswith("/evaluate/metrics.json")
    metrics = Store.from_uri(store).read_json(metrics_uri.removeprefix(f"{store}/"))
    models = metrics["models"]
    for name in MODELS:
        assert name in models, f"{name} missing from {sorted(models)}"
        assert 0.0 <= models[name]["top1"] <= 1.0
    assert models["teacher"]["top1"] > 0.3 and models["student"]["top1"] > 0.3

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
    status = _run([sys.executable, "-c", view, link], env, 300, result["output"]).stdout.strip().splitlines()[-1]
    status = status.split()
    assert status[0] == "200" and status[1].startswith("text/html") and int(status[-1]) > 100, status
    return metrics


def _outputs(result: dict) -> tuple[list[dict], dict]:
    """A run's selection rows and metrics, without what differs between two runs of the same params:
    the store, the run id and the finish time."""
    store, run_id = Store.from_uri(result["store"]), result["run"]["run_id"]
    prefix = run_prefix(run_id)
    selection = store.read_table(f"{prefix}/select/selection.parquet").to_pylist()
    metrics = store.read_json(f"{prefix}/evaluate/metrics.json")
    assert metrics.pop("finished_at") and metrics.pop("run_id") == run_id
    text = json.dumps(metrics, sort_keys=True).replace(store.url(prefix), "RUN")
    assert result["store"] not in text, "a store URI outside the run's own prefix"
    return selection, json.loads(text)


@pytest.fixture(scope="module")
def file_run(tmp_path_factory) -> dict:
    """The run on the embedded file store: the reference the S3 run is compared with."""
    home = tmp_path_factory.mktemp("e2e-file")
    return _dag_run(home, f"file://{home / 'store'}")


def test_semisup_retrain_on_the_file_store(file_run):
    _check_run(file_run)


def test_semisup_retrain_on_flaky_s3_equals_the_file_run(file_run, flaky_s3, s3_server, monkeypatch, tmp_path):
    """On a real S3-protocol server (moto on 127.0.0.1) behind a proxy that fails about 5% of the
    requests (500, 503 SlowDown, connection resets), with the credentials in the environment only:
    no task needs an Airflow retry, the outputs equal the file store run's, standard tools read them,
    and the secret appears nowhere the run wrote: XCom, rendered templates, logs, store objects."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    import boto3

    server = boto3.client("s3", endpoint_url=s3_server)  # past the proxy: for setup and inspection
    server.create_bucket(Bucket="semisup-dag")
    result = _dag_run(tmp_path, "s3://semisup-dag/store")
    counts = flaky_s3.counts
    print(f"\nflaky S3 under the DAG: {counts}")
    metrics = _check_run(result)
    run, xcom = result["run"], result["run"]["xcom"]
    # the store's own retries absorbed every fault: no task needed a second try
    assert flaky_s3.faults_injected > 0 and counts["requests"] > 500, counts
    assert [(t["task_id"], t["map_index"]) for t in run["tis"] if t["try_number"] != 1] == []

    # same params, same seed, CPU: the same selection and metrics as on the file store
    selection, flaky_metrics = _outputs(result)
    reference_selection, reference_metrics = _outputs(file_run)
    assert selection == reference_selection and len(selection) == metrics["selection"]["selected_pairs"] > 0
    assert flaky_metrics == reference_metrics

    # Parquet outputs are plain objects a standard S3 client reads
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", access_key="testing",
                           secret_key=SECRET, region="us-east-1")
    selection_key = xcom["select[-1].return_value"]["selection"].removeprefix("s3://")
    assert pq.read_table(selection_key, filesystem=fs).num_rows == len(selection)

    # no credential anywhere: XCom and rendered templates, every line any command printed (dag.test
    # prints the task logs, stage output included), every file under AIRFLOW_HOME (logs, the
    # database), and every object the run and the demo data wrote to the store
    secret = SECRET.encode()
    assert SECRET not in json.dumps(run), "a credential reached XCom or a rendered template"
    printed = "\n".join(result["output"])
    assert SECRET not in printed, "a credential reached a log"
    files = [p for p in result["airflow_home"].rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files)
    assert [p for p in files if secret in p.read_bytes()] == [], "a credential reached AIRFLOW_HOME"
    # the searches saw the task logs: the stage's own lines, as the operator forwards them
    logs = printed + "".join(p.read_text(errors="replace") for p in files if p.suffix == ".log")
    assert "[train-teacher]" in logs and "[evaluate]" in logs
    keys = [o["Key"] for page in server.get_paginator("list_objects_v2").paginate(Bucket="semisup-dag")
            for o in page.get("Contents", [])]
    assert any(k.endswith("/evaluate/report.html") for k in keys) and any(k.endswith("_SUCCESS.json") for k in keys)
    leaked = [k for k in keys if secret in server.get_object(Bucket="semisup-dag", Key=k)["Body"].read()]
    assert leaked == [], "a credential reached an object in the store"
