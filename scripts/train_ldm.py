#!/usr/bin/env python
"""Train a small unconditional latent diffusion model on cached VAE latents, with Accelerate.

    ldm-vae cache-latents photos/ -o latents/ --model demo --resolution 256
    accelerate launch scripts/train_ldm.py --config scripts/configs/ldm_demo.toml --latent-dir latents/ \\
        --output-dir runs/ldm [--resume latest] [--optim.lr 2e-4 ...]

The model is Latent Diffusion's (Rombach et al., 2022) unconditional LDM: a diffusers ``UNet2DModel`` trained
with DDPM's epsilon objective (Ho et al., 2020, eq. 14) on ``(z - shift) * scale``, z = mean + std * eps drawn
afresh from each cached posterior every epoch (:mod:`ldm_vae.latents`, :mod:`ldm_vae.ldm`). Every
``train.val_every`` steps it logs the held-out loss and variational bound in bits/dim next to the N(0, I)
prior's, and saves a grid of DDIM samples decoded through the VAE. At the end it exports a
``diffusers.LDMPipeline`` folder, ``<output_dir>/pipeline`` (``ldm-vae sample --pipeline ...`` reads it).
Runs also work with plain ``python scripts/train_ldm.py ...``; ``main(cfg)`` is importable.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ldm_vae import AutoencoderKL, CheckpointError
from ldm_vae.images import save_image
from ldm_vae.latents import LatentDataset, held_out_split, read_manifest
from ldm_vae.ldm import (
    NoiseConfig,
    UNetConfig,
    build_noise_scheduler,
    build_unet,
    decode_latents,
    diffusion_loss,
    export_pipeline,
    gaussian_bits_per_dim,
    sample_latents,
    sampling_scheduler,
    vlb_bits_per_dim,
)
from ldm_vae.runtime import autocast_precision
from ldm_vae.training import (
    CheckpointManager,
    ConfigError,
    EpochSampler,
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
    mix_seed,
    nonfinite_anywhere,
    parse_command_line,
    tensorboard_tracker,
    write_config,
)

ALIASES = {
    "--latent-dir": "data.latent_dir",
    "--output-dir": "train.output_dir",
    "--max-steps": "train.max_steps",
    "--resume": "train.resume",
}


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
    """(training latents, held-out latents, manifest) of the cache."""
    if not cfg.latent_dir:
        raise ConfigError(
            "no latents: set data.latent_dir or pass --latent-dir (see `ldm-vae cache-latents`)"
        )
    manifest = read_manifest(cfg.latent_dir)
    try:  # held out by image, not by view: the center crops of the last num_val images
        train, val = held_out_split(manifest, cfg.num_val)
    except ValueError as e:
        raise ConfigError(f"data.num_val: {e}") from None
    if len(train) < cfg.batch_size * world:
        raise ConfigError(
            f"{len(train)} training latents: fewer than one batch per process ({cfg.batch_size})"
        )
    return LatentDataset(cfg.latent_dir, train), LatentDataset(cfg.latent_dir, val), manifest


def load_vae(cfg: LatentDataConfig, manifest: dict, device: torch.device) -> AutoencoderKL:
    """The cache's autoencoder with ``scaling_factor`` set to the cached scale, as the exported pipeline has it."""
    src = cfg.vae or manifest["model"]
    if manifest["shift"]:
        raise ConfigError(
            f"the latents were shifted by {manifest['shift']} (the VAE's shift_factor): diffusers' LDMPipeline "
            "cannot express a shift, so a model trained on them could not be exported"
        )
    torch.manual_seed(0)  # a random-init preset (e.g. "tiny" in tests) is then the same model every time
    vae = AutoencoderKL.from_pretrained(src, device=device, scaling_factor=manifest["scale"])
    if vae.config.latent_channels != manifest["latent_shape"][0]:
        raise ConfigError(
            f"{src}: {vae.config.latent_channels} latent channels, the cache has {manifest['latent_shape'][0]}"
        )
    return vae


@torch.no_grad()
def evaluate(unet: UNet2DModel, noise: DDPMScheduler, z: Tensor, cfg: SampleConfig) -> dict[str, float]:
    """Held-out loss (fixed t and eps) and, with ``vlb_timesteps``, the bound and N(0, I) prior in bits/dim."""
    if not len(z):
        return {}
    out = {"loss": diffusion_loss(unet, noise, z, torch.Generator(z.device).manual_seed(cfg.seed)).item()}
    if cfg.vlb_timesteps:
        bound = vlb_bits_per_dim(unet, noise, z, cfg.vlb_timesteps, torch.Generator().manual_seed(cfg.seed))
        out.update(bpd=bound["total"].mean().item(), prior_bpd=gaussian_bits_per_dim(z).mean().item())
    return out


@torch.no_grad()
def sample_grid(unet: UNet2DModel, noise: DDPMScheduler, vae: AutoencoderKL, cfg: SampleConfig) -> Tensor:
    """A grid (3, H, W) of ``num_images`` decoded samples, the same initial noise every time."""
    scheduler = sampling_scheduler(noise, cfg.scheduler)
    generator = torch.Generator().manual_seed(cfg.seed)
    z = sample_latents(unet, scheduler, cfg.num_images, cfg.steps, generator, cfg.eta)  # (N, C, s, s)
    images = decode_latents(vae, z.to(vae.device)).cpu()  # (N, 3, s*f, s*f)
    return make_grid(images, nrow=max(1, round(cfg.num_images**0.5)), padding=2, pad_value=1.0)


# ------------------------------------------------------------------------------------------- training


def main(cfg: Config) -> Path:
    """Trains as ``cfg`` says; returns the exported pipeline folder ``<output_dir>/pipeline``."""
    run_dir = Path(cfg.train.output_dir)
    accelerator = Accelerator(
        mixed_precision=autocast_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step below
        log_with=tensorboard_tracker(cfg.train.tensorboard),
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    accelerator.print(
        f"world_size={world} distributed_type={accelerator.distributed_type.value} "
        f"mixed_precision={accelerator.mixed_precision}"
    )
    ckpts = CheckpointManager(accelerator, run_dir, keep=cfg.train.keep_checkpoints)
    start = ckpts.resolve(cfg.train.resume)
    if start is None and not cfg.train.resume and ckpts.checkpoints():
        raise ConfigError(
            f"{run_dir} already holds checkpoints: pass --resume latest or another --output-dir"
        )

    train_set, val_set, manifest = load_data(cfg.data, world)
    vae = load_vae(cfg.data, manifest, accelerator.device)
    val_z = val_set.fixed_samples(cfg.sample.seed).to(accelerator.device)
    set_seed(cfg.train.seed)  # identical initial weights on every process
    c, s, _ = manifest["latent_shape"]
    try:
        unet = build_unet(cfg.model, c, s)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    noise = build_noise_scheduler(cfg.diffusion)
    # The sampler yields (index, seed) pairs: each epoch's posterior samples are the same after a resume.
    loader = DataLoader(
        train_set,
        batch_size=cfg.data.batch_size,
        sampler=EpochSampler(len(train_set), cfg.train.seed),
        num_workers=cfg.data.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    lr, _ = learning_rates(cfg.optim, cfg.data.batch_size, cfg.train.grad_accum, world)
    optimizer = build_optimizer(unet.parameters(), cfg.optim, lr)
    lr_schedule = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    unet, optimizer, lr_schedule, loader = accelerator.prepare(unet, optimizer, lr_schedule, loader)
    model = accelerator.unwrap_model(unet)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

    metrics = MetricsLog(accelerator, run_dir)
    global_batch = cfg.data.batch_size * world
    run = TrainProgress()
    if start is not None:
        saved, tensors = ckpts.load(start, ("ema",))
        run = TrainProgress.from_state(saved, global_batch)
        if ema is not None and "ema" in tensors:
            ema.load(tensors["ema"], saved["ema"])
        accelerator.print(f"resumed from {start} at step {run.step}")
    ckpts.clean_partial()
    if accelerator.is_main_process:
        write_config(cfg, run_dir / "train_config.json")
        metrics.truncate_after(run.step)
    accelerator.init_trackers("train_ldm")
    accelerator.wait_for_everyone()

    def save_checkpoint() -> None:
        ema_tensors, ema_scalars = ema.state() if ema is not None else ({}, None)
        state = {**run.state(len(loader), global_batch), "ema": ema_scalars}
        ckpts.save(run.step, state, {"ema": ema_tensors} if ema is not None else {})

    def validate() -> None:
        if accelerator.is_main_process:
            model.eval()
            values = {f"val/{k}": v for k, v in evaluate(model, noise, val_z, cfg.sample).items()}
            with ema.applied(model) if ema is not None else nullcontext():
                if ema is not None:
                    values.update(
                        {f"val/{k}_ema": v for k, v in evaluate(model, noise, val_z, cfg.sample).items()}
                    )
                grid = sample_grid(model, noise, vae, cfg.sample)
            model.train()
            save_image(grid, run_dir / "samples" / f"step-{run.step:07d}.png")
            metrics.log(values, run.step)
            metrics.log_image("samples", grid, run.step)
        accelerator.wait_for_everyone()

    bar = tqdm(
        total=cfg.train.max_steps,
        initial=run.step,
        disable=not accelerator.is_local_main_process,
        desc="train",
    )
    losses: list[float] = []
    window_ok, t_log, logged = True, time.perf_counter(), run.step
    try:
        while run.step < cfg.train.max_steps:
            for z in run.epoch_batches(accelerator, loader):
                run.batch += 1
                # t and eps are a function of (seed, rank, position): resumes are exact without RNG state.
                generator = torch.Generator(accelerator.device).manual_seed(
                    mix_seed(cfg.train.seed, rank, run.epoch, run.batch)
                )
                with accelerator.accumulate(unet):
                    loss = diffusion_loss(unet, noise, z, generator)
                    ok = not nonfinite_anywhere(accelerator, loss)
                    if ok:
                        accelerator.backward(loss)
                        losses.append(loss.item())
                    window_ok &= ok
                    if accelerator.sync_gradients:
                        if window_ok:
                            optimizer.step()
                            if ema is not None:
                                ema.update(model)
                        lr_schedule.step()
                        optimizer.zero_grad(set_to_none=True)  # also after a skipped window
                if not accelerator.sync_gradients:
                    continue

                # ------------------------------------------------------------------- one optimizer step done
                streak = run.count_step(window_ok, metrics, cfg.train.max_nonfinite, ckpts.latest())
                step, window_ok = run.step, True
                if losses and due(step, cfg.train.log_every, cfg.train):
                    now = time.perf_counter()
                    values = {
                        "train/loss": sum(losses) / len(losses),
                        "train/lr": lr_schedule.get_last_lr()[0],
                    }
                    values["train/step_time"] = (now - t_log) / (step - logged)  # seconds per optimizer step
                    metrics.log(values, step)
                    bar.set_postfix(loss=f"{values['train/loss']:.4g}")
                    losses, t_log, logged = [], now, step
                bar.update(1)
                if after_step(step, streak, cfg.train, validate, save_checkpoint):
                    break
            else:
                run.next_epoch()
        if not cfg.train.val_every or run.step % cfg.train.val_every:
            validate()

        export_dir = run_dir / "pipeline"
        if accelerator.is_main_process:
            with ema.applied(model) if ema is not None and cfg.train.export_ema else nullcontext():
                export_pipeline(vae, model, noise, export_dir, cfg.sample.export_dtype)
            accelerator.print(f"exported the pipeline to {export_dir}")
        accelerator.wait_for_everyone()
        return export_dir
    finally:
        bar.close()
        accelerator.end_training()


def cli(argv: list[str] | None = None) -> int:
    try:
        main(parse_command_line(Config, argv, ALIASES, prog="train_ldm.py"))
    except (ConfigError, CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
