"""Train a small unconditional latent diffusion model on cached VAE latents, with Accelerate.

    ldm-vae cache-latents photos/ -o latents/ --model demo --resolution 256
    accelerate launch scripts/train_ldm.py --config scripts/configs/ldm_demo.toml --latent-dir latents/ \\
        --output-dir runs/ldm [--resume latest] [--optim.lr 2e-4 ...]

(or ``python -m ldm_vae.training.train_ldm ...``).
The model is Latent Diffusion's (Rombach et al., 2022) unconditional LDM: a diffusers ``UNet2DModel`` trained
with DDPM's epsilon objective (Ho et al., 2020, eq. 14) on ``(z - shift) * scale``, z = mean + std * eps drawn
afresh from each cached posterior every epoch (:mod:`ldm_vae.latents`, :mod:`ldm_vae.ldm`). Every
``train.val_every`` steps it logs the held-out loss and variational bound in bits/dim next to the N(0, I)
prior's, and saves a grid of DDIM samples decoded through the VAE. At the end it exports a
``diffusers.LDMPipeline`` folder, ``<output_dir>/pipeline`` (``ldm-vae sample --pipeline ...`` reads it).
The loop, checkpoints and launch handling are the shared runner's (:mod:`ldm_vae.training.runner`); this module
is the objective. ``main(cfg)`` is importable.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor, nn
from torchvision.utils import make_grid

from ..autoencoder_kl import AutoencoderKL
from ..checkpoint import CheckpointError
from ..latents import LatentDataset, held_out_split, latent_moments, read_manifest
from ..ldm import (
    NoiseConfig,
    UNetConfig,
    build_noise_scheduler,
    build_unet,
    decode_latents,
    diffusion_loss,
    export_pipeline,
    gaussian_baselines,
    gaussian_bits_per_dim,
    sample_latents,
    sampling_scheduler,
    vlb_bits_per_dim,
)
from .config import RUN_ALIASES, ConfigError, OptimConfig, TrainConfig, parse_command_line
from .data import epoch_loader
from .ema import ModelEMA
from .loop import NonFiniteLossError
from .optim import build_optimizer, build_scheduler, learning_rates
from .runner import StepOutput, check_enough_data, run_training

ALIASES = {"--latent-dir": "data.latent_dir", **RUN_ALIASES}


@dataclass(frozen=True)
class LatentDataConfig:
    latent_dir: str = ""  # a folder written by `ldm-vae cache-latents` (--latent-dir)
    vae: str = ""  # autoencoder for sample grids and export; "" = the model named in the cache manifest
    batch_size: int = 16  # per process and per micro-step
    num_workers: int = 0  # latents are in memory: worker processes rarely pay off
    num_val: int = (
        16  # the last num_val cached images are held out (their center crops) for the loss and bits/dim
    )


@dataclass(frozen=True)
class DiffusionOptimConfig(OptimConfig):
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's defaults, as LDM trains its UNets
    lr: float = 2e-4


@dataclass(frozen=True)
class DiffusionTrainConfig(TrainConfig):
    output_dir: str = "runs/ldm"


@dataclass(frozen=True)
class SampleConfig:
    """Sample grids, held-out evaluation and the exported pipeline."""

    num_images: int = 16  # images in each grid
    steps: int = 50  # denoising steps of the grid sampler
    scheduler: Literal["ddim", "ddpm"] = "ddim"
    eta: float = 0.0  # DDIM's eta (0: deterministic)
    seed: int = 0  # the grids' initial noise and the held-out posterior samples
    clip_range: float = (
        0.0  # clip the samplers' x_0 predictions to +-clip_range (0: never; saved in the pipeline)
    )
    vlb_timesteps: int = 50  # importance-sampled timesteps of the held-out bits/dim (0: skip it)
    export_dtype: Literal["fp32", "fp16"] = "fp32"  # weights of the exported pipeline


@dataclass(frozen=True)
class Config:
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: NoiseConfig = field(default_factory=NoiseConfig)
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    optim: DiffusionOptimConfig = field(default_factory=DiffusionOptimConfig)
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ------------------------------------------------------------------------------------------- pieces


def load_data(cfg: LatentDataConfig, world: int) -> tuple[LatentDataset, LatentDataset, dict]:
    """(training latents, held-out latents, manifest) of the cache, both scaled by :func:`training_scale`."""
    if not cfg.latent_dir:
        raise ConfigError(
            "no latents: set data.latent_dir or pass --latent-dir (see `ldm-vae cache-latents`)"
        )
    manifest = read_manifest(cfg.latent_dir)
    try:  # held out by image, not by view: the center crops of the last num_val images
        train, val = held_out_split(manifest, cfg.num_val)
    except ValueError as e:
        raise ConfigError(f"data.num_val: {e}") from None
    # Every view of a held-out image is kept out of training, not only the center crop it is scored on.
    found = manifest["num_items"]
    check_enough_data(found, found - len(train), cfg.batch_size, world, "latents", cfg.latent_dir)
    train_set, val_set = LatentDataset(cfg.latent_dir, train), LatentDataset(cfg.latent_dir, val)
    train_set.scale = val_set.scale = training_scale(train_set)
    return train_set, val_set, manifest


def training_scale(train_set: LatentDataset) -> float:
    """LDM's scale_by_std over the training latents only (the manifest's ``scale`` covers every cached view,
    held-out images' included): 1 / std of posterior samples, in closed form (:func:`latent_moments`)."""
    _, std = latent_moments([train_set.mean], [train_set.std])
    if not std > 0:
        raise ConfigError("the training latents have zero variance: cannot compute a latent scale")
    return 1.0 / std


def load_vae(cfg: LatentDataConfig, manifest: dict, device: torch.device, scale: float) -> AutoencoderKL:
    """The cache's autoencoder with ``scaling_factor`` set to ``scale`` (the training latents'), as the exported
    pipeline has it."""
    src = cfg.vae or manifest["model"]
    if manifest["shift"]:
        raise ConfigError(
            f"the latents were shifted by {manifest['shift']} (the VAE's shift_factor): diffusers' LDMPipeline "
            "cannot express a shift, so a model trained on them could not be exported"
        )
    torch.manual_seed(0)  # a random-init preset (e.g. "tiny" in tests) is then the same model every time
    vae = AutoencoderKL.from_pretrained(src, device=device, scaling_factor=scale)
    if vae.config.latent_channels != manifest["latent_shape"][0]:
        raise ConfigError(
            f"{src}: {vae.config.latent_channels} latent channels, the cache has {manifest['latent_shape'][0]}"
        )
    return vae


def baseline_bits(train_z: Tensor, val_z: Tensor) -> dict[str, float]:
    """Held-out bits/dim of the Gaussians of :func:`gaussian_baselines` fitted to ``train_z``, keyed
    ``prior_bpd``, ``per_channel_bpd`` and ``full_cov_bpd``."""
    if not len(val_z):
        return {}
    fits = gaussian_baselines(train_z)
    keys = {"prior": "prior_bpd", "per_channel": "per_channel_bpd", "full": "full_cov_bpd"}
    return {keys[k]: gaussian_bits_per_dim(val_z, *fit).mean().item() for k, fit in fits.items()}


@torch.no_grad()
def evaluate(
    unet: UNet2DModel, noise_scheduler: DDPMScheduler, z: Tensor, cfg: SampleConfig
) -> dict[str, float]:
    """Held-out loss (fixed t and eps) and, with ``vlb_timesteps``, the bound in bits/dim."""
    if not len(z):
        return {}
    out = {
        "loss": diffusion_loss(
            unet, noise_scheduler, z, torch.Generator(z.device).manual_seed(cfg.seed)
        ).item()
    }
    if cfg.vlb_timesteps:
        bound = vlb_bits_per_dim(
            unet, noise_scheduler, z, cfg.vlb_timesteps, torch.Generator().manual_seed(cfg.seed)
        )
        out["bpd"] = bound["total"].mean().item()
    return out


@torch.no_grad()
def sample_grid(
    unet: UNet2DModel, noise_scheduler: DDPMScheduler, vae: AutoencoderKL, cfg: SampleConfig
) -> Tensor:
    """A grid (3, H, W) of ``num_images`` decoded samples, the same initial noise every time."""
    scheduler = sampling_scheduler(noise_scheduler, cfg.scheduler, cfg.clip_range)
    generator = torch.Generator().manual_seed(cfg.seed)
    z = sample_latents(unet, scheduler, cfg.num_images, cfg.steps, generator, cfg.eta)  # (N, C, s, s)
    images = decode_latents(vae, z.to(vae.device)).cpu()  # (N, 3, s*f, s*f)
    return make_grid(images, nrow=max(1, round(cfg.num_images**0.5)), padding=2, pad_value=1.0)


# ------------------------------------------------------------------------------------------- objective


class DiffusionObjective:
    """A ``UNet2DModel`` denoiser on cached latents, DDPM's epsilon objective."""

    name, export_name, grid_name, progress_key, unit = "train_ldm", "pipeline", "samples", "loss", "latents"

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, world = cfg, accelerator.num_processes
        train_set, val_set, manifest = load_data(cfg.data, world)
        self.vae = load_vae(cfg.data, manifest, accelerator.device, train_set.scale)
        self.val_z = val_set.fixed_samples(cfg.sample.seed).to(accelerator.device)
        # Fixed numbers (they do not depend on the UNet), logged with every validation beside the bound.
        self.baselines = (
            baseline_bits(train_set.fixed_draws(cfg.sample.seed), self.val_z)
            if cfg.sample.vlb_timesteps
            else {}
        )
        set_seed(cfg.train.seed)  # identical initial weights on every process
        c, s, _ = manifest["latent_shape"]
        try:
            self.unet = build_unet(cfg.model, c, s)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if cfg.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.noise_scheduler = build_noise_scheduler(cfg.diffusion)
        self.batch_size = cfg.data.batch_size
        self.loader = epoch_loader(train_set, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed)
        lr, _ = learning_rates(cfg.optim, cfg.data.batch_size, cfg.train.grad_accum, world)
        self.optimizer = build_optimizer(self.unet.parameters(), cfg.optim, lr)
        self.schedulers = [build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)]

    def prepare(self, accelerator: Accelerator) -> list[nn.Module]:
        unet, self.optimizer, *self.schedulers, self.loader = accelerator.prepare(
            self.unet, self.optimizer, *self.schedulers, self.loader
        )
        self.wrapped, self.model, self.optimizers = unet, accelerator.unwrap_model(unet), [self.optimizer]
        return [unet]

    def loss(self, z: Tensor, generator: torch.Generator, step: int) -> StepOutput:
        """t and eps drawn from ``generator`` (seeded by the batch's position, so resumes are exact)."""
        loss = diffusion_loss(self.wrapped, self.noise_scheduler, z, generator)
        return StepOutput((loss,), {"loss": loss.detach()})

    def apply_gradients(self, step: int) -> None:
        self.optimizer.step()

    def validate(self, ema: ModelEMA | None) -> tuple[dict, Tensor]:
        model, cfg = self.model, self.cfg.sample
        model.eval()
        values = {f"val/{k}": v for k, v in evaluate(model, self.noise_scheduler, self.val_z, cfg).items()}
        values.update({f"val/{k}": v for k, v in self.baselines.items()})
        with ema.applied(model) if ema is not None else nullcontext():
            if ema is not None:
                values.update(
                    {
                        f"val/{k}_ema": v
                        for k, v in evaluate(model, self.noise_scheduler, self.val_z, cfg).items()
                    }
                )
            grid = sample_grid(model, self.noise_scheduler, self.vae, cfg)
        model.train()
        return values, grid

    def export(self, folder: Path) -> None:
        export_pipeline(
            self.vae,
            self.model,
            sampling_scheduler(self.noise_scheduler, "ddim", self.cfg.sample.clip_range),
            folder,
            self.cfg.sample.export_dtype,
        )

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        return {}

    def load_state_tensors(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        pass

    def digest_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.model}


def main(cfg: Config) -> Path:
    """Trains as ``cfg`` says; returns the exported pipeline folder ``<output_dir>/pipeline``."""
    return run_training(cfg, lambda accelerator: DiffusionObjective(cfg, accelerator))


def cli(argv: list[str] | None = None) -> int:
    try:
        main(parse_command_line(Config, argv, ALIASES, prog="train_ldm.py"))
    except (ConfigError, CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
