"""The demo's small data set for latent diffusion: scikit-learn's bundled handwritten digits (the UCI
"Optical Recognition of Handwritten Digits" test set, Alpaydin & Kaynak, 1998; 1797 images of 8x8 pixels,
16 grey levels), upscaled deterministically to ``DIGIT_SIZE`` px RGB so that the photo-trained KL-f8
autoencoder turns each into an 8x8x4 latent. A few thousand latents of one simple kind of image is what a
2.7M-parameter DDPM can learn on a CPU in minutes, so its samples are recognizably new digits.

The last ``DIGITS_HELD_OUT`` images are held out: ``ldm-vae cache-latents`` keeps the files' order (sorted
names), and the DDPM trainer's ``data.num_val`` holds out the last images of a cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .checkpoint import CheckpointError
from .io import atomic_path

DIGIT_SIZE = 64  # px: 8x upscaled, so 8x8 latents under an f8 autoencoder
DIGITS_HELD_OUT = 197  # the last 197 of 1797 (1600 train)


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float in [0, 16], labels (1797,)) from scikit-learn's bundled copy (no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CheckpointError("the digits come from scikit-learn: pip install 'ldm-vae[demo]'") from None
    data = load_digits()
    return data.images, data.target


def upscale_digit(image: np.ndarray, size: int = DIGIT_SIZE) -> np.ndarray:
    """One 8x8 digit (ink 0..16) -> (size, size, 3) uint8, dark ink on white, bicubic-upscaled in float.

    Bicubic interpolation of the 16 grey levels (clipped back to [0, 1]) turns the 8x8 blocks into smooth
    strokes; it is a fixed function of the pixels, so every run writes the same bytes.
    """
    ink = Image.fromarray((np.asarray(image, dtype=np.float32) / 16.0), mode="F")
    ink = np.clip(np.asarray(ink.resize((size, size), Image.BICUBIC)), 0.0, 1.0)
    grey = np.round(255.0 * (1.0 - ink)).astype(np.uint8)  # (size, size)
    return np.repeat(grey[..., None], 3, axis=-1)


def digit_images(size: int = DIGIT_SIZE, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, size, size, 3) uint8, labels (N,)): the upscaled digits in scikit-learn's order."""
    images, labels = load_digits_raw()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return np.stack([upscale_digit(im, size) for im in images]), labels


def write_digits(folder: str | os.PathLike, size: int = DIGIT_SIZE, limit: int | None = None) -> list[Path]:
    """Writes ``digit-NNNNN-L.png`` (index N in scikit-learn's order, label L) into ``folder``; returns them.

    Names sort in data order, which is the order ``cache-latents`` encodes them in. Files already there with
    the same bytes are left alone, so a rerun is cheap.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(size, limit)
    paths = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / f"digit-{i:05d}-{label}.png"
        if not path.is_file() or not np.array_equal(np.asarray(Image.open(path).convert("RGB")), image):
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
        paths.append(path)
    return paths
