"""Latent-space regularizers for autoencoder training, and the equivariance metric they optimize.

Each one decodes something other than the plain z in the training forward pass (through the model's
``latent_transform`` argument, so under DDP the step still runs one wrapped forward) and asks for the matching
image:

- **EQ-VAE** (Kouzelis et al., 2025, "EQ-VAE: Equivariance Regularized Latent Space for Improved Generative
  Image Modeling", arXiv:2502.09509): with probability p a step decodes tau(z) instead of z and its whole
  objective (reconstruction, LPIPS, GAN) compares with tau(x). As in the official code, tau is a bilinear
  downscale of the latent to n x n with n uniform in [ceil(0.25 h), h - 1], and of the image to the same
  size times the model's factor, composed with a rotation by 90, 180 or 270 degrees; flips are optional.
- **Scale equivariance** (Skorokhodov et al., 2025, "Improving the Diffusability of Autoencoders",
  arXiv:2502.14831): every step adds w * d(down_k(x), D(down_k(z))), where down_k is a bilinear 2x or 4x
  downscale and d is the same reconstruction term as the main one, per pixel.
- **Latent noise augmentation**: the decoder sees z + sigma * eps, with sigma uniform per sample in a range
  given in diffusion-ready units (after ``scale_latents``). It makes the decoder robust to the small errors a
  diffusion model leaves in the latents it generates.

Host-side choices (whether EQ-VAE applies, the size, the rotation, the factor) come from a Python RNG seeded
by the step generator's seed, so a resumed run draws the same ones and every rank draws its own. The noise is
drawn on the device from the step generator inside the forward, after the posterior sample. Nothing reads a
value back from the device.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .interface import Autoencoder, Regularization
from .metrics import psnr
from .seeds import mix_seed

if TYPE_CHECKING:  # the loss module imports lpips/torchvision: only the trainer needs it
    from .losses import AutoencoderLoss

Resample = Literal["bilinear", "bicubic", "area"]

# Stream tag mixed into the step seed for the host-side draws (any fixed value; it only has to stay put for
# resumes to repeat).
_HOST_STREAM = 0x4C52


# ------------------------------------------------------------------------------------------- configs


def _check(section: object, **ok: bool) -> None:
    """ValueError naming the first field whose check failed."""
    for name, passed in ok.items():
        if not passed:
            raise ValueError(f"{type(section).__name__}.{name} = {getattr(section, name)!r} is out of range")


@dataclass(frozen=True)
class EQVAEConfig:
    """EQ-VAE (Kouzelis et al., 2025); the defaults are the official training config."""

    enabled: bool = False  # off by default
    prob: float = 0.5  # chance per step of decoding tau(z) against tau(x) instead of z against x (p_prior)
    min_scale: float = 0.25  # latent side n uniform in [ceil(min_scale * h), h - 1]; 1.0: no downscale
    rotations: bool = True  # compose every tau with a rotation by 90, 180 or 270 degrees (official code)
    flips: bool = False  # also a horizontal mirror with chance 1/2 (not in the paper's training recipe)
    mode: Resample = "bilinear"  # resampling of both the latent and the image (official: bilinear)
    antialias: bool = False  # the official code downscales without an antialiasing filter

    def __post_init__(self) -> None:
        _check(self, prob=0 <= self.prob <= 1, min_scale=0 < self.min_scale <= 1)
        if self.enabled and self.min_scale == 1 and not (self.rotations or self.flips):
            raise ValueError("EQVAEConfig: min_scale 1 without rotations or flips leaves no transform")


@dataclass(frozen=True)
class ScaleEquivarianceConfig:
    """Scale equivariance (Skorokhodov et al., 2025): one extra decode of a downscaled latent per step."""

    enabled: bool = False  # off by default
    weight: float = 1.0  # weight of the term per pixel, relative to the main reconstruction term
    factors: tuple[int, ...] = (2, 4)  # downscale factors; each step draws one of them
    mode: Resample = "bilinear"  # resampling of both (a 2x bilinear downscale averages 2x2 blocks)
    antialias: bool = False  # blur before a 4x bilinear downscale (False: bilinear as is)

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", tuple(int(k) for k in self.factors))
        _check(self, weight=self.weight >= 0, factors=bool(self.factors) and min(self.factors) >= 2)


@dataclass(frozen=True)
class LatentNoiseConfig:
    """Noise on the latents the decoder sees: z + sigma * eps, sigma ~ U[sigma_min, sigma_max] per sample."""

    enabled: bool = False  # off by default
    sigma_min: float = 0.0  # in diffusion-ready units (scale_latents: unit-variance latents)
    sigma_max: float = 0.1  # a diffusion model's small late-step errors, not its full noise range

    def __post_init__(self) -> None:
        _check(self, sigma_min=self.sigma_min >= 0, sigma_max=self.sigma_max >= self.sigma_min)


# ------------------------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class SpatialTransform:
    """tau: resize (latent to ``size``, image to ``size`` times the model's factor), then ``rot`` quarter
    turns, then a horizontal mirror when ``flip``. The default is the identity."""

    size: tuple[int, int] | None = None  # latent (h, w) after resizing; None keeps the size
    rot: int = 0  # quarter turns, counter-clockwise (torch.rot90 over (H, W))
    flip: bool = False  # mirror left-right after the rotation
    mode: Resample = "bilinear"  # resampling filter
    antialias: bool = False  # antialiased downscale (bilinear/bicubic only)

    @property
    def name(self) -> str:
        parts = [f"{self.size[0]}x{self.size[1]}"] if self.size else []
        parts += [f"rot{90 * self.rot}"] if self.rot else []
        return "+".join(parts + (["flip"] if self.flip else [])) or "identity"

    def latent(self, z: Tensor) -> Tensor:
        """tau on latents (B, C, h, w) -> (B, C, size) (sides swapped by odd rotations)."""
        return self._apply(z, self.size)

    def image(self, x: Tensor, factor: int) -> Tensor:
        """tau on images (B, C, f h, f w): the same transform at ``factor`` pixels per latent pixel."""
        size = None if self.size is None else (self.size[0] * factor, self.size[1] * factor)
        return self._apply(x, size)

    def _apply(self, t: Tensor, size: tuple[int, int] | None) -> Tensor:
        if size is not None and tuple(t.shape[-2:]) != size:
            smooth = self.mode != "area"
            t = F.interpolate(
                t,
                size=size,
                mode=self.mode,
                align_corners=False if smooth else None,
                antialias=self.antialias and smooth,
            )
        if self.rot % 4:
            t = torch.rot90(t, self.rot % 4, dims=(-2, -1))
        return torch.flip(t, dims=(-1,)) if self.flip else t


def scaled_size(hw: Sequence[int], n: int) -> tuple[int, int]:
    """(n, w * n / h rounded, at least 1): the size of a downscale of ``hw`` whose height is ``n``."""
    h, w = int(hw[0]), int(hw[1])
    return n, max(1, round(w * n / h))


@dataclass(frozen=True)
class LatentPlan:
    """One step's latent views, passed into the model's forward as its ``latent_transform``.

    View 0 replaces the plain reconstruction (EQ-VAE's tau, or the identity); any further view is a
    scale-equivariance downscale. With ``noise`` every view gets z + sigma * eps on the way in.
    """

    views: tuple[SpatialTransform, ...]  # what is decoded; targets are the same transforms of x
    factor: int  # image pixels per latent pixel along one edge
    noise: tuple[float, float] | None = None  # (sigma_min, sigma_max) in raw latent units; None: no noise
    generator: torch.Generator | None = None  # the step's generator, for the noise (on the latents' device)
    eq_applied: bool = False  # whether view 0 is an EQ-VAE transform this step

    def __call__(self, z: Tensor) -> tuple[Tensor, ...]:
        views = tuple(v.latent(z) for v in self.views)
        return views if self.noise is None else tuple(self._noisy(v) for v in views)

    def targets(self, x: Tensor) -> tuple[Tensor, ...]:
        """What each view's decode is compared with: the same transforms of the images."""
        return tuple(v.image(x, self.factor) for v in self.views)

    def _noisy(self, z: Tensor) -> Tensor:
        lo, hi = self.noise  # type: ignore[misc]
        u = torch.rand(z.shape[0], 1, 1, 1, generator=self.generator, device=z.device)  # (B, 1, 1, 1)
        eps = torch.randn(z.shape, generator=self.generator, device=z.device)
        return z + ((lo + (hi - lo) * u) * eps).to(z.dtype)


# ------------------------------------------------------------------------------------------- the step


class LatentRegularizers:
    """The regularizers of one training run: checked once against the model and crop size, then drawn per step.

    Args:
        eq: EQ-VAE's section.
        scale: scale equivariance's section.
        noise: latent noise's section.
        factor: the model's downsample factor.
        scaling_factor: the model's ``scaling_factor`` (noise sigmas are given in diffusion-ready units).
    """

    def __init__(
        self,
        eq: EQVAEConfig,
        scale: ScaleEquivarianceConfig,
        noise: LatentNoiseConfig,
        factor: int,
        scaling_factor: float,
    ) -> None:
        self.eq, self.scale, self.noise = eq, scale, noise
        self.factor, self.scaling_factor = factor, scaling_factor

    @property
    def enabled(self) -> bool:
        return self.eq.enabled or self.scale.enabled or self.noise.enabled

    def check(self, resolution: int, min_image: int = 1) -> None:
        """Refuses crops the transforms cannot map exactly between image and latent, in one line.

        Args:
            resolution: the square training crop's side.
            min_image: the smallest image side the loss can take (the discriminator's, when it is on).

        Raises:
            ValueError: a crop that is no multiple of the model's factor, a scale factor that does not divide
                the latent side, or a downscale smaller than ``min_image``.
        """
        if not (self.eq.enabled or self.scale.enabled):
            return
        if resolution % self.factor:
            raise ValueError(
                f"data.resolution {resolution} is not a multiple of the model's downsample factor "
                f"{self.factor}: the latent transforms need image = factor x latent exactly"
            )
        h = resolution // self.factor
        if self.eq.enabled and self.eq.min_scale < 1:
            lo = self._eq_sizes(h)[0]
            if lo > h - 1:
                raise ValueError(
                    f"eq_vae.min_scale {self.eq.min_scale}: {h}-pixel latents (data.resolution {resolution}, "
                    f"factor {self.factor}) leave no smaller size; raise data.resolution"
                )
            self._check_min(lo * self.factor, min_image, f"eq_vae.min_scale {self.eq.min_scale}", resolution)
        if self.scale.enabled:
            for k in self.scale.factors:
                if h % k:
                    raise ValueError(
                        f"scale_equivariance.factors {k} does not divide the {h}-pixel latents of "
                        f"data.resolution {resolution} (factor {self.factor}); use a resolution that is a "
                        f"multiple of {self.factor * k}"
                    )
                self._check_min(resolution // k, min_image, f"scale_equivariance.factors {k}", resolution)

    @staticmethod
    def _check_min(side: int, min_image: int, what: str, resolution: int) -> None:
        if side < min_image:
            raise ValueError(
                f"{what} makes {side}-pixel images at data.resolution {resolution}, below the "
                f"discriminator's {min_image} px"
            )

    def _eq_sizes(self, h: int) -> tuple[int, int]:
        """EQ-VAE's latent sides: [ceil(min_scale * h), h - 1] (official: 8..31 of 32)."""
        return max(1, math.ceil(self.eq.min_scale * h - 1e-9)), h - 1

    def draw(self, generator: torch.Generator, latent_hw: Sequence[int]) -> LatentPlan | None:
        """This step's plan (None when every regularizer is off), from the step generator's seed."""
        if not self.enabled:
            return None
        rng = random.Random(mix_seed(generator.initial_seed(), _HOST_STREAM))
        main, eq_applied = SpatialTransform(), False
        if self.eq.enabled and rng.random() < self.eq.prob:
            main, eq_applied = self._eq_transform(rng, latent_hw), True
        views = [main]
        if self.scale.enabled:
            k = rng.choice(self.scale.factors)
            size = (int(latent_hw[0]) // k, int(latent_hw[1]) // k)
            views.append(SpatialTransform(size, mode=self.scale.mode, antialias=self.scale.antialias))
        noise = None
        if self.noise.enabled:  # diffusion-ready sigma -> raw latent units
            noise = (self.noise.sigma_min / self.scaling_factor, self.noise.sigma_max / self.scaling_factor)
        return LatentPlan(tuple(views), self.factor, noise, generator if noise else None, eq_applied)

    def _eq_transform(self, rng: random.Random, latent_hw: Sequence[int]) -> SpatialTransform:
        size = None
        if self.eq.min_scale < 1:
            size = scaled_size(latent_hw, rng.randint(*self._eq_sizes(int(latent_hw[0]))))
        rot = rng.randint(1, 3) if self.eq.rotations else 0
        flip = self.eq.flips and rng.random() < 0.5
        return SpatialTransform(size, rot, flip, self.eq.mode, self.eq.antialias)

    def scale_loss(
        self,
        loss_fn: AutoencoderLoss,
        targets: Sequence[Tensor],
        recons: Sequence[Tensor],
        reg: Regularization,
        full_pixels: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """w * the reconstruction term of the downscaled views, per pixel like the main term.

        LDM's KL recipe sums its term over pixels: a view with 1/k^2 of the pixels is scaled back by k^2, so
        ``weight`` 1 weighs a downscaled pixel as much as a full-resolution one.
        """
        total = torch.zeros((), device=targets[0].device)
        for target, recon in zip(targets, recons, strict=True):
            nll = loss_fn.reconstruction_nll(target, recon, reg)[0]
            if reg.pixel_reduction == "sum":
                nll = nll * (full_pixels / (target.shape[-2] * target.shape[-1]))
            total = total + nll
        return self.scale.weight * total, {"scale_eq": total.detach().float()}


# ------------------------------------------------------------------------------------------- the metric


def evaluation_transforms(
    latent_hw: Sequence[int], mode: Resample = "bilinear"
) -> dict[str, SpatialTransform]:
    """The fixed transforms of :func:`equivariance_psnr`: both flips, the three rotations, 2x and 4x downscales
    (those whose latents keep at least one pixel)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    out = {
        "hflip": SpatialTransform(flip=True),
        "vflip": SpatialTransform(rot=2, flip=True),  # a half turn then a left-right mirror
        "rot90": SpatialTransform(rot=1),
        "rot180": SpatialTransform(rot=2),
        "rot270": SpatialTransform(rot=3),
    }
    for k in (2, 4):
        if h >= k and w >= k:
            out[f"down{k}"] = SpatialTransform((h // k, w // k), mode=mode)
    return out


#: Groups of :func:`evaluation_transforms` that tables report as one mean.
EQUIVARIANCE_GROUPS = {
    "d4": ("hflip", "vflip", "rot90", "rot180", "rot270"),
    "scale": ("down2", "down4"),
}


@torch.no_grad()
def equivariance_psnr(
    model: Autoencoder,
    x: Tensor,
    z: Tensor | None = None,
    transforms: dict[str, SpatialTransform] | None = None,
) -> dict[str, Tensor]:
    """The equivariance error as PSNR: decode(tau(z)) against tau(x), per transform and image.

    Args:
        model: any autoencoder of the package.
        x: images (B, C, H, W) in [-1, 1], H and W multiples of the model's factor.
        z: their latents (``model.encode_latents(x)`` when None).
        transforms: name -> tau (default: :func:`evaluation_transforms`).

    Returns:
        name -> (B,) PSNR in dB (inf where decode(tau(z)) equals tau(x)); "identity" is the plain reconstruction,
        the reference the others are read against.
    """
    f = model.config.downsample_factor
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(
            f"images of {tuple(x.shape[-2:])} pixels are not a multiple of the model's factor {f}"
        )
    z = model.encode_latents(x) if z is None else z
    transforms = evaluation_transforms(z.shape[-2:]) if transforms is None else transforms
    out = {}
    for name, tau in {"identity": SpatialTransform(), **transforms}.items():
        recon = model.decode(tau.latent(z)).clamp(-1, 1)
        out[name] = psnr(recon, tau.image(x, f).to(recon.dtype))
    return out
