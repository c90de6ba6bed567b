"""Selection must equal a brute-force oracle, whatever the file order, with ties and multi-class images."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from semisup_tasks.score import SCHEMA, top_p
from semisup_tasks.select import (
    NUM_BINS,
    bin_floor,
    histogram,
    keep_candidates,
    score_bins,
    select,
    selection_stats,
    thresholds,
)


def random_scores(rng: np.random.Generator, images: int, classes: int, p: int) -> pd.DataFrame:
    """Top-P rows per image with scores on a coarse grid, so many ties across images."""
    cls = np.argsort(rng.random((images, classes)), axis=1)[:, :p]
    score = np.sort(np.round(rng.random((images, p)) * 20) / 20, axis=1)[:, ::-1]
    ids = [f"img-{i:05d}" for i in rng.permutation(images)]
    return pd.DataFrame({"image_id": np.repeat(ids, p), "cls": cls.reshape(-1).astype(np.int32),
                         "score": score.reshape(-1).astype(np.float32), "shard": "s"})


def brute_force(df: pd.DataFrame, k: int) -> pd.DataFrame:
    ranked = df.sort_values(["cls", "score", "image_id"], ascending=[True, False, True], kind="mergesort")
    return ranked.groupby("cls", sort=True).head(k).reset_index(drop=True)


@pytest.mark.parametrize("merge_rows", [1, 1 << 20])  # merge after every table, or once at the end
@pytest.mark.parametrize("seed,k,p,files", [(0, 5, 1, 1), (1, 7, 3, 4), (2, 50, 10, 7), (3, 1, 2, 3)])
def test_select_matches_brute_force(seed, k, p, files, merge_rows, monkeypatch):
    import semisup_tasks.select as sel_mod

    monkeypatch.setattr(sel_mod, "MERGE_ROWS", merge_rows)
    rng = np.random.default_rng(seed)
    df = random_scores(rng, images=600, classes=12, p=p)
    assert df.duplicated(["cls", "score"]).any(), "the test needs ties"
    shuffled = df.sample(frac=1, random_state=seed)
    bounds = np.linspace(0, len(df), files + 1).astype(int)
    parts = [shuffled.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    tables = [pa.Table.from_pandas(part, schema=SCHEMA, preserve_index=False) for part in parts]
    got, counts = select(iter(tables), k)
    want = brute_force(df, k)
    assert counts["rows_scored"] == len(df)
    pd.testing.assert_frame_equal(got.to_pandas()[["image_id", "cls", "score"]],
                                  want[["image_id", "cls", "score"]], check_dtype=False)


def test_images_can_be_selected_for_several_classes_and_stats_report_shortfall():
    rows = pa.table({"image_id": ["a", "a", "b", "b", "c", "c"], "cls": [0, 1, 0, 1, 0, 2],
                     "score": [0.6, 0.4, 0.9, 0.1, 0.6, 0.4], "shard": ["s"] * 6}, schema=SCHEMA)
    sel, _ = select([rows], k=2)
    pairs = list(zip(sel.column("image_id").to_pylist(), sel.column("cls").to_pylist(), strict=True))
    # class 0: b (0.9), then a and c tie at 0.6 -> a wins on id
    assert pairs == [("b", 0), ("a", 0), ("a", 1), ("b", 1), ("c", 2)]
    stats = selection_stats(sel, num_classes=4, k=2)
    assert stats["per_class_count"] == [2, 2, 1, 0]
    assert stats["shortfall"] == [0, 0, 1, 2]
    assert stats["unique_images"] == 3
    assert stats["threshold"][0] == pytest.approx(0.6) and stats["threshold"][3] is None


def test_top_p_keeps_the_most_probable_classes():
    import torch

    cls, score = top_p(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]), 2)
    assert cls.tolist() == [[1, 2], [0, 1]] or cls.tolist() == [[1, 2], [0, 2]]
    assert score[0, 0] > score[0, 1] and abs(float(score[1].sum()) - 0.9) < 0.1


def test_metrics_without_test_images_for_a_group_are_none_not_nan():
    import json

    import torch

    from semisup_tasks.evaluate import classification_metrics

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    m = classification_metrics(logits, np.array([0, 0]), tail=[2])  # class 2 has no test image
    assert m["tail_recall"] is None and m["per_class_recall"][2] is None
    assert m["top1"] == 0.5 and m["balanced_accuracy"] == 0.5
    json.dumps(m, allow_nan=False)  # valid JSON


def test_rows_tying_with_the_kth_score_in_a_later_file_still_win_on_image_id():
    first = pa.table({"image_id": ["m", "z"], "cls": [0, 0], "score": [0.5, 0.5], "shard": ["s", "s"]},
                     schema=SCHEMA)
    later = pa.table({"image_id": ["a", "y"], "cls": [0, 0], "score": [0.5, 0.4], "shard": ["s", "s"]},
                     schema=SCHEMA)
    sel, counts = select([first, later], k=2)
    assert sel.column("image_id").to_pylist() == ["a", "m"]
    assert counts["rows_scored"] == 4


def test_saturated_scores_tying_across_many_files_stay_exact_and_bounded(monkeypatch):
    import semisup_tasks.select as sel_mod

    sizes = []
    real = sel_mod._keep_top_k_with_ties
    monkeypatch.setattr(sel_mod, "_keep_top_k_with_ties", lambda t, k: sizes.append(t.num_rows) or real(t, k))
    monkeypatch.setattr(sel_mod, "MERGE_ROWS", 1)
    tables = [pa.table({"image_id": [f"f{f:02d}-{i:04d}" for i in range(1000)], "cls": [0] * 1000,
                        "score": [1.0] * 1000, "shard": ["s"] * 1000}, schema=SCHEMA) for f in range(20)]
    got, _ = select(tables, k=5)
    assert got.column("image_id").to_pylist() == [f"f00-{i:04d}" for i in range(5)]
    assert max(sizes) <= 1000 + 2 * 5  # survivors are settled, not piled up: at most one file plus O(K)


def test_many_small_tables_merge_a_logarithmic_number_of_times(monkeypatch):
    import semisup_tasks.select as sel_mod

    merges = []
    real = sel_mod._keep_top_k_with_ties
    monkeypatch.setattr(sel_mod, "_keep_top_k_with_ties", lambda t, k: merges.append(t.num_rows) or real(t, k))
    monkeypatch.setattr(sel_mod, "MERGE_ROWS", 1)
    df = random_scores(np.random.default_rng(9), images=4000, classes=4, p=1)
    tables = _split(df, 200, 9)  # 20 rows each; K = 10^4 keeps every row, so nothing is ever cut
    got, _ = select(tables, k=10_000)
    assert got.num_rows == 4000
    assert len(merges) <= 10  # waiting rows double the survivors each time, not one merge per table


def _split(df: pd.DataFrame, parts: int, seed: int) -> list[pa.Table]:
    shuffled = df.sample(frac=1, random_state=seed)
    bounds = np.linspace(0, len(df), parts + 1).astype(int)
    return [pa.Table.from_pandas(shuffled.iloc[a:b], schema=SCHEMA, preserve_index=False)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def map_reduce_map(tables: list[pa.Table], k: int, classes: int, groups: int) -> tuple[pa.Table, dict]:
    """The sharded path as the DAG runs it: histograms per group, thresholds, filter per file, select."""
    bounds = np.linspace(0, len(tables), groups + 1).astype(int)
    hists = [histogram(tables[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    cut = thresholds(hists, k, classes)
    survivors = [keep_candidates(t, cut["threshold_bin"]) for t in tables]
    selection, _ = select(survivors, k)
    return selection, cut


@pytest.mark.parametrize("seed,k,p,files,groups", [(0, 5, 1, 1, 1), (1, 7, 3, 8, 3), (2, 50, 10, 7, 7),
                                                   (3, 1, 2, 5, 2), (4, 200, 3, 4, 2)])
def test_map_reduce_map_selection_equals_brute_force(seed, k, p, files, groups):
    rng = np.random.default_rng(seed)
    df = random_scores(rng, images=600, classes=12, p=p)
    got, cut = map_reduce_map(_split(df, files, seed), k, 12, groups)
    want = brute_force(df, k)
    pd.testing.assert_frame_equal(got.to_pandas()[["image_id", "cls", "score"]],
                                  want[["image_id", "cls", "score"]], check_dtype=False)
    assert cut["rows"] == np.bincount(df["cls"], minlength=12).tolist()
    assert all(c >= min(k, r) for c, r in zip(cut["candidates"], cut["rows"], strict=True))


def test_scores_crowded_near_one_spread_over_bins_and_keep_few_candidates():
    # a saturated teacher: 20,000 rows of one class, all within 1e-4 of 1.0, distinct floats
    rng = np.random.default_rng(5)
    score = (1.0 - rng.random(20_000) * 1e-4).astype(np.float32)
    df = pd.DataFrame({"image_id": [f"i{j:05d}" for j in range(len(score))], "cls": np.int32(0),
                       "score": score, "shard": "s"})
    got, cut = map_reduce_map(_split(df, 10, 0), 100, 1, 4)
    assert len(np.unique(score_bins(score))) > 50  # a linear 12-bit histogram would put them all in one bin
    assert 100 <= cut["candidates"][0] < 200  # the threshold bin holds only a few extra rows
    assert cut["min_score_kept"][0] <= float(got.column("score").to_numpy().min())
    pd.testing.assert_frame_equal(got.to_pandas()[["image_id", "cls", "score"]],
                                  brute_force(df, 100)[["image_id", "cls", "score"]], check_dtype=False)


def test_score_bins_never_rank_a_higher_score_worse():
    score = np.sort(np.r_[np.float32([0.0, 1e-30, 0.5, 1.0, 1.0000001]),
                          np.random.default_rng(0).random(10_000).astype(np.float32)])
    bins = score_bins(score)
    assert (np.diff(bins) <= 0).all()
    assert bins.max() == NUM_BINS - 1 and bins.min() == 0


def test_thresholds_for_classes_short_of_k_or_without_rows():
    t = pa.table({"image_id": ["a", "b", "c"], "cls": [0, 0, 2], "score": [0.9, 0.1, 0.5], "shard": ["s"] * 3},
                 schema=SCHEMA)
    cut = thresholds([histogram([t])], k=5, num_classes=3)
    assert cut["threshold_bin"][1] == -1 and cut["min_score_kept"][1] is None
    assert cut["candidates"] == [2, 0, 1] and cut["rows"] == [2, 0, 1]
    assert keep_candidates(t, cut["threshold_bin"]).num_rows == 3
    with pytest.raises(ValueError, match="outside the dataset's 2 classes"):
        thresholds([histogram([t])], k=5, num_classes=2)


def test_bin_floor_is_the_lowest_score_of_its_bin():
    score = np.random.default_rng(1).random(20_000).astype(np.float32)
    bins = score_bins(score)
    for b in np.unique(bins)[::97]:
        assert bin_floor(int(b)) <= score[bins == b].min()
        assert score_bins(np.float32([bin_floor(int(b))]))[0] == b


def test_thresholds_in_class_blocks_equal_one_block_and_read_a_callable_once_per_block():
    rng = np.random.default_rng(7)
    tables = _split(random_scores(rng, images=400, classes=12, p=3), 5, 7)
    hists = [histogram([t]) for t in tables]
    whole = thresholds(hists, 9, 12)
    reads = []

    def source():
        reads.append(1)
        return iter(hists)

    blocked = thresholds(source, 9, 12, block_bytes=5 * NUM_BINS * 8)  # 5 classes per block -> 3 blocks
    assert blocked == whole and len(reads) == 3
    # a histogram with repeated cells (two groups' tables glued together) still sums exactly
    glued = thresholds([pa.concat_tables(hists)], 9, 12)
    assert glued == whole


def test_thresholds_read_a_one_shot_iterable_for_every_block_of_classes():
    tables = _split(random_scores(np.random.default_rng(3), images=300, classes=12, p=2), 4, 3)
    hists = [histogram([t]) for t in tables]
    assert thresholds(iter(hists), 5, 12, block_bytes=4 * NUM_BINS * 8) == thresholds(hists, 5, 12)


def test_select_aligns_tables_whose_columns_come_in_another_order():
    a = pa.table({"image_id": ["a", "b"], "cls": [0, 0], "score": [0.9, 0.8], "shard": ["s", "s"]}, schema=SCHEMA)
    b = pa.table({"score": pa.array([0.95], pa.float32()), "shard": ["t"], "image_id": ["c"],
                  "cls": pa.array([0], pa.int32())})
    got, _ = select([a, b], k=2)
    assert got.column("image_id").to_pylist() == ["c", "a"]


def test_bad_scores_and_classes_are_refused_with_one_sentence():
    nan = pa.table({"image_id": ["a"], "cls": [0], "score": [float("nan")], "shard": ["s"]}, schema=SCHEMA)
    for step in (lambda: histogram([nan]), lambda: keep_candidates(nan, [5])):
        with pytest.raises(ValueError, match="negative or NaN score; rescore"):
            step()
    far = pa.table({"image_id": ["a"], "cls": [7], "score": [0.5], "shard": ["s"]}, schema=SCHEMA)
    with pytest.raises(ValueError, match="names class 7, outside the dataset's 3 classes"):
        keep_candidates(far, [5, 5, 5])
    with pytest.raises(ValueError, match="There are no score rows"):
        select([], k=1)
