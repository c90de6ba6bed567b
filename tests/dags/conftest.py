"""Airflow-side test setup: a private AIRFLOW_HOME, this checkout's dags/ and plugins/.

The environment is set when this file is imported, i.e. before any test module imports
Airflow (Airflow reads its configuration once, at import).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
PLUGINS = ROOT / "plugins"
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="semisup-airflow-home-"))

AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
}
os.environ.update(AIRFLOW_ENV)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]]
)
for path in (str(PLUGINS), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

AIRFLOW_BIN = str(Path(sys.executable).parent / "airflow")


@pytest.fixture(scope="session", autouse=True)
def _airflow_home() -> Iterator[Path]:
    yield AIRFLOW_HOME
    shutil.rmtree(AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db(_airflow_home: Path) -> Path:
    """An initialised SQLite metadata DB in the private AIRFLOW_HOME (``airflow db migrate``, once)."""
    proc = subprocess.run([AIRFLOW_BIN, "db", "migrate"], env=os.environ.copy(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _airflow_home


@pytest.fixture(scope="session")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="session")
def retrain_dag(dagbag):
    assert "semisup_retrain" in dagbag.dags, dagbag.import_errors
    return dagbag.dags["semisup_retrain"]
