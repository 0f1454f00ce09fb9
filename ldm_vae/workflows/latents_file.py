"""Latents files: the diffusion-ready latents of a set of images, or a VQ model's code indices (taming's second
stage, Esser et al., 2021, Sec. 3.2, models these), in one ``.safetensors`` file with the source names, original
sizes and latent scale as metadata.

Encoding writes one; decoding reads one back to images at their original sizes: latents are unscaled with the
file's own factors, indices are looked up in the model's codebook (``VQAutoencoder.decode_indices``).

Format 2 (metadata ``latents_format`` = :data:`FILE_FORMAT`; a file without it is format 1, a stacked
``latents`` file):

- ``kind``: ``latents``, float32 (C, h, w) per image, ``(z - shift_factor) * scaling_factor``; or ``indices``,
  int32 (h, w) code indices per image, with the codebook size (``num_vq_embeddings``) and ``codebook_sha256``.
  FLUX.2 has no global factors (its latents are 2x2 patches normalized per channel, so C is 4 x 32 at 1/16 of
  the image size): its latents files name the class in ``latent_normalization`` instead, and decoding unscales
  with the model's own statistics. Indices are VQ models' only.
- ``layout``: ``stacked`` when every image pads to one size: one tensor named after the kind, (N, C, h, w) or
  (N, h, w), as in format 1; ``per-image`` when they do not: one tensor per image, named by the stem of the PNG
  ``decode`` writes for it, listed in image order by the metadata ``keys``.

Each image is padded to the model's multiple (of the diffusion-ready latents: 16 for FLUX.2) on its own and cropped back after decoding, so its latents are
those of encoding it alone, whatever else is in the file (padding to a common size would change them).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..images import crop_to, padded_size, save_image
from ..interface import Autoencoder
from ..io import write_safetensors
from ..tiling import MaxMemory
from ..vq import VQAutoencoder
from .base import (
    WorkflowError,
    batches_by_shape,
    check_no_overwrite,
    image_sizes,
    load_batch,
    output_stems,
    png_outputs,
    progress,
)

LATENTS_KEY = "latents"
INDICES_KEY = "indices"
FORMAT_KEY = "latents_format"  # not "format": safetensors files carry format=pt
FILE_FORMAT = "ldm-vae-latents-file/2"  # 2: VQ code indices, and one tensor per image for mixed sizes
LAYOUTS = ("stacked", "per-image")


def latent_scaling(vae: Autoencoder) -> tuple[float, float] | None:
    """(scaling, shift) with ``vae.scale_latents(z) == (z - shift) * scaling``; None for a model without a
    ``scaling_factor`` (FLUX.2 normalizes each channel of 2x2 patches: only its ``unscale_latents`` undoes it).

    Models without a ``shift_factor`` (VQ) scale without a shift.
    """
    if not hasattr(vae.config, "scaling_factor"):
        return None
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


def require_codebook(vae: Autoencoder, message: str) -> VQAutoencoder:
    """``vae``, or a :class:`WorkflowError` with ``message`` unless it has a codebook to index."""
    if not isinstance(vae, VQAutoencoder):
        raise WorkflowError(message)
    return vae


def codebook_sha256(vq: VQAutoencoder) -> str:
    """SHA-256 of the code vectors rounded to bf16, so the same weights run in fp32 or bf16 agree."""
    codes = vq.quantize.codebook().detach().to("cpu", torch.bfloat16).contiguous()  # (num_codes, dim)
    return hashlib.sha256(codes.view(torch.int16).numpy().tobytes()).hexdigest()


@dataclass
class LatentsFile:
    """A latents file, read and checked (or just written)."""

    path: Path
    kind: str  # LATENTS_KEY or INDICES_KEY
    items: list[
        Tensor
    ]  # per image: (C, h, w) float32 diffusion-ready latents, or (h, w) integer code indices
    metadata: dict[str, str]
    names: list  # source names, or latent_NNNNN
    sizes: list | None  # original (H, W) per image, when stored
    num_codes: int | None = None  # indices: the size of the codebook they index

    def describe(self) -> str:
        """What the file holds, e.g. ``latents (3, 4, 16, 16)`` or ``indices of 3 images in 2 shapes``."""
        shapes = {tuple(t.shape) for t in self.items}
        if len(shapes) == 1:
            return f"{self.kind} {(len(self.items), *shapes.pop())}"
        return f"{self.kind} of {len(self.items)} images in {len(shapes)} shapes (one tensor per image)"


def write_latents_file(
    path: Path, kind: str, items: Sequence[Tensor], names: Sequence[str], metadata: dict[str, str]
) -> None:
    """Writes ``items`` (one per image, in order) stacked when they share a shape, else one tensor each."""
    if len({tuple(t.shape) for t in items}) == 1:
        tensors, layout = {kind: torch.stack(list(items))}, {"layout": "stacked"}
    else:
        keys = output_stems(names)  # unique, and the stem decode gives each image's PNG
        tensors = dict(zip(keys, items, strict=True))
        layout = {"layout": "per-image", "keys": json.dumps(keys)}
    write_safetensors(tensors, path, {**metadata, FORMAT_KEY: FILE_FORMAT, "kind": kind, **layout})


def encode_to_file(
    vae: Autoencoder,
    paths: Sequence[Path],
    out: Path,
    model_name: str,
    batch_size: int = 4,
    sample: bool = False,
    seed: int = 0,
    tile_size: int | None = None,
    max_memory: MaxMemory = None,
    indices: bool = False,
) -> LatentsFile:
    """Encodes images of any sizes into a latents file at ``out`` (see the module docstring); returns it.

    Args:
        model_name: the model as the user named it, stored as metadata.
        sample: a seeded sample of a stochastic bottleneck (the KL posterior) instead of its mode.
        tile_size, max_memory: exact tiling (both None: one untiled pass).
        indices: the code indices of a VQ model instead of its (scaled) code vectors.
    """
    if indices:
        vq = require_codebook(
            vae, f"--indices: {model_name} is a {type(vae).__name__}, which has no codebook (VQ models only)"
        )
        if sample:
            raise WorkflowError("--sample with --indices: quantization is deterministic (the nearest code)")
        metadata = {"num_vq_embeddings": str(vq.quantize.num_codes), "codebook_sha256": codebook_sha256(vq)}
    else:
        scaling = latent_scaling(vae)
        metadata = {
            **(
                {"latent_normalization": type(vae).__name__}  # the model's own statistics
                if scaling is None
                else {"scaling_factor": json.dumps(scaling[0]), "shift_factor": json.dumps(scaling[1])}
            ),
            "posterior": f"sample(seed={seed})" if sample else "mode",
        }
    f = vae.config.diffusion_downsample_factor  # FLUX.2: 16, so its 2x2 latent patches tile the image
    sizes = image_sizes(paths)
    generator = torch.Generator(vae.device).manual_seed(seed) if sample else None
    items: list[Tensor] = [torch.empty(0)] * len(paths)
    parts = list(batches_by_shape([padded_size(s, f) for s in sizes], batch_size))
    with torch.inference_mode():
        for batch in progress(parts, len(parts), "encoding"):
            x = load_batch([paths[i] for i in batch], f).to(vae.device)  # (B, 3, H', W')
            if indices:
                _, info = vq.quantize_latents(vq.encode(x, tile_size, max_memory))
                encoded = info.indices.to(torch.int32)  # (B, H'/f, W'/f)
            else:
                z = vae.encode_latents(
                    x, sample=sample, generator=generator, tile_size=tile_size, max_memory=max_memory
                )  # (B, C, H'/f, W'/f)
                encoded = vae.scale_latents(z).float()
            for i, item in zip(batch, encoded.cpu(), strict=True):
                items[i] = item
    names = [p.name for p in paths]
    metadata |= {
        "source_names": json.dumps(names),
        "original_sizes": json.dumps([list(s) for s in sizes]),
        "model": str(model_name),
    }
    kind = INDICES_KEY if indices else LATENTS_KEY
    write_latents_file(out, kind, items, names, metadata)
    return LatentsFile(out, kind, items, metadata, names, [list(s) for s in sizes])


# ------------------------------------------------------------------------------------------ reading


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


def _layout(metadata: dict[str, str], keys: list[str], path: Path) -> tuple[str, list[str] | None]:
    """(kind, the per-image tensor keys in image order, or None for a stacked file)."""
    fmt = metadata.get(FORMAT_KEY)
    if fmt is None:  # format 1: a stacked latents tensor
        kind, layout = LATENTS_KEY, "stacked"
    elif fmt != FILE_FORMAT:
        raise WorkflowError(
            f"{path}: latents file format {fmt!r}; this ldm-vae reads {FILE_FORMAT} and format 1 (no {FORMAT_KEY})"
        )
    else:
        kind, layout = metadata.get("kind", ""), metadata.get("layout", "")
        if kind not in (LATENTS_KEY, INDICES_KEY) or layout not in LAYOUTS:
            raise WorkflowError(
                f"{path}: metadata kind {kind!r} or layout {layout!r} unknown "
                f"(kinds: {LATENTS_KEY}, {INDICES_KEY}; layouts: {', '.join(LAYOUTS)})"
            )
    if layout == "stacked":
        if kind not in keys:
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            raise WorkflowError(f"{path}: no tensor named {kind!r} (has: {shown or 'none'})")
        return kind, None
    listed = metadata_list(metadata, "keys", len(keys), path)
    if not keys or listed is None or sorted(listed) != sorted(keys):
        raise WorkflowError(f"{path}: metadata 'keys' do not list the file's {len(keys)} per-image tensors")
    return kind, listed


def _check_tensor(t: Tensor, kind: str, label: str, stacked: bool, path: Path) -> None:
    """Refuses a tensor of the wrong dtype or rank for its kind, or an empty one."""
    dims = ("(N, " if stacked else "(") + ("C, h, w)" if kind == LATENTS_KEY else "h, w)")
    integer = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    dtype_ok = t.is_floating_point() if kind == LATENTS_KEY else integer
    if not dtype_ok or t.ndim != len(dims.split(", ")) or t.numel() == 0:
        what = "a float" if kind == LATENTS_KEY else "an integer"
        raise WorkflowError(f"{path}: {label} must be {what} {dims} tensor, got {t.dtype} {tuple(t.shape)}")


def _check_codes(items: list[Tensor], num_codes: int, path: Path) -> None:
    """Refuses indices outside a codebook of ``num_codes`` codes."""
    low, high = min(int(t.min()) for t in items), max(int(t.max()) for t in items)
    if low < 0 or high >= num_codes:
        raise WorkflowError(
            f"{path}: code indices out of range (lowest {low}, highest {high}); the codebook has {num_codes} "
            f"codes (0..{num_codes - 1})"
        )


def _num_codes(metadata: dict[str, str], path: Path) -> int:
    try:
        n = int(metadata["num_vq_embeddings"])
    except (KeyError, ValueError):
        raise WorkflowError(
            f"{path}: an indices file needs the codebook size in metadata num_vq_embeddings"
        ) from None
    if n < 1:
        raise WorkflowError(f"{path}: metadata num_vq_embeddings is {n}")
    return n


def read_latents_file(path: str | Path) -> LatentsFile:
    """Reads and checks a latents file of either format and its per-image metadata (before any model loads)."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            kind, keys = _layout(metadata, list(f.keys()), path)
            if keys is None:
                stacked = f.get_tensor(kind)  # (N, C, h, w) or (N, h, w)
                _check_tensor(stacked, kind, kind, True, path)
                items = list(stacked.unbind(0))
            else:
                items = [f.get_tensor(k) for k in keys]
                for t, k in zip(items, keys, strict=True):
                    _check_tensor(t, kind, f"tensor {k!r}", False, path)
    except (SafetensorError, OSError) as e:
        raise WorkflowError(f"{path}: not a readable safetensors file ({e})") from None
    num_codes = None
    if kind == LATENTS_KEY:
        if not all(torch.isfinite(t).all() for t in items):
            raise WorkflowError(f"{path}: {LATENTS_KEY} contain NaN or Inf")
        items = [t.float() for t in items]
    else:
        num_codes = _num_codes(metadata, path)
        _check_codes(items, num_codes, path)
    n = len(items)
    names = metadata_list(metadata, "source_names", n, path) or [f"latent_{i:05d}" for i in range(n)]
    sizes = metadata_list(metadata, "original_sizes", n, path)
    return LatentsFile(path, kind, items, metadata, names, sizes, num_codes)


# ------------------------------------------------------------------------------------------ decoding


def file_scaling(vae: Autoencoder, metadata: dict[str, str], path: Path) -> tuple[float, float] | None:
    """The (scaling, shift) the file was written with, else the model's; warns when they differ. None for a
    model without a global scale (FLUX.2): its ``unscale_latents`` undoes its own normalization."""
    model = latent_scaling(vae)
    named = metadata.get("latent_normalization")  # FLUX.2 files name the class whose statistics they used
    ours = None if model is not None else type(vae).__name__
    if named != ours and (named is not None or "scaling_factor" in metadata):
        used = f"{named}'s per-channel statistics" if named else "scaling_factor/shift_factor"
        needs = f"its own statistics ({ours})" if ours else "scaling_factor/shift_factor"
        raise WorkflowError(
            f"{path}: latents normalized with {used} (by {metadata.get('model', 'an unnamed model')}), but "
            f"{type(vae).__name__} unscales with {needs}: decode them with a model of that kind"
        )
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


def _decoder(
    vae: Autoencoder, file: LatentsFile, model_name: str, tile_size: int | None, max_memory: MaxMemory
) -> Callable[[Tensor], Tensor]:
    """Checks that ``file`` fits the model; returns batch of stacked items (CPU) -> images (B, 3, H, W)."""
    src, written_by = file.path, file.metadata.get("model", "an unnamed model")
    if file.kind == INDICES_KEY:
        vq = require_codebook(
            vae,
            f"{src}: holds VQ code indices (of {written_by}); {model_name} is a {type(vae).__name__} without "
            "a codebook: decode it with a VQ model",
        )
        if file.num_codes != vq.quantize.num_codes:
            raise WorkflowError(
                f"{src}: indices of a {file.num_codes}-code codebook ({written_by}), but {model_name} has "
                f"{vq.quantize.num_codes} codes"
            )
        if file.metadata.get("codebook_sha256", codebook_sha256(vq)) != codebook_sha256(vq):
            print(
                f"warning: {src} was encoded with another codebook ({written_by}); decoding with the "
                f"codebook of {model_name}",
                file=sys.stderr,
            )
        return lambda codes: vq.decode_indices(codes.to(vq.device, torch.long), tile_size, max_memory)
    channels = vae.decode_channels * vae.config.latent_patch**2  # of diffusion-ready latents
    c = next((t.shape[0] for t in file.items if t.shape[0] != channels), None)
    if c is not None:
        raise WorkflowError(f"{src}: latents have {c} channels but {model_name} takes {channels}")
    scaling = file_scaling(vae, file.metadata, src)
    if scaling is None:  # the model's own normalization (FLUX.2)
        return lambda z: vae.decode(vae.unscale_latents(z).to(vae.device), tile_size, max_memory)
    # Undo scale_latents with the file's own values.
    return lambda z: vae.decode((z / scaling[0] + scaling[1]).to(vae.device), tile_size, max_memory)


def decode_to_folder(
    vae: Autoencoder,
    file: LatentsFile,
    out_dir: Path,
    model_name: str,
    batch_size: int = 4,
    tile_size: int | None = None,
    max_memory: MaxMemory = None,
) -> list[Path]:
    """Decodes every image of ``file`` to ``out_dir/<source stem>.png``, cropped to its original size; returns
    the files. Checks that the file fits the model before writing anything."""
    decode = _decoder(vae, file, model_name, tile_size, max_memory)
    f, sizes = vae.config.diffusion_downsample_factor, file.sizes
    for i, t in enumerate(file.items):
        h, w = t.shape[-2:]
        s = sizes[i] if sizes is not None else [h * f, w * f]
        if not (isinstance(s, list) and len(s) == 2 and 0 < s[0] <= h * f and 0 < s[1] <= w * f):
            raise WorkflowError(
                f"{file.path}: metadata original_sizes {s} of {file.names[i]} do not fit its latents of "
                f"{h}x{w} (images {h * f}x{w * f})"
            )
    outputs = png_outputs(out_dir, [str(x) for x in file.names])
    check_no_overwrite(outputs, [file.path])
    parts = list(batches_by_shape([tuple(t.shape) for t in file.items], batch_size))
    with torch.inference_mode():
        for batch in progress(parts, len(parts), "decoding"):
            images = decode(torch.stack([file.items[i] for i in batch])).cpu()  # (B, 3, h*f, w*f)
            for i, image in zip(batch, images, strict=True):
                save_image(crop_to(image, sizes[i]) if sizes else image, outputs[i])
    return outputs
