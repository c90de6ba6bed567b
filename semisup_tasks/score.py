"""Scoring: the teacher's top-P (class, softmax score) pairs for every image of a shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from .images import decode_table
from .train import predict

SCHEMA = pa.schema([("image_id", pa.string()), ("cls", pa.int32()), ("score", pa.float32()),
                    ("shard", pa.string())])


def top_p(logits: torch.Tensor, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes, scores), each N x P, from logits: the P most probable classes per image."""
    probs = torch.softmax(logits.float(), dim=1)
    scores, classes = torch.topk(probs, k=p, dim=1)
    return classes.numpy().astype(np.int32), scores.numpy().astype(np.float32)


def score_shard(model: nn.Module, table: pa.Table, shard_key: str, p: int, channels: int,
                image_size: tuple[int, int], batch_size: int = 256) -> pa.Table:
    """One long-format row per (image, one of its top-P classes)."""
    images = decode_table(table, channels, image_size)
    classes, scores = top_p(predict(model, images, batch_size), p)
    ids = np.repeat(np.asarray(table.column("image_id").to_pylist(), dtype=object), p)
    return pa.table({"image_id": ids.tolist(), "cls": classes.reshape(-1), "score": scores.reshape(-1),
                     "shard": [shard_key] * len(ids)}, schema=SCHEMA)
