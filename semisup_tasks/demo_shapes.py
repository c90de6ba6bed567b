"""The shapes demo: a second, different labeled task for the transfer experiment, built offline in seconds.

The paper's transfer experiment (CUB-2011) asks whether a model trained on one task helps on
another with few labels. Here the source task is the MNIST demo (``semisup_tasks.demo``) and the
target is this set: 28x28 grayscale synthetic shapes in six classes (circle, square, triangle,
cross, ring, bar), drawn with Pillow at a random position, size, rotation, brightness and stroke,
then blurred a little by downsampling and covered with pixel noise, so it is learnable but not
trivial. Train has only 20 images per class (where a pretrained start should matter), val 10,
test 100. Everything is drawn from the seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from . import datasets
from .datasets import dataset_prefix, load_dataset_manifest
from .images import encode_png
from .store import SUCCESS, Store, join

logger = logging.getLogger(__name__)

VERSION = "v1"
CLASSES = ["circle", "square", "triangle", "cross", "ring", "bar"]
PER_CLASS = {"train": 20, "val": 10, "test": 100}
SIZE = 28
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled: anti-aliased edges, as in real photos
SOURCE = "semisup_tasks.demo_shapes (synthetic)"


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle, cross or bar of radius ``r`` around (cx, cy), rotated by ``angle``."""
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.75, y * 0.75) for x, y in pts]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "cross":
        t = 0.3  # half the width of an arm
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t),
               (-1, -t), (-t, -t)]
    else:  # bar: long and thin
        pts = [(-1, -0.22), (1, -0.22), (1, 0.22), (-1, 0.22)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw_shape(label: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 28x28 image of class ``CLASSES[label]``; every random draw comes from ``rng``."""
    kind = CLASSES[label]
    big = SIZE * SUPERSAMPLE
    r = float(rng.uniform(5.0, 10.0)) * SUPERSAMPLE  # radius in the supersampled canvas
    margin = r + SUPERSAMPLE
    cx, cy = (float(v) for v in rng.uniform(margin, big - margin, 2))
    angle = float(rng.uniform(0, 2 * math.pi))
    fill = int(rng.integers(110, 256))
    background = int(rng.integers(0, 50))
    img = Image.new("L", (big, big), background)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        rr = r * 0.8
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=fill)
    elif kind == "ring":
        stroke = max(SUPERSAMPLE, int(r * float(rng.uniform(0.2, 0.35))))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=stroke)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)
    small = np.asarray(img.resize((SIZE, SIZE), Image.BOX), dtype=np.float32)
    noisy = small + rng.normal(0.0, float(rng.uniform(8, 30)), small.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _summary(manifest: dict) -> dict:
    return {
        "name": manifest["name"],
        "version": manifest["version"],
        "classes": list(manifest["classes"]),
        "seed": manifest.get("demo", {}).get("seed"),
        "split_counts": {s: manifest["splits"][s]["count"] for s in datasets.SPLITS},
        "train_class_counts": list(manifest["splits"]["train"]["class_counts"]),
    }


def build_shapes_demo(store: Store, seed: int = 0, name: str = "shapes-demo") -> dict:
    """Build (or find) the shapes dataset ``name`` v1; the same seed gives the same bytes.

    Returns a summary: name, version, classes, seed, split counts and train class counts.
    """
    if store.exists(join(dataset_prefix(name, VERSION), SUCCESS)):
        summary = _summary(load_dataset_manifest(store, name, VERSION))
        if summary["seed"] != seed:
            logger.warning("Dataset %s %s was built with seed %s, not %s; keeping it", name, VERSION,
                           summary["seed"], seed)
        logger.info("Shapes data %s %s is already in %s; nothing to do", name, VERSION, store.uri)
        return summary

    def rows(split_index: int, split: str) -> Iterator[tuple[str, bytes, int]]:
        for label, kind in enumerate(CLASSES):
            for i in range(PER_CLASS[split]):
                # one stream per image: an image's pixels depend only on the seed and where it is
                rng = np.random.default_rng([seed, split_index, label, i])
                yield f"{split}/{kind}/{i:04d}.png", encode_png(draw_shape(label, rng)), label

    manifest = datasets.write_dataset(
        store, name, VERSION, CLASSES, 1, (SIZE, SIZE),
        {s: rows(k, s) for k, s in enumerate(datasets.SPLITS)},
        source=SOURCE, extra={"demo": {"seed": seed}},
    )
    summary = _summary(manifest)
    logger.info("Built shapes data %s %s in %s: %s", name, VERSION, store.uri, summary["split_counts"])
    return summary
