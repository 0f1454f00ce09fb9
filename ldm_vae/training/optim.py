"""AdamW with a linear-warmup + constant/cosine learning-rate schedule (diffusers' schedulers)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from .config import OptimConfig


def learning_rates(
    cfg: OptimConfig, batch_size: int, grad_accum: int, num_processes: int
) -> tuple[float, float]:
    """(autoencoder lr, discriminator lr); with ``scale_lr`` both scale with the global batch, as in LDM
    (lr = base_lr * batch_size * grad_accum * num_processes)."""
    scale = batch_size * grad_accum * num_processes if cfg.scale_lr else 1
    disc = cfg.lr if cfg.disc_lr is None else cfg.disc_lr
    return cfg.lr * scale, disc * scale


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> LRScheduler:
    """Linear warmup over ``warmup_steps``, then constant or cosine decay to 0 at ``max_steps``.

    Steps are optimizer steps; the trainer steps it once per optimizer step on every process.
    """
    name = "constant_with_warmup" if cfg.schedule == "constant" else "cosine"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)
