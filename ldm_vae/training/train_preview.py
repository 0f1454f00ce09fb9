"""Distil a tiny preview autoencoder (TAESD's shape, :class:`~ldm_vae.autoencoder_tiny.AutoencoderTiny`) from a
frozen teacher VAE, with Accelerate.

    python scripts/train_preview.py --config scripts/configs/preview_demo.toml --data-dir photos/ \\
        --teacher.model demo --output-dir runs/preview [--resume latest] [--max-steps 2000 ...]

(or ``python -m ldm_vae.training.train_preview ...``). TAESD (Bohan, 2023) publishes weights, not its training
code; this objective follows its description: the tiny decoder learns to turn the teacher's diffusion-ready
latents ``teacher.scale_latents(z)`` (z a posterior sample of a training crop) into the teacher's own decode of z,
and the tiny encoder to map the crop to the teacher's latents (its posterior mode, scaled). Terms: decoder
reconstruction against the teacher's image (+ optionally against the original crop) + encoder latent MSE +
an optional PatchGAN hinge term (Esser et al., 2021) from ``loss.adv_start``. The export is a diffusers
``AutoencoderTiny`` folder whose ``decode`` takes exactly the latents a pipeline hands its ``vae``. The loop,
checkpoints and launch handling are the shared runner's (:mod:`ldm_vae.training.runner`). ``main(cfg)`` is
importable.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torchvision.utils import make_grid

from ..autoencoder_tiny import AutoencoderTiny
from ..autoencoders import load_autoencoder
from ..checkpoint import CheckpointError
from ..config import AutoencoderTinyConfig, ConfigKeyError
from ..images import ImageError
from ..interface import Autoencoder
from ..losses import LossConfig, build_discriminator, generator_adversarial_loss, hinge_d_loss
from ..metrics import psnr
from .config import RUN_ALIASES, ConfigError, DataConfig, OptimConfig, TrainConfig, parse_command_line
from .data import epoch_loader, load_validation_images
from .ema import ModelEMA
from .loop import NonFiniteLossError
from .optim import build_optimizer, build_scheduler, learning_rates
from .runner import StepOutput, run_training
from .train_vae import load_images

ALIASES = {"--data-dir": "data.train_dir", "--model": "teacher.model", **RUN_ALIASES}


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "demo"  # the frozen VAE: shipped name, diffusers folder or LDM/SD single file
    sample_posterior: bool = True  # decoder inputs are posterior samples (what diffusion makes), else modes


@dataclass(frozen=True)
class PreviewConfig:
    """The student's shape; latent channels and the number of stages follow the teacher."""

    init: str = ""  # "" (random init) or an AutoencoderTiny folder / TAESD pair to start from
    encoder_width: int = 32  # channels of every encoder stage (TAESD: 64)
    decoder_width: int = 32  # channels of every decoder stage (TAESD: 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # residual blocks per encoder stage (TAESD's)
    # Residual blocks per decoder stage (TAESD: 3, 3, 3, 1). Fewer at the two finest stages: those run at 4x
    # and 16x the pixels of the coarsest and dominate the decode time.
    num_decoder_blocks: tuple[int, ...] = (3, 3, 1, 0)
    act_fn: str = "relu"  # TAESD's
    train_encoder: bool = True  # False: the encoder keeps its init (decoder-only previews)


@dataclass(frozen=True)
class PreviewLossConfig:
    rec_loss: Literal["l1", "l2"] = "l2"  # pixel term of the decoder against its targets
    teacher_weight: float = 1.0  # decoder vs the teacher's decode of the same latents
    image_weight: float = 0.0  # decoder vs the original crop (the teacher's own errors are then not copied)
    latent_weight: float = 1.0  # encoder: MSE to the teacher's scaled posterior mode
    adv_weight: float = 0.0  # PatchGAN hinge term of the decoder (0: no discriminator is trained)
    adv_start: int = 0  # first step of the adversarial terms
    disc_num_layers: int = 3  # PatchGAN depth (stride-2 layers)
    disc_channels: int = 64  # PatchGAN width

    def __post_init__(self) -> None:
        for name in ("teacher_weight", "image_weight", "latent_weight", "adv_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"PreviewLossConfig.{name} must be >= 0")


@dataclass(frozen=True)
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    loss: PreviewLossConfig = field(default_factory=PreviewLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------------------------- pieces


def teacher_latent_shape(teacher: Autoencoder) -> tuple[int, int]:
    """(channels, pixels per latent edge) of the teacher's diffusion-ready latents."""
    cfg = teacher.config
    return cfg.latent_channels * cfg.latent_patch**2, cfg.diffusion_downsample_factor


def build_student(cfg: PreviewConfig, teacher: Autoencoder) -> AutoencoderTiny:
    """The tiny autoencoder for ``teacher``'s latents, random or from ``cfg.init``, in train mode.

    Raises:
        ConfigError: a stage count that does not give the teacher's downsampling factor, or a student whose
            latent channels are not the teacher's.
    """
    channels, factor = teacher_latent_shape(teacher)
    stages = round(math.log2(factor)) + 1
    try:
        if cfg.init:
            student = AutoencoderTiny.from_pretrained(cfg.init)
        else:
            for name in ("num_encoder_blocks", "num_decoder_blocks"):
                if len(getattr(cfg, name)) != stages:
                    raise ConfigError(
                        f"preview.{name} has {len(getattr(cfg, name))} stages; the teacher's latents are {factor}x "
                        f"smaller than its images, which takes {stages}"
                    )
            student = AutoencoderTiny(
                AutoencoderTinyConfig(
                    latent_channels=channels,
                    encoder_block_out_channels=(cfg.encoder_width,) * stages,
                    decoder_block_out_channels=(cfg.decoder_width,) * stages,
                    num_encoder_blocks=cfg.num_encoder_blocks,
                    num_decoder_blocks=cfg.num_decoder_blocks,
                    act_fn=cfg.act_fn,
                )
            )
    except (ConfigKeyError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"preview: {e}") from None
    got = student.config
    if got.latent_channels != channels or got.downsample_factor != factor or got.upsample_factor != factor:
        raise ConfigError(
            f"preview.init {cfg.init}: {got.latent_channels} latent channels at f={got.upsample_factor}, the "
            f"teacher's latents have {channels} at f={factor}"
        )
    student.train()
    student.encoder.requires_grad_(cfg.train_encoder)
    return student


class _Distill(nn.Module):
    """Both tiny networks in one forward, so a data-parallel wrapper sees every trained parameter."""

    def __init__(self, student: AutoencoderTiny) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        return self.student.encoder(images), self.student.decoder(latents)


def _pixel_loss(kind: str, a: Tensor, b: Tensor) -> Tensor:
    return F.l1_loss(a.float(), b.float()) if kind == "l1" else F.mse_loss(a.float(), b.float())


@torch.no_grad()
def teacher_targets(
    teacher: Autoencoder, x: Tensor, sample: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(scaled latents the decoder reads, the teacher's decode of them, the scaled posterior mode the encoder
    learns) for images ``x``."""
    z = teacher.encode_latents(x, sample=sample, generator=generator)
    mode = teacher.encode_latents(x) if sample else z
    return teacher.scale_latents(z), teacher.decode(z).clamp(-1, 1), teacher.scale_latents(mode)


@torch.no_grad()
def validate_preview(
    student: AutoencoderTiny, ema: ModelEMA | None, teacher: Autoencoder, images: Tensor, batch: int
) -> tuple[dict[str, float], Tensor]:
    """PSNR of the preview decode against the teacher's decode and against the originals, the encoder's latent
    MSE, for the raw (and EMA) weights; grid rows: originals / teacher / preview (raw, EMA)."""
    latents, full, modes = [], [], []
    for x in images.split(batch):
        z, decoded, mode = teacher_targets(teacher, x, False, None)
        latents.append(z)
        full.append(decoded)
        modes.append(mode)
    z, full_images, mode = torch.cat(latents), torch.cat(full), torch.cat(modes)
    training = student.training
    student.eval()
    variants = {"": nullcontext(student)}
    if ema is not None:
        variants["_ema"] = ema.applied(student)
    metrics, rows = {}, [images, full_images]
    for suffix, ctx in variants.items():
        with ctx:
            preview = torch.cat([student.decoder(c) for c in z.split(batch)]).float().clamp(-1, 1)
            encoded = torch.cat([student.encoder(c) for c in images.split(batch)]).float()
        metrics[f"val/psnr_vs_teacher{suffix}"] = psnr(preview, full_images).mean().item()
        metrics[f"val/psnr_vs_image{suffix}"] = psnr(preview, images).mean().item()
        metrics[f"val/latent_mse{suffix}"] = F.mse_loss(encoded, mode).item()
        rows.append(preview)
    student.train(training)
    metrics["val/teacher_psnr"] = psnr(full_images, images).mean().item()
    return metrics, make_grid(torch.cat(rows).float().cpu(), nrow=len(images), padding=2, pad_value=1.0)


# ------------------------------------------------------------------------------------------- objective


class PreviewObjective:
    """Tiny encoder + decoder against a frozen teacher (+ an optional PatchGAN)."""

    name, export_name, grid_name, progress_key, unit = (
        "train_preview",
        "preview",
        "val/previews",
        "total",
        "images",
    )

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, device, world = cfg, accelerator.device, accelerator.num_processes
        set_seed(cfg.train.seed)  # identical initial weights on every process
        try:
            self.teacher = load_autoencoder(cfg.teacher.model, device=device)
        except (CheckpointError, ConfigKeyError) as e:
            raise ConfigError(f"teacher.model: {e}") from None
        self.teacher.requires_grad_(False).eval()
        self.student = build_student(cfg.preview, self.teacher)
        self.use_gan = cfg.loss.adv_weight > 0
        disc_cfg = LossConfig(disc_num_layers=cfg.loss.disc_num_layers, disc_channels=cfg.loss.disc_channels)
        self.disc = build_discriminator(disc_cfg)
        if self.use_gan and cfg.data.resolution < self.disc.min_size:
            raise ConfigError(
                f"data.resolution {cfg.data.resolution} is below the discriminator's {self.disc.min_size} px"
            )
        factor = self.teacher.config.diffusion_downsample_factor
        if cfg.data.resolution % factor:
            raise ConfigError(
                f"data.resolution {cfg.data.resolution} is not a multiple of the teacher's f={factor}"
            )
        dataset, val_files = load_images(cfg.data, world)
        self.val_images = load_validation_images(val_files, cfg.data.resolution).to(device)
        self.batch_size = cfg.data.batch_size
        self.loader = epoch_loader(dataset, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed)
        lr, lr_d = learning_rates(cfg.optim, cfg.data.batch_size, cfg.train.grad_accum, world)
        self.opt = build_optimizer([p for p in self.student.parameters() if p.requires_grad], cfg.optim, lr)
        self.opt_d = build_optimizer(self.disc.parameters(), cfg.optim, lr_d)
        self.schedulers = [build_scheduler(o, cfg.optim, cfg.train.max_steps) for o in (self.opt, self.opt_d)]
        self.pair = _Distill(self.student)

    def prepare(self, accelerator: Accelerator) -> list[nn.Module]:
        self.accelerator = accelerator
        pair, disc, self.opt, self.opt_d, *self.schedulers, self.loader = accelerator.prepare(
            self.pair, self.disc, self.opt, self.opt_d, *self.schedulers, self.loader
        )
        self.optimizers = [self.opt, self.opt_d]
        self.wrapped, self.wrapped_disc = pair, disc
        self.model = accelerator.unwrap_model(pair).student
        self.disc = accelerator.unwrap_model(disc)
        return [pair, disc]

    def gan_on(self, step: int) -> bool:
        return self.use_gan and step >= self.cfg.loss.adv_start

    def loss(self, x: Tensor, generator: torch.Generator, step: int) -> StepOutput:
        cfg = self.cfg.loss
        z, target, mode = teacher_targets(self.teacher, x, self.cfg.teacher.sample_posterior, generator)
        encoded, preview = self.wrapped(x, z)
        logs: dict[str, Tensor] = {}
        with self.accelerator.autocast():
            total = preview.new_zeros((), dtype=torch.float32)
            if cfg.teacher_weight:
                rec = _pixel_loss(cfg.rec_loss, preview, target)
                total = total + cfg.teacher_weight * rec
                logs["rec_teacher"] = rec.detach()
            if cfg.image_weight:
                rec_x = _pixel_loss(cfg.rec_loss, preview, x)
                total = total + cfg.image_weight * rec_x
                logs["rec_image"] = rec_x.detach()
            if cfg.latent_weight and self.cfg.preview.train_encoder:
                lat = F.mse_loss(encoded.float(), mode.float())
                total = total + cfg.latent_weight * lat
                logs["latent_mse"] = lat.detach()
            d_loss = None
            if self.gan_on(step):
                # The discriminator is called unwrapped with requires_grad off, as in train_vae: gradients reach
                # the preview but not its weights.
                self.disc.requires_grad_(False)
                g = generator_adversarial_loss(self.disc(preview), "hinge")
                self.disc.requires_grad_(True)
                total = total + cfg.adv_weight * g
                d_loss = hinge_d_loss(self.wrapped_disc(x), self.wrapped_disc(preview.detach()))
                logs.update(g_loss=g.detach(), d_loss=d_loss.detach())
            logs["total"] = total.detach()
        return StepOutput((total, d_loss), logs)

    def apply_gradients(self, step: int) -> None:
        self.opt.step()
        if self.gan_on(step):
            self.opt_d.step()

    def validate(self, ema: ModelEMA | None) -> tuple[dict, Tensor] | None:
        if not len(self.val_images):
            return None
        return validate_preview(self.model, ema, self.teacher, self.val_images, self.cfg.data.batch_size)

    def export(self, folder: Path) -> None:
        self.model.save_pretrained(folder)  # the student only: no discriminator

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        return {}

    def load_state_tensors(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        pass

    def digest_modules(self) -> dict[str, nn.Module]:
        return {"preview": self.model, "disc": self.disc}


def main(cfg: Config) -> Path:
    """Trains as ``cfg`` says; returns the exported ``AutoencoderTiny`` folder ``<output_dir>/preview``."""
    return run_training(cfg, lambda accelerator: PreviewObjective(cfg, accelerator))


def cli(argv: list[str] | None = None) -> int:
    try:
        main(parse_command_line(Config, argv, ALIASES, prog="train_preview.py"))
    except (ConfigError, CheckpointError, ImageError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
