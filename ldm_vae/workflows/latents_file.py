"""Latents files: one (N, C, h, w) ``latents`` tensor of diffusion-ready latents in a ``.safetensors`` file, with
the source names, original sizes and latent scale as metadata.

Encoding writes one; decoding reads one back to images cropped to their original sizes, unscaled with the
file's own factors. FLUX.2 has no global factors (its latents are 2x2 patches normalized per channel, so C is
4 x 32 at 1/16 of the image size): its files name the class instead, and decode unscales with the model's
own statistics.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..images import crop_to, padded_size, save_image
from ..interface import Autoencoder
from ..io import write_safetensors
from .base import (
    WorkflowError,
    batches,
    check_no_overwrite,
    image_sizes,
    load_batch,
    png_outputs,
    progress,
)

LATENTS_KEY = "latents"


def latent_scaling(vae: Autoencoder) -> tuple[float, float] | None:
    """(scaling, shift) with ``vae.scale_latents(z) == (z - shift) * scaling``; None for a model without a
    ``scaling_factor`` (FLUX.2 normalizes each channel of 2x2 patches: only its ``unscale_latents`` undoes it).

    Models without a ``shift_factor`` (VQ) scale without a shift.
    """
    if not hasattr(vae.config, "scaling_factor"):
        return None
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


def _check_one_size(paths: Sequence[Path], sizes: Sequence[tuple[int, int]], f: int) -> None:
    # One tensor holds every latent, so they must share a shape. Padding images to a common size would
    # change their latents (the encoder would see the padding), so differing sizes are refused instead.
    shapes: dict[tuple[int, int], list[Path]] = {}
    for path, size in zip(paths, sizes, strict=True):
        shapes.setdefault(padded_size(size, f), []).append(path)
    if len(shapes) > 1:
        listing = ", ".join(
            f"{h}x{w} ({len(ps)}, e.g. {ps[0].name})" for (h, w), ps in list(shapes.items())[:3]
        )
        raise WorkflowError(
            f"images have {len(shapes)} different (padded) sizes: {listing}; one latents file holds one "
            "size: encode each size to its own file, or crop/resize the images first"
        )


def encode_to_file(
    vae: Autoencoder,
    paths: Sequence[Path],
    out: Path,
    model_name: str,
    batch_size: int = 4,
    sample: bool = False,
    seed: int = 0,
    tile_size: int | None = None,
    max_memory: int | None = None,
) -> Tensor:
    """Encodes images that pad to one size into a latents file at ``out``; returns its (N, C, h, w) latents.

    Args:
        model_name: the model as the user named it, stored as metadata.
        sample: a seeded sample of a stochastic bottleneck (the KL posterior) instead of its mode.
        tile_size, max_memory: exact tiling (both None: one untiled pass).
    """
    f = vae.config.diffusion_downsample_factor
    sizes = image_sizes(paths)
    _check_one_size(paths, sizes, f)
    generator = torch.Generator(vae.device).manual_seed(seed) if sample else None
    chunks = []
    parts = list(batches(range(len(paths)), batch_size))
    with torch.inference_mode():
        for batch in progress(parts, len(parts), "encoding"):
            x = load_batch([paths[i] for i in batch], f).to(vae.device)  # (B, 3, H', W')
            z = vae.encode_latents(
                x, sample=sample, generator=generator, tile_size=tile_size, max_memory=max_memory
            )  # (B, C, H'/f, W'/f)
            chunks.append(vae.scale_latents(z).float().cpu())
    latents = torch.cat(chunks)  # (N, C, h, w)
    scaling = latent_scaling(vae)
    metadata = {
        **(
            {"latent_normalization": type(vae).__name__}  # the model's own statistics
            if scaling is None
            else {"scaling_factor": json.dumps(scaling[0]), "shift_factor": json.dumps(scaling[1])}
        ),
        "source_names": json.dumps([p.name for p in paths]),
        "original_sizes": json.dumps([list(s) for s in sizes]),
        "model": str(model_name),
        "posterior": f"sample(seed={seed})" if sample else "mode",
    }
    write_safetensors({LATENTS_KEY: latents}, out, metadata)
    return latents


def read_latents(path: Path) -> tuple[Tensor, dict[str, str]]:
    """The ``latents`` tensor (N, C, h, w) float32 and the metadata of a latents file, checked."""
    if not path.is_file():
        raise WorkflowError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            if LATENTS_KEY not in keys:
                shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                raise WorkflowError(f"{path}: no tensor named {LATENTS_KEY!r} (has: {shown or 'none'})")
            z = f.get_tensor(LATENTS_KEY)
    except (SafetensorError, OSError) as e:
        raise WorkflowError(f"{path}: not a readable safetensors file ({e})") from None
    if z.ndim != 4 or not z.is_floating_point():
        raise WorkflowError(
            f"{path}: {LATENTS_KEY} must be a float (N, C, h, w) tensor, got {z.dtype} {tuple(z.shape)}"
        )
    if not torch.isfinite(z).all():
        raise WorkflowError(f"{path}: {LATENTS_KEY} contain NaN or Inf")
    return z.float(), metadata


def metadata_list(metadata: dict[str, str], key: str, n: int, path: Path) -> list | None:
    """The JSON list of ``n`` entries stored under ``key``, or None when the file has no such key."""
    if key not in metadata:
        return None
    try:
        values = json.loads(metadata[key])
    except json.JSONDecodeError:
        raise WorkflowError(f"{path}: metadata {key!r} is not JSON") from None
    if not isinstance(values, list) or len(values) != n:
        raise WorkflowError(f"{path}: metadata {key!r} should list {n} entries, one per latent")
    return values


@dataclass
class LatentsFile:
    """A read and checked latents file."""

    path: Path
    latents: Tensor  # (N, C, h, w) float32, diffusion-ready
    metadata: dict[str, str]
    names: list  # source names, or latent_NNNNN
    sizes: list | None  # original (H, W) per latent, when stored


def read_latents_file(path: str | Path) -> LatentsFile:
    """Reads and checks a latents file and its per-latent metadata (before any model is loaded)."""
    path = Path(path)
    z, metadata = read_latents(path)
    n = len(z)
    names = metadata_list(metadata, "source_names", n, path) or [f"latent_{i:05d}" for i in range(n)]
    return LatentsFile(path, z, metadata, names, metadata_list(metadata, "original_sizes", n, path))


def file_scaling(vae: Autoencoder, metadata: dict[str, str], path: Path) -> tuple[float, float] | None:
    """The (scaling, shift) the file was written with, else the model's; warns when they differ. None for a
    model without a global scale (FLUX.2): its ``unscale_latents`` undoes its own normalization."""
    model = latent_scaling(vae)
    if model is None:
        return None
    try:
        stored = tuple(
            float(json.loads(metadata[k]) or 0.0) if k in metadata else m
            for k, m in zip(("scaling_factor", "shift_factor"), model, strict=True)
        )
    except (json.JSONDecodeError, TypeError, ValueError):
        raise WorkflowError(f"{path}: metadata scaling_factor/shift_factor are not numbers") from None
    if stored != model:
        print(
            f"warning: {path} was scaled with scaling_factor={stored[0]}, shift_factor={stored[1]} but the "
            f"model uses {model[0]}, {model[1]}; unscaling with the file's values",
            file=sys.stderr,
        )
    return stored  # type: ignore[return-value]


def decode_to_folder(
    vae: Autoencoder,
    file: LatentsFile,
    out_dir: Path,
    model_name: str,
    batch_size: int = 4,
    tile_size: int | None = None,
    max_memory: int | None = None,
) -> list[Path]:
    """Decodes every latent of ``file`` to ``out_dir/<source stem>.png``, cropped to its original size; returns
    the files. Checks that the latents fit the model before writing anything."""
    src, z, sizes = file.path, file.latents, file.sizes
    n, c, h, w = z.shape
    f = vae.config.diffusion_downsample_factor
    channels = vae.decode_channels * vae.config.latent_patch**2  # of diffusion-ready latents
    if c != channels:
        raise WorkflowError(f"{src}: latents have {c} channels but {model_name} takes {channels}")
    if sizes is not None and any(
        not (isinstance(s, list) and len(s) == 2 and 0 < s[0] <= h * f and 0 < s[1] <= w * f) for s in sizes
    ):
        raise WorkflowError(
            f"{src}: metadata original_sizes do not fit latents of {h}x{w} (images {h * f}x{w * f})"
        )
    scaling = file_scaling(vae, file.metadata, src)
    outputs = png_outputs(out_dir, [str(x) for x in file.names])
    check_no_overwrite(outputs, [src])
    parts = list(batches(range(n), batch_size))
    with torch.inference_mode():
        for batch in progress(parts, len(parts), "decoding"):
            # Undo scale_latents with the file's own values, or the model's own normalization.
            raw = vae.unscale_latents(z[batch]) if scaling is None else z[batch] / scaling[0] + scaling[1]
            images = vae.decode(raw.to(vae.device), tile_size=tile_size, max_memory=max_memory)
            images = images.cpu()  # (B, 3, h*f, w*f)
            for i, image in zip(batch, images, strict=True):
                save_image(crop_to(image, sizes[i]) if sizes else image, outputs[i])
    return outputs
