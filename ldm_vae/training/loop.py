"""Training-loop state shared by the trainers: steps done, data position, non-finite streak."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from .config import TrainConfig
from .tracking import MetricsLog


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is left as it was."""


@dataclass
class TrainProgress:
    """Where a run is: optimizer steps done, the data position, and the current run of skipped steps.

    The data position is (epoch, batches of this process consumed in it); with the seeded per-epoch order of
    :class:`~ldm_vae.training.EpochSampler` it pins down every batch still to come.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    nonfinite_streak: int = 0

    def epoch_batches(self, accelerator: Accelerator, loader: Any) -> Iterable:
        """The rest of the current epoch; Accelerate skips consumed batches without loading them."""
        loader.set_epoch(self.epoch)
        return accelerator.skip_first_batches(loader, self.batch) if self.batch else loader

    def next_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0

    def count_step(self, ok: bool, metrics: MetricsLog, max_nonfinite: int, last_good: Path | None) -> int:
        """Counts a finished optimizer step (skipped when not ``ok``) and returns the non-finite streak.

        Raises:
            NonFiniteLossError: the streak reached ``max_nonfinite``.
        """
        self.step += 1
        self.nonfinite_streak = 0 if ok else self.nonfinite_streak + 1
        step, streak = self.step, self.nonfinite_streak
        if streak:
            metrics.log({"train/nonfinite": 1.0, "train/nonfinite_streak": float(streak)}, step)
            metrics.accelerator.print(f"step {step}: non-finite loss, step skipped ({streak} in a row)")
            if streak >= max_nonfinite:
                raise NonFiniteLossError(
                    f"{streak} non-finite losses in a row (steps {step - streak + 1}-{step}); stopped, "
                    f"last good checkpoint: {last_good or 'none'}"
                )
        return streak

    def state(self, batches_per_epoch: int, global_batch: int) -> dict[str, int]:
        """JSON-able state; a finished epoch is saved as the start of the next one."""
        state = asdict(self)
        if self.batch >= batches_per_epoch:
            state.update(epoch=self.epoch + 1, batch=0)
        return {**state, "global_batch": global_batch}

    @classmethod
    def from_state(cls, saved: dict[str, Any], global_batch: int) -> TrainProgress:
        """Restores a saved state; if the global batch (batch size x processes) changed, the position within
        the epoch is rescaled to the same number of samples (rounded down)."""
        progress = cls(**{k: int(saved[k]) for k in ("step", "epoch", "batch", "nonfinite_streak")})
        # Checkpoints of the first train_vae.py version stored the two factors of the global batch.
        saved_global = saved.get("global_batch") or saved["samples_per_batch"] * saved["world_size"]
        if saved_global != global_batch:
            progress.batch = progress.batch * int(saved_global) // global_batch
        return progress


def nonfinite_anywhere(accelerator: Accelerator, *losses: Tensor | None) -> bool:
    """True on every process if any loss is NaN/Inf on any: all ranks must skip a step together, or DDP hangs."""
    bad = any(loss is not None and not torch.isfinite(loss).all() for loss in losses)
    return bool(accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "max") > 0)


def due(step: int, every: int, train: TrainConfig) -> bool:
    """True every ``every`` steps (never if 0) and at the last step."""
    return step == train.max_steps or (bool(every) and step % every == 0)


def after_step(
    step: int, streak: int, train: TrainConfig, validate: Callable[[], Any], checkpoint: Callable[[], Any]
) -> bool:
    """The periodic validation and checkpoint of a finished step; True when training is done."""
    if train.val_every and step % train.val_every == 0:
        validate()
    # No checkpoints during a non-finite streak: the last one stays the last good one.
    if due(step, train.checkpoint_every, train) and not streak:
        checkpoint()
    return step >= train.max_steps
