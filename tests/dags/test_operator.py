"""SemisupStageOperator and the local runner, with real subprocesses."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import pytest
import semisup_runners
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from semisup_operator import SemisupStageOperator
from semisup_runners import LocalRunner, StageFailed, StageRequest, StageUserError, resolve_store

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "manual__2026-01-01T00:00:00+00:00"


class FakeTI:
    def __init__(self) -> None:
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.pushed[key] = value


def make_context(store: str | None, **params) -> dict:
    if store is not None:
        params["store"] = store
    return {"params": params, "run_id": RUN_ID, "ti": FakeTI()}


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a subprocess was started")

    monkeypatch.setattr(semisup_runners.subprocess, "Popen", refuse)


class ScriptRunner(LocalRunner):
    """The local runner, but running a given Python script instead of ``-m semisup_tasks``."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script

    def command(self, request, result_file):
        return [sys.executable, "-c", self.script, result_file]


def request(**kw) -> StageRequest:
    return StageRequest(**{"stage": "plan", "store": "file:///nowhere", "run_id": RUN_ID, "params": {}, **kw})


# -- construction --------------------------------------------------------------------------------
def test_constructor_is_cheap_and_checks_its_arguments(no_subprocess):
    op = SemisupStageOperator(task_id="t", stage="train-teacher")
    assert op.runner == "local" and op.shards is None and op.store is None
    with pytest.raises(ValueError, match="has its own operator"):
        SemisupStageOperator(task_id="d", stage="plan", runner="docker")
    with pytest.raises(ValueError, match="has its own operator"):
        SemisupStageOperator(task_id="k", stage="plan", runner="kubernetes")
    with pytest.raises(ValueError, match="Unknown stage runner"):
        SemisupStageOperator(task_id="x", stage="plan", runner="ssh")
    with pytest.raises(ValueError, match="Stage name"):
        SemisupStageOperator(task_id="y", stage="Train Teacher")


def test_cli_args_follow_the_stage_contract():
    req = request(stage="score", params={"k": 5}, shards=["d1/0", "d1/1"])
    assert req.cli_args("/tmp/r.json") == [
        "stage", "score", "--store", "file:///nowhere", "--run-id", RUN_ID, "--params-json", '{"k": 5}',
        "--shards", "d1/0", "d1/1", "--result-file", "/tmp/r.json",
    ]
    assert "--shards" not in request().cli_args("r.json")
    assert request(stage="score", group=3).cli_args("r.json")[-4:] == ["--group", "3", "--result-file", "r.json"]


def test_relative_file_stores_become_absolute(tmp_path):
    assert resolve_store("file://./.semisup/store", cwd=tmp_path) == f"file://{tmp_path}/.semisup/store"
    assert resolve_store("rel/store", cwd=tmp_path) == f"file://{tmp_path}/rel/store"
    assert resolve_store("file:///abs/store") == "file:///abs/store"
    assert resolve_store("s3://bucket/prefix") == "s3://bucket/prefix"


# -- params ----------------------------------------------------------------------------------------
def test_bad_params_fail_without_retry_before_any_subprocess(no_subprocess, tmp_path):
    op = SemisupStageOperator(task_id="plan", stage="plan")
    with pytest.raises(AirflowFailException, match="k must be at least 1"):
        op.execute(make_context(f"file://{tmp_path}", k=0))
    with pytest.raises(AirflowFailException, match="Unknown parameter"):
        op.execute(make_context(f"file://{tmp_path}", kk=3))


def test_missing_store_fails_without_retry(no_subprocess):
    op = SemisupStageOperator(task_id="plan", stage="plan")
    with pytest.raises(AirflowFailException, match="No store"):
        op.execute(make_context(None))


def test_request_carries_validated_params_and_run_id(tmp_path):
    op = SemisupStageOperator(task_id="score", stage="score", shards=["a", "b"])
    req = op.build_request(make_context(f"file://{tmp_path}", k=7, lr=1))
    assert req.run_id == RUN_ID and req.store == f"file://{tmp_path}" and req.shards == ["a", "b"]
    assert req.params["k"] == 7 and req.params["lr"] == 1.0 and "store" not in req.params
    assert set(req.params) == set(json.loads(json.dumps(req.params)))  # JSON-able, every field


# -- the local runner ------------------------------------------------------------------------------
def test_local_runner_streams_logs_and_returns_the_result(caplog):
    script = (
        "import json, sys\n"
        "print('loading shards', file=sys.stderr)\n"
        "print('stdout line')\n"
        "json.dump({'outputs': ['s3://b/x'], 'rows': 3}, open(sys.argv[1], 'w'))\n"
    )
    log = logging.getLogger("semisup-test")
    with caplog.at_level(logging.INFO, logger="semisup-test"):
        result = ScriptRunner(script).run(request(), log)
    assert result == {"outputs": ["s3://b/x"], "rows": 3}
    assert "[plan] loading shards" in caplog.text and "[plan] stdout line" in caplog.text


def test_local_runner_maps_exit_codes():
    user = "import sys; print('noise', file=sys.stderr); print('semisup: error: Dataset x is missing.', " \
           "file=sys.stderr); sys.exit(2)"
    with pytest.raises(StageUserError, match="^Dataset x is missing.$"):
        ScriptRunner(user).run(request(), logging.getLogger("t"))
    with pytest.raises(StageFailed, match="exited with status 1: boom"):
        crash = "import sys; print('boom', file=sys.stderr); sys.exit(1)"
        ScriptRunner(crash).run(request(), logging.getLogger("t"))
    with pytest.raises(StageFailed, match="no readable result"):
        ScriptRunner("pass").run(request(), logging.getLogger("t"))


def test_local_runner_kill_stops_the_stage():
    runner = ScriptRunner("import time; time.sleep(60)")
    errors: list[BaseException] = []

    def target():
        try:
            runner.run(request(), logging.getLogger("t"))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    for _ in range(100):
        if runner._proc is not None:
            break
        time.sleep(0.05)
    started = time.monotonic()
    runner.kill()
    thread.join(timeout=20)
    assert not thread.is_alive() and time.monotonic() - started < 15
    assert len(errors) == 1 and isinstance(errors[0], StageFailed) and "signal" in str(errors[0])


def test_operator_returns_the_result_document_and_pushes_nothing_else(monkeypatch, tmp_path):
    class Fixed(LocalRunner):
        def run(self, request, log):
            return {"dataset": "mnist-demo", "score_groups": 2, "images": 10}

    monkeypatch.setitem(semisup_runners.RUNNERS, "local", Fixed)
    op = SemisupStageOperator(task_id="plan", stage="plan")
    ctx = make_context(f"file://{tmp_path}")
    result = op.execute(ctx)
    assert result["score_groups"] == 2
    assert ctx["ti"].pushed == {}  # only the return value travels through XCom


def test_retryable_failures_raise_airflow_exception(monkeypatch, tmp_path):
    class Crashing(LocalRunner):
        def run(self, request, log):
            raise StageFailed("Stage plan exited with status 1: out of memory")

    monkeypatch.setitem(semisup_runners.RUNNERS, "local", Crashing)
    op = SemisupStageOperator(task_id="plan", stage="plan")
    with pytest.raises(AirflowException, match="out of memory") as info:
        op.execute(make_context(f"file://{tmp_path}"))
    assert not isinstance(info.value, AirflowFailException)


# -- a real stage ----------------------------------------------------------------------------------
def test_plan_on_an_empty_store_fails_without_retry_with_the_stage_message(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    op = SemisupStageOperator(task_id="plan", stage="plan")
    with pytest.raises(AirflowFailException) as info:
        op.execute(make_context(f"file://{store}"))
    message = str(info.value)
    assert "mnist-demo" in message and "not in the store" in message, message
    assert "Traceback" not in message


def test_training_stages_on_several_gpus_launch_under_torchrun():
    from semisup_deployment import deployment_from_dict, stage_task

    dep = deployment_from_dict({"resources": {"train-teacher": {"gpus": 4}, "score": {"gpus": 4}}})
    teacher, score = stage_task("t", "train-teacher", dep), stage_task("s", "score", dep)
    assert teacher.processes == 4 and score.processes == 1  # scoring scales out by mapped tasks instead
    req = StageRequest(stage="train-teacher", store="file:///s", run_id="r", params={}, processes=4)
    assert req.command("py", "out.json")[:7] == ["py", "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node=4", "-m", "semisup_tasks"]
    assert LocalRunner(python="py").command(req, "out.json") == req.command("py", "out.json")
    one = StageRequest(stage="plan", store="file:///s", run_id="r", params={})
    assert one.command("py", None)[:4] == ["py", "-m", "semisup_tasks", "stage"]


def test_a_refused_input_under_torchrun_is_still_a_user_error():
    from semisup_runners import is_user_error

    assert is_user_error(2, ["whatever"])
    assert is_user_error(1, ["[rank0]: x", "semisup: error: Parameter p=9 exceeds the 3 classes."])  # torchrun: 1
    assert not is_user_error(1, ["Traceback ...", "RuntimeError: boom"])
    assert not is_user_error(0, ["semisup: error: ignored on success"])
