"""Dated drops: what lands under ``<landing>/<YYYY-MM-DD>/`` becomes the registered drop ``<prefix><YYYY-MM-DD>``.

The landing root is a prefix inside the store (``landing``, the default) or a URI of its own
(``file:///srv/landing``, ``s3://uploads/landing``). One call ingests one day, so an orchestrator can
run it once per day and re-run any past day (backfill):

- a day whose folder is missing or empty is "nothing landed" (``landed: False``), not an error;
- a drop already registered is never read or written again (``new: False``): ingesting the same day
  twice changes nothing, even after the landing folder was cleaned up;
- otherwise the folder is imported with :func:`datasets.import_drop` (validated, sharded, manifest last),
  and the landing date is recorded in the drop's manifest.
"""

from __future__ import annotations

import logging
import re
from datetime import date as Date
from datetime import datetime

from . import datasets
from .config import ConfigError
from .store import SUCCESS, Store, join

log = logging.getLogger(__name__)

DEFAULT_LANDING = "landing"
_DATE_RE = re.compile(r"(\d{4}-\d{2}-\d{2})")
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*://")


def parse_day(value: str | Date | datetime) -> str:
    """``YYYY-MM-DD`` of a date, a datetime or a string; a bad string is one clear error."""
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, Date):
        return value.isoformat()
    text = str(value)
    try:
        if len(text) == 10:  # fromisoformat also takes 20260131, which reads as a typo here
            return Date.fromisoformat(text).isoformat()
    except ValueError:
        pass
    raise ConfigError(f"The date {value!r} is not valid; write it as YYYY-MM-DD, e.g. 2026-01-31.")


def landing_source(store: Store, landing: str, day: str) -> str:
    """URI of the day's landing folder: ``landing`` is a URI of its own, or a prefix inside the store."""
    if _SCHEME_RE.match(landing):
        return landing.rstrip("/") + "/" + day
    return store.url(join(landing or DEFAULT_LANDING, day))


def drop_date(drop_id: str, manifest: dict | None = None) -> str | None:
    """The day a drop landed: recorded by ingest in its manifest, else a date in its id, else unknown."""
    if manifest and manifest.get("date"):
        return manifest["date"]
    found = _DATE_RE.findall(drop_id)
    if found:
        try:
            return Date.fromisoformat(found[-1]).isoformat()
        except ValueError:
            return None
    return None


def ingest(store: Store, day: str | Date | datetime, landing: str = DEFAULT_LANDING, drop_prefix: str = "",
           shard_size: int | None = None) -> dict:
    """Register what landed on ``day`` as drop ``<drop_prefix><YYYY-MM-DD>``.

    Returns ``{drop_id, date, source, landed, new, images, skipped}``: ``new`` is True only when this
    call registered the drop; ``landed`` is False when nothing was there to ingest.
    """
    day = parse_day(day)
    drop_id = datasets._check_name("drop id", f"{drop_prefix}{day}")
    source = landing_source(store, landing, day)
    out = {"drop_id": drop_id, "date": day, "source": source, "store": store.uri}
    if store.exists(join(datasets.drop_prefix(drop_id), SUCCESS)):  # first: the landing folder may be gone
        manifest = datasets.load_drop_manifest(store, drop_id)
        log.info("Drop %s is already registered (%d images); nothing to do", drop_id, manifest["count"])
        return {**out, "landed": True, "new": False, "images": manifest["count"],
                "skipped": manifest.get("skipped", 0)}
    src = Store.from_uri(source)
    if not src.list():  # a missing folder and an empty one look alike on S3: both are "nothing landed"
        log.info("Nothing landed in %s for %s", source, day)
        return {**out, "landed": False, "new": False, "images": 0, "skipped": 0}
    kwargs = {} if shard_size is None else {"shard_size": shard_size}
    manifest = datasets.import_drop(store, drop_id, source, date=day, **kwargs)
    return {**out, "landed": True, "new": True, "images": manifest["count"], "skipped": manifest.get("skipped", 0)}
