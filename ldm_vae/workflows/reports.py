"""Reconstructions scored against the bicubic baseline: the images, ``metrics.json`` and the printed table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..images import crop_to, padded_size, round_to_8bit, save_image
from ..interface import Autoencoder
from ..io import write_json
from ..metrics import bicubic_baseline, psnr, ssim
from ..tiling import MaxMemory
from .base import batches, image_sizes, load_batch, progress

METRIC_KEYS = ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")


def reconstruct_images(
    vae: Autoencoder,
    paths: Sequence[Path],
    outputs: Sequence[Path],
    batch_size: int,
    tile_size: int | None = None,
    max_memory: MaxMemory = None,
) -> list[dict]:
    """Encodes and decodes each image, writes the 8-bit reconstruction, and scores it (PSNR/SSIM, and the
    bicubic x f down/up baseline) as written to disk; returns one row per image."""
    f = vae.config.downsample_factor
    sizes = image_sizes(paths)
    # Batch images of equal padded size; GroupNorm statistics are per image, so batching changes nothing.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(padded_size(size, f), []).append(i)
    parts = [b for idx in groups.values() for b in batches(idx, batch_size)]
    rows: list[dict] = [{} for _ in paths]
    with torch.inference_mode():
        for batch in progress(parts, len(parts), "reconstructing"):
            x = load_batch([paths[i] for i in batch], f)  # (B, 3, H', W')
            z = vae.encode_latents(x.to(vae.device), tile_size=tile_size, max_memory=max_memory)
            recon = vae.decode(z, tile_size=tile_size, max_memory=max_memory).cpu()  # (B, 3, H', W')
            for i, xi, ri in zip(batch, x, recon, strict=True):
                original = crop_to(xi, sizes[i])
                # Scored as written to disk (8-bit), like the bicubic baseline.
                ri = round_to_8bit(crop_to(ri, sizes[i]))
                base = round_to_8bit(bicubic_baseline(original, f))
                save_image(ri, outputs[i])
                rows[i] = {
                    "source": str(paths[i]),
                    "output": outputs[i].name,
                    "size": list(sizes[i]),
                    "psnr": psnr(original, ri).item(),
                    "ssim": ssim(original, ri).item(),
                    "bicubic_psnr": psnr(original, base).item(),
                    "bicubic_ssim": ssim(original, base).item(),
                }
    return rows


def mean_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """The mean of each metric over the rows."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRIC_KEYS}


def json_number(v: object) -> object:
    """``v``, with a non-finite float as None."""
    # PSNR of an exact reconstruction is inf, which strict JSON cannot hold.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_reconstruct_report(
    rows: Sequence[dict], mean: dict[str, float], vae: Autoencoder, model_name: str, path: Path
) -> dict:
    """Writes ``metrics.json`` (the model, its factor and dtype, per-image rows and their mean); returns it."""
    report = {
        "model": str(model_name),
        "downsample_factor": vae.config.downsample_factor,
        "dtype": str(vae.dtype).removeprefix("torch."),
        "images": [{k: json_number(v) for k, v in r.items()} for r in rows],
        "mean": {k: json_number(v) for k, v in mean.items()},
    }
    write_json(report, path)
    return report


def format_table(rows: Sequence[dict], mean: dict[str, float], f: int) -> str:
    """The per-image and mean PSNR/SSIM of the reconstructions and of the bicubic x f baseline, as text."""
    width = max(12, *(len(r["output"]) for r in rows))
    head = (
        f"{'image':<{width}}  {'size':>11}  {'PSNR':>7}  {'SSIM':>6}  {f'bicubic x{f} PSNR':>17}  {'SSIM':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in [*rows, {"output": "mean", "size": None, **mean}]:
        size = "x".join(map(str, r["size"])) if r["size"] else ""
        lines.append(
            f"{r['output']:<{width}}  {size:>11}  {r['psnr']:>7.2f}  {r['ssim']:>6.4f}  "
            f"{r['bicubic_psnr']:>17.2f}  {r['bicubic_ssim']:>6.4f}"
        )
    return "\n".join(lines)


def print_table(rows: Sequence[dict], mean: dict[str, float], f: int) -> None:
    """Prints :func:`format_table` on stdout."""
    print(format_table(rows, mean, f))
