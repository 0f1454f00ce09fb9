"""fp16-fix fine-tuning: keep an autoencoder's outputs while pushing its activations under fp16's range.

In the spirit of sdxl-vae-fp16-fix (Boer Bohan, 2023), which fine-tuned the SDXL VAE so that its decoder runs in
fp16 without NaNs while its outputs stay those of the original: a frozen copy of the model at the start of the
run is the teacher; the student is trained to match the teacher's images (and latents, when its encoder trains,
so the latent space that diffusion models were trained on stays put) while a squared-hinge penalty on every
measured activation above a threshold (:func:`ldm_vae.activations.activation_penalty`) pushes them down.

Adam moves each weight by about ``lr`` per step whatever its size, so a block whose weights are 2^14 times too
large would take ~2^14 times as many steps to shrink as its neighbours take to move. ``relative_lr`` scales each
tensor's learning rate by its RMS in the teacher (Adafactor's ``scale_parameter``; Shazeer & Stern, 2018,
arXiv:1804.04235), so every tensor moves by about ``lr`` of its own size per step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import FP16_MAX, activation_penalty
from ..interface import Autoencoder


@dataclass(frozen=True)
class FP16FixConfig:
    """The ``[fp16_fix]`` section of the VAE trainer; off by default."""

    enabled: bool = False  # off by default
    threshold: float = (
        2.0**14
    )  # |activation| above this is penalized: 4x under fp16's 65504 for unseen inputs
    penalty_weight: float = 1.0  # weight of the activation penalty (relative units, O(1) when far above)
    output_weight: float = 1.0  # weight of the MSE of the student's images against the teacher's (in [-1, 1])
    latent_weight: float = (
        1.0  # weight of the MSE of the latents against the teacher's (only if the encoder trains)
    )
    data_loss: bool = (
        False  # also the trainer's usual objective against the images; off: teacher targets only
    )
    relative_lr: bool = True  # each tensor's lr times its RMS in the teacher (Adafactor's scale_parameter)

    def __post_init__(self) -> None:
        checks = {
            "threshold": 0 < self.threshold <= FP16_MAX,
            "penalty_weight": self.penalty_weight >= 0,
            "output_weight": self.output_weight >= 0,
            "latent_weight": self.latent_weight >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"FP16FixConfig.{name} = {getattr(self, name)!r} is out of range")


def relative_param_groups(model: nn.Module, lr: float) -> list[dict]:
    """One AdamW group per trainable tensor with lr * RMS(tensor), measured now (on the teacher's weights).

    Measured on the initial weights, so a resumed run builds the same groups. An all-zero tensor gets no steps
    (RMS 0): there is nothing to scale it by.
    """
    groups = []
    for p in model.parameters():
        if p.requires_grad:
            rms = p.detach().float().square().mean().sqrt().item()
            groups.append({"params": [p], "lr": lr * rms})
    return groups


def _capture(store: list[Tensor]):
    """A ``latent_transform`` that records z and decodes it unchanged."""

    def transform(z: Tensor) -> tuple[Tensor]:
        store.append(z)
        return (z,)

    return transform


class FP16Fix:
    """The teacher and the fix's loss terms for one run.

    Args:
        cfg: the ``[fp16_fix]`` section (enabled).
        student: the model to train, before any training step (the teacher is a frozen copy of it).
        encoder_trains: whether the student's encoder side has trainable parameters (then latents are matched).
    """

    def __init__(self, cfg: FP16FixConfig, student: Autoencoder, encoder_trains: bool) -> None:
        self.cfg, self.encoder_trains = cfg, encoder_trains
        # Outside the objective's prepared modules: never in a checkpoint, an export or a weights digest.
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)

    def to(self, device: torch.device) -> FP16Fix:
        self.teacher.to(device)
        return self

    def step(
        self, wrapped: nn.Module, model: nn.Module, x: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, object, dict[str, Tensor]]:
        """One forward of student and teacher on ``x`` with the same posterior noise.

        Args:
            wrapped: the (DDP-)wrapped student, which runs the forward.
            model: the unwrapped student, whose blocks are measured.
            x: the image batch.
            generator: the step's generator; the teacher draws the same noise from a copy of its state.

        Returns:
            (fix loss, the student's reconstruction, its regularization, detached logs).
        """
        teacher_gen = torch.Generator(generator.device)
        teacher_gen.set_state(generator.get_state())
        z_s: list[Tensor] = []
        z_t: list[Tensor] = []
        with activation_penalty(model, self.cfg.threshold) as pen:
            (recon,), reg = wrapped(
                x, sample_posterior=True, generator=generator, latent_transform=_capture(z_s)
            )
        with torch.no_grad():
            (target,), _ = self.teacher(
                x, sample_posterior=True, generator=teacher_gen, latent_transform=_capture(z_t)
            )
        out_mse = F.mse_loss(recon.float(), target.float())
        loss = self.cfg.output_weight * out_mse + self.cfg.penalty_weight * pen.penalty.to(out_mse.device)
        logs = {
            "fp16_fix/output_mse": out_mse.detach(),
            "fp16_fix/penalty": pen.penalty.detach(),
            "fp16_fix/max_activation": pen.max,
        }
        if self.encoder_trains:
            lat_mse = F.mse_loss(z_s[0].float(), z_t[0].float())
            loss = loss + self.cfg.latent_weight * lat_mse
            logs["fp16_fix/latent_mse"] = lat_mse.detach()
        return loss, recon, reg, logs
