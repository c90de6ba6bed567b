"""semisup_tasks is what the GPU container runs: it must never import Airflow."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_module_of_semisup_tasks_imports_airflow():
    offenders = []
    for path in sorted((ROOT / "semisup_tasks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "airflow"]
    assert offenders == []


def test_importing_every_module_loads_no_airflow():
    code = ("import sys, pkgutil, importlib, semisup_tasks\n"
            "for m in pkgutil.iter_modules(semisup_tasks.__path__):\n"
            "    if m.name != '__main__': importlib.import_module('semisup_tasks.' + m.name)\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'airflow'], 'airflow imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_config_module_is_cheap_for_dag_parsing():
    code = ("import sys, semisup_tasks.config\n"
            "assert 'torch' not in sys.modules and 'pyarrow' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
