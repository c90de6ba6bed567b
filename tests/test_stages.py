"""The stages on a tiny synthetic dataset: the whole pipeline without Airflow, on file:// and S3,
its determinism, idempotent reruns, and the errors a user can cause."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest

from semisup_tasks import datasets
from semisup_tasks.config import ConfigError
from semisup_tasks.images import encode_png
from semisup_tasks.stages import run_pipeline, run_stage
from semisup_tasks.store import Store

CLASSES = ["left", "middle", "right"]
FAST = {"teacher_arch": "cnn_small", "teacher_epochs": 6, "pretrain_epochs": 3, "finetune_epochs": 4,
        "k": 8, "p": 2, "batch_size": 16, "augment": "none", "shards_per_task": 1}


def bar_image(rng: np.random.Generator, cls: int) -> bytes:
    """12x12 grayscale noise with a bright vertical bar whose position is the class."""
    img = rng.integers(0, 60, (12, 12), dtype=np.uint8)
    img[:, 1 + cls * 4:3 + cls * 4] = 255
    return encode_png(img)


def make_tiny(store: Store, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)

    def rows(prefix: str, n: int):
        return [(f"{prefix}-{i}", bar_image(rng, i % 3), i % 3) for i in range(n)]

    datasets.write_dataset(store, "tiny", "v1", CLASSES, 1, [12, 12],
                           {"train": rows("train", 18), "val": rows("val", 9), "test": rows("test", 15)},
                           source="test")
    for drop in ("d1", "d2"):
        labels = [int(c) for c in rng.integers(0, 3, 24)]
        names = [f"img-{i:03d}.png" for i in range(24)]
        datasets.write_drop(store, drop, [(n, bar_image(rng, c)) for n, c in zip(names, labels, strict=True)],
                            source="test", shard_size=10)
        datasets.write_truth(store, drop, [datasets.drop_image_id(drop, n) for n in names], labels)


@pytest.fixture
def store(tmp_path):
    s = Store.from_uri(f"file://{tmp_path}/store")
    make_tiny(s)
    return s


def params(**extra):
    return {"dataset": "tiny", **FAST, **extra}


def test_pipeline_end_to_end_writes_every_output(store):
    result = run_pipeline(store, "r1", params())
    assert set(result["summary"]) == {"teacher", "baseline", "student_pretrained", "student", "oracle"}
    metrics = store.read_json("runs/r1/evaluate/metrics.json")
    # the synthetic classes are easy: a working pipeline learns them
    assert metrics["models"]["teacher"]["top1"] > 0.8
    sel = metrics["selection"]
    assert sel["images_scored"] == 48 and sel["rows_scored"] == 96
    assert sel["per_class_count"] == [8, 8, 8] and sel["shortfall"] == [0, 0, 0]
    assert sel["pseudo_label_precision"] is not None and sel["pseudo_label_precision"] > 0.8
    # one cached score file per drop shard (24 images in shards of 10 -> 3 per drop)
    assert len(store.list("cache/scores")) == 6
    # pre-training read the selection from its shuffled training parts: every selected pair once
    trainset = store.read_json("runs/r1/trainset/manifest.json")
    assert trainset["count"] == sel["selected_pairs"] == 24
    assert metrics["models"]["student_pretrained"]["top1"] > 0.8
    picked = store.read_table("runs/r1/select/selection.parquet")
    parts = [store.read_table(p["key"]) for p in trainset["parts"]]
    assert sorted(zip(*(pa.concat_tables(parts).column(c).to_pylist() for c in ("image_id", "label")), strict=True)) \
        == sorted(zip(*(picked.column(c).to_pylist() for c in ("image_id", "cls")), strict=True))
    for name in ("report.md", "report.html", "per_class_recall.png", "selection_histogram.png"):
        assert store.exists(f"runs/r1/evaluate/{name}")
    # thumbnails of each class's picks for a person to check: 8 per class (4 best, 4 at the threshold)
    from PIL import Image

    grid = Image.open(io.BytesIO(store.read_bytes("runs/r1/select/samples.png")))
    assert grid.size == (8 * 14 * 5, 3 * 14 * 5)  # 12px images + 2px gaps, scaled x5; 3 classes
    assert sel["samples"]["classes"] == [0, 1, 2]
    assert store.read_bytes("runs/r1/evaluate/selection_samples.png") == store.read_bytes("runs/r1/select/samples.png")
    assert "![selected image samples](selection_samples.png)" in store.read_bytes("runs/r1/evaluate/report.md").decode()


def test_same_seed_same_numbers_and_reruns_are_noops(store):
    first = run_pipeline(store, "a", params(oracle=False))
    second = run_pipeline(store, "b", params(oracle=False))
    assert first["summary"] == second["summary"]
    before = store.read_bytes("runs/a/student/model.pt")
    again = run_stage("finetune-student", store, "a", params(oracle=False))
    assert again["model"].endswith("runs/a/student/model.pt")
    assert store.read_bytes("runs/a/student/model.pt") == before  # recorded result, no retraining
    assert run_stage("score", store, "a", params(oracle=False), group=0)["skipped_shards"] == 1


def test_different_seed_changes_the_weights(store):
    for run, seed in (("s0", 0), ("s1", 1)):
        run_stage("plan", store, run, params(seed=seed))
        run_stage("train-teacher", store, run, params(seed=seed))
    assert store.read_bytes("runs/s0/teacher/model.pt") != store.read_bytes("runs/s1/teacher/model.pt")


def test_oracle_is_skipped_without_ground_truth(tmp_path):
    s = Store.from_uri(f"file://{tmp_path}/s")
    make_tiny(s)
    s.delete_prefix("truth")
    run_stage("plan", s, "r", params())
    assert run_stage("train-oracle", s, "r", params())["skipped"] is True


def test_pipeline_on_s3(s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="semisup-e2e")
    s3 = Store.from_uri("s3://semisup-e2e/store")
    make_tiny(s3)
    result = run_pipeline(s3, "on-s3", params(oracle=False, teacher_epochs=2, pretrain_epochs=1,
                                                 finetune_epochs=1))
    assert result["metrics"] == "s3://semisup-e2e/store/runs/on-s3/evaluate/metrics.json"
    # Parquet outputs are plain objects any S3 tool reads
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    selection = pq.read_table("semisup-e2e/store/runs/on-s3/select/selection.parquet", filesystem=fs)
    stats = s3.read_json("runs/on-s3/select/stats.json")
    assert selection.num_rows == stats["selected_pairs"] > 0
    assert set(selection.column_names) >= {"image_id", "cls", "score"}


@pytest.mark.parametrize("bad,message", [
    ({"p": 4}, "p=4 exceeds the 3 classes"),
    ({"k": 0}, "k must be at least 1"),
    ({"teacher_arch": "vgg"}, "teacher_arch must be one of"),
    ({"dataset": "nope"}, "Dataset 'nope'"),
    ({"drops": ["missing"]}, "missing"),
    ({"lr": -1}, "lr must be greater than 0"),
    ({"epochs": 3}, "Unknown parameter"),
])
def test_bad_params_fail_in_plan_with_one_sentence(store, bad, message):
    with pytest.raises(ConfigError, match=message):
        run_stage("plan", store, "bad", {**params(), **bad})
    assert store.list("runs/bad") == []  # nothing written


def test_stages_out_of_order_say_what_to_run_first(store):
    with pytest.raises(ConfigError, match="no plan"):
        run_stage("train-teacher", store, "x", params())
    run_stage("plan", store, "x", params())
    with pytest.raises(ConfigError, match="no teacher model"):
        run_stage("score", store, "x", params(), shards=["drops/d1/shards/part-00000.parquet"])
    with pytest.raises(ConfigError, match="no teacher model"):
        run_stage("thresholds", store, "x", params())
    for stage in ("filter", "select"):
        with pytest.raises(ConfigError, match="no thresholds for these params yet"):
            run_stage(stage, store, "x", params(), group=0)
    with pytest.raises(ConfigError, match="The filter stage needs --group."):
        run_stage("filter", store, "x", params(), shards=["drops/d1/shards/part-00000.parquet"])
    with pytest.raises(ConfigError, match="Unknown stage"):
        run_stage("distill", store, "x", params())


def test_cli_stage_writes_result_file_and_exit_2_on_user_error(store, tmp_path, capsys):
    from semisup_tasks.cli import main

    out = tmp_path / "result.json"
    args = ["stage", "plan", "--store", store.uri, "--run-id", "cli", "--params-json", json.dumps(params()),
            "--result-file", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["drops"] == ["d1", "d2"]
    assert main(["stage", "plan", "--store", store.uri, "--run-id", "cli2",
                 "--params-json", json.dumps(params(p=9))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("semisup: error: Parameter p=9 exceeds")


def test_rerun_with_other_params_never_reads_stale_scores(store):
    run_pipeline(store, "r", params(oracle=True, p=2))
    run_pipeline(store, "r", params(oracle=False, p=1))  # same run id, new params
    metrics = store.read_json("runs/r/evaluate/metrics.json")
    assert metrics["selection"]["p"] == 1
    assert metrics["selection"]["images_scored"] == 48 and metrics["selection"]["rows_scored"] == 48
    assert "oracle" not in metrics["models"]  # the earlier oracle model is not reported


def test_partial_ground_truth_gives_no_oracle_and_no_precision(store):
    store.delete("truth/drops/d2.parquet")
    result = run_stage("plan", store, "p", params())
    assert result["truth"] is False and result["oracle"] is False


def test_dataset_without_test_images_is_refused(tmp_path):
    s = Store.from_uri(f"file://{tmp_path}/s")
    rng = np.random.default_rng(0)
    rows = [(f"t{i}", bar_image(rng, i % 3), i % 3) for i in range(6)]
    datasets.write_dataset(s, "notest", "v1", CLASSES, 1, [12, 12], {"train": rows}, source="test")
    with pytest.raises(ConfigError, match="no test images"):
        run_stage("plan", s, "x", {**params(), "dataset": "notest"})


def test_repeated_drops_are_refused(store):
    with pytest.raises(ConfigError, match="d1 are listed more than once"):
        run_stage("plan", store, "x", params(drops=["d1", "d1"]))


@pytest.mark.parametrize("text", ["5", "[1]", "{bad"])
def test_cli_params_json_must_be_an_object(store, text, capsys):
    from semisup_tasks.cli import main

    assert main(["stage", "plan", "--store", store.uri, "--run-id", "x", "--params-json", text]) == 2
    assert "--params-json" in capsys.readouterr().err


def test_select_says_which_score_files_are_missing(store):
    run_stage("plan", store, "m", params())
    run_stage("train-teacher", store, "m", params())
    with pytest.raises(ConfigError, match="6 score file"):
        run_stage("thresholds", store, "m", params())
    for g in range(run_stage("plan", store, "m", params())["score_groups"]):
        run_stage("score", store, "m", params(), group=g)
    run_stage("thresholds", store, "m", params())
    with pytest.raises(ConfigError, match="6 candidate file"):
        run_stage("select", store, "m", params())


def test_a_new_drop_with_the_same_teacher_scores_only_the_new_shards(store):
    first = params(drops=["d1"], oracle=False)
    run_pipeline(store, "first", first)
    d1_shards = [s["key"] for s in datasets.load_drop_manifest(store, "d1")["shards"]]
    d2_shards = [s["key"] for s in datasets.load_drop_manifest(store, "d2")["shards"]]
    assert len(store.list("cache/scores")) == len(d1_shards)

    second = params(drops=["d1", "d2"], oracle=False)  # same seed and data: the same teacher weights
    run_stage("plan", store, "second", second)
    run_stage("train-teacher", store, "second", second)
    teachers = [store.read_json(f"runs/{r}/teacher/_SUCCESS.json")["result"] for r in ("first", "second")]
    assert teachers[0]["weights_sha256"] == teachers[1]["weights_sha256"]
    old = run_stage("score", store, "second", second, shards=d1_shards)
    new = run_stage("score", store, "second", second, shards=d2_shards)
    assert old["skipped_shards"] == len(d1_shards) and old["images"] == 0
    assert new["skipped_shards"] == 0 and new["images"] == 24
    # scored by shard list, not by group: thresholds builds the groups' histograms from the score files
    assert run_stage("thresholds", store, "second", second)["rows"] == 96  # 48 images, P = 2
    for g in range(run_stage("plan", store, "second", second)["score_groups"]):
        run_stage("filter", store, "second", second, group=g)
    assert run_stage("select", store, "second", second)["selected_pairs"] == 24


def test_sharded_selection_equals_one_pass_over_every_score_file(store):
    from semisup_tasks.select import select

    p = params(k=3, p=2, oracle=False, shards_per_task=1)  # 6 groups of one shard
    run_pipeline(store, "mrm", p)
    cut = store.read_json("runs/mrm/thresholds/thresholds.json")
    assert len(cut["threshold_bin"]) == len(CLASSES) and sum(cut["rows"]) == 96
    assert 3 * len(CLASSES) <= sum(cut["candidates"]) < 96  # the filter dropped rows, kept enough
    scores = [store.read_table(k) for k in store.list("cache/scores")]
    want, _ = select(scores, 3)
    got = store.read_table("runs/mrm/select/selection.parquet")
    assert got.select(["image_id", "cls", "score"]).equals(want.select(["image_id", "cls", "score"]))
    stats = store.read_json("runs/mrm/select/stats.json")
    assert stats["candidates"] == sum(cut["candidates"]) and stats["rows_scored"] == 96


def test_plan_bounds_the_number_of_score_tasks_and_keeps_shard_keys_out_of_its_result(store):
    result = run_stage("plan", store, "g", params(max_score_tasks=4))  # 6 shards, 1 per task wanted
    assert result["score_groups"] == 3 and result["shards_per_group"] == 2 and result["shards"] == 6
    assert "drops/" not in json.dumps(result)
    groups = store.read_json("runs/g/plan/shard_groups.json")
    assert [len(g) for g in groups] == [2, 2, 2]
    run_stage("train-teacher", store, "g", params(max_score_tasks=4))
    assert run_stage("score", store, "g", params(max_score_tasks=4), group=2)["images"] == 14  # d2: 10 + 4
    with pytest.raises(ConfigError, match="Shard group 3 does not exist"):
        run_stage("score", store, "g", params(max_score_tasks=4), group=3)


def test_the_process_entry_point_flushes_output_and_keeps_exit_codes(store):
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "semisup_tasks", "stage", "plan", "--store", store.uri,
                         "--run-id", "proc", "--params-json", json.dumps(params())],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["drops"] == ["d1", "d2"]  # piped stdout arrives whole
    bad = subprocess.run([sys.executable, "-m", "semisup_tasks", "stage", "plan", "--store", store.uri,
                          "--run-id", "proc2", "--params-json", json.dumps(params(k=0))],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "k must be at least 1" in bad.stderr


def test_select_never_reads_thresholds_or_candidates_of_another_k(store):
    small = params(k=2, oracle=False)
    groups = range(run_stage("plan", store, "k", small)["score_groups"])
    run_stage("train-teacher", store, "k", small)
    for g in groups:
        run_stage("score", store, "k", small, group=g)
    run_stage("thresholds", store, "k", small)
    for g in groups:
        run_stage("filter", store, "k", small, group=g)
    assert run_stage("select", store, "k", small)["selected_pairs"] == 6
    large = params(k=20, oracle=False)  # the same run with another K: plan and teacher commit again
    run_stage("plan", store, "k", large)
    run_stage("train-teacher", store, "k", large)
    with pytest.raises(ConfigError, match="no thresholds for these params"):
        run_stage("select", store, "k", large)
    run_stage("thresholds", store, "k", large)
    for g in groups:
        run_stage("filter", store, "k", large, group=g)
    run_stage("select", store, "k", large)
    sel = store.read_table("runs/k/select/selection.parquet")
    scores = pa.concat_tables([store.read_table(k) for k in store.list("cache/scores")])
    assert sel.num_rows == sum(min(20, c) for c in np.bincount(scores.column("cls").to_numpy()))


def test_regrouped_shards_never_reuse_another_grouping_s_histograms(store):
    from semisup_tasks.select import histogram

    one = params(oracle=False, shards_per_task=1)
    groups = run_stage("plan", store, "rg", one)["score_groups"]
    run_stage("train-teacher", store, "rg", one)
    for g in range(groups):
        run_stage("score", store, "rg", one, group=g)
    two = params(oracle=False, shards_per_task=2)  # the same shards, grouped in pairs
    run_stage("plan", store, "rg", two)
    run_stage("train-teacher", store, "rg", two)
    shards = [s for g in store.read_json("runs/rg/plan/shard_groups.json") for s in g]
    run_stage("score", store, "rg", two, shards=shards)  # by shard list: no pair histograms written
    run_stage("thresholds", store, "rg", two)
    cut = store.read_json("runs/rg/thresholds/thresholds.json")
    everything = histogram(store.read_table(k) for k in store.list("cache/scores"))
    rows = np.bincount(everything.column("cls").to_numpy(), weights=everything.column("count").to_numpy())
    assert cut["rows"] == rows.astype(int).tolist()


def test_cli_user_error_is_also_the_pod_termination_message(store, tmp_path, monkeypatch):
    import semisup_tasks.cli as cli

    log = tmp_path / "termination-log"
    log.write_text("")
    monkeypatch.setattr(cli, "TERMINATION_LOG", log)
    assert cli.main(["stage", "plan", "--store", store.uri, "--run-id", "t", "--params-json",
                     json.dumps(params(p=9))]) == 2
    assert log.read_text().startswith("semisup: error: Parameter p=9 exceeds")


def test_a_tampered_model_in_the_store_is_refused_by_the_next_stage(store, tmp_path):
    import io

    import torch
    from test_train import _Planted

    run_stage("plan", store, "t", params())
    run_stage("train-teacher", store, "t", params())
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"arch": "cnn_small", "payload": _Planted(str(marker))}, buf)
    store.write_bytes("runs/t/teacher/model.pt", buf.getvalue())  # someone with write access to the store
    with pytest.raises(ConfigError, match="holds more than weights"):
        run_stage("score", store, "t", params(), group=0)
    assert not marker.exists()


def test_a_class_the_pool_never_shows_is_reported_short_and_the_run_goes_on(tmp_path):
    """The pool holds only 'left' and 'middle' images: with p=1 'right' has no candidate at all."""
    s = Store.from_uri(f"file://{tmp_path}/s")
    make_tiny(s)
    rng = np.random.default_rng(1)
    s.delete_prefix("drops")
    s.delete_prefix("truth")
    datasets.write_drop(s, "two-classes", [(f"img-{i}.png", bar_image(rng, i % 2)) for i in range(30)],
                        source="test", shard_size=10)
    run_pipeline(s, "r", params(oracle=False, p=1, k=6))
    sel = s.read_json("runs/r/evaluate/metrics.json")["selection"]
    assert sel["per_class_count"] == [6, 6, 0] and sel["shortfall"] == [0, 0, 6]
    assert sel["candidates_per_class"][2] == 0
    assert "| classes short of K | 1 (right) |" in s.read_bytes("runs/r/evaluate/report.md").decode()
