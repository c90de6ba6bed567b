"""Image shards: Parquet files of encoded images, thousands per file, never one object per image.

Schema: ``image_id`` (string, unique within a dataset or drop), ``image`` (PNG or JPEG bytes),
``label`` (int32 class index; null for unlabeled images).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from .store import Store, join

SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("label", pa.int32())])
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")  # the FORMATS below, by name
DEFAULT_SHARD_SIZE = 2000
# refuse decompression bombs early: 40M pixels is far beyond any training image. Pillow only warns
# between this and twice it, so decode() refuses anything above it itself, from the header alone.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# the formats a drop may hold; the others (EPS runs Ghostscript, ...) are refused, not decoded
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # JPEG covers MPO, as phones write it

# why an image was skipped: a short, stable vocabulary, counted per drop and dataset
EMPTY = "empty file"
NOT_AN_IMAGE = "not an image"
TOO_MANY_PIXELS = "too many pixels"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
CANNOT_BE_READ = "cannot be read"
NO_BYTES = "no image bytes"
BAD_ARCHIVE = "unreadable archive"
REASONS = (EMPTY, NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED, CORRUPT, CANNOT_BE_READ, NO_BYTES, BAD_ARCHIVE)

_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# signature -> end marker of the two formats most drops hold: a recognised file that fails to
# decode and lacks its end marker was cut short (an interrupted download or copy)
_ENDS = {b"\x89PNG\r\n\x1a\n": b"IEND\xaeB`\x82", b"\xff\xd8\xff": b"\xff\xd9"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class BadImage(ValueError):
    """Bytes that are not a usable image; ``reason`` is one of :data:`REASONS`, the message says more."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason} ({detail})")
        self.reason = reason


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


def _failure(data: bytes, exc: Exception) -> BadImage:
    """The reason a Pillow error gives for these bytes."""
    detail = str(exc) if not isinstance(exc, UnidentifiedImageError) else "unrecognised format"
    end = next((e for sig, e in _ENDS.items() if data.startswith(sig)), None)
    if end is None:
        if isinstance(exc, UnidentifiedImageError):
            return BadImage(NOT_AN_IMAGE, f"not a {', '.join(FORMATS)} file")
        return BadImage(CORRUPT, detail)
    if "truncat" in str(exc).lower() or end not in data[-64:]:
        return BadImage(TRUNCATED, detail)
    return BadImage(CORRUPT, detail)


def _open(data: bytes) -> Image.Image:
    """Decoded, upright image; BadImage for anything unusable, refusing bombs before any pixel is decoded."""
    if not data:
        raise BadImage(EMPTY, "0 bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        if img.width * img.height > MAX_PIXELS:
            raise BadImage(TOO_MANY_PIXELS, f"{img.width}x{img.height} is over {MAX_PIXELS:,}")
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning under -W error
        raise BadImage(TOO_MANY_PIXELS, f"over {MAX_PIXELS:,}") from None
    except BadImage:
        raise
    except _DECODE_ERRORS as exc:
        raise _failure(data, exc) from None
    try:
        # phone cameras store pixels sideways and say so in EXIF: turn them upright, as viewers do
        ImageOps.exif_transpose(img, in_place=True)
    except _DECODE_ERRORS:
        pass  # a damaged EXIF block does not make the pixels unusable: keep them as stored
    return img


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit samples (PNG): keep the top byte; convert("L") would clip everything above 255 to white
        arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        img = Image.fromarray(arr.astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.has_transparency_data:
        # transparent pixels become black: the demo's images are drawn on black, and black (zero) is
        # "nothing here" to a model trained on them; a white or checkered fill would be new content
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("L" if channels == 1 else "RGB")  # CMYK, YCbCr, P, 1 and RGB<->L by Pillow


def decode(data: bytes, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Encoded image to a uint8 CxHxW array with the given channels and (height, width).

    The image is turned upright by its EXIF orientation, transparency is composited over black,
    16-bit samples are scaled to 8 bits, and any colour mode is converted to L or RGB. Raises
    :class:`BadImage` (a ValueError) with a short reason for bytes that are not a usable image.
    """
    img = _open(data)
    try:
        img = _to_mode(img, channels)
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except _DECODE_ERRORS as exc:
        raise BadImage(CORRUPT, str(exc)) from None
    return arr[None, :, :] if channels == 1 else arr.transpose(2, 0, 1)


def probe(data: bytes) -> tuple[int, int, int]:
    """(channels, height, width) of an encoded image, upright as :func:`decode` returns it.

    Channels is 1 for grayscale (with or without alpha), else 3. Decodes every pixel, so bytes
    that :func:`decode` would refuse are refused here, with the same :class:`BadImage` reason.
    """
    img = _open(data)
    return (1 if img.mode in _GRAY_MODES else 3), img.height, img.width


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
