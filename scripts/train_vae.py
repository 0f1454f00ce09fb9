#!/usr/bin/env python
"""Train a KL or VQ autoencoder from scratch, or fine-tune one (e.g. Stable Diffusion's VAE), with Accelerate.

    accelerate launch scripts/train_vae.py --config scripts/configs/sd_ft_mse.toml --data-dir photos/ \\
        --output-dir runs/ft --max-steps 20000 [--resume latest] [--optim.lr 5e-5 ...]

The objective is Latent Diffusion's (Rombach et al., 2022, App. G) and taming's (Esser et al., 2021, Sec. 3.1):
reconstruction (+ LPIPS) + KL or codebook loss + an adaptively weighted PatchGAN loss from ``loss.disc_start`` on
(:mod:`ldm_vae.losses`). Accelerate is the only distributed engine: one process, or many via ``accelerate
launch``; on CPUs, ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`` gives N gloo ranks.
Runs also work with plain ``python scripts/train_vae.py ...``. ``main(cfg)`` is importable.
"""

from __future__ import annotations

import hashlib
import sys
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ldm_vae import AutoencoderKL, CheckpointError, ConfigKeyError, VQAutoencoder
from ldm_vae.images import ImageError, save_image
from ldm_vae.losses import AutoencoderLoss, LossConfig, MissingWeightsError, build_discriminator
from ldm_vae.metrics import psnr, ssim
from ldm_vae.runtime import autocast_precision
from ldm_vae.training import (
    CheckpointManager,
    ConfigError,
    DataConfig,
    EpochSampler,
    ImageFolderDataset,
    MetricsLog,
    ModelEMA,
    NonFiniteLossError,
    OptimConfig,
    TrainConfig,
    TrainProgress,
    after_step,
    build_optimizer,
    build_scheduler,
    due,
    learning_rates,
    list_images,
    load_validation_images,
    mix_seed,
    nonfinite_anywhere,
    parse_command_line,
    tensorboard_tracker,
    validation_files,
    write_config,
)

ALIASES = {
    "--data-dir": "data.train_dir",
    "--output-dir": "train.output_dir",
    "--max-steps": "train.max_steps",
    "--resume": "train.resume",
}


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["kl", "vq"] = "kl"  # AutoencoderKL or VQAutoencoder
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


# ------------------------------------------------------------------------------------------- pieces


def build_autoencoder(cfg: ModelConfig, gradient_checkpointing: bool) -> nn.Module:
    """The autoencoder to train, in train mode, with frozen parts for ``decoder_only``."""
    cls = AutoencoderKL if cfg.kind == "kl" else VQAutoencoder
    try:
        model = cls.from_pretrained(cfg.init, **cfg.overrides)
    except ConfigKeyError as e:  # an override that is no field of the model's config
        raise ConfigError(f"model.overrides: {e}") from None
    model.train()
    if cfg.decoder_only:
        for part in (model.encoder, model.quant_conv, getattr(model, "quantize", None)):
            if part is not None:
                # eval() too: an EMA codebook would otherwise keep updating its buffers in the forward pass.
                part.requires_grad_(False).eval()
    model.encoder.gradient_checkpointing = model.decoder.gradient_checkpointing = gradient_checkpointing
    return model


def reconstruct(model: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> tuple:
    """(recon, regularization); training samples the posterior, evaluation takes its mean."""
    return model(x, sample_posterior=generator is not None, generator=generator)


@torch.no_grad()
def validate(
    model: nn.Module,
    ema: ModelEMA | None,
    images: Tensor,
    batch: int,
    perceptual: nn.Module | None = None,
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
            recon = torch.cat([reconstruct(model, x)[0] for x in images.split(batch)]).clamp(-1, 1)
        metrics[f"val/psnr{suffix}"] = psnr(recon, images).mean().item()
        metrics[f"val/ssim{suffix}"] = ssim(recon, images).mean().item()
        if perceptual is not None:
            metrics[f"val/lpips{suffix}"] = perceptual(recon.float(), images.float()).mean().item()
        rows.append(recon)
    for m, training in modes:
        m.training = training
    return metrics, make_grid(torch.cat(rows).float().cpu(), nrow=len(images), padding=2, pad_value=1.0)


def weights_digest(module: nn.Module) -> str:
    """Short SHA-256 of the parameters. Buffers are left out: DDP broadcasts BatchNorm running statistics from
    rank 0 at each forward, so between forwards each rank holds its own (they are unused in train mode)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- training


def main(cfg: Config) -> Path:
    """Trains as ``cfg`` says; returns the exported diffusers folder ``<output_dir>/vae``."""
    run_dir = Path(cfg.train.output_dir)
    accelerator = Accelerator(
        mixed_precision=autocast_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        # Schedulers are stepped once per optimizer step by this loop (not num_processes times by Accelerate).
        step_scheduler_with_optimizer=False,
        log_with=tensorboard_tracker(cfg.train.tensorboard),
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    accelerator.print(
        f"world_size={world} distributed_type={accelerator.distributed_type.value} device={accelerator.device} "
        f"mixed_precision={accelerator.mixed_precision}"
    )
    set_seed(cfg.train.seed)  # identical initial weights on every process
    ckpts = CheckpointManager(accelerator, run_dir, keep=cfg.train.keep_checkpoints)
    start = ckpts.resolve(cfg.train.resume)
    if start is None and not cfg.train.resume and ckpts.checkpoints():
        raise ConfigError(
            f"{run_dir} already holds checkpoints: pass --resume latest or another --output-dir"
        )

    # The loss first: missing LPIPS weights must fail before any data is read.
    loss_fn = AutoencoderLoss(cfg.loss).to(accelerator.device)
    model = build_autoencoder(cfg.model, cfg.train.gradient_checkpointing)
    disc = build_discriminator(cfg.loss)
    use_gan = cfg.loss.disc_weight > 0 and cfg.loss.disc_factor > 0
    if use_gan and cfg.data.resolution < disc.min_size:
        raise ConfigError(
            f"data.resolution {cfg.data.resolution} is below the discriminator's {disc.min_size} px"
        )

    if not cfg.data.train_dir:
        raise ConfigError("no training images: set data.train_dir or pass --data-dir")
    train_files, val_files = validation_files(
        list_images(cfg.data.train_dir), cfg.data.val_files, cfg.data.val_dir, cfg.data.num_val
    )
    dataset = ImageFolderDataset(train_files, cfg.data.resolution, cfg.data.flip)
    if dataset.skipped:
        path, reason = dataset.skipped[0]
        accelerator.print(f"skipped {len(dataset.skipped)} unreadable image files (e.g. {path}: {reason})")
    if len(dataset) < cfg.data.batch_size * world:
        raise ConfigError(
            f"{len(dataset)} training images: fewer than one batch per process ({cfg.data.batch_size})"
        )
    val_images = load_validation_images(val_files, cfg.data.resolution).to(accelerator.device)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=EpochSampler(len(dataset), cfg.train.seed),
        num_workers=cfg.data.num_workers,
        drop_last=True,
        # Its own generator: creating a DataLoader iterator must not consume the global RNG (exact resumes).
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )

    lr_ae, lr_d = learning_rates(cfg.optim, cfg.data.batch_size, cfg.train.grad_accum, world)
    ae_params = [p for p in model.parameters() if p.requires_grad] + loss_fn.trainable_parameters()
    opt_ae = build_optimizer(ae_params, cfg.optim, lr_ae)
    opt_d = build_optimizer(disc.parameters(), cfg.optim, lr_d)
    sched_ae = build_scheduler(opt_ae, cfg.optim, cfg.train.max_steps)
    sched_d = build_scheduler(opt_d, cfg.optim, cfg.train.max_steps)
    model, disc, opt_ae, opt_d, sched_ae, sched_d, loader = accelerator.prepare(
        model, disc, opt_ae, opt_d, sched_ae, sched_d, loader
    )
    ae, disc_module = accelerator.unwrap_model(model), accelerator.unwrap_model(disc)
    ema = ModelEMA(ae, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    last_layer = ae.decoder.conv_out.weight  # for the adaptive GAN weight

    # ----------------------------------------------------------------------------------- resume
    metrics = MetricsLog(accelerator, run_dir)
    global_batch = cfg.data.batch_size * world
    run = TrainProgress()
    if start is not None:
        saved, tensors = ckpts.load(start, ("ema", "loss"))
        run = TrainProgress.from_state(saved, global_batch)
        if ema is not None and "ema" in tensors:
            ema.load(tensors["ema"], saved["ema"])
        if "loss" in tensors:
            loss_fn.load_state_dict(tensors["loss"])
        accelerator.print(f"resumed from {start} at step {run.step}")
    elif cfg.train.resume == "latest":
        accelerator.print(f"no checkpoint in {run_dir}: starting a new run")
    ckpts.clean_partial()
    if accelerator.is_main_process:
        write_config(cfg, run_dir / "train_config.json")
        metrics.truncate_after(run.step)
    accelerator.init_trackers("train_vae")
    accelerator.wait_for_everyone()

    def save_checkpoint() -> Path:
        state = {**run.state(len(loader), global_batch), "ema": ema.state()[1] if ema else None}
        tensors = {"ema": ema.state()[0]} if ema is not None else {}
        if loss_fn.state_dict():
            tensors["loss"] = loss_fn.state_dict()  # the learned log-variance
        return ckpts.save(run.step, state, tensors)

    def run_validation() -> None:
        if accelerator.is_main_process and len(val_images):
            values, grid = validate(ae, ema, val_images, cfg.data.batch_size, perceptual=loss_fn.perceptual)
            save_image(grid, run_dir / "samples" / f"step-{run.step:07d}.png")
            metrics.log(values, run.step)
            metrics.log_image("val/reconstructions", grid, run.step)
        accelerator.wait_for_everyone()

    # ----------------------------------------------------------------------------------- loop
    # Accelerate steps a scheduler without checking its optimizer stepped; the discriminator's does not before
    # disc_start, which only makes torch warn.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
    images_per_step = global_batch * cfg.train.grad_accum
    window_ok = True  # no non-finite loss in the current accumulation window
    # Since the last log line: loss sums over micro-batches, optimizer steps, compute seconds, wall clock.
    sums, count, steps_since_log, compute_time, t_log = defaultdict(float), 0, 0, 0.0, time.perf_counter()
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=run.step,
        disable=not accelerator.is_local_main_process,
        desc="train",
    )
    try:
        while run.step < cfg.train.max_steps:
            for x in run.epoch_batches(accelerator, loader):
                t0 = time.perf_counter()
                run.batch += 1
                step = run.step  # optimizer steps done before this one: LDM's global_step
                gan_on = use_gan and loss_fn.disc_factor_at(step) > 0
                # Posterior noise is a function of (seed, rank, position): resumes are exact without RNG state.
                noise = torch.Generator(accelerator.device).manual_seed(
                    mix_seed(cfg.train.seed, rank, run.epoch, run.batch)
                )
                with accelerator.accumulate(model, disc):
                    # Generator step through the prepared (DDP) model. The discriminator is called unwrapped with
                    # requires_grad off: gradients reach the reconstruction but never the discriminator's
                    # weights, so its accumulated gradients stay its own and no all-reduce is wasted on them.
                    # (Toggling requires_grad on the DDP-wrapped module would break DDP's reducer.)
                    recon, reg = reconstruct(model, x, noise)
                    with accelerator.autocast():
                        disc_module.requires_grad_(False)
                        logits_fake = disc_module(recon) if gan_on else None
                        g_loss, logs = loss_fn.generator_loss(x, recon, reg, logits_fake, last_layer, step)
                        disc_module.requires_grad_(True)
                        d_loss = None
                        if gan_on:  # discriminator step on detached inputs: nothing reaches the autoencoder
                            logits_real, logits_fake = disc(x.detach()), disc(recon.detach())
                            d_loss, d_logs = loss_fn.discriminator_loss(logits_real, logits_fake, step)
                            logs.update(d_logs)
                    ok = not nonfinite_anywhere(accelerator, g_loss, d_loss)
                    if ok:
                        accelerator.backward(g_loss)
                        if d_loss is not None:
                            accelerator.backward(d_loss)
                    window_ok &= ok
                    if accelerator.sync_gradients:
                        if window_ok:
                            # The log-variance lives outside DDP: average its gradient or the ranks diverge.
                            for p in loss_fn.trainable_parameters():
                                if p.grad is not None:
                                    p.grad = accelerator.reduce(p.grad, "mean")
                            opt_ae.step()
                            if gan_on:
                                opt_d.step()
                            if ema is not None:
                                ema.update(ae)
                        sched_ae.step()
                        sched_d.step()
                        # Zeroed after each window (Accelerate ignores zero_grad inside one): each optimizer
                        # starts its next backward from clean gradients, also after a skipped window.
                        opt_ae.zero_grad(set_to_none=True)
                        opt_d.zero_grad(set_to_none=True)
                compute_time += time.perf_counter() - t0
                if ok:
                    for k, v in logs.items():
                        sums[k] += float(v)
                    count += 1
                if not accelerator.sync_gradients:
                    continue

                # ------------------------------------------------------------------- one optimizer step done
                streak = run.count_step(window_ok, metrics, cfg.train.max_nonfinite, ckpts.latest())
                step, window_ok = run.step, True
                steps_since_log += 1
                if count and due(step, cfg.train.log_every, cfg.train):
                    images_per_s = images_per_step * steps_since_log / (time.perf_counter() - t_log)
                    values = {f"train/{k}": v / count for k, v in sums.items()}
                    values.update({"train/lr": sched_ae.get_last_lr()[0], "train/images_per_s": images_per_s})
                    values["train/step_time"] = compute_time / steps_since_log  # excludes data loading
                    metrics.log(values, step)
                    bar.set_postfix(loss=f"{values['train/total']:.4g}", img_s=f"{images_per_s:.1f}")
                    sums, count, steps_since_log, compute_time = defaultdict(float), 0, 0, 0.0
                    t_log = time.perf_counter()
                bar.update(1)
                if after_step(step, streak, cfg.train, run_validation, save_checkpoint):
                    break
            else:
                run.next_epoch()
        bar.close()
        if not cfg.train.val_every or run.step % cfg.train.val_every:
            run_validation()

        # ------------------------------------------------------------------------------- export
        export_dir = run_dir / "vae"
        if accelerator.is_main_process:
            with ema.applied(ae) if ema is not None and cfg.train.export_ema else nullcontext():
                ae.save_pretrained(export_dir)  # autoencoder only: no discriminator, no LPIPS
            accelerator.print(
                f"exported {'EMA' if ema and cfg.train.export_ema else 'raw'} weights to {export_dir}"
            )
        # Every rank reports: DDP must have kept the autoencoder, discriminator and log-variance identical.
        modules = {"ae": ae, "disc": disc_module, "loss": loss_fn}
        digests = " ".join(f"{n}={weights_digest(m)}" for n, m in modules.items() if list(m.parameters()))
        print(f"[rank {rank}/{world}] weights sha256 {digests}", flush=True)
        accelerator.wait_for_everyone()
        return export_dir
    finally:
        bar.close()
        accelerator.end_training()


def cli(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_command_line(Config, argv, ALIASES, prog="train_vae.py")
        main(cfg)
    except (ConfigError, CheckpointError, ImageError, MissingWeightsError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
