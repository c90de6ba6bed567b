"""A real Airflow 3 deployment for tests: ``airflow standalone`` on 127.0.0.1 with a private home.

``airflow standalone`` runs the api-server, scheduler, dag-processor and triggerer as subprocesses
of one process; :class:`AirflowServer` starts it in a new session (its own process group) with
SQLite, the LocalExecutor at a low parallelism, this checkout's dags/ and plugins/, and the simple
auth manager with real users (not all-admins mode): a caller gets a JWT from ``POST /auth/token``
with the password Airflow generated into ``AIRFLOW_HOME``.

Stopping is the hard part: LocalExecutor workers ignore SIGTERM, and each task's supervisor puts the
task in a process group of its own, so :meth:`AirflowServer.stop` signals the standalone group *and*
every process whose environment carries this server's private ``AIRFLOW_HOME``, escalates to
SIGKILL, and raises if any is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW = Path(sys.executable).parent / "airflow"
ADMIN, VIEWER = "admin", "viewer"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AirflowError(AssertionError):
    pass


class AirflowServer:
    """``airflow standalone`` in ``home`` (its AIRFLOW_HOME); use as a context manager or start()/stop()."""

    def __init__(self, home: Path, *, parallelism: int = 2, extra_env: dict[str, str] | None = None) -> None:
        self.home = Path(home).resolve()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / "standalone.log"
        self.parallelism = parallelism
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self._tokens: dict[str, str] = {}

    # --- lifecycle -------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # one LocalExecutor worker process per slot: few slots, few processes on a 2-core runner
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "180",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # real users, real passwords (generated into AIRFLOW_HOME): the REST and browser tests log in
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin,{VIEWER}:viewer",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            # a 500 names its database error, so a lock can be told apart (and retried) from a real fault
            "AIRFLOW__API__EXPOSE_STACKTRACE": "True",
            # the extra link and the task workers' execution API both derive from the base URL
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            # standalone runs its components as `airflow ...` from PATH: this venv's
            "PATH": os.pathsep.join([str(AIRFLOW.parent), os.environ.get("PATH", "")]),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        env.update(self.extra_env)
        return env

    def start(self, *, timeout: float = 300, dag_ids: tuple[str, ...] = ()) -> AirflowServer:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps writing to it)
        try:
            # a new session: the whole standalone tree shares one process group we can signal at once
            self.proc = subprocess.Popen([str(AIRFLOW), "standalone"], env=self.env(), cwd=self.home,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_healthy(timeout)
            for dag_id in dag_ids:
                self.wait_dag(dag_id, timeout)
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def __enter__(self) -> AirflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self, timeout: float) -> None:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AirflowError(f"airflow standalone exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, health = self.request("GET", "/api/v2/monitor/health", auth=False, timeout=5)
                last = health
                if status == 200 and all(
                    (health.get(part) or {}).get("status") == "healthy"
                    for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
                ):
                    return
            except OSError as exc:  # not listening yet
                last = exc
            time.sleep(2)
        raise AirflowError(f"Airflow at {self.url} not healthy after {timeout:.0f}s (last: {last}):\n"
                           f"{self.log_tail()}")

    def wait_dag(self, dag_id: str, timeout: float = 300) -> dict:
        """Wait until the dag-processor has parsed ``dag_id``; a parse error fails at once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, dag = self.request("GET", f"/api/v2/dags/{dag_id}")
            if status == 200:
                return dag
            _, errors = self.request("GET", "/api/v2/importErrors")
            if errors.get("import_errors"):
                raise AirflowError(f"{dag_id} does not import: {errors['import_errors']}")
            time.sleep(2)
        raise AirflowError(f"{dag_id} not parsed after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def processes(self) -> list[int]:
        """Live processes of this server: its standalone process group, and any process whose
        environment, command line or working directory names this server's private AIRFLOW_HOME
        (task processes run in process groups of their own; setproctitle overwrites the environment
        block of the api-server's workers, but they keep standalone's working directory)."""
        pgid = self.proc.pid if self.proc is not None else None
        marker_env = f"AIRFLOW_HOME={self.home}".encode()
        marker = f"{self.home}{os.sep}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            try:
                stat = (entry / "stat").read_text()
                # fields after the ")" of the command name: state, ppid, pgrp
                state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
                if state in ("Z", "X"):  # a zombie is dead; only its parent's wait() removes it
                    continue
                if pgid is not None and int(pgrp) == pgid:
                    found.append(pid)
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
                cwd = os.readlink(entry / "cwd")
            except (OSError, ValueError, IndexError):
                continue  # gone, or not ours to read
            if marker_env in environ or marker in cmdline or f"{cwd}{os.sep}".startswith(marker.decode()):
                found.append(pid)
        return found

    def stop(self, *, grace: float = 10, check: bool = True) -> None:
        """SIGTERM to everything of this server, then SIGKILL to what is left; raises if any survives."""
        if self.proc is None:
            return
        pgid = self.proc.pid

        def signal_all(sig: int) -> None:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.proc.poll()  # reap our own child so it doesn't linger as a zombie
            if not self.processes():
                break
            time.sleep(0.5)
        survivors_of_term = self.processes()
        if survivors_of_term:  # LocalExecutor workers ignore SIGTERM
            signal_all(signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.processes():
                self.proc.poll()
                time.sleep(0.2)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        left = self.processes()
        self.killed_after_term = survivors_of_term
        self.proc_returncode = self.proc.returncode
        if check and left:
            raise AirflowError(f"processes of the Airflow server left after SIGKILL: {left}")

    # --- REST ------------------------------------------------------------------------------------

    def password(self, username: str) -> str:
        """The password the simple auth manager generated for ``username``."""
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        return passwords[username]

    def token(self, username: str = ADMIN) -> str:
        if username not in self._tokens:
            status, body = self.request("POST", "/auth/token", auth=False,
                                        body={"username": username, "password": self.password(username)})
            if status != 201:
                raise AirflowError(f"POST /auth/token for {username}: {status} {body}")
            self._tokens[username] = body["access_token"]
        return self._tokens[username]

    def request(self, method: str, path: str, body: Any = None, *, auth: bool | str = True,
                timeout: float = 60, lock_retries: int = 20) -> tuple[int, Any]:
        """(status, parsed JSON or text). ``auth``: True = the admin's token, a str = that user's token.

        SQLite lets one writer at a time: while the scheduler writes, a request's statement or commit can
        fail with "database is locked" (a 500, or a 503 from the backfill route). Its transaction was
        rolled back (a backfill's may have committed its first row: the retry then gets a 409, which its caller waits
        out), so the request is sent again, up to ``lock_retries`` more times; any other answer returns."""
        for attempt in range(1 + max(0, lock_retries)):
            if attempt:
                time.sleep(1)
            status, answer = self._send(method, path, body, auth=auth, timeout=timeout)
            if not (status in (500, 503) and "database is locked" in str(answer).lower()):
                break
        return status, answer

    def _send(self, method: str, path: str, body: Any, *, auth: bool | str, timeout: float) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = f"Bearer {self.token(ADMIN if auth is True else auth)}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        # no proxy for our own loopback server, whatever the environment says
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=timeout) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, raw, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
        text = raw.decode("utf-8", errors="replace")
        return status, (json.loads(text) if "json" in ctype and text else text)

    def get(self, path: str, **kw: Any) -> Any:
        status, body = self.request("GET", path, **kw)
        if status != 200:
            raise AirflowError(f"GET {path}: {status} {body}")
        return body

    def quote(self, part: str) -> str:
        return urllib.parse.quote(part, safe="")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900,
                 states: tuple[str, ...] = ("success", "failed")) -> dict:
        """Poll a DAG run until it reaches one of ``states``."""
        deadline, run = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            run = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}")
            if run["state"] in states:
                return run
            if self.proc is not None and self.proc.poll() is not None:
                raise AirflowError(f"airflow standalone died during the run:\n{self.log_tail()}")
            time.sleep(3)
        raise AirflowError(f"{dag_id} run {run_id} still {run.get('state')} after {timeout:.0f}s; task states: "
                           f"{self.task_states(dag_id, run_id)}\n{self.log_tail()}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}/taskInstances?limit=1000")[
            "task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in self.task_instances(dag_id, run_id)}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        entry = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}/taskInstances/{task_id}"
                         f"/xcomEntries/{key}?deserialize=true&stringify=false")
        return entry["value"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        body = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}/taskInstances/{task_id}"
                        f"/logs/{try_number}?full_content=true")
        content = body.get("content") if isinstance(body, dict) else body
        if isinstance(content, list):  # structured lines: the event and its fields (an error's detail)
            return "\n".join(json.dumps(line, default=str) if isinstance(line, dict) else str(line)
                             for line in content)
        return str(content)

    def extra_links(self, dag_id: str, run_id: str, task_id: str) -> dict[str, str | None]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}/taskInstances/{task_id}/links")[
            "extra_links"]
