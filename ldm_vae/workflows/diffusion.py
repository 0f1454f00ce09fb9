"""Latent diffusion on top of an autoencoder: sampling a pipeline, its bound in bits/dim, latent-cache checks.

diffusers takes seconds to import and only these workflows need it, so they import :mod:`ldm_vae.ldm` (and
the latent cache) when they run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from ..autoencoder_kl import AutoencoderKL
from ..images import collect_images, readable, save_image
from ..interface import Autoencoder
from .base import WorkflowError, batches, output_dir, progress


def write_samples(
    vae: Autoencoder,
    unet: torch.nn.Module,
    scheduler: object,
    out_dir: Path,
    num: int,
    steps: int,
    seed: int,
    eta: float = 0.0,
    batch_size: int = 16,
) -> list[Path]:
    """Samples ``num`` latents, decodes them, writes ``sample-NNNNN.png`` and ``grid.png``; returns the files."""
    from torchvision.utils import make_grid

    from ..ldm import decode_latents, sample_latents

    generator = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    # All initial noise in one draw, as LDMPipeline(batch_size=n, generator=...) draws it.
    noise = torch.randn(num, c, s, s, generator=generator)  # (n, C, s, s)
    images, files = [], []
    for batch in batches(range(num), batch_size):
        z = sample_latents(
            unet, scheduler, len(batch), steps, generator, eta, noise=noise[batch], progress=True
        )
        for i, image in zip(batch, decode_latents(vae, z).cpu(), strict=True):
            files.append(save_image(image, out_dir / f"sample-{i:05d}.png"))
            images.append(image)
    grid = make_grid(torch.stack(images), nrow=max(1, round(num**0.5)), padding=2, pad_value=1.0)
    save_image(grid, out_dir / "grid.png")
    return files


# How far the cache's scale may be from the pipeline's and still be the same VAE's latents. The cache's scale
# is 1 / std over every cached view, held-out images' included, while the trainer scales by the training views'
# std only; re-encoding on another CPU, dtype or thread count also moves it (3.9e-4 relative was seen for the
# shipped photo pipeline). Both stay well under 1%, while another autoencoder or another kind of image changes
# the std by tens of percent (the demo VAE: 0.42 on photos, 0.26 on digits).
SCALE_RTOL = 1e-2


def ldm_eval(
    pipeline: str | os.PathLike,
    latents: str | os.PathLike,
    device: torch.device,
    last: int | None = None,
    timesteps: int | None = 100,
    seed: int = 0,
    batch_size: int = 16,
) -> tuple[str, list[tuple[str, float]]]:
    """DDPM's variational bound of ``pipeline`` on cached latents next to Gaussian baselines, in bits/dim.

    The latents are scaled by the pipeline's own ``scaling_factor`` (the one its UNet was trained with); the
    cache's scale only has to agree within ``SCALE_RTOL``. With ``last``, the Gaussians of
    :func:`~ldm_vae.ldm.gaussian_baselines` are fitted to the other images' latents (the trainer's training
    split, four posterior samples of each) and scored on the same held-out latents as the bound.

    Args:
        last: only the center crops of the last ``last`` images (the trainer's held-out split).
        timesteps: importance-sampled timesteps of the sum over t; None or 0: all of them.
        seed: seed of the posterior samples and of the noise.

    Returns:
        A line saying what was evaluated, and (term, bits/dim) rows.
    """
    from ..latents import LatentDataset, held_out_split
    from ..ldm import (
        BASELINE_NAMES,
        gaussian_baselines,
        gaussian_bits_per_dim,
        load_pipeline,
        sampling_scheduler,
        vlb_bits_per_dim,
    )

    vae, unet, scheduler = load_pipeline(pipeline, device)
    data, train = LatentDataset(latents), None
    if last is not None:
        try:
            train_items, held = held_out_split(data.manifest, last)
        except ValueError as e:
            raise WorkflowError(f"--last {last}: {e}") from None
        data, train = LatentDataset(latents, held), LatentDataset(latents, train_items)
    scale = vae.config.scaling_factor
    if not math.isclose(scale, data.scale, rel_tol=SCALE_RTOL) or data.shift:
        raise WorkflowError(
            f"{pipeline}: its VAE scales latents by {scale}, the cache by {data.scale} (shift {data.shift}; "
            f"more than {SCALE_RTOL:.0%} apart): the UNet was not trained on these latents"
        )
    for d in (data, train):
        if d is not None:
            d.scale = scale  # what the UNet saw
    z = data.fixed_samples(seed)  # (N, C, h, w), diffusion-ready
    if tuple(z.shape[1:]) != (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size):
        raise WorkflowError(
            f"latents of shape {tuple(z.shape[1:])} do not fit the UNet ({unet.config.sample_size} px)"
        )
    noise = sampling_scheduler(scheduler, "ddpm", 0.0)  # the training betas and variances
    generator = torch.Generator().manual_seed(seed)
    timesteps = timesteps or None
    parts: dict[str, list[Tensor]] = {}
    chunks = list(batches(range(len(z)), batch_size))
    for batch in progress(chunks, len(chunks), "bound"):
        for key, value in vlb_bits_per_dim(unet, noise, z[batch], timesteps, generator).items():
            parts.setdefault(key, []).append(value)
    mean = {k: torch.cat(v).mean().item() for k, v in parts.items()}
    how = "all timesteps" if timesteps is None else f"{timesteps} importance-sampled timesteps"
    what = (
        f"{len(z)} latents ({'x'.join(map(str, z.shape[1:]))}) of {latents}, posterior samples (seed {seed}), "
        f"scaled by the pipeline's {scale:.6g}"
        + (f"; Gaussians fitted to the other {len(train)} latents" if train is not None else "")
    )
    rows = [
        ("DDPM variational bound (continuous)", mean["total"]),
        ("  L_T (prior term)", mean["prior"]),
        (f"  sum of L_t-1 ({how})", mean["diffusion"]),
        ("  L_0 (Gaussian decoder term)", mean["decoder"]),
    ]
    fits = {"prior": (None, None)}
    if train is not None and len(train):
        fits = gaussian_baselines(train.fixed_draws(seed))
    rows += [
        (BASELINE_NAMES[k] + " NLL", gaussian_bits_per_dim(z, *fit).mean().item()) for k, fit in fits.items()
    ]
    return what, rows


def format_bits_table(rows: list[tuple[str, float]]) -> str:
    """(term, bits/dim) rows as an aligned table."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        [f"{'':<{width}}  {'bits/dim':>9}", *(f"{name:<{width}}  {v:>9.4f}" for name, v in rows)]
    )


def cache_inputs(data_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """The images of ``data_dir`` for a latent cache in ``out_dir``, every one checked readable."""

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise WorkflowError(f"{data_dir}: {'is a file' if data_dir.exists() else 'no such directory'}")
    output_dir(out_dir)
    paths = collect_images([data_dir])
    # Headers only, so a bad file fails in seconds rather than after hours of encoding.
    _, bad = readable(progress(paths, len(paths), "checking"))
    if bad:
        raise WorkflowError(
            f"{bad[0][0]}: not a readable image ({bad[0][1]}); {len(bad)} such file(s) in {data_dir}"
        )
    return paths


def require_posterior(vae: Autoencoder, name: str) -> AutoencoderKL:
    """``vae``, refused unless it has a Gaussian posterior, the mean and std a latent cache stores."""
    # One of the two kind checks of the workflows (code indices the other): the cache format (posterior
    # mean + std) is KL's by definition.
    if not isinstance(vae, AutoencoderKL):
        raise WorkflowError(
            f"{name}: a {type(vae).__name__} has no posterior; cache-latents stores a KL posterior's mean "
            "and std, so it needs a KL model (for a VQ model, `ldm-vae encode --indices` writes its codes)"
        )
    return vae
