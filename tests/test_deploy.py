"""The deployment files: the compose file validates offline and wires what the DAG expects."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_compose_file_validates_offline():
    proc = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_compose_runs_airflow_3_3_with_the_project_mounted():
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer"} <= set(services)
    scheduler = services["airflow-scheduler"]
    assert {"./dags:/opt/airflow/dags", "./plugins:/opt/airflow/plugins"} <= set(scheduler["volumes"])
    assert scheduler["environment"]["SEMISUP_STORE"].startswith("file://")
    dockerfile = (ROOT / scheduler["build"]["dockerfile"]).read_text()
    assert "FROM apache/airflow:3.3.2" in dockerfile
