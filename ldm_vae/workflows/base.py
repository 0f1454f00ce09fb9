"""What every workflow shares: the error type, progress bars and batches, output-path checks, image loading."""

from __future__ import annotations

import sys
from collections.abc import Hashable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..images import load_image, pad_to_multiple


class WorkflowError(ValueError):
    """Bad input the user can fix; its message is one line."""


def one_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name when it has none)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def progress(items: Iterable, total: int, desc: str) -> Iterator:
    """``items`` with a progress bar on stderr."""
    # disable=None: a bar on an interactive stderr only, so logs and pipes stay clean.
    return iter(tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False))


def batches(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive slices of ``indices`` of at most ``size`` items."""
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


def batches_by_shape(shapes: Sequence[Hashable], size: int) -> Iterator[list[int]]:
    """Batches of at most ``size`` indices whose ``shapes`` are equal: shapes in order of first appearance,
    indices in order within each (one shape: exactly :func:`batches`)."""
    groups: dict[Hashable, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    for indices in groups.values():
        yield from batches(indices, size)


def output_dir(path: str | Path) -> Path:
    """An output folder path, refused when a file is in the way (folders are created on first write)."""
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise WorkflowError(f"{out_dir}: exists and is not a directory")
    return out_dir


def check_no_overwrite(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Refuses any output path that is, or resolves to, an input file."""
    sources = {p.resolve(): p for p in inputs}
    for out in outputs:
        if out.resolve() in sources:
            raise WorkflowError(
                f"{out}: output would overwrite the input {sources[out.resolve()]}; choose another"
            )


def files_of(path: Path) -> list[Path]:
    """The file, or every file in the folder."""
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


def output_stems(names: Sequence[str]) -> list[str]:
    """File stems for outputs, one per source name, unique even on case-insensitive filesystems.

    ``a.jpg`` and ``a.png`` become ``a`` and ``a_2``; directories in names are dropped.
    """
    used: set[str] = set()
    stems = []
    for name in names:
        stem = Path(name).stem or "image"
        candidate, k = stem, 1
        while candidate.lower() in used:
            k += 1
            candidate = f"{stem}_{k}"
        used.add(candidate.lower())
        stems.append(candidate)
    return stems


def png_outputs(out_dir: Path, names: Sequence[str]) -> list[Path]:
    """One ``<stem>.png`` in ``out_dir`` per source name (see :func:`output_stems`)."""
    return [out_dir / f"{stem}.png" for stem in output_stems(names)]


def image_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """Decodes every image once, so a bad file fails before anything is written; returns (H, W) each."""
    sizes = []
    for path in progress(paths, len(paths), "checking"):
        x = load_image(path)
        sizes.append((x.shape[1], x.shape[2]))
    return sizes


def load_batch(paths: Sequence[Path], multiple: int) -> Tensor:
    """Images of one padded size -> (B, 3, H', W'), H' and W' multiples of ``multiple``."""
    return torch.stack([pad_to_multiple(load_image(p), multiple) for p in paths])
