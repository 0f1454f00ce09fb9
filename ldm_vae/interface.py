"""The contract every autoencoder of the package meets, so that losses, trainers and the CLI never ask which
kind of bottleneck they hold.

Every model is Encoder -> bottleneck -> Decoder (:mod:`ldm_vae.modules`); only the bottleneck differs. The
bottleneck's report for a batch (the KL posterior, the VQ quantizer's info) is a :class:`Regularization`: it
knows its own loss term, how the recipe it comes from reduces the reconstruction term, and what to log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

#: What a training forward decodes instead of z: one or more latents made from it (a transformed copy, a
#: downsampled one, a noisy one), each decoded in the same pass. See :meth:`Autoencoder.forward`.
LatentTransform = Callable[[Tensor], tuple[Tensor, ...]]


def decode_views(
    decode: Callable[[Tensor], Tensor], z: Tensor, latent_transform: LatentTransform | None
) -> Tensor | tuple[Tensor, ...]:
    """``decode(z)``, or with a transform the tuple of decodes of ``latent_transform(z)``, one per latent."""
    if latent_transform is None:
        return decode(z)
    return tuple(decode(view) for view in latent_transform(z))


@runtime_checkable
class Regularization(Protocol):
    """What a bottleneck reports for one batch."""

    #: Log key of the loss term and the selector of its weight in the loss config ("kl" or "codebook").
    name: str
    #: How its recipe reduces the per-pixel reconstruction term: LDM's KL models sum over (C, H, W) and average
    #: over the batch ("sum"); taming's VQ models average over every element ("mean").
    pixel_reduction: Literal["sum", "mean"]

    def regularization_loss(self) -> Tensor:
        """The unweighted scalar loss term (KL summed per image and averaged over the batch, or codebook)."""
        ...

    def logs(self) -> dict[str, Tensor]:
        """Detached scalars to log, the loss term under ``name`` included."""
        ...


@runtime_checkable
class Autoencoder(Protocol):
    """encode / decode / forward, the same for the KL, VQ and FLUX.2 models."""

    config: Any
    encoder: nn.Module
    decoder: nn.Module

    def encode_latents(
        self,
        x: Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tile_size: int | None = None,
        max_memory: int | Literal["auto"] | None = None,
    ) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the raw latents ``decode`` takes (B, decode_channels, H/f, W/f)."""
        ...

    def encode_moments(
        self, x: Tensor, tile_size: int | None = None, max_memory: int | Literal["auto"] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(E[z], E[z^2]) per element of the latents ``encode_latents(x, sample=True)`` draws."""
        ...

    def decode(
        self, z: Tensor, tile_size: int | None = None, max_memory: int | Literal["auto"] | None = None
    ) -> Tensor:
        """Raw latents -> images (B, C, H, W), float32."""
        ...

    def forward(
        self,
        x: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        latent_transform: LatentTransform | None = None,
    ) -> tuple[Tensor | tuple[Tensor, ...], Regularization]:
        """(reconstruction, the bottleneck's report); training samples a stochastic bottleneck.

        With ``latent_transform`` the reconstruction is the tuple of decodes of ``latent_transform(z)``: the
        latent regularizers' views (:mod:`ldm_vae.latent_regularizers`) go through one (DDP-wrapped) forward.
        """
        ...

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents -> diffusion-ready latents; (B, C, h, w) -> (B, C p^2, h/p, w/p) with p =
        ``config.latent_patch`` (1, except FLUX.2's 2x2 patches)."""
        ...

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion-ready latents -> raw latents."""
        ...

    def encoder_side(self) -> list[nn.Module]:
        """The modules that define the latent space (frozen by decoder-only fine-tuning)."""
        ...

    @property
    def decode_channels(self) -> int:
        """Channels of the latents ``decode`` takes."""
        ...

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight: the layer of the adaptive GAN weight (Esser et al., 2021, eq. 7)."""
        ...
