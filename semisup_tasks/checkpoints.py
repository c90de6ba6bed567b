"""Resumable training: the training loop's whole state, saved to the store so a retried task resumes.

A checkpoint holds the model, optimizer and scheduler state dicts, every process's RNG states, the
batch generator's state at the start of the current epoch, and the position in the epoch. It is one
object written whole (temp file and rename, or one PUT), so a task killed while saving leaves the
previous checkpoint. It is loaded with ``weights_only=True`` like every checkpoint, and ignored when
its tag (the run's params and code, the training's name and shape) is not the current one.
"""

from __future__ import annotations

import io
import logging

from .store import Store

log = logging.getLogger("semisup.checkpoints")
#: what a resume reads; a checkpoint without one of them (another layout) is not resumed
FIELDS = frozenset({"model", "optimizer", "scheduler", "epoch_generator", "generator", "epoch", "batch", "step",
                    "losses", "processes", "tag", "shape"})


class StoreCheckpoints:
    """The latest training state of one training, under one store key."""

    def __init__(self, store: Store, key: str, tag: str, every_steps: int):
        if every_steps < 1:
            raise ValueError(f"every_steps must be at least 1, got {every_steps}")
        self.store, self.key, self.tag, self.every_steps = store, key, tag, every_steps

    def load(self, shape: str) -> dict | None:
        """The saved state of a training of this ``shape`` (data size, steps, processes), or None."""
        import torch

        if not self.store.exists(self.key):
            return None
        data = self.store.read_bytes(self.key)  # a store error fails the task (retried): the progress stays
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            missing = FIELDS - set(state)
        except Exception as exc:  # corrupt bytes cost the progress they held, never the run
            missing, state = {exc.__class__.__name__}, {}
        if missing:
            log.warning("ignoring the unreadable checkpoint %s (%s); training starts over", self.store.url(self.key),
                        ", ".join(sorted(missing)))
            return None
        if state.get("tag") != self.tag or state.get("shape") != shape:
            log.info("ignoring %s: it belongs to other params or data; training starts over", self.store.url(self.key))
            return None
        return state

    def save(self, state: dict, shape: str) -> None:
        import torch

        buf = io.BytesIO()
        torch.save({**state, "tag": self.tag, "shape": shape}, buf)
        self.store.write_bytes(self.key, buf.getvalue())

    def clear(self) -> None:
        self.store.delete(self.key)
