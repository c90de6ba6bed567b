"""Dated drops: ingest from landing/<YYYY-MM-DD>/ (idempotent, "nothing landed" is no error), the drop
selection params (drops, drops_last, drops_since), new_images against the champion and the gate, on
file:// and on S3 (moto). No mocks: real stores, real registry versions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semisup_tasks import datasets, registry
from semisup_tasks.config import ConfigError, PipelineParams
from semisup_tasks.images import encode_png
from semisup_tasks.ingest import drop_date, ingest, landing_source, parse_day
from semisup_tasks.stages import RunContext, gate_decision, plan, run_pipeline
from semisup_tasks.store import Store

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["left", "middle", "right"]
DAYS = ("2026-01-05", "2026-01-06", "2026-01-07")


def png(rng: np.random.Generator, cls: int) -> bytes:
    img = rng.integers(0, 60, (12, 12), dtype=np.uint8)
    img[:, 1 + cls * 4:3 + cls * 4] = 255
    return encode_png(img)


def land(store: Store, day: str, n: int, seed: int = 0, landing: str = "landing") -> None:
    """``n`` images landed under ``<landing>/<day>/`` of the store (one of them in a subfolder)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = "cam2/" if i == 0 else ""
        store.write_bytes(f"{landing}/{day}/{sub}img-{i:03d}.png", png(rng, i % 3))


def snapshot(store: Store, prefix: str) -> dict[str, bytes]:
    return {k: store.read_bytes(k) for k in store.list(prefix)}


@pytest.fixture
def store(file_or_s3_store: Store) -> Store:
    return file_or_s3_store


# -- ingest --------------------------------------------------------------------------------------

def test_ingest_registers_a_landed_day_once_and_a_second_time_writes_nothing(store):
    land(store, DAYS[0], 5)
    first = ingest(store, DAYS[0])
    assert first["new"] and first["landed"]
    assert (first["drop_id"], first["images"], first["skipped"], first["date"]) == (DAYS[0], 5, 0, DAYS[0])
    assert datasets.list_drops(store) == [DAYS[0]]
    manifest = datasets.load_drop_manifest(store, DAYS[0])
    assert manifest["count"] == 5 and manifest["date"] == DAYS[0]
    ids = set(store.read_table(manifest["shards"][0]["key"], columns=["image_id"]).column("image_id").to_pylist())
    assert f"{DAYS[0]}/cam2/img-000.png" in ids  # image ids carry the drop id and the landing subpath

    before = snapshot(store, "drops")
    again = ingest(store, DAYS[0])
    assert not again["new"] and again["landed"] and again["images"] == 5
    assert snapshot(store, "drops") == before  # not one object rewritten
    assert datasets.list_drops(store) == [DAYS[0]]


def test_an_ingested_drop_stays_registered_after_its_landing_folder_is_cleaned_up(store):
    land(store, DAYS[0], 3)
    ingest(store, DAYS[0])
    store.delete_prefix(f"landing/{DAYS[0]}")
    again = ingest(store, DAYS[0])
    assert (again["new"], again["landed"], again["images"]) == (False, True, 3)


def test_a_day_with_nothing_landed_is_an_outcome_not_an_error(store):
    land(store, DAYS[0], 2)
    out = ingest(store, DAYS[1])
    assert (out["landed"], out["new"], out["images"]) == (False, False, 0)
    assert out["drop_id"] == DAYS[1]
    assert datasets.list_drops(store) == []  # nothing registered, nothing half-written
    assert store.list(f"drops/{DAYS[1]}") == []


def test_three_days_make_three_drops_with_a_prefix_and_an_external_landing_root(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    outside = Store.from_uri(f"file://{tmp_path}/uploads")
    for i, day in enumerate(DAYS):
        land(outside, day, 2 + i, seed=i, landing="in")
    for day in DAYS:
        assert ingest(store, day, landing=f"file://{tmp_path}/uploads/in", drop_prefix="wild-")["new"]
    assert datasets.list_drops(store) == [f"wild-{d}" for d in DAYS]
    assert [datasets.load_drop_manifest(store, f"wild-{d}")["count"] for d in DAYS] == [2, 3, 4]
    assert landing_source(store, "landing", DAYS[0]) == f"{store.uri}/landing/{DAYS[0]}"


def test_a_landed_folder_without_a_usable_image_fails_and_registers_nothing(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    store.write_bytes(f"landing/{DAYS[0]}/notes.txt", b"not an image")
    with pytest.raises(ConfigError, match="no .png/.jpg/.jpeg/.webp/.gif/.bmp images"):
        ingest(store, DAYS[0])
    assert datasets.list_drops(store) == []


@pytest.mark.parametrize("bad", ["2026-1-5", "20260105", "2026-02-30", "yesterday", ""])
def test_a_bad_date_is_one_clear_error(bad):
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        parse_day(bad)


def test_drop_date_comes_from_the_manifest_then_the_id():
    assert drop_date("x", {"date": "2026-01-05"}) == "2026-01-05"
    assert drop_date("wild-2026-01-06", {}) == "2026-01-06"
    assert drop_date("week-01", {}) is None
    assert drop_date("bad-2026-13-40", {}) is None


def test_cli_ingest_prints_the_result_and_is_idempotent(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    land(store, DAYS[0], 4)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "semisup_tasks", "ingest", "--store", store.uri, *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    first, second = cli("--date", DAYS[0]), cli("--date", DAYS[0])
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout)["new"] is True and json.loads(second.stdout)["new"] is False
    assert json.loads(second.stdout)["images"] == 4
    nothing = cli("--date", DAYS[2])
    assert nothing.returncode == 0 and json.loads(nothing.stdout)["landed"] is False
    bad = cli("--date", "05/01/2026")
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr and "Traceback" not in bad.stderr


# -- drop selection and new images ---------------------------------------------------------------

def make_store(store: Store, extra_undated: bool = False) -> None:
    """Dataset tiny/v1 and three dated drops (4, 5, 6 images), ingested; optionally an undated drop."""
    rng = np.random.default_rng(0)

    def rows(prefix: str, n: int):
        return [(f"{prefix}-{i}", png(rng, i % 3), i % 3) for i in range(n)]

    datasets.write_dataset(store, "tiny", "v1", CLASSES, 1, [12, 12],
                           {"train": rows("train", 6), "val": rows("val", 3), "test": rows("test", 3)},
                           source="test")
    for i, day in enumerate(DAYS):
        land(store, day, 4 + i, seed=i)
        ingest(store, day)
    if extra_undated:
        datasets.write_drop(store, "old", [(f"o{i}.png", png(rng, 0)) for i in range(2)], source="test")


def planned(store: Store, run_id: str = "r", **params) -> dict:
    return plan(RunContext(store, run_id, PipelineParams.from_dict({"dataset": "tiny", **params})))


def register_champion(store: Store, drops: list[str], run_id: str = "champ") -> str:
    """A real registry version whose card says it was trained on ``drops``, made the champion."""
    card = {"run_id": run_id, "classes": CLASSES, "metrics": {"val": {"top1": 0.5}},
            "lineage": {"dataset": {"name": "tiny", "version": "v1"}, "drops": drops}}
    version = registry.register(store, "tiny", b"weights of " + run_id.encode(), card)
    registry.promote(store, "tiny", version, reason="test", by="test")
    return version


@pytest.fixture
def dated(tmp_path) -> Store:
    s = Store.from_uri(f"file://{tmp_path}/store")
    make_store(s, extra_undated=True)
    return s


@pytest.mark.parametrize("params, drops", [
    ({}, ["2026-01-05", "2026-01-06", "2026-01-07", "old"]),  # all, in id order as before
    ({"drops_last": 2}, ["2026-01-06", "2026-01-07"]),
    ({"drops_last": 10}, ["old", "2026-01-05", "2026-01-06", "2026-01-07"]),  # undated counts as oldest
    ({"drops_since": "2026-01-06"}, ["2026-01-06", "2026-01-07"]),  # the undated drop is left out
    ({"drops_since": "2026-01-06", "drops_last": 1}, ["2026-01-07"]),
    ({"drops": ["2026-01-07", "old", "2026-01-05"], "drops_last": 2}, ["2026-01-05", "2026-01-07"]),
    ({"drops": ["2026-01-07", "old"]}, ["2026-01-07", "old"]),  # explicit ids keep their order
])
def test_plan_selects_drops_by_id_count_and_date(dated, params, drops):
    result = planned(dated, **params)
    assert result["drops"] == drops
    counts = {"2026-01-05": 4, "2026-01-06": 5, "2026-01-07": 6, "old": 2}
    assert result["images"] == sum(counts[d] for d in drops)
    shard_drops = {k.split("/")[1] for g in dated.read_json("runs/r/plan/shard_groups.json") for k in g}
    assert shard_drops == set(drops)  # only the selected drops are scored


def test_drops_since_after_every_drop_is_one_clear_error(dated):
    with pytest.raises(ConfigError, match="No drop landed on or after 2027-01-01"):
        planned(dated, drops_since="2027-01-01")


def test_new_images_count_what_the_champion_was_not_trained_on(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    make_store(store)
    first = planned(store, "r0")
    assert (first["champion"], first["new_images"], first["images"]) == (None, 15, 15)  # no champion: all new
    assert first["gate"]["run"]

    version = register_champion(store, ["2026-01-05", "2026-01-06"])
    second = planned(store, "r1")
    assert (second["champion"], second["new_images"], second["new_drops"]) == (version, 6, ["2026-01-07"])
    # a champion trained on every selected drop: nothing new
    only_old = planned(store, "r2", drops_last=0, drops=["2026-01-05"])
    assert only_old["new_images"] == 0 and only_old["new_drops"] == []

    register_champion(store, list(DAYS), run_id="champ2")
    assert planned(store, "r3")["new_images"] == 0


def test_the_gate_passes_at_min_new_images_and_stops_below_it(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    make_store(store)
    register_champion(store, ["2026-01-05", "2026-01-06"])
    assert planned(store, "a", min_new_images=6)["gate"]["run"] is True  # exactly the 6 new images
    stopped = planned(store, "b", min_new_images=7)["gate"]
    assert stopped["run"] is False
    assert "only 6 new image(s)" in stopped["reason"] and "min_new_images=0" in stopped["reason"]
    assert gate_decision(0, 0, "v9")["run"] is True  # 0 always runs, even with nothing new


def test_run_pipeline_stops_after_plan_when_the_gate_says_so(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    make_store(store)
    result = run_pipeline(store, "gated", {"dataset": "tiny", "min_new_images": 1000})
    assert result["skipped"] is True and "fewer than min_new_images=1000" in result["reason"]
    assert [k.split("/")[2] for k in store.list("runs/gated")] == ["plan", "plan"]  # no stage after plan ran


@pytest.mark.parametrize("bad, message", [
    ({"drops_last": -1}, "at least 0"),
    ({"drops_since": "2026-02-30"}, "not a real day"),
    ({"drops_since": "last week"}, "cannot be 'last week'"),
    ({"min_new_images": -5}, "at least 0"),
    ({"min_new_images": "10"}, "must be an integer"),
])
def test_selection_params_are_validated(bad, message):
    with pytest.raises(ConfigError, match=message):
        PipelineParams.from_dict(bad)
