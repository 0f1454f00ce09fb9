"""A small unconditional latent diffusion model on top of the autoencoder (Rombach et al., 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"): diffusers' ``UNet2DModel`` and ``DDPMScheduler`` trained with the
epsilon objective of DDPM (Ho et al., 2020, eq. 14) on latents ``(z - shift) * scale``; DDPM and DDIM (Song et al.,
2021) sampling; the variational bound in bits per dimension; export as a diffusers ``LDMPipeline`` folder.

The bound is DDPM's eq. 5, L = L_T + sum_{t=2..T} L_{t-1} + L_0, with
  L_T     = KL(q(x_T | x_0) || N(0, I)),
  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), Gaussians with the scheduler's fixed variances,
  L_0     = -log N(x_0; mu(x_1, 1), sigma_1^2), a *continuous* Gaussian density.
Latents are continuous, so L_0 is a density rather than DDPM's discretized decoder and the bound is one on the
differential entropy: it can be negative, and it is comparable only with other continuous densities, such as the
N(0, I) prior a VAE samples from (:func:`gaussian_bits_per_dim`). As in Nichol & Dhariwal (2021), the
variance at t = 1 (zero for ``fixed_small``) is clipped to the one at t = 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm import tqdm

from .autoencoder_kl import AutoencoderKL
from .checkpoint import CheckpointError
from .io import write_json
from .ldm_pipeline import VQVAE_ENTRY  # also registers the vqvae class with diffusers (see export_pipeline)
from .runtime import resolve_dtype

SamplerName = Literal["ddim", "ddpm"]
PIPELINE_INDEX = "model_index.json"
LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class UNetConfig:
    """The denoiser: a diffusers ``UNet2DModel``; channels and sizes of the latents are filled in from the data."""

    block_out_channels: tuple[int, ...] = (64, 128, 128)  # width per level; len-1 = number of 2x downsamples
    layers_per_block: int = 1  # resnets per level (the up path gets one more)
    attention_levels: tuple[int, ...] = (2,)  # levels with self-attention (0 = full latent resolution)
    attention_head_dim: int = 32  # channels per attention head
    norm_num_groups: int = 32  # GroupNorm groups
    dropout: float = 0.0


@dataclass(frozen=True)
class NoiseConfig:
    """The forward process (a diffusers ``DDPMScheduler``): LDM's defaults, epsilon objective, no clipping."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear"] = "scaled_linear"  # LDM's "linear" (sqrt-linear betas)
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small"  # sigma_t^2 = beta~_t or beta_t


def build_unet(cfg: UNetConfig, latent_channels: int, latent_size: int) -> UNet2DModel:
    """A ``UNet2DModel`` for (B, latent_channels, latent_size, latent_size) latents.

    Raises:
        ValueError: attention levels that do not exist, or widths GroupNorm cannot split.
    """
    n = len(cfg.block_out_channels)
    bad = [level for level in cfg.attention_levels if not 0 <= level < n]
    if bad:
        raise ValueError(f"attention level {bad[0]} does not exist: levels are 0..{n - 1}")
    if latent_size % 2 ** (n - 1):
        raise ValueError(f"latent size {latent_size} is not divisible by {2 ** (n - 1)} ({n} UNet levels)")
    attn = [level in cfg.attention_levels for level in range(n)]
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
    )


def build_noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    """The training scheduler (x_0 predictions unclipped, as in :func:`sampling_scheduler`)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        variance_type=cfg.variance_type,
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="trailing",  # few-step samplers start from t = T - 1, i.e. from (almost) pure noise
    )


def sampling_scheduler(
    scheduler: DDPMScheduler | DDIMScheduler, kind: SamplerName, clip_range: float | None = None
) -> DDPMScheduler | DDIMScheduler:
    """A DDIM or DDPM scheduler over the same betas as ``scheduler`` (diffusers maps the shared config keys).

    Args:
        clip_range: clip x_0 predictions to [-clip_range, clip_range] (diffusers' ``clip_sample``); 0 never
            clips, None keeps ``scheduler``'s setting. Latents, unlike pixels, are not bounded by [-1, 1], but a
            few-step sampler of a small DDPM overshoots at large t, and clipping at a few standard deviations of
            the unit-variance latents keeps its x_0 estimates on the data.
    """
    if kind not in ("ddim", "ddpm"):
        raise ValueError(f"unknown scheduler {kind!r} (ddim or ddpm)")
    if clip_range is not None and clip_range < 0:
        raise ValueError(f"clip range must be >= 0, got {clip_range}")
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    # As keyword arguments: from_config drops config keys listed in "_use_default_values" (those the source
    # scheduler was built without), so values merged into the config itself could be silently replaced.
    clip = (
        {} if clip_range is None else {"clip_sample": clip_range > 0, "clip_sample_range": clip_range or 1.0}
    )
    return cls.from_config(scheduler.config, **clip)


# ------------------------------------------------------------------------------------------- training


def diffusion_loss(
    unet: UNet2DModel, scheduler: DDPMScheduler, z0: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """DDPM's simple objective ||eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t)||^2, t uniform.

    Args:
        unet: the denoiser (possibly wrapped by Accelerate).
        scheduler: the training scheduler.
        z0: diffusion-ready latents (B, C, h, w).
        generator: draws t and eps (on ``z0``'s device), so a step is reproducible.
    """
    b = z0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=z0.device)
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    noisy = scheduler.add_noise(z0, noise, t)  # (B, C, h, w)
    return F.mse_loss(unet(noisy, t).sample.float(), noise.float())


# ------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_latents(
    unet: UNet2DModel,
    scheduler: DDPMScheduler | DDIMScheduler,
    num: int,
    steps: int = 50,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float = 0.0,
    noise: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Denoises ``num`` latents (num, C, s, s) from N(0, I) in ``steps`` steps of ``scheduler``.

    The loop is ``diffusers.LDMPipeline.__call__``'s, so an exported pipeline called with the same generator
    gives the same latents; unlike the pipeline, DDPM steps (and DDIM with eta > 0) also draw their noise from
    ``generator``, which makes them reproducible too.

    Args:
        unet: the denoiser; ``unet.config.sample_size`` is the latent size s.
        scheduler: a DDIM or DDPM scheduler (see :func:`sampling_scheduler`).
        num: latents to draw (ignored when ``noise`` is given).
        steps: denoising steps.
        generator: draws the initial noise, then any step noise.
        eta: DDIM's eta (0: deterministic given x_T); ignored by DDPM.
        noise: the initial x_T instead of drawing it (e.g. a slice of a larger seeded draw).
        progress: a progress bar over the steps (interactive stderr only).

    Returns:
        Diffusion-ready latents, to be decoded with :func:`decode_latents`.
    """
    cfg = unet.config
    if noise is None:
        noise = randn_tensor((num, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator)
    latents = noise.to(unet.device, unet.dtype) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    extra: dict = {"generator": generator}
    if isinstance(scheduler, DDIMScheduler):
        extra["eta"] = eta
    for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=None if progress else True):
        eps = unet(scheduler.scale_model_input(latents, t), t).sample
        latents = scheduler.step(eps, t, latents, **extra).prev_sample
    return latents


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: Tensor) -> Tensor:
    """Diffusion-ready latents -> images (B, 3, H, W) in [-1, 1] (unscaled by the VAE's own scale and shift)."""
    return vae.decode(vae.unscale_latents(z.float())).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------- evaluation


def gaussian_bits_per_dim(x: Tensor, mean: Tensor | None = None, cov: Tensor | None = None) -> Tensor:
    """-log2 N(x; mean, cov) / dim per sample (B,), a continuous NLL; default N(0, I), a VAE's sampling prior.

    Args:
        x: (B, ...) samples.
        mean: (D,) with D = x[0].numel(), or None for zero.
        cov: (D, D) positive definite, or None for the identity.
    """
    x = x.double().flatten(1).cpu()  # (B, D)
    if mean is not None:
        x = x - mean.double()
    if cov is None:
        return 0.5 * (math.log(2 * math.pi) + x.square()).mean(1) / LOG2
    chol = torch.linalg.cholesky(cov.double())  # (D, D)
    white = torch.linalg.solve_triangular(chol, x.T, upper=False)  # (D, B): L^-1 (x - mean)
    logdet = 2 * chol.diagonal().log().sum()
    d = x.shape[1]
    nats = 0.5 * (d * math.log(2 * math.pi) + logdet + white.square().sum(0))
    return nats / (d * LOG2)


def ledoit_wolf(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean (D,), covariance (D, D)) of samples x (N, D), the covariance shrunk toward a scaled identity.

    Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance matrices": the
    shrinkage minimizing the expected Frobenius error, as ``sklearn.covariance.LedoitWolf`` computes it
    (with the maximum-likelihood 1/N sample covariance), in float64.
    """
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    emp = xc.T @ xc / n  # (D, D)
    mu = emp.diagonal().mean()
    delta = (emp - mu * torch.eye(d, dtype=x.dtype)).square().sum() / d
    x2 = xc.square()
    beta = min(((x2.T @ x2).sum() / n - emp.square().sum()).item() / (d * n), delta.item())
    shrinkage = 0.0 if delta == 0 else beta / delta.item()
    cov = (1 - shrinkage) * emp + shrinkage * mu * torch.eye(d, dtype=x.dtype)
    return mean, cov


def gaussian_baselines(train: Tensor) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """Gaussians fitted to training latents (N, C, h, w), as (mean, cov) for :func:`gaussian_bits_per_dim`.

    ``prior``: N(0, I), what a VAE samples from. ``per_channel``: one mean and variance per latent channel,
    shared by every position (maximum likelihood). ``full``: a mean per element and a full covariance with
    Ledoit-Wolf shrinkage. A DDPM that scores no better than ``full`` on held-out latents has learned nothing
    beyond second moments.
    """
    z = train.double().cpu()
    c = z.shape[1]
    per = z.transpose(0, 1).reshape(c, -1)  # (C, N*h*w)
    mean_c, var_c = per.mean(1), per.var(1, correction=0)
    spatial = z[0, 0].numel()
    per_channel = (mean_c.repeat_interleave(spatial), torch.diag(var_c.repeat_interleave(spatial)))
    return {"prior": (None, None), "per_channel": per_channel, "full": ledoit_wolf(z.flatten(1))}


BASELINE_NAMES = {  # how tables name the baselines of :func:`gaussian_baselines`
    "prior": "N(0, I) prior",
    "per_channel": "Gaussian per channel (fitted)",
    "full": "Gaussian full covariance, Ledoit-Wolf (fitted)",
}


@torch.no_grad()
def vlb_bits_per_dim(
    unet: Callable[..., object],
    scheduler: DDPMScheduler,
    x0: Tensor,
    num_timesteps: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The variational bound of the module docstring per sample, in bits per dimension.

    With fixed variances each L_{t-1} is a constant (the variance mismatch, summed exactly) plus
    w_t * ||eps_theta(x_t, t) - eps||^2 with w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) (DDPM eq. 12).
    The sum over t = 2..T is exact (every t, one noise draw each) when ``num_timesteps`` is None. Otherwise it is
    an unbiased stratified importance-sampling estimate: ``num_timesteps`` draws of t with probability
    proportional to w_t, one per equal-probability stratum, which makes it W * mean(||eps_theta - eps||^2) with
    W = sum of w_t. (Uniform t would be dominated by the few small t where w_t ~ 1 / t is large.)

    Args:
        unet: called as ``unet(x_t, t).sample``, predicting eps.
        scheduler: the training scheduler (betas, variance type).
        x0: diffusion-ready latents (B, C, h, w).
        num_timesteps: draws of t for the sum over t, or None for every timestep.
        generator: draws the timesteps and the noise (CPU).

    Returns:
        ``total``, ``prior`` (L_T), ``diffusion`` (sum of L_{t-1}) and ``decoder`` (L_0), each (B,) float64.
    """
    cfg = scheduler.config
    if cfg.prediction_type != "epsilon" or cfg.variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(
            "the bound is implemented for epsilon prediction with fixed_small/fixed_large variances"
        )
    T = cfg.num_train_timesteps
    x0 = x0.double().cpu()
    dims = x0[0].numel()
    betas, abar = scheduler.betas.double(), scheduler.alphas_cumprod.double()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)  # beta~_t of q(x_{t-1} | x_t, x_0); 0 at the first step
    model_var = post_var.clone() if cfg.variance_type == "fixed_small" else betas.clone()
    model_var[0] = post_var[1]
    inv_snr = (1 - abar) / abar  # x0 - x0_hat = sqrt(inv_snr) * (eps_hat - eps)
    # Weight of ||eps_hat - eps||^2 in L_{t-1}: (coef of x0 in the posterior mean)^2 * inv_snr / (2 sigma^2).
    w = (betas * abar_prev.sqrt() / (1 - abar)).square() * inv_snr / (2 * model_var)

    def eps_sse(t: int) -> Tensor:
        """||eps_theta(x_t, t) - eps||^2 per sample, for one noise draw at (diffusers) timestep t."""
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        xt = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * noise
        timestep = torch.full((len(x0),), t, dtype=torch.long)
        device = getattr(unet, "device", "cpu")
        eps = unet(xt.to(device, torch.float32), timestep.to(device)).sample.double().cpu()
        return (eps - noise).square().flatten(1).sum(1)

    # L_T: the forward process' last marginal against the N(0, I) the sampler starts from.
    prior = 0.5 * (abar[-1] * x0.square() - abar[-1] - (1 - abar[-1]).log()).flatten(1).sum(1)

    # sum of L_{t-1} over t = 2..T, i.e. diffusers' timesteps 1..T-1.
    mismatch = 0.5 * (torch.log(model_var / post_var) + post_var / model_var - 1.0)[1:].sum()
    if num_timesteps is None or num_timesteps >= T - 1:
        weighted = sum(w[t] * eps_sse(t) for t in range(1, T))
    else:
        cdf = (w[1:] / w[1:].sum()).cumsum(0)
        u = (
            torch.arange(num_timesteps, dtype=torch.float64)
            + torch.rand(num_timesteps, generator=generator, dtype=torch.float64)
        ) / num_timesteps
        picks = (torch.searchsorted(cdf, u, right=True).clamp(max=T - 2) + 1).tolist()
        weighted = w[1:].sum() / num_timesteps * sum(eps_sse(t) for t in picks)
    diffusion = dims * mismatch + weighted

    # L_0: continuous Gaussian NLL of x_0 under p(x_0 | x_1) = N(x0_hat, sigma_1^2).
    var0 = model_var[0]
    decoder = 0.5 * dims * torch.log(2 * math.pi * var0) + inv_snr[0] / (2 * var0) * eps_sse(0)
    terms = {"prior": prior, "diffusion": diffusion, "decoder": decoder}
    terms = {k: v / (dims * LOG2) for k, v in terms.items()}  # nats per sample -> bits per dimension
    return {"total": sum(terms.values()), **terms}


# ------------------------------------------------------------------------------------------- pipeline


def export_pipeline(
    vae: AutoencoderKL,
    unet: UNet2DModel,
    scheduler: DDPMScheduler | DDIMScheduler,
    folder: str | os.PathLike,
    dtype: str = "fp32",
) -> Path:
    """Writes a ``diffusers.LDMPipeline`` folder (``vqvae/``, ``unet/``, ``scheduler/``, ``model_index.json``).

    ``LDMPipeline`` decodes ``vqvae.decode(latents / vqvae.config.scaling_factor).sample``, so
    ``vae.config.scaling_factor`` must be the scale the UNet was trained with. ``vqvae/`` is an ordinary
    ``AutoencoderKL`` folder; ``model_index.json`` names it :class:`~ldm_vae.ldm_pipeline.KLAutoencoderForLDMPipeline`,
    the same model typed as the ``VQModel`` the pipeline expects, so diffusers loads the folder without a type
    warning once :mod:`ldm_vae.ldm_pipeline` is imported (this module imports it). The scheduler is saved as DDIM, the pipeline's default sampler.
    The folder is written beside its destination and renamed into place.

    Raises:
        ValueError: a VAE with a non-zero ``shift_factor``, which ``LDMPipeline`` cannot apply.
    """
    if vae.config.shift_factor:
        raise ValueError(
            f"the VAE has shift_factor {vae.config.shift_factor}: diffusers' LDMPipeline only divides latents by "
            "scaling_factor and cannot add a shift, so this model cannot be exported as one"
        )
    import diffusers

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp / "vqvae", dtype=dtype)
    # A fresh copy: ``unet`` may be an Accelerate-prepared module whose forward is patched (autocast).
    copy = UNet2DModel.from_config(unet.config)
    copy.load_state_dict(unet.state_dict())
    # nn.Module.to: diffusers' override warns on every dtype cast, even of a model without fp32-only parts.
    torch.nn.Module.to(copy, resolve_dtype(dtype)).save_pretrained(tmp / "unet", safe_serialization=True)
    sampling_scheduler(scheduler, "ddim").save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "LDMPipeline",
        "_diffusers_version": diffusers.__version__,
        "vqvae": VQVAE_ENTRY,
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    write_json(index, tmp / PIPELINE_INDEX)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_pipeline(
    folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: str = "fp32"
) -> tuple[AutoencoderKL, UNet2DModel, DDIMScheduler]:
    """(vae, unet, scheduler) of an exported folder (or the shipped ``demo`` / ``digits``), with ldm_vae's own
    ``AutoencoderKL`` as the VAE.

    Raises:
        CheckpointError: not a pipeline folder of this layout.
    """
    name = str(folder)
    if name in ("demo", "digits") and not Path(folder).exists():
        from .pretrained import WEIGHTS_DIR

        folder = WEIGHTS_DIR / name  # a shipped pipeline: weights/demo (photos) or weights/digits
        if not (folder / PIPELINE_INDEX).is_file():
            raise CheckpointError(
                f"shipped weights {name!r} not found at {folder} (set LDM_VAE_WEIGHTS to the weights folder)"
            )
    folder = Path(folder)
    try:
        index = json.loads((folder / PIPELINE_INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{folder}: not a pipeline folder (cannot read {PIPELINE_INDEX}: {e})"
        ) from None
    if index.get("vqvae") not in (["diffusers", "AutoencoderKL"], VQVAE_ENTRY) or "unet" not in index:
        raise CheckpointError(
            f"{folder}: not a latent-diffusion pipeline with an AutoencoderKL (vqvae/) and a unet/"
        )
    torch_dtype = resolve_dtype(dtype, device)
    vae = AutoencoderKL.from_pretrained(folder / "vqvae", dtype=dtype, device=device)
    try:
        unet = UNet2DModel.from_pretrained(folder / "unet")  # fp32, whatever the file's dtype
        torch.nn.Module.to(unet, device=device, dtype=torch_dtype).eval()  # (diffusers' to() warns on dtypes)
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{folder}: cannot load the unet or scheduler ({str(e).splitlines()[0]})"
        ) from None
    return vae, unet, scheduler


def pipeline_scale_check(vae: AutoencoderKL, scale: float, shift: float) -> None:
    """Raises ValueError unless ``vae`` unscales latents with exactly ``scale`` and ``shift``."""
    if (
        not math.isclose(vae.config.scaling_factor, scale, rel_tol=1e-6)
        or (vae.config.shift_factor or 0.0) != shift
    ):
        raise ValueError(
            f"the VAE's scaling_factor/shift_factor ({vae.config.scaling_factor}, {vae.config.shift_factor or 0.0}) "
            f"differ from the latents' ({scale}, {shift})"
        )
