"""The paper's study in miniature: a grid of pipeline configurations over the same data, each run with
several seeds, aggregated into mean ± std per setting, plots and ``REPRODUCTION.md``.

A grid names a base configuration and *studies*: each study varies one knob (K, P, the pool fraction,
the teacher architecture, pre-training epochs, the selection policy, weak pre-training of the teacher)
over a list of values with everything else at the base. Every (setting, seed) is a *cell*: one pipeline
run through the real stages (``runs/exp-<experiment>-<cell>/``). Settings shared by several studies
(the base is in all of them) run once.

What the grid allows is shared instead of redone:

- the teacher, per (architecture, seed, teacher recipe): trained once in a shared run, then adopted by
  every cell that uses it, so their scores come from the same content-addressed score cache;
- the supervised baseline per (student architecture, seed), and the oracle per seed (base setting);
- with the fine-tuning stage and without it come from the same run (the pre-trained student is
  evaluated before it is fine-tuned), so that study costs nothing extra.

The pool fraction keeps a nested subset of every drop (by a hash of the image id: the 25% pool is
inside the 50% pool), written once as derived drops ``<drop>-pool-<fraction>`` with their truth and weak
labels (copied again whenever an experiment uses them, so they follow the source drop's).

Everything lives under ``experiments/<experiment>/`` in the store: ``grid.json`` (the expanded plan),
``shared/<job>.json``, ``cells/<cell>.json``, ``transfer/<seed>.json``, then ``results.json``,
``plots/<study>.png`` and ``REPRODUCTION.md``. Each step skips work whose record is already there, so an
interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from typing import Any

import numpy as np
import pyarrow.compute as pc

from . import datasets
from .config import ConfigError, PipelineParams
from .store import SUCCESS, Store, join, run_prefix

log = logging.getLogger("semisup.experiments")

#: the knobs a study may vary: every pipeline param, plus the fraction of the unlabeled pool used
POOL_FRACTION = "pool_fraction"
_EXPERIMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
METRICS = ("top1", "top5", "balanced_accuracy", "tail_recall")

#: the grid run on the demo data on 2 CPU cores in about an hour (REPRODUCTION.md comes from it)
DEFAULT_GRID: dict[str, Any] = {
    "dataset": "mnist-demo",
    "seeds": [0, 1, 2],
    # the demo's own recipe (make demo), so the base cell of seed 0 is the README's demo run
    "base": {"k": 250, "p": 3, "teacher_arch": "cnn_medium", "student_arch": "cnn_small", POOL_FRACTION: 1.0},
    "studies": {
        "k": [60, 125, 250, 500],
        "p": [1, 2, 5, 10],
        POOL_FRACTION: [0.25, 0.5, 1.0],
        "teacher_arch": ["cnn_small", "cnn_medium", "cnn_large"],
        "pretrain_epochs": [5, 10, 20],
        "selection_policy": ["topk", "threshold", "random", "noisy_student"],
        "weak_pretrain_epochs": [0, 3],
    },
    "oracle": True,
    "weak_label_noise": 0.3,  # the demo's simulated tags: this fraction is wrong
    "transfer": {"target": "shapes-demo", "epochs": 30},
}

#: a few minutes on 2 cores: the DAG test in CI and a quick look at a new dataset
CI_GRID: dict[str, Any] = {
    "dataset": "mnist-demo",
    "seeds": [0, 1, 2],
    "base": {"k": 40, "p": 2, "teacher_arch": "cnn_small", "student_arch": "cnn_small", "teacher_epochs": 2,
             "pretrain_epochs": 1, "finetune_epochs": 2, "batch_size": 64, POOL_FRACTION: 1.0},
    "studies": {"k": [20, 40], POOL_FRACTION: [0.5, 1.0], "weak_pretrain_epochs": [0, 1]},
    "oracle": False,
    "weak_label_noise": 0.3,
    "transfer": {"target": "shapes-demo", "epochs": 2},
}

#: the default grid's studies at the paper's proportions, for GPU workers: deeper models, longer training, 5 seeds
FULL_GRID: dict[str, Any] = {
    **DEFAULT_GRID,
    "seeds": [0, 1, 2, 3, 4],
    "base": {"k": 250, "p": 3, "teacher_arch": "resnet50", "student_arch": "resnet18", "teacher_epochs": 40,
             "pretrain_epochs": 30, "finetune_epochs": 40, POOL_FRACTION: 1.0},
    "studies": {**DEFAULT_GRID["studies"], "k": [60, 125, 250, 500, 1000],
                "teacher_arch": ["resnet18", "resnet34", "resnet50"], "pretrain_epochs": [10, 30, 90],
                "weak_pretrain_epochs": [0, 10]},
}

#: Noisy Student's training options on its own selection: soft pseudo-labels, and labeled images in every
#: pre-training batch (a quarter: its unlabeled:labeled ratio 3; a half: ratio 1)
NOISY_STUDENT_GRID: dict[str, Any] = {
    **DEFAULT_GRID,
    "base": {**DEFAULT_GRID["base"], "selection_policy": "noisy_student"},
    "studies": {"soft_labels": [False, True], "pretrain_labeled_fraction": [0.0, 0.25, 0.5]},
    "oracle": False,
    "transfer": None,
}

GRIDS = {"default": DEFAULT_GRID, "ci": CI_GRID, "full": FULL_GRID, "noisy_student": NOISY_STUDENT_GRID}

#: params each shared model depends on (with the seed): cells equal in these share the model
TEACHER_INPUTS = ("dataset", "dataset_version", "teacher_arch", "teacher_epochs", "lr", "optimizer", "weight_decay",
                  "batch_size", "warmup_epochs", "augment", "balanced_sampling", "seed", "weak_pretrain_epochs")
# a weakly pre-trained teacher also reads the tags of the run's drops (which drops_last/drops_since narrow)
WEAK_TEACHER_INPUTS = ("drops", "drops_last", "drops_since", "finetune_lr")
BASELINE_INPUTS = ("dataset", "dataset_version", "student_arch", "finetune_epochs", "finetune_lr", "optimizer",
                   "weight_decay", "batch_size", "warmup_epochs", "augment", "balanced_sampling", "seed")
SHARED_STAGES = {"teacher": ("train-teacher", "teacher"), "baseline": ("train-baseline", "baseline"),
                 "oracle": ("train-oracle", "oracle")}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _prefix(experiment: str, *parts: str) -> str:
    return join("experiments", experiment, *parts)


def check_experiment_id(experiment: str) -> str:
    if not isinstance(experiment, str) or not _EXPERIMENT_ID.fullmatch(experiment):
        raise ConfigError(f"The experiment id {experiment!r} is not valid; use up to 64 letters, digits, '.', '_' "
                          "and '-', starting with a letter or digit.")
    return experiment


# -- the grid ----------------------------------------------------------------------------------

def load_grid(grid: str | dict) -> dict:
    """A grid by name (``default``, ``ci``), from a JSON file, or as a dict; checked, with defaults filled."""
    if isinstance(grid, str):
        if grid in GRIDS:
            grid = GRIDS[grid]
        else:
            try:
                with open(grid, encoding="utf-8") as f:
                    grid = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"Grid {grid!r} is neither a named grid ({', '.join(GRIDS)}) nor a JSON file; "
                                  "pass one of those.") from None
            except json.JSONDecodeError as exc:
                raise ConfigError(f"Grid file {grid!r} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(grid, dict):
        raise ConfigError("A grid must be a JSON object with base, studies and seeds.")
    unknown = sorted(set(grid) - set(DEFAULT_GRID))
    if unknown:
        raise ConfigError(f"Unknown grid key(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_GRID)}.")
    out = {"dataset": "mnist-demo", "seeds": [0, 1, 2], "base": {}, "studies": {}, "oracle": False,
           "weak_label_noise": 0.3, "transfer": None, **json.loads(json.dumps(grid))}
    seeds = out["seeds"]
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"Grid seeds must be a list of distinct non-negative integers, got {seeds!r}.")
    if not isinstance(out["studies"], dict) or not all(isinstance(v, list) and v for v in out["studies"].values()):
        raise ConfigError("Grid studies must map a param name to a non-empty list of values.")
    for name, values in out["studies"].items():
        for value in values:  # each value checked as the param it sets: one sentence for the first bad one
            _cell_params(out, {**out["base"], name: value}, seeds[0], drops=["check"])
    _cell_params(out, out["base"], seeds[0], drops=["check"])
    transfer = out["transfer"]
    if transfer is not None and (not isinstance(transfer, dict) or not isinstance(transfer.get("target"), str)
                                 or not isinstance(transfer.get("epochs", 1), int) or transfer.get("epochs", 1) < 1):
        raise ConfigError("Grid transfer must be null or {\"target\": DATASET, \"epochs\": N>=1}.")
    return out


def _cell_params(grid: dict, setting: dict, seed: int, drops: list[str], version: str | None = None) -> dict:
    """The pipeline params of one cell: the setting (minus the pool fraction), the seed and its drops;
    ``version`` pins ``dataset_version: latest``, so a version imported mid-experiment changes nothing."""
    setting = dict(setting)
    _fraction(setting.pop(POOL_FRACTION, 1.0))  # checked here; the cell's drops carry it
    for key in ("seed", "drops", "oracle", "min_new_images", "teacher"):
        if key in setting:
            raise ConfigError(f"Grid param {key} is set by the experiment itself; remove it from base and studies.")
    params = {"dataset": grid["dataset"], **setting, "seed": seed, "drops": drops, "oracle": False,
              "min_new_images": 0}
    if version and params.get("dataset_version", "latest") == "latest":
        params["dataset_version"] = version
    return PipelineParams.from_dict(params).to_dict()


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"Grid value pool_fraction must be a number in (0, 1], got {value!r}.")
    return float(value)  # 1 and 1.0 are one setting


def _identity(grid: dict, setting: dict) -> str:
    """What a setting computes, with the params it leaves out at their defaults: ``weak_pretrain_epochs: 0``
    and a base that never names it are the same setting, run once."""
    params = _cell_params(grid, setting, 0, drops=[])
    return _digest([params, _fraction(setting.get(POOL_FRACTION, 1.0))])


def _settings(grid: dict) -> list[tuple[dict, list[tuple[str, Any]]]]:
    """Distinct settings with the (study, value) points they stand for; the base first."""
    base = {POOL_FRACTION: 1.0, **grid["base"]}
    found: dict[str, tuple[dict, list[tuple[str, Any]]]] = {_identity(grid, base): (base, [])}
    for study, values in grid["studies"].items():
        for value in values:
            setting = {**base, study: value}
            entry = found.setdefault(_identity(grid, setting), (setting, []))
            entry[1].append((study, value))
    return list(found.values())


def _fraction_drops(store: Store, drops: list[str], fraction: float) -> list[str]:
    """Drop ids holding ``fraction`` of each drop's images (nested: a smaller fraction is a subset),
    written once as derived drops ``<drop>-pool-<fraction>`` (left out of every-drop runs)."""
    if fraction >= 1:
        return list(drops)
    out = []
    for drop_id in drops:
        derived = f"{drop_id}-pool-{fraction!r}"
        if store.exists(join(datasets.drop_prefix(derived), SUCCESS)):
            marker = join(datasets.drop_prefix(derived), datasets.DERIVED)
            if not store.exists(marker) or store.read_json(marker).get("derived_from") != drop_id:
                raise ConfigError(f"Drop {derived!r} exists but is not the {fraction:g} pool of drop {drop_id!r}; "
                                  "rename that drop.")
            ids = datasets.drop_image_ids(store, datasets.load_drop_manifest(store, derived))
            _copy_labels(store, drop_id, derived, [f"{drop_id}/{i[len(derived) + 1:]}" for i in ids])
            out.append(derived)
        elif _write_fraction_drop(store, drop_id, derived, fraction):
            out.append(derived)
    if not out:
        raise ConfigError(f"pool_fraction {fraction:g} keeps no image of drops {', '.join(drops)}; use a larger one.")
    return out


def _copy_labels(store: Store, drop_id: str, derived: str, ids: list[str]) -> None:
    """The source drop's truth and weak labels for the images ``ids`` of it, under the derived drop's ids
    (a table the source lacks, or holds only in part, is removed: never a partial oracle)."""
    renamed = [f"{derived}/{i[len(drop_id) + 1:]}" for i in ids]
    for load, write, key in ((datasets.load_truth, datasets.write_truth, datasets.truth_key),
                             (datasets.load_weak_labels, datasets.write_weak_labels, datasets.weak_labels_key)):
        table = load(store, [drop_id])
        labels = {} if table is None else dict(zip(table.column("image_id").to_pylist(),
                                                   table.column("label").to_pylist(), strict=True))
        if ids and all(i in labels for i in ids):
            write(store, derived, renamed, [labels[i] for i in ids])
        else:
            store.delete(key(derived))


def _kept(image_id: str, fraction: float) -> bool:
    # the first 8 bytes of sha256 as a number in [0, 1): the same image is kept by every larger fraction
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big") / 2**64 < fraction


def _write_fraction_drop(store: Store, drop_id: str, derived: str, fraction: float) -> bool:
    """The derived drop with its truth and weak labels (when the drop has them); False when it keeps no image."""
    manifest = datasets.load_drop_manifest(store, drop_id)
    ids = [image_id for image_id in datasets.drop_image_ids(store, manifest) if _kept(image_id, fraction)]
    if not ids:
        return False
    _copy_labels(store, drop_id, derived, ids)  # first: a committed derived drop always has its labels beside it
    keep = set(ids)

    def rows():
        for shard in manifest["shards"]:
            table = store.read_table(shard["key"], columns=["image_id", "image"])
            for image_id, image in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist(),
                                       strict=True):
                if image_id in keep:
                    yield image_id[len(drop_id) + 1:], image

    shard_size = max(s["count"] for s in manifest["shards"])
    # the source's landing day too: drops_since and drops_last then treat the pool like its drop
    datasets.write_drop(store, derived, rows(), source=f"{fraction:.6g} of drop {drop_id}", shard_size=shard_size,
                        derived_from=drop_id, date=manifest.get("date"))
    log.info("pool fraction %g of %s: drop %s with %d images", fraction, drop_id, derived, len(ids))
    return True


def _shared_key(kind: str, params: dict) -> str:
    fields = {"teacher": TEACHER_INPUTS + (WEAK_TEACHER_INPUTS if params.get("weak_pretrain_epochs") else ()),
              "baseline": BASELINE_INPUTS}.get(kind)
    chosen = {k: params.get(k) for k in fields} if fields else params
    return f"{kind}-{_digest(chosen)[:12]}"


def prepare(store: Store, experiment: str, grid: str | dict) -> dict:
    """Expand the grid into shared jobs and cells, write ``grid.json``; returns the ids to run.

    Also writes the derived pool-fraction drops and, for the demo, its simulated weak labels and the
    transfer target, so every later step only reads."""
    check_experiment_id(experiment)
    grid = load_grid(grid)
    key = _prefix(experiment, "grid.json")
    if store.exists(key):
        existing = store.read_json(key)
        if existing["grid"] != grid:
            raise ConfigError(f"Experiment {experiment!r} already exists in {store.uri} with another grid; use "
                              "another experiment id.")
        return _ids(existing)
    version = datasets.load_dataset_manifest(store, grid["dataset"])["version"]  # one sentence when missing
    drops = datasets.list_drops(store)  # never an earlier experiment's derived drops
    if not drops:
        raise ConfigError(f"The store {store.uri} has no unlabeled drop; add one with `semisup import-drop`.")
    data = _prepare_data(store, grid, drops)
    shared: dict[str, dict] = {}
    cells: dict[str, dict] = {}
    base = _identity(grid, {POOL_FRACTION: 1.0, **grid["base"]})
    for setting, points in _settings(grid):
        for seed in grid["seeds"]:
            fraction = setting.get(POOL_FRACTION, 1.0)
            params = _cell_params(grid, setting, seed, _fraction_drops(store, drops, _fraction(fraction)), version)
            uses = {}
            for kind in ("teacher", "baseline"):
                job = _shared_key(kind, params)
                shared.setdefault(job, {"kind": kind, "run_id": f"exp-{experiment}-{job}", "params": params})
                uses[kind] = job
            cell = f"c-{_digest([_identity(grid, setting), seed])[:12]}"
            cells[cell] = {"setting": setting, "seed": seed, "points": points, "params": params,
                           "run_id": f"exp-{experiment}-{cell}", "uses": uses,
                           "base": _identity(grid, setting) == base}
    if grid["oracle"]:
        for cell in cells.values():  # without true labels for every drop of the cell there is no oracle to train
            if cell["base"] and all(store.exists(datasets.truth_key(d)) for d in cell["params"]["drops"]):
                params = {**cell["params"], "oracle": True}
                job = f"oracle-s{cell['seed']}"
                shared[job] = {"kind": "oracle", "run_id": f"exp-{experiment}-{job}", "params": params}
    if grid["transfer"]:  # pinned like the dataset: a version imported mid-experiment changes nothing
        data["transfer_version"] = datasets.load_dataset_manifest(store, grid["transfer"]["target"])["version"]
    plan = {"experiment": experiment, "grid": grid, "drops": drops, "dataset_version": version, "data": data,
            "shared": shared, "cells": cells, "created": time.time()}
    store.write_json(key, plan)
    log.info("experiment %s: %d shared models, %d cells", experiment, len(shared), len(cells))
    return _ids(plan)


def _prepare_data(store: Store, grid: dict, drops: list[str]) -> dict:
    """Check (and on the demo, build) what the grid reads besides the drops; returns facts for the report."""
    studies = grid["studies"]
    truth = all(store.exists(datasets.truth_key(d)) for d in drops)
    facts: dict[str, Any] = {"truth": truth, "weak_labels": None}
    weak = any(v for v in [grid["base"].get("weak_pretrain_epochs", 0), *studies.get("weak_pretrain_epochs", [])])
    if weak:
        if grid["dataset"] == "mnist-demo":
            from .demo import build_weak_labels

            build_weak_labels(store, noise=grid["weak_label_noise"])  # the same noise rewrites the same tags
        tags = datasets.load_weak_labels(store, drops)
        if tags is None:
            raise ConfigError(f"The grid pre-trains the teacher on weak labels but drops {', '.join(drops)} have "
                              "none; import them with `semisup import-weak-labels`.")
        facts["weak_labels"] = _tag_quality(store, tags, drops if truth else [])
    transfer = grid["transfer"]
    if transfer and transfer["target"] == "shapes-demo":
        from .demo_shapes import build_shapes_demo

        build_shapes_demo(store)
    if transfer:
        target = datasets.load_dataset_manifest(store, transfer["target"])
        source = datasets.load_dataset_manifest(store, grid["dataset"])
        if target["channels"] != source["channels"]:
            raise ConfigError(f"The transfer target {transfer['target']!r} has {target['channels']} channel(s) but "
                              f"{grid['dataset']!r} has {source['channels']}; pick a target with the same channels.")
    return facts


def _tag_quality(store: Store, tags: Any, drops: list[str]) -> dict:
    """How many images carry a tag and, where the truth is known, how many tags are right (for the report)."""
    labels = tags.column("label").to_numpy()
    out: dict[str, Any] = {"images": int(len(labels)), "tagged": int((labels >= 0).sum()), "correct_fraction": None}
    truth = datasets.load_truth(store, drops) if drops else None
    if truth is not None:
        joined = tags.join(truth.rename_columns(["image_id", "true"]), "image_id")
        digits = joined.filter(pc.and_(pc.greater_equal(joined.column("true"), 0),
                                       pc.greater_equal(joined.column("label"), 0)))
        if digits.num_rows:
            out["correct_fraction"] = float(pc.mean(pc.cast(pc.equal(digits.column("label"), digits.column("true")),
                                                            "float64")).as_py())
    return out


def _ids(plan: dict) -> dict:
    transfer = [str(s) for s in plan["grid"]["seeds"]] if plan["grid"]["transfer"] else []
    return {"experiment": plan["experiment"], "shared": sorted(plan["shared"]), "cells": sorted(plan["cells"]),
            "transfer": transfer}


def load_plan(store: Store, experiment: str) -> dict:
    key = _prefix(check_experiment_id(experiment), "grid.json")
    if not store.exists(key):
        raise ConfigError(f"Experiment {experiment!r} is not in {store.uri}; prepare it first (`semisup experiments "
                          "run` does).")
    return store.read_json(key)


# -- running -----------------------------------------------------------------------------------

def _test_metrics(store: Store, model_key: str, ds: dict) -> dict:
    from .evaluate import classification_metrics, tail_classes
    from .models import load_checkpoint
    from .train import predict

    model, _ = load_checkpoint(store.read_bytes(model_key))
    x, y, _ = datasets.load_split(store, ds, "test")
    m = classification_metrics(predict(model, x), y, tail_classes(ds["splits"]["train"]["class_counts"]))
    return {k: m[k] for k in METRICS}


def _step(store: Store, experiment: str, section: str, item: str) -> tuple[dict, str, dict | None]:
    """(the plan, where the step's record goes, the record when the step already ran)."""
    plan = load_plan(store, experiment)
    if item not in plan[section]:
        what = {"shared": "shared job", "cells": "cell"}[section]
        raise ConfigError(f"Experiment {experiment!r} has no {what} {item!r}.")
    key = _prefix(experiment, section, f"{item}.json")
    return plan, key, store.read_json(key) if store.exists(key) else None


def run_shared(store: Store, experiment: str, job: str) -> dict:
    """Train one shared model (teacher, baseline or oracle) in its own run; record its test metrics."""
    from .stages import run_stage

    plan, key, done = _step(store, experiment, "shared", job)
    if done is not None:
        return done
    spec, started = plan["shared"][job], time.time()
    stage, name = SHARED_STAGES[spec["kind"]]
    run_stage("plan", store, spec["run_id"], spec["params"])
    result = run_stage(stage, store, spec["run_id"], spec["params"])
    if result.get("skipped"):
        raise ConfigError(f"Shared job {job} trained nothing: {result.get('reason')}.")
    ds = datasets.load_dataset_manifest(store, spec["params"]["dataset"], spec["params"]["dataset_version"])
    record = {"job": job, "kind": spec["kind"], "run_id": spec["run_id"], "model_key": result["model_key"],
              "arch": result["arch"], "seed": spec["params"]["seed"],
              "test": _test_metrics(store, result["model_key"], ds), "seconds": round(time.time() - started, 1)}
    store.write_json(key, record)
    log.info("shared %s: test top-1 %.3f (%.0f s)", job, record["test"]["top1"], record["seconds"])
    return record


def _adopt(store: Store, run_id: str, params: dict, stage_dir: str, source_run_id: str) -> None:
    """Record a shared run's committed model as this run's own (same inputs: it would train the same)."""
    from .stages import RunContext

    ctx = RunContext(store, run_id, PipelineParams.from_dict(params))
    if ctx.committed(stage_dir) is not None:
        return
    source_key = join(run_prefix(source_run_id), stage_dir, SUCCESS)
    if not store.exists(source_key):
        raise ConfigError(f"The shared {stage_dir} of run {source_run_id!r} is not trained yet; run its shared job "
                          "first.")
    ctx.commit(stage_dir, ctx.fingerprint(), store.read_json(source_key)["result"], time.time())


def run_cell(store: Store, experiment: str, cell: str) -> dict:
    """One (setting, seed): the pipeline's stages with the shared teacher and baseline adopted."""
    from .stages import run_stage

    plan, key, done = _step(store, experiment, "cells", cell)
    if done is not None:
        return done
    spec, started = plan["cells"][cell], time.time()
    run_id, params = spec["run_id"], spec["params"]
    record = {"cell": cell, "seed": spec["seed"], "setting": spec["setting"], "points": spec["points"],
              "run_id": run_id}
    for kind, job in spec["uses"].items():  # a shared model not trained yet fails the task, never the record
        _adopt(store, run_id, params, SHARED_STAGES[kind][1], plan["shared"][job]["run_id"])
    try:
        first = run_stage("plan", store, run_id, params)
        run_stage("train-oracle", store, run_id, params)  # oracle=false: records a skip, as evaluate expects
        for group in range(first["score_groups"]):
            run_stage("score", store, run_id, params, group=group)
        run_stage("thresholds", store, run_id, params)
        for group in range(first["score_groups"]):
            run_stage("filter", store, run_id, params, group=group)
        for stage in ("select", "materialize", "pretrain-student", "finetune-student"):
            run_stage(stage, store, run_id, params)
        run_stage("evaluate", store, run_id, params)
    except ConfigError as exc:  # e.g. a threshold that keeps no image: a result of the study, not a crash
        record["error"] = str(exc)
        log.warning("cell %s (%s, seed %d): %s", cell, spec["points"], spec["seed"], exc)
    else:
        metrics = store.read_json(join(run_prefix(run_id), "evaluate", "metrics.json"))
        sel = metrics["selection"]
        record["models"] = {name: {k: m[k] for k in METRICS} for name, m in metrics["models"].items()}
        record["selection"] = {k: sel.get(k) for k in ("selected_pairs", "unique_images", "pseudo_label_precision",
                                                      "distractors_selected")}
        student = store.read_json(join(run_prefix(run_id), "student", SUCCESS))["result"]
        record["student_model_key"] = student["model_key"]
    record["seconds"] = round(time.time() - started, 1)
    store.write_json(key, record)
    log.info("cell %s %s seed %d done in %.0f s", cell, spec["points"] or "base", spec["seed"], record["seconds"])
    return record


def run_transfer(store: Store, experiment: str, seed: str | int) -> dict:
    """The base setting's student, its supervised baseline and a fresh model, each fine-tuned on the
    transfer target (another task); the paper's CUB-2011 experiment in miniature."""
    from .train import Recipe
    from .transfer import fine_tune

    plan = load_plan(store, experiment)
    grid, seed = plan["grid"], int(seed)
    if not grid["transfer"] or seed not in grid["seeds"]:
        raise ConfigError(f"Experiment {experiment!r} has no transfer run for seed {seed}.")
    key = _prefix(experiment, "transfer", f"{seed}.json")
    if store.exists(key):
        return store.read_json(key)
    cell_id, base = next((k, c) for k, c in sorted(plan["cells"].items()) if c["base"] and c["seed"] == seed)
    cell = run_cell(store, experiment, cell_id)
    if "error" in cell:  # recorded like a failed cell: the rest of the experiment still aggregates
        record = {"seed": seed, "error": f"the base cell of seed {seed} failed ({cell['error']})"}
        store.write_json(key, record)
        return record
    baseline = store.read_json(join(run_prefix(plan["shared"][base["uses"]["baseline"]]["run_id"]), "baseline",
                                    SUCCESS))["result"]
    p = PipelineParams.from_dict(base["params"])
    target = grid["transfer"]["target"]
    recipe = Recipe(epochs=grid["transfer"].get("epochs", 30), lr=p.finetune_lr, batch_size=p.batch_size,
                    optimizer=p.optimizer, weight_decay=p.weight_decay, warmup_epochs=p.warmup_epochs,
                    augment=p.augment, seed=seed * 100 + 7)
    version = plan["data"]["transfer_version"]
    record = {"seed": seed, "target": target, "target_version": version, "results": {}}
    for init, model_key in (("scratch", None), ("baseline", baseline["model_key"]),
                            ("student", cell["student_model_key"])):
        data = store.read_bytes(model_key) if model_key else None
        record["results"][init] = fine_tune(store, target, version, data, p.student_arch, recipe)
    store.write_json(key, record)
    log.info("transfer seed %d: %s", seed, {k: round(v["top1"], 3) for k, v in record["results"].items()})
    return record


def run_experiment(store: Store, experiment: str, grid: str | dict, notes: dict[str, str] | None = None) -> dict:
    """The whole experiment in this process, in order (what the DAG does with mapped tasks)."""
    started = time.time()
    ids = prepare(store, experiment, grid)
    for job in ids["shared"]:
        run_shared(store, experiment, job)
    for cell in ids["cells"]:
        run_cell(store, experiment, cell)
    for seed in ids["transfer"]:
        run_transfer(store, experiment, seed)
    summary = aggregate(store, experiment, notes)
    log.info("experiment %s finished in %.0f s", experiment, time.time() - started)
    return summary


# -- aggregation -------------------------------------------------------------------------------

def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """Mean of a - b over the seeds both have, with its standard error (seeds pair: same teacher, data)."""
    seeds = sorted(set(a) & set(b))
    d = np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)
    if not len(d):
        return {"mean": None, "se": None, "n": 0}
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "n": int(len(d))}


def aggregate(store: Store, experiment: str, notes: dict[str, str] | None = None) -> dict:
    """Every study's mean ± std per value, the shared models, transfer; plots and ``REPRODUCTION.md``
    (``notes``: per finding id, why it does not agree, written by a person who read the results)."""
    from .reproduction import render, study_plots

    plan = load_plan(store, experiment)
    records = {}
    for cell in plan["cells"]:
        key = _prefix(experiment, "cells", f"{cell}.json")
        if store.exists(key):
            records[cell] = store.read_json(key)
    missing = sorted(set(plan["cells"]) - set(records))
    if missing:
        raise ConfigError(f"{len(missing)} cell(s) of experiment {experiment!r} have not run (first: {missing[0]}); "
                          "run them before aggregating.")
    shared = {job: store.read_json(_prefix(experiment, "shared", f"{job}.json")) for job in plan["shared"]
              if store.exists(_prefix(experiment, "shared", f"{job}.json"))}
    transfer = [store.read_json(_prefix(experiment, "transfer", f"{s}.json")) for s in plan["grid"]["seeds"]
                if store.exists(_prefix(experiment, "transfer", f"{s}.json"))]
    results = {"experiment": experiment, "grid": plan["grid"], "studies": {}, "base": _point(plan, records, None),
               "oracle": mean_std([r["test"]["top1"] for r in shared.values() if r["kind"] == "oracle"]),
               "transfer": _transfer_summary(transfer), "errors": {c: r["error"] for c, r in records.items()
                                                                   if "error" in r},
               "cell_seconds": round(sum(r.get("seconds", 0) for r in records.values()), 1),
               "shared_seconds": round(sum(r.get("seconds", 0) for r in shared.values()), 1),
               "seeds": plan["grid"]["seeds"], "data": plan.get("data", {}),
               "dataset_version": plan.get("dataset_version")}
    for study, values in plan["grid"]["studies"].items():
        results["studies"][study] = [{"value": v, **_point(plan, records, (study, v))} for v in values]
    store.write_json(_prefix(experiment, "results.json"), results)
    plots = study_plots(results)
    for name, png in plots.items():
        store.write_bytes(_prefix(experiment, "plots", f"{name}.png"), png)
    store.write_bytes(_prefix(experiment, "REPRODUCTION.md"), render(results, sorted(plots), notes).encode())
    return {"results": store.url(_prefix(experiment, "results.json")),
            "reproduction": store.url(_prefix(experiment, "REPRODUCTION.md")), "plots": sorted(plots),
            "cells": len(records), "errors": len(results["errors"])}


def _point(plan: dict, records: dict, point: tuple[str, Any] | None) -> dict:
    """Per seed and mean ± std of every model's metrics and the selection, for one (study, value)."""
    def matches(cell: dict) -> bool:
        return cell["base"] if point is None else any(tuple(p) == tuple(point) for p in cell["points"])

    chosen = [records[c] for c, spec in sorted(plan["cells"].items()) if matches(spec)]
    per_seed: dict[str, dict[int, float]] = {}
    for r in chosen:
        for model, metrics in r.get("models", {}).items():
            for metric, value in metrics.items():
                per_seed.setdefault(f"{model}.{metric}", {})[r["seed"]] = value
        for k, value in (r.get("selection") or {}).items():
            if value is not None:
                per_seed.setdefault(f"selection.{k}", {})[r["seed"]] = value
    return {"cells": [r["cell"] for r in chosen], "errors": [r["error"] for r in chosen if "error" in r],
            "per_seed": per_seed, "summary": {k: mean_std(list(v.values())) for k, v in per_seed.items()}}


def _transfer_summary(records: list[dict]) -> dict:
    per_seed: dict[str, dict[int, float]] = {}
    for r in records:
        for init, m in r.get("results", {}).items():
            per_seed.setdefault(init, {})[r["seed"]] = m["top1"]
    return {"target": next((r["target"] for r in records if "target" in r), None), "per_seed": per_seed,
            "errors": [r["error"] for r in records if "error" in r],
            "summary": {k: mean_std(list(v.values())) for k, v in per_seed.items()}}


def export(store: Store, experiment: str, folder: str) -> list[str]:
    """Copy ``REPRODUCTION.md`` and the plots to a local folder (the repository commits the default grid's)."""
    from pathlib import Path

    out = Path(folder)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = []
    for key in [_prefix(experiment, "REPRODUCTION.md"), _prefix(experiment, "results.json"),
                *store.list(_prefix(experiment, "plots"))]:
        if not store.exists(key):
            raise ConfigError(f"Experiment {experiment!r} has no {key.rsplit('/', 1)[-1]} yet; aggregate it first.")
        rel = key[len(_prefix(experiment)) + 1:]
        (out / rel).write_bytes(store.read_bytes(key))
        written.append(str(out / rel))
    return written
