"""The transfer variant: the shapes demo (deterministic, idempotent, its split sizes) and fine_tune from
scratch or from a checkpoint (which tensors are copied, which checkpoints are refused, sane metrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semisup_tasks import datasets
from semisup_tasks.config import ConfigError
from semisup_tasks.demo import build_demo
from semisup_tasks.demo_shapes import CLASSES, build_shapes_demo
from semisup_tasks.images import encode_png
from semisup_tasks.models import build_model, checkpoint_bytes
from semisup_tasks.store import Store
from semisup_tasks.train import Recipe, train
from semisup_tasks.transfer import copy_matching, fine_tune

TINY = Recipe(epochs=2, lr=0.05, batch_size=32)
HEAD = {"head.3.weight", "head.3.bias"}  # cnn_small's classifier


def _store(root: Path) -> Store:
    return Store.from_uri(f"file://{root}")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "store"
    build_shapes_demo(_store(root), seed=0)
    return root


def _checkpoint(arch: str = "cnn_small", in_channels: int = 1, num_classes: int = 10, seed: int = 7) -> bytes:
    torch.manual_seed(seed)
    model = build_model(arch, in_channels, num_classes, (28, 28))
    return checkpoint_bytes(model, arch, in_channels, num_classes, (28, 28))


# -- the shapes demo --------------------------------------------------------------------------
def test_shapes_demo_splits_and_classes(shapes_root: Path) -> None:
    store = _store(shapes_root)
    m = datasets.load_dataset_manifest(store, "shapes-demo")
    assert (m["version"], m["channels"], m["image_size"], m["classes"]) == ("v1", 1, [28, 28], CLASSES)
    assert len(CLASSES) == 6
    for split, per_class in (("train", 20), ("val", 10), ("test", 100)):
        assert m["splits"][split]["class_counts"] == [per_class] * 6
        x, y, ids = datasets.load_split(store, m, split)
        assert x.shape == (per_class * 6, 1, 28, 28) and x.dtype == np.uint8
        assert np.bincount(y, minlength=6).tolist() == [per_class] * 6
        assert len(set(ids)) == len(ids)
    x, _, _ = datasets.load_split(store, m, "train")
    assert len({img.tobytes() for img in x}) == len(x)  # random draws: no two images alike
    assert 0 < x.mean() < 128 and x.std() > 10  # shapes on a dark noisy background, not blank


def test_shapes_demo_same_seed_same_bytes(shapes_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    summary = build_shapes_demo(_store(again), seed=0)
    assert summary["split_counts"] == {"train": 120, "val": 60, "test": 600}
    assert summary["classes"] == CLASSES and summary["version"] == "v1" and summary["name"] == "shapes-demo"
    assert _files(again) == _files(shapes_root)
    other = tmp_path / "other"
    build_shapes_demo(_store(other), seed=1)
    digests = {r: [s["sha256"] for s in datasets.load_dataset_manifest(_store(r), "shapes-demo")["splits"]["train"]
                   ["shards"]] for r in (shapes_root, other)}
    assert digests[shapes_root] != digests[other]


def test_shapes_demo_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    first = build_shapes_demo(_store(root), seed=0)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    def no_write(*args, **kwargs):
        raise AssertionError("an already built dataset was written again")

    monkeypatch.setattr(datasets, "write_dataset", no_write)
    assert build_shapes_demo(_store(root), seed=0) == first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


# -- copying tensors --------------------------------------------------------------------------
def test_copy_matching_copies_all_but_the_head() -> None:
    torch.manual_seed(7)
    source = build_model("cnn_small", 1, 10, (28, 28))
    with torch.no_grad():  # running stats too, so buffers that start equal are told apart
        for buf in source.buffers():
            buf.add_(1)
    torch.manual_seed(0)
    target = build_model("cnn_small", 1, 6, (28, 28))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}

    copied = copy_matching(target, source.state_dict())

    after = target.state_dict()
    assert set(copied) == set(after) - HEAD and len(copied) == len(after) - 2
    for name in copied:
        assert torch.equal(after[name], source.state_dict()[name]), name
    for name in HEAD:  # another class count: the head keeps its fresh initialisation
        assert torch.equal(after[name], fresh[name]), name
        assert after[name].shape != source.state_dict()[name].shape


def test_fine_tune_scratch_and_checkpoint(shapes_root: Path) -> None:
    store = _store(shapes_root)
    scratch = fine_tune(store, "shapes-demo", "v1", None, "cnn_small", TINY)
    assert scratch["init"] == "scratch" and scratch["transferred"] == 0
    assert scratch["tensors"] == len(build_model("cnn_small", 1, 6, (28, 28)).state_dict())
    warm = fine_tune(store, "shapes-demo", "latest", _checkpoint(), "cnn_small", TINY)
    assert warm["init"] == "checkpoint" and warm["tensors"] == scratch["tensors"]
    assert warm["transferred"] == warm["tensors"] - len(HEAD)  # all but the head's weight and bias
    assert set(warm) == {"top1", "top5", "balanced_accuracy", "tail_recall", "transferred", "tensors", "init",
                         "train_images"}


@pytest.mark.parametrize(("arch", "channels", "words"), [("cnn_medium", 1, "cnn_medium model"),
                                                          ("cnn_small", 3, "3-channel")])
def test_fine_tune_refuses_another_arch_or_channel_count(shapes_root: Path, arch: str, channels: int,
                                                         words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        fine_tune(_store(shapes_root), "shapes-demo", "v1", _checkpoint(arch, channels), "cnn_small", TINY)


@pytest.mark.parametrize("empty", ["train", "test"])
def test_fine_tune_refuses_a_dataset_without_train_or_test_images(tmp_path: Path, empty: str) -> None:
    store = _store(tmp_path / "store")
    rng = np.random.default_rng(0)
    rows = [(f"{i}.png", encode_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)), i % 2) for i in range(4)]
    splits = {s: rows if s != empty else [] for s in ("train", "test")}
    datasets.write_dataset(store, "tiny", "v1", ["a", "b"], 1, (8, 8), splits, source="test")
    with pytest.raises(ConfigError, match=f"no {empty} images"):
        fine_tune(store, "tiny", "v1", None, "cnn_small", TINY)


def test_mnist_pretrained_fine_tuned_on_shapes(shapes_root: Path, tmp_path: Path) -> None:
    """The transfer experiment end to end: pretrain on the MNIST demo, fine-tune on the shapes demo."""
    mnist = _store(tmp_path / "mnist")
    build_demo(mnist, seed=0)
    ds = datasets.load_dataset_manifest(mnist, "mnist-demo")
    x, y, _ = datasets.load_split(mnist, ds, "train")
    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 10, (28, 28))
    train(model, x, y, TINY, name="mnist-pretrain")
    init = checkpoint_bytes(model, "cnn_small", 1, 10, (28, 28))

    result = fine_tune(_store(shapes_root), "shapes-demo", "v1", init, "cnn_small", Recipe(epochs=3, lr=0.05,
                                                                                           batch_size=32))
    assert result["train_images"] == 120 and result["init"] == "checkpoint"
    assert result["transferred"] == result["tensors"] - 2
    for key in ("top1", "top5", "balanced_accuracy", "tail_recall"):
        assert 0.0 <= result[key] <= 1.0, (key, result)
    assert result["top5"] >= result["top1"]
