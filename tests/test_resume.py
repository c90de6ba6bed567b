"""Resumable training: a training stopped at any point and resumed from its checkpoint ends with the
same weights, bit for bit on CPU, as one that never stopped; a SIGKILLed training stage resumes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_stages import make_tiny
from test_trainshards import bar_image, make_source, selection

from semisup_tasks.checkpoints import StoreCheckpoints
from semisup_tasks.models import build_model, weights_digest
from semisup_tasks.store import Store
from semisup_tasks.train import ArraySource, MixedSource, Recipe, TeacherTargets, train, train_stream
from semisup_tasks.trainshards import ShardStream, write_training_shards

ROOT = Path(__file__).resolve().parents[1]


class Crash(Exception):
    """Stands for the process dying right after a checkpoint reached the store."""


class CrashingCheckpoints(StoreCheckpoints):
    def __init__(self, *args, crash_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.saves, self.crash_after = 0, crash_after

    def save(self, state: dict, shape: str) -> None:
        super().save(state, shape)
        self.saves += 1
        if self.saves == self.crash_after:
            raise Crash


def _array_training(store: Store, checkpoints=None):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    x = np.stack([bar_image(rng, c)[None] for c in y])
    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 3, (12, 12))
    # 40 rows in batches of 16: the epoch's last batch is short; affine+flip draws from the generator
    recipe = Recipe(epochs=3, lr=0.05, batch_size=16, augment="affine+flip", balanced_sampling=True, seed=5)
    return model, train(model, x, y, recipe, checkpoints=checkpoints)


def _write_parts(store: Store) -> None:
    if not store.exists("ts/manifest.json"):
        _, where = make_source(store, n=60)
        # parts of 16 and batches of 12: batches straddle parts, the next part is drawn mid-epoch
        write_training_shards(store, "ts", selection(where), 1, (12, 12), seed=0, part_rows=16)


def _stream_training(store: Store, checkpoints=None):
    _write_parts(store)
    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 3, (12, 12))
    recipe = Recipe(epochs=3, lr=0.05, batch_size=12, augment="affine", seed=7)
    return model, train_stream(model, ShardStream(store, "ts"), recipe, checkpoints=checkpoints)


def _noisy_training(store: Store, checkpoints=None):
    """Noisy Student's pre-training: the shard stream with a teacher's soft targets, labeled rows mixed in."""
    _write_parts(store)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 10)
    labeled = ArraySource(np.stack([bar_image(rng, c)[None] for c in y]), y)
    torch.manual_seed(1)
    teacher = build_model("cnn_small", 1, 3, (12, 12))
    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 3, (12, 12))
    recipe = Recipe(epochs=3, lr=0.05, batch_size=12, augment="affine", seed=7)
    source = MixedSource(TeacherTargets(ShardStream(store, "ts"), teacher), labeled, 0.25, recipe.batch_size)
    return model, train_stream(model, source, recipe, checkpoints=checkpoints)


TRAININGS = {"array": _array_training, "stream": _stream_training, "noisy": _noisy_training}


@pytest.mark.parametrize("source", sorted(TRAININGS))
@pytest.mark.parametrize("crash_after", [1, 2, 3, 5])
def test_a_resumed_training_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, source, crash_after):
    """Checkpoints every 2 steps: in memory (3 batches an epoch) saves 1, 3 and 5 fall mid-epoch and 2 at an
    epoch's end; from shards (5 batches) saves 1, 2 and 5 mid-epoch and 3 at an epoch's end; Noisy Student's
    mixed batches (9 selected rows and 3 labeled: 7 batches) resume with the labeled rows' draws too."""
    store = Store.from_uri(f"file://{tmp_path}/store")
    run = TRAININGS[source]
    plain_model, plain = run(store)
    key = "run/checkpoints/model.pt"
    with pytest.raises(Crash):
        run(store, CrashingCheckpoints(store, key, "t", every_steps=2, crash_after=crash_after))
    assert store.exists(key)
    resumed_model, resumed = run(store, StoreCheckpoints(store, key, "t", every_steps=2))
    assert weights_digest(resumed_model) == weights_digest(plain_model)
    assert resumed == plain  # same losses, bit for bit


def test_a_checkpoint_of_other_params_or_an_unreadable_one_is_not_resumed(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    plain_model, _ = _array_training(store)
    key = "run/checkpoints/model.pt"
    with pytest.raises(Crash):
        _array_training(store, CrashingCheckpoints(store, key, "other params", every_steps=2, crash_after=2))
    model, _ = _array_training(store, StoreCheckpoints(store, key, "these params", every_steps=2))
    assert weights_digest(model) == weights_digest(plain_model)
    store.write_bytes(key, b"\x00 half a checkpoint")
    model, _ = _array_training(store, StoreCheckpoints(store, key, "these params", every_steps=2))
    assert weights_digest(model) == weights_digest(plain_model)
    buf = io.BytesIO()  # another layout (an older version's checkpoint): not resumed, no KeyError
    torch.save({"model": plain_model.state_dict(), "tag": "these params"}, buf)
    store.write_bytes(key, buf.getvalue())
    model, _ = _array_training(store, StoreCheckpoints(store, key, "these params", every_steps=2))
    assert weights_digest(model) == weights_digest(plain_model)


def test_a_store_that_fails_to_read_the_checkpoint_fails_the_task_and_keeps_the_checkpoint(tmp_path):
    """Starting over would overwrite good progress at the first save: the error goes to the task's retry."""
    from semisup_tasks.store import FileStore, StoreError

    store = Store.from_uri(f"file://{tmp_path}/store")
    key = "run/checkpoints/model.pt"
    with pytest.raises(Crash):
        _array_training(store, CrashingCheckpoints(store, key, "t", every_steps=2, crash_after=2))
    saved = store.read_bytes(key)

    class ReadsFail(FileStore):  # fault injection: the object is there, reading it fails (a timeout, a 503)
        def read_bytes(self, key: str) -> bytes:
            raise StoreError(f"Could not read {self.url(key)} (ReadTimeoutError)")

    with pytest.raises(StoreError, match="ReadTimeoutError"):
        _array_training(store, StoreCheckpoints(ReadsFail(tmp_path / "store"), key, "t", every_steps=2))
    assert store.read_bytes(key) == saved


def _saved_step(store: Store, key: str) -> int:
    try:
        return int(torch.load(io.BytesIO(store.read_bytes(key)), weights_only=True)["step"])
    except Exception:  # not written yet
        return -1


def _stage(store_uri: str, run_id: str, params: dict, result: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "semisup_tasks", "stage", "train-teacher", "--store", store_uri,
           "--run-id", run_id, "--params-json", json.dumps(params), "--result-file", str(result)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_sigkilled_training_stage_resumes_to_the_same_weights(tmp_path, seed):
    store_uri = f"file://{tmp_path}/store"
    store = Store.from_uri(store_uri)
    make_tiny(store)
    # 18 images, 2 steps an epoch: long enough to be killed midway, a checkpoint every 7 steps
    params = {"dataset": "tiny", "teacher_arch": "cnn_small", "teacher_epochs": 150, "batch_size": 16,
              "augment": "affine", "checkpoint_every_steps": 7, "seed": seed}
    # the plan first (cheap), then the teacher
    for run_id in ("plain", "killed"):
        subprocess.run([sys.executable, "-m", "semisup_tasks", "stage", "plan", "--store", store_uri, "--run-id",
                        run_id, "--params-json", json.dumps(params)], cwd=ROOT, check=True, capture_output=True)
    plain = _stage(store_uri, "plain", params, tmp_path / "plain.json")
    assert plain.wait(timeout=600) == 0, plain.stderr.read()

    killed = _stage(store_uri, "killed", params, tmp_path / "killed.json")
    checkpoint = "runs/killed/teacher/checkpoints/teacher.pt"
    # killed at a step drawn by the seed, whatever this machine's speed: mid-epoch, between saves
    target, delay = np.random.default_rng(seed).integers(14, 150), np.random.default_rng(seed).uniform(0, 0.05)
    deadline = time.time() + 300
    while killed.poll() is None and time.time() < deadline and _saved_step(store, checkpoint) < target:
        time.sleep(0.02)
    time.sleep(delay)
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert not store.exists("runs/killed/teacher/_SUCCESS.json"), "the training ended before it was killed"

    rerun = _stage(store_uri, "killed", params, tmp_path / "killed.json")
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    resumed_at = [line for line in err.splitlines() if "resuming at step" in line]
    assert len(resumed_at) == 1, err[-2000:]
    step = int(resumed_at[0].split("resuming at step ")[1].split()[0])
    assert target <= step < 300
    a = json.loads((tmp_path / "plain.json").read_text())
    b = json.loads((tmp_path / "killed.json").read_text())
    assert b["weights_sha256"] == a["weights_sha256"]
    assert b["train"] == a["train"]
    assert not store.list("runs/killed/teacher/checkpoints")  # spent once the model is committed
    print(f"seed {seed}: SIGKILL once step {target} was saved; resumed at step {step} of 300, same weights")


def test_checkpoint_frequency_redoes_nothing_and_leftover_checkpoints_are_cleared(tmp_path):
    """How often to checkpoint is operational: changing it keeps every committed stage. A stage killed
    between its commit and deleting its checkpoints deletes them on its next (skipping) attempt."""
    from test_stages import params

    from semisup_tasks.stages import run_stage

    store = Store.from_uri(f"file://{tmp_path}/store")
    make_tiny(store)
    run_stage("plan", store, "r", params(teacher_epochs=2))
    first = run_stage("train-teacher", store, "r", params(teacher_epochs=2))
    store.write_bytes("runs/r/teacher/checkpoints/teacher.pt", b"left by a kill after the commit")
    again = run_stage("train-teacher", store, "r", params(teacher_epochs=2, checkpoint_every_steps=3))
    assert again == first
    assert not store.list("runs/r/teacher/checkpoints")
