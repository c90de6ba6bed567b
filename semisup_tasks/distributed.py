"""Data-parallel training under ``torchrun``: process group, rank, and batch norm that sees the
whole global batch.

``torchrun --nproc_per_node=N -m semisup_tasks stage NAME ...`` starts N copies of a stage; each
trains on its stride of every global batch (the batch order comes from the same seeded
generator in every process, so together they see one epoch, as a seeded DistributedSampler
would), DDP averages the gradients, and only rank 0 writes models, manifests and results. With
the loss scaled to the global batch and batch-norm statistics summed across processes, N
processes follow the one-process run with the same global batch (up to float rounding).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_from_env() -> None:
    """Join the process group ``torchrun`` describes (NCCL on GPU, gloo on CPU); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, or not distributed: the process that writes outputs and logs progress."""
    return rank() == 0


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on CPU (gloo) too,
    where ``nn.SyncBatchNorm`` refuses to run. The sums go through an autograd-aware all-reduce,
    so gradients flow through the shared mean and variance as in one process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype)
        stats = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = stats[channels:2 * channels] / n - mean * mean
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
