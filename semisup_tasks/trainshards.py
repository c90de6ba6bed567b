"""Training shards: the selected set D̂ written once as globally shuffled Parquet parts of raw pixels.

The student reads D̂ many epochs over; decoding and resizing every image every epoch, in random
access across the drops' shards, would bound training by I/O and PIL. So the selection is
materialised once: each selected (image, class) row decoded to uint8 CxHxW at the model's input
size, in a seeded random global order, cut into parts read whole and sequentially.

Layout under ``prefix``: ``part-NNNNN.parquet`` (``image_id`` string, ``pixels``
fixed_size_binary(C*H*W), ``label`` int32) and ``manifest.json``, written last::

    {"count": N, "parts": [{"key": "<prefix>/part-00000.parquet", "count": n0}, ...],
     "channels": C, "image_size": [H, W], "seed": S, "rows_sha256": "<digest of the selected rows>"}

The shuffle is external so memory does not grow with the selection's pixels: every row gets a
position from a seeded permutation; source shards are streamed once, decoded rows go to spill
buckets by position range (``prefix/_spill/``); then each bucket in turn is sorted by position
and cut into parts. In memory at once: the rows' metadata, a bounded spill buffer and one bucket.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .images import decode
from .store import Store, join

log = logging.getLogger("semisup.trainshards")

MANIFEST = "manifest.json"
SPILL = "_spill"
PART_BYTES = 64 << 20  # a part is read whole per epoch: big enough for sequential reads, small for memory
BUCKET_BYTES = 256 << 20  # one bucket's pixels are in memory while it is sorted
SPILL_BYTES = 256 << 20  # decoded rows buffered across buckets before they go to spill objects
ROW_COLUMNS = ("image_id", "shard", "cls")


def _put_table(store: Store, key: str, table: pa.Table, compression: str) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    store.write_bytes(key, sink.getvalue())


def _check_rows(rows: pa.Table) -> None:
    missing = [c for c in ROW_COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(f"Selected rows lack column(s) {', '.join(missing)}; pass a table with image_id, shard "
                         "and cls.")
    for c in ROW_COLUMNS:
        if rows.column(c).null_count:
            raise ValueError(f"Selected rows have null values in column {c!r}; every row needs an image_id, "
                             "a shard and a class.")
    if rows.num_rows and pc.min(rows.column("cls")).as_py() < 0:
        raise ValueError("Selected rows have a negative class in column 'cls'; classes are indices from 0.")


def rows_digest(rows: pa.Table) -> str:
    """sha256 of the (image_id, shard, cls) rows in order: a different selection never reuses old parts."""
    h = hashlib.sha256()
    for batch in rows.select(list(ROW_COLUMNS)).to_batches(max_chunksize=65536):
        for c in ("image_id", "shard"):
            h.update("\0".join(batch.column(c).to_pylist()).encode() + b"\1")
        h.update(batch.column("cls").to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return h.hexdigest()


def _fixed_binary(pixels: np.ndarray) -> pa.Array:
    """n x width uint8 rows as a fixed_size_binary(width) array, sharing the numpy buffer."""
    n, width = pixels.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(pixels)])


def _decode_shard(store: Store, shard: str, ids: list[str], channels: int, size: tuple[int, int]) -> np.ndarray:
    """Decoded pixels (len(ids) x C*H*W) of the named images of one source shard, read once."""
    table = store.read_table(shard, columns=["image_id", "image"])
    index = {image_id: j for j, image_id in enumerate(table.column("image_id").to_pylist())}
    images = table.column("image").combine_chunks()
    out = np.empty((len(ids), channels * size[0] * size[1]), dtype=np.uint8)
    done: dict[str, int] = {}  # an image selected for several classes is decoded once
    for k, image_id in enumerate(ids):
        if image_id in done:
            out[k] = out[done[image_id]]
            continue
        j = index.get(image_id)
        if j is None:
            raise ValueError(f"Image {image_id!r} is not in shard {shard!r}; the selection does not match the "
                             "drop's shards.")
        try:
            out[k] = decode(images[j].as_py(), channels, size).reshape(-1)
        except ValueError as exc:
            raise ValueError(f"Image {image_id!r} in shard {shard!r} cannot be decoded ({exc}); remove it from the "
                             "drop or re-import the drop.") from None
        done[image_id] = k
    return out


def _decoded_in_order(store: Store, jobs: list, channels: int, size: tuple[int, int], threads: int | None):
    """(job, pixels) for each (shard, rows, ids) job, in order. Shards decode on a thread pool, since
    Pillow releases the GIL while it decodes and resizes; at most 2 x threads shards are in flight."""
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append((job, pool.submit(_decode_shard, store, job[0], job[2], channels, size)))
            if len(pending) > 2 * threads:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _matches(manifest: dict, count: int, seed: int, channels: int, size: tuple[int, int], digest: str) -> bool:
    return (manifest.get("count") == count and manifest.get("seed") == seed and manifest.get("channels") == channels
            and list(manifest.get("image_size", [])) == list(size) and manifest.get("rows_sha256") == digest)


def _clear(store: Store, prefix: str) -> None:
    """Remove what an earlier (other or interrupted) materialisation left; only keys this module writes."""
    store.delete(join(prefix, MANIFEST))
    spill = join(prefix, SPILL) + "/"
    for key in store.list(prefix):
        name = key.rsplit("/", 1)[-1]
        if key.startswith(spill) or (name.startswith("part-") and name.endswith(".parquet")):
            store.delete(key)


def write_training_shards(
    store: Store,
    prefix: str,
    rows: pa.Table,
    channels: int,
    size: tuple[int, int],
    seed: int,
    part_rows: int | None = None,
    bucket_rows: int | None = None,
    spill_bytes: int = SPILL_BYTES,
    threads: int | None = None,
) -> dict:
    """Materialise the selected ``rows`` (image_id, shard, cls) as shuffled parts under ``prefix``; returns
    the manifest. Idempotent: a manifest for the same rows, seed, channels and size is returned as is.

    ``part_rows`` and ``bucket_rows`` default to about PART_BYTES and BUCKET_BYTES of pixels; the parts
    (and so the training order) do not depend on ``bucket_rows``, ``spill_bytes`` or ``threads`` (source
    shards decoding at once; default: the CPU count, up to 8).
    """
    _check_rows(rows)
    size = (int(size[0]), int(size[1]))
    channels, seed, n = int(channels), int(seed), rows.num_rows
    width = channels * size[0] * size[1]
    part_rows = int(part_rows or max(1, PART_BYTES // width))
    bucket_rows = int(bucket_rows or max(1, BUCKET_BYTES // width))
    if part_rows < 1 or bucket_rows < 1:
        raise ValueError(f"part_rows={part_rows} and bucket_rows={bucket_rows} must both be at least 1.")
    manifest_key = join(prefix, MANIFEST)
    digest = rows_digest(rows)
    if store.exists(manifest_key):
        old = store.read_json(manifest_key)
        if _matches(old, n, seed, channels, size, digest):
            log.info("training shards under %s are up to date (%d rows)", prefix, n)
            return old
    _clear(store, prefix)

    # row i goes to global position positions[i]; a bucket holds one contiguous range of positions
    positions = np.random.default_rng(seed).permutation(n).astype(np.int64)
    labels = rows.column("cls").to_numpy(zero_copy_only=False).astype(np.int32)
    n_buckets = math.ceil(n / bucket_rows)
    buffers: dict[int, list[pa.Table]] = {}
    spilled: dict[int, list[str]] = {}
    buffered = 0

    def flush() -> None:
        nonlocal buffered
        for b, tables in sorted(buffers.items()):
            key = join(prefix, SPILL, f"bucket-{b:05d}-{len(spilled.get(b, [])):05d}.parquet")
            _put_table(store, key, pa.concat_tables(tables), "lz4")  # read back once: fast beats small
            spilled.setdefault(b, []).append(key)
        buffers.clear()
        buffered = 0

    # stream the source shards once each, rows grouped by shard
    shard_codes = rows.column("shard").combine_chunks().dictionary_encode()
    codes = shard_codes.indices.to_numpy(zero_copy_only=False)
    by_shard = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(shard_codes.dictionary)))])
    ids_column = rows.column("image_id")
    jobs = []
    for code in np.argsort(shard_codes.dictionary.to_pylist()):  # sorted keys: a reproducible read order
        sel = by_shard[bounds[code]:bounds[code + 1]]
        if len(sel):
            jobs.append((shard_codes.dictionary[int(code)].as_py(), sel, ids_column.take(pa.array(sel)).to_pylist()))
    for (_, sel, ids), pixels in _decoded_in_order(store, jobs, channels, size, threads):
        pos = positions[sel]
        bucket_of = pos // bucket_rows
        order = np.argsort(bucket_of, kind="stable")
        table = pa.table({"position": pos[order], "image_id": pa.array(ids).take(pa.array(order)),
                          "pixels": _fixed_binary(pixels[order]), "label": labels[sel][order]})
        cuts = np.searchsorted(bucket_of[order], np.arange(n_buckets + 1))
        for b in np.flatnonzero(np.diff(cuts)):
            buffers.setdefault(int(b), []).append(table.slice(cuts[b], cuts[b + 1] - cuts[b]))
        buffered += pixels.nbytes
        if buffered >= spill_bytes:
            flush()

    # per bucket: gather its rows, sort by position, cut parts (a remainder carries to the next bucket)
    parts: list[dict] = []
    carry: list[pa.Table] = []

    def write_part(table: pa.Table) -> None:
        key = join(prefix, f"part-{len(parts):05d}.parquet")
        _put_table(store, key, table.select(["image_id", "pixels", "label"]), "zstd")
        parts.append({"key": key, "count": table.num_rows})

    for b in range(n_buckets):
        tables = [store.read_table(key) for key in spilled.get(b, [])] + buffers.pop(b, [])
        bucket = pa.concat_tables(tables).sort_by("position") if tables else None
        expected = min(n, (b + 1) * bucket_rows) - b * bucket_rows
        if bucket is None or bucket.num_rows != expected:
            raise RuntimeError(f"Bucket {b} of {prefix} holds {0 if bucket is None else bucket.num_rows} rows, "
                               f"not {expected}; spill objects were changed during the write.")
        table = pa.concat_tables(carry + [bucket]) if carry else bucket
        start = 0
        while table.num_rows - start >= part_rows:
            write_part(table.slice(start, part_rows))
            start += part_rows
        carry = [table.slice(start)] if start < table.num_rows else []
        for key in spilled.pop(b, []):
            store.delete(key)
    if carry:
        write_part(pa.concat_tables(carry))

    manifest = {"count": n, "parts": parts, "channels": channels, "image_size": list(size), "seed": seed,
                "rows_sha256": digest}
    store.write_json(manifest_key, manifest)
    log.info("wrote %d training rows in %d parts under %s", n, len(parts), prefix)
    return manifest


class ShardStream:
    """Training batches read from training shards: each epoch, parts in a random order, rows shuffled within
    each part, the next part read by a background thread while the current one trains.

    Implements the batch source of :func:`semisup_tasks.train.train_stream`: ``len()`` rows and
    ``batches(batch_size, gen)`` yielding (uint8 NxCxHxW, int64 labels) tensors; every batch but an
    epoch's last has ``batch_size`` rows, so an epoch is ceil(len / batch_size) steps as in memory.
    """

    def __init__(self, store: Store, prefix: str, manifest: dict | None = None):
        self.store = store
        self.prefix = prefix
        self.manifest = manifest if manifest is not None else store.read_json(join(prefix, MANIFEST))
        self.channels = int(self.manifest["channels"])
        self.size = tuple(int(s) for s in self.manifest["image_size"])
        self.parts = [(p["key"], int(p["count"])) for p in self.manifest["parts"]]

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def read_part(self, key: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """One part as (uint8 NxCxHxW view on the Parquet buffer, int64 labels); no per-image work."""
        table = self.store.read_table(key, columns=["pixels", "label"])
        width = self.channels * self.size[0] * self.size[1]
        pixels = table.column("pixels").combine_chunks()
        if table.num_rows != count or pixels.type != pa.binary(width) or pixels.null_count:
            raise ValueError(f"Training part {key!r} does not match its manifest ({table.num_rows} rows of "
                             f"{pixels.type}, expected {count} of fixed_size_binary[{width}]); rerun the "
                             "materialize stage.")
        x = np.frombuffer(pixels.buffers()[1], dtype=np.uint8, count=count * width, offset=pixels.offset * width)
        y = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
        return x.reshape(count, self.channels, *self.size), y

    def batches(self, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch. Random draws come from ``gen`` in this thread only, so an epoch is reproducible."""
        order = torch.randperm(len(self.parts), generator=gen).tolist()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainshards")
        pending: Future | None = None
        try:
            if order:
                pending = pool.submit(self.read_part, *self.parts[order[0]])
            held_x: list[np.ndarray] = []  # rows carried across a part boundary
            held_y: list[np.ndarray] = []
            held = 0
            for k in range(len(order)):
                x, y = pending.result()
                pending = pool.submit(self.read_part, *self.parts[order[k + 1]]) if k + 1 < len(order) else None
                perm = torch.randperm(len(y), generator=gen).numpy()
                pos = 0
                while pos < len(perm):
                    if held or len(perm) - pos < batch_size:
                        take = perm[pos:pos + batch_size - held]
                        held_x.append(x[take])
                        held_y.append(y[take])
                        held += len(take)
                        pos += len(take)
                        if held == batch_size:
                            yield torch.from_numpy(np.concatenate(held_x)), torch.from_numpy(np.concatenate(held_y))
                            held_x, held_y, held = [], [], 0
                    else:
                        take = perm[pos:pos + batch_size]
                        yield torch.from_numpy(x[take]), torch.from_numpy(y[take])
                        pos += batch_size
            if held:
                yield torch.from_numpy(np.concatenate(held_x)), torch.from_numpy(np.concatenate(held_y))
        finally:
            if pending is not None:
                pending.cancel()
            pool.shutdown(wait=True)
