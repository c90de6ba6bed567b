"""Flaky storage: the S3 store, and the pipeline on it, behind a proxy that fails about 5% of the
requests (500 InternalError, 503 SlowDown, connection resets, resets in the middle of a body), and
an unreachable store that ends in one sentence within seconds."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from flaky_s3 import FAULTS, FlakyS3Proxy

from semisup_tasks.store import S3Store, Store, StoreError

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def _bucket(endpoint: str, name: str) -> None:
    """Create a bucket on the server itself, not through the proxy."""
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)


def test_proxy_injects_every_fault_it_names(s3_server):
    # the proxy is what the other tests rely on: each fault reaches boto3 as the error it claims to be
    _bucket(s3_server, "proxied")
    plain = boto3.client("s3", endpoint_url=s3_server)
    plain.put_object(Bucket="proxied", Key="k", Body=b"x" * 100_000)
    from botocore.config import Config
    from botocore.exceptions import ClientError, ConnectionClosedError, ResponseStreamingError

    seen = {}
    once = Config(retries={"total_max_attempts": 1, "mode": "standard"})
    for fault in FAULTS:
        with FlakyS3Proxy(s3_server, fault_rate=1.0, faults=(fault,)) as proxy:
            client = boto3.client("s3", endpoint_url=proxy.url, config=once)
            try:
                client.get_object(Bucket="proxied", Key="k")["Body"].read()
            except ClientError as exc:
                seen[fault] = exc.response["Error"]["Code"]
            except (ConnectionClosedError, ResponseStreamingError) as exc:
                seen[fault] = type(exc).__name__
            assert proxy.counts[fault] == 1 and proxy.counts["requests"] == 1, proxy.counts
    # a reset after the server answered can also surface as a closed connection; both are resets
    assert seen["500"] == "InternalError" and seen["503"] == "SlowDown"
    assert seen["reset"] == "ConnectionClosedError" and seen["reset_body"] == "ResponseStreamingError", seen
    with FlakyS3Proxy(s3_server, fault_rate=0.0) as proxy:  # and nothing when no faults are asked for
        client = boto3.client("s3", endpoint_url=proxy.url)
        assert client.get_object(Bucket="proxied", Key="k")["Body"].read() == b"x" * 100_000
        assert proxy.counts == {"requests": 1, **dict.fromkeys(FAULTS, 0)}


def test_store_survives_flaky_storage(flaky_s3, s3_server):
    """Hundreds of writes, reads, listings and deletes, some objects over 8 MB (ranged GETs), with
    every byte checked; no error reaches the caller."""
    _bucket(s3_server, "flaky")
    store = Store.from_uri("s3://flaky/some/prefix")
    assert isinstance(store, S3Store)
    store.list_page_size = 7  # page through every listing, each page a request that can fail
    store.check()
    rng = random.Random(0)
    sizes = [rng.choice([0, 1, rng.randrange(2, 4096), rng.randrange(4096, 600_000)]) for _ in range(120)]
    sizes[5] = sizes[40] = 9 * MB + 17  # above s3transfer's 8 MB threshold: a download in ranged parts
    sizes[77] = 12 * MB
    model: dict[str, bytes] = {}
    for i, size in enumerate(sizes):
        key = f"d{i % 5}/obj-{i:03d}.bin"
        model[key] = rng.randbytes(size)
        store.write_bytes(key, model[key])
    for _ in range(4):  # every object read back four times
        for key, data in model.items():
            assert store.read_bytes(key) == data, key
    for key in rng.sample(sorted(model), 30):  # overwrites are whole
        model[key] = rng.randbytes(rng.randrange(0, 50_000))
        store.write_bytes(key, model[key])
        assert store.read_bytes(key) == model[key]
    for i in range(5):
        assert store.list(f"d{i}") == sorted(k for k in model if k.startswith(f"d{i}/"))
    assert store.list() == sorted(model)
    for key in rng.sample(sorted(model), 40):
        store.delete(key)
        del model[key]
        assert not store.exists(key)
        with pytest.raises(StoreError, match="does not exist"):
            store.read_bytes(key)
    assert store.list() == sorted(model)
    assert all(store.exists(k) for k in model)
    store.delete_prefix("d0")
    assert store.list("d0") == []

    counts = flaky_s3.counts
    print(f"\nflaky store: {counts}")
    assert all(counts[k] > 0 for k in FAULTS), counts
    assert 0.02 < flaky_s3.faults_injected / counts["requests"] < 0.1, counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_store_fails_the_cli_in_one_sentence_within_seconds(tmp_path):
    """Nothing listens on the endpoint: the stage ends with one sentence and exit status 2, in
    seconds, where the stage client's retries (10 tries with backoff) would take far longer."""
    port = _free_port()  # bound, then closed: connections are refused
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "NO_PROXY": "127.0.0.1,localhost"}
    cmd = [sys.executable, "-m", "semisup_tasks", "stage", "plan", "--store", "s3://semisup/store",
           "--run-id", "r1", "--params-json", json.dumps({"dataset": "tiny"}), "--result-file",
           str(tmp_path / "result.json")]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    print(f"\nrefused store: exit {proc.returncode} after {elapsed:.1f}s: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("semisup: error: Could not reach bucket 'semisup' ("), lines
    assert f"127.0.0.1:{port}" in lines[-1] and lines[-1].endswith("AWS credentials.")
    assert "Traceback" not in proc.stderr and not (tmp_path / "result.json").exists()
    assert elapsed < 15, f"an unreachable store took {elapsed:.0f}s to report"


def test_silent_store_fails_the_check_within_seconds(monkeypatch):
    """A server that accepts connections and never answers: the stage client would wait 120 s per
    try; the check gives up within seconds, in one sentence."""
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never reads or answers
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    try:
        start = time.monotonic()
        with pytest.raises(StoreError, match=r"^Could not reach bucket 'semisup' \(ReadTimeoutError: .*credentials\.$"):
            Store.from_uri("s3://semisup/store").check()
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    print(f"\nsilent store: check failed after {elapsed:.1f}s, {len(accepted)} connections")
    assert len(accepted) >= 2  # it did retry
    assert elapsed < 20


def _outputs(store: Store, run: str) -> tuple[list[dict], dict]:
    """The run's selection rows and its metrics, with the store's URI and the finish time taken out."""
    selection = store.read_table(f"runs/{run}/select/selection.parquet").to_pylist()
    metrics = store.read_json(f"runs/{run}/evaluate/metrics.json")
    assert metrics.pop("finished_at")
    return selection, json.loads(json.dumps(metrics).replace(store.uri, "STORE"))


def test_pipeline_on_flaky_storage_equals_a_clean_run(flaky_s3, s3_server, tmp_path):
    """The whole pipeline, without Airflow, as the real CLI in its own process (whose DataLoader
    workers then fork away from the proxy's sockets), through the proxy; the same as on file://."""
    from test_stages import make_tiny, params

    from semisup_tasks.stages import run_pipeline

    quick = params(oracle=False, teacher_epochs=2, pretrain_epochs=1, finetune_epochs=1)
    clean = Store.from_uri(f"file://{tmp_path}/store")
    make_tiny(clean)
    run_pipeline(clean, "r", quick)

    _bucket(s3_server, "flaky-run")
    flaky = Store.from_uri("s3://flaky-run/store")
    make_tiny(flaky)
    cmd = [sys.executable, "-m", "semisup_tasks", "run", "--store", flaky.uri, "--run-id", "r",
           "--params-json", json.dumps(quick)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    counts = flaky_s3.counts
    print(f"\nflaky pipeline: {counts} in {time.monotonic() - start:.1f}s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout)["metrics"] == f"{flaky.uri}/runs/r/evaluate/metrics.json"
    assert flaky_s3.faults_injected > 0, counts

    selection, metrics = _outputs(flaky, "r")
    assert selection and metrics["selection"]["selected_pairs"] == len(selection)
    assert (selection, metrics) == _outputs(clean, "r")
    for name in ("teacher", "student"):  # the same weights, bit for bit
        assert flaky.read_bytes(f"runs/r/{name}/model.pt") == clean.read_bytes(f"runs/r/{name}/model.pt")
