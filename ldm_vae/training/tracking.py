"""Metrics out of a training run: ``metrics.jsonl`` in the run folder and Accelerate's trackers (TensorBoard)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

from accelerate import Accelerator
from torch import Tensor

METRICS_NAME = "metrics.jsonl"


def tensorboard_tracker(enabled: bool) -> str | None:
    """``log_with`` for the Accelerator: TensorBoard when asked for and installed (``ldm-vae[train]``); without
    the package the run still logs metrics.jsonl, with a warning, instead of failing at start."""
    if not enabled:
        return None
    if importlib.util.find_spec("tensorboard") is None:
        warnings.warn(
            "tensorboard is not installed (pip install 'ldm-vae[train]'): logging to metrics.jsonl only",
            stacklevel=2,
        )
        return None
    return "tensorboard"


class MetricsLog:
    """Appends ``{"step": s, name: value, ...}`` lines (main process) and forwards scalars to the trackers."""

    def __init__(self, accelerator: Accelerator, run_dir: str | os.PathLike) -> None:
        self.accelerator = accelerator
        self.path = Path(run_dir) / METRICS_NAME

    def truncate_after(self, step: int) -> None:
        """Drops lines beyond ``step``: what a killed run logged after the checkpoint it resumes from."""
        if not (self.accelerator.is_main_process and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, values: dict[str, float], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        values = {k: float(v) for k, v in values.items()}
        # JSON has no NaN/Inf; the strings keep non-finite values visible instead of breaking the file.
        line = {"step": step, **{k: v if math.isfinite(v) else str(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.accelerator.log(values, step=step)

    def log_image(self, name: str, image: Tensor, step: int) -> None:
        """Sends a (3, H, W) image in [-1, 1] to the TensorBoard tracker, if one is on."""
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: ((image[None].float() + 1) / 2).clamp(0, 1)}, step=step)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, in order."""
    path = Path(run_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a torn last line from a killed run
