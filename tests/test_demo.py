"""The MNIST demo data: split sizes, long tail, unlabeled drops, truth, no leaks, idempotency."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from semisup_tasks import datasets
from semisup_tasks.demo import DROPS, build_demo, long_tail_counts
from semisup_tasks.images import decode_table
from semisup_tasks.store import Store

POOL_DIGITS = 5000 - 1000 - 200 - sum(long_tail_counts())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "store"
    return root, build_demo(Store.from_uri(f"file://{root}"), seed=0)


def _store(root: Path) -> Store:
    return Store.from_uri(f"file://{root}")


def _drop_table(store: Store, drop_id: str) -> pa.Table:
    shards = datasets.load_drop_manifest(store, drop_id)["shards"]
    return pa.concat_tables([store.read_table(s["key"]) for s in shards])


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_long_tail_counts() -> None:
    counts = long_tail_counts()
    assert counts[0] == 100 and counts[-1] == 8 and len(counts) == 10
    assert all(a > b for a, b in zip(counts, counts[1:], strict=False))


def test_dataset_splits_and_long_tail(built: tuple[Path, dict]) -> None:
    root, summary = built
    store = _store(root)
    m = datasets.load_dataset_manifest(store, "mnist-demo")
    assert (m["version"], m["channels"], m["image_size"]) == ("v1", 1, [28, 28])
    assert m["classes"] == [str(d) for d in range(10)]
    assert m["splits"]["test"]["class_counts"] == [100] * 10
    assert m["splits"]["val"]["class_counts"] == [20] * 10
    train = m["splits"]["train"]["class_counts"]
    assert sorted(train, reverse=True) == long_tail_counts()
    assert train != sorted(train, reverse=True)  # the seed shuffles which digit is the head
    assert summary["train_class_counts"] == train
    assert (summary["dataset"], summary["version"]) == ("mnist-demo", "v1")

    x, y, ids = datasets.load_split(store, m, "train")
    assert x.shape == (sum(train), 1, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y, minlength=10).tolist() == train
    assert x.mean() > 20  # real digits, not blank images


def test_drops_are_unlabeled_with_truth_kept_apart(built: tuple[Path, dict]) -> None:
    root, summary = built
    store = _store(root)
    assert datasets.list_drops(store) == list(DROPS)
    n = summary["distractors"]
    assert n == round(POOL_DIGITS / 9)  # ~10% of the pool
    counts = summary["drops"]
    assert sum(counts.values()) == POOL_DIGITS + n and abs(counts[DROPS[0]] - counts[DROPS[1]]) <= 1

    truth = datasets.load_truth(store, DROPS)
    labels = np.asarray(truth.column("label"))
    for drop_id in DROPS:
        table = _drop_table(store, drop_id)
        assert table.num_rows == counts[drop_id]
        assert table.column("label").null_count == table.num_rows  # no label ever enters a drop shard
        ids = table.column("image_id").to_pylist()
        assert all(i.startswith(drop_id + "/") for i in ids)
        assert set(ids) <= set(truth.column("image_id").to_pylist())
    assert truth.num_rows == sum(counts.values())
    # every pool digit of class c is what the labeled splits left of its 500
    train = summary["train_class_counts"]
    assert np.bincount(labels[labels >= 0], minlength=10).tolist() == [500 - 120 - t for t in train]
    assert int((labels == datasets.DISTRACTOR).sum()) == n
    # distractors are spread over both drops, not parked in one
    for drop_id in DROPS:
        in_drop = [lbl for i, lbl in zip(truth.column("image_id").to_pylist(), labels, strict=True)
                   if i.startswith(drop_id + "/")]
        assert 0.05 < np.mean(np.asarray(in_drop) == -1) < 0.15


def test_no_labeled_image_leaks_into_the_pool(built: tuple[Path, dict]) -> None:
    store = _store(built[0])
    m = datasets.load_dataset_manifest(store, "mnist-demo")

    def hashes(x: np.ndarray) -> set[str]:
        return {hashlib.sha1(img.tobytes()).hexdigest() for img in x}

    labeled = set().union(*(hashes(datasets.load_split(store, m, s)[0]) for s in datasets.SPLITS))
    pool = [decode_table(_drop_table(store, d), 1, (28, 28)) for d in DROPS]
    assert not labeled & set().union(*(hashes(x) for x in pool))
    assert len(labeled) == 1200 + sum(m["splits"]["train"]["class_counts"])


def test_idempotent_deterministic_and_resumable(built: tuple[Path, dict], tmp_path: Path) -> None:
    root, summary = built
    before = _files(root)
    assert build_demo(_store(root), seed=0) == summary
    assert _files(root) == before  # nothing rewritten

    # an interrupted build (second drop missing) is finished with the same bytes as a clean one
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "drops" / DROPS[1])
    (copy / "truth" / "drops" / f"{DROPS[1]}.parquet").unlink()
    assert build_demo(_store(copy), seed=0) == summary
    assert _files(copy) == before

    other = build_demo(_store(tmp_path / "seed1"), seed=1)
    assert other["train_class_counts"] != summary["train_class_counts"]
    assert sorted(other["train_class_counts"]) == sorted(summary["train_class_counts"])
