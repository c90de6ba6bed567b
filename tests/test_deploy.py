"""The deployment files: the compose file validates offline, wires what the DAG expects, and
keeps every credential in .env; the stage image runs as a non-root user."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yaml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_compose_file_validates_offline():
    proc = subprocess.run(["docker-compose", "-f", str(COMPOSE), "--env-file", str(ROOT / ".env.example"),
                           "config", "-q"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_compose_runs_airflow_3_3_with_celery_a_gpu_worker_and_an_s3_store():
    services = compose()["services"]
    assert {"postgres", "redis", "s3", "s3-bucket", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"} <= set(services)
    scheduler = services["airflow-scheduler"]
    env = scheduler["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["SEMISUP_STORE"].startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://s3:8333"
    assert {"./dags:/opt/airflow/dags", "./plugins:/opt/airflow/plugins"} <= set(scheduler["volumes"])
    assert "FROM apache/airflow:3.3.2" in (ROOT / scheduler["build"]["dockerfile"]).read_text()
    gpu = services["airflow-worker-gpu"]
    assert "--queues gpu" in gpu["command"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in services["airflow-worker"]
    # the store's image is pinned, and not the minio/minio repository that left Docker Hub
    image = services["s3"]["image"]
    assert ":" in image and not image.endswith(":latest") and not image.startswith("minio/")
    assert services["airflow-scheduler"]["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"
    # the compose deployment sends the model stages to the GPU worker's queue
    deployment = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    assert deployment["gpu_queue"] == "gpu" and deployment["gpu_pool"] == "gpu"
    assert "airflow pools set gpu" in " ".join(services["airflow-init"]["command"])


def test_credentials_come_from_env_and_no_secret_is_committed():
    text = COMPOSE.read_text()
    for key in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AIRFLOW__API_AUTH__JWT_SECRET",
                "AIRFLOW_ADMIN_PASSWORD", "S3_SECRET_KEY"):
        for value in re.findall(rf"^\s*{key}:\s*(.+)$", text, flags=re.M):
            assert value.startswith("${"), f"{key} is set to a literal in docker-compose.yaml"
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert referenced <= example, f"variables missing from .env.example: {referenced - example}"
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert ".env" not in tracked


def test_stage_image_runs_semisup_as_a_non_root_user_with_the_pinned_torch():
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["semisup"]' in dockerfile
    pins = re.findall(r'"(torch(?:vision)?==[\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins and all(pin in dockerfile for pin in pins)
