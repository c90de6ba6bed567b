"""Shared fixtures."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from flaky_s3 import FlakyS3Proxy


@pytest.fixture(scope="session")
def _moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    # a real S3-protocol server on a free local port: the S3 code path runs over HTTP as in production
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_server(_moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Endpoint URL of an empty S3 server, with the AWS environment pointing at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # every test starts without buckets, whatever the previous one left behind
    reset = urllib.request.Request(f"{_moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=10).close()
    yield _moto_endpoint


@pytest.fixture
def flaky_s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyS3Proxy]:
    """The S3 server behind a proxy that fails about 5% of requests (500, 503 SlowDown, connection
    resets, resets mid-body), with AWS_ENDPOINT_URL pointing at the proxy. A real TCP server, so
    subprocesses reach it too; ``flaky_s3.counts`` says which faults it injected."""
    with FlakyS3Proxy(s3_server, fault_rate=0.05, seed=6) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


# -- a real Airflow deployment (airflow standalone) and one semisup_retrain run through its REST API --
# tiny training like test_e2e_dag's: the whole run takes a few minutes on 2 cores, far above chance
REST_RUN_CONF = {"teacher_epochs": 6, "pretrain_epochs": 2, "finetune_epochs": 6, "k": 100, "p": 2}


@pytest.fixture(scope="session")
def airflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """``airflow standalone`` on 127.0.0.1 (free port, private AIRFLOW_HOME, SQLite, LocalExecutor with
    parallelism 2, this checkout's dags/ and plugins/), ready once semisup_retrain is parsed. Teardown
    stops every process it started and fails if one survives (see tests/airflow_server.py)."""
    from airflow_server import AirflowServer

    server = AirflowServer(tmp_path_factory.mktemp("airflow-server") / "airflow", parallelism=2)
    server.start(timeout=300, dag_ids=("semisup_retrain",))
    _LIVE_AIRFLOW.append(server)
    yield server
    if server in _LIVE_AIRFLOW:
        _LIVE_AIRFLOW.remove(server)
        server.stop()


_LIVE_AIRFLOW: list = []


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the Airflow server right after the last test that uses it (its tests sort next to each
    other: test_rest_*): even idle it re-parses DAGs and heartbeats on CI's two cores."""
    if _LIVE_AIRFLOW and nextitem is not None and "airflow_server" not in nextitem.fixturenames:
        _LIVE_AIRFLOW.pop().stop()


@pytest.fixture(scope="session")
def semisup_rest_run(airflow_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One semisup_retrain run triggered through the REST API on fresh demo data, waited for.
    Shared by the REST and the browser tests: one training run for both."""
    import json as _json
    import subprocess
    import sys
    import time

    store = f"file://{tmp_path_factory.mktemp('rest-store')}"
    demo = subprocess.run([sys.executable, "-m", "semisup_tasks", "demo-data", "--store", store],
                          env=airflow_server.env(), capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-4000:]
    status, dag = airflow_server.request("PATCH", "/api/v2/dags/semisup_retrain", body={"is_paused": False})
    assert status == 200 and dag["is_paused"] is False, (status, dag)
    conf = {**REST_RUN_CONF, "store": store}
    started = time.monotonic()
    status, run = airflow_server.request("POST", "/api/v2/dags/semisup_retrain/dagRuns",
                                         body={"logical_date": None, "conf": conf})
    assert status == 200, (status, run)
    final = airflow_server.wait_run("semisup_retrain", run["dag_run_id"], timeout=1500)
    print(f"\nsemisup_retrain through the REST API: {final['state']} in {time.monotonic() - started:.0f}s "
          f"({_json.dumps(conf)})")
    return {"run_id": run["dag_run_id"], "triggered": run, "run": final, "store": store, "conf": conf}


@pytest.fixture(params=["file", "s3"])
def file_or_s3_store(request: pytest.FixtureRequest, tmp_path):
    """An empty store, once on the embedded file store and once on the S3 test server."""
    from semisup_tasks.store import Store

    if request.param == "file":
        return Store.from_uri(f"file://{tmp_path}/store")
    request.getfixturevalue("s3_server")
    import boto3

    boto3.client("s3").create_bucket(Bucket="semisup-test")
    return Store.from_uri("s3://semisup-test/store")


_EXIT_STATUS: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without C++ static destruction once pytest has reported: Arrow's native thread pools
    can abort a finished interpreter ('terminate called without an active exception',
    apache/arrow#34314), which would turn a green run red. The CLI's entry point does the same."""
    import atexit
    import os
    import sys

    if "code" in _EXIT_STATUS and not hasattr(config, "workerinput"):
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS["code"])
