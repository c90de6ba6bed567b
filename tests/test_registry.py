"""The model registry on file:// and on S3 (moto): versions and cards, the promotion gate (better student
promoted, worse kept out, the margin at its boundary), rollback, the history, idempotent registration,
and the ``semisup models`` command in a subprocess. Real small checkpoints, no mocks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from semisup_tasks import datasets, registry
from semisup_tasks.images import encode_png
from semisup_tasks.models import build_model, checkpoint_bytes, load_checkpoint, weights_digest
from semisup_tasks.registry import RegistryError
from semisup_tasks.store import Store

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["left", "middle", "right"]
NAME = "tiny"


@pytest.fixture
def store(file_or_s3_store: Store) -> Store:
    return file_or_s3_store


def model(seed: int):
    torch.manual_seed(seed)
    return build_model("cnn_small", 1, len(CLASSES), (12, 12))


def student(seed: int) -> tuple[bytes, str]:
    m = model(seed)
    return checkpoint_bytes(m, "cnn_small", 1, len(CLASSES), (12, 12)), weights_digest(m)


def make_card(run_id: str, val: float | None, dataset_version: str = "v1", test: float = 0.5,
              teacher_source: dict | None = None, seed: int = 0) -> tuple[bytes, dict]:
    """A checkpoint and its card, built the way the register stage builds it from a run's outputs."""
    data, digest = student(seed)
    metrics = {"run_id": run_id, "dataset": {"name": NAME, "version": dataset_version, "classes": CLASSES},
               "drops": ["d1", "d2"], "params": {"k": 8, "seed": seed},
               "models": {"student": {"top1": test, "top5": 1.0, "balanced_accuracy": test, "val_top1": val,
                                      "arch": "cnn_small"},
                          "baseline": {"top1": test - 0.1}}}
    teacher = {"arch": "cnn_medium", "weights_sha256": "t" * 64}
    if teacher_source:
        teacher["source"] = teacher_source
    card = registry.build_card(run_id=run_id, code_version="1.2.3", metrics=metrics,
                               student={"arch": "cnn_small", "val_top1": val, "weights_sha256": digest},
                               teacher=teacher)
    return data, card


def run(store: Store, run_id: str, val: float | None, margin: float = 0.0, **kw) -> dict:
    data, card = make_card(run_id, val, **kw)
    return registry.register_run(store, NAME, model_bytes=data, model_card=card, margin=margin)


def assert_pointer_sound(store: Store) -> None:
    """The champion always names a version whose card and checkpoint are there and agree."""
    pointer = registry.champion(store, NAME)
    if pointer is not None:
        data = registry.load_checkpoint_bytes(store, NAME, pointer["version"])
        load_checkpoint(data)
        assert pointer["version"] in registry.versions(store, NAME)


# -- versions and cards ------------------------------------------------------------------------------

def test_register_writes_versions_with_full_cards(store):
    data, card = make_card("r1", 0.8, teacher_source={"model": NAME, "version": "v7", "ref": "champion",
                                                       "run_id": "r0"})
    assert registry.register(store, NAME, data, card) == "v1"
    assert registry.register(store, NAME, *make_card("r2", 0.7)) == "v2"
    assert registry.versions(store, NAME) == ["v1", "v2"]
    assert registry.names(store) == [NAME]
    c = registry.card(store, NAME, "v1")
    assert c["version"] == "v1" and c["name"] == NAME and c["run_id"] == "r1" and c["created_at"]
    assert c["metrics"]["val"] == {"top1": 0.8, "split": {"dataset": NAME, "version": "v1"}}
    assert c["metrics"]["test"]["top1"] == 0.5 and c["metrics"]["test_top1_in_run"] == {"baseline": 0.4}
    assert c["lineage"]["dataset"] == {"name": NAME, "version": "v1"} and c["lineage"]["drops"] == ["d1", "d2"]
    assert c["lineage"]["teacher"]["how"] == "registry" and c["lineage"]["teacher"]["version"] == "v7"
    assert registry.card(store, NAME, "v2")["lineage"]["teacher"] == {
        "how": "trained", "run_id": "r2", "arch": "cnn_medium", "weights_sha256": "t" * 64}
    assert c["lineage"]["code_version"] == "1.2.3" and c["params"] == {"k": 8, "seed": 0}
    assert c["model"]["weights_sha256"] == student(0)[1] and c["classes"] == CLASSES
    assert store.exists(f"models/{NAME}/versions/v1/model.pt")
    # the registered bytes are the student's, and load back as a model with the same weights
    loaded, _ = load_checkpoint(registry.load_checkpoint_bytes(store, NAME, "v1"))
    assert weights_digest(loaded) == c["model"]["weights_sha256"]


def test_registering_the_same_run_again_returns_its_version(store):
    data, card = make_card("r1", 0.8)
    assert registry.register(store, NAME, data, card) == "v1"
    assert registry.register(store, NAME, *make_card("r2", 0.7)) == "v2"
    assert registry.register(store, NAME, data, card) == "v1"  # an Airflow retry of r1
    assert registry.versions(store, NAME) == ["v1", "v2"]
    # the whole register step, retried, takes no second decision and moves nothing twice
    first = run(store, "r3", 0.9)
    moves = registry.history(store, NAME)
    assert run(store, "r3", 0.9) == first and registry.history(store, NAME) == moves
    assert registry.versions(store, NAME) == ["v1", "v2", "v3"]


def test_a_retry_after_a_crash_between_model_and_card_reuses_the_version(store):
    data, card = make_card("r1", 0.8)
    store.write_bytes(f"models/{NAME}/versions/v1/model.pt", b"half of an attempt")  # no card: not a version
    assert registry.versions(store, NAME) == []
    assert registry.register(store, NAME, data, card) == "v1"
    assert registry.load_checkpoint_bytes(store, NAME, "v1") == data


# -- the gate -------------------------------------------------------------------------------------------

def test_better_student_is_promoted_and_worse_kept_out(store):
    first = run(store, "r1", 0.5)
    assert first["promoted"] and first["version"] == "v1" and "first champion" in first["reason"]
    better = run(store, "r2", 0.7)
    assert better["promoted"] and better["champion"] == "v1"
    assert "v2 val top-1 0.7000 beats champion v1 0.5000" in better["reason"]
    worse = run(store, "r3", 0.6)
    assert not worse["promoted"] and worse["version"] == "v3"
    assert worse["reason"] == ("v3 val top-1 0.6000 vs champion v2 0.7000 (-0.1000) is not more than the margin "
                               "0.0 better; v2 stays champion")
    assert registry.champion(store, NAME)["version"] == "v2"
    assert registry.gate_decision(store, NAME, "v3")["reason"] == worse["reason"]  # the run says why, durably
    assert [e["version"] for e in registry.history(store, NAME)] == ["v1", "v2"]
    assert_pointer_sound(store)


def top1(correct: int, n: int) -> float:
    """Top-1 as the pipeline computes it: a float32 mean (46/50 comes out as 0.9200000166893005)."""
    return float(torch.tensor([1.0] * correct + [0.0] * (n - correct)).mean())


def test_the_margin_is_respected_at_its_boundary(store):
    # one image better than 45/50 is exactly the margin 0.02; in float32 the difference is 0.02000004
    run(store, "r1", top1(45, 50))
    at = run(store, "r2", top1(46, 50), margin=0.02)
    assert not at["promoted"] and "not more than the margin 0.02" in at["reason"]
    above = run(store, "r3", top1(47, 50), margin=0.02)
    assert above["promoted"] and registry.champion(store, NAME)["version"] == "v3"
    equal = run(store, "r4", top1(47, 50), margin=0.0)  # equal models never churn the pointer
    assert not equal["promoted"]
    one_more = run(store, "r5", top1(48, 50), margin=0.0)  # the smallest real gain wins at margin 0
    assert one_more["promoted"]


@pytest.mark.parametrize("n", [50, 1000, 100_000, 1_000_000])
def test_the_boundary_holds_in_float32_and_float64_at_any_val_size(n):
    base = n // 2
    margin = 10 / n  # exactly ten images
    for value in (top1, lambda c, m: c / m):
        old = {**make_card("r1", value(base, n))[1], "version": "v1"}
        at = {**make_card("r2", value(base + 10, n))[1], "version": "v2"}
        above = {**make_card("r3", value(base + 11, n))[1], "version": "v3"}
        assert registry.gate(at, old, margin)[0] is False
        assert registry.gate(above, old, margin)[0] is True


@pytest.mark.parametrize("challenger, champion, promoted, fragment", [
    (0.7, None, True, "first champion"),
    (None, 0.5, False, "no validation top-1 (empty val split)"),
    (0.9, None, False, "champion v1 has no validation top-1"),
])
def test_gate_without_a_validation_metric(challenger, champion, promoted, fragment):
    new = {**make_card("r2", challenger)[1], "version": "v2"}
    old = None if fragment == "first champion" else {**make_card("r1", champion)[1], "version": "v1"}
    decision, reason = registry.gate(new, old, 0.0)
    assert decision is promoted and fragment in reason


def test_gate_never_compares_different_validation_splits():
    new = {**make_card("r2", 0.9, dataset_version="v2")[1], "version": "v2"}
    old = {**make_card("r1", 0.5)[1], "version": "v1"}
    promoted, reason = registry.gate(new, old, 0.0)
    assert not promoted and "different splits (tiny v2 vs tiny v1)" in reason and "re-evaluate" in reason
    other = {**new, "classes": ["a", "b"]}
    promoted, reason = registry.gate(other, old, 0.0)
    assert not promoted and "predicts other classes than champion v1" in reason
    with pytest.raises(RegistryError, match="margin must be at least 0"):
        registry.gate(new, old, -0.1)


def bar_image(rng: np.random.Generator, cls: int) -> bytes:
    img = rng.integers(0, 60, (12, 12), dtype=np.uint8)
    img[:, 1 + cls * 4:3 + cls * 4] = 255
    return encode_png(img)


def test_a_new_dataset_version_re_evaluates_the_champion_on_its_val_split(tmp_path):
    """Labeled feedback: the challenger was validated on tiny v2; the champion's card says tiny v1. The
    champion is measured again on v2's val split and the gate compares the two there."""
    store = Store.from_uri(f"file://{tmp_path}/store")
    rng = np.random.default_rng(0)

    def rows(prefix: str, n: int):
        return [(f"{prefix}-{i}", bar_image(rng, i % 3), i % 3) for i in range(n)]

    datasets.write_dataset(store, NAME, "v2", CLASSES, 1, [12, 12],
                           {"train": rows("train", 6), "val": rows("val", 9), "test": rows("test", 3)},
                           source="test")
    run(store, "r1", 0.99)  # v1: its card claims 0.99 on tiny v1
    from semisup_tasks.evaluate import classification_metrics
    from semisup_tasks.train import predict

    x, y, _ = datasets.load_split(store, datasets.load_dataset_manifest(store, NAME, "v2"), "val")
    actual = classification_metrics(predict(model(0), x), y, [])["top1"]  # the champion, really, on v2
    worse = run(store, "r2", actual - 1 / 9, dataset_version="v2", seed=1)
    assert not worse["promoted"] and worse["champion_reevaluated"]
    assert worse["champion_val_top1"] == pytest.approx(actual)
    better = run(store, "r3", actual + 1 / 9, dataset_version="v2", seed=2)
    assert better["promoted"], better  # it would never beat the 0.99 measured on another split
    assert registry.card(store, NAME, "v1")["metrics"]["val"]["top1"] == 0.99  # cards are never rewritten


# -- promote, rollback, history ---------------------------------------------------------------------------

def test_rollback_restores_the_previous_champions_in_turn(store):
    for i, val in enumerate((0.5, 0.6, 0.7), start=1):
        assert run(store, f"r{i}", val)["promoted"]
    back = registry.rollback(store, NAME, "v3 misbehaves in production", by="alice")
    assert (back["version"], back["previous"]) == ("v2", "v3")
    assert_pointer_sound(store)
    assert registry.rollback(store, NAME, "v2 too", by="alice")["version"] == "v1"
    with pytest.raises(RegistryError, match=r"^Model 'tiny' has no champion before v1 to roll back to; promote"):
        registry.rollback(store, NAME, "again", by="alice")
    assert registry.champion(store, NAME)["version"] == "v1"
    # a promotion after rollbacks: rolling back from it returns to where it was promoted from
    registry.promote(store, NAME, "v3", "fixed upstream", by="bob", manual=True)
    assert registry.rollback(store, NAME, "no, it was not", by="bob")["version"] == "v1"
    moves = [(e["seq"], e["action"], e["version"], e["previous"]) for e in registry.history(store, NAME)]
    assert moves == [(1, "promote", "v1", None), (2, "promote", "v2", "v1"), (3, "promote", "v3", "v2"),
                     (4, "rollback", "v2", "v3"), (5, "rollback", "v1", "v2"), (6, "promote-manual", "v3", "v1"),
                     (7, "rollback", "v1", "v3")]
    entry = registry.history(store, NAME)[3]
    assert entry["reason"] == "v3 misbehaves in production" and entry["by"] == "alice"
    assert registry.history(store, NAME)[0]["by"] == "run r1"
    assert_pointer_sound(store)


def test_rollback_without_a_champion_is_one_sentence(store):
    with pytest.raises(RegistryError, match=r"^Model 'tiny' has no champion in .*nothing to roll back; promote"):
        registry.rollback(store, NAME, "why not", by="alice")


def test_the_pointer_never_names_a_missing_version(store):
    run(store, "r1", 0.5)
    before = registry.champion(store, NAME)
    for bad in ("v9", "3", "../v1"):
        with pytest.raises(RegistryError):
            registry.promote(store, NAME, bad, "typo", by="alice", manual=True)
    assert registry.champion(store, NAME) == before and len(registry.history(store, NAME)) == 1
    assert_pointer_sound(store)


def test_a_crash_between_pointer_and_history_entry_loses_no_move(store):
    run(store, "r1", 0.5)
    run(store, "r2", 0.6)
    store.delete(f"models/{NAME}/history/000002.json")  # the process stopped right after the pointer moved
    assert [e["version"] for e in registry.history(store, NAME)] == ["v1", "v2"]
    registry.rollback(store, NAME, "undo", by="alice")  # the next move restores the entry first
    assert store.exists(f"models/{NAME}/history/000002.json")
    assert [e["action"] for e in registry.history(store, NAME)] == ["promote", "promote", "rollback"]


def test_a_champion_or_version_serves_as_the_next_teacher(store):
    run(store, "r1", 0.5)
    manifest = {"name": NAME, "version": "v1", "classes": CLASSES, "channels": 1, "image_size": [12, 12]}
    data, source = registry.teacher_checkpoint(store, NAME, "champion", manifest)
    assert source == {"model": NAME, "version": "v1", "ref": "champion", "run_id": "r1"}
    assert weights_digest(load_checkpoint(data)[0]) == student(0)[1]
    with pytest.raises(RegistryError, match="trained for other classes"):
        registry.teacher_checkpoint(store, NAME, "v1", {**manifest, "classes": ["a", "b"]})
    with pytest.raises(RegistryError, match="has no version v2"):
        registry.teacher_checkpoint(store, NAME, "v2", manifest)
    with pytest.raises(RegistryError, match=r"has no champion .* \(teacher=train\)"):
        registry.resolve(store, "other", "champion")
    store.write_bytes(f"models/{NAME}/versions/v1/model.pt", student(5)[0])  # changed behind the card's back
    with pytest.raises(RegistryError, match="does not match its card"):
        registry.load_checkpoint_bytes(store, NAME, "v1")


# -- the CLI ----------------------------------------------------------------------------------------------

def semisup(store: Store, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semisup_tasks", "models", *args, "--store", store.uri],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ), cwd=REPO)


def assert_one_sentence(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("semisup: error: ") and last.endswith("."), last
    assert not re.search(r"[.!?]\s+[A-Z]", last.removeprefix("semisup: error: ")[:-1]), last
    assert fragment in last, last


def test_cli_list_show_promote_rollback_history(store):
    assert_one_sentence(semisup(store, "list"), "has no registered model yet")
    run(store, "r1", 0.5)
    run(store, "r2", 0.75)
    run(store, "r3", 0.6)

    out = semisup(store, "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["version", "created", "(UTC)", "val", "top-1", "test", "top-1", "dataset", "gate",
                                "run"]
    assert [ln.split()[0] for ln in lines[1:]] == ["v1", "*", "v3"] and lines[2].split()[1] == "v2"
    assert "0.7500" in lines[2] and "promoted" in lines[2] and "kept out" in lines[3] and "tiny v1" in lines[3]

    shown = semisup(store, "show")
    assert shown.returncode == 0 and json.loads(shown.stdout)["version"] == "v2"
    assert json.loads(semisup(store, "show", "--version", "v1").stdout)["run_id"] == "r1"

    promoted = semisup(store, "promote", "--version", "v3", "--reason", "better on the new camera")
    assert promoted.returncode == 0 and promoted.stdout == "Model 'tiny': champion is now v3 (was v2).\n"
    again = semisup(store, "promote", "--version", "v3")
    assert again.stdout == "Model 'tiny': v3 is already the champion; nothing changed.\n"
    back = semisup(store, "rollback", "--name", NAME, "--reason", "camera driver bug")
    assert back.returncode == 0 and back.stdout == "Model 'tiny': rolled back to v2 (was v3).\n"

    hist = semisup(store, "history").stdout.splitlines()
    assert [ln.split()[3:6] for ln in hist[1:]] == [["promote", "v1", "-"], ["promote", "v2", "v1"],
                                                    ["promote-manual", "v3", "v2"], ["rollback", "v2", "v3"]]
    assert "better on the new camera" in hist[3] and "cli (" in hist[3] and "camera driver bug" in hist[4]

    assert_one_sentence(semisup(store, "promote", "--version", "v9"), "has no version v9")
    assert_one_sentence(semisup(store, "promote", "--version", "3"), "write it as v1, v2")
    assert_one_sentence(semisup(store, "show", "--name", "mnist"), "Model 'mnist' is not in the store")
    assert semisup(store, "rollback").stdout == "Model 'tiny': rolled back to v1 (was v2).\n"
    assert_one_sentence(semisup(store, "rollback"), "has no champion before v1 to roll back to")
    assert registry.champion(store, NAME)["version"] == "v1"  # the failed commands moved nothing


def test_cli_needs_a_name_when_the_store_has_several_models(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    for name in ("tiny", "other"):
        data, card = make_card("r1", 0.5)
        registry.register(store, name, data, card)
    assert_one_sentence(semisup(store, "list"), "several models (other, tiny); pick one with --name")
    assert_one_sentence(semisup(store, "show", "--name", "tiny"), "has no champion yet")
    assert semisup(store, "list", "--name", "other").returncode == 0


def test_runs_register_their_students_and_the_champion_teaches_the_next_run(tmp_path):
    """The pipeline end to end: run 1 trains its teacher and its student becomes the first champion;
    run 2 takes the champion as its teacher (the method iterated), and its card says so; a student
    that must beat the champion by an impossible margin is kept out, with the reason."""
    from test_stages import make_tiny, params

    from semisup_tasks.stages import run_pipeline

    store = Store.from_uri(f"file://{tmp_path}/store")
    make_tiny(store)
    first = run_pipeline(store, "r1", params(oracle=False))["registered"]
    assert first["version"] == "v1" and first["promoted"] is True
    assert registry.champion(store, "tiny")["version"] == "v1"

    second = run_pipeline(store, "r2", params(oracle=False, teacher="champion", promotion_margin=1.0))["registered"]
    assert second["version"] == "v2" and second["promoted"] is False and "margin" in second["reason"]
    assert registry.champion(store, "tiny")["version"] == "v1"  # kept
    teacher = store.read_json("runs/r2/teacher/_SUCCESS.json")["result"]
    assert teacher["weights_sha256"] == registry.card(store, "tiny", "v1")["model"]["weights_sha256"]
    lineage = registry.card(store, "tiny", "v2")["lineage"]
    assert lineage["teacher"]["how"] == "registry" and lineage["teacher"]["version"] == "v1"
    assert lineage["run_id"] == "r2" and lineage["dataset"] == {"name": "tiny", "version": "v1"}
    # a rerun of the finished run registers nothing new and takes no second decision
    assert run_pipeline(store, "r2", params(oracle=False, teacher="champion", promotion_margin=1.0))[
        "registered"] == second
    assert registry.versions(store, "tiny") == ["v1", "v2"]


def test_the_same_run_id_rerun_with_other_weights_registers_a_new_version(store):
    first = run(store, "r1", 0.5, seed=0)
    again = run(store, "r1", 0.5, seed=0)  # a retry: the same weights
    rerun = run(store, "r1", 0.9, seed=1)  # the run id rerun with other params: another student
    assert first["version"] == again["version"] == "v1" and rerun["version"] == "v2"
    assert rerun["promoted"] is True and registry.champion(store, NAME)["version"] == "v2"


def test_a_first_model_without_validation_top1_is_not_made_champion(store):
    decision = run(store, "r1", None)
    assert decision["promoted"] is False and "no validation top-1" in decision["reason"]
    assert registry.champion(store, NAME) is None
    assert run(store, "r2", 0.7)["promoted"] is True


@pytest.mark.parametrize("dataset", ["_demo", "a.b-c", "9x"])
def test_every_dataset_name_is_a_model_name(dataset):
    from semisup_tasks.datasets import _check_name

    assert registry.model_name(_check_name("dataset", dataset)) == dataset


def test_a_teacher_that_is_not_registered_fails_the_plan_before_any_training(tmp_path):
    from test_stages import make_tiny, params

    from semisup_tasks.stages import run_stage

    store = Store.from_uri(f"file://{tmp_path}/store")
    make_tiny(store)
    for teacher, fragment in (("champion", "has no champion"), ("v7", "v7")):
        with pytest.raises(RegistryError, match=fragment):
            run_stage("plan", store, f"r-{teacher}", params(teacher=teacher))
        assert not store.list(f"runs/r-{teacher}")
