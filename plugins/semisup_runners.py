"""How a semisup stage is launched: the runner interface and the local runner.

A runner turns a :class:`StageRequest` into the stage's result document. Every runner runs the
same command line, ``python -m semisup_tasks stage NAME ...`` (see :meth:`StageRequest.cli_args`),
in a different place: a local subprocess of the Airflow worker (``local``, implemented here), a
Docker container or a Kubernetes pod (``docker`` and ``kubernetes``: provider operators in
``semisup_containers``, chosen per deployment by ``semisup_deployment``). Runners raise
:class:`StageUserError` for a mistake retrying cannot fix (the stage exited with status 2) and
:class:`StageFailed` for anything else; the operator maps these to Airflow's failure semantics.

This module imports neither Airflow nor torch, so it can be unit tested on its own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

USER_ERROR_EXIT = 2
ERROR_PREFIX = "semisup: error:"


class StageUserError(Exception):
    """The stage refused its input (exit status 2); retrying cannot help."""


class StageFailed(Exception):
    """The stage crashed or could not be launched; a retry may help."""


@dataclass(frozen=True)
class StageRequest:
    stage: str
    store: str
    run_id: str
    params: dict[str, Any]
    shards: list[str] | None = field(default=None)
    group: int | None = field(default=None)  # index of one of the plan's shard groups (score, filter)
    processes: int = 1  # > 1: a training stage runs data-parallel under torchrun, one process per GPU

    def command(self, python: str, result_file: str | None) -> list[str]:
        """The whole command line: ``python -m semisup_tasks ...``, under torchrun for several processes."""
        launcher = [python]
        if self.processes > 1:
            launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.processes}"]
        return [*launcher, "-m", "semisup_tasks", *self.cli_args(result_file)]

    def cli_args(self, result_file: str | None) -> list[str]:
        """Arguments after ``python -m semisup_tasks`` (identical for every runner). Without a result
        file the stage prints its result as the last line of its standard output."""
        args = ["stage", self.stage, "--store", self.store, "--run-id", self.run_id,
                "--params-json", json.dumps(self.params, sort_keys=True)]
        if self.shards is not None:
            args += ["--shards", *self.shards]
        if self.group is not None:
            args += ["--group", str(self.group)]
        return [*args, "--result-file", result_file] if result_file else args


class StageRunner(ABC):
    """Launches one stage somewhere and returns its JSON result document."""

    name: ClassVar[str]

    @abstractmethod
    def run(self, request: StageRequest, log: logging.Logger) -> dict[str, Any]:
        """Run the stage to completion, streaming its log lines into ``log``."""

    def kill(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Stop a running stage (called from the operator's ``on_kill``)."""


def resolve_store(uri: str, cwd: Path | None = None) -> str:
    """Make a relative ``file://`` store URI (or a bare path) absolute; leave others alone."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return uri
    raw = (parsed.netloc + parsed.path) if parsed.scheme == "file" else uri
    path = Path(raw or ".")
    if not path.is_absolute():
        path = (cwd or Path.cwd()) / path
    return "file://" + str(path.resolve())


def semisup_tasks_root() -> str | None:
    """The folder holding the ``semisup_tasks`` package, as seen by this process."""
    spec = importlib.util.find_spec("semisup_tasks")
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return str(Path(list(spec.submodule_search_locations)[0]).resolve().parent)
    return str(Path(spec.origin).resolve().parent.parent) if spec.origin else None


def is_user_error(exit_code: int | None, lines: list[str]) -> bool:
    """The stage refused its input: exit status 2, or (torchrun exits 1 whatever its workers did)
    a ``semisup: error:`` line, which only a refused input prints."""
    return exit_code == USER_ERROR_EXIT or (exit_code not in (0, None)
                                            and any(line.startswith(ERROR_PREFIX) for line in lines))


def last_error_line(lines: list[str]) -> str:
    """The stage's one-sentence error: its ``semisup: error:`` line, else the last line."""
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):].strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return "no message"


class LocalRunner(StageRunner):
    """Runs the stage as a subprocess of the worker, with this worker's Python interpreter."""

    name = "local"
    kill_grace_s = 10.0

    def __init__(self, python: str | None = None, tail_lines: int = 50) -> None:
        self.python = python or sys.executable
        self.tail_lines = tail_lines
        self._proc: subprocess.Popen[str] | None = None

    def command(self, request: StageRequest, result_file: str) -> list[str]:
        return request.command(self.python, result_file)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        root = semisup_tasks_root()
        if root:
            parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in parts if p != root]])
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run(self, request: StageRequest, log: logging.Logger) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=f"semisup-{request.stage}-") as tmp:
            result_path = Path(tmp) / "result.json"
            cmd = self.command(request, str(result_path))
            log.info("Running stage %s: %s", request.stage, " ".join(cmd[:4] + ["..."]))
            tail: deque[str] = deque(maxlen=self.tail_lines)
            try:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, errors="replace", bufsize=1, env=self.environment(),
                )
            except OSError as exc:
                raise StageFailed(f"Could not start stage {request.stage}: {exc}") from exc
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log.info("[%s] %s", request.stage, line)
            code = self._proc.wait()
            self._proc = None
            if is_user_error(code, list(tail)):
                raise StageUserError(last_error_line(list(tail)))
            if code != 0:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                raise StageFailed(f"Stage {request.stage} {how}: {last_error_line(list(tail))}")
            try:
                result = json.loads(result_path.read_text())
            except (OSError, ValueError) as exc:
                raise StageFailed(f"Stage {request.stage} succeeded but left no readable result: "
                                  f"{exc}") from exc
        if not isinstance(result, dict):
            raise StageFailed(f"Stage {request.stage} returned {type(result).__name__}, "
                              "expected a JSON object")
        return result

    def kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.kill_grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()


RUNNERS: dict[str, type[StageRunner]] = {"local": LocalRunner}
CONTAINER_RUNNERS = ("docker", "kubernetes")  # operators of their own: semisup_containers


def check_runner(name: str) -> None:
    """Raise ``ValueError`` with a clear sentence unless ``name`` is a runner of SemisupStageOperator."""
    if name in RUNNERS:
        return
    if name in CONTAINER_RUNNERS:
        raise ValueError(f"The {name!r} runner has its own operator; build the task with "
                         "semisup_deployment.stage_task instead of SemisupStageOperator.")
    raise ValueError(f"Unknown stage runner {name!r}; use one of {', '.join((*RUNNERS, *CONTAINER_RUNNERS))}.")


def get_runner(name: str) -> StageRunner:
    check_runner(name)
    return RUNNERS[name]()
