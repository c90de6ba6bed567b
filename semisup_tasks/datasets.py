"""Labeled datasets and unlabeled drops in the store: import, manifests, loading.

Layout (DESIGN.md section 3)::

    datasets/<name>/<version>/shards/<split>-NNNNN.parquet    image shards (label = class index)
    datasets/<name>/<version>/_SUCCESS.json                   manifest, written last
    drops/<drop_id>/shards/part-NNNNN.parquet                  image shards (label always null)
    drops/<drop_id>/_SUCCESS.json                              manifest, written last
    truth/drops/<drop_id>.parquet                              true labels of a drop, when known (demo)
    weak/drops/<drop_id>.parquet                               weak labels of a drop (noisy tags, -1 = none)

Consumers read only what a committed manifest lists, so a crash mid-import leaves nothing a stage
would use; the next import of the same version or drop clears that debris first.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import re
import tarfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from .config import ConfigError
from .images import (
    BAD_ARCHIVE,
    CANNOT_BE_READ,
    DEFAULT_SHARD_SIZE,
    IMAGE_SUFFIXES,
    NO_BYTES,
    BadImage,
    ShardInfo,
    decode_table,
    probe,
    write_shards,
)
from .store import SUCCESS, FileStore, Store, StoreError, join

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TRUTH_SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int32())])
WEAK_SCHEMA = TRUTH_SCHEMA  # weak labels sit beside a drop exactly as its true labels do
NO_TAG = -1  # weak label of an image without a usable tag
DISTRACTOR = -1  # truth label of a wild image that belongs to no class

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
DERIVED = "_DERIVED.json"  # marks a drop that copies part of another (list_drops leaves it out)
_VERSION_RE = re.compile(r"v(\d+)")
# S3 reads are latency-bound, so a few in flight keep the import from waiting on each round trip
_READ_WORKERS = 8
_READ_AHEAD = 64
_MAX_SKIP_WARNINGS = 20


# -- names and keys ---------------------------------------------------------------------------
def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or value in (".", ".."):
        raise ConfigError(f"The {what} {value!r} is not valid; use letters, digits, '.', '_' and '-' only.")
    return value


def dataset_prefix(name: str, version: str) -> str:
    return join("datasets", name, version)


def drop_prefix(drop_id: str) -> str:
    return join("drops", drop_id)


def truth_key(drop_id: str) -> str:
    return join("truth", "drops", f"{drop_id}.parquet")


def weak_labels_key(drop_id: str) -> str:
    return join("weak", "drops", f"{drop_id}.parquet")


def drop_image_id(drop_id: str, relative_path: str) -> str:
    """Drop image ids carry the drop id, so they stay unique when several drops are pooled."""
    return f"{drop_id}/{relative_path}"


def _version_order(version: str) -> tuple[int, int, str]:
    # vN versions compare by number (v10 after v9) and rank above free-form names
    m = _VERSION_RE.fullmatch(version)
    return (1, int(m.group(1)), "") if m else (0, 0, version)


def dataset_versions(store: Store, name: str) -> list[str]:
    """Committed versions of a dataset (those with a manifest), oldest first."""
    prefix = join("datasets", _check_name("dataset name", name))
    found = set()
    for key in store.list(prefix):
        parts = key[len(prefix) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == SUCCESS:
            found.add(parts[0])
    return sorted(found, key=_version_order)


def _next_version(committed: Sequence[str]) -> str:
    numbers = [int(m.group(1)) for v in committed if (m := _VERSION_RE.fullmatch(v))]
    return f"v{max(numbers, default=0) + 1}"


# -- reading a source tree (local folder or s3:// prefix) -------------------------------------
def _open_source(root: str) -> Store:
    src = Store.from_uri(root)
    if isinstance(src, FileStore) and src.root.exists() and not src.root.is_dir():
        raise ConfigError(f"{root} is a file, not a folder; pass the folder that holds the images (or an "
                          "s3://bucket/prefix).")
    if isinstance(src, FileStore) and not src.root.is_dir():
        raise ConfigError(f"Folder {root} does not exist; pass an existing local folder or an s3://bucket/prefix.")
    src.check()  # an unreachable bucket fails here with one sentence, not deep inside a listing
    return src


def _source_images(src: Store, listing: list[str] | None = None) -> list[str]:
    """Image keys under the source, sorted; hidden files and folders (.DS_Store, ._x.png) are ignored."""
    return [
        key
        for key in (src.list() if listing is None else listing)
        if key.lower().endswith(IMAGE_SUFFIXES) and not any(p.startswith(".") for p in key.split("/"))
    ]


ARCHIVE_SUFFIXES = (".tar", ".parquet")
_SUFFIXES = "/".join(IMAGE_SUFFIXES)  # for messages: ".png/.jpg/..."
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")  # img2dataset names the column after the encoding


def _source_archives(listing: list[str]) -> list[str]:
    """WebDataset-style tar shards and img2dataset Parquet shards in a source listing, sorted."""
    return [key for key in listing
            if key.lower().endswith(ARCHIVE_SUFFIXES) and not any(p.startswith(".") for p in key.split("/"))]


def _archive_images(src: Store, key: str, skips: _Skips) -> Iterator[tuple[str, bytes]]:
    """(``<archive key>/<member or row key>``, bytes) of each image inside one shard archive.

    A tar holds one file per image (``<key>.jpg`` beside ``<key>.txt``/``.json``, as WebDataset and
    img2dataset write them); an img2dataset Parquet shard holds the bytes in a ``jpg`` (or
    ``png``/``webp``) column with the sample's ``key``. Other members and failed rows are ignored.
    """
    if key.lower().endswith(".tar"):
        try:
            with tarfile.open(fileobj=io.BytesIO(src.read_bytes(key))) as tar:
                members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
                for member in members:
                    if member.name.lower().endswith(IMAGE_SUFFIXES):
                        yield f"{key}/{member.name}", tar.extractfile(member).read()
        except tarfile.TarError as exc:
            skips.add(key, BAD_ARCHIVE, f"not a readable tar archive ({exc})")
        return
    try:
        table = src.read_table(key)
    except (OSError, pa.ArrowInvalid) as exc:
        skips.add(key, BAD_ARCHIVE, f"not a readable Parquet file ({exc.__class__.__name__})")
        return
    column = next((c for c in IMAGE_COLUMNS if c in table.column_names
                   and pa.types.is_binary(table.schema.field(c).type)), None)
    if column is None:
        skips.add(key, BAD_ARCHIVE, f"has no image column (one of {', '.join(IMAGE_COLUMNS)})")
        return
    ids = table.column("key").to_pylist() if "key" in table.column_names else list(range(table.num_rows))
    for row_key, data in zip(ids, table.column(column).to_pylist(), strict=True):
        if data is None:  # a sample img2dataset failed to download
            skips.add(f"{key}/{row_key}", NO_BYTES)
        else:
            yield f"{key}/{row_key}", data


def _probed(rows: Iterable[tuple[str, bytes]], skips: _Skips) -> Iterator[tuple[str, bytes]]:
    for key, data in rows:
        try:
            probe(data)
        except BadImage as exc:
            skips.add(key, exc.reason, str(exc))
            continue
        yield key, data


def _read_many(src: Store, keys: Sequence[str]) -> Iterator[tuple[str, bytes | None]]:
    """(key, bytes) in key order, None for an object that cannot be read; a bounded read-ahead."""

    def read(key: str) -> bytes | None:
        try:
            return src.read_bytes(key)
        except (OSError, StoreError):  # a file we may not open (or a link out of the folder) is unreadable
            return None

    with ThreadPoolExecutor(_READ_WORKERS) as pool:
        pending: deque[tuple[str, Future[bytes | None]]] = deque()
        it = iter(keys)
        for key in it:
            pending.append((key, pool.submit(read, key)))
            if len(pending) >= _READ_AHEAD:
                break
        while pending:
            key, future = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            yield key, future.result()


class _Skips:
    """Counts unusable images per reason (images.REASONS), warning about the first few by name."""

    def __init__(self, src: Store):
        self.src = src
        self.reasons: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def add(self, key: str, reason: str, detail: str | None = None) -> None:
        self.reasons[reason] += 1
        if self.count <= _MAX_SKIP_WARNINGS:
            try:
                where = self.src.url(key)
            except StoreError:  # a name the store refuses (control characters) is itself why it is skipped
                where = repr(key)
            logger.warning("Skipping %s: %s", where, detail or reason)
        elif self.count == _MAX_SKIP_WARNINGS + 1:
            logger.warning("More unusable images; only their counts per reason are reported")

    def as_json(self) -> dict[str, int]:
        return dict(sorted(self.reasons.items()))

    def summary(self) -> str:
        """'3 truncated, 1 not an image', most frequent first."""
        return ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())


def _readable(
    src: Store, keys: Sequence[str], skips: _Skips
) -> Iterator[tuple[str, bytes, tuple[int, int, int]]]:
    """(key, bytes, (channels, height, width)) of every readable image; the others are counted."""
    for key, data in _read_many(src, keys):
        if data is None:
            skips.add(key, CANNOT_BE_READ)
            continue
        try:
            shape = probe(data)
        except BadImage as exc:
            skips.add(key, exc.reason, str(exc))
            continue
        yield key, data, shape


# -- datasets ---------------------------------------------------------------------------------
def _counted(
    rows: Iterable[tuple[str, bytes, int]], num_classes: int, counts: list[int], seen: set[str]
) -> Iterator[tuple[str, bytes, int]]:
    for image_id, data, label in rows:
        if not 0 <= label < num_classes:
            raise ValueError(f"Label {label} of {image_id} is outside 0..{num_classes - 1}.")
        if image_id in seen:
            raise ValueError(f"Image id {image_id} appears twice in the dataset.")
        seen.add(image_id)
        counts[label] += 1
        yield image_id, data, int(label)


def write_dataset(
    store: Store,
    name: str,
    version: str,
    classes: Sequence[str],
    channels: int,
    image_size: Sequence[int],
    splits: Mapping[str, Iterable[tuple[str, bytes, int]]],
    source: str,
    *,
    skipped: int = 0,
    skipped_reasons: Mapping[str, int] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Write one dataset version: shards per split, then the manifest last.

    ``splits`` maps train/val/test to (image_id, encoded bytes, label) rows; a missing split is
    written as empty. Rows may be a generator, so an import never holds every image in memory.
    ``skipped`` images were left out, ``skipped_reasons`` counts them per reason.
    """
    _check_name("dataset name", name)
    _check_name("dataset version", version)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ConfigError(f"Unknown split(s) {', '.join(unknown)}; a dataset has {', '.join(SPLITS)}.")
    if channels not in (1, 3) or len(image_size) != 2 or min(image_size) < 1:
        raise ConfigError(f"Dataset {name!r} needs channels 1 or 3 and a [height, width] image size.")
    reasons = _reasons_json(skipped, skipped_reasons)  # checked before anything is written
    prefix = dataset_prefix(name, version)
    if store.exists(join(prefix, SUCCESS)):
        raise ConfigError(f"Dataset {name!r} version {version} already exists in {store.uri}; "
                          "choose another version (or leave it out to get the next one).")
    store.delete_prefix(prefix)  # debris of an earlier import that crashed before its manifest

    seen: set[str] = set()
    out = {}
    for split in SPLITS:
        counts = [0] * len(classes)
        rows = _counted(splits.get(split, ()), len(classes), counts, seen)
        shards = write_shards(store, join(prefix, "shards"), rows, shard_size, name=split)
        out[split] = {"shards": [s.to_json() for s in shards], "count": sum(counts), "class_counts": counts}
    manifest = {
        "kind": "dataset",
        "name": name,
        "version": version,
        "classes": [str(c) for c in classes],
        "channels": int(channels),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "splits": out,
        "skipped": int(skipped),
        "skipped_reasons": reasons,
        "source": source,
        **dict(extra or {}),
    }
    store.write_json(join(prefix, SUCCESS), manifest)
    logger.info("Wrote dataset %s %s: %s", name, version,
                ", ".join(f"{s} {out[s]['count']}" for s in SPLITS))
    return manifest


def _empty_class_dirs(src: Store, keys: Sequence[str]) -> list[str]:
    """Class folders without any image file: only a local folder can have them (an object store has
    no empty folders), and they are classes all the same, so class indices follow the folder names."""
    if not isinstance(src, FileStore):
        return []
    split_layout = any(k.split("/", 1)[0] in SPLITS for k in keys if "/" in k)
    base = src.root / "train" if split_layout else src.root
    if not base.is_dir():
        return []
    with_images = {k.split("/")[1 if split_layout else 0] for k in keys if k.count("/") > int(split_layout)}
    return sorted(d.name for d in base.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.name not in with_images
                  and d.name != "__MACOSX"  # resource forks a macOS zip leaves beside the folders
                  and not (not split_layout and d.name in SPLITS))


def _layout(
    root: str, keys: Sequence[str], empty_dirs: Sequence[str] = ()
) -> tuple[list[str], list[tuple[str, int, str | None]]]:
    """Classes and (key, class index, split or None when the split is to be drawn) per image.

    Checks the tree's shape from the listing alone, before any image is read.
    """
    top = sorted({k.split("/", 1)[0] for k in keys if "/" in k})
    split_dirs = [d for d in top if d in SPLITS]
    fix = "use one subfolder of images per class, optionally inside train/ val/ test/ folders"
    if split_dirs:
        others = [d for d in top if d not in SPLITS]
        if others:
            raise ConfigError(f"Folder {root} mixes split folders ({', '.join(split_dirs)}) with other "
                              f"folders ({', '.join(others[:5])}); {fix}.")
        if "train" not in split_dirs:
            raise ConfigError(f"Folder {root} has {', '.join(split_dirs)}/ but no train/ folder; "
                              "add train/<class>/ with the training images.")
    placed: list[tuple[str, str, str | None]] = []
    loose = 0
    for key in keys:
        parts = key.split("/")
        split = parts.pop(0) if split_dirs and len(parts) > 1 else None
        if len(parts) < 2:  # an image directly in the root (or in train/) has no class folder
            loose += 1
            continue
        placed.append((key, parts[0], split))  # nested folders inside a class belong to it
    if not placed:
        where = f"{root}/train" if split_dirs else root
        raise ConfigError(f"Folder {where} has no class subfolders with images; {fix}.")
    if loose:
        logger.warning("Ignoring %d image(s) of %s that are not inside a class folder", loose, root)
    classes = sorted({cls for _, cls, split in placed if split in (None, "train")} | set(empty_dirs))
    stray = sorted({cls for _, cls, _ in placed if cls not in classes})
    if stray:  # checked here, not after reading: a typo in a val/ or test/ folder name fails fast
        raise ConfigError(f"Class {stray[0]!r} has no folder {root.rstrip('/')}/train/{stray[0]}; add training "
                          "images for it or remove its other folders.")
    if len(classes) < 2:
        where = f"{root.rstrip('/')}/train" if split_dirs else root
        raise ConfigError(f"Folder {where} has a single class folder ({classes[0]}/); a classifier needs at least "
                          f"two: {fix} (if {classes[0]}/ holds the class folders, point --root at it).")
    index = {cls: i for i, cls in enumerate(classes)}
    return classes, [(key, index[cls], split) for key, cls, split in placed]


def _draw_splits(
    per_class: Sequence[Sequence[str]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[tuple[str, int]]]:
    """Stratified split: within each class a seeded permutation, at least one image kept for training."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label, keys in enumerate(per_class):
        n = len(keys)
        if n == 0:  # a class without usable images: nothing to split
            continue
        n_test = int(n * test_fraction + 0.5)
        n_val = int(n * val_fraction + 0.5)
        excess = max(0, n_test + n_val - (n - 1))
        n_val -= min(excess, n_val)
        n_test = min(n_test, n - 1 - n_val)
        order = [keys[i] for i in rng.permutation(n)]
        out["test"] += [(k, label) for k in order[:n_test]]
        out["val"] += [(k, label) for k in order[n_test : n_test + n_val]]
        out["train"] += [(k, label) for k in order[n_test + n_val :]]
    return out


def import_imagefolder(
    store: Store,
    name: str,
    root: str,
    version: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Import an ImageFolder tree (local folder or s3:// prefix) as a new dataset version.

    Two passes over the source: the first checks every image and finds the common size, the
    second streams the bytes into shards, so memory stays bounded by a shard, not the dataset.

    Unusable images are skipped and counted per reason (``skipped_reasons``). A class folder with no
    usable training image is kept, with a warning, as a class of 0 images (listed in the manifest's
    ``empty_classes``) so that class indices still follow the folder names; at least two classes
    must have usable training images.
    """
    _check_name("dataset name", name)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) "
                          "and sum to less than 1.")
    committed = dataset_versions(store, name)
    if version is None:
        version = _next_version(committed)
    elif _check_name("dataset version", version) in committed:
        raise ConfigError(f"Dataset {name!r} version {version} already exists in {store.uri}; "
                          "choose another --version or leave it out to get the next one.")

    src = _open_source(root)
    keys = _source_images(src)
    if not keys:
        raise ConfigError(f"Folder {root} has no {_SUFFIXES} images; point --root at a folder with one "
                          "subfolder of images per class.")
    classes, entries = _layout(root, keys, _empty_class_dirs(src, keys))
    place = {key: (label, split) for key, label, split in entries}

    # pass 1: which images are readable, their sizes and channels
    skips = _Skips(src)
    sizes: Counter[tuple[int, int]] = Counter()
    gray = True
    readable: dict[tuple[str | None, int], list[str]] = {}
    for key, _, (ch, h, w) in _readable(src, [k for k, _, _ in entries], skips):
        sizes[(h, w)] += 1
        gray = gray and ch == 1
        label, split = place[key]
        readable.setdefault((split, label), []).append(key)

    folder_splits = entries[0][2] is not None
    train_split = "train" if folder_splits else None
    empty = [cls for label, cls in enumerate(classes) if not readable.get((train_split, label))]
    if len(classes) - len(empty) < 2:
        have = [cls for cls in classes if cls not in empty]
        raise ConfigError(f"Folder {root} has usable training images in {len(have)} class folder(s) "
                          f"({', '.join(have) or 'none'}; {skips.count} images skipped: {skips.summary() or 'none'});"
                          " a classifier needs at least two: add readable PNG or JPEG images to the others.")
    for cls in empty:
        folder = "/".join(p for p in (root.rstrip("/"), train_split, cls) if p)
        logger.warning("Class %r has no usable training image in %s; it is kept with 0 images, so no model "
                       "learns it: add images to the folder or remove it", cls, folder)
    if skips.count:
        logger.warning("Dataset %s: skipped %d unusable image(s) (%s)", name, skips.count, skips.summary())
    if folder_splits:
        assigned = {s: [(k, lbl) for (sp, lbl), ks in readable.items() if sp == s for k in ks]
                    for s in SPLITS}
        split_info: dict[str, Any] = {"method": "folders"}
    else:
        per_class = [sorted(readable.get((None, label), [])) for label in range(len(classes))]
        assigned = _draw_splits(per_class, val_fraction, test_fraction, seed)
        split_info = {"method": "stratified", "seed": seed, "val_fraction": val_fraction,
                      "test_fraction": test_fraction}

    # the most common size wins; ties go to the smaller size so the choice is deterministic
    (height, width), _ = min(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    channels = 1 if gray else 3
    odd = sum(sizes.values()) - sizes[(height, width)]
    if odd:
        logger.info("%d image(s) are not %dx%d; they are resized when read", odd, height, width)

    def rows(items: list[tuple[str, int]]) -> Iterator[tuple[str, bytes, int]]:
        labels = dict(items)
        for key, data in _read_many(src, sorted(labels)):
            if data is None:
                raise ConfigError(f"{src.url(key)} became unreadable during the import; run it again.")
            yield key, data, labels[key]

    return write_dataset(
        store, name, version, classes, channels, (height, width),
        {s: rows(assigned[s]) for s in SPLITS}, source=root, skipped=skips.count, skipped_reasons=skips.reasons,
        extra={"split": split_info, "empty_classes": empty},
    )


def load_dataset_manifest(store: Store, name: str, version: str = "latest") -> dict:
    _check_name("dataset name", name)
    committed = dataset_versions(store, name)
    wanted = committed[-1] if version == "latest" and committed else version
    if wanted not in committed:
        have = f" (it has {', '.join(committed)})" if committed else ""
        raise ConfigError(
            f"Dataset {name!r} (version {version}) is not in the store {store.uri}{have}; import it with "
            f"`semisup import-imagefolder --store {store.uri} --name {name} --root FOLDER` "
            "(or build the MNIST demo with `semisup demo-data`)."
        )
    return store.read_json(join(dataset_prefix(name, wanted), SUCCESS))


def load_split(store: Store, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (uint8 NxCxHxW), labels (int64) and image ids of one split, in shard order."""
    splits = manifest["splits"]
    if split not in splits:
        raise ConfigError(f"Dataset {manifest['name']!r} {manifest['version']} has no split {split!r}; "
                          f"use one of {', '.join(splits)}.")
    channels = int(manifest["channels"])
    size = (int(manifest["image_size"][0]), int(manifest["image_size"][1]))
    images, labels, ids = [], [], []
    for shard in splits[split]["shards"]:
        table = store.read_table(shard["key"])
        images.append(decode_table(table, channels, size))
        labels.append(table.column("label").to_numpy().astype(np.int64))
        ids.extend(table.column("image_id").to_pylist())
    if not images:
        return np.empty((0, channels, *size), dtype=np.uint8), np.empty(0, dtype=np.int64), []
    return np.concatenate(images), np.concatenate(labels), ids


# -- drops ------------------------------------------------------------------------------------
def _reasons_json(skipped: int, reasons: Mapping[str, int] | None) -> dict[str, int]:
    if reasons is None:  # a caller that counted skips without reasons (write_drop(skipped=n))
        reasons = {"unspecified": skipped}
    out = {str(k): int(v) for k, v in sorted(reasons.items()) if v}
    if sum(out.values()) != skipped:
        raise ValueError(f"skipped_reasons {out} do not add up to skipped={skipped}")
    return out


def _commit_drop(
    store: Store, drop_id: str, shards: list[ShardInfo], skipped: int, reasons: Mapping[str, int] | None,
    source: str, date: str | None = None,
) -> dict:
    manifest = {
        "kind": "drop",
        "drop_id": drop_id,
        "shards": [s.to_json() for s in shards],
        "count": sum(s.count for s in shards),
        "skipped": int(skipped),
        "skipped_reasons": _reasons_json(skipped, reasons),  # {reason: count}, see images.REASONS
        "source": source,
    }
    if date is not None:  # the day the drop landed (ingest): what drops_since and drops_last order by
        manifest["date"] = date
    store.write_json(join(drop_prefix(drop_id), SUCCESS), manifest)
    logger.info("Wrote drop %s: %d images in %d shard(s), %d skipped", drop_id, manifest["count"], len(shards),
                skipped)
    return manifest


def _write_drop_shards(
    store: Store, drop_id: str, rows: Iterable[tuple[str, bytes]], shard_size: int
) -> list[ShardInfo]:
    prefix = drop_prefix(drop_id)
    if store.exists(join(prefix, SUCCESS)):
        raise ConfigError(f"Drop {drop_id!r} already exists in {store.uri}; "
                          "import the new images under another drop id.")
    store.delete_prefix(prefix)  # debris of an earlier import that crashed before its manifest
    # rows carry no label at all: a drop is unlabeled by construction, true labels live in truth/
    labeled = ((drop_image_id(drop_id, rel), data, None) for rel, data in rows)
    return write_shards(store, join(prefix, "shards"), labeled, shard_size)


def write_drop(
    store: Store,
    drop_id: str,
    rows: Iterable[tuple[str, bytes]],
    source: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    skipped: int = 0,
    skipped_reasons: Mapping[str, int] | None = None,
    derived_from: str | None = None,
    date: str | None = None,
) -> dict:
    """Write one drop from (relative path, encoded bytes) rows: shards, then the manifest last.

    ``derived_from``: the drop is a copy of part of that drop (an experiment's smaller pool). It is
    marked so, and :func:`list_drops` leaves it out: a run over every drop never pools a copy.
    ``date`` (YYYY-MM-DD): the day the drop landed, recorded in the manifest."""
    _check_name("drop id", drop_id)
    reasons = _reasons_json(skipped, skipped_reasons)  # checked before anything is written
    shards = _write_drop_shards(store, drop_id, rows, shard_size)
    if not shards:
        raise ConfigError(f"Drop {drop_id!r} from {source} has no images.")
    if derived_from is not None:  # before the manifest: a committed derived drop is always marked
        store.write_json(join(drop_prefix(drop_id), DERIVED), {"derived_from": derived_from})
    return _commit_drop(store, drop_id, shards, skipped, reasons, source, date)


def import_drop(store: Store, drop_id: str, source: str, shard_size: int = DEFAULT_SHARD_SIZE,
                date: str | None = None) -> dict:
    """Import every image under a folder or s3:// prefix as one unlabeled drop (idempotent).

    ``date`` (YYYY-MM-DD), when given, is recorded in the manifest as the day the drop landed."""
    _check_name("drop id", drop_id)
    if store.exists(join(drop_prefix(drop_id), SUCCESS)):
        logger.info("Drop %s is already imported; nothing to do", drop_id)
        return load_drop_manifest(store, drop_id)
    src = _open_source(source)
    listing = src.list()
    keys, archives = _source_images(src, listing), _source_archives(listing)
    if not keys and not archives:
        raise ConfigError(f"Folder {source} has no {_SUFFIXES} images and no .tar or .parquet shards; point "
                          "--source at the folder (or s3:// prefix) that holds the drop's images.")
    skips = _Skips(src)
    loose = ((key, data) for key, data, _ in _readable(src, keys, skips))
    packed = _probed((row for a in archives for row in _archive_images(src, a, skips)), skips)
    shards = _write_drop_shards(store, drop_id, itertools.chain(loose, packed), shard_size)
    if not shards:  # nothing was written, so no manifest and no debris: the same id can be imported again
        if not skips.count:
            raise ConfigError(f"The {len(archives)} shard file(s) under {source} hold no {_SUFFIXES} images; "
                              "point --source at the folder (or s3:// prefix) that holds the drop's images.")
        raise ConfigError(f"None of the {skips.count} images under {source} is usable ({skips.summary()}); "
                          "check that they are complete PNG or JPEG files (loose, in tar shards, or in "
                          f"img2dataset Parquet shards), then import drop {drop_id!r} again.")
    if skips.count:
        logger.warning("Drop %s: kept %d images, skipped %d (%s)", drop_id, sum(s.count for s in shards),
                       skips.count, skips.summary())
    return _commit_drop(store, drop_id, shards, skips.count, skips.reasons, source, date=date)


def list_drops(store: Store) -> list[str]:
    """Ids of the committed drops, sorted; derived drops (copies of part of a drop) left out."""
    keys = [k for k in store.list("drops") if k.count("/") == 2]
    derived = {k.split("/")[1] for k in keys if k.endswith("/" + DERIVED)}
    return sorted(k.split("/")[1] for k in keys if k.endswith("/" + SUCCESS) and k.split("/")[1] not in derived)


def load_drop_manifest(store: Store, drop_id: str) -> dict:
    _check_name("drop id", drop_id)
    key = join(drop_prefix(drop_id), SUCCESS)
    if not store.exists(key):
        raise ConfigError(f"Drop {drop_id!r} is not in the store {store.uri}; import it with "
                          f"`semisup import-drop --store {store.uri} --drop-id {drop_id} --source FOLDER`.")
    return store.read_json(key)


def write_truth(store: Store, drop_id: str, image_ids: Sequence[str], labels: Sequence[int]) -> None:
    """True labels of a drop's images (DISTRACTOR for none), kept apart from the unlabeled shards."""
    _check_name("drop id", drop_id)
    table = pa.table({"image_id": list(image_ids), "label": [int(v) for v in labels]}, schema=TRUTH_SCHEMA)
    store.write_table(truth_key(drop_id), table)


def load_truth(store: Store, drop_ids: Iterable[str]) -> pa.Table | None:
    """True labels of the given drops that have them, concatenated; None when none has."""
    return _load_drop_labels(store, drop_ids, truth_key, TRUTH_SCHEMA)


def _load_drop_labels(store: Store, drop_ids: Iterable[str], key_of, schema: pa.Schema) -> pa.Table | None:
    """A per-drop (image_id, label) table of the given drops that have one, concatenated; None when none has."""
    tables = []
    for drop_id in drop_ids:
        key = key_of(_check_name("drop id", drop_id))
        if store.exists(key):
            tables.append(store.read_table(key).select(["image_id", "label"]).cast(schema))
    return pa.concat_tables(tables) if tables else None


# -- weak labels (semi-weakly supervised: noisy tags such as hashtags) ---------------------------
def write_weak_labels(store: Store, drop_id: str, image_ids: Sequence[str], labels: Sequence[int]) -> str:
    """Weak labels of a drop's images (class indices, NO_TAG for none), beside the unlabeled shards like
    its true labels; replaces earlier ones. Returns the key written."""
    _check_name("drop id", drop_id)
    ids, values = list(image_ids), [int(v) for v in labels]
    if len(ids) != len(values):
        raise ValueError(f"{len(ids)} image ids but {len(values)} weak labels for drop {drop_id!r}")
    repeated = next((i for i, n in Counter(ids).items() if n > 1), None)
    if repeated is not None:
        raise ConfigError(f"Image {repeated!r} has more than one weak label in drop {drop_id!r}; give each image "
                          "one label.")
    bad = next((v for v in values if v < NO_TAG), None)
    if bad is not None:
        raise ConfigError(f"Weak label {bad} of drop {drop_id!r} is not a class index; use 0 or more, or "
                          f"{NO_TAG} for no tag.")
    key = weak_labels_key(drop_id)
    store.write_table(key, pa.table({"image_id": ids, "label": values}, schema=WEAK_SCHEMA))
    return key


def load_weak_labels(store: Store, drop_ids: Iterable[str]) -> pa.Table | None:
    """Weak labels of the given drops that have them, concatenated; None when none has."""
    return _load_drop_labels(store, drop_ids, weak_labels_key, WEAK_SCHEMA)


def drop_image_ids(store: Store, manifest: dict) -> list[str]:
    """Every image id of a drop (from its manifest), in shard order."""
    return [i for s in manifest["shards"] for i in store.read_table(s["key"], columns=["image_id"])
            .column("image_id").to_pylist()]


def _read_weak_csv(csv_source: str) -> list[tuple[int, str, str]]:
    """(line number, path, class name) of each row of a ``path,label`` CSV file."""
    from pathlib import Path

    path = Path(csv_source.removeprefix("file://"))
    if not path.is_file():
        raise ConfigError(f"CSV file {csv_source} does not exist; pass a local file with the header path,label.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte order mark is no column name
    except UnicodeDecodeError:
        raise ConfigError(f"CSV file {csv_source} is not UTF-8 text; save it as UTF-8 CSV with the header "
                          "path,label.") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [c.strip() for c in next(reader, [])]
        if header != ["path", "label"]:
            shown = ",".join(header) if header else "nothing"
            raise ConfigError(f"CSV file {csv_source} starts with {shown!r}, not the header path,label; make its "
                              "first line path,label (the image's path inside the drop, its class name).")
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue  # a blank line (often the last one)
            if len(cells) != 2:
                raise ConfigError(f"Line {reader.line_num} of {csv_source} has {len(cells)} field(s), not 2 "
                                  "(path,label); quote a path or class name that holds a comma.")
            rows.append((reader.line_num, cells[0].strip(), cells[1].strip()))
    except csv.Error as exc:
        raise ConfigError(f"Line {reader.line_num} of {csv_source} is not valid CSV ({exc}); fix it and import "
                          "again.") from None
    return rows


def import_weak_labels(store: Store, drop_id: str, csv_source: str, classes: list[str]) -> dict:
    """Weak labels of a committed drop from a ``path,label`` CSV file (local path).

    ``path`` is the image's path inside the drop as imported (its id is ``drop_image_id(drop_id, path)``),
    ``label`` a class name from ``classes`` (the labeled dataset's); an empty label means no usable tag.
    The drop's images the file does not name get no tag (-1). An unknown class name or path, a path
    listed twice or a missing drop is refused, naming the first offending line, and nothing is written;
    importing again replaces the drop's weak labels.
    """
    manifest = load_drop_manifest(store, drop_id)  # a missing drop: one sentence, before the file is read
    rows = _read_weak_csv(csv_source)
    index = {str(c): i for i, c in enumerate(classes)}
    ids = drop_image_ids(store, manifest)
    known = set(ids)
    first_line: dict[str, int] = {}
    tags: dict[str, int] = {}
    for line, rel, name in rows:
        if rel in first_line:
            raise ConfigError(f"Line {line} of {csv_source} lists {rel!r} again (first on line {first_line[rel]}); "
                              "give each image one label.")
        first_line[rel] = line
        image_id = drop_image_id(drop_id, rel)
        if image_id not in known:
            example = ids[0][len(drop_id) + 1:] if ids else ""
            raise ConfigError(f"Line {line} of {csv_source} names {rel!r}, which is not an image of drop "
                              f"{drop_id!r}; paths are relative to the drop's source as imported (like "
                              f"{example!r}).")
        if name and name not in index:
            shown = ", ".join(list(index)[:10]) + (", ..." if len(index) > 10 else "")
            raise ConfigError(f"Line {line} of {csv_source} has the label {name!r}, which is not a class of the "
                              f"dataset ({shown}); use a class name or leave the label empty for no tag.")
        tags[image_id] = index[name] if name else NO_TAG
    labels = [tags.get(i, NO_TAG) for i in ids]
    key = write_weak_labels(store, drop_id, ids, labels)
    labeled = sum(1 for v in labels if v != NO_TAG)
    logger.info("Wrote weak labels of drop %s: %d of %d images tagged", drop_id, labeled, len(ids))
    return {"drop_id": drop_id, "weak_labels": store.url(key), "rows": len(rows), "images": len(ids),
            "labeled": labeled, "untagged": len(ids) - labeled,
            "classes_tagged": len({v for v in labels if v != NO_TAG})}
