"""The deployment files: the compose file validates offline, wires what the DAG expects, and
keeps every credential in .env; every image the repo builds runs as a non-root user; no tracked
file holds a secret; the CLI's logs and result documents never carry the AWS credentials."""

import os
import random
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from semisup_tasks.images import encode_png

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


def test_airflow_image_keeps_the_base_images_non_root_user():
    """apache/airflow images end with ``USER ${AIRFLOW_UID}`` (50000, the airflow user): an image built
    FROM one stays non-root unless it switches user and does not switch back."""
    dockerfile = (ROOT / "Dockerfile.airflow").read_text()
    assert re.search(r"^FROM apache/airflow:\S+", dockerfile, flags=re.M)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    assert not users or users[-1].split(":")[0] not in ("root", "0"), f"Dockerfile.airflow ends as {users[-1]}"
    # and compose runs the Airflow containers as AIRFLOW_UID (group 0, as the image expects), never as root
    env_example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                       if line and not line.startswith("#"))
    assert env_example["AIRFLOW_UID"] not in ("", "0")
    built = {name: svc for name, svc in compose()["services"].items() if "build" in svc}
    assert built and all("Dockerfile.airflow" in svc["build"]["dockerfile"] for svc in built.values())
    for name, svc in built.items():
        user = str(svc.get("user", ""))
        assert re.fullmatch(r"\$\{AIRFLOW_UID:-50000\}:0", user), f"{name} runs as {user!r}"


# -- committed secrets ---------------------------------------------------------------------------

def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


#: detect-secrets' detectors less the three that flag any quoted word after 'secret' or any random-looking
#: string (the tests' fake markers, names like secret_name): what is left matches real credential formats
NOISY_DETECTORS = {"KeywordDetector", "Base64HighEntropyString", "HexHighEntropyString"}
#: detect-secrets finds an AWS secret key only when quoted; an ini, .env or YAML line leaves it bare
AWS_SECRET_ASSIGNMENT = re.compile(
    r"aws_?secret_?access_?key[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])", re.IGNORECASE)


def _detect_secrets(paths: list[Path]) -> dict[str, list[str]]:
    """Path -> kinds of credential found in it, by detect-secrets and the bare AWS secret key pattern."""
    from detect_secrets import SecretsCollection
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.settings import transient_settings

    plugins = [{"name": cls.__name__} for cls in get_mapping_from_secret_type_to_class().values()
               if cls.__name__ not in NOISY_DETECTORS]
    found: dict[str, list[str]] = {}
    with transient_settings({"plugins_used": plugins}):
        secrets = SecretsCollection()
        secrets.scan_files(*[str(p) for p in paths])
    for filename, secret in secrets:
        found.setdefault(str(Path(filename).resolve()), []).append(secret.type)
    for path in paths:
        if AWS_SECRET_ASSIGNMENT.search(path.read_text(errors="replace")):
            found.setdefault(str(path.resolve()), []).append("AWS secret access key assignment")
    return found


#: names whose value is a credential: passwords, secrets, tokens, secret and private keys
SECRET_NAME = r"[A-Za-z0-9_.-]*?(?:password|passwd|pwd|secret|secret_key|secret_access_key|token|api_key|private_key)"
SECRET_ASSIGNMENTS = (re.compile(rf"(?:^|[\s\"'{{,])({SECRET_NAME})[\"']?\s*[:=]\s*(\S[^\n#]*)", re.I | re.M),
                      re.compile(rf"--({SECRET_NAME})(?:=|\s+)(\S+)", re.I))


def _literal_secrets(name: str, text: str) -> list[str]:
    """Credentials written into a deploy file instead of a ${VAR} reference (or, in .env.example, a
    change-me placeholder)."""
    bad = []
    for pattern in SECRET_ASSIGNMENTS:
        for key, value in pattern.findall(text):
            value = value.strip().strip("\"'")
            if value.startswith("$") or value in ("", "null", "~", "...") or value.startswith("<"):
                continue
            if name == ".env.example" and value.startswith("change-me"):
                continue
            bad.append(f"{name}: {key}={value[:12]}...")
    return bad


def _fake(alphabet: str, n: int) -> str:
    return "".join(random.Random(n).choice(alphabet) for _ in range(n))


def test_the_secret_scans_find_planted_credentials(tmp_path):
    """The scans below can fail: each kind of credential they look for is found when planted."""
    upper, mixed = string.ascii_uppercase + string.digits, string.ascii_letters + string.digits + "/+"
    planted = {
        "key-id.py": f"key_id = '{'AKIA' + _fake(upper, 16)}'\n",
        "session.env": f"id={'ASIA' + _fake(upper, 16)}\n",
        "credentials": f"[default]\naws_secret_access_key = {_fake(mixed, 40)}\n",
        "compose.yaml": f"environment:\n  AWS_SECRET_ACCESS_KEY: {_fake(mixed, 40)}\n",
        "id_rsa": "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEow\n-----END " + "RSA PRIVATE KEY-----\n",
        "clean.txt": "secret_name: semisup-s3\npassword: ${POSTGRES_PASSWORD}\n",
    }
    for name, text in planted.items():
        (tmp_path / name).write_text(text)
    found = _detect_secrets([tmp_path / name for name in planted])
    assert {Path(p).name for p in found} == set(planted) - {"clean.txt"}, found
    assert "AWS Access Key" in found[str(tmp_path / "key-id.py")]
    assert "Private Key" in found[str(tmp_path / "id_rsa")]
    assert _literal_secrets("docker-compose.yaml", "      POSTGRES_PASSWORD: hunter2\n")
    assert _literal_secrets("docker-compose.yaml", 'airflow users create --password "hunter2"')
    assert _literal_secrets(".env.example", "AIRFLOW_ADMIN_PASSWORD=admin\n")
    assert not _literal_secrets("docker-compose.yaml", "      POSTGRES_PASSWORD: ${POSTGRES_PASSWORD}\n"
                                                       '  --password "$$AIRFLOW_ADMIN_PASSWORD"\n')


def test_no_tracked_file_holds_a_secret():
    tracked = _tracked()
    assert ".env" not in tracked and not any(Path(f).name == ".env" for f in tracked)
    assert not any(Path(f).suffix in (".pem", ".key", ".p12", ".pfx") or Path(f).name.startswith("id_rsa")
                   for f in tracked)
    assert _detect_secrets([ROOT / f for f in tracked]) == {}
    deploy = [f for f in tracked if re.fullmatch(r"docker-compose\.ya?ml|deploy/.*|Dockerfile.*|\.env\.example|"
                                                 r"scripts/.*|Makefile|\.ci/.*", f)]
    assert "docker-compose.yaml" in deploy and ".env.example" in deploy
    assert [bad for f in deploy for bad in _literal_secrets(f, (ROOT / f).read_text())] == []


# -- credentials in logs and result documents ----------------------------------------------------

KEY_ID, SECRET, TOKEN = "SEMISUPKEYIDMARKER01", "semisup-secret-marker-never-logged", "semisup-session-token-marker"


def test_cli_logs_and_results_never_carry_the_aws_credentials(s3_server, tmp_path):
    """The most verbose CLI run against S3, writing and failing, prints none of the credentials; the same
    requests with botocore's debug logging on would print the key id and the session token."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="semisup-logs")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}
    source = tmp_path / "wild"
    source.mkdir()
    for i in range(3):
        (source / f"{i}.png").write_bytes(encode_png(np.full((8, 8), i * 40, np.uint8)))

    def semisup(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "semisup_tasks", "--verbose", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    store = ["--store", "s3://semisup-logs/semisup"]
    wrote = semisup("import-drop", *store, "--drop-id", "d1", "--source", str(source))
    assert wrote.returncode == 0, wrote.stderr
    assert '"drop_id": "d1"' in wrote.stdout  # the result document (what XCom receives)
    refused = semisup("stage", "plan", *store, "--run-id", "r1", "--params-json", '{"dataset": "missing"}')
    assert refused.returncode == 2 and "semisup: error: Dataset 'missing'" in refused.stderr
    for proc in (wrote, refused):
        for marker in (KEY_ID, SECRET, TOKEN):
            assert marker not in proc.stdout + proc.stderr

    leaky = subprocess.run([sys.executable, "-c", "import logging, boto3; logging.basicConfig(level=logging.DEBUG); "
                            "boto3.client('s3').head_bucket(Bucket='semisup-logs')"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert leaky.returncode == 0, leaky.stderr[-2000:]
    assert KEY_ID in leaky.stderr and TOKEN in leaky.stderr  # what the CLI's logging config keeps out
