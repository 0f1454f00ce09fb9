"""Image-folder training data: random square crops and flips that are a pure function of (seed, epoch, index).

Because every augmentation is seeded from the sample's position rather than drawn from a global RNG, a resumed
run sees exactly the batches an uninterrupted run would, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..images import (
    ImageError,
    center_crop,
    collect_images,
    load_image,
    open_image,
    pil_to_tensor,
    readable,
    resize_short_side_up,
)
from ..seeds import mix_seed

TRAIN_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """jpg/jpeg/png/webp files under ``folder`` (recursive, sorted, hidden files skipped).

    Raises:
        ImageError: missing folder, or no such images in it.
    """
    files = [p for p in collect_images([folder]) if p.suffix.lower() in TRAIN_SUFFIXES]
    if not files:
        raise ImageError(f"{folder}: no {', '.join(TRAIN_SUFFIXES)} images in this folder")
    return files


class ImageFolderDataset(Dataset):
    """Random ``resolution``-pixel square crops (and flips) of the images in a folder, in [-1, 1].

    Items are indexed by ``(index, seed)`` pairs, as :class:`EpochSampler` yields them. Files PIL cannot open are
    dropped up front and listed in ``skipped``; a file that fails later (e.g. truncated data) is replaced by the
    next readable one, with one warning per file and process.
    """

    def __init__(self, files: Sequence[Path], resolution: int, flip: bool = True) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.files, self.skipped = readable(files)
        if not self.files:
            raise ImageError(
                f"none of the {len(files)} image files could be read (e.g. {self.skipped[0][0]})"
            )
        self.resolution, self.flip = resolution, flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> Tensor:
        index, seed = item
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                return self._crop(path, np.random.default_rng(seed))
            except Exception as e:  # as in readable(): PIL raises many types
                # open_image's ImageError already names the file; say it once.
                reason = (
                    str(e).removeprefix(f"{path}: ")
                    if isinstance(e, ImageError)
                    else f"{type(e).__name__}: {e}"
                )
                warnings.warn(f"{path}: unreadable image skipped ({reason})", stacklevel=2)
        raise ImageError("no image in the dataset could be decoded")

    def _crop(self, path: Path, rng: np.random.Generator) -> Tensor:
        size = self.resolution
        with open_image(path) as im:
            w, h = im.size
            if min(w, h) < size:
                x = resize_short_side_up(pil_to_tensor(im), size)
                h, w = x.shape[-2:]
                top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
                x = x[:, top : top + size, left : left + size]
            else:
                # Crop before converting to float: photos are often far larger than the crop.
                top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
                x = pil_to_tensor(im.crop((left, top, left + size, top + size)))  # (3, size, size)
        if self.flip and rng.random() < 0.5:
            x = x.flip(-1)
        return x.contiguous()


class EpochSampler(Sampler):
    """A permutation of the dataset per epoch, seeded by (seed, epoch), each index paired with its crop seed.

    Every process builds the same permutation (Accelerate then gives each one its share of the batches), and
    skipping the first k batches of an epoch reproduces the rest of it exactly.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        for index in torch.randperm(self.num_items, generator=generator).tolist():
            yield index, mix_seed(self.seed, self.epoch, index)


def epoch_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """The trainers' DataLoader: :class:`EpochSampler` order, whole batches only.

    Items are (index, seed) pairs, so each epoch's crops or posterior samples are the same after a resume.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed),
        num_workers=num_workers,
        drop_last=True,
        # Its own generator: creating a DataLoader iterator must not consume the global RNG (exact resumes).
        generator=torch.Generator().manual_seed(seed),
    )


def validation_files(
    train_files: list[Path], val_files: Sequence[str], val_dir: str, num_val: int
) -> tuple[list[Path], list[Path]]:
    """(training files, fixed validation files).

    The validation images are ``val_files`` if given, else the first ``num_val`` of ``val_dir``, else the last
    ``num_val`` training images, which are then held out of training.
    """
    if val_files:
        return train_files, [Path(p) for p in val_files]
    if val_dir:
        return train_files, list_images(val_dir)[:num_val]
    if num_val <= 0:
        return train_files, []
    if len(train_files) <= num_val:
        raise ImageError(
            f"cannot hold out {num_val} validation images from {len(train_files)}; set data.val_dir"
        )
    return train_files[:-num_val], train_files[-num_val:]


def load_validation_images(files: Sequence[Path], resolution: int) -> Tensor:
    """Center crops (N, 3, resolution, resolution) of ``files``; an unreadable file is a one-line ImageError."""
    if not files:
        return torch.empty(0, 3, resolution, resolution)
    return torch.stack([center_crop(load_image(p), resolution) for p in files])
