"""Where each stage of this deployment runs, and with what: read once when the DAG is parsed.

The deployment is configured by the environment of the DAG processor and workers, never by an
Airflow Variable read at top level:

- ``SEMISUP_DEPLOYMENT``: path of a YAML or JSON file with the keys of :class:`Deployment`;
- ``SEMISUP_RUNNER`` (``local``, ``docker`` or ``kubernetes``) and ``SEMISUP_IMAGE`` override the
  file's ``runner`` and ``image``.

Example (``deploy/kubernetes.yaml``)::

    runner: kubernetes
    image: registry.example.com/semisup-stage:0.1.0
    gpu_pool: gpu
    stage_runners: {plan: local, evaluate: local}    # cheap stages stay on the worker
    resources:
      gpu: {gpus: 1, cpu: "8", memory: 32Gi, timeout_minutes: 720}   # the GPU stages
      select: {cpu: "4", memory: 16Gi}
    kubernetes:
      namespace: ml
      node_selector: {nvidia.com/gpu.present: "true"}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      secret_name: semisup-s3          # a Kubernetes Secret with AWS_ACCESS_KEY_ID etc.

:func:`stage_task` and :func:`mapped_stage_task` build the task for a stage with the operator of
its runner: ``SemisupStageOperator`` (local subprocess) or the Docker and Kubernetes operators of
``semisup_containers``. GPU stages get the ``gpu_pool`` and their GPUs; every runner returns the
same JSON result document.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import semisup_operator  # noqa: F401  (makes semisup_tasks importable from a checkout)

from semisup_tasks.config import STAGE_NAMES, TRAINING_STAGES

RUNNER_NAMES = ("local", "docker", "kubernetes")
#: stages that run a model: they get the ``gpu`` resources and the GPU pool
GPU_STAGES = (*TRAINING_STAGES, "score")
#: what containers need to reach an S3 store; passed privately (Docker) or from a Secret (Kubernetes)
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: not secret, so they may appear in the container's environment as is
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


class DeploymentError(ValueError):
    """The deployment configuration is not usable; the message says what to change."""


@dataclass(frozen=True)
class StageResources:
    gpus: int = 0
    cpu: str | None = None  # Kubernetes quantity, e.g. "8" (Kubernetes only)
    memory: str | None = None  # Kubernetes quantity, e.g. "32Gi"; for Docker, e.g. "32g"
    timeout_minutes: int | None = None

    def __post_init__(self) -> None:
        for name in ("gpus", "timeout_minutes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise DeploymentError(f"Deployment resources: {name} must be a whole number of at least 0, "
                                      f"not {value!r}.")
        for name in ("cpu", "memory"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))  # YAML reads 8 as a number


@dataclass(frozen=True)
class DockerSettings:
    docker_url: str | None = None  # default: DOCKER_HOST or the local socket
    network_mode: str | None = None  # e.g. the compose network, so the stage reaches the object store
    shm_size: str = "8g"  # DataLoader workers pass batches through shared memory
    mounts: list[dict[str, Any]] = field(default_factory=list)  # docker.types.Mount keyword arguments
    user: str | None = None


@dataclass(frozen=True)
class KubernetesSettings:
    namespace: str = "default"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # node selector and tolerations: GPU stages
    shm_size: str = "8Gi"  # /dev/shm (a memory-backed volume): DataLoader workers, NCCL
    secret_name: str | None = None  # a Secret whose keys become the pod's environment (credentials)
    service_account_name: str | None = None
    image_pull_secrets: list[str] = field(default_factory=list)
    deferrable: bool = True  # the triggerer watches the pod; the worker slot is free meanwhile
    #   (so make the gpu pool count deferred tasks: `airflow pools set gpu N ... --include-deferred`)
    startup_timeout_seconds: int = 900  # GPU nodes scale up and stage images are large
    in_cluster: bool | None = None
    config_file: str | None = None
    cluster_context: str | None = None


@dataclass(frozen=True)
class Deployment:
    runner: str = "local"
    image: str = "semisup-stage:latest"
    stage_runners: dict[str, str] = field(default_factory=dict)
    gpu_pool: str | None = None  # an Airflow pool sized to the GPUs, shared by the GPU stages
    gpu_queue: str | None = None  # a Celery queue served by workers with GPUs (local runner on GPU hosts)
    resources: dict[str, StageResources] = field(default_factory=dict)  # keys: "default", "gpu" or a stage
    docker: DockerSettings = field(default_factory=DockerSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)

    def __post_init__(self) -> None:
        for where, name in [("runner", self.runner), *((f"stage_runners.{s}", r)
                                                        for s, r in self.stage_runners.items())]:
            if name not in RUNNER_NAMES:
                raise DeploymentError(f"Deployment {where} is {name!r}; use one of {', '.join(RUNNER_NAMES)}.")
        for where, keys, extra in (("stage_runners", self.stage_runners, ()),
                                   ("resources", self.resources, ("default", "gpu"))):
            unknown = sorted(set(keys) - set(STAGE_NAMES) - set(extra))
            if unknown:
                raise DeploymentError(f"Deployment {where} names unknown stage(s) {', '.join(unknown)}; stages are "
                                      f"{', '.join((*extra, *STAGE_NAMES))}.")

    def runner_for(self, stage: str) -> str:
        return self.stage_runners.get(stage, self.runner)

    def resources_for(self, stage: str) -> StageResources:
        """The stage's own entry, else ``gpu`` for GPU stages (in containers one GPU unless it says
        otherwise), else ``default``."""
        if stage in self.resources:
            return self.resources[stage]
        if stage in GPU_STAGES:
            if "gpu" in self.resources:
                return self.resources["gpu"]
            if self.runner_for(stage) != "local":
                return StageResources(gpus=1)
        return self.resources.get("default", StageResources())

    def gpus_for(self, stage: str) -> int:
        """GPUs the stage's task takes: training uses all it is given (torchrun); scoring and the rest one at most."""
        gpus = self.resources_for(stage).gpus
        return gpus if stage in TRAINING_STAGES else min(1, gpus)


def _build(cls: type, data: Any, where: str) -> Any:
    """A settings dataclass from a mapping; an unknown or badly typed key is one clear error."""
    if not isinstance(data, dict):
        raise DeploymentError(f"Deployment {where} must be a mapping, not {type(data).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DeploymentError(f"Deployment {where} has unknown key(s) {', '.join(unknown)}; "
                              f"known keys are {', '.join(sorted(names))}.")
    try:
        return cls(**data)
    except TypeError as exc:
        raise DeploymentError(f"Deployment {where} is not valid: {exc}.") from None


def deployment_from_dict(data: dict[str, Any]) -> Deployment:
    data = dict(data)
    resources = data.get("resources")
    if resources is not None and not isinstance(resources, dict):
        raise DeploymentError(f"Deployment resources must be a mapping, not {type(resources).__name__}.")
    data["resources"] = {name: _build(StageResources, value, f"resources.{name}")
                         for name, value in (resources or {}).items()}
    for name, cls in (("docker", DockerSettings), ("kubernetes", KubernetesSettings)):
        data[name] = _build(cls, {} if data.get(name) is None else data[name], name)
    return _build(Deployment, data, "file")


def load_deployment(env: dict[str, str] | None = None) -> Deployment:
    """This deployment's settings, from ``SEMISUP_DEPLOYMENT``, ``SEMISUP_RUNNER`` and ``SEMISUP_IMAGE``."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = env.get("SEMISUP_DEPLOYMENT")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise DeploymentError(f"Cannot read the deployment file SEMISUP_DEPLOYMENT={path}: "
                                  f"{exc.strerror}.") from None
        import yaml  # installed with Airflow

        try:
            data = (yaml.safe_load(text) or {}) if path.endswith((".yaml", ".yml")) else json.loads(text)
        except (ValueError, yaml.YAMLError) as exc:  # ValueError: json's errors
            reason = " ".join(str(exc).split())
            raise DeploymentError(f"The deployment file {path} is not valid YAML or JSON: {reason}.") from None
        if not isinstance(data, dict):
            raise DeploymentError(f"The deployment file {path} must hold a mapping of settings.")
    for key, var in (("runner", "SEMISUP_RUNNER"), ("image", "SEMISUP_IMAGE")):
        if env.get(var):
            data[key] = env[var]
    return deployment_from_dict(data)


def _common_kwargs(stage: str, deployment: Deployment) -> dict[str, Any]:
    resources, gpus = deployment.resources_for(stage), deployment.gpus_for(stage)
    kwargs: dict[str, Any] = {}
    if stage in TRAINING_STAGES and gpus > 1:
        kwargs["processes"] = gpus  # data-parallel under torchrun, one process per GPU
    if deployment.gpu_pool and stage in GPU_STAGES:
        kwargs["pool"] = deployment.gpu_pool
        kwargs["pool_slots"] = max(1, gpus)  # the pool counts GPUs, not tasks
    if deployment.gpu_queue and stage in GPU_STAGES:
        kwargs["queue"] = deployment.gpu_queue
    if resources.timeout_minutes:
        kwargs["execution_timeout"] = timedelta(minutes=resources.timeout_minutes)
    return kwargs


def operator_for(stage: str, deployment: Deployment) -> tuple[type, dict[str, Any]]:
    """The operator class for the stage's runner and the keyword arguments this deployment gives it."""
    runner = deployment.runner_for(stage)
    kwargs = {"stage": stage, **_common_kwargs(stage, deployment)}
    if runner == "local":
        from semisup_operator import SemisupStageOperator

        return SemisupStageOperator, kwargs
    from semisup_containers import docker_kwargs, kubernetes_kwargs

    if runner == "docker":
        from semisup_containers import SemisupDockerStageOperator

        return SemisupDockerStageOperator, {**kwargs, **docker_kwargs(stage, deployment)}
    from semisup_containers import SemisupKubernetesStageOperator

    return SemisupKubernetesStageOperator, {**kwargs, **kubernetes_kwargs(stage, deployment)}


def stage_task(task_id: str, stage: str, deployment: Deployment | None = None, **kwargs: Any):
    """The task that runs ``stage`` where this deployment runs it."""
    cls, defaults = operator_for(stage, deployment or load_deployment())
    return cls(task_id=task_id, **{**defaults, **kwargs})


def mapped_stage_task(task_id: str, stage: str, groups: Any, deployment: Deployment | None = None,
                      **kwargs: Any):
    """``stage`` mapped over shard-group indices (the score and filter stages)."""
    from semisup_operator import GROUP_MAP_INDEX_TEMPLATE

    cls, defaults = operator_for(stage, deployment or load_deployment())
    return cls.partial(task_id=task_id, map_index_template=GROUP_MAP_INDEX_TEMPLATE,
                       **{**defaults, **kwargs}).expand(group=groups)
