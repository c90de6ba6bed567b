"""The Docker and Kubernetes stage operators: the stage image runs ``python -m semisup_tasks stage``.

Both are the providers' own operators (``DockerOperator``, ``KubernetesPodOperator``) with the
stage's command built at run time from the DAG run's params, exactly as the local runner builds
it, and the same JSON result document as their XCom ``return_value``:

- Docker: GPUs as device requests, shared memory for DataLoader workers, the deployment's network
  and mounts; the store credentials from the worker's environment as *private* environment
  (never templated, rendered or logged); the result is the stage's last line of standard output.
- Kubernetes: ``nvidia.com/gpu`` limits, node selector and tolerations from the deployment, the
  credentials from a Kubernetes ``Secret`` (``envFrom``), deferrable, re-attaching to its pod on
  retry; the result goes through the XCom sidecar (``/airflow/xcom/return.json``).

A stage that refuses its input exits with status 2 (in a pod it also writes its one-sentence error
as the termination message): that fails the task without retries, as with the local runner.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from semisup_deployment import CREDENTIAL_ENV, STORE_ENV, Deployment
from semisup_operator import REPORT_TASK_STAGE, SemisupReportLink, check_stage_name, stage_request
from semisup_runners import ERROR_PREFIX, USER_ERROR_EXIT, StageRequest, is_user_error, last_error_line

if TYPE_CHECKING:
    from airflow.sdk import Context

XCOM_RESULT = "/airflow/xcom/return.json"  # where the KubernetesPodOperator's sidecar reads XCom


class _StageFields:
    """What both container operators add to their provider operator: the stage and its shards."""

    # the command is set at run time: show that one in the UI's rendered view, not the empty default
    overwrite_rtif_after_execution = True

    stage: str
    shards: Any
    group: Any
    store: str | None
    processes: int

    def _set_stage(self, stage: str, shards: Any, group: Any, store: str | None, processes: int) -> None:
        check_stage_name(stage)
        self.stage, self.shards, self.group, self.store, self.processes = stage, shards, group, store, processes

    def stage_request(self, context: Context) -> StageRequest:
        return stage_request(self.stage, self.shards, self.group, self.store, context, self.processes)

    @property
    def operator_extra_links(self):  # type: ignore[override]
        # the evaluate task links its report, whichever runner ran it
        return (SemisupReportLink(),) if getattr(self, "stage", None) == REPORT_TASK_STAGE else ()


def result_from_output(lines: list[str] | str | None, stage: str) -> dict[str, Any]:
    """The stage's result document: the last line of its output that is a JSON object."""
    for line in reversed([lines] if isinstance(lines, str) else list(lines or [])):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            if isinstance(result, dict):
                return result
    raise AirflowException(f"Stage {stage} finished but printed no JSON result.")


class SemisupDockerStageOperator(_StageFields, DockerOperator):
    """Run one stage in the stage image with Docker (see the module docstring)."""

    template_fields = (*DockerOperator.template_fields, "shards", "group", "store")
    ui_color = "#e3f2e8"

    def __init__(self, *, stage: str, shards: Any = None, group: Any = None, store: str | None = None,
                 processes: int = 1, credential_env: tuple[str, ...] = CREDENTIAL_ENV, **kwargs: Any) -> None:
        kwargs.setdefault("do_xcom_push", True)
        kwargs.setdefault("xcom_all", True)  # the result is found among the last lines
        kwargs.setdefault("mount_tmp_dir", False)  # the worker itself may run in a container
        kwargs.setdefault("auto_remove", "success")
        super().__init__(command=None, **kwargs)
        self._set_stage(stage, shards, group, store, processes)
        self.credential_env = credential_env

    def prepare(self, context: Context) -> StageRequest:
        """Set the container's command and environment for this run (called by ``execute``)."""
        request = self.stage_request(context)
        # the image's entrypoint is `semisup`: run the whole command line instead
        self.entrypoint, *self.command = request.command("python", None)
        self.entrypoint = [self.entrypoint]
        self.environment = {**self.environment, "PYTHONUNBUFFERED": "1",
                            **{k: os.environ[k] for k in STORE_ENV if k in os.environ}}
        # private: never templated, rendered or logged by the operator
        self._private_environment = {**self._private_environment,
                                     **{k: os.environ[k] for k in self.credential_env if k in os.environ}}
        return request

    def execute(self, context: Context) -> dict[str, Any]:
        self.prepare(context)
        try:
            output = super().execute(context)
        except DockerContainerFailedException as exc:
            lines = [str(line) for line in exc.logs or []]
            if is_user_error(1, lines):  # the stage refused its input: retrying cannot help
                raise AirflowFailException(f"Stage {self.stage} refused its input: {last_error_line(lines)}") from None
            raise
        return result_from_output(output, self.stage)


class SemisupKubernetesStageOperator(_StageFields, KubernetesPodOperator):
    """Run one stage in the stage image as a Kubernetes pod (see the module docstring)."""

    template_fields = (*KubernetesPodOperator.template_fields, "shards", "group", "store")
    ui_color = "#e8eaf6"

    def __init__(self, *, stage: str, shards: Any = None, group: Any = None, store: str | None = None,
                 processes: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("name", f"semisup-{stage}")
        kwargs.setdefault("cmds", ["python"])
        kwargs.setdefault("do_xcom_push", True)
        kwargs.setdefault("durable", True)  # a retried task re-attaches to its pod instead of starting another
        kwargs.setdefault("on_finish_action", "delete_succeeded_pod")  # failed pods stay for a look
        kwargs.setdefault("get_logs", True)
        kwargs["labels"] = {"app": "semisup", "semisup-stage": stage, **(kwargs.get("labels") or {})}
        super().__init__(**kwargs)
        self._set_stage(stage, shards, group, store, processes)

    def prepare(self, context: Context) -> StageRequest:
        from kubernetes.client import models as k8s

        request = self.stage_request(context)
        self.cmds, *rest = request.command("python", XCOM_RESULT)
        self.cmds, self.arguments = [self.cmds], rest
        # where the store is (not secret: the credentials come from the Secret), as the worker sees it
        store_env = {k: os.environ[k] for k in STORE_ENV if k in os.environ}
        if isinstance(self.env_vars, dict):  # converted to V1EnvVar when the pod is built
            self.env_vars = {**store_env, **self.env_vars}
        else:
            present = {e.name for e in self.env_vars}
            self.env_vars = [*self.env_vars, *(k8s.V1EnvVar(name=k, value=v) for k, v in store_env.items()
                                               if k not in present)]
        return request

    def execute(self, context: Context) -> Any:
        self.prepare(context)
        return super().execute(context)

    def cleanup(self, pod, remote_pod, *args: Any, **kwargs: Any) -> None:
        try:
            super().cleanup(pod, remote_pod, *args, **kwargs)
        except AirflowException as exc:
            code = exit_code(remote_pod, self.base_container_name)
            if code == USER_ERROR_EXIT or (code and ERROR_PREFIX in str(exc)):  # torchrun exits 1
                # the stage refused its input: retrying cannot help (its sentence is the termination message)
                raise AirflowFailException(f"Stage {self.stage} refused its input: {exc}") from None
            raise


def exit_code(remote_pod: Any, container: str) -> int | None:
    """The exit status of ``container`` in a finished pod, when the pod's status has it."""
    statuses = (remote_pod.status.container_statuses if remote_pod is not None and remote_pod.status else None) or []
    for status in statuses:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


def docker_kwargs(stage: str, deployment: Deployment) -> dict[str, Any]:
    from docker.types import DeviceRequest, Mount

    d, resources, gpus = deployment.docker, deployment.resources_for(stage), deployment.gpus_for(stage)
    kwargs: dict[str, Any] = {"image": deployment.image, "shm_size": d.shm_size, "network_mode": d.network_mode,
                              "mounts": [Mount(**m) for m in d.mounts], "user": d.user}
    if d.docker_url:
        kwargs["docker_url"] = d.docker_url
    if gpus:
        kwargs["device_requests"] = [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
    if resources.memory:
        kwargs["mem_limit"] = resources.memory
    return kwargs  # (DockerOperator's `cpus` is a relative weight, not a limit: CPU limits are Kubernetes-only)


def kubernetes_kwargs(stage: str, deployment: Deployment) -> dict[str, Any]:
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    k, resources, gpus = deployment.kubernetes, deployment.resources_for(stage), deployment.gpus_for(stage)
    requests = {key: value for key, value in (("cpu", resources.cpu), ("memory", resources.memory)) if value}
    limits = dict(requests)
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)  # GPUs are requested through limits
    kwargs: dict[str, Any] = {
        "image": deployment.image, "namespace": k.namespace,
        # GPU nodes only for stages that use a GPU: select, filter and materialize stay off them
        "node_selector": dict(k.node_selector) if gpus else {},
        "tolerations": [k8s.V1Toleration(**t) for t in k.tolerations] if gpus else [],
        "container_resources": k8s.V1ResourceRequirements(requests=requests or None, limits=limits or None),
        "secrets": [Secret("env", None, k.secret_name)] if k.secret_name else [],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
        # the default 64 MB /dev/shm is too small for DataLoader workers and NCCL
        "volumes": [k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory",
                                                                                    size_limit=k.shm_size))],
        "volume_mounts": [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        # the stage image's own non-root user (Dockerfile: USER 10001), enforced by the kubelet, so a
        # changed image cannot start as root; the XCom sidecar runs as the same user and reads the result
        "security_context": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                             "seccompProfile": {"type": "RuntimeDefault"}},
        "container_security_context": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "service_account_name": k.service_account_name,
        "image_pull_secrets": [k8s.V1LocalObjectReference(name=n) for n in k.image_pull_secrets] or None,
        "deferrable": k.deferrable, "startup_timeout_seconds": k.startup_timeout_seconds,
    }
    for name in ("in_cluster", "config_file", "cluster_context"):
        if getattr(k, name) is not None:
            kwargs[name] = getattr(k, name)
    return kwargs
