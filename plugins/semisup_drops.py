"""Drops on the Airflow side: the ``semisup-drops`` asset, the ingest task that emits its events, and the
gate that skips a retrain with too few new images. Cheap to import (no torch, no I/O).

- :data:`DROPS` is updated once per newly registered drop, with ``extra = {drop_id, images, skipped,
  date, store}``; ``semisup_retrain`` is scheduled on it (or weekly, whichever comes first).
- :func:`ingest_task` registers the drop of the run's day. Nothing landed, or a drop registered before,
  skips the task: a skipped task emits no asset event, so re-ingesting a day triggers no retrain.
- :func:`gate_task` reads the plan's ``gate`` decision; when it says no, every later task is skipped and
  the run still ends in success, with the reason in the gate's log.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import semisup_operator  # noqa: F401  (makes semisup_tasks importable from a checkout)
from airflow.sdk import Asset, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from semisup_params import STORE_SECTION, default_store
from semisup_runners import resolve_store

log = logging.getLogger(__name__)

#: one asset for every drop of every store: the store is in each event's extra; a name, not a URI, because
#: the store is a run param that the DAG file cannot know when it is parsed
DROPS = Asset(name="semisup-drops", group="semisup")
LANDING_ENV = "SEMISUP_LANDING"


def ingest_params() -> dict[str, Param]:
    return {
        "store": Param(default_store(), type="string", minLength=1, title="Store", section=STORE_SECTION,
                       description="Store root URI: file:///path or s3://bucket/prefix (default: $SEMISUP_STORE)."),
        "landing": Param(os.environ.get(LANDING_ENV) or "landing", type="string", minLength=1, title="Landing",
                         section="Landing",
                         description="Where drops land, one folder per day (<landing>/<YYYY-MM-DD>/): a prefix "
                                     "inside the store, or a file:// or s3:// URI (default: $SEMISUP_LANDING "
                                     "or landing)."),
        "drop_prefix": Param("", type="string", pattern="^[A-Za-z0-9._-]*$", title="Drop prefix",
                             section="Landing", description="Put before the date to make the drop id."),
        "date": Param("", type="string", pattern=r"^(|\d{4}-\d{2}-\d{2})$", title="Date", section="Landing",
                      description="The landing day to ingest (YYYY-MM-DD); empty: the run's logical date."),
    }


def _day(params: dict[str, Any], logical_date: Any) -> str:
    if params.get("date"):
        return params["date"]
    if logical_date is None:
        raise AirflowFailException("This run has no logical date; trigger it with one, or set the date param "
                                   "(YYYY-MM-DD) to the landing day to ingest.")
    return logical_date


@task(task_id="ingest", outlets=[DROPS], retries=2)
def ingest_task() -> dict[str, Any]:
    """Register the drop that landed on the run's day; emit a ``semisup-drops`` event when it is new."""
    from semisup_tasks.config import ConfigError
    from semisup_tasks.ingest import ingest
    from semisup_tasks.store import Store, StoreError

    context = get_current_context()
    params = context["params"]
    try:
        store = Store.from_uri(resolve_store(params["store"]))
        store.check()
        result = ingest(store, _day(params, context.get("logical_date")), landing=params["landing"],
                        drop_prefix=params["drop_prefix"])
    except (ConfigError, StoreError) as exc:  # a user can fix these: retrying would not
        raise AirflowFailException(f"Ingest refused: {exc}") from None
    if not result["landed"]:
        raise AirflowSkipException(f"Nothing landed in {result['source']} for {result['date']}; no drop to "
                                   "register.")
    if not result["new"]:
        raise AirflowSkipException(f"Drop {result['drop_id']} is already registered ({result['images']} images); "
                                   "nothing changed and no asset event is emitted.")
    extra = {k: result[k] for k in ("drop_id", "images", "skipped", "date", "store")}
    context["outlet_events"][DROPS].extra = extra
    log.info("Registered drop %s: %d images (%d skipped)", result["drop_id"], result["images"], result["skipped"])
    return result


@task.short_circuit(task_id="gate")
def gate_task(plan_result: dict[str, Any]) -> dict[str, Any] | bool:
    """Go on when the plan's gate says so; otherwise skip everything downstream, saying why."""
    gate = plan_result.get("gate") if isinstance(plan_result, dict) else None
    if not isinstance(gate, dict):
        raise AirflowFailException("The plan result has no 'gate' decision; rerun the plan stage.")
    if not gate["run"]:
        log.warning("Skipping this retrain: %s.", gate["reason"])
        return False
    log.info("Retraining: %s.", gate["reason"])
    return {"new_images": plan_result.get("new_images"), "reason": gate["reason"]}
