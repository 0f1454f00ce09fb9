"""Train a KL or VQ autoencoder from scratch, or fine-tune one (e.g. Stable Diffusion's VAE), with Accelerate.

    accelerate launch scripts/train_vae.py --config scripts/configs/sd_ft_mse.toml --data-dir photos/ \\
        --output-dir runs/ft --max-steps 20000 [--resume latest] [--optim.lr 5e-5 ...]

(or ``python -m ldm_vae.training.train_vae ...``). The objective is Latent Diffusion's (Rombach et al., 2022,
App. G) and taming's (Esser et al., 2021, Sec. 3.1): reconstruction (+ LPIPS) + the bottleneck's regularizer
(KL or codebook) + an adaptively weighted PatchGAN loss from ``loss.disc_start`` on (:mod:`ldm_vae.losses`).
Optional latent regularizers (EQ-VAE, scale equivariance, latent noise; :mod:`ldm_vae.latent_regularizers`),
each its own config section, are off by default, and so is the fp16-fix fine-tune (``[fp16_fix]``,
:mod:`ldm_vae.training.fp16_fix`). The loop, checkpoints and launch handling are the shared
runner's (:mod:`ldm_vae.training.runner`); this module is the objective: its configs, networks, one loss step,
validation and export. ``main(cfg)`` is importable.
"""

from __future__ import annotations

import sys
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torchvision.utils import make_grid

from ..activations import record_maxima
from ..autoencoders import AUTOENCODERS
from ..checkpoint import CheckpointError
from ..config import ConfigKeyError
from ..images import ImageError
from ..interface import Autoencoder
from ..latent_regularizers import (
    EQVAEConfig,
    LatentNoiseConfig,
    LatentPlan,
    LatentRegularizers,
    ScaleEquivarianceConfig,
)
from ..losses import AutoencoderLoss, LossConfig, MissingWeightsError, build_discriminator
from ..metrics import psnr, ssim
from .config import RUN_ALIASES, ConfigError, DataConfig, OptimConfig, TrainConfig, parse_command_line
from .data import ImageFolderDataset, epoch_loader, list_images, load_validation_images, validation_files
from .ema import ModelEMA
from .fp16_fix import FP16Fix, FP16FixConfig, relative_param_groups
from .loop import NonFiniteLossError, nonfinite_anywhere
from .optim import build_optimizer, build_scheduler, learning_rates
from .runner import StepOutput, check_enough_data, run_training

ALIASES = {"--data-dir": "data.train_dir", **RUN_ALIASES}


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["kl", "vq", "flux2"] = "kl"  # AutoencoderKL, VQAutoencoder or AutoencoderKLFlux2
    init: str = "tiny"  # preset name (random init) or a diffusers folder / LDM-SD file (fine-tuning)
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields on top of `init`
    decoder_only: bool = False  # freeze encoder + quant_conv (+ VQ codebook): the latent space stays put


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eq_vae: EQVAEConfig = field(default_factory=EQVAEConfig)  # EQ-VAE (Kouzelis et al., 2025); off
    scale_equivariance: ScaleEquivarianceConfig = field(  # Skorokhodov et al., 2025; off
        default_factory=ScaleEquivarianceConfig
    )
    latent_noise: LatentNoiseConfig = field(default_factory=LatentNoiseConfig)  # noisy decoder inputs; off
    fp16_fix: FP16FixConfig = field(
        default_factory=FP16FixConfig
    )  # teacher-matched fp16-safety fine-tune; off


# ------------------------------------------------------------------------------------------- pieces


def build_autoencoder(cfg: ModelConfig, gradient_checkpointing: bool) -> Autoencoder:
    """The autoencoder to train, in train mode, with frozen parts for ``decoder_only``."""
    try:
        model = AUTOENCODERS[cfg.kind].from_pretrained(cfg.init, **cfg.overrides)
    except ConfigKeyError as e:
        raise ConfigError(f"model.overrides: {e}") from None
    model.train()
    if cfg.decoder_only:
        for part in model.encoder_side():
            # eval() too: an EMA codebook would otherwise keep updating its buffers in the forward pass.
            part.requires_grad_(False).eval()
    model.encoder.gradient_checkpointing = model.decoder.gradient_checkpointing = gradient_checkpointing
    return model


@torch.no_grad()
def validate(
    model: nn.Module, ema: ModelEMA | None, images: Tensor, batch: int, perceptual: nn.Module | None = None
) -> tuple[dict, Tensor]:
    """PSNR/SSIM (and LPIPS when its weights are loaded) of the raw (and EMA) weights on fixed images, and a
    grid: inputs / raw / EMA rows."""
    modes = [(m, m.training) for m in model.modules()]  # restored after: frozen parts stay in eval mode
    model.eval()
    variants = {"": nullcontext(model)}
    if ema is not None:
        variants["_ema"] = ema.applied(model)
    metrics, rows = {}, [images]
    for suffix, ctx in variants.items():
        with ctx:
            recon = torch.cat([model(x, sample_posterior=False)[0] for x in images.split(batch)]).clamp(-1, 1)
        metrics[f"val/psnr{suffix}"] = psnr(recon, images).mean().item()
        metrics[f"val/ssim{suffix}"] = ssim(recon, images).mean().item()
        if perceptual is not None:
            metrics[f"val/lpips{suffix}"] = perceptual(recon.float(), images.float()).mean().item()
        rows.append(recon)
    for m, training in modes:
        m.training = training
    return metrics, make_grid(torch.cat(rows).float().cpu(), nrow=len(images), padding=2, pad_value=1.0)


@torch.no_grad()
def activation_metrics(model: nn.Module, images: Tensor, batch: int) -> dict[str, float]:
    """The largest |activation| of the raw weights on the validation images, and its share of fp16's range."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    with record_maxima(model) as maxima:
        for x in images.split(batch):
            model(x, sample_posterior=False)
    for m, training in modes:
        m.training = training
    largest = max(maxima.values())
    return {"val/max_activation": largest, "val/max_activation_fp16_share": largest / 65504.0}


def build_latent_regularizers(cfg: Config, model: Autoencoder, min_image: int) -> LatentRegularizers:
    """The run's latent regularizers, checked against the model's factor and the crop size.

    Raises:
        ConfigError: a crop or scale the latent transforms cannot map exactly, in one line.
    """
    regs = LatentRegularizers(
        cfg.eq_vae,
        cfg.scale_equivariance,
        cfg.latent_noise,
        model.config.downsample_factor,
        model.config.scaling_factor,
    )
    try:
        regs.check(cfg.data.resolution, min_image)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return regs


def build_fp16_fix(cfg: Config, model: Autoencoder) -> FP16Fix | None:
    """The fp16 fix's teacher and loss (None when off), refused in one line where it cannot run.

    Raises:
        ConfigError: with a latent regularizer (their views have no teacher counterpart) or gradient
            checkpointing (the penalty's hooks are not in the recomputed forward).
    """
    if not cfg.fp16_fix.enabled:
        return None
    others = [n for n in ("eq_vae", "scale_equivariance", "latent_noise") if getattr(cfg, n).enabled]
    if others:
        raise ConfigError(f"fp16_fix does not combine with {others[0]}: turn one of them off")
    if cfg.train.gradient_checkpointing:
        raise ConfigError("fp16_fix does not combine with train.gradient_checkpointing: turn one of them off")
    return FP16Fix(cfg.fp16_fix, model, encoder_trains=not cfg.model.decoder_only)


def regularized_views(
    plan: LatentPlan | None, x: Tensor, recon: Tensor | tuple[Tensor, ...]
) -> tuple[Tensor, Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(target, reconstruction, extra targets, extra reconstructions) of a forward run with ``plan``."""
    if plan is None:
        return x, recon, (), ()  # type: ignore[return-value]
    (target, *targets), (main, *recons) = plan.targets(x), recon
    return target, main, tuple(targets), tuple(recons)


def load_images(cfg: DataConfig, world: int) -> tuple[ImageFolderDataset, list[Path]]:
    """(training set, validation files), with one-line errors for a folder too small for the split or batch."""
    if not cfg.train_dir:
        raise ConfigError("no training images: set data.train_dir or pass --data-dir")
    files = list_images(cfg.train_dir)
    held = 0 if cfg.val_files or cfg.val_dir else cfg.num_val  # held out of train_dir itself
    check_enough_data(len(files), held, cfg.batch_size, world, "images", cfg.train_dir)
    train_files, val_files = validation_files(files, cfg.val_files, cfg.val_dir, cfg.num_val)
    dataset = ImageFolderDataset(train_files, cfg.resolution, cfg.flip)
    check_enough_data(len(dataset) + held, held, cfg.batch_size, world, "readable images", cfg.train_dir)
    return dataset, val_files


# ------------------------------------------------------------------------------------------- objective


class VAEObjective:
    """Autoencoder + discriminator, trained with :class:`~ldm_vae.losses.AutoencoderLoss`."""

    name, export_name, grid_name, progress_key, unit = (
        "train_vae",
        "vae",
        "val/reconstructions",
        "total",
        "images",
    )

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, device, world = cfg, accelerator.device, accelerator.num_processes
        set_seed(cfg.train.seed)  # identical initial weights on every process
        # The loss first: missing LPIPS weights must fail before any data is read.
        self.loss_fn = AutoencoderLoss(cfg.loss).to(device)
        self.autoencoder = build_autoencoder(cfg.model, cfg.train.gradient_checkpointing)
        self.disc = build_discriminator(cfg.loss)
        self.fix = build_fp16_fix(cfg, self.autoencoder)
        # The fix without its data loss trains on the teacher's outputs only: no GAN either.
        data_loss = self.fix is None or cfg.fp16_fix.data_loss
        self.use_gan = data_loss and cfg.loss.disc_weight > 0 and cfg.loss.disc_factor > 0
        if self.use_gan and cfg.data.resolution < self.disc.min_size:
            raise ConfigError(
                f"data.resolution {cfg.data.resolution} is below the discriminator's {self.disc.min_size} px"
            )
        min_image = self.disc.min_size if self.use_gan else 1
        self.latent_regs = build_latent_regularizers(cfg, self.autoencoder, min_image)
        dataset, val_files = load_images(cfg.data, world)
        if dataset.skipped:
            path, reason = dataset.skipped[0]
            accelerator.print(
                f"skipped {len(dataset.skipped)} unreadable image files (e.g. {path}: {reason})"
            )
        self.val_images = load_validation_images(val_files, cfg.data.resolution).to(device)
        self.batch_size = cfg.data.batch_size
        self.loader = epoch_loader(dataset, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed)
        lr_ae, lr_d = learning_rates(cfg.optim, cfg.data.batch_size, cfg.train.grad_accum, world)
        # The learned log-variance is the loss's, outside the model: it is in the autoencoder's optimizer.
        ae_params: list = [
            p for p in self.autoencoder.parameters() if p.requires_grad
        ] + self.loss_fn.trainable_parameters()
        if self.fix is not None and cfg.fp16_fix.relative_lr:  # one group per tensor, lr x its RMS
            ae_params = relative_param_groups(self.autoencoder, lr_ae) + self.loss_fn.trainable_parameters()
        self.opt_ae = build_optimizer(ae_params, cfg.optim, lr_ae)
        self.opt_d = build_optimizer(self.disc.parameters(), cfg.optim, lr_d)
        self.schedulers = [
            build_scheduler(o, cfg.optim, cfg.train.max_steps) for o in (self.opt_ae, self.opt_d)
        ]
        # disc_second_pass: this window's micro-batches (input, latent plan, step generator), re-run for the
        # discriminator after the autoencoder's step; their logs join the next micro-step's. A skipped window's
        # entries fall out of the deque as the next window's come in.
        self.second_pass = self.use_gan and cfg.loss.disc_second_pass
        self.disc_batches: deque = deque(maxlen=cfg.train.grad_accum)
        self.pending_logs: dict[str, Tensor] = {}

    def prepare(self, accelerator: Accelerator) -> list[nn.Module]:
        self.accelerator = accelerator
        model, disc, self.opt_ae, self.opt_d, *self.schedulers, self.loader = accelerator.prepare(
            self.autoencoder, self.disc, self.opt_ae, self.opt_d, *self.schedulers, self.loader
        )
        self.optimizers = [self.opt_ae, self.opt_d]
        self.wrapped, self.wrapped_disc = model, disc
        self.model, self.disc = accelerator.unwrap_model(model), accelerator.unwrap_model(disc)
        if self.fix is not None:
            self.fix.to(accelerator.device)
        return [model, disc]

    def gan_on(self, step: int) -> bool:
        return self.use_gan and self.loss_fn.disc_factor_at(step) > 0

    def loss(self, x: Tensor, generator: torch.Generator, step: int) -> StepOutput:
        """Generator loss through the (DDP-)wrapped model, then the discriminator's loss on detached inputs (or,
        with ``disc_second_pass``, after the autoencoder's step: :meth:`second_pass_loss`)."""
        if self.fix is not None:
            return self._fp16_fix_loss(x, generator, step)
        gan_on = self.gan_on(step)
        # The latent regularizers' views (None when all are off) are decoded in the same wrapped forward.
        f = self.model.config.downsample_factor
        plan = self.latent_regs.draw(generator, (x.shape[-2] // f, x.shape[-1] // f))
        recon, reg = self.wrapped(x, latent_transform=plan, sample_posterior=True, generator=generator)
        # With EQ-VAE on this step, the target is tau(x) and the reconstruction D(tau(z)).
        target, recon, se_targets, se_recons = regularized_views(plan, x, recon)
        with self.accelerator.autocast():
            g_loss, logs = self._generator_loss(target, recon, reg, step, gan_on)
            if se_recons:  # scale equivariance's downscaled views
                term, se_logs = self.latent_regs.scale_loss(
                    self.loss_fn, se_targets, se_recons, reg, x.shape[-2] * x.shape[-1]
                )
                g_loss = g_loss + term
                logs.update(se_logs, total=g_loss.detach().float())
            if plan is not None and self.latent_regs.eq.enabled:
                logs["eq_applied"] = torch.tensor(float(plan.eq_applied))
            d_loss = self._discriminator_loss(target, recon, step, gan_on, logs, (x, plan, generator))
        return StepOutput((g_loss, d_loss), logs)

    def _generator_loss(
        self, target: Tensor, recon: Tensor, reg: Any, step: int, gan_on: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # The discriminator is called unwrapped with requires_grad off: gradients reach the reconstruction
        # but never its weights, so its accumulated gradients stay its own and no all-reduce is wasted on
        # them. (Toggling requires_grad on the DDP-wrapped module would break DDP's reducer.)
        self.disc.requires_grad_(False)
        logits_fake = self.disc(recon) if gan_on else None
        g_loss, logs = self.loss_fn.generator_loss(
            target, recon, reg, logits_fake, self.model.last_layer, step
        )
        self.disc.requires_grad_(True)
        return g_loss, logs

    def _discriminator_loss(
        self,
        target: Tensor,
        recon: Tensor,
        step: int,
        gan_on: bool,
        logs: dict[str, Tensor],
        rerun: tuple[Tensor, Any, torch.Generator],
    ) -> Tensor | None:
        logs.update(self.pending_logs)  # the previous step's second pass, if any
        self.pending_logs = {}
        if not gan_on:
            return None
        if self.second_pass:  # the discriminator's loss comes after the autoencoder's step
            self.disc_batches.append(rerun)
            return None
        # Nothing reaches the autoencoder from here.
        logits_real, logits_fake = self.wrapped_disc(target.detach()), self.wrapped_disc(recon.detach())
        d_loss, d_logs = self.loss_fn.discriminator_loss(logits_real, logits_fake, step)
        logs.update(d_logs)
        return d_loss

    def _fp16_fix_loss(self, x: Tensor, generator: torch.Generator, step: int) -> StepOutput:
        """The fp16 fix: match the frozen teacher, penalize large activations (+ the usual objective when
        ``fp16_fix.data_loss``)."""
        assert self.fix is not None
        gan_on = self.gan_on(step)
        loss, recon, reg, logs = self.fix.step(self.wrapped, self.model, x, generator)
        d_loss = None
        with self.accelerator.autocast():
            if self.cfg.fp16_fix.data_loss:
                g_loss, g_logs = self._generator_loss(x, recon, reg, step, gan_on)
                loss = loss + g_loss
                logs.update(g_logs)
                d_loss = self._discriminator_loss(x, recon, step, gan_on, logs, (x, None, generator))
        logs["total"] = loss.detach().float()
        return StepOutput((loss, d_loss), logs)

    def second_pass_loss(self, x: Tensor, plan: Any, generator: torch.Generator, step: int) -> Tensor:
        """LDM's discriminator step: the (just updated) autoencoder again, a new posterior sample, no gradient."""
        with self.accelerator.autocast():  # the unwrapped model: Accelerate's autocast is on the wrapper only
            with torch.no_grad():
                recon, _ = self.model(x, latent_transform=plan, sample_posterior=True, generator=generator)
            target, recon, _, _ = regularized_views(plan, x, recon)
            logits_real, logits_fake = self.wrapped_disc(target), self.wrapped_disc(recon)
            d_loss, logs = self.loss_fn.discriminator_loss(logits_real, logits_fake, step)
        self.pending_logs = {k: v.detach() for k, v in logs.items()}
        return d_loss

    def apply_gradients(self, step: int) -> None:
        # The log-variance lives outside DDP: average its gradient or the ranks diverge.
        for p in self.loss_fn.trainable_parameters():
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, "mean")
        scaler = self.accelerator.scaler
        # fp16: one GradScaler scales both losses. Accelerate's optimizer wrapper updates the scale after each
        # optimizer's step, so the discriminator would unscale its gradients with a scale the autoencoder's step
        # had just changed. Step both with the scale they were computed with, then update once (PyTorch AMP's
        # recipe for several optimizers).
        for optimizer in [self.opt_ae, self.opt_d] if self.gan_on(step) else [self.opt_ae]:
            if optimizer is self.opt_d and self.second_pass and not self.second_pass_backward(step):
                continue
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(getattr(optimizer, "optimizer", optimizer))
        if scaler is not None:
            scaler.update()

    def second_pass_backward(self, step: int) -> bool:
        """Backpropagates this window's discriminator losses after the autoencoder's step; False (and no
        discriminator step) when one is non-finite on any rank."""
        entries = list(self.disc_batches)
        self.disc_batches.clear()
        for entry in entries:
            d_loss = self.second_pass_loss(*entry, step)
            if nonfinite_anywhere(self.accelerator, d_loss):
                self.opt_d.zero_grad(set_to_none=True)
                return False
            self.accelerator.backward(d_loss)  # divided by grad_accum, as the runner's backward is
        return bool(entries)

    def validate(self, ema: ModelEMA | None) -> tuple[dict, Tensor] | None:
        if not len(self.val_images):
            return None
        perceptual = self.loss_fn.perceptual
        metrics, grid = validate(self.model, ema, self.val_images, self.cfg.data.batch_size, perceptual)
        if self.fix is not None:
            metrics.update(activation_metrics(self.model, self.val_images, self.cfg.data.batch_size))
        return metrics, grid

    def export(self, folder: Path) -> None:
        self.model.save_pretrained(folder)  # autoencoder only: no discriminator, no LPIPS

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        state = self.loss_fn.state_dict()  # the learned log-variance, when there is one
        return {"loss": state} if state else {}

    def load_state_tensors(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        if "loss" in tensors:
            self.loss_fn.load_state_dict(tensors["loss"])

    def digest_modules(self) -> dict[str, nn.Module]:
        return {"ae": self.model, "disc": self.disc, "loss": self.loss_fn}


def main(cfg: Config) -> Path:
    """Trains as ``cfg`` says; returns the exported diffusers folder ``<output_dir>/vae``."""
    return run_training(cfg, lambda accelerator: VAEObjective(cfg, accelerator))


def cli(argv: list[str] | None = None) -> int:
    try:
        main(parse_command_line(Config, argv, ALIASES, prog="train_vae.py"))
    except (ConfigError, CheckpointError, ImageError, MissingWeightsError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
