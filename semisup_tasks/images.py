"""Image shards: Parquet files of encoded images, thousands per file, never one object per image.

Schema: ``image_id`` (string, unique within a dataset or drop), ``image`` (PNG or JPEG bytes),
``label`` (int32 class index; null for unlabeled images).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from .store import Store, join

SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("label", pa.int32())])
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_SHARD_SIZE = 2000
# refuse decompression bombs early: 40M pixels is far beyond any training image
Image.MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class ShardInfo:
    key: str
    count: int
    sha256: str  # of the shard's bytes: caches of per-shard work (teacher scores) key on it

    def to_json(self) -> dict:
        return {"key": self.key, "count": self.count, "sha256": self.sha256}


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 HxW (grayscale) or HxWx3 (RGB) array to PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Encoded image to a uint8 CxHxW array with the given channels and (height, width).

    Raises ValueError with a short reason for bytes that are not a usable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({exc.__class__.__name__})") from None
    return arr[None, :, :] if channels == 1 else arr.transpose(2, 0, 1)


def probe(data: bytes) -> tuple[int, int, int]:
    """(channels, height, width) of an encoded image; channels is 1 for grayscale, else 3."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            channels = 1 if img.mode in ("1", "L", "I", "I;16", "F") else 3
            return channels, img.height, img.width
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({exc.__class__.__name__})") from None


def write_shards(
    store: Store,
    prefix: str,
    rows: Iterable[tuple[str, bytes, int | None]],
    shard_size: int = DEFAULT_SHARD_SIZE,
    name: str = "part",
) -> list[ShardInfo]:
    """Write (image_id, encoded bytes, label or None) rows as ``<prefix>/<name>-NNNNN.parquet``."""
    shards: list[ShardInfo] = []
    batch: list[tuple[str, bytes, int | None]] = []

    def flush() -> None:
        key = join(prefix, f"{name}-{len(shards):05d}.parquet")
        ids, data, labels = zip(*batch, strict=True)
        table = pa.table({"image_id": list(ids), "image": list(data), "label": list(labels)}, schema=SCHEMA)
        shards.append(ShardInfo(key, len(batch), store.write_table(key, table)))
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= shard_size:
            flush()
    if batch:
        flush()
    return shards


def decode_table(table: pa.Table, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Decode every image of a shard table into one uint8 NxCxHxW array."""
    images = table.column("image").to_pylist()
    out = np.empty((len(images), channels, size[0], size[1]), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = decode(data, channels, size)
    return out


def thumbnail_grid(rows: list[np.ndarray], scale: int = 1) -> bytes:
    """PNG of a grid: one row per list entry, each a uint8 NxCxHxW array of images side by side."""
    n_cols = max((len(r) for r in rows), default=0)
    if not rows or n_cols == 0:
        raise ValueError("no images for the grid")
    channels, height, width = next(r for r in rows if len(r)).shape[1:]
    pad = 2
    grid = np.full((len(rows) * (height + pad), n_cols * (width + pad), channels), 128, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = i * (height + pad), j * (width + pad)
            grid[y:y + height, x:x + width] = img.transpose(1, 2, 0)
    pil = Image.fromarray(grid[:, :, 0] if channels == 1 else grid)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
