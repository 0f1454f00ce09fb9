"""Latent statistics: the scale and shift factors a diffusion model needs, measured on a user's data.

Latent Diffusion's ``scale_by_std`` (Rombach et al., 2022, Sec. 4.3.2 and App. G) divides the latents by their
standard deviation so that the diffusion model sees unit-variance data; SD3 and FLUX also subtract a shift;
per-channel means and standard deviations are what ``latents_mean`` / ``latents_std`` configs carry. All of them
are moments of the latents z the diffusion model trains on. For a KL model these are posterior samples, whose
first two moments per element are known in closed form (E[z] = mu, E[z^2] = mu^2 + sigma^2), so the statistics
are those of infinitely many samples; for a VQ model z is the quantized latent. Sums run in float64.

FLUX.2 normalizes each channel of its 2x2-patchified latents with a BatchNorm's running mean and variance instead
of one global scale, so for it the statistics are taken per patch channel and set against those; ``--write``
stores the measured ones as the running statistics.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..autoencoder_kl_flux2 import AutoencoderKLFlux2
from ..images import collect_images
from ..interface import Autoencoder
from ..io import write_json
from ..latents import MANIFEST_NAME, LatentDataset, check_views, prepare_image, shards_of_process
from ..seeds import mix_seed
from .base import WorkflowError, batches, progress
from .latents_file import latent_scaling


@dataclass(frozen=True)
class LatentStats:
    """Moments of raw latents z (before any scaling), over every element and per channel (for FLUX.2, per
    channel of its 2x2 patches)."""

    items: int  # latents measured (images x views)
    elements_per_channel: int  # positions summed per channel (items x h x w)
    mean: float  # E[z] over every element: the shift_factor
    std: float  # sqrt(Var[z]) over every element: scaling_factor = 1 / std (LDM's scale_by_std)
    channel_mean: tuple[float, ...]  # E[z_c]: a latents_mean config
    channel_std: tuple[float, ...]  # sqrt(Var[z_c]): a latents_std config

    @property
    def scaling_factor(self) -> float:
        return 1.0 / self.std

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "elements_per_channel": self.elements_per_channel,
            "mean": self.mean,
            "std": self.std,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.mean,
            "latents_mean": list(self.channel_mean),
            "latents_std": list(self.channel_std),
        }


class MomentSums:
    """float64 per-channel sums of E[z] and E[z^2], combined across batches (and processes) exactly."""

    def __init__(self, channels: int) -> None:
        self.count = 0  # positions per channel
        self.items = 0
        self.first = torch.zeros(channels, dtype=torch.float64)
        self.second = torch.zeros(channels, dtype=torch.float64)

    def add(self, first: Tensor, second: Tensor) -> None:
        """One batch of per-element moments, each (B, C, h, w)."""
        self.items += first.shape[0]
        self.count += first.shape[0] * first.shape[2] * first.shape[3]
        self.first += first.double().sum(dim=(0, 2, 3)).cpu()
        self.second += second.double().sum(dim=(0, 2, 3)).cpu()

    def all_reduce(self) -> None:
        """Sums over every process of a ``torch.distributed`` group (a no-op in one process)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        packed = torch.cat(
            [torch.tensor([self.count, self.items], dtype=torch.float64), self.first, self.second]
        )
        torch.distributed.all_reduce(packed)
        c = len(self.first)
        self.count, self.items = int(packed[0]), int(packed[1])
        self.first, self.second = packed[2 : 2 + c], packed[2 + c :]

    def stats(self) -> LatentStats:
        if not self.count:
            raise WorkflowError("no latents to measure")
        mean_c = self.first / self.count
        var_c = (self.second / self.count - mean_c.square()).clamp_min(0)
        mean = float(self.first.sum() / (self.count * len(self.first)))
        var = max(float(self.second.sum() / (self.count * len(self.first))) - mean * mean, 0.0)
        if not var > 0:
            raise WorkflowError("the latents have zero variance: no scale can be computed")
        return LatentStats(
            items=self.items,
            elements_per_channel=self.count,
            mean=mean,
            std=math.sqrt(var),
            channel_mean=tuple(mean_c.tolist()),
            channel_std=tuple(var_c.sqrt().tolist()),
        )


def image_stats(
    vae: Autoencoder,
    files: list[Path],
    resolution: int,
    views: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    tile_size: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> MomentSums:
    """Sums of the latent moments of ``files`` (views as ``cache-latents`` makes them); this process's share.

    Process ``rank`` of ``world`` takes items rank, rank + world, ...; :meth:`MomentSums.all_reduce` combines them.
    """
    check_views(vae.config.diffusion_downsample_factor, len(files), resolution, views)  # as cache-latents
    layout = normalized_layout(vae)
    sums = MomentSums(vae.decode_channels * vae.config.latent_patch**2)
    mine = shards_of_process(len(files) * views, rank, world)  # items, not shards: every world-th one
    with torch.inference_mode():
        for batch in progress(list(batches(mine, batch_size)), -(-len(mine) // batch_size), "latent stats"):
            x = torch.stack(
                [prepare_image(files[k // views], resolution, k % views, mix_seed(seed, k)) for k in batch]
            )
            moments = vae.encode_moments(x.to(vae.device), tile_size=tile_size)  # (B, C, R/f, R/f) each
            sums.add(*map(layout, moments))
    return sums


def normalized_layout(vae: Autoencoder | None) -> Callable[[Tensor], Tensor]:
    """The layout whose channels the model's latent scaling normalizes: FLUX.2's 2x2 patches, else the latents
    themselves. Patchifying only moves elements, so it maps per-element moments to per-element moments."""
    return vae.patchify if isinstance(vae, AutoencoderKLFlux2) else (lambda z: z)


def cache_stats(
    latent_dir: str | os.PathLike, vae: Autoencoder | None = None
) -> tuple[MomentSums, dict[str, Any]]:
    """Sums of the latent moments in a ``cache-latents`` folder (posterior mean and std), and its manifest;
    in ``vae``'s :func:`normalized_layout` when given."""
    data = LatentDataset(latent_dir, sample=False)
    layout = normalized_layout(vae)
    sums = MomentSums(layout(data.mean[:1]).shape[1])
    for start in range(0, len(data.mean), 256):
        mean, std = data.mean[start : start + 256], data.std[start : start + 256]
        sums.add(layout(mean), layout(mean.square() + std.square()))
    return sums, data.manifest


def is_cache(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def stats_inputs(src: str | os.PathLike) -> list[Path]:
    """The images of an image folder (a cache folder is read by :func:`cache_stats` instead)."""
    path = Path(src)
    if not path.is_dir():
        raise WorkflowError(f"{path}: {'is a file' if path.exists() else 'no such directory'}")
    return collect_images([path])


def format_stats(stats: LatentStats, scaling: float, shift: float) -> str:
    """The measured factors next to the model's, and what the model's factors do to these latents."""
    rows = [
        f"{stats.items} latents, {stats.elements_per_channel} positions per channel (float64 sums)",
        f"{'':<28}{'measured':>12}{'model':>12}",
        f"{'scaling_factor (1 / std)':<28}{stats.scaling_factor:>12.6g}{scaling:>12.6g}",
        f"{'shift_factor (mean)':<28}{stats.mean:>12.6g}{shift:>12.6g}",
        f"with the model's factors the diffusion model sees mean {(stats.mean - shift) * scaling:.4g}, "
        f"std {stats.std * scaling:.4g} (want 0, 1)",
        "per channel:  " + "  ".join(f"c{i} {m:+.4f}/{s:.4f}" for i, (m, s) in enumerate(_pairs(stats))),
    ]
    return "\n".join(rows)


def _pairs(stats: LatentStats) -> Iterable[tuple[float, float]]:
    return zip(stats.channel_mean, stats.channel_std, strict=True)


def format_normalization(stats: LatentStats, mean: Tensor, std: Tensor, patch: int) -> str:
    """The measured per-channel moments next to a per-channel normalization's ``mean`` and ``std`` (FLUX.2's
    running mean and sqrt(running_var + eps) over ``patch`` x ``patch`` patches), and what that normalization
    does to these latents."""
    m, s = torch.tensor(stats.channel_mean, dtype=torch.float64), torch.tensor(stats.channel_std).double()
    mu, sd = mean.double().flatten().cpu(), std.double().flatten().cpu()
    # Normalized u_c = (z_c - mu_c) / sd_c: E[u_c] and E[u_c^2] in closed form, then over every element.
    first, second = (m - mu) / sd, (s.square() + (m - mu).square()) / sd.square()
    seen_mean = float(first.mean())
    seen_std = math.sqrt(max(float(second.mean()) - seen_mean**2, 0.0))
    worst = int(first.abs().argmax())
    ratio = s / sd

    def span(t: Tensor) -> str:
        return f"{float(t.min()):.4g} .. {float(t.max()):.4g}"

    rows = [
        f"{stats.items} latents, {stats.elements_per_channel} positions per channel (float64 sums), "
        f"{len(m)} channels ({patch}x{patch} patches), against the model's per-channel normalization",
        f"{'':<28}{'measured':>22}{'model':>22}",
        f"{'channel means':<28}{span(m):>22}{span(mu):>22}",
        f"{'channel stds':<28}{span(s):>22}{span(sd):>22}",
        f"largest mean offset {float(first[worst]):+.4g} model stds (c{worst}); std / model std {span(ratio)}",
        f"with the model's normalization the diffusion model sees mean {seen_mean:.4g}, std {seen_std:.4g} "
        "(want 0, 1)",
        "per channel (measured | model):  "
        + "  ".join(
            f"c{i} {a:+.4f}/{b:.4f} | {c:+.4f}/{d:.4f}"
            for i, (a, b, c, d) in enumerate(
                zip(m.tolist(), s.tolist(), mu.tolist(), sd.tolist(), strict=True)
            )
        ),
    ]
    return "\n".join(rows)


def describe_stats(stats: LatentStats, vae: Autoencoder) -> str:
    """:func:`format_stats` against the model's factors, or :func:`format_normalization` against FLUX.2's
    per-channel normalization."""
    if isinstance(vae, AutoencoderKLFlux2):
        mean, std = vae.latent_normalization(torch.zeros((), dtype=torch.float64))
        return format_normalization(stats, mean, std, vae.config.latent_patch)
    return format_stats(stats, *latent_scaling(vae))


def write_with_factors(vae: Autoencoder, stats: LatentStats, out_dir: Path, shift: bool) -> Path:
    """A copy of ``vae`` in ``out_dir`` with ``scaling_factor`` (and, with ``shift``, ``shift_factor``) measured,
    plus ``latent_stats.json`` with every statistic. For FLUX.2 the measured per-channel means and variances
    become the BatchNorm's running statistics instead.

    Raises:
        WorkflowError: ``shift`` for a model whose config has no shift factor.
    """
    flux2 = isinstance(vae, AutoencoderKLFlux2)
    changes: dict[str, Any] = {} if flux2 else {"scaling_factor": stats.scaling_factor}
    if shift:
        if not hasattr(vae.config, "shift_factor"):
            what = (
                "normalizes each channel by its own mean and std; write both without --shift"
                if flux2
                else "has no shift_factor; write the scale alone (no --shift)"
            )
            raise WorkflowError(f"a {type(vae).__name__} {what}")
        changes["shift_factor"] = stats.mean
    copy = type(vae)(dataclasses.replace(vae.config, **changes))
    copy.load_state_dict(vae.state_dict())
    if flux2:
        with torch.no_grad():  # population variances: the pipelines divide by sqrt(running_var + eps)
            copy.bn.running_mean.copy_(torch.tensor(stats.channel_mean))
            copy.bn.running_var.copy_(torch.tensor(stats.channel_std).square())
    copy.save_pretrained(out_dir)
    write_json(stats.as_dict(), out_dir / "latent_stats.json")
    return out_dir
