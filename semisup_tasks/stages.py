"""The pipeline's stages: each reads its inputs from the store, writes under
``runs/<run_id>/<stage>/`` and returns a small JSON document.

A stage writes its manifest (``_SUCCESS.json``: effective params, code version, result) last.
Rerunning a stage whose manifest matches the same params returns the recorded result without
redoing the work, so Airflow retries and re-runs are idempotent.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import datasets
from .config import OPERATIONAL_PARAMS, TRAINING_STAGES, ConfigError, PipelineParams
from .store import SUCCESS, Store, join, run_prefix

log = logging.getLogger("semisup.stages")

MODEL_STAGES = {  # stage name -> model name in the run and in metrics.json
    "train-teacher": "teacher",
    "train-baseline": "baseline",
    "pretrain-student": "student_pretrained",
    "finetune-student": "student",
    "train-oracle": "oracle",
}


def code_version() -> str:
    try:
        return version("semisup")
    except PackageNotFoundError:
        return "dev"


class RunContext:
    """What every stage of one run shares: the store, the run prefix, the params, the plan."""

    def __init__(self, store: Store, run_id: str, params: PipelineParams):
        self.store, self.run_id, self.params = store, run_id, params
        self.prefix = run_prefix(run_id)
        self._shard_digests: dict[str, str | None] | None = None

    def key(self, *parts: str) -> str:
        return join(self.prefix, *parts)

    def plan(self) -> dict:
        result = self.committed("plan")
        if result is None:
            raise ConfigError(f"Run {self.run_id!r} has no plan in {self.store.uri}; run the plan stage first.")
        return result

    def shard_groups(self) -> list[list[str]]:
        """The plan's groups of drop shards, one per mapped score task (kept in the store, not XCom)."""
        self.plan()
        return self.store.read_json(self.key("plan", "shard_groups.json"))

    def shard_digests(self) -> dict[str, str | None]:
        """Each drop shard's content digest, from the drop manifests (read once per stage)."""
        if self._shard_digests is None:
            self._shard_digests = {s["key"]: s.get("sha256") for d in self.plan()["drops"]
                                   for s in datasets.load_drop_manifest(self.store, d)["shards"]}
        return self._shard_digests

    def dataset(self) -> dict:
        plan = self.plan()
        return datasets.load_dataset_manifest(self.store, plan["dataset"], plan["dataset_version"])

    def fingerprint(self) -> dict:
        """What a stage's output depends on besides its inputs: the params and the code."""
        params = {k: v for k, v in self.params.to_dict().items() if k not in OPERATIONAL_PARAMS}
        return {"params": params, "code_version": code_version()}

    def committed(self, stage_dir: str) -> dict | None:
        """The result a stage of this run recorded with these params, or None: the output of a
        run with other params (another K, another teacher) is never read."""
        return self.manifest_matches(stage_dir, self.fingerprint())

    def manifest_matches(self, stage_dir: str, fingerprint: dict) -> dict | None:
        key = self.key(stage_dir, SUCCESS)
        if self.store.exists(key):
            manifest = self.store.read_json(key)
            if manifest.get("fingerprint") == fingerprint:
                return manifest["result"]
        return None

    def commit(self, stage_dir: str, fingerprint: dict, result: dict, started: float) -> dict:
        from .distributed import is_main

        if not is_main():  # under torchrun only rank 0 writes
            return result
        self.store.write_json(self.key(stage_dir, SUCCESS), {
            "stage": stage_dir, "run_id": self.run_id, "fingerprint": fingerprint, "result": result,
            "code_version": code_version(), "seconds": round(time.time() - started, 3),
            "finished_at": datetime.now(UTC).isoformat(),
        })
        return result


# -- helpers -----------------------------------------------------------------------------------

def _recipe(params: PipelineParams, stage: str):
    from .train import Recipe

    finetune = stage in ("train-baseline", "finetune-student", "oracle-finetune", "teacher-weak-finetune")
    labeled = stage in ("train-teacher", "train-baseline", "finetune-student", "oracle-finetune",
                        "teacher-weak-finetune")
    epochs = {"train-teacher": params.teacher_epochs, "pretrain-student": params.pretrain_epochs,
              "oracle-pretrain": params.pretrain_epochs, "teacher-weak": params.weak_pretrain_epochs,
              "teacher-weak-finetune": params.teacher_epochs}.get(stage, params.finetune_epochs)
    # each training has its own seed: a new one gets a new offset, an existing one never changes
    offset = {"train-teacher": 1, "train-baseline": 2, "pretrain-student": 3, "finetune-student": 4,
              "oracle-pretrain": 5, "oracle-finetune": 6, "teacher-weak": 7, "teacher-weak-finetune": 8}[stage]
    return Recipe(epochs=epochs, lr=params.finetune_lr if finetune else params.lr, batch_size=params.batch_size,
                  optimizer=params.optimizer, weight_decay=params.weight_decay, warmup_epochs=params.warmup_epochs,
                  augment=params.augment, balanced_sampling=params.balanced_sampling and labeled,
                  seed=params.seed * 100 + offset)


def _new_model(arch: str, ds: dict, recipe):
    """A freshly initialised model, seeded first so the same seed gives the same weights."""
    import torch

    from .models import build_model

    torch.manual_seed(recipe.seed)
    return build_model(arch, ds["channels"], len(ds["classes"]), tuple(ds["image_size"]))


def _train_new(ctx: RunContext, stage_dir: str, arch: str, ds: dict, x: np.ndarray, y: np.ndarray, recipe,
               name: str):
    """A new model trained on in-memory (x, y), resuming from its checkpoint."""
    from .train import train

    model = _new_model(arch, ds, recipe)
    return model, train(model, x, y, recipe, name=name, checkpoints=_checkpoints(ctx, stage_dir, name))


def _checkpoints(ctx: RunContext, stage_dir: str, name: str):
    """Where training ``name`` keeps its latest state: ``<stage dir>/checkpoints/<name>.pt``, tagged with
    the run's params and code so another run's or other params' state is never resumed."""
    from .checkpoints import StoreCheckpoints

    return StoreCheckpoints(ctx.store, ctx.key(stage_dir, "checkpoints", f"{name}.pt"),
                            tag=_digest([ctx.run_id, ctx.fingerprint(), name]),
                            every_steps=ctx.params.checkpoint_every_steps)


def _images_and_labels(store: Store, rows: pa.Table, label_column: str, ds: dict) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images of (image_id, shard) rows with their labels, in row order."""
    x = _gather_images(store, rows, ds["channels"], tuple(ds["image_size"]))
    return x, rows.column(label_column).to_numpy().astype(np.int64)


def _save_model(ctx: RunContext, name: str, model, arch: str, ds: dict, train_summary: dict) -> dict:
    from .distributed import is_main, rank
    from .evaluate import classification_metrics, tail_classes
    from .models import checkpoint_bytes, weights_digest
    from .train import predict

    if not is_main():  # under torchrun only rank 0 writes the model
        return {"rank": rank()}
    size = tuple(ds["image_size"])
    key = ctx.key(name, "model.pt")
    data = checkpoint_bytes(model, arch, ds["channels"], len(ds["classes"]), size,
                            extra={"run_id": ctx.run_id, "train": train_summary})
    ctx.store.write_bytes(key, data)
    val_x, val_y, _ = datasets.load_split(ctx.store, ds, "val")
    val_top1 = None
    if len(val_y):
        tail = tail_classes(ds["splits"]["train"]["class_counts"])
        val_top1 = classification_metrics(predict(model, val_x), val_y, tail)["top1"]
    return {"model": ctx.store.url(key), "model_key": key, "weights_sha256": weights_digest(model),
            "arch": arch, "val_top1": val_top1, "train": train_summary}


def _model_result(ctx: RunContext, name: str) -> dict:
    """The committed result of the stage that trained ``name``; a model without a manifest is ignored."""
    result = ctx.committed(name)
    if result is None or result.get("skipped"):
        raise ConfigError(f"Run {ctx.run_id!r} has no {name} model yet; run its stage first.")
    return result


def _load_model(ctx: RunContext, name: str):
    from .models import load_checkpoint

    return load_checkpoint(ctx.store.read_bytes(_model_result(ctx, name)["model_key"]))[0]


def _gather_images(store: Store, rows: pa.Table, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Decode the images named by (image_id, shard) rows, in row order (duplicates allowed)."""
    from .images import decode

    out = np.empty((rows.num_rows, channels, size[0], size[1]), dtype=np.uint8)
    ids = rows.column("image_id").to_pylist()
    shards = rows.column("shard").to_pylist()
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(shards):
        by_shard.setdefault(shard, []).append(i)
    for shard, positions in sorted(by_shard.items()):
        table = store.read_table(shard, columns=["image_id", "image"])
        index = {image_id: j for j, image_id in enumerate(table.column("image_id").to_pylist())}
        images = table.column("image")
        for i in positions:
            out[i] = decode(images[index[ids[i]]].as_py(), channels, size)
    return out


def _pool_rows(ctx: RunContext) -> pa.Table:
    """(image_id, shard) of every image in the run's drops, from the shards themselves."""
    tables = []
    for group in ctx.shard_groups():
        for shard in group:
            ids = ctx.store.read_table(shard, columns=["image_id"]).column("image_id")
            tables.append(pa.table({"image_id": ids, "shard": pa.array([shard] * len(ids), pa.string())}))
    return pa.concat_tables(tables)


# -- stages ------------------------------------------------------------------------------------

def plan(ctx: RunContext) -> dict:
    p = ctx.params
    ds = datasets.load_dataset_manifest(ctx.store, p.dataset, p.dataset_version)
    num_classes = len(ds["classes"])
    if p.p > num_classes:
        raise ConfigError(f"Parameter p={p.p} exceeds the {num_classes} classes of dataset {p.dataset!r}; "
                          f"use p between 1 and {num_classes}.")
    for split in ("train", "test"):
        if ds["splits"][split]["count"] == 0:
            raise ConfigError(f"Dataset {ds['name']!r} version {ds['version']} has no {split} images; "
                              "re-import it with a non-empty train and test split.")
    if p.teacher != "train":  # a missing champion or version fails here, before any model trains
        from . import registry

        registry.resolve(ctx.store, registry.model_name(ds["name"]), p.teacher)
    drop_ids, manifests = _select_drops(ctx.store, p)
    shards = [s["key"] for m in manifests for s in m["shards"]]
    size = max(p.shards_per_task, -(-len(shards) // p.max_score_tasks))  # bounded mapped-task count
    groups = [shards[i:i + size] for i in range(0, len(shards), size)]
    # the shard keys stay in the store: at 10^9 images they would be far too big for XCom
    ctx.store.write_json(ctx.key("plan", "shard_groups.json"), groups)
    # true labels count only when every drop has them: a partial truth would make a partial oracle
    truth = all(ctx.store.exists(datasets.truth_key(d)) for d in drop_ids)
    champion, new_images, new_drops = _new_images(ctx.store, ds["name"], drop_ids, manifests)
    return {"dataset": ds["name"], "dataset_version": ds["version"], "drops": drop_ids,
            "score_groups": len(groups), "shards_per_group": size, "shards": len(shards),
            "images": sum(m["count"] for m in manifests), "truth": truth, "oracle": bool(p.oracle and truth),
            "champion": champion, "new_images": new_images, "new_drops": new_drops,
            "gate": gate_decision(new_images, p.min_new_images, champion)}


def _select_drops(store: Store, p: PipelineParams) -> tuple[list[str], list[dict]]:
    """The run's drops with their manifests: ``drops`` (or every committed drop, by id), then those since
    ``drops_since``, then the ``drops_last`` most recent; either filter orders them by landing date, then id."""
    from .ingest import drop_date

    repeated = sorted({d for d in p.drops if p.drops.count(d) > 1})
    if repeated:
        raise ConfigError(f"Drop(s) {', '.join(repeated)} are listed more than once in drops; list each once.")
    drop_ids = list(p.drops) or datasets.list_drops(store)
    if not drop_ids:
        raise ConfigError(f"The store {store.uri} has no unlabeled drop; add one with `semisup import-drop`.")
    manifests = {d: datasets.load_drop_manifest(store, d) for d in drop_ids}
    dates = {d: drop_date(d, manifests[d]) for d in drop_ids}
    if p.drops_since:
        drop_ids = [d for d in drop_ids if dates[d] is not None and dates[d] >= p.drops_since]
        if not drop_ids:
            raise ConfigError(f"No drop landed on or after {p.drops_since} (drops_since); pick an earlier day or "
                              "leave drops_since empty.")
    if p.drops_last or p.drops_since:  # undated drops count as oldest: their landing day is unknown
        drop_ids.sort(key=lambda d: (dates[d] or "", d))
    if p.drops_last:
        drop_ids = drop_ids[-p.drops_last:]
    return drop_ids, [manifests[d] for d in drop_ids]


def _new_images(store: Store, dataset: str, drop_ids: list[str], manifests: list[dict]
                ) -> tuple[str | None, int, list[str]]:
    """(champion version, images in the selected drops it was not trained on, those drops); with no
    champion every image is new."""
    from . import registry

    name = registry.model_name(dataset)
    pointer = registry.champion(store, name)
    seen: set[str] = set()
    if pointer is not None:
        seen = set(registry.card(store, name, pointer["version"]).get("lineage", {}).get("drops", []))
    new = [(d, m["count"]) for d, m in zip(drop_ids, manifests, strict=True) if d not in seen]
    return (pointer["version"] if pointer else None), sum(n for _, n in new), [d for d, _ in new]


def gate_decision(new_images: int, min_new_images: int, champion: str | None) -> dict:
    """Whether the run goes on after plan: at least ``min_new_images`` images its champion has not seen."""
    versus = f"champion {champion}" if champion else "no champion yet"
    if new_images >= min_new_images:
        return {"run": True, "reason": f"{new_images} new image(s) ({versus}), at least min_new_images="
                                       f"{min_new_images}"}
    return {"run": False, "reason": f"only {new_images} new image(s) ({versus}), fewer than min_new_images="
                                    f"{min_new_images}: nothing worth retraining on; set min_new_images=0 to run "
                                    "anyway"}


def train_labeled(ctx: RunContext, stage: str) -> dict:
    """Teacher and baseline: trained from scratch on the labeled train split; or the teacher taken from
    the model registry (``teacher=champion`` or a version), to iterate the method; or, with
    ``weak_pretrain_epochs``, the teacher pre-trained on the drops' weak labels first."""
    ds = ctx.dataset()
    if stage == "train-teacher" and ctx.params.teacher != "train":
        from . import registry
        from .models import load_checkpoint

        # "champion" is resolved once, here: a retry reuses this committed result, never a newer champion
        data, source = registry.teacher_checkpoint(ctx.store, registry.model_name(ds["name"]), ctx.params.teacher, ds)
        model, ckpt = load_checkpoint(data)
        return {**_save_model(ctx, "teacher", model, ckpt["arch"], ds, {"source": source}), "source": source}
    if stage == "train-teacher" and ctx.params.weak_pretrain_epochs > 0:
        return _train_teacher_weak(ctx, ds)
    arch = ctx.params.teacher_arch if stage == "train-teacher" else ctx.params.student_arch
    x, y, _ = datasets.load_split(ctx.store, ds, "train")
    name = MODEL_STAGES[stage]
    model, summary = _train_new(ctx, name, arch, ds, x, y, _recipe(ctx.params, stage), name)
    return _save_model(ctx, name, model, arch, ds, summary)


def _weak_rows(ctx: RunContext, ds: dict) -> tuple[pa.Table, list[str]]:
    """(image_id, shard, label) of the pool's images that have a usable weak label, sorted by image id,
    and the plan's drops that have weak labels."""
    p, drops = ctx.params, ctx.plan()["drops"]
    weak = datasets.load_weak_labels(ctx.store, drops)
    if weak is None:
        raise ConfigError(f"There are no weak labels for drops {', '.join(drops)} (weak_pretrain_epochs="
                          f"{p.weak_pretrain_epochs}); import them with `semisup import-weak-labels` or set "
                          "weak_pretrain_epochs=0.")
    have = [d for d in drops if ctx.store.exists(datasets.weak_labels_key(d))]
    weak = weak.filter(pc.greater_equal(weak.column("label"), 0))  # -1: no usable tag
    top = pc.max(weak.column("label")).as_py() if weak.num_rows else None
    if top is not None and top >= len(ds["classes"]):
        raise ConfigError(f"The weak labels of drops {', '.join(have)} hold class index {top}, but dataset "
                          f"{ds['name']!r} {ds['version']} has {len(ds['classes'])} classes; import them again "
                          "with `semisup import-weak-labels --dataset` naming this dataset.")
    rows = _pool_rows(ctx).join(weak, "image_id", join_type="inner").sort_by("image_id")
    if rows.num_rows == 0:
        raise ConfigError(f"The weak labels of drops {', '.join(have)} tag no image of the run's drops; import "
                          "weak labels that name their images or set weak_pretrain_epochs=0.")
    return rows, have


def _train_teacher_weak(ctx: RunContext, ds: dict) -> dict:
    """Semi-weakly supervised teacher: pre-trained on the pool's weak labels (noisy tags), then fine-tuned
    on the labeled train split (the paper's weakly-supervised pre-training of the teacher)."""
    from .train import train

    rows, have = _weak_rows(ctx, ds)
    x, y = _images_and_labels(ctx.store, rows, "label", ds)
    arch = ctx.params.teacher_arch
    model, pre = _train_new(ctx, "teacher", arch, ds, x, y, _recipe(ctx.params, "teacher-weak"), "teacher_weak")
    del x, y
    lx, ly, _ = datasets.load_split(ctx.store, ds, "train")
    fine = train(model, lx, ly, _recipe(ctx.params, "teacher-weak-finetune"), name="teacher",
                 checkpoints=_checkpoints(ctx, "teacher", "teacher"))
    log.info("teacher pre-trained on %d weakly labeled images of %s, then fine-tuned", rows.num_rows,
             ", ".join(have))
    return _save_model(ctx, "teacher", model, arch, ds,
                       {"weak_pretrain": pre, "finetune": fine, "weak_images": rows.num_rows, "weak_drops": have})


def _score_shards(ctx: RunContext, shards: list[str], score_keys: dict[str, str]) -> dict:
    """Score ``shards`` with the run's teacher, writing each to its cache key in ``score_keys``."""
    from .score import score_shards

    ds = ctx.dataset()
    teacher = _load_model(ctx, "teacher")
    outputs, images, rows = [], 0, 0
    for shard, scores in score_shards(teacher, ctx.store, shards, ctx.params.p, ds["channels"],
                                      tuple(ds["image_size"]), workers=min(4, os.cpu_count() or 1)):
        ctx.store.write_table(score_keys[shard], scores)  # one whole object per shard: never partial
        outputs.append(ctx.store.url(score_keys[shard]))
        images += scores.num_rows // ctx.params.p
        rows += scores.num_rows
        log.info("scored %s: %d images", shard, scores.num_rows // ctx.params.p)
    if len(outputs) != len(shards):
        raise RuntimeError(f"scored {len(outputs)} of {len(shards)} shards; the others yielded no image")
    return {"outputs": outputs, "images": images, "rows": rows}


def score(ctx: RunContext, shards: list[str], group: int | None) -> dict:
    """Score the shards not in the cache yet; for a plan group, also write the group's score histogram
    (the map step of the sharded selection), from every score file of the group, cached or new."""
    from .select import histogram

    keys = _score_keys(ctx, shards)
    todo = [s for s in shards if not ctx.store.exists(keys[s])]
    result = _score_shards(ctx, todo, keys) if todo else {"outputs": [], "images": 0, "rows": 0}
    result["skipped_shards"] = len(shards) - len(todo)
    if group is not None:
        score_keys = [keys[s] for s in shards]
        hist_key = _histogram_key(ctx, score_keys)
        if ctx.store.exists(hist_key):  # written whole by an earlier attempt over the same score files
            result["histogram_cells"] = ctx.store.read_table(hist_key).num_rows
        else:
            hist = histogram(ctx.store.read_table(k, columns=["cls", "score"]) for k in score_keys)
            ctx.store.write_table(hist_key, hist)
            result["histogram_cells"] = hist.num_rows
    return result


def _score_prefix(ctx: RunContext, precision: str | None = None) -> str:
    """``cache/scores/teacher-<arch>-<weights>-p<P>-<precision>``: whose scores these are."""
    from .score import scoring_precision

    trained = _model_result(ctx, "teacher")
    teacher = f"{trained['arch']}-{trained['weights_sha256'][:16]}"
    # bf16 on GPU and fp32 on CPU give slightly different scores: never mix them in one selection
    return join("cache", "scores", f"teacher-{teacher}-p{ctx.params.p}-{precision or scoring_precision()}")


def _score_keys(ctx: RunContext, shards: list[str], prefix: str | None = None) -> dict[str, str]:
    """Where each shard's scores live: ``<score prefix>/<shard sha256>.parquet``.

    Keyed by the teacher's weights digest and P and by the shard's content digest, so any run
    with the same teacher reuses every score already computed (a new drop costs only its own
    shards), and a retrained teacher or another P never reads stale scores.
    """
    prefix = prefix or _score_prefix(ctx)
    digests = ctx.shard_digests()
    # a drop imported before shard digests existed: fall back to the shard's key
    return {s: join(prefix, f"{digests.get(s) or 'key-' + s.replace('/', '__')}.parquet") for s in shards}


def _digest(value) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _histogram_key(ctx: RunContext, score_keys: list[str]) -> str:
    # named by the score files it counts: another teacher, P, precision or grouping never reads it
    return ctx.key("score", "hist", f"{_digest(score_keys)[:24]}.parquet")


def _candidates_key(ctx: RunContext, cut: dict, group: int) -> str:
    # under the thresholds' digest, which covers K, the score files and their grouping
    return ctx.key("filter", cut["digest"][:16], f"group-{group:05d}.parquet")


def _missing(ctx: RunContext, keys: list[str], what: str, rerun: str) -> None:
    missing = [k for k in keys if not ctx.store.exists(k)]
    if missing:
        raise ConfigError(f"{len(missing)} {what} file(s) are missing (first: {ctx.store.url(missing[0])}); "
                          f"rerun the {rerun} first.")


def _scored_groups(ctx: RunContext) -> tuple[str, list[list[str]]]:
    """The score prefix the score tasks wrote (GPU workers score in bf16, CPU ones in fp32, and this
    stage may run on either) and, by plan group, the score files under it."""
    from .score import scoring_precision

    groups = ctx.shard_groups()
    local = scoring_precision()
    for precision in (local, *({"bf16", "fp32"} - {local})):
        prefix = _score_prefix(ctx, precision)
        keys = _score_keys(ctx, groups[0], prefix)
        first = [keys[s] for s in groups[0]]
        if ctx.store.exists(_histogram_key(ctx, first)) or all(ctx.store.exists(k) for k in first):
            break
    else:
        prefix = _score_prefix(ctx, local)
    keys = _score_keys(ctx, [s for g in groups for s in g], prefix)
    return prefix, [[keys[s] for s in g] for g in groups]


def thresholds_stage(ctx: RunContext) -> dict:
    """The reduce step: per-class threshold bins from the groups' histograms (``thresholds/thresholds.json``)."""
    from .select import histogram, thresholds

    prefix, groups = _scored_groups(ctx)
    have = [ctx.store.exists(_histogram_key(ctx, keys)) for keys in groups]
    # a group scored by shard list (the CLI) has no histogram: its score files must all be there
    _missing(ctx, [k for keys, h in zip(groups, have, strict=True) if not h for k in keys], "score", "score tasks")

    def group_histograms():  # read again for each block of classes: never all in memory
        for keys, h in zip(groups, have, strict=True):
            yield (ctx.store.read_table(_histogram_key(ctx, keys)) if h else
                   histogram(ctx.store.read_table(k, columns=["cls", "score"]) for k in keys))

    cut = thresholds(group_histograms, ctx.params.k, len(ctx.dataset()["classes"]))
    policy = ctx.params.selection_policy
    if policy != "topk":  # the score-bin cut is top-K's: the other policies filter by their own rule
        cut = {"policy": policy, "k": ctx.params.k, "confidence_threshold": ctx.params.confidence_threshold,
               "seed": ctx.params.seed, "rows": cut["rows"]}
    cut["scores"], cut["groups_sha256"] = prefix, _digest(groups)
    cut["digest"] = _digest(cut)  # names the filter's outputs: covers the policy and its settings
    ctx.store.write_json(ctx.key("thresholds", "thresholds.json"), cut)
    if policy != "topk":
        log.info("thresholds: %d rows scored; selection policy %s filters them itself", sum(cut["rows"]), policy)
        return {"thresholds": ctx.store.url(ctx.key("thresholds", "thresholds.json")), "digest": cut["digest"],
                "rows": sum(cut["rows"]), "candidates": None, "policy": policy}
    log.info("thresholds: %d of %d rows are candidates for the top %d", sum(cut["candidates"]), sum(cut["rows"]),
             ctx.params.k)
    return {"thresholds": ctx.store.url(ctx.key("thresholds", "thresholds.json")), "digest": cut["digest"],
            "rows": sum(cut["rows"]), "candidates": sum(cut["candidates"])}


def _thresholds(ctx: RunContext) -> dict:
    if ctx.committed("thresholds") is None:
        raise ConfigError(f"Run {ctx.run_id!r} has no thresholds for these params yet; run the thresholds stage "
                          "first.")
    return ctx.store.read_json(ctx.key("thresholds", "thresholds.json"))


def filter_candidates(ctx: RunContext, group: int) -> dict:
    """The second map step: the group's rows that can still rank in their class's top K, in one file
    (for another selection policy: the rows it may still pick, see :func:`select.candidates_by_policy`)."""
    from .select import keep_candidates

    cut = _thresholds(ctx)
    key = _candidates_key(ctx, cut, group)
    if ctx.store.exists(key):  # written whole by an earlier attempt with the same thresholds: a no-op
        return {"candidates": ctx.store.url(key), "rows": ctx.store.read_table(key, columns=["cls"]).num_rows}
    shards = ctx.shard_groups()[group]
    keys = list(_score_keys(ctx, shards, cut["scores"]).values())
    _missing(ctx, keys, "score", "score tasks")
    if cut.get("policy", "topk") == "topk":
        candidates = pa.concat_tables([keep_candidates(ctx.store.read_table(k), cut["threshold_bin"]) for k in keys])
    else:
        from .select import candidates_by_policy

        candidates = candidates_by_policy((ctx.store.read_table(k) for k in keys), cut["policy"], cut["k"],
                                          cut["seed"], cut["confidence_threshold"])
    ctx.store.write_table(key, candidates)
    return {"candidates": ctx.store.url(key), "rows": candidates.num_rows}


def select_stage(ctx: RunContext) -> dict:
    """The last reduce: the selection policy over the filter tasks' candidates (``select/``)."""
    from .select import distinct_rows, select, select_by_policy, selection_stats

    cut = _thresholds(ctx)
    policy = cut.get("policy", "topk")
    keys = [_candidates_key(ctx, cut, g) for g in range(len(ctx.shard_groups()))]
    _missing(ctx, keys, "candidate", "filter tasks")
    ds = ctx.dataset()
    num_classes = len(ds["classes"])
    tables = (ctx.store.read_table(k) for k in keys)
    if policy == "topk":
        selection, counts = select(tables, ctx.params.k)
    else:
        selection, counts = select_by_policy(tables, policy, cut["k"], cut["seed"], cut["confidence_threshold"])
    untaught = [c for c, n in enumerate(ds["splits"]["train"]["class_counts"]) if n == 0]
    if untaught:  # the teacher never saw an example: its top picks there are noise the student would learn
        taught = pc.invert(pc.is_in(selection.column("cls"), pa.array(untaught, selection.column("cls").type)))
        selection = selection.filter(taught)
        log.warning("classes %s have no labeled training image: none of their pseudo-labels is kept",
                    ", ".join(ds["classes"][c] for c in untaught))
    stats = selection_stats(selection, num_classes, ctx.params.k, policy)
    stats["untaught_classes"] = untaught
    rows = sum(cut["rows"])
    stats.update(p=ctx.params.p, rows_scored=rows, images_scored=rows // ctx.params.p,
                 candidates=counts["rows_scored"], candidates_per_class=cut.get("candidates"),
                 min_score_kept=cut.get("min_score_kept"), policy=policy)
    if policy in ("threshold", "noisy_student"):
        stats["confidence_threshold"] = cut["confidence_threshold"]
    if policy == "random":
        stats["seed"] = cut["seed"]
    if policy in ("threshold", "noisy_student") and selection.num_rows == 0:
        log.warning("no image's top-1 score reaches confidence_threshold=%s: the selection is empty",
                    cut["confidence_threshold"])
    ctx.store.write_table(ctx.key("select", "selection.parquet"), selection)
    # repeats would only show the same picks twice
    stats["samples"] = _write_samples(ctx, distinct_rows(selection) if policy == "noisy_student" else selection, ds)
    ctx.store.write_json(ctx.key("select", "stats.json"), stats)
    short = sum(1 for s in stats["shortfall"] if s)
    log.info("selected %d pairs (%d images); %d classes short of K", stats["selected_pairs"],
             stats["unique_images"], short)
    return {"selection": ctx.store.url(ctx.key("select", "selection.parquet")),
            "selected_pairs": stats["selected_pairs"], "unique_images": stats["unique_images"],
            "classes_short": short}


SAMPLES_PER_END = 4  # per class: the most confident picks and the ones just above the threshold
SAMPLE_GRID_CLASSES = 20  # rows of the grid: enough to eyeball, few shard reads even with 10^4 classes


def _write_samples(ctx: RunContext, selection: pa.Table, ds: dict) -> dict | None:
    """``select/samples.png``: for the first classes that have picks, one row each of the most
    confident picks and the picks nearest the class threshold, for a person to eyeball
    pseudo-label quality. Best effort: thumbnails never fail a selection."""
    from .images import thumbnail_grid

    ctx.store.delete(ctx.key("select", "samples.png"))  # never show an earlier selection's picks
    try:
        cls = selection.column("cls").to_numpy()  # sorted by class, then rank
        picks = []
        for c in np.unique(cls)[:SAMPLE_GRID_CLASSES]:
            rows = np.flatnonzero(cls == c)
            picks.append(np.unique(np.r_[rows[:SAMPLES_PER_END], rows[-SAMPLES_PER_END:]]))
        if not picks:
            return None
        rows = selection.take(pa.array(np.concatenate(picks)))
        images = _gather_images(ctx.store, rows, ds["channels"], tuple(ds["image_size"]))
        bounds = np.cumsum([0] + [len(p) for p in picks])
        grid = thumbnail_grid([images[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                              scale=max(1, 64 // max(ds["image_size"])))
        ctx.store.write_bytes(ctx.key("select", "samples.png"), grid)
        return {"grid": ctx.store.url(ctx.key("select", "samples.png")),
                "classes": [int(cls[p[0]]) for p in picks]}
    except Exception as exc:  # decoding or drawing problems must not cost the selection
        log.warning("could not draw selection thumbnails: %s", exc)
        return None


def materialize(ctx: RunContext) -> dict:
    """The selected set as shuffled training parts of decoded pixels (``trainset/``), read by pre-training."""
    from .trainshards import write_training_shards

    ds = ctx.dataset()
    if ctx.committed("select") is None:
        raise ConfigError(f"Run {ctx.run_id!r} has no selection yet; run the select stage first.")
    selection = ctx.store.read_table(ctx.key("select", "selection.parquet"), columns=["image_id", "shard", "cls"])
    if selection.num_rows == 0:
        hint = ("lower confidence_threshold" if ctx.params.selection_policy in ("threshold", "noisy_student")
                else "check the drops and K")
        raise ConfigError(f"The selection is empty: the teacher selected no image; {hint}.")
    half = ctx.params.materialize_memory_mb << 19  # bytes: half for the spill buffer, half for one bucket
    width = ds["channels"] * ds["image_size"][0] * ds["image_size"][1]
    manifest = write_training_shards(ctx.store, ctx.key("trainset"), selection, ds["channels"],
                                     tuple(ds["image_size"]), seed=ctx.params.seed,
                                     bucket_rows=max(1, half // width), spill_bytes=half)
    return {"trainset": ctx.store.url(ctx.key("trainset", "manifest.json")), "rows": manifest["count"],
            "parts": len(manifest["parts"])}


def pretrain_student(ctx: RunContext) -> dict:
    """The student on the selected set, streamed from the training parts (never all in memory); with
    Noisy Student's options, on the teacher's soft labels and with labeled images in every batch."""
    from .train import ArraySource, MixedSource, TeacherTargets, train_stream
    from .trainshards import ShardStream

    ds = ctx.dataset()
    if ctx.committed("trainset") is None:
        raise ConfigError(f"Run {ctx.run_id!r} has no training set yet; run the materialize stage first.")
    recipe = _recipe(ctx.params, "pretrain-student")
    arch = ctx.params.student_arch
    model = _new_model(arch, ds, recipe)
    source = ShardStream(ctx.store, ctx.key("trainset"))
    if ctx.params.soft_labels:
        source = TeacherTargets(source, _load_model(ctx, "teacher"))
    if ctx.params.pretrain_labeled_fraction:
        x, y, _ = datasets.load_split(ctx.store, ds, "train")
        source = MixedSource(source, ArraySource(x, y), ctx.params.pretrain_labeled_fraction, recipe.batch_size)
    summary = train_stream(model, source, recipe, name="student_pretrained",
                           checkpoints=_checkpoints(ctx, "student_pretrained", "student_pretrained"))
    return _save_model(ctx, "student_pretrained", model, arch, ds, summary)


def finetune_student(ctx: RunContext) -> dict:
    from .train import train

    ds = ctx.dataset()
    model = _load_model(ctx, "student_pretrained")
    x, y, _ = datasets.load_split(ctx.store, ds, "train")
    summary = train(model, x, y, _recipe(ctx.params, "finetune-student"), name="student",
                    checkpoints=_checkpoints(ctx, "student", "student"))
    return _save_model(ctx, "student", model, ctx.params.student_arch, ds, summary)


def train_oracle(ctx: RunContext) -> dict:
    """The ceiling: the student recipe with the pool's true labels instead of pseudo-labels."""
    from .train import train

    plan_ = ctx.plan()
    if not plan_["oracle"]:
        return {"skipped": True, "reason": "no ground truth for the drops, or oracle=false"}
    ds = ctx.dataset()
    truth = datasets.load_truth(ctx.store, plan_["drops"])
    pool = _pool_rows(ctx).join(truth.select(["image_id", "label"]), "image_id", join_type="inner")
    pool = pool.filter(pc.greater_equal(pool.column("label"), 0)).sort_by("image_id")  # drop distractors
    x, y = _images_and_labels(ctx.store, pool, "label", ds)
    arch = ctx.params.student_arch
    model, pre = _train_new(ctx, "oracle", arch, ds, x, y, _recipe(ctx.params, "oracle-pretrain"), "oracle_pretrain")
    lx, ly, _ = datasets.load_split(ctx.store, ds, "train")
    fine = train(model, lx, ly, _recipe(ctx.params, "oracle-finetune"), name="oracle",
                 checkpoints=_checkpoints(ctx, "oracle", "oracle"))
    return _save_model(ctx, "oracle", model, arch, ds, {"pretrain": pre, "finetune": fine})


def evaluate_stage(ctx: RunContext) -> dict:
    from .evaluate import classification_metrics, tail_classes
    from .models import load_checkpoint
    from .report import write_report
    from .train import predict

    plan_ = ctx.plan()
    ds = ctx.dataset()
    train_counts = ds["splits"]["train"]["class_counts"]
    tail = tail_classes(train_counts)
    test_x, test_y, _ = datasets.load_split(ctx.store, ds, "test")
    drop_details = []  # per drop: images kept and skipped (corrupt, truncated, too large) with the reasons
    for drop_id in plan_["drops"]:
        dm = datasets.load_drop_manifest(ctx.store, drop_id)
        drop_details.append({"drop_id": drop_id, "images": dm["count"], "skipped": dm.get("skipped", 0),
                             "skipped_reasons": dm.get("skipped_reasons", {})})
    models = {}
    for name in MODEL_STAGES.values():
        trained = ctx.committed(name)
        if trained is None or trained.get("skipped"):
            continue  # not trained in this run (the oracle without ground truth)
        model, ckpt = load_checkpoint(ctx.store.read_bytes(trained["model_key"]))
        metrics = classification_metrics(predict(model, test_x), test_y, tail)
        metrics.update(val_top1=trained["val_top1"], arch=ckpt["arch"])
        models[name] = metrics
    if ctx.committed("select") is None:
        raise ConfigError(f"Run {ctx.run_id!r} has no selection yet; run the select stage first.")
    selection_stats = ctx.store.read_json(ctx.key("select", "stats.json"))
    selection_stats.update(_pseudo_label_quality(ctx, plan_, len(ds["classes"])))
    metrics = {
        "run_id": ctx.run_id,
        "finished_at": datetime.now(UTC).isoformat(),
        "dataset": {"name": ds["name"], "version": ds["version"], "classes": ds["classes"],
                    "train_class_counts": train_counts, "tail_classes": tail},
        "drops": plan_["drops"],
        "drop_details": drop_details,
        "models": models,
        "selection": selection_stats,
        "params": ctx.params.to_dict(),
    }
    samples = ctx.store.read_bytes(ctx.key("select", "samples.png")) if selection_stats.get("samples") else None
    files = write_report(ctx.store, ctx.run_id, metrics, samples=samples)
    summary = {name: {k: m[k] for k in ("top1", "top5", "balanced_accuracy", "tail_recall")}
               for name, m in models.items()}
    return {"metrics": files.get("metrics.json"), "report": files.get("report.html"), "summary": summary}


def register_stage(ctx: RunContext) -> dict:
    """The run's student into the model registry as a new version with its model card; the champion moves
    to it only when it beats the champion's validation top-1 by more than ``promotion_margin``."""
    from . import registry

    if ctx.committed("evaluate") is None:
        raise ConfigError(f"Run {ctx.run_id!r} has no evaluation yet; run the evaluate stage first.")
    student, teacher = _model_result(ctx, "student"), _model_result(ctx, "teacher")
    metrics = ctx.store.read_json(ctx.key("evaluate", "metrics.json"))
    card = registry.build_card(run_id=ctx.run_id, code_version=code_version(), metrics=metrics, student=student,
                               teacher=teacher)
    result = registry.register_run(ctx.store, registry.model_name(metrics["dataset"]["name"]),
                                   model_bytes=ctx.store.read_bytes(student["model_key"]), model_card=card,
                                   margin=ctx.params.promotion_margin)
    log.info("registered %s: %s", result["version"], result["reason"])
    return result


def _pseudo_label_quality(ctx: RunContext, plan_: dict, num_classes: int) -> dict:
    truth = datasets.load_truth(ctx.store, plan_["drops"]) if plan_["truth"] else None
    if truth is None:
        return {"pseudo_label_precision": None, "per_class_precision": None, "distractors_selected": None}
    sel = ctx.store.read_table(ctx.key("select", "selection.parquet"), columns=["image_id", "cls"])
    joined = sel.join(truth.select(["image_id", "label"]), "image_id", join_type="inner")
    cls = joined.column("cls").to_numpy()
    correct = cls == joined.column("label").to_numpy()
    per_class = [float(correct[cls == c].mean()) if (cls == c).any() else None for c in range(num_classes)]
    return {"pseudo_label_precision": float(correct.mean()) if len(cls) else None,
            "per_class_precision": per_class,
            "distractors_selected": int((joined.column("label").to_numpy() < 0).sum())}


STAGES: dict[str, Callable[..., dict]] = {
    "plan": plan,
    "train-teacher": lambda ctx: train_labeled(ctx, "train-teacher"),
    "train-baseline": lambda ctx: train_labeled(ctx, "train-baseline"),
    "train-oracle": train_oracle,
    "score": score,
    "thresholds": thresholds_stage,
    "filter": filter_candidates,
    "select": select_stage,
    "materialize": materialize,
    "pretrain-student": pretrain_student,
    "finetune-student": finetune_student,
    "evaluate": evaluate_stage,
    "register": register_stage,
}
STAGE_DIRS = {"plan": "plan", "thresholds": "thresholds", "select": "select", "materialize": "trainset",
              "evaluate": "evaluate", "register": "register", **MODEL_STAGES}


GROUP_STAGES = ("score", "filter")  # mapped over the plan's shard groups; no manifest of their own


def _stage_shards(ctx: RunContext, name: str, shards: list[str] | None, group: int | None):
    """The shards a group stage works on: a plan group's, or (score only) the keys given."""
    if group is not None:
        groups = ctx.shard_groups()
        if not 0 <= group < len(groups):
            raise ConfigError(f"Shard group {group} does not exist; the plan has groups 0 to {len(groups) - 1}.")
        return groups[group], group
    if name != "score" or not shards:
        raise ConfigError(f"The {name} stage needs --group" + (" or --shards" if name == "score" else "") + ".")
    return list(dict.fromkeys(shards)), None  # a shard listed twice is scored once


def run_stage(name: str, store: Store, run_id: str, params: dict, shards: list[str] | None = None,
              group: int | None = None) -> dict:
    """Run one stage, or return its recorded result when it already ran with the same params.

    The score stage takes its shards as keys, or as the index of one of the plan's shard groups;
    the filter stage takes a group index.
    """
    if name not in STAGES:
        raise ConfigError(f"Unknown stage {name!r}; stages are {', '.join(STAGES)}.")
    pp = PipelineParams.from_dict(params)
    ctx = RunContext(store, run_id, pp)
    started = time.time()
    from .distributed import is_main

    if name not in TRAINING_STAGES and not is_main():
        return {}  # launched under torchrun, a stage without training runs on rank 0 alone
    if name in GROUP_STAGES:
        shards, group = _stage_shards(ctx, name, shards, group)
        return score(ctx, shards, group) if name == "score" else filter_candidates(ctx, group)
    stage_dir = STAGE_DIRS[name]
    fingerprint = ctx.fingerprint()
    done = ctx.manifest_matches(stage_dir, fingerprint)
    if done is not None:
        log.info("%s already done for run %s with these params; skipping", name, run_id)
        if name in TRAINING_STAGES and is_main():  # killed between its commit and the cleanup below
            store.delete_prefix(ctx.key(stage_dir, "checkpoints"))
        return done
    log.info("running %s for run %s", name, run_id)
    result = ctx.commit(stage_dir, fingerprint, STAGES[name](ctx), started)
    if name in TRAINING_STAGES and is_main():  # the model is committed: its resume points are spent
        store.delete_prefix(ctx.key(stage_dir, "checkpoints"))
    return result


def run_pipeline(store: Store, run_id: str, params: dict) -> dict:
    """Every stage in order, in this process: the same work the Airflow DAG does, without Airflow."""
    results = {"plan": run_stage("plan", store, run_id, params)}
    if not results["plan"]["gate"]["run"]:  # the DAG's gate task: skipped after plan, saying why
        log.info("run %s skipped: %s", run_id, results["plan"]["gate"]["reason"])
        return {"skipped": True, "reason": results["plan"]["gate"]["reason"], "plan": results["plan"]}
    for name in ("train-teacher", "train-baseline", "train-oracle"):
        results[name] = run_stage(name, store, run_id, params)
    groups = range(results["plan"]["score_groups"])
    results["score"] = [run_stage("score", store, run_id, params, group=g) for g in groups]
    results["thresholds"] = run_stage("thresholds", store, run_id, params)
    results["filter"] = [run_stage("filter", store, run_id, params, group=g) for g in groups]
    for name in ("select", "materialize", "pretrain-student", "finetune-student", "evaluate", "register"):
        results[name] = run_stage(name, store, run_id, params)
    return {**results["evaluate"], "registered": results["register"]}
