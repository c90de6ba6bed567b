"""The Docker and Kubernetes stage operators, rendered without a Docker engine or a cluster:
the pod spec and the Docker host config they would send, and the deployment that picks them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from semisup_deployment import DeploymentError, deployment_from_dict, load_deployment, stage_task

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-value-never-shown"
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: test, user: {username: test}}]
contexts: [{name: test, context: {cluster: test, user: test}}]
current-context: test
"""


@pytest.fixture()
def kubeconfig(tmp_path) -> str:
    path = tmp_path / "kubeconfig.yaml"  # parsed only: nothing connects to the server it names
    path.write_text(KUBECONFIG)
    return str(path)


@pytest.fixture()
def credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://object-store:9000")


def context(**params):
    return {"params": {"store": "s3://bucket/semisup", "k": 50, **params}, "run_id": "manual__1"}


def k8s_deployment(kubeconfig: str, **extra):
    return deployment_from_dict({
        "runner": "kubernetes", "image": "registry.example.com/semisup-stage:0.1.0", "gpu_pool": "gpu",
        "resources": {"gpu": {"gpus": 2, "cpu": "8", "memory": "32Gi", "timeout_minutes": 720}},
        "kubernetes": {"namespace": "ml", "node_selector": {"nvidia.com/gpu.present": "true"},
                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                       "secret_name": "semisup-s3", "config_file": kubeconfig, "in_cluster": False},
        **extra})


def rendered_pod(op) -> dict:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(op.build_pod_request_obj())


def test_kubernetes_pod_spec_of_a_gpu_stage(kubeconfig, credentials):
    from semisup_containers import SemisupKubernetesStageOperator

    op = stage_task("train_teacher", "train-teacher", k8s_deployment(kubeconfig))
    assert isinstance(op, SemisupKubernetesStageOperator)
    assert op.pool == "gpu" and op.pool_slots == 2  # the pool counts GPUs
    assert op.execution_timeout.total_seconds() == 720 * 60
    assert op.deferrable and op.durable and op.reattach_on_restart and op.do_xcom_push
    op.prepare(context())
    pod = rendered_pod(op)
    assert pod["metadata"]["namespace"] == "ml"
    assert pod["metadata"]["labels"]["semisup-stage"] == "train-teacher"
    (base,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    assert base["image"] == "registry.example.com/semisup-stage:0.1.0"
    # two GPUs: the training stage runs data-parallel under torchrun, one process per GPU
    assert base["command"] == ["python"]
    args = base["args"]
    assert args[:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    at = args.index("semisup_tasks")
    assert args[at + 1:at + 3] == ["stage", "train-teacher"] and args[args.index("--run-id") + 1] == "manual__1"
    assert args[args.index("--store") + 1] == "s3://bucket/semisup"
    assert json.loads(args[args.index("--params-json") + 1])["k"] == 50
    assert args[-2:] == ["--result-file", "/airflow/xcom/return.json"]  # read by the XCom sidecar
    assert base["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert base["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["spec"]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert base["envFrom"] == [{"secretRef": {"name": "semisup-s3"}}]  # credentials from the Secret only
    env = {e["name"]: e.get("value") for e in base["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://object-store:9000" and "AWS_SECRET_ACCESS_KEY" not in env
    assert {"mountPath": "/dev/shm", "name": "dshm"} in base["volumeMounts"]
    assert {"emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}, "name": "dshm"} in pod["spec"]["volumes"]
    assert any(c["name"] == "airflow-xcom-sidecar" for c in pod["spec"]["containers"])
    # never root: the image's user, enforced by the kubelet, no privilege escalation, no capabilities
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)[-1] == "10001"  # the same user as the image
    assert base["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    text = json.dumps(pod)
    assert SECRET not in text and "AKIA-test-key-id" not in text


def test_mapped_score_tasks_and_cheap_stages_follow_the_deployment(kubeconfig):
    from semisup_containers import SemisupKubernetesStageOperator
    from semisup_operator import SemisupStageOperator

    dep = k8s_deployment(kubeconfig, stage_runners={"plan": "local"})
    assert isinstance(stage_task("plan", "plan", dep), SemisupStageOperator)
    select = stage_task("select", "select", dep)  # not a GPU stage: no pool, no GPU
    assert isinstance(select, SemisupKubernetesStageOperator) and select.pool != "gpu"
    select.prepare(context())
    pod = rendered_pod(select)
    (base,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    assert "nvidia.com/gpu" not in (base["resources"].get("limits") or {})
    assert not pod["spec"].get("nodeSelector") and not pod["spec"].get("tolerations")  # off the GPU nodes
    score = stage_task("score", "score", dep, group=7)
    score.prepare(context())
    (base,) = [c for c in rendered_pod(score)["spec"]["containers"] if c["name"] == "base"]
    assert base["args"][base["args"].index("--group") + 1] == "7"
    assert base["args"][:4] == ["-m", "semisup_tasks", "stage", "score"]  # scoring: one process per pod
    assert base["resources"]["limits"]["nvidia.com/gpu"] == "1" and score.pool_slots == 1  # of the 2 given


def test_docker_arguments_of_a_gpu_stage(credentials):
    from docker.types import HostConfig
    from semisup_containers import SemisupDockerStageOperator

    dep = deployment_from_dict({
        "runner": "docker", "image": "semisup-stage:0.1.0", "gpu_pool": "gpu",
        "resources": {"gpu": {"gpus": 1, "memory": "24g"}},
        "docker": {"network_mode": "semisup_default", "shm_size": "16g",
                   "mounts": [{"source": "/srv/semisup", "target": "/data", "type": "bind"}]}})
    op = stage_task("score", "score", dep, group=2)
    assert isinstance(op, SemisupDockerStageOperator) and op.pool == "gpu"
    op.prepare(context())
    # the whole command line replaces the image's `semisup` entrypoint
    assert op.entrypoint == ["python"] and op.command[:4] == ["-m", "semisup_tasks", "stage", "score"]
    assert "--result-file" not in op.command  # the result is the last line of standard output
    # what DockerOperator hands the Docker API, built by docker-py itself
    host = HostConfig(version="1.44", device_requests=op.device_requests, shm_size=op.shm_size,
                      network_mode=op.network_mode, mounts=op.mounts, mem_limit=op.mem_limit)
    assert host["DeviceRequests"] == [{"Driver": "", "Count": 1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                                       "Options": {}}]
    assert host["ShmSize"] == 16 * 1024**3 and host["NetworkMode"] == "semisup_default"
    assert host["Mounts"][0]["Target"] == "/data" and host["Memory"] == 24 * 1024**3
    # credentials go privately; the endpoint is no secret
    assert op._private_environment["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert op.environment["AWS_ENDPOINT_URL"] == "http://object-store:9000"
    for name in op.template_fields:
        assert SECRET not in repr(getattr(op, name)), f"credential in template field {name}"


def test_docker_stage_result_and_user_errors(monkeypatch):
    """The Docker engine cannot run here: DockerOperator.execute is replaced by what it returns or raises."""
    from airflow.providers.docker.exceptions import DockerContainerFailedException
    from airflow.providers.docker.operators.docker import DockerOperator
    from airflow.sdk.exceptions import AirflowFailException
    from semisup_containers import result_from_output

    op = stage_task("plan", "plan", deployment_from_dict({"runner": "docker"}))
    lines = ["2026-11-28 10:00:00 semisup.stages running plan", '{"drops": ["d1"], "images": 10}']
    monkeypatch.setattr(DockerOperator, "execute", lambda self, ctx: lines)
    assert op.execute(context()) == {"drops": ["d1"], "images": 10}
    refused = ["semisup: error: Parameter p=9 exceeds the 3 classes of dataset 'tiny'; use p between 1 and 3."]

    def fail(self, ctx):
        raise DockerContainerFailedException("Docker container failed: {'StatusCode': 2}", logs=refused)

    monkeypatch.setattr(DockerOperator, "execute", fail)
    with pytest.raises(AirflowFailException, match="refused its input: Parameter p=9 exceeds"):
        op.execute(context())
    with pytest.raises(Exception, match="printed no JSON result"):
        result_from_output(["no result here"], "plan")


def test_deployment_from_environment_and_file(tmp_path):
    assert load_deployment({}).runner == "local"
    assert load_deployment({"SEMISUP_RUNNER": "docker", "SEMISUP_IMAGE": "x:1"}).image == "x:1"
    path = tmp_path / "deploy.yaml"
    path.write_text("runner: kubernetes\nstage_runners: {evaluate: local}\nkubernetes: {namespace: ml}\n")
    dep = load_deployment({"SEMISUP_DEPLOYMENT": str(path)})
    assert dep.runner_for("score") == "kubernetes" and dep.runner_for("evaluate") == "local"
    assert dep.resources_for("score").gpus == 1 and dep.resources_for("select").gpus == 0
    assert load_deployment({"SEMISUP_DEPLOYMENT": str(path), "SEMISUP_RUNNER": "local"}).runner == "local"


@pytest.mark.parametrize("data,message", [
    ({"runner": "ssh"}, "runner is 'ssh'; use one of local, docker, kubernetes"),
    ({"stage_runners": {"score": "slurm"}}, "stage_runners.score is 'slurm'"),
    ({"kubernetes": {"namespce": "ml"}}, "kubernetes has unknown key"),
    ({"resources": {"gpu": {"gpu": 1}}}, "resources.gpu has unknown key"),
    ({"docker": []}, "docker must be a mapping"),
    ({"resources": {"gpu": {"gpus": "2"}}}, "gpus must be a whole number of at least 0, not '2'"),
    ({"resources": {"train_teacher": {"gpus": 1}}}, "resources names unknown stage"),
    ({"stage_runners": {"scoring": "local"}}, "stage_runners names unknown stage"),
])
def test_bad_deployments_fail_with_one_sentence(data, message):
    with pytest.raises(DeploymentError, match=message):
        deployment_from_dict(data)


def test_missing_or_malformed_deployment_file_is_one_sentence(tmp_path):
    with pytest.raises(DeploymentError, match="Cannot read the deployment file"):
        load_deployment({"SEMISUP_DEPLOYMENT": "/nonexistent/deploy.yaml"})
    for name, text in (("bad.yaml", "runner: [local\n"), ("bad.json", "{runner: local}")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DeploymentError, match=f"{name} is not valid YAML or JSON"):
            load_deployment({"SEMISUP_DEPLOYMENT": str(tmp_path / name)})


@pytest.mark.parametrize("runner", ["docker", "kubernetes"])
def test_the_dag_parses_and_serializes_with_container_runners(runner, tmp_path):
    code = (
        "import json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "from airflow.serialization.serialized_objects import DagSerialization\n"
        f"bag = DagBag(dag_folder={str(ROOT / 'dags')!r})\n"
        "dag = bag.dags['semisup_retrain']\n"
        "DagSerialization.serialize_dag(dag)\n"
        "print(json.dumps({'errors': {str(k): v for k, v in bag.import_errors.items()},\n"
        "                  'ops': {t.task_id: type(t).__name__ for t in dag.tasks},\n"
        "                  'pools': {t.task_id: t.pool for t in dag.tasks}}))\n"
    )
    env = {**os.environ, "SEMISUP_RUNNER": runner, "SEMISUP_DEPLOYMENT": ""}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    expected = "SemisupDockerStageOperator" if runner == "docker" else "SemisupKubernetesStageOperator"
    assert out["ops"]["train_teacher"] == expected and out["ops"]["evaluate"] == expected
    assert out["ops"]["score"] == "MappedOperator"


def test_the_committed_deployment_files_load():
    compose = load_deployment({"SEMISUP_DEPLOYMENT": str(ROOT / "deploy" / "compose.yaml")})
    teacher, select = stage_task("t", "train-teacher", compose), stage_task("s", "select", compose)
    assert teacher.queue == "gpu" and teacher.pool == "gpu"
    assert select.queue != "gpu" and select.pool != "gpu"
    k8s = load_deployment({"SEMISUP_DEPLOYMENT": str(ROOT / "deploy" / "kubernetes.example.yaml")})
    assert k8s.runner_for("score") == "kubernetes" and k8s.runner_for("evaluate") == "local"
    assert k8s.resources_for("score").gpus == 1 and k8s.resources_for("materialize").memory == "64Gi"


def test_a_pod_that_refused_its_input_fails_without_retries(kubeconfig, monkeypatch):
    """No cluster here: KubernetesPodOperator.cleanup is replaced by the failure it raises for a failed pod."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
    from kubernetes.client import models as k8s
    from semisup_containers import exit_code

    def pod(code: int) -> k8s.V1Pod:
        state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=code))
        status = k8s.V1ContainerStatus(name="base", state=state, image="i", image_id="", ready=False,
                                       restart_count=0)
        return k8s.V1Pod(status=k8s.V1PodStatus(phase="Failed", container_statuses=[status]))

    assert exit_code(pod(2), "base") == 2 and exit_code(pod(2), "other") is None and exit_code(None, "base") is None

    message = ["Pod semisup-plan returned a failure. semisup: error: Parameter p=9 exceeds the classes."]

    def failed(self, pod, remote_pod, *args, **kwargs):
        raise AirflowException(message[0])

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", failed)
    op = stage_task("plan", "plan", k8s_deployment(kubeconfig))
    with pytest.raises(AirflowFailException, match="refused its input: .*Parameter p=9"):
        op.cleanup(None, pod(2))
    with pytest.raises(AirflowFailException):  # torchrun exits 1 whatever its workers did: the sentence tells
        op.cleanup(None, pod(1))
    message[0] = "Pod semisup-plan returned a failure."
    with pytest.raises(AirflowException) as crash:  # any other failure is retried
        op.cleanup(None, pod(137))
    assert not isinstance(crash.value, AirflowFailException)
