"""The DAG params of semisup pipelines: the store plus one ``Param`` per PipelineParams field.

Built from :func:`semisup_tasks.config.param_specs`, so the trigger form, the REST/CLI ``conf``
and the stages validate against the same definitions. Cheap to import (no torch, no I/O).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import semisup_operator  # noqa: F401  (makes semisup_tasks importable from a checkout)
from airflow.sdk import Param
from semisup_runners import resolve_store

from semisup_tasks.config import DEFAULT_STORE, PipelineParams, param_specs

STORE_ENV = "SEMISUP_STORE"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STORE_SECTION = "Store"


def default_store() -> str:
    """``$SEMISUP_STORE``, else the embedded store; relative paths resolve against the project root."""
    return resolve_store(os.environ.get(STORE_ENV) or DEFAULT_STORE, cwd=PROJECT_ROOT)


def _title(name: str) -> str:
    return name.replace("_", " ").capitalize()


def pipeline_params(store: str | None = None, defaults: dict[str, Any] | None = None) -> dict[str, Param]:
    """Params for a DAG that runs semisup stages (``store`` first, then every pipeline param).

    ``defaults`` replaces some PipelineParams defaults for this DAG (checked like any value)."""
    defaults = dict(defaults or {})
    if defaults:
        PipelineParams.from_dict(defaults)  # a bad DAG default fails at parse time, in one sentence
    params: dict[str, Param] = {
        "store": Param(
            store or default_store(), type="string", minLength=1, title="Store",
            description="Store root URI: file:///path or s3://bucket/prefix (default: $SEMISUP_STORE).",
            section=STORE_SECTION,
        )
    }
    for name, spec in param_specs().items():
        schema: dict[str, Any] = dict(spec["schema"])
        params[name] = Param(defaults.get(name, spec["default"]), description=spec["description"], title=_title(name),
                             section=spec["section"], **schema)
    return params
