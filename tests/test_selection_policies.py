"""Selection policies side by side (issue 7): threshold, random and Noisy Student's balancing, each
against a brute-force reference on hand-built score tables, and one whole pipeline run per policy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from test_stages import CLASSES, make_tiny, params

from semisup_tasks.config import ConfigError, PipelineParams, param_specs
from semisup_tasks.select import (
    POLICIES,
    SCORE_SCHEMA,
    balance_by_repeating,
    candidates_by_policy,
    draws,
    select_by_policy,
    selection_stats,
)
from semisup_tasks.stages import run_pipeline
from semisup_tasks.store import Store

NUM_CLASSES = 5


def score_tables(seed: int = 0, images: int = 300, p: int = 3, groups: int = 4) -> list[pa.Table]:
    """Score tables as the score stage writes them (P rows per image), rows shuffled within a table,
    scores on a 0.01 grid so ties happen; class 4 is rare as a top-1 class."""
    rng = np.random.default_rng(seed)
    tables = []
    for g in range(groups):
        ids, cls, score = [], [], []
        for i in range(images // groups):
            weights = np.array([1, 1, 1, 1, 0.05])
            classes = rng.choice(NUM_CLASSES, size=p, replace=False, p=weights / weights.sum())
            s = np.sort(np.round(rng.dirichlet(np.ones(NUM_CLASSES))[:p] * 2, 2).clip(0, 1))[::-1]
            ids += [f"g{g}-img-{i:04d}"] * p
            cls += classes.tolist()
            score += s.tolist()
        order = rng.permutation(len(ids))
        tables.append(pa.table({"image_id": np.asarray(ids, dtype=object)[order].tolist(),
                                "cls": np.asarray(cls, dtype=np.int32)[order],
                                "score": np.asarray(score, dtype=np.float32)[order],
                                "shard": [f"shard-{g}"] * len(ids)}, schema=SCORE_SCHEMA))
    return tables


def reference_top1(tables: list[pa.Table]) -> pd.DataFrame:
    df = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    df = df.sort_values(["image_id", "score", "cls"], ascending=[True, False, True])
    return df.drop_duplicates("image_id").reset_index(drop=True)


def in_order(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["cls", "score", "image_id"], ascending=[True, False, True]).reset_index(drop=True)


def as_rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in ("image_id", "cls", "score", "shard")), strict=True))


def df_rows(df: pd.DataFrame) -> list[tuple]:
    return [(r.image_id, int(r.cls), float(np.float32(r.score)), r.shard) for r in df.itertuples()]


def sharded(tables, policy, k, seed=0, t=0.3):
    """The pipeline's flow: the filter step per group of tables, then the select step over its outputs."""
    cands = [candidates_by_policy(tables[i:i + 2], policy, k, seed, t) for i in range(0, len(tables), 2)]
    return select_by_policy(cands, policy, k, seed, t)[0]


@pytest.mark.parametrize("t", [0.0, 0.3, 0.55, 1.0])
def test_threshold_keeps_exactly_the_top1_rows_at_or_above_t(t):
    tables = score_tables()
    top1 = reference_top1(tables)
    want = in_order(top1[top1.score >= np.float32(t)])
    got, info = select_by_policy(tables, "threshold", 10, 0, t)
    assert as_rows(got) == df_rows(want)
    assert info["rows_scored"] == sum(x.num_rows for x in tables)
    assert as_rows(sharded(tables, "threshold", 10, t=t)) == df_rows(want)
    # unbalanced: no K cuts a class
    stats = selection_stats(got, NUM_CLASSES, 10, "threshold")
    assert stats["per_class_count"] == np.bincount(want.cls, minlength=NUM_CLASSES).tolist()
    assert stats["k"] is None and stats["shortfall"] == [None] * NUM_CLASSES


def test_random_draws_k_per_class_among_top1_rows_fixed_by_the_seed():
    tables, k = score_tables(), 10
    top1 = reference_top1(tables)
    got, _ = select_by_policy(tables, "random", k, 7, 0.3)
    df = got.to_pandas()
    available = top1.cls.value_counts().to_dict()
    assert df.cls.value_counts().to_dict() == {c: min(k, n) for c, n in available.items()}
    assert min(available.values()) < k < max(available.values())  # both cases are exercised
    eligible = set(df_rows(top1))  # every confidence is eligible, but only the top-1 class
    assert set(df_rows(df)) <= eligible and len(set(df.image_id)) == len(df)
    # brute force: per class the K largest draws (ties: smaller id), sorted for output like the others
    top1 = top1.assign(draw=draws(pa.array(top1.image_id), 7))
    want = top1.sort_values(["cls", "draw", "image_id"], ascending=[True, False, True]).groupby("cls").head(k)
    assert as_rows(got) == df_rows(in_order(want))
    # same seed, same rows, whatever the table order or grouping; another seed, other rows
    assert as_rows(select_by_policy(tables[::-1], "random", k, 7, 0.3)[0]) == as_rows(got)
    assert as_rows(sharded(tables, "random", k, seed=7)) == as_rows(got)
    assert set(as_rows(select_by_policy(tables, "random", k, 8, 0.3)[0])) != set(as_rows(got))
    # a random draw does not follow confidence: picks are not the top-K by score
    assert set(as_rows(got)) != set(df_rows(in_order(top1).groupby("cls").head(k)))


def test_draws_are_uniform_and_depend_only_on_seed_and_id():
    ids = pa.array([f"img-{i}" for i in range(20000)])
    d = draws(ids, 3)
    assert d.dtype == np.float32 and 0 <= d.min() and d.max() < 1
    assert abs(float(d.mean()) - 0.5) < 0.01 and np.histogram(d, bins=10, range=(0, 1))[0].min() > 1800
    assert np.array_equal(draws(ids.slice(100, 5), 3), d[100:105])
    assert not np.array_equal(draws(ids, 4), d)


@pytest.mark.parametrize("k", [3, 12, 40])
def test_noisy_student_brings_every_eligible_class_to_exactly_k(k):
    tables, t = score_tables(), 0.3
    top1 = reference_top1(tables)
    ok = in_order(top1[top1.score >= np.float32(t)])
    got, _ = select_by_policy(tables, "noisy_student", k, 0, t)
    df = got.to_pandas()
    present = sorted(ok.cls.unique())
    assert sorted(df.cls.unique()) == present  # no class invented, none lost
    assert df.cls.value_counts().to_dict() == {c: k for c in present}
    want = []
    for c in present:
        rows = df_rows(ok[ok.cls == c])
        # over K: the K most confident; under: all of them, repeated round-robin up to K
        want += rows[:k] if len(rows) >= k else [rows[j % len(rows)] for j in range(k)]
    assert as_rows(got) == want
    assert as_rows(sharded(tables, "noisy_student", k)) == want
    stats = selection_stats(got, NUM_CLASSES, k, "noisy_student")
    unique = [min(k, int((ok.cls == c).sum())) for c in range(NUM_CLASSES)]
    assert stats["distinct_per_class_count"] == unique
    assert stats["shortfall"] == [k - u for u in unique]
    assert stats["duplicated_rows"] == got.num_rows - sum(unique)
    assert (stats["duplicated_rows"] > 0) == (k > min(unique[c] for c in present))


def test_noisy_student_with_no_eligible_row_selects_nothing():
    tables = [t.set_column(2, "score", pa.array(np.minimum(t.column("score").to_numpy(), 0.29), pa.float32()))
              for t in score_tables()]
    got, _ = select_by_policy(tables, "noisy_student", 5, 0, 0.3)  # no top-1 score reaches 0.3
    assert got.num_rows == 0 and got.schema.names == SCORE_SCHEMA.names
    assert selection_stats(got, NUM_CLASSES, 5, "noisy_student")["shortfall"] == [5] * NUM_CLASSES


def test_balance_by_repeating_round_robin():
    table = pa.table({"image_id": ["a", "b", "c", "d"], "cls": pa.array([0, 0, 2, 2], pa.int32()),
                      "score": pa.array([.9, .8, .7, .6], pa.float32())})
    got = balance_by_repeating(table, 3)
    assert got.column("image_id").to_pylist() == ["a", "b", "a", "c", "d", "c"]
    with pytest.raises(ValueError, match="more than K"):
        balance_by_repeating(table, 1)


def test_params_policy_enum_matches_the_module_and_threshold_is_bounded():
    specs = param_specs()
    assert specs["selection_policy"]["default"] == "topk"
    assert tuple(specs["selection_policy"]["schema"]["enum"]) == POLICIES
    assert PipelineParams.from_dict({"confidence_threshold": 1}).confidence_threshold == 1.0
    with pytest.raises(ConfigError, match="confidence_threshold must be at most 1"):
        PipelineParams.from_dict({"confidence_threshold": 1.5})
    with pytest.raises(ConfigError, match="selection_policy must be one of"):
        PipelineParams.from_dict({"selection_policy": "top-k"})


@pytest.mark.parametrize("policy,extra", [("threshold", {"confidence_threshold": 0.5}),
                                          ("random", {"k": 5, "seed": 3}),
                                          ("noisy_student", {"k": 20})])  # 48 images, 3 classes: repeats
def test_pipeline_trains_the_student_on_what_the_policy_selected(tmp_path, policy, extra):
    store = Store.from_uri(f"file://{tmp_path}/store")
    make_tiny(store)
    p = params(selection_policy=policy, oracle=False, **extra)
    run_pipeline(store, "pol", p)
    selection = store.read_table("runs/pol/select/selection.parquet")
    stats = store.read_json("runs/pol/select/stats.json")
    trainset = store.read_json("runs/pol/trainset/manifest.json")
    assert stats["policy"] == policy and stats["images_scored"] == 48
    assert trainset["count"] == selection.num_rows == stats["selected_pairs"] > 0
    assert sum(stats["per_class_count"]) == selection.num_rows
    scores = [store.read_table(k) for k in store.list("cache/scores")]
    want, _ = select_by_policy(scores, policy, p["k"], p.get("seed", 0), p.get("confidence_threshold", 0.3))
    assert as_rows(selection) == as_rows(want)  # the sharded flow equals one pass over the score files
    if policy == "threshold":
        assert min(selection.column("score").to_pylist()) >= 0.5 and stats["k"] is None
        assert selection.num_rows == len(set(selection.column("image_id").to_pylist()))
    elif policy == "random":
        assert stats["per_class_count"] == [5] * len(CLASSES)
    else:
        assert stats["per_class_count"] == [20] * len(CLASSES) and stats["duplicated_rows"] > 0
        assert stats["duplicated_rows"] == selection.num_rows - stats["unique_images"]
    metrics = store.read_json("runs/pol/evaluate/metrics.json")
    assert metrics["models"]["student"]["top1"] is not None


def test_a_threshold_nothing_reaches_ends_in_one_sentence_naming_the_threshold(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    make_tiny(store)
    with pytest.raises(ConfigError, match="selection is empty.*lower confidence_threshold"):
        run_pipeline(store, "r", params(oracle=False, selection_policy="threshold", confidence_threshold=1.0,
                                        teacher_epochs=1, pretrain_epochs=1, finetune_epochs=1))
    stats = store.read_json("runs/r/select/stats.json")
    assert stats["policy"] == "threshold" and stats["selected_pairs"] == 0
