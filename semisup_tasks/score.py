"""Scoring: the teacher's top-P (class, softmax score) pairs for every image of a shard.

Decoding runs in DataLoader worker processes, overlapped with the model; batches reach the
device through pinned memory, and on a GPU the model runs channels-last under bf16 autocast.
Each shard's scores are handed back whole as soon as its last batch is scored, so the caller
writes one complete object per shard and a failure never loses the shards already written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .distributed import training_device
from .images import decode_table
from .store import Store
from .train import prepare

SCHEMA = pa.schema([("image_id", pa.string()), ("cls", pa.int32()), ("score", pa.float32()),
                    ("shard", pa.string())])


def top_p(logits: torch.Tensor, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes, scores), each N x P, from logits: the P most probable classes per image."""
    probs = torch.softmax(logits.float(), dim=1)
    scores, classes = torch.topk(probs, k=p, dim=1)
    return classes.cpu().numpy().astype(np.int32), scores.cpu().numpy().astype(np.float32)


def scoring_precision(device: str | None = None) -> str:
    """The arithmetic scores are computed in: part of the score cache key."""
    return "bf16" if (device or training_device().type) == "cuda" else "fp32"


@dataclass(frozen=True)
class Batch:
    shard: str
    batches_in_shard: int
    ids: list[str]
    images: torch.Tensor  # uint8 N x C x H x W

    def pin_memory(self) -> Batch:  # called by the DataLoader's pin-memory thread
        return dataclasses.replace(self, images=self.images.pin_memory())


def _as_is(batch: Batch) -> Batch:
    return batch  # module level, so the DataLoader also works with the spawn start method


class ShardBatches(IterableDataset):
    """Decoded batches of the given shards; worker w of n takes every n-th shard.

    Each worker opens its own store client and reads whole shards, so the main process only
    moves finished uint8 batches to the model.
    """

    def __init__(self, store_uri: str, shards: list[str], channels: int, image_size: tuple[int, int],
                 batch_size: int):
        self.store_uri, self.shards = store_uri, shards
        self.channels, self.image_size, self.batch_size = channels, image_size, batch_size

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        store = Store.from_uri(self.store_uri)
        for shard in mine:
            table = store.read_table(shard, columns=["image_id", "image"])
            starts = range(0, table.num_rows, self.batch_size)
            for start in starts:
                part = table.slice(start, self.batch_size)
                images = torch.from_numpy(decode_table(part, self.channels, self.image_size))
                yield Batch(shard, len(starts), part.column("image_id").to_pylist(), images)


def score_shards(model: nn.Module, store: Store, shards: list[str], p: int, channels: int,
                 image_size: tuple[int, int], batch_size: int = 256, workers: int = 2,
                 device: str | None = None) -> Iterator[tuple[str, pa.Table]]:
    """Yield (shard key, long-format score table) per shard, one row per (image, top-P class)."""
    device = device or training_device().type
    shards = list(dict.fromkeys(shards))  # one worker per shard: a repeated key would mix two scorings
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    loader = DataLoader(ShardBatches(store.uri, shards, channels, image_size, batch_size), batch_size=None,
                        num_workers=min(workers, len(shards)), pin_memory=device == "cuda",
                        collate_fn=_as_is)
    pending: dict[str, list[tuple[list[str], np.ndarray, np.ndarray]]] = {}
    bf16 = scoring_precision(device) == "bf16"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        for batch in loader:
            x = batch.images.to(device, non_blocking=True)
            logits = model(prepare(x).contiguous(memory_format=torch.channels_last))
            classes, scores = top_p(logits, p)
            parts = pending.setdefault(batch.shard, [])
            parts.append((batch.ids, classes, scores))
            if len(parts) == batch.batches_in_shard:  # a worker yields a shard's batches in order
                yield batch.shard, _table(batch.shard, pending.pop(batch.shard), p)


def _table(shard: str, parts: list[tuple[list[str], np.ndarray, np.ndarray]], p: int) -> pa.Table:
    ids = [i for part_ids, _, _ in parts for i in part_ids]
    classes = np.concatenate([c for _, c, _ in parts]).reshape(-1)
    scores = np.concatenate([s for _, _, s in parts]).reshape(-1)
    return pa.table({"image_id": np.repeat(np.asarray(ids, dtype=object), p).tolist(), "cls": classes,
                     "score": scores, "shard": [shard] * len(classes)}, schema=SCHEMA)
