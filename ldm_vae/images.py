"""Image files in and out: any common format and mode -> float (3, H, W) in [-1, 1], and back to 8-bit PNG.

Conventions (the ones Stable Diffusion and diffusers' ``VaeImageProcessor`` use): RGB, ``x = 2 * v - 1`` for
``v`` in [0, 1], EXIF orientation applied. Transparent images are composited on white, since the colour
under fully transparent pixels is arbitrary (often black or garbage) and a VAE would reproduce it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .io import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Modes whose samples are 16-bit integers. PIL's own convert("L"/"RGB") clips them at 255 instead of scaling.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An input that is missing, empty, truncated or not an image; the message is one line naming the file."""


# ------------------------------------------------------------------------------------------- reading


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files from files and directories (searched recursively), sorted, each file once.

    Files named explicitly are taken whatever their suffix (loading tells whether they are images); in
    directories only ``IMAGE_SUFFIXES`` (any case) count, and hidden files (``.*``, e.g. macOS ``._x.jpg``)
    are skipped.

    Raises:
        ImageError: a path that does not exist, or a directory without images.
    """
    found: dict[Path, Path] = {}  # resolved -> as given, so a file named twice (or via a symlink) counts once
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = [
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
            ]
            if not files:
                raise ImageError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
        elif path.exists():
            files = [path]
        else:
            raise ImageError(f"{path}: no such file or directory")
        for p in files:
            found.setdefault(p.resolve(), p)
    return sorted(found.values(), key=str)


@contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Opens and fully decodes an image file, EXIF orientation applied: the one decoding path of the package.

    Failures while decoding, and while the body of the ``with`` converts the image, become one-line
    :class:`ImageError` messages naming the file.

    Raises:
        ImageError: missing, empty, truncated or undecodable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty")
    try:
        with Image.open(path) as im:
            # PIL decodes lazily; load() forces the full decode so a truncated file fails here, not later.
            im.load()
            yield ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognized format)") from None
    except Exception as e:  # PIL's decoders raise many unrelated types on malformed data
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "truncat" in reason.lower():
            raise ImageError(f"{path}: image file is truncated ({reason})") from None
        raise ImageError(f"{path}: not a readable image ({reason})") from None


def readable(files: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Splits ``files`` into those PIL can open and (path, reason) for the rest; reads headers only."""
    good, bad = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 - the header parse is the check
            good.append(path)
        except Exception as e:  # PIL raises many unrelated types on malformed data
            bad.append((path, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
    return good, bad


def load_image(path: str | os.PathLike) -> Tensor:
    """Reads an image file into a float32 tensor (3, H, W) in [-1, 1].

    Handles JPEG/PNG/WebP/TIFF/BMP in modes 1, L, LA, P (with or without transparency), RGB, RGBA, CMYK,
    YCbCr and 16-bit grayscale (scaled by 1/65535, not clipped). Alpha is composited on white. 16-bit RGB
    PNG/TIFF files keep 8 bits (PIL's reduction takes the high byte, so the scale is right).

    Raises:
        ImageError: missing, empty, truncated or undecodable file.
    """
    with open_image(path) as im:
        return pil_to_tensor(im)


def pil_to_tensor(im: Image.Image) -> Tensor:
    """A decoded PIL image -> float32 (3, H, W) in [-1, 1] (see :func:`load_image` for the modes)."""
    return rearrange(torch.from_numpy(_to_unit_rgb(im)), "h w c -> c h w") * 2.0 - 1.0


def _to_unit_rgb(im: Image.Image) -> np.ndarray:
    """A decoded PIL image -> float32 (H, W, 3) in [0, 1]."""
    if im.mode in _SIXTEEN_BIT:
        gray = np.asarray(im).astype(np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
    if im.mode == "F":  # float TIFFs: taken to be in [0, 1] already
        return np.repeat(np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[..., None], 3, axis=-1)
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    return rgb / 255.0


# -------------------------------------------------------------------------------------- size handling


def padded_size(size: Sequence[int], multiple: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of ``multiple``."""
    h, w = size
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pads (C, H, W) or (B, C, H, W) on the bottom/right to multiples of ``multiple``; undo with :func:`crop_to`.

    Reflect padding continues the image without a hard edge for the encoder to reproduce; it needs the pad
    to be smaller than the image, so tiny images fall back to replicating the last row/column.
    """
    h, w = x.shape[-2:]
    ph, pw = padded_size((h, w), multiple)
    if (ph, pw) == (h, w):
        return x
    mode = "reflect" if ph - h < h and pw - w < w else "replicate"
    return F.pad(x, (0, pw - w, 0, ph - h), mode=mode)  # (..., ph, pw)


def crop_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """The top-left (H, W) of (..., H', W'): undoes :func:`pad_to_multiple`."""
    return x[..., : size[0], : size[1]]


# ------------------------------------------------------------------------------------------ transforms


def resize_short_side(x: Tensor, size: int) -> Tensor:
    """(3, H, W) -> short side ``size``, aspect kept (bicubic, antialiased, clamped to [-1, 1])."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    return F.interpolate(x[None], size=new, mode="bicubic", antialias=True, align_corners=False)[0].clamp(
        -1, 1
    )


def resize_short_side_up(x: Tensor, size: int) -> Tensor:
    """(3, H, W) -> short side ``size`` if it is smaller (see :func:`resize_short_side`); else ``x``."""
    return resize_short_side(x, size) if min(x.shape[-2:]) < size else x


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central (3, size, size) of (3, H, W), short side resized up first when smaller."""
    x = resize_short_side_up(x, size)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top : top + size, left : left + size]


# ------------------------------------------------------------------------------------------- writing


def to_uint8(x: Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> uint8 (H, W, 3), rounded and clamped."""
    v = ((x.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return rearrange(v, "c h w -> h w c").numpy()


def round_to_8bit(x: Tensor) -> Tensor:
    """What saving as 8-bit and loading again gives: ``x`` snapped to the 256 levels, in [-1, 1]."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 127.5 - 1.0


def save_image(x: Tensor, path: str | os.PathLike) -> Path:
    """Writes (3, H, W) in [-1, 1] as an 8-bit RGB PNG, atomically (creates parent folders)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(x)).save(tmp, format="PNG")
    return path
