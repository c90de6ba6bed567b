"""The Airflow tasks of ``semisup_experiments``: thin wrappers over :mod:`semisup_tasks.experiments`.

Each task takes the store and experiment id from the DAG run's params, does one step (prepare, one
shared model, one cell, one transfer seed, aggregate) and returns a small JSON document; the records
themselves stay in the store under ``experiments/<experiment>/``, so a retried or re-run task finds its
record and does nothing again. A ``ConfigError`` (a bad grid, a missing dataset) fails at once, without
retries.
"""

from __future__ import annotations

import os
from typing import Any

import semisup_operator  # noqa: F401  (makes semisup_tasks importable from a checkout)
from airflow.sdk import Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException
from semisup_params import STORE_SECTION, default_store
from semisup_runners import resolve_store

from semisup_tasks.config import ConfigError

#: cells of one experiment running at once (each one trains on every core it finds)
PARALLELISM = int(os.environ.get("SEMISUP_EXPERIMENTS_PARALLELISM", "1"))
#: the worker queue of the training tasks, e.g. GPU workers under CeleryExecutor; unset: the default queue
QUEUE = {"queue": os.environ["SEMISUP_EXPERIMENTS_QUEUE"]} if os.environ.get("SEMISUP_EXPERIMENTS_QUEUE") else {}


def experiment_params(grid: str = "default") -> dict[str, Param]:
    return {
        "store": Param(default_store(), type="string", minLength=1, title="Store", section=STORE_SECTION,
                       description="Store root URI: file:///path or s3://bucket/prefix (default: $SEMISUP_STORE)."),
        "experiment": Param("", type="string", pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$", title="Experiment id",
                            description="Names experiments/<id>/ in the store; empty: this DAG run's id. The "
                                        "same id again resumes it (finished cells are not rerun).",
                            section="Experiment"),
        "grid": Param(grid, type=["string", "object"], title="Grid", section="Experiment",
                      description="A named grid (default: ~1 h on 2 CPU cores on the demo data; ci: a few "
                                  "minutes; full: for GPUs; noisy_student: soft labels and labeled images in "
                                  "every batch) or a grid object {dataset, seeds, base, studies, oracle, "
                                  "weak_label_noise, transfer}; see README 'Experiments'."),
        "notes": Param({}, type="object", title="Notes", section="Experiment",
                       description="Per finding id, why it does not agree: shown in REPRODUCTION.md."),
    }


def _where() -> tuple[Any, str]:
    import re

    from semisup_tasks.store import Store

    context = get_current_context()
    params = context["params"]
    store = Store.from_uri(resolve_store(str(params["store"])))
    experiment = params["experiment"] or re.sub(r"[^A-Za-z0-9_.-]", "_", context["run_id"])[:64]
    return store, experiment


def _user_errors(fn):
    """A ConfigError is the user's to fix: fail without retrying."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise AirflowFailException(str(exc)) from None
    return wrapper


@task(task_id="prepare")
@_user_errors
def prepare() -> dict:
    from semisup_tasks import experiments

    store, experiment = _where()
    grid = get_current_context()["params"]["grid"]
    if isinstance(grid, str) and grid not in experiments.GRIDS:  # a file path would read the worker's files
        raise ConfigError(f"Grid {grid!r} is not a named grid ({', '.join(experiments.GRIDS)}); pass one of those "
                          "or the grid itself as a JSON object.")
    return experiments.prepare(store, experiment, grid)


@task(task_id="ids")
def ids(prepared: dict, what: str) -> list[str]:
    """One list of the prepared ids (Airflow maps over a task's whole return value, not one of its keys)."""
    return list(prepared[what])


@task(task_id="shared_model", **QUEUE, max_active_tis_per_dagrun=PARALLELISM, map_index_template="{{ job }}")
@_user_errors
def shared_model(job: str) -> dict:
    from semisup_tasks import experiments

    get_current_context()["job"] = job  # type: ignore[typeddict-unknown-key]  (the map index label)
    store, experiment = _where()
    return experiments.run_shared(store, experiment, job)


@task(task_id="cell", **QUEUE, max_active_tis_per_dagrun=PARALLELISM, map_index_template="{{ cell }}")
@_user_errors
def cell(cell: str) -> dict:
    from semisup_tasks import experiments

    get_current_context()["cell"] = cell  # type: ignore[typeddict-unknown-key]
    store, experiment = _where()
    record = experiments.run_cell(store, experiment, cell)
    return {k: record.get(k) for k in ("cell", "seed", "points", "error", "seconds")}


@task(task_id="transfer", **QUEUE, max_active_tis_per_dagrun=PARALLELISM, map_index_template="seed {{ seed }}")
@_user_errors
def transfer(seed: str) -> dict:
    from semisup_tasks import experiments

    get_current_context()["seed"] = seed  # type: ignore[typeddict-unknown-key]
    store, experiment = _where()
    return experiments.run_transfer(store, experiment, seed)


@task(task_id="aggregate", trigger_rule="none_failed")  # a grid without transfer skips the (empty) transfer map
@_user_errors
def aggregate() -> dict:
    from semisup_tasks import experiments

    store, experiment = _where()
    return experiments.aggregate(store, experiment, notes=get_current_context()["params"]["notes"] or None)
