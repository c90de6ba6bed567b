"""One training loop for every model of a run: teacher, baseline, student pre-training,
fine-tuning and the oracle. SGD (Nesterov) or AdamW, linear warm-up then cosine decay,
per-sample random affine augmentation, optional class-balanced sampling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .distributed import training_device

log = logging.getLogger("semisup.train")


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    batch_size: int = 64
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    augment: str = "affine"
    balanced_sampling: bool = False
    seed: int = 0
    momentum: float = 0.9


def prepare(batch: torch.Tensor) -> torch.Tensor:
    """uint8 NxCxHxW to the normalised float input every model sees."""
    return (batch.float() / 255.0 - 0.5) / 0.25


BLACK = (0.0 - 0.5) / 0.25  # a 0 pixel after prepare(): the background augmentation fills in


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator, part: slice | None = None,
                  total: int | None = None) -> torch.Tensor:
    """Random shift (±10%), scale (0.9–1.1) and rotation (±10°) per sample; optional horizontal flip.

    With ``part``, ``x`` holds only those rows of a batch of ``total``: the draws are the whole
    batch's, so a batch split across processes is augmented exactly as in one process.
    """
    if kind == "none":
        return x
    theta = _affine_draws(x.shape[0] if total is None else total, kind, gen)
    if part is not None:
        theta = theta[part]
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    # zero padding of (x - BLACK), shifted back: the background is black
    return F.grid_sample(x - BLACK, grid, align_corners=False, padding_mode="zeros") + BLACK


def _affine_draws(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """The random affine matrices of a batch of ``n``: every draw augmentation takes from ``gen``."""
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 0.9 + torch.rand(n, generator=gen) * 0.2
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.2
    flip = torch.ones(n)
    if kind == "affine+flip":
        flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                        torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def epoch_order(labels: torch.Tensor, balanced: bool, gen: torch.Generator) -> torch.Tensor:
    """One epoch of sample indices: a permutation, or a class-balanced draw with replacement."""
    n = len(labels)
    if not balanced:
        return torch.randperm(n, generator=gen)
    counts = torch.bincount(labels).float()
    return torch.multinomial((1.0 / counts)[labels], n, replacement=True, generator=gen)


class BatchSource(Protocol):
    """Where the loop's batches come from: ``len()`` rows, and per epoch (uint8 NxCxHxW, int64 labels or
    float NxC target distributions) batches of ``batch_size`` (an epoch's last may be smaller), all random
    draws from ``gen``."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class ArraySource:
    """In-memory images and labels; the one source that can sample class-balanced (it needs every label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, balanced: bool = False):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels; pass one label per image.")
        self.x = torch.from_numpy(np.ascontiguousarray(images))
        self.y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.balanced = balanced

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.y, self.balanced, gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.x[idx], self.y[idx]


class TeacherTargets:
    """Noisy Student's soft pseudo-labels: every batch of ``source`` with its labels replaced by the teacher's
    softmax (temperature 1) over all classes, computed on the un-noised images (the loop augments after).
    The targets are float NxC probabilities, which the loop's cross-entropy takes as they are.

    The teacher runs on every batch it yields (each epoch, batches replayed on a resume, and under torchrun
    on the whole global batch in each process): one teacher forward per step, against storing N x C targets."""

    def __init__(self, source: BatchSource, teacher: nn.Module):
        self.source, self.teacher = source, teacher

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, _ in self.source.batches(batch_size, gen):
            yield x, predict(self.teacher, x).softmax(dim=1)  # predict: eval mode, no gradients


class MixedSource:
    """Noisy Student's batches: each of ``batch_size`` rows ends with ``round(batch_size * fraction)`` labeled
    rows (at least one, at most ``batch_size - 1``; true labels, one-hot when the pseudo-labels are soft),
    the rest from ``pseudo``. An epoch is one pass over ``pseudo``, so mixing adds steps to it; the labeled
    rows are taken in turn from seeded permutations of the labeled set."""

    def __init__(self, pseudo: BatchSource, labeled: ArraySource, fraction: float, batch_size: int):
        self.pseudo, self.labeled, self.batch_size = pseudo, labeled, batch_size
        self.mixed = min(batch_size - 1, max(1, round(batch_size * fraction)))
        if not 0 < fraction < 1 or len(labeled) == 0:
            raise ValueError(f"Mixing needs a fraction in (0, 1) and labeled images, got {fraction} and "
                             f"{len(labeled)} images.")

    def __len__(self) -> int:  # the rows of one epoch, so the loop counts its steps right
        steps = math.ceil(len(self.pseudo) / (self.batch_size - self.mixed))
        return len(self.pseudo) + steps * self.mixed

    def batches(self, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size != self.batch_size:
            raise ValueError(f"This source mixes batches of {self.batch_size}, not {batch_size}.")
        order = torch.empty(0, dtype=torch.int64)
        for x, y in self.pseudo.batches(batch_size - self.mixed, gen):
            while len(order) < self.mixed:  # a labeled set smaller than a batch's share is passed over again
                order = torch.cat([order, torch.randperm(len(self.labeled), generator=gen)])
            idx, order = order[:self.mixed], order[self.mixed:]
            lx, ly = self.labeled.x[idx], self.labeled.y[idx]
            if y.is_floating_point():  # soft pseudo-labels: the true labels as certain distributions
                ly = F.one_hot(ly, y.shape[1]).to(y.dtype)
            yield torch.cat([x, lx]), torch.cat([y, ly])


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, recipe: Recipe, name: str = "model",
          checkpoints: Checkpoints | None = None) -> dict:
    """Train in place on uint8 NxCxHxW images with int labels; returns a small training summary."""
    if len(images) == 0:
        raise ValueError(f"{name}: no training images")
    return _fit(model, ArraySource(images, labels, recipe.balanced_sampling), recipe, name, checkpoints)


def train_stream(model: nn.Module, source: BatchSource, recipe: Recipe, name: str = "model",
                 checkpoints: Checkpoints | None = None) -> dict:
    """Train in place from a batch source such as :class:`semisup_tasks.trainshards.ShardStream`."""
    if recipe.balanced_sampling and not isinstance(source, ArraySource):
        raise ValueError(f"{name}: balanced sampling needs in-memory images; train from arrays or set "
                         "balanced_sampling to false.")
    if len(source) == 0:
        raise ValueError(f"{name}: no training images")
    return _fit(model, source, recipe, name, checkpoints)


class Checkpoints(Protocol):
    """Where the loop keeps its latest state (see :class:`semisup_tasks.checkpoints.StoreCheckpoints`)."""

    every_steps: int

    def load(self, shape: str) -> dict | None: ...

    def save(self, state: dict, shape: str) -> None: ...

    def clear(self) -> None: ...


def _rng_states(device: torch.device) -> dict:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _fit(model: nn.Module, source: BatchSource, recipe: Recipe, name: str,
         checkpoints: Checkpoints | None = None) -> dict:
    """The one training loop; the order of draws from the seeded generator is the same for every source.

    Under torchrun every process draws the same global batches and trains on its stride of each
    (see :mod:`semisup_tasks.distributed`): the result follows the one-process run.

    With ``checkpoints``, the whole state is saved every ``every_steps`` steps and after every epoch,
    and a saved state is resumed: the epoch's batches before it are drawn again (without training)
    so the generator continues exactly where it was, and the result equals an uninterrupted run.
    """
    distributed.init_from_env()
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    n = len(source)
    steps_per_epoch = max(1, math.ceil(n / recipe.batch_size))
    total = steps_per_epoch * recipe.epochs
    rank, world = distributed.rank(), distributed.world_size()
    device = training_device()
    # channels-last: ~20% faster convolutions on CPU, and what tensor cores want; before DDP takes the params
    model.to(device=device, memory_format=torch.channels_last)
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(global_batch_norm(model),
                                      device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(recipe.seed + rank)  # own dropout masks per process; batches and augmentation use gen
    if recipe.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=True,
                              weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total, int(recipe.warmup_epochs * steps_per_epoch)))
    shape = f"rows={n} epochs={recipe.epochs} batch={recipe.batch_size} processes={world}"
    losses: list[float] = []
    first_epoch, resume_batch, step, resumed_loss = 0, 0, 0, 0.0
    saved = checkpoints.load(shape) if checkpoints is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["epoch_generator"])
        first_epoch, resume_batch, step = saved["epoch"], saved["batch"], saved["step"]
        losses = list(saved["losses"])
        resumed_loss = saved["processes"][rank]["epoch_loss"]
        _set_rng_states(saved["processes"][rank]["rng"], device)
        if rank == 0:
            log.info("%s: resuming at step %d of %d (epoch %d, batch %d)", name, step, total, first_epoch + 1,
                     resume_batch)

    def save(epoch: int, batch: int, epoch_generator: torch.Tensor, epoch_loss: float) -> None:
        mine = {"rng": _rng_states(device), "epoch_loss": epoch_loss}
        processes = [mine]
        if world > 1:  # every process's RNG states, gathered to rank 0
            processes = [None] * world
            torch.distributed.all_gather_object(processes, mine)
        if rank == 0:
            checkpoints.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "epoch_generator": epoch_generator,
                              "generator": gen.get_state(), "epoch": epoch, "batch": batch, "step": step,
                              "losses": losses, "processes": processes}, shape)

    model.train()
    for epoch in range(first_epoch, recipe.epochs):
        epoch_generator = gen.get_state()  # what a resume within this epoch starts the epoch's draws from
        epoch_loss = torch.zeros(1, dtype=torch.float64, device=device)  # the sum of per-sample losses
        replay = resume_batch if epoch == first_epoch else 0
        if replay:
            epoch_loss += resumed_loss
        for batch, (x_u8, y) in enumerate(source.batches(recipe.batch_size, gen)):
            if len(y) < max(2, world) and n >= 2:  # BatchNorm needs two samples, every process one
                continue
            if batch < replay:  # trained before the resume: only the draws, to move gen on
                if recipe.augment != "none":
                    _affine_draws(len(y), recipe.augment, gen)
                if batch + 1 == replay and not torch.equal(gen.get_state(), saved["generator"]):
                    checkpoints.clear()
                    raise RuntimeError(f"{name}: the checkpoint does not match this training's batches; it was "
                                       "deleted, so a retry starts over")
                continue
            x_u8, y = x_u8.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if world > 1:  # this process's stride of the global batch
                part, size = slice(rank, None, world), len(y)
                x = augment_batch(prepare(x_u8[part]), recipe.augment, gen, part, size)
                y = y[part]
            else:
                x = augment_batch(prepare(x_u8), recipe.augment, gen)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = net(x.contiguous(memory_format=torch.channels_last))
            logits = logits.float()
            if world > 1:  # DDP averages over processes: scale the sum so the mean is the global batch's
                loss = F.cross_entropy(logits, y, reduction="sum") * world / size
            else:
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            epoch_loss += loss.item() * (size / world if world > 1 else len(y))
            if checkpoints is not None and step % checkpoints.every_steps == 0 and batch + 1 < steps_per_epoch:
                save(epoch, batch + 1, epoch_generator, float(epoch_loss))
        if world > 1:
            torch.distributed.all_reduce(epoch_loss)
        losses.append(float(epoch_loss) / n)
        if rank == 0:
            log.info("%s epoch %d/%d loss %.4f", name, epoch + 1, recipe.epochs, losses[-1])
        if checkpoints is not None:
            save(epoch + 1, 0, gen.get_state(), 0.0)
    summary = {"epochs": recipe.epochs, "steps": total, "images": n, "final_loss": losses[-1]}
    return {**summary, "processes": world} if world > 1 else summary


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on CPU (gloo) too,
    where ``nn.SyncBatchNorm`` refuses to run. The sums go through an autograd-aware all-reduce,
    so gradients flow through the shared mean and variance as in one process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype)
        stats = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)  # E[x²] - mean² rounds below 0
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)  # unbiased, as BN keeps
        shape = (1, channels, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def global_batch_norm(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d of ``model`` (in place) made to use global-batch statistics."""
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                                child.track_running_stats)
                replacement.load_state_dict(child.state_dict())
                setattr(parent, name, replacement)
    return model


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits (float32, on the CPU) for uint8 NxCxHxW images, in eval mode, on the GPU when there is one."""
    device = training_device()
    model.eval()
    model.to(device=device, memory_format=torch.channels_last)
    x_all = torch.as_tensor(images)
    outs = []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(x_all), batch_size):
            x = prepare(x_all[i:i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
            outs.append(model(x).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)
