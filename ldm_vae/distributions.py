"""Diagonal Gaussian posterior q(z|x) of the KL autoencoder (Kingma & Welling, 2014; LDM App. G).

``kl()`` is KL(q || N(0, I)) = 1/2 * sum(mu^2 + sigma^2 - 1 - log sigma^2), summed over C, H, W as in LDM.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element, from the encoder's (B, 2C, h, w) moments.

    It is the KL model's :class:`~ldm_vae.interface.Regularization`: LDM's recipe weights ``kl()`` and sums the
    reconstruction term over pixels.
    """

    name: ClassVar[str] = "kl"
    pixel_reduction: ClassVar[Literal["sum", "mean"]] = "sum"

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        # Same clamp as LDM and diffusers: keeps exp() finite for untrained or diverging encoders.
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterized sample mean + std * eps (differentiable in mean and logvar)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per batch element, shape (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))

    def nll(self, sample: Tensor) -> Tensor:
        """-log q(sample) per batch element, shape (B,)."""
        log_2pi = 1.8378770664093453
        return 0.5 * torch.sum(log_2pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=(1, 2, 3))

    def regularization_loss(self) -> Tensor:
        """KL summed over C, H, W and averaged over the batch, as LDM's loss takes it."""
        return self.kl().sum() / self.mean.shape[0]

    def logs(self) -> dict[str, Tensor]:
        return {"kl": self.regularization_loss().detach().float()}
