"""Train the tiny model of test_distributed.py; under torchrun, data-parallel. Rank 0 saves the weights.

Usage: [torchrun --nproc_per_node=N] distributed_train_script.py OUT.pt [CHECKPOINT_DIR [CRASH_AFTER]]

With CHECKPOINT_DIR the training keeps its state there (every 2 steps) and resumes from it, with dropout
on (each process's RNG state is then part of the result); with CRASH_AFTER rank 0 dies right after that
many saves, and torchrun takes the other processes down.
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def data(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """12x12 noise with a bright bar whose position is the class (3 classes)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, 1, 12, 12), dtype=np.uint8)
    for i, c in enumerate(y):
        x[i, 0, :, 1 + c * 4:3 + c * 4] = 255
    return x, y


def train_once(out: str, checkpoint_dir: str | None = None, crash_after: int = 0) -> None:
    from semisup_tasks import distributed
    from semisup_tasks.checkpoints import StoreCheckpoints
    from semisup_tasks.models import build_model
    from semisup_tasks.store import Store
    from semisup_tasks.train import Recipe, train

    class Dying(StoreCheckpoints):
        saves = 0

        def save(self, state: dict, shape: str) -> None:
            super().save(state, shape)
            self.saves += 1
            if self.saves == crash_after:
                import os

                os._exit(3)  # as a killed process: no cleanup, no goodbye to the other ranks

    distributed.init_from_env()
    torch.set_num_threads(1)
    recipe = Recipe(epochs=3, lr=0.05, batch_size=32, augment="affine", seed=7)
    torch.manual_seed(recipe.seed)
    model = build_model("cnn_small", 1, 3, (12, 12))
    if not checkpoint_dir:  # each process draws its own dropout masks: equal in law, not in value, to one process
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    x, y = data()
    checkpoints = None
    if checkpoint_dir:
        checkpoints = Dying(Store.from_uri(f"file://{checkpoint_dir}"), "ddp-test.pt", "t", every_steps=2)
    summary = train(model, x, y, recipe, name="ddp-test", checkpoints=checkpoints)
    if distributed.is_main():
        torch.save({"state": model.state_dict(), "summary": summary}, out)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)  # the "resuming at step" line
    train_once(sys.argv[1], *(sys.argv[2:3]), *(int(a) for a in sys.argv[3:4]))
