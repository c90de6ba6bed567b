"""Classification metrics: top-1, top-5, per-class recall, balanced accuracy, head and tail recall."""

from __future__ import annotations

import numpy as np
import torch


def tail_classes(train_class_counts: list[int]) -> list[int]:
    """The rarest half of the classes in the labeled train split (ties by class index)."""
    order = sorted(range(len(train_class_counts)), key=lambda c: (train_class_counts[c], c))
    return sorted(order[: len(order) // 2])


def classification_metrics(logits: torch.Tensor, labels: np.ndarray, tail: list[int]) -> dict:
    num_classes = logits.shape[1]
    y = torch.as_tensor(labels, dtype=torch.int64)
    top = torch.topk(logits, k=min(5, num_classes), dim=1).indices
    pred = top[:, 0]
    recall = []
    for c in range(num_classes):
        mask = y == c
        recall.append(float((pred[mask] == c).float().mean()) if mask.any() else float("nan"))
    head = [c for c in range(num_classes) if c not in set(tail)]
    return {
        "top1": float((pred == y).float().mean()),
        "top5": float((top == y[:, None]).any(dim=1).float().mean()),
        "balanced_accuracy": _mean(recall),
        "tail_recall": _mean([recall[c] for c in tail]),
        "head_recall": _mean([recall[c] for c in head]),
        "per_class_recall": [None if np.isnan(r) else r for r in recall],
    }


def _mean(values: list[float]) -> float | None:
    """Mean over the classes that have test images; None (valid JSON, unlike NaN) when none has."""
    present = [v for v in values if not np.isnan(v)]
    return float(np.mean(present)) if present else None
