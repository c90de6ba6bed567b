"""Data-parallel training under ``torchrun``: the process group, this process's rank and device.

``torchrun --nproc_per_node=N -m semisup_tasks stage NAME ...`` starts N copies of a stage; each
trains on its stride of every global batch (the batch order comes from the same seeded
generator in every process, so together they see one epoch, as a seeded DistributedSampler
would), DDP averages the gradients, and only rank 0 writes models, manifests and results. With
the loss scaled to the global batch and batch-norm statistics summed across processes, N
processes follow the one-process run with the same global batch (up to float rounding; dropout
masks differ). Every process reads the whole training set and keeps its stride of each batch.

Rank and world size come from torchrun's environment, so asking costs no torch import: every
stage asks, most never train.
"""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def training_device():
    """This process's GPU when there is one (under torchrun: LOCAL_RANK's), else the CPU;
    ``SEMISUP_DEVICE=cpu`` keeps a GPU host's stages on the CPU."""
    import torch

    if torch.cuda.is_available() and os.environ.get("SEMISUP_DEVICE", "cuda") != "cpu":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else
                            torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env() -> None:
    """Join the process group ``torchrun`` describes (NCCL on GPU, gloo on CPU); a no-op otherwise."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        device = training_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def is_main() -> bool:
    """Rank 0, or not distributed: the process that writes outputs and logs progress."""
    return rank() == 0


