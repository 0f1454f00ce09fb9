"""Helpers of the command-line tests: test photos and an in-process ``ldm-vae`` (fixtures: conftest.py)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from skimage import data

from ldm_vae.cli import main


def photo(path: Path, h: int, w: int, source=data.astronaut) -> Path:
    """A scikit-image photo resized to ``h`` x ``w``, saved at ``path``."""
    Image.fromarray(source()).resize((w, h), Image.Resampling.BICUBIC).save(path)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``ldm-vae *argv`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
