"""The transfer variant of the experiments: fine-tune on a target labeled dataset, from a checkpoint or scratch.

The paper's CUB-2011 experiment in miniature: a model trained on one task (say the MNIST demo's
teacher or student) is fine-tuned on another, small labeled task (say ``demo_shapes``, or any
dataset imported into the store), and compared with the same model trained from scratch. Every
tensor of the checkpoint whose name and shape match the new model is copied; the rest (the
classifier head, whose class count differs) keeps its fresh, seeded initialisation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from . import datasets
from .config import ConfigError
from .evaluate import classification_metrics, tail_classes
from .models import build_model, load_checkpoint
from .store import Store
from .train import Recipe, predict, train

log = logging.getLogger("semisup.transfer")


def copy_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy into ``model`` every tensor of ``state_dict`` whose name and shape match one of the model's;
    returns the names copied, in the model's order. The others keep their current values."""
    own = model.state_dict()
    copied = [name for name, tensor in own.items()
              if name in state_dict and tuple(state_dict[name].shape) == tuple(tensor.shape)]
    model.load_state_dict({**own, **{name: state_dict[name] for name in copied}})
    return copied


def fine_tune(store: Store, dataset: str, version: str, init: bytes | None, arch: str, recipe: Recipe) -> dict:
    """Train ``arch`` on the train split of ``dataset`` ``version`` (or "latest"), starting from the
    checkpoint bytes ``init`` (as :func:`semisup_tasks.models.checkpoint_bytes` writes them) or, with
    None, from scratch; evaluate on its test split.

    Returns top1, top5, balanced_accuracy, tail_recall, transferred (tensors copied from ``init``),
    tensors (the model's total), init ("scratch" or "checkpoint") and train_images.
    """
    ds = datasets.load_dataset_manifest(store, dataset, version)
    for split in ("train", "test"):
        if ds["splits"].get(split, {}).get("count", 0) == 0:
            raise ConfigError(f"Dataset {dataset!r} {ds['version']} has no {split} images; fine-tuning needs "
                              "labeled train and test images, so import it with both.")
    channels, num_classes, size = int(ds["channels"]), len(ds["classes"]), tuple(ds["image_size"])

    state = None
    if init is not None:
        _, ckpt = load_checkpoint(init)  # weights_only: pickled code is refused
        if ckpt["arch"] != arch:
            raise ConfigError(f"The checkpoint is a {ckpt['arch']} model but the fine-tuning arch is {arch}; "
                              f"pass arch={ckpt['arch']!r} or a {arch} checkpoint.")
        if int(ckpt["in_channels"]) != channels:
            raise ConfigError(f"The checkpoint takes {ckpt['in_channels']}-channel images but dataset "
                              f"{dataset!r} has {channels}-channel images; use a checkpoint trained on "
                              f"{channels}-channel images (or train from scratch).")
        state = ckpt["state_dict"]

    torch.manual_seed(recipe.seed)  # the same seed gives the same fresh weights, head included
    model = build_model(arch, channels, num_classes, size)
    tensors = len(model.state_dict())
    copied = copy_matching(model, state) if state is not None else []
    if state is not None:
        log.info("%s on %s %s: copied %d of %d tensors from the checkpoint; not copied: %s", arch, dataset,
                 ds["version"], len(copied), tensors,
                 ", ".join(n for n in model.state_dict() if n not in set(copied)) or "none")

    x, y, _ = datasets.load_split(store, ds, "train")
    train(model, x, y, recipe, name=f"transfer-{dataset}")
    x_test, y_test, _ = datasets.load_split(store, ds, "test")
    metrics = classification_metrics(predict(model, x_test), y_test,
                                     tail_classes(ds["splits"]["train"]["class_counts"]))
    return {
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "tail_recall": metrics["tail_recall"],
        "transferred": len(copied),
        "tensors": tensors,
        "init": "scratch" if init is None else "checkpoint",
        "train_images": int(len(y)),
    }
