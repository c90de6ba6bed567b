"""The experiments grid without Airflow: expanding and checking grids, the sharing plan, nested pool
fractions, the statistics behind the verdicts, a failing cell recorded instead of crashing, and the CLI.
(The whole ``ci`` grid runs through Airflow in ``tests/dags/test_experiments_dag_run.py``.)"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from semisup_tasks import datasets, experiments, reproduction
from semisup_tasks.cli import main
from semisup_tasks.config import ConfigError
from semisup_tasks.demo import DROPS, build_demo
from semisup_tasks.images import encode_png
from semisup_tasks.store import Store


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Store:
    store = Store.from_uri(f"file://{tmp_path_factory.mktemp('exp')}/store")
    build_demo(store)
    return store


@pytest.mark.parametrize(("grid", "message"), [
    ({"seeds": []}, "Grid seeds must be a list of distinct non-negative integers"),
    ({"seeds": [0, 0]}, "Grid seeds must be a list of distinct non-negative integers"),
    ({"studies": {"k": [10, 0]}}, "Parameter k must be at least 1, got 0."),
    ({"studies": {"selection_polcy": ["random"]}}, "selection_polcy (did you mean selection_policy?)"),
    ({"studies": {"k": []}}, "Grid studies must map a param name to a non-empty list of values."),
    ({"studies": {"pool_fraction": [0.5, 0]}}, "Grid value pool_fraction must be a number in (0, 1], got 0."),
    ({"base": {"seed": 3}}, "Grid param seed is set by the experiment itself"),
    ({"base": {"drops": ["d"]}}, "Grid param drops is set by the experiment itself"),
    ({"sedes": [1]}, "Unknown grid key(s) sedes"),
    ({"transfer": {"epochs": 3}}, "Grid transfer must be null or"),
])
def test_a_bad_grid_is_refused_in_one_sentence(grid, message):
    with pytest.raises(ConfigError) as err:
        experiments.load_grid(grid)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_named_and_file_grids_load_and_a_missing_one_is_named(tmp_path):
    assert experiments.load_grid("ci")["studies"] == experiments.CI_GRID["studies"]
    assert experiments.load_grid("full")["base"]["teacher_arch"] == "resnet50"  # every named grid is valid
    assert experiments.load_grid("noisy_student")["studies"]["soft_labels"] == [False, True]
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"base": {"k": 7}, "studies": {"p": [1, 2]}}))
    assert experiments.load_grid(str(path))["base"] == {"k": 7}
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        experiments.load_grid(str(path))
    with pytest.raises(ConfigError, match="neither a named grid"):
        experiments.load_grid("no-such-grid")


def test_a_study_value_equal_to_the_base_is_the_base_setting_run_once():
    grid = experiments.load_grid({"base": {"k": 40}, "studies": {"k": [20, 40], "weak_pretrain_epochs": [0, 2],
                                                                 "pool_fraction": [0.5, 1.0]}})
    settings = experiments._settings(grid)
    assert len(settings) == 4  # base (= k 40 = weak 0 = pool 1.0), k 20, weak 2, pool 0.5
    same = experiments.load_grid({"studies": {"pool_fraction": [1, 1.0]}})
    assert len(experiments._settings(same)) == 1  # 1 and 1.0 are one setting
    base_points = settings[0][1]
    assert sorted(base_points) == [("k", 40), ("pool_fraction", 1.0), ("weak_pretrain_epochs", 0)]


@pytest.mark.parametrize(("name", "base", "study", "teachers", "baselines"), [
    ("lr", {}, {"lr": [0.05, 0.1]}, 2, 1),  # the teacher's learning rate: two teachers, one baseline
    ("ft", {}, {"finetune_lr": [0.03, 0.01]}, 1, 2),  # fine-tuning's: one teacher, two baselines
    ("weak-ft", {"weak_pretrain_epochs": 1}, {"finetune_lr": [0.03, 0.01]}, 2, 2),  # a weak teacher is fine-tuned
    ("arch", {}, {"k": [10, 20], "student_arch": ["cnn_medium"]}, 1, 2),
])
def test_cells_share_a_model_exactly_when_its_inputs_are_equal(demo_store, name, base, study, teachers, baselines):
    grid = {"seeds": [0], "base": {"k": 20, **base}, "studies": study, "transfer": None}
    experiments.prepare(demo_store, f"share-{name}", grid)
    plan = experiments.load_plan(demo_store, f"share-{name}")
    kinds = Counter(s["kind"] for s in plan["shared"].values())
    assert kinds == {"teacher": teachers, "baseline": baselines}
    assert {c["params"]["dataset_version"] for c in plan["cells"].values()} == {"v1"}  # "latest" pinned


def test_the_default_grid_shares_teachers_baselines_and_oracles(demo_store):
    ids = experiments.prepare(demo_store, "plan-only", "default")
    plan = experiments.load_plan(demo_store, "plan-only")
    grid = plan["grid"]
    seeds = len(grid["seeds"])
    # 1 base + 3 K + 4 P + 2 pool + 2 teachers + 2 pre-training lengths + 3 policies + 1 weak
    assert len(ids["cells"]) == 18 * seeds
    kinds = Counter(s["kind"] for s in plan["shared"].values())
    # a teacher per architecture and seed, plus the weakly pre-trained one; one baseline and oracle per seed
    assert kinds == {"teacher": 4 * seeds, "baseline": seeds, "oracle": seeds}
    assert sum(c["base"] for c in plan["cells"].values()) == seeds
    for cell in plan["cells"].values():  # cells equal in the teacher's inputs use the same teacher
        teacher = plan["shared"][cell["uses"]["teacher"]]["params"]
        for field in ("teacher_arch", "seed", "teacher_epochs", "weak_pretrain_epochs"):
            assert teacher[field] == cell["params"][field]
    assert ids["transfer"] == [str(s) for s in grid["seeds"]]
    assert datasets.load_weak_labels(demo_store, DROPS) is not None  # simulated tags for the weak study
    assert datasets.load_dataset_manifest(demo_store, "shapes-demo")["classes"]  # the transfer target
    # the same id with another grid is refused; with the same grid it is found again
    assert experiments.prepare(demo_store, "plan-only", "default") == ids
    with pytest.raises(ConfigError, match="already exists .* with another grid"):
        experiments.prepare(demo_store, "plan-only", "ci")


def test_pool_fractions_are_nested_subsets_with_their_truth(demo_store):
    half = experiments._fraction_drops(demo_store, list(DROPS), 0.5)
    quarter = experiments._fraction_drops(demo_store, list(DROPS), 0.25)
    assert experiments._fraction_drops(demo_store, list(DROPS), 1.0) == list(DROPS)
    for drop, h, q in zip(DROPS, half, quarter, strict=True):
        full_truth = datasets.load_truth(demo_store, [drop])
        truth = {i.split("/", 1)[1]: label for i, label in zip(full_truth.column("image_id").to_pylist(),
                                                              full_truth.column("label").to_pylist(), strict=True)}
        rel = {}
        for derived in (h, q):
            t = datasets.load_truth(demo_store, [derived])
            rel[derived] = {i.split("/", 1)[1]: label for i, label in
                            zip(t.column("image_id").to_pylist(), t.column("label").to_pylist(), strict=True)}
            assert datasets.load_drop_manifest(demo_store, derived)["count"] == len(rel[derived])
            assert all(truth[k] == v for k, v in rel[derived].items())  # the same images keep their labels
        assert set(rel[q]) < set(rel[h]) < set(truth)
        assert abs(len(rel[h]) / len(truth) - 0.5) < 0.05 and abs(len(rel[q]) / len(truth) - 0.25) < 0.05
        # the same image bytes, and the weak labels carried along
        originals = {}
        for shard in datasets.load_drop_manifest(demo_store, drop)["shards"]:
            t = demo_store.read_table(shard["key"], columns=["image_id", "image"])
            originals.update(zip(t.column("image_id").to_pylist(), t.column("image").to_pylist(), strict=True))
        for shard in datasets.load_drop_manifest(demo_store, q)["shards"]:
            t = demo_store.read_table(shard["key"], columns=["image_id", "image"])
            for image_id, image in zip(t.column("image_id").to_pylist(), t.column("image").to_pylist(), strict=True):
                assert originals[f"{drop}/{image_id.split('/', 1)[1]}"] == image
        weak = datasets.load_weak_labels(demo_store, [q])
        assert weak is not None and weak.num_rows == len(rel[q])
    # copies are never pooled by a run over every drop
    assert datasets.list_drops(demo_store) == list(DROPS)
    assert quarter == [f"{d}-pool-0.25" for d in DROPS]


def test_a_reused_pool_drop_follows_its_source_labels_and_a_lookalike_is_refused(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}/store")
    build_demo(store)
    derived = experiments._fraction_drops(store, [DROPS[0]], 0.5)[0]
    assert datasets.load_weak_labels(store, [derived]) is None  # the source had no tags yet
    from semisup_tasks.demo import build_weak_labels

    build_weak_labels(store, noise=0.3)
    assert experiments._fraction_drops(store, [DROPS[0]], 0.5) == [derived]  # reused, not rewritten
    tags = datasets.load_weak_labels(store, [derived])
    source = datasets.load_weak_labels(store, [DROPS[0]])
    by_id = dict(zip(source.column("image_id").to_pylist(), source.column("label").to_pylist(), strict=True))
    assert tags is not None and tags.num_rows == datasets.load_drop_manifest(store, derived)["count"]
    assert all(by_id[f"{DROPS[0]}/{i.split('/', 1)[1]}"] == label
               for i, label in zip(tags.column("image_id").to_pylist(), tags.column("label").to_pylist(), strict=True))
    # a pool keeps its drop's landing day, so drops_since selects the two alike
    from semisup_tasks.ingest import drop_date

    dated = datasets.write_drop(store, "dated", [(f"{i}.png", encode_png(np.full((4, 4), i, np.uint8)))
                                                 for i in range(40)], source="test", date="2026-03-02")
    assert dated["date"] == "2026-03-02"
    pool = experiments._fraction_drops(store, ["dated"], 0.5)[0]
    assert drop_date(pool, datasets.load_drop_manifest(store, pool)) == "2026-03-02"
    # a real drop that only looks like a pool of another is never taken for one
    datasets.write_drop(store, f"{DROPS[1]}-pool-0.5", [("a.png", b"x")], source="test")
    with pytest.raises(ConfigError, match="exists but is not the 0.5 pool of drop"):
        experiments._fraction_drops(store, [DROPS[1]], 0.5)


def test_a_cell_before_its_shared_teacher_fails_without_recording_anything(demo_store):
    ids = experiments.prepare(demo_store, "early", {"seeds": [0], "base": {"k": 20}, "transfer": None})
    with pytest.raises(ConfigError, match="is not trained yet; run its shared job first"):
        experiments.run_cell(demo_store, "early", ids["cells"][0])
    assert not demo_store.exists(f"experiments/early/cells/{ids['cells'][0]}.json")  # a retry will run it


def test_statistics_and_verdicts():
    assert experiments.mean_std([0.5, 0.7, 0.9]) == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2), "n": 3}
    assert experiments.mean_std([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}
    diff = experiments.paired_difference({0: 0.9, 1: 0.8, 2: 0.85, 3: 0.5}, {0: 0.8, 1: 0.75, 2: 0.7})
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(0.1)
    assert diff["se"] == pytest.approx(math.sqrt(((0 ** 2) + 0.05 ** 2 + 0.05 ** 2) / 2) / math.sqrt(3))
    # 95% t-interval with 2 degrees of freedom: mean ± 4.303 se
    assert reproduction.verdict({"mean": 0.1, "se": 0.02, "n": 3}) == "agrees"
    assert reproduction.verdict({"mean": 0.1, "se": 0.03, "n": 3}) == "same direction, within noise"
    assert reproduction.verdict({"mean": -0.1, "se": 0.02, "n": 3}) == "disagrees"
    assert reproduction.verdict({"mean": -0.01, "se": 0.02, "n": 3}) == "opposite direction, within noise"
    assert reproduction.verdict({"mean": 0.1, "se": float("nan"), "n": 1}) == "one seed only: no verdict"
    assert reproduction.verdict({"mean": 0.0, "se": 0.0, "n": 3}) == "no difference"
    assert reproduction._t95(3) == 4.303 and reproduction._t95(14) == 2.179  # 13 df: the 12-df quantile, wider


def _point(value, per_seed):
    return {"value": value, "per_seed": {"student.top1": per_seed}, "errors": [],
            "summary": {"student.top1": experiments.mean_std(list(per_seed.values()))}}


@pytest.mark.parametrize(("means", "expected"), [
    ((0.80, 0.90, 0.85), "agrees"),  # best in the middle, both ends clearly lower
    ((0.80, 0.85, 0.90), "disagrees"),  # best at the largest K, clearly
    ((0.80, 0.90, 0.901), "opposite direction, within noise"),  # best at the largest K, by noise
    ((0.80, 0.90, 0.899), "same direction, within noise"),
])
def test_the_k_verdict_reads_where_the_best_k_lies(means, expected):
    noise = (0.0, 0.004, -0.004)  # seed-to-seed noise that differs between settings: a paired se > 0
    points = [_point(k, {s: m + noise[(s + i) % 3] for s in range(3)})
              for i, (k, m) in enumerate(zip((50, 100, 200), means, strict=True))]
    results = {"studies": {"k": points}, "base": {}, "transfer": {"per_seed": {}}}
    finding = next(f for f in reproduction.FINDINGS if f.id == "k-optimum")
    assert reproduction.measure(finding, results, {"base": {}})[1] == expected


def test_a_cell_that_selects_nothing_is_recorded_and_the_rest_aggregates(demo_store, tmp_path, capsys):
    grid = {"seeds": [0], "base": {**{k: v for k, v in experiments.CI_GRID["base"].items()}, "teacher_epochs": 1,
                                   "confidence_threshold": 1.0},
            "studies": {"selection_policy": ["topk", "threshold"]}, "transfer": None}
    summary = experiments.run_experiment(demo_store, "empty-cell", grid)
    results = demo_store.read_json("experiments/empty-cell/results.json")
    (top, threshold) = results["studies"]["selection_policy"]
    assert threshold["errors"] and "The selection is empty" in threshold["errors"][0]
    assert top["errors"] == [] and 0 <= top["summary"]["student.top1"]["mean"] <= 1
    assert summary["errors"] == 1 and summary["cells"] == 2
    text = demo_store.read_bytes("experiments/empty-cell/REPRODUCTION.md").decode()
    assert "| threshold (1 failed: The selection is empty" in text
    # aggregate again with a note for one finding: the note shows, nothing else changes
    experiments.aggregate(demo_store, "empty-cell", notes={"rec5-balanced": "the threshold kept nothing"})
    again = demo_store.read_bytes("experiments/empty-cell/REPRODUCTION.md").decode()
    assert "the threshold kept nothing |" in again
    assert again.replace(" the threshold kept nothing |", "  |") == text

    # the CLI copies what a repository commits
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["experiments", "export", "--store", demo_store.uri, "--experiment", "empty-cell",
                 "--to", str(out)]) == 0
    exported = json.loads(capsys.readouterr().out)["exported"]
    assert (out / "REPRODUCTION.md").read_text().startswith("# Reproducing the paper's findings")
    assert (out / "plots" / "study-selection_policy.png").read_bytes()[:4] == b"\x89PNG"
    assert len(exported) == 3  # REPRODUCTION.md, results.json, one plot


def test_the_cli_refuses_in_one_sentence(demo_store, capsys):
    assert main(["experiments", "aggregate", "--store", demo_store.uri, "--experiment", "never-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Experiment 'never-run' is not in" in err[0]
    assert main(["experiments", "run", "--store", demo_store.uri, "--experiment", "bad id!"]) == 2
    assert "The experiment id 'bad id!' is not valid" in capsys.readouterr().err
    assert main(["experiments", "export", "--store", demo_store.uri, "--experiment", "never-run"]) == 2
