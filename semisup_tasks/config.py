"""Pipeline parameters: one typed dataclass, unknown keys rejected, saved next to every run.

The Airflow DAG builds its ``Param`` form from :func:`param_specs`, so the UI form, the REST
conf, the CLI and the stages all validate against the same definitions. Importing this module
must stay cheap (no torch): DAG files import it at parse time.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_STORE = "file://./.semisup/store"  # the embedded store, a folder ignored by git
#: the pipeline's stages, in order; the ones that train a model run data-parallel under torchrun
TRAINING_STAGES = ("train-teacher", "train-baseline", "train-oracle", "pretrain-student", "finetune-student")
STAGE_NAMES = ("plan", *TRAINING_STAGES[:3], "score", "thresholds", "filter", "select", "materialize",
               *TRAINING_STAGES[3:], "evaluate", "register")


#: YYYY-MM-DD or empty (no "format": "date": the form would then refuse the empty default)
OPTIONAL_DAY = r"^(|\d{4}-\d{2}-\d{2})$"


#: params that change how a run goes, not what it computes: changing them redoes no committed stage
OPERATIONAL_PARAMS = ("checkpoint_every_steps",)


class ConfigError(ValueError):
    """A parameter a user can fix."""


ARCHITECTURES = ("cnn_small", "cnn_medium", "cnn_large", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small")


def _p(default: Any, description: str, section: str, **schema: Any) -> Any:
    meta = {"description": description, "section": section, "schema": schema}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PipelineParams:
    # data
    dataset: str = _p("mnist-demo", "Labeled dataset name in the store.", "Data", type="string", minLength=1)
    dataset_version: str = _p("latest", "Dataset version, or 'latest'.", "Data", type="string", minLength=1)
    drops: list = _p([], "Unlabeled drop ids to use; empty means every committed drop.", "Data",
                     type="array", items={"type": "string"})
    drops_last: int = _p(0, "Use only the N most recent drops (by landing date, then id); 0 means all.", "Data",
                         type="integer", minimum=0)
    drops_since: str = _p("", "Use only drops that landed on or after this day (YYYY-MM-DD); empty means no bound. "
                              "A drop without a known date (none in its manifest or its id) is left out.", "Data",
                          type="string", pattern=OPTIONAL_DAY)
    min_new_images: int = _p(0, "Skip the run (after plan, visibly) when the selected drops hold fewer images than "
                                "this that the champion was not trained on; 0 always runs.", "Data",
                             type="integer", minimum=0)
    oracle: bool = _p(True, "Also train the oracle (student on the pool's true labels) when the store "
                            "has them (the demo does).", "Data", type="boolean")
    # models
    teacher: str = _p("train", "Where the teacher comes from: train (on the labeled set), champion (the registry's "
                               "current champion: iterate the method) or a registered version such as v3.", "Models",
                      type="string", pattern="^(train|champion|v[1-9][0-9]*)$")
    promotion_margin: float = _p(0.0, "The student replaces the champion only when its validation top-1 is higher "
                                      "by more than this (0: strictly better).", "Models", type="number", minimum=0,
                                 maximum=1)
    teacher_arch: str = _p("cnn_medium", "Teacher architecture.", "Models", type="string", enum=list(ARCHITECTURES))
    student_arch: str = _p("cnn_small", "Student architecture (also used for the baseline and the oracle).",
                           "Models", type="string", enum=list(ARCHITECTURES))
    # selection
    k: int = _p(250, "Images kept per class (top-K).", "Selection", type="integer", minimum=1)
    p: int = _p(3, "Classes kept per image (top-P); must not exceed the number of classes.", "Selection",
                type="integer", minimum=1)
    selection_policy: str = _p("topk", "How the pseudo-labeled set is chosen: topk (the paper: the K best-scoring "
                                       "images per class over every image's top-P classes), threshold (every image "
                                       "whose top-1 score is at least confidence_threshold, unbalanced), random (K "
                                       "images per class drawn at random, seeded, among those whose top-1 class it "
                                       "is) or noisy_student (top-1 score at least confidence_threshold, then every "
                                       "class brought to exactly K: its most confident, or all of them repeated).",
                               "Selection", type="string", enum=["topk", "threshold", "random", "noisy_student"])
    confidence_threshold: float = _p(0.3, "Lowest top-1 score kept by the threshold and noisy_student selection "
                                          "policies (Noisy Student used 0.3 on ImageNet); unused by topk and random.",
                                     "Selection", type="number", minimum=0, maximum=1)
    max_score_tasks: int = _p(512, "At most this many mapped score tasks: larger pools get larger shard groups "
                                   "(Airflow's max_map_length is 1024).", "Selection", type="integer", minimum=1,
                              maximum=1024)
    shards_per_task: int = _p(2, "Drop shards scored by one mapped task (at least; see max_score_tasks).",
                              "Selection", type="integer", minimum=1)
    materialize_memory_mb: int = _p(1024, "Memory the materialize stage's shuffle may use (its spill buffer and one "
                                          "bucket, half each). The spill objects number about (selected pixels / "
                                          "half of it) squared: give it more for large selections.", "Selection",
                                    type="integer", minimum=16)
    # training
    teacher_epochs: int = _p(40, "Teacher epochs on the labeled train split.", "Training", type="integer", minimum=1)
    weak_pretrain_epochs: int = _p(0, "Semi-weakly supervised: first pre-train the teacher this many epochs on the "
                                      "drops' weak labels (weak/drops/<id>.parquet, see semisup import-weak-labels), "
                                      "then train it on the labeled set with finetune_lr; 0: off.", "Training",
                                   type="integer", minimum=0)
    pretrain_epochs: int = _p(10, "Student pre-training epochs on the selected set.", "Training",
                              type="integer", minimum=1)
    soft_labels: bool = _p(False, "Noisy Student: pre-train the student on the teacher's softmax over every class "
                                  "(temperature 1, computed on the un-augmented image) instead of the selected "
                                  "class (an image selected for several classes gets the same distribution each "
                                  "time); false: the paper's hard labels.", "Training", type="boolean")
    pretrain_labeled_fraction: float = _p(0.0, "Noisy Student: this fraction of every pre-training batch (at least "
                                               "one image) is labeled images with their true labels, the rest "
                                               "selected ones, so an epoch over the selected set takes more steps; "
                                               "0: the paper's pre-training on the selected set alone.", "Training",
                                          type="number", minimum=0, maximum=0.9)
    finetune_epochs: int = _p(40, "Fine-tuning epochs on the labeled set (the baseline uses the same).",
                              "Training", type="integer", minimum=1)
    finetune_lr: float = _p(0.03, "Peak learning rate for fine-tuning (and the baseline).", "Training",
                            type="number", exclusiveMinimum=0)
    lr: float = _p(0.05, "Peak learning rate for teacher and student pre-training.", "Training",
                   type="number", exclusiveMinimum=0)
    optimizer: str = _p("sgd", "Optimizer.", "Training", type="string", enum=["sgd", "adamw"])
    weight_decay: float = _p(5e-4, "Weight decay.", "Training", type="number", minimum=0)
    batch_size: int = _p(64, "Batch size (at least 2: batch norm needs two samples).", "Training",
                         type="integer", minimum=2)
    warmup_epochs: float = _p(1.0, "Linear warm-up before the cosine schedule, in epochs.", "Training",
                              type="number", minimum=0)
    augment: str = _p("affine", "Augmentation: none, affine (shift/scale/rotate), or affine+flip for "
                                "natural images.", "Training", type="string", enum=["none", "affine", "affine+flip"])
    balanced_sampling: bool = _p(False, "Sample labeled classes equally often.", "Training", type="boolean")
    checkpoint_every_steps: int = _p(500, "Save the whole training state to the store every this many steps (and "
                                          "after every epoch): a retried training task resumes from it.",
                                     "Training", type="integer", minimum=1)
    seed: int = _p(0, "Seed for every random choice; the same seed gives the same numbers on CPU.", "Training",
                   type="integer", minimum=0)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PipelineParams:
        data = dict(data or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            lower = {name.lower(): name for name in known}
            named = []
            for name in unknown:  # a likely typo gets its correction
                close = difflib.get_close_matches(name.lower(), lower, n=1, cutoff=0.7)
                named.append(f"{name} (did you mean {lower[close[0]]}?)" if close else name)
            raise ConfigError(f"Unknown parameter(s) {', '.join(named)}; remove them or use known ones: "
                              f"{', '.join(known)}.")
        values = {}
        for name, value in data.items():
            values[name] = _check(name, value, known[name].metadata["schema"], known[name].metadata["description"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_KINDS = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
          "array": "a list"}


def _check(name: str, value: Any, schema: dict[str, Any], description: str = "") -> Any:
    kind = schema["type"]
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    python = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list}[kind]
    if not isinstance(value, python) or (kind in ("integer", "number") and isinstance(value, bool)):
        raise ConfigError(f"Parameter {name} must be {_KINDS[kind]}, got {value!r}.")
    if "enum" in schema and value not in schema["enum"]:
        raise ConfigError(f"Parameter {name} must be one of {', '.join(schema['enum'])}, got {value!r}.")
    if "minimum" in schema and value < schema["minimum"]:
        raise ConfigError(f"Parameter {name} must be at least {schema['minimum']}, got {value!r}.")
    if "maximum" in schema and value > schema["maximum"]:
        raise ConfigError(f"Parameter {name} must be at most {schema['maximum']}, got {value!r}.")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        raise ConfigError(f"Parameter {name} must be greater than {schema['exclusiveMinimum']}, got {value!r}.")
    if "pattern" in schema and not re.fullmatch(schema["pattern"], value):
        raise ConfigError(f"Parameter {name} cannot be {value!r}: {description[0].lower()}{description[1:]}")
    if schema.get("pattern") == OPTIONAL_DAY and value:  # the pattern lets 2026-02-30 through
        _check_date(name, value)
    if schema.get("minLength") and len(value) < schema["minLength"]:
        raise ConfigError(f"Parameter {name} must not be empty.")
    if kind == "array" and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"Parameter {name} must be a list of strings, got {value!r}.")
    return value


def _check_date(name: str, value: str) -> None:
    from datetime import date

    try:
        date.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"Parameter {name} is not a real day: {value!r}; write it as YYYY-MM-DD.") from None


def param_specs() -> dict[str, dict[str, Any]]:
    """Per parameter: default, JSON schema, description and form section (for Airflow ``Param``)."""
    specs = {}
    for f in dataclasses.fields(PipelineParams):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        specs[f.name] = {"default": default, "description": f.metadata["description"],
                         "section": f.metadata["section"], "schema": dict(f.metadata["schema"])}
    return specs
