"""Atomic training checkpoints through ``accelerator.save_state``.

A checkpoint is written into ``.tmp-checkpoint-<step>`` and renamed to ``checkpoint-<step:07d>`` only once every
file is on disk, so a kill at any moment leaves the previous checkpoint intact; leftover temporary folders are
ignored and deleted. Accelerate writes the prepared models (safetensors), optimizers, schedulers and RNG states;
the trainer's own tensors (EMA, learned loss parameters) go to safetensors files and its small state to JSON,
so resuming never unpickles anything but Accelerate's weights-only files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import Tensor

from ..checkpoint import CheckpointError, read_state_dict
from ..io import write_json, write_safetensors

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{7,})$")
TMP_PREFIX = ".tmp-checkpoint-"
STATE_NAME = "trainer_state.json"  # written last: a folder without it was never completed


class CheckpointManager:
    """Saves, finds, prunes and loads the checkpoints under ``folder``; only the main process writes.

    Args:
        accelerator: the run's Accelerator, after ``prepare``.
        folder: where ``checkpoint-*`` folders live.
        keep: complete checkpoints to keep (older ones are deleted after each save).
    """

    def __init__(self, accelerator: Accelerator, folder: str | os.PathLike, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.accelerator, self.folder, self.keep = accelerator, Path(folder), keep

    # ------------------------------------------------------------------------------------- finding

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [
            (int(m[1]), p)
            for p in self.folder.iterdir()
            if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / STATE_NAME).is_file()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def resolve(self, spec: str) -> Path | None:
        """``""`` -> None, ``"latest"`` -> the newest checkpoint (None if there is none), else that folder.

        Raises:
            CheckpointError: a named folder that is not a complete checkpoint.
        """
        if not spec:
            return None
        if spec == "latest":
            return self.latest()
        path = Path(spec).expanduser()
        if not (path / STATE_NAME).is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_NAME})")
        return path

    # ------------------------------------------------------------------------------------- saving

    def clean_partial(self) -> None:
        """Deletes temporary folders of interrupted saves (main process)."""
        if self.accelerator.is_main_process and self.folder.is_dir():
            for p in self.folder.glob(TMP_PREFIX + "*"):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, state: dict[str, Any], tensors: dict[str, dict[str, Tensor]]) -> Path:
        """Writes ``checkpoint-<step>`` with Accelerate's state, ``<name>.safetensors`` per ``tensors`` entry and
        ``state`` as JSON, then keeps the newest ``keep``. Every process must call it."""
        acc = self.accelerator
        final = self.folder / f"checkpoint-{step:07d}"
        tmp = self.folder / f"{TMP_PREFIX}{step:07d}"
        if acc.is_main_process:
            self.clean_partial()
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every process writes its own RNG state; the main one all the rest
        if acc.is_main_process:
            for name, named in tensors.items():
                write_safetensors(named, tmp / f"{name}.safetensors")
            write_json(state, tmp / STATE_NAME)
        acc.wait_for_everyone()
        if acc.is_main_process:
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. the end of a resumed, finished run)
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------------------------------- loading

    def load(self, path: str | os.PathLike, names: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict]:
        """Restores Accelerate's state from ``path``; returns (the saved state, {name: tensors} for ``names``)."""
        path = Path(path)
        try:
            state = json.loads((path / STATE_NAME).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / STATE_NAME}: cannot read ({e})") from None
        self.accelerator.load_state(str(path))
        tensors = {
            n: read_state_dict(path / f"{n}.safetensors")
            for n in names
            if (path / f"{n}.safetensors").is_file()
        }
        return state, tensors


def _fsync_tree(folder: Path) -> None:
    # Data reaches the disk before the rename makes the checkpoint visible (matters on power loss, not SIGKILL).
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
