"""Selection: exact top-K images per class over every image's top-P rows.

Ties are broken by score descending, then image id ascending, so the result does not depend
on the order the score files are read in. Memory holds the survivors (about C*K rows), as many
rows waiting to be merged with them, and one score file, whatever the pool size.

Across many score files it runs as map -> reduce -> map -> reduce, so the passes over all
rows spread over parallel tasks and only the last step is serial:

1. :func:`histogram` per group of score files: (class, bin) -> row count;
2. :func:`thresholds` over all histograms: per class, the worst bin that can still hold one
   of its K best rows;
3. :func:`keep_candidates` per score file: the rows in or above their class's threshold bin;
4. :func:`select` over those candidates: the exact top-K.

Bins come from a float32's top 12 bits (8 bins per octave): of ``1 - score`` from 0.5 up,
log-spaced in the distance to 1.0, so softmax scores crowded near 1.0 spread over many bins
instead of piling into one; of the score below 0.5, log-spaced towards 0. The candidates stay
close to K per class whether a class's K-th score is 0.9999 or 0.001.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

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


def _checked_scores(score: np.ndarray) -> np.ndarray:
    score = np.ascontiguousarray(score, dtype=np.float32)
    if not (score >= 0).all():  # also catches NaN: a diverged teacher must not look confident
        raise ValueError("Scores must be non-negative numbers (softmax probabilities), but a score file holds a "
                         "negative or NaN score; rescore with a working teacher.")
    return score


def _checked_classes(cls: np.ndarray, num_classes: int) -> np.ndarray:
    if len(cls) and (cls.min() < 0 or cls.max() >= num_classes):
        bad = int(cls.min()) if cls.min() < 0 else int(cls.max())
        raise ValueError(f"A score file names class {bad}, outside the dataset's {num_classes} classes; rescore "
                         "with a teacher trained on this dataset.")
    return cls


def _rank_key(cls: np.ndarray, score: np.ndarray) -> np.ndarray:
    """One uint64 per row that sorts by class ascending, then score descending.

    Non-negative float32 scores order like their bit patterns, so the key needs no float
    compare and ties in (class, score) stay ties: image ids break them later, on few rows.
    """
    score = _checked_scores(score)
    bits = (score + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0
    return (cls.astype(np.uint64) << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - bits.astype(np.uint64))


def _keep_top_k_with_ties(table: pa.Table, k: int) -> tuple[pa.Table, np.ndarray]:
    """Rows ranking in the first k of their class by (class, score) alone, plus every row tying
    with a class's k-th score (image ids decide those at the end); and the per-class k-th key."""
    key = _rank_key(table.column("cls").to_numpy(), table.column("score").to_numpy())
    ranked = np.sort(key)  # only the k-th key per class is needed, not the order itself
    cls_sorted = ranked >> np.uint64(32)
    starts = np.r_[0, np.flatnonzero(np.diff(cls_sorted)) + 1]
    counts = np.diff(np.r_[starts, len(ranked)])
    # per class present: the key of its k-th row, or the largest key when it has fewer than k
    kth = ranked[starts + np.minimum(counts, k) - 1]
    full = counts >= k
    floor_by_class = np.full(int(cls_sorted[-1]) + 1, np.iinfo(np.uint64).max, dtype=np.uint64)
    floor_by_class[cls_sorted[starts[full]].astype(np.int64)] = kth[full]
    row_cls = (key >> np.uint64(32)).astype(np.int64)
    keep = np.flatnonzero(key <= floor_by_class[row_cls])
    return table.take(pa.array(keep)), floor_by_class


MERGE_ROWS = 1 << 20  # small tables wait for this many rows (or the survivors' count) before a merge


def select(tables: Iterable[pa.Table], k: int) -> tuple[pa.Table, dict]:
    """Stream score tables into the exact per-class top-K; returns (selection, {"rows_scored": n}).

    Per table: rows below a class's current K-th key cannot enter and are cut by one vectorised
    compare; the rest wait until they are as many as the survivors (or MERGE_ROWS), then join
    them and are cut back to K per class (plus rows tying with the K-th score) with a numeric
    sort, so many small tables cost no more sorting than a few large ones. One exact sort with
    the image-id tie-break runs at the end, on about C*K rows. Memory: the survivors, as many
    waiting rows, and one table, whatever the pool size.
    """
    survivors: pa.Table | None = None
    floor = np.empty(0, dtype=np.uint64)  # per class: the K-th best key so far, max while < K
    waiting: list[pa.Table] = []
    waiting_rows = rows = 0

    def merge() -> None:
        nonlocal survivors, floor, waiting, waiting_rows
        table = pa.concat_tables(([survivors] if survivors is not None else []) + waiting)
        survivors, floor = _keep_top_k_with_ties(table, k)
        if survivors.num_rows > 2 * k * len(floor):
            # many rows tie at K-th scores (saturated softmax): settle the ties by image id now, so
            # memory stays O(C*K); exact, since a tied row with a larger id can never re-enter
            survivors = top_k_per_class(survivors, k)
        waiting, waiting_rows = [], 0

    columns: list[str] | None = None
    for table in tables:
        rows += table.num_rows
        if table.num_rows == 0:
            continue
        columns = columns or table.column_names
        table = table.select(columns)  # tables may list their columns in another order
        if survivors is not None:
            key = _rank_key(table.column("cls").to_numpy(), table.column("score").to_numpy())
            row_cls = (key >> np.uint64(32)).astype(np.int64)
            if row_cls.max() >= len(floor):
                floor = np.concatenate([floor, np.full(row_cls.max() + 1 - len(floor), np.iinfo(np.uint64).max,
                                                       dtype=np.uint64)])
            passing = np.flatnonzero(key <= floor[row_cls])  # an older floor only cuts less: still exact
            if len(passing) == 0:
                continue  # nothing in this table can rank: the survivors stand
            table = table.take(pa.array(passing))
        waiting.append(table)
        waiting_rows += table.num_rows
        if waiting_rows >= max(MERGE_ROWS, survivors.num_rows if survivors is not None else 0):
            merge()
    if waiting:
        merge()
    if survivors is None:
        raise ValueError("There are no score rows to select from; score the drops first.")
    return top_k_per_class(survivors, k), {"rows_scored": rows}


# bins keep a float32's top 12 bits: sign, exponent and 3 mantissa bits, 8 bins per octave. Finer bins
# cut closer to K (16 bits: 0.2% extra candidates in the 10^8-row benchmark, 12 bits: 3.5%) but make
# histograms as large as the rows they count (1.5M cells per 2M rows at 16 bits, 0.28M at 12)
BIN_SHIFT = 20
HALF_BIN = 0x3F000000 >> BIN_SHIFT  # the bin of 0.5
NUM_BINS = 2 * HALF_BIN + 1  # 0 (score 1.0) ... HALF_BIN (score 0.5) ... 2 * HALF_BIN (score 0)
HIST_SCHEMA = pa.schema([("cls", pa.int32()), ("bin", pa.int32()), ("count", pa.int64())])


def score_bins(score: np.ndarray) -> np.ndarray:
    """Bin of each score (0 is best); a higher score never gets a larger bin.

    From 0.5 up the bins follow the float32 ``1 - score`` (exact there), log-spaced in the distance
    to 1.0, so scores crowded near 1.0 spread over bins a factor 2**(1/8) apart in distance; below
    0.5 they follow the score, log-spaced towards 0. A non-negative float's top bits order like
    its value. Scores above 1.0 (rounding) count as 1.0.
    """
    s = np.minimum(np.asarray(score, dtype=np.float32) + np.float32(0.0), np.float32(1.0))  # -0.0 -> 0.0
    high = (np.float32(1.0) - s).view(np.uint32) >> np.uint32(BIN_SHIFT)
    low = np.uint32(2 * HALF_BIN) - (s.view(np.uint32) >> np.uint32(BIN_SHIFT))
    return np.where(s >= np.float32(0.5), high, low).astype(np.int32)


def bin_floor(bin_: int) -> float:
    """The lowest score that falls in ``bin_``."""
    if bin_ <= HALF_BIN:
        top_distance = np.array([((bin_ + 1) << BIN_SHIFT) - 1], dtype=np.uint32).view(np.float32)[0]
        exact = 1.0 - float(top_distance)  # float64: exact; the float32 above it is the bin's lowest score
        lowest = np.float32(exact)
        return float(max(np.float32(0.5), lowest if float(lowest) >= exact else np.nextafter(lowest, np.float32(1))))
    return float(np.array([(2 * HALF_BIN - bin_) << BIN_SHIFT], dtype=np.uint32).view(np.float32)[0])


def histogram(tables: Iterable[pa.Table]) -> pa.Table:
    """Rows per (class, score bin) over score tables: the map step. Counts go to a dense
    (classes x bins) array, so memory does not grow with the rows (16 MB at 1000 classes)."""
    counts = np.zeros(0, dtype=np.int64)
    for table in tables:
        if table.num_rows == 0:
            continue
        cls = table.column("cls").to_numpy()
        if cls.min() < 0:
            _checked_classes(cls, 0)
        cell = cls.astype(np.int64) * NUM_BINS + score_bins(_checked_scores(table.column("score").to_numpy()))
        add = np.bincount(cell, minlength=len(counts))
        if len(add) > len(counts):
            add[:len(counts)] += counts
            counts = add
        else:
            counts += add
    cells = np.flatnonzero(counts)
    return pa.table({"cls": (cells // NUM_BINS).astype(np.int32), "bin": (cells % NUM_BINS).astype(np.int32),
                     "count": counts[cells]}, schema=HIST_SCHEMA)


REDUCE_BYTES = 256 << 20  # the dense per-class counts of the thresholds step: classes are done in blocks


def thresholds(histograms: Callable[[], Iterable[pa.Table]] | Sequence[pa.Table], k: int, num_classes: int,
               block_bytes: int = REDUCE_BYTES) -> dict:
    """The reduce step: per class, the threshold bin (keep rows with bin <= it), its candidates and rows.

    At least K rows of a class lie in bins up to its threshold, and every row in a later bin
    scores strictly below all of them, so it cannot rank in the top K: the cut loses nothing.
    A class with fewer than K rows keeps them all.

    Counts are summed into a dense (classes x bins) array, ``block_bytes`` of it at a time: with
    more classes than one block holds, ``histograms`` (a sequence, or a function returning a fresh
    iterable) is read once per block of classes.
    """
    if k < 1:
        raise ValueError(f"K must be at least 1, but it is {k}.")
    if not callable(histograms) and not isinstance(histograms, Sequence):
        histograms = list(histograms)  # a one-shot iterable would be empty for the second block of classes
    threshold = np.full(num_classes, -1, dtype=np.int64)  # -1: no row of this class at all
    candidates = np.zeros(num_classes, dtype=np.int64)
    rows = np.zeros(num_classes, dtype=np.int64)
    block = max(1, block_bytes // (NUM_BINS * 8))
    for first in range(0, num_classes, block):
        last = min(num_classes, first + block)
        counts = np.zeros((last - first) * NUM_BINS, dtype=np.int64)
        for hist in (histograms() if callable(histograms) else histograms):
            cls = _checked_classes(hist.column("cls").to_numpy(), num_classes)
            mine = (cls >= first) & (cls < last)
            cell = (cls[mine].astype(np.int64) - first) * NUM_BINS + hist.column("bin").to_numpy()[mine]
            n = hist.column("count").to_numpy()[mine]
            if (np.diff(cell) > 0).all():
                counts[cell] += n  # cells of one histogram are unique (and sorted): a plain add is exact
            else:
                np.add.at(counts, cell, n)
        per_class = counts.reshape(last - first, NUM_BINS)
        total = per_class.sum(axis=1)
        present = total > 0
        running = np.cumsum(per_class, axis=1, out=per_class)  # in place: one block in memory
        reaching = running >= k
        # the first bin whose running count reaches K; a class short of K keeps up to its last row
        at = np.where(reaching[:, -1], reaching.argmax(axis=1), (running < total[:, None]).sum(axis=1))
        threshold[first:last] = np.where(present, at, -1)
        candidates[first:last] = np.where(present, running[np.arange(last - first), at], 0)
        rows[first:last] = total
    return {"k": k, "bin_shift": BIN_SHIFT, "threshold_bin": threshold.tolist(),
            "min_score_kept": [bin_floor(b) if b >= 0 else None for b in threshold.tolist()],
            "candidates": candidates.tolist(), "rows": rows.tolist()}


def keep_candidates(table: pa.Table, threshold_bin: list[int] | np.ndarray) -> pa.Table:
    """The second map step: the rows of a score table that may rank in their class's top K."""
    if table.num_rows == 0:
        return table
    limit = np.asarray(threshold_bin, dtype=np.int64)
    cls = _checked_classes(table.column("cls").to_numpy(), len(limit))
    keep = score_bins(_checked_scores(table.column("score").to_numpy())) <= limit[cls]
    return table.filter(pa.array(keep))


def selection_stats(selection: pa.Table, num_classes: int, k: int, policy: str = "topk") -> dict:
    """Per-class counts, each class's lowest kept score and its shortfall against K (None for the
    threshold policy, which has no K; for noisy_student counted in distinct rows, before the repeats,
    whose number ``duplicated_rows`` gives)."""
    _check_policy(policy)
    counts = np.bincount(selection.column("cls").to_numpy(), minlength=num_classes).tolist()
    thresholds: list[float | None] = [None] * num_classes
    if selection.num_rows:
        grouped = selection.group_by("cls").aggregate([("score", "min")])
        for c, s in zip(grouped.column("cls").to_pylist(), grouped.column("score_min").to_pylist(), strict=True):
            thresholds[c] = float(s)
    stats = {
        "k": k,
        "selected_pairs": selection.num_rows,
        "unique_images": len(pc.unique(selection.column("image_id"))) if selection.num_rows else 0,
        "per_class_count": counts,
        "shortfall": [max(0, k - c) for c in counts],
        "threshold": thresholds,
    }
    if policy == "threshold":
        stats.update(k=None, shortfall=[None] * num_classes)
    elif policy == "noisy_student":
        distinct = distinct_rows(selection)
        unique = np.bincount(distinct.column("cls").to_numpy(), minlength=num_classes).tolist()
        stats.update(distinct_per_class_count=unique, shortfall=[max(0, k - c) for c in unique],
                     duplicated_rows=selection.num_rows - distinct.num_rows)
    return stats


# --- selection policies other than the paper's top-K (the method study) -------------------------------------
#
# ``topk`` (the paper, above) ranks every top-P row. The others label each image with its teacher's top-1
# class only (Noisy Student's rule; an image whose top two scores tie takes the smaller class):
#
# * ``threshold``: every top-1 row scoring at least ``confidence_threshold``; no balancing.
# * ``random``: per class, K rows drawn uniformly among the images whose top-1 class it is (every
#   confidence), a baseline for "does ranking by confidence matter". Drawn among top-1 rows, not
#   top-P rows, so an image is drawn for at most one class and a class is not filled with images
#   the teacher ranks elsewhere. The draw is a seeded hash of the image id, so it does not depend
#   on the order or grouping of the score files; equal draws (24-bit) go to the smaller image id.
# * ``noisy_student``: top-1 rows scoring at least ``confidence_threshold``, then every class brought to
#   exactly K: its K most confident rows when it has more, all of them repeated round-robin up to K
#   when it has fewer (Noisy Student's filter_unlabel.py duplicates with randomized rounding; here the
#   repeats are deterministic). A class without an eligible row stays empty.
#
# Sharded like top-K: the filter map step keeps a group's eligible rows (for random and noisy_student
# only its per-class top K by draw or score, a superset of its part of the global top K, so the select
# step reads at most groups * C * K rows), and :func:`select_by_policy` reduces them.

POLICIES = ("topk", "threshold", "random", "noisy_student")
SCORE_SCHEMA = pa.schema([("image_id", pa.string()), ("cls", pa.int32()), ("score", pa.float32()),
                          ("shard", pa.string())])
DRAW_BITS = 24  # a float32 holds every multiple of 2**-24 in [0, 1) exactly


def top1_rows(table: pa.Table) -> pa.Table:
    """Each image's highest-scoring row (ties: the smaller class), in the table's row order."""
    if table.num_rows == 0:
        return table
    codes = pc.dictionary_encode(table.column("image_id")).combine_chunks().indices.to_numpy()
    score = _checked_scores(table.column("score").to_numpy())
    cls = table.column("cls").to_numpy()
    order = np.lexsort((cls, -score, codes))
    first = np.r_[True, np.diff(codes[order]) != 0]
    return table.take(pa.array(np.sort(order[first])))


def eligible(table: pa.Table, policy: str, confidence_threshold: float) -> pa.Table:
    """The rows a non-top-K policy may pick: top-1 rows, and for threshold and noisy_student only
    those scoring at least ``confidence_threshold``. Idempotent: eligible rows stay eligible."""
    _check_policy(policy, allow_topk=False)
    table = top1_rows(table)
    if policy in ("threshold", "noisy_student") and table.num_rows:
        table = table.filter(pc.greater_equal(table.column("score"), pa.scalar(confidence_threshold, pa.float32())))
    return table


def draws(image_ids: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """A uniform float32 in [0, 1) per image id, fixed by (seed, id): SipHash keyed by the seed."""
    from pandas.util import hash_array

    ids = np.asarray(image_ids.to_pylist() if len(image_ids) else [], dtype=object)
    hashed = hash_array(ids, hash_key=f"{int(seed) % 10**16:016d}", categorize=False)
    return (hashed >> np.uint64(64 - DRAW_BITS)).astype(np.float32) * np.float32(2.0**-DRAW_BITS)


def _by_draw(table: pa.Table, seed: int) -> pa.Table:
    """The table ranked by its draws: ``score`` holds the draw, the teacher's score moves aside."""
    draw = pa.array(draws(table.column("image_id"), seed), pa.float32())
    i = table.schema.get_field_index("score")
    return table.set_column(i, "score", draw).append_column("teacher_score", table.column("score"))


def _by_score(table: pa.Table) -> pa.Table:
    i = table.schema.get_field_index("score")
    return table.set_column(i, "score", table.column("teacher_score")).drop_columns(["teacher_score"])


def _top_k_or_empty(tables: Iterable[pa.Table], k: int, schema: pa.Schema) -> pa.Table:
    """:func:`select`, but no rows at all give an empty table instead of an error."""
    seen = [0]

    def counted():
        for t in tables:
            seen[0] += t.num_rows
            if t.num_rows:
                yield t
    try:
        return select(counted(), k)[0]
    except ValueError:
        if seen[0]:
            raise
        return schema.empty_table()


def _check_policy(policy: str, allow_topk: bool = True) -> None:
    if policy not in POLICIES or (policy == "topk" and not allow_topk):
        raise ValueError(f"Unknown selection policy {policy!r}; use one of {', '.join(POLICIES[not allow_topk:])}.")


def candidates_by_policy(tables: Iterable[pa.Table], policy: str, k: int, seed: int,
                         confidence_threshold: float) -> pa.Table:
    """The filter map step for a non-top-K policy over one group's score tables (see above)."""
    _check_policy(policy, allow_topk=False)
    tables = (eligible(t, policy, confidence_threshold) for t in tables)
    if policy == "threshold":
        parts = [t for t in tables if t.num_rows]
        return pa.concat_tables(parts) if parts else SCORE_SCHEMA.empty_table()
    if policy == "random":
        drawn = _top_k_or_empty((_by_draw(t, seed) for t in tables), k,
                                SCORE_SCHEMA.append(pa.field("teacher_score", pa.float32())))
        return _by_score(drawn)
    return _top_k_or_empty(tables, k, SCORE_SCHEMA)


def select_by_policy(tables: Iterable[pa.Table], policy: str, k: int, seed: int,
                     confidence_threshold: float) -> tuple[pa.Table, dict]:
    """The select reduce step for a non-top-K policy, over score tables or the filter step's candidates
    (the same result either way). Sorted by class, then score descending, then image id, except that
    noisy_student's repeats follow their class's distinct rows. Returns (selection, {"rows_scored": n})."""
    rows = [0]

    def counted():
        for t in tables:
            rows[0] += t.num_rows
            yield t
    picked = candidates_by_policy(counted(), policy, k, seed, confidence_threshold)
    if picked.num_rows:
        picked = picked.sort_by(SORT_KEYS)
    if policy == "noisy_student" and picked.num_rows:
        picked = balance_by_repeating(picked, k)
    return picked, {"rows_scored": rows[0]}


def balance_by_repeating(table: pa.Table, k: int) -> pa.Table:
    """Every class of ``table`` (sorted by class, at most k rows each) brought to exactly k rows: a class
    with n < k rows repeats them round-robin (row j of its block is its row j mod n)."""
    cls = table.column("cls").to_numpy()
    starts = np.r_[0, np.flatnonzero(np.diff(cls)) + 1]
    counts = np.diff(np.r_[starts, len(cls)])
    if (counts > k).any():
        raise ValueError(f"A class has more than K={k} rows to balance; keep its K best first.")
    take = np.concatenate([start + np.arange(k) % n for start, n in zip(starts, counts, strict=True)])
    return table.take(pa.array(take))


def distinct_rows(selection: pa.Table) -> pa.Table:
    """The selection without repeated (image, class) rows, keeping the first of each, in order."""
    if selection.num_rows == 0:
        return selection
    codes = pc.dictionary_encode(selection.column("image_id")).combine_chunks().indices.to_numpy()
    pair = codes.astype(np.int64) * (int(selection.column("cls").to_numpy().max()) + 1) + \
        selection.column("cls").to_numpy()
    _, first = np.unique(pair, return_index=True)
    return selection.take(pa.array(np.sort(first)))
