"""Noisy Student's two training options: soft pseudo-labels (the teacher's softmax) and labeled images mixed
into every pre-training batch; the batches they make, and the pipeline with them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_stages import make_tiny, params

from semisup_tasks.config import ConfigError, PipelineParams
from semisup_tasks.models import build_model
from semisup_tasks.stages import run_pipeline
from semisup_tasks.store import Store
from semisup_tasks.train import ArraySource, MixedSource, TeacherTargets, predict


def numbered(first: int, n: int, classes: int = 3) -> ArraySource:
    """n 1x4x4 images whose pixels all hold the row's number (first + i), labelled i mod classes."""
    x = (first + np.arange(n, dtype=np.uint8))[:, None, None, None] * np.ones((1, 1, 4, 4), np.uint8)
    return ArraySource(x, np.arange(n) % classes)


def epoch(source, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(source.batches(batch_size, torch.Generator().manual_seed(seed)))


# the last case has fewer labeled images (3) than a batch's share (4): they are passed over again within a batch
@pytest.mark.parametrize("pseudo_rows, labeled_rows, fraction", [(50, 7, 0.25), (10, 40, 0.5), (33, 3, 0.1),
                                                                 (50, 3, 0.5)])
def test_mixed_batches_hold_every_pseudo_row_once_and_labeled_rows_in_turn(pseudo_rows, labeled_rows, fraction):
    batch = 8
    mixed = MixedSource(numbered(0, pseudo_rows), numbered(100, labeled_rows), fraction, batch)
    batches = epoch(mixed, batch)
    m = max(1, round(batch * fraction))
    # the loop's step count (rows / batch size, rounded up) is the number of batches
    assert len(batches) == math.ceil(len(mixed) / batch) == math.ceil(pseudo_rows / (batch - m))
    assert sum(len(y) for _, y in batches) == len(mixed)
    pseudo, labeled = [], []
    for step, (x, y) in enumerate(batches):
        ids = x[:, 0, 0, 0].tolist()
        assert all(i < 100 for i in ids[:-m]) and all(i >= 100 for i in ids[-m:])  # labeled rows close each batch
        assert len(ids) == batch or step == len(batches) - 1  # full batches but the epoch's last
        assert y.tolist() == [i % 100 % 3 for i in ids]  # each row keeps its own label
        pseudo += ids[:-m]
        labeled += [i - 100 for i in ids[-m:]]
    assert sorted(pseudo) == list(range(pseudo_rows))
    for start in range(0, len(labeled) - labeled_rows + 1, labeled_rows):  # whole passes are permutations
        assert sorted(labeled[start:start + labeled_rows]) == list(range(labeled_rows))
    assert [y.tolist() for _, y in epoch(mixed, batch)] == [y.tolist() for _, y in batches]  # seeded
    assert [y.tolist() for _, y in epoch(mixed, batch, seed=1)] != [y.tolist() for _, y in batches]


def test_soft_targets_are_the_teachers_softmax_and_mixed_labeled_rows_are_one_hot():
    torch.manual_seed(0)
    teacher = build_model("cnn_small", 1, 3, (4, 4))
    soft = TeacherTargets(numbered(0, 20), teacher)
    for x, y in epoch(soft, 6):
        assert y.dtype == torch.float32 and y.shape == (len(x), 3)
        assert torch.allclose(y, predict(teacher, x).softmax(dim=1))
        assert torch.allclose(y.sum(dim=1), torch.ones(len(x)))
    for x, y in epoch(MixedSource(soft, numbered(100, 9), 0.5, 6), 6):
        labels = (x[-3:, 0, 0, 0].long() - 100) % 3  # the last 3 rows of each batch are labeled
        assert torch.equal(y[-3:], torch.nn.functional.one_hot(labels, 3).float())
        assert torch.allclose(y[:-3], predict(teacher, x[:-3]).softmax(dim=1))
    assert torch.is_grad_enabled()  # the targets' no-grad never leaks into the training loop


def test_mixing_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="fraction in"):
        MixedSource(numbered(0, 10), numbered(100, 0), 0.5, 8)
    with pytest.raises(ValueError, match="batches of 8"):
        next(MixedSource(numbered(0, 10), numbered(100, 4), 0.5, 8).batches(16, torch.Generator()))
    with pytest.raises(ConfigError, match="pretrain_labeled_fraction must be at most 0.9"):
        PipelineParams.from_dict({"pretrain_labeled_fraction": 0.95})
    with pytest.raises(ConfigError, match="soft_labels must be true or false"):
        PipelineParams.from_dict({"soft_labels": "yes"})


def test_the_pipeline_pretrains_on_soft_labels_with_labeled_images_mixed_in(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    make_tiny(store)
    # a teacher trained long enough to be confident, and 16 pre-training steps: enough to learn the bars
    noisy = params(oracle=False, soft_labels=True, pretrain_labeled_fraction=0.25, selection_policy="noisy_student",
                   teacher_epochs=20, pretrain_epochs=8)
    result = run_pipeline(store, "ns", noisy)
    trained = store.read_json("runs/ns/student_pretrained/_SUCCESS.json")["result"]["train"]
    selected = store.read_json("runs/ns/trainset/manifest.json")["count"]
    # batches of 16 hold 4 labeled images: 12 selected ones per step
    assert trained["images"] == selected + 4 * math.ceil(selected / 12)
    metrics = store.read_json("runs/ns/evaluate/metrics.json")["models"]
    assert metrics["student_pretrained"]["top1"] > 0.8  # it learns from the soft targets
    assert result["summary"]["student"]["top1"] > 0.8
    # each option changes what pre-training computes; the teacher and the selection stay the same
    def result(run: str, stage_dir: str) -> dict:
        return store.read_json(f"runs/{run}/{stage_dir}/_SUCCESS.json")["result"]

    for run, extra in (("hard", {"soft_labels": False}), ("unmixed", {"pretrain_labeled_fraction": 0.0})):
        run_pipeline(store, run, {**noisy, **extra})
        assert result(run, "teacher")["weights_sha256"] == result("ns", "teacher")["weights_sha256"]
        assert store.read_bytes(f"runs/{run}/select/selection.parquet") == \
            store.read_bytes("runs/ns/select/selection.parquet")
        pretrained = result(run, "student_pretrained")["weights_sha256"]
        assert pretrained != result("ns", "student_pretrained")["weights_sha256"]
