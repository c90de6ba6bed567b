"""Selection: exact top-K images per class over every image's top-P rows.

Ties are broken by score descending, then image id ascending, so the result does not depend
on the order the score files are read in. Memory holds the survivors (at most C*K rows) plus
one score file at a time, whatever the pool size.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SORT_KEYS = [("cls", "ascending"), ("score", "descending"), ("image_id", "ascending")]


def top_k_per_class(table: pa.Table, k: int) -> pa.Table:
    """Rows of ``table`` that rank in the first k of their class, sorted by class then rank."""
    if table.num_rows == 0:
        return table
    ranked = table.sort_by(SORT_KEYS)
    cls = ranked.column("cls").to_numpy()
    starts = np.r_[0, np.flatnonzero(np.diff(cls)) + 1]
    # position of each row within its class block
    rank = np.arange(len(cls)) - np.repeat(starts, np.diff(np.r_[starts, len(cls)]))
    return ranked.filter(pa.array(rank < k))


def select(tables: Iterable[pa.Table], k: int) -> tuple[pa.Table, dict]:
    """Stream score tables into the exact per-class top-K; returns (selection, {"rows_scored": n})."""
    survivors: pa.Table | None = None
    rows = 0
    for table in tables:
        rows += table.num_rows
        merged = table if survivors is None else pa.concat_tables([survivors, table.select(survivors.column_names)])
        survivors = top_k_per_class(merged, k)
    if survivors is None:
        raise ValueError("no score files to select from")
    return survivors, {"rows_scored": rows}


def selection_stats(selection: pa.Table, num_classes: int, k: int) -> dict:
    counts = np.bincount(selection.column("cls").to_numpy(), minlength=num_classes).tolist()
    thresholds: list[float | None] = [None] * num_classes
    if selection.num_rows:
        grouped = selection.group_by("cls").aggregate([("score", "min")])
        for c, s in zip(grouped.column("cls").to_pylist(), grouped.column("score_min").to_pylist(), strict=True):
            thresholds[c] = float(s)
    return {
        "k": k,
        "selected_pairs": selection.num_rows,
        "unique_images": len(pc.unique(selection.column("image_id"))) if selection.num_rows else 0,
        "per_class_count": counts,
        "shortfall": [max(0, k - c) for c in counts],
        "threshold": thresholds,
    }
