"""Semi-weakly supervised teacher: weak labels beside a drop (write, load, import from CSV, the CLI, the
demo's simulated tags) and the teacher pre-trained on them, then fine-tuned on the labeled set."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from semisup_tasks import datasets
from semisup_tasks.cli import main
from semisup_tasks.config import ConfigError, PipelineParams, param_specs
from semisup_tasks.demo import CLASSES, DROPS, build_demo, build_weak_labels
from semisup_tasks.stages import run_stage
from semisup_tasks.store import Store

D1, D2 = DROPS
# a 1-epoch cnn_small teacher on drop 1 only: seconds on two cores
FAST = {"teacher_arch": "cnn_small", "teacher_epochs": 1, "batch_size": 64, "augment": "none", "drops": [D1]}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weak-demo") / "store"
    build_demo(Store.from_uri(f"file://{root}"))
    return root


@pytest.fixture
def store(demo_root: Path, tmp_path: Path) -> Store:
    """A private copy of the demo store: each test may write weak labels into it."""
    shutil.copytree(demo_root, tmp_path / "store")
    return Store.from_uri(f"file://{tmp_path / 'store'}")


def one_sentence(text: str, *fragments: str) -> None:
    assert "\n" not in text and text.endswith("."), text
    assert not re.search(r"[.!?]\s+[A-Z]", text[:-1]), f"more than one sentence: {text}"
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def drop_ids(store: Store, drop_id: str) -> list[str]:
    return [i for s in datasets.load_drop_manifest(store, drop_id)["shards"]
            for i in store.read_table(s["key"], columns=["image_id"]).column("image_id").to_pylist()]


def test_param_defaults_off_and_is_in_the_form_specs():
    assert PipelineParams().weak_pretrain_epochs == 0
    spec = param_specs()["weak_pretrain_epochs"]
    assert (spec["default"], spec["section"], spec["schema"]) == (0, "Training", {"type": "integer", "minimum": 0})
    assert "weak/drops/<id>.parquet" in spec["description"] and "finetune_lr" in spec["description"]
    with pytest.raises(ConfigError, match="weak_pretrain_epochs must be at least 0"):
        PipelineParams.from_dict({"weak_pretrain_epochs": -1})


def test_write_and_load_round_trip(store: Store):
    assert datasets.load_weak_labels(store, DROPS) is None
    ids = drop_ids(store, D1)[:5]
    key = datasets.write_weak_labels(store, D1, ids, [3, -1, 0, 9, 3])
    assert key == datasets.weak_labels_key(D1) == f"weak/drops/{D1}.parquet"
    table = datasets.load_weak_labels(store, DROPS)  # only D1 has them
    assert table.schema == datasets.TRUTH_SCHEMA
    assert table.column("image_id").to_pylist() == ids and table.column("label").to_pylist() == [3, -1, 0, 9, 3]
    assert datasets.load_weak_labels(store, [D2]) is None
    datasets.write_weak_labels(store, D2, ["x"], [1])
    assert datasets.load_weak_labels(store, DROPS).num_rows == 6
    with pytest.raises(ConfigError, match="more than one weak label"):
        datasets.write_weak_labels(store, D1, ["a", "a"], [1, 2])
    with pytest.raises(ConfigError, match="not a class index"):
        datasets.write_weak_labels(store, D1, ["a"], [-2])
    assert datasets.load_weak_labels(store, [D1]).num_rows == 5  # refused writes left the table as it was


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_import_from_csv(store: Store, tmp_path: Path):
    ids = drop_ids(store, D1)
    rel = [i.removeprefix(f"{D1}/") for i in ids]
    src = write_csv(tmp_path / "tags.csv", f'path,label\n{rel[0]},3\n"{rel[1]}", 7 \n{rel[2]},\n\n')
    got = datasets.import_weak_labels(store, D1, src, CLASSES)
    assert got["drop_id"] == D1 and got["weak_labels"].endswith(f"weak/drops/{D1}.parquet")
    assert {k: got[k] for k in ("rows", "images", "labeled", "untagged", "classes_tagged")} == \
        {"rows": 3, "images": len(ids), "labeled": 2, "untagged": len(ids) - 2, "classes_tagged": 2}
    table = datasets.load_weak_labels(store, [D1])
    # parallel to the truth table: every image of the drop, -1 where the file gives no class
    assert table.column("image_id").to_pylist() == ids
    assert table.column("label").to_pylist() == [3, 7] + [-1] * (len(ids) - 2)


BAD_CSV = [  # (case, CSV text ({0}, {1}: paths of the drop), fragments of the one sentence)
    ("unknown class", "path,label\n{0},3\n{1},seven\n", ["Line 3", "'seven'", "not a class of the dataset"]),
    ("unknown path", "path,label\n{0},3\nnope/x.png,1\n", ["Line 3", "'nope/x.png'", "not an image of drop"]),
    ("duplicate path", "path,label\n{0},3\n{1},1\n{0},4\n", ["Line 4", "again (first on line 2)"]),
    ("bad header", "image,class\n{0},3\n", ["not the header path,label"]),
    ("extra field", "path,label\n{0},3,x\n", ["Line 2", "3 field(s)"]),
]


@pytest.mark.parametrize("case, text, fragments", BAD_CSV, ids=[c[0] for c in BAD_CSV])
def test_import_refuses_a_bad_csv_and_writes_nothing(store: Store, tmp_path: Path, case, text, fragments):
    rel = [i.removeprefix(f"{D1}/") for i in drop_ids(store, D1)[:2]]
    src = write_csv(tmp_path / "tags.csv", text.format(*rel))
    before = datasets.write_weak_labels(store, D2, ["kept"], [1])  # another drop's labels stay as they are
    with pytest.raises(ConfigError) as err:
        datasets.import_weak_labels(store, D1, src, CLASSES)
    one_sentence(str(err.value), *fragments)
    assert not store.exists(datasets.weak_labels_key(D1))
    assert datasets.load_weak_labels(store, [D2]).column("image_id").to_pylist() == ["kept"] and before


def test_import_refuses_a_missing_drop_or_file(store: Store, tmp_path: Path):
    src = write_csv(tmp_path / "tags.csv", "path,label\n00000.png,3\n")
    with pytest.raises(ConfigError) as err:
        datasets.import_weak_labels(store, "no-such-drop", src, CLASSES)
    one_sentence(str(err.value), "'no-such-drop' is not in the store", "semisup import-drop")
    with pytest.raises(ConfigError) as err:
        datasets.import_weak_labels(store, D1, str(tmp_path / "missing.csv"), CLASSES)
    one_sentence(str(err.value), "does not exist")
    assert not store.list("weak")


def test_cli_import_weak_labels(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture):
    good = write_csv(tmp_path / "good.csv", "path,label\n00000.png,1\n00001.png,2\n")
    base = ["import-weak-labels", "--store", store.uri, "--drop-id", D1, "--dataset", "mnist-demo"]
    assert main([*base, "--csv", good]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["labeled"], result["rows"]) == (2, 2)
    assert datasets.load_weak_labels(store, [D1]).column("label").to_pylist()[:3] == [1, 2, -1]

    bad = write_csv(tmp_path / "bad.csv", "path,label\n00000.png,1\n00001.png,eleven\n")
    store.delete(datasets.weak_labels_key(D1))
    for args, fragment in (([*base, "--csv", bad], "'eleven'"),
                           ([*base, "--csv", good, "--dataset-version", "v9"], "version v9")):
        assert main(args) == 2
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("semisup: error: ")]
        assert len(errors) == 1 and not captured.out, captured
        one_sentence(errors[0].removeprefix("semisup: error: "), fragment)
    assert not store.exists(datasets.weak_labels_key(D1))

    assert main(["demo-data", "--store", store.uri, "--weak-noise", "0.2"]) == 0  # the demo is there already
    weak = json.loads(capsys.readouterr().out)["weak_labels"]
    assert weak == build_weak_labels(store, noise=0.2) and weak["simulated"]


def test_demo_weak_labels_are_simulated_deterministic_and_as_noisy_as_asked(store: Store):
    first = build_weak_labels(store, noise=0.3, seed=0)
    tables = {d: datasets.load_weak_labels(store, [d]) for d in DROPS}
    again = build_weak_labels(store, noise=0.3, seed=0)  # idempotent: the same labels
    assert again == first and all(datasets.load_weak_labels(store, [d]).equals(t) for d, t in tables.items())
    truth = datasets.load_truth(store, DROPS)
    weak = datasets.load_weak_labels(store, DROPS)
    assert weak.column("image_id").equals(truth.column("image_id"))  # parallel to the truth tables
    t, w = truth.column("label").to_numpy(), weak.column("label").to_numpy()
    assert first["drops"] == {d: datasets.load_drop_manifest(store, d)["count"] for d in DROPS}
    assert first["labeled"] == len(w) and ((w >= 0) & (w < len(CLASSES))).all()  # distractors get a class too
    digits = t >= 0
    assert first["correct_fraction"] == pytest.approx((w[digits] == t[digits]).mean())
    assert abs(first["correct_fraction"] - 0.7) < 0.03
    wrong = w[digits & (w != t)]
    assert len(np.unique(wrong)) == len(CLASSES)  # a flipped tag goes to any other class
    assert build_weak_labels(store, noise=0.3, seed=1) != first
    assert build_weak_labels(store, noise=0.0)["correct_fraction"] == 1.0
    with pytest.raises(ConfigError, match="between 0 and 1"):
        build_weak_labels(store, noise=1.5)


def test_demo_weak_labels_need_the_demo(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        build_weak_labels(Store.from_uri(f"file://{tmp_path}/empty"))
    one_sentence(str(err.value), "semisup demo-data")


def teacher(store: Store, run_id: str, **extra) -> dict:
    params = {**FAST, **extra}
    run_stage("plan", store, run_id, params)
    return run_stage("train-teacher", store, run_id, params)


def test_teacher_pretrained_on_weak_labels_then_finetuned(store: Store):
    import torch

    from semisup_tasks.models import build_model, weights_digest
    from semisup_tasks.train import Recipe, train

    build_weak_labels(store, noise=0.3, seed=0)
    weak = datasets.load_weak_labels(store, [D1])
    labels = weak.column("label").to_numpy().copy()
    labels[200:] = -1  # only 200 tagged images: the untagged are left out, and the test stays fast
    datasets.write_weak_labels(store, D1, weak.column("image_id").to_pylist(), labels.tolist())

    pre = teacher(store, "weak", weak_pretrain_epochs=1)
    summary = pre["train"]
    assert set(summary) == {"weak_pretrain", "finetune", "weak_images", "weak_drops"}
    assert (summary["weak_images"], summary["weak_drops"]) == (200, [D1])  # D2's labels: not in the plan
    assert (summary["weak_pretrain"]["images"], summary["weak_pretrain"]["epochs"]) == (200, 1)
    train_count = datasets.load_dataset_manifest(store, "mnist-demo")["splits"]["train"]["count"]
    assert (summary["finetune"]["images"], summary["finetune"]["epochs"]) == (train_count, 1)
    assert not store.list("runs/weak/teacher/checkpoints")  # both phases' resume points are spent

    off = teacher(store, "off", weak_pretrain_epochs=0)
    default = teacher(store, "default")
    assert pre["weights_sha256"] != off["weights_sha256"]
    assert off["weights_sha256"] == default["weights_sha256"]
    assert "weak_pretrain" not in off["train"]
    # off means the teacher as it was trained before weak labels existed: seed offset 1, lr, teacher_epochs
    p = PipelineParams.from_dict(FAST)
    recipe = Recipe(epochs=p.teacher_epochs, lr=p.lr, batch_size=p.batch_size, optimizer=p.optimizer,
                    weight_decay=p.weight_decay, warmup_epochs=p.warmup_epochs, augment=p.augment,
                    balanced_sampling=p.balanced_sampling, seed=p.seed * 100 + 1)
    ds = datasets.load_dataset_manifest(store, "mnist-demo")
    x, y, _ = datasets.load_split(store, ds, "train")
    torch.manual_seed(recipe.seed)
    model = build_model("cnn_small", 1, len(CLASSES), (28, 28))
    train(model, x, y, recipe)
    assert weights_digest(model) == off["weights_sha256"]


def test_teacher_without_weak_labels_is_one_sentence(store: Store):
    with pytest.raises(ConfigError) as err:
        teacher(store, "none", weak_pretrain_epochs=1)
    one_sentence(str(err.value), f"no weak labels for drops {D1}", "semisup import-weak-labels",
                 "weak_pretrain_epochs=0")
    datasets.write_weak_labels(store, D2, drop_ids(store, D2)[:3], [1, 2, 3])  # another drop's: not the plan's
    with pytest.raises(ConfigError, match=f"no weak labels for drops {D1} "):
        teacher(store, "none", weak_pretrain_epochs=1)
    datasets.write_weak_labels(store, D1, drop_ids(store, D1)[:3], [-1, -1, -1])  # none usable
    with pytest.raises(ConfigError) as err:
        teacher(store, "none", weak_pretrain_epochs=1)
    one_sentence(str(err.value), "tag no image", "weak_pretrain_epochs=0")
    assert not store.exists("runs/none/teacher/_SUCCESS.json")
