"""KL-regularized autoencoder of Latent Diffusion (Rombach et al., 2022, Sec. 3.1; the SD "AutoencoderKL").

x (B, 3, H, W) in [-1, 1] -> q(z|x) = N(mu, sigma^2) with z (B, latent_channels, H/f, W/f) -> x_hat.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .checkpoint import LDM_PREFIXES
from .checks import check_input, check_shape
from .config import PRESETS, AutoencoderKLConfig
from .distributions import DiagonalGaussian
from .interface import LatentTransform, decode_views
from .modules import Decoder, Encoder
from .pretrained import PretrainedMixin
from .tiling import MaxMemory, tiled_forward


class AutoencoderKL(PretrainedMixin, nn.Module):
    """The SD/LDM KL autoencoder; ``state_dict()`` is diffusers' ``AutoencoderKL`` state dict."""

    config_class: ClassVar[type] = AutoencoderKLConfig
    presets: ClassVar[dict[str, Any]] = PRESETS
    diffusers_class_name: ClassVar[str] = "AutoencoderKL"

    def __init__(self, config: AutoencoderKLConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = self._config_with(config, overrides)
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config.in_channels, 2 * z, config)  # -> moments (mean, logvar)
        self.decoder = Decoder(z, config.out_channels, config.decoder_levels)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if config.use_post_quant_conv else None

    # ------------------------------------------------------------------------------------- model

    def encode(
        self, x: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None
    ) -> DiagonalGaussian:
        """Images (B, C, H, W) in [-1, 1], any float dtype -> posterior over (B, latent_channels, H/f, W/f).

        Args:
            x: images.
            tile_size: tile edge in image pixels for the exact tiled encoder, or None for one pass.
            max_memory: byte budget for the tiled run's activations (picks tile_size when it is None).
        """
        check_input(x, self.config.in_channels, "images")
        return self._encode(x, tile_size, max_memory)

    def _encode(
        self, x: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None
    ) -> DiagonalGaussian:
        # encode without the NaN/Inf check (a host sync): the training forward's path.
        x = self._to_model(x)
        h = tiled_forward(self.encoder, x, tile_size, 1, max_memory)  # (B, 2z, h, w)
        moments = self.quant_conv(h) if self.quant_conv is not None else h
        return DiagonalGaussian(moments.float())

    def decode(self, z: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None) -> Tensor:
        """Raw latents (B, latent_channels, h, w) -> images (B, C, h*f, w*f), float32.

        In fp16 a decode that overflows is redone once in fp32 (and the model stays fp32), as diffusers'
        ``force_upcast`` would have done up front.
        """
        check_input(z, self.config.latent_channels, "latents")
        out = self._decode(z, tile_size, max_memory)
        if self.dtype == torch.float16 and not torch.isfinite(out).all():
            warnings.warn(
                "fp16 decode overflowed; upcasting the VAE to fp32 and decoding again", stacklevel=2
            )
            self.to(torch.float32, memory_format=torch.contiguous_format)
            out = self._decode(z, tile_size, max_memory)
        return out

    def encode_latents(
        self,
        x: Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tile_size: int | None = None,
        max_memory: MaxMemory = None,
    ) -> Tensor:
        """Images -> raw latents (B, latent_channels, H/f, W/f): a posterior sample, or its mode."""
        posterior = self.encode(x, tile_size, max_memory)
        return posterior.sample(generator) if sample else posterior.mode()

    def encode_moments(
        self, x: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None
    ) -> tuple[Tensor, Tensor]:
        """(E[z], E[z^2]) per element of the posterior samples ``encode_latents(x, sample=True)`` draws:
        (mean, mean^2 + var), for latent statistics in closed form."""
        posterior = self.encode(x, tile_size, max_memory)
        return posterior.mean, posterior.mean.square() + posterior.var

    def _decode(self, z: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None) -> Tensor:
        # decode without the NaN/Inf check and the fp16 retry (host syncs): the training forward's path.
        z = self._to_model(z)
        z = self.post_quant_conv(z) if self.post_quant_conv is not None else z
        return tiled_forward(self.decoder, z, tile_size, self.config.downsample_factor, max_memory).float()

    def forward(
        self,
        x: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        latent_transform: LatentTransform | None = None,
    ) -> tuple[Tensor | tuple[Tensor, ...], DiagonalGaussian]:
        """Reconstruction and posterior; z is sampled (training) or the posterior mean.

        The training path: it checks the input's shape but reads nothing back from the device (no NaN/Inf
        check, no fp16 retry; ``encode``/``decode`` have both), so a step never waits on a host sync. With
        ``latent_transform``, the decodes of the latents it makes from z (a tuple), drawn after the posterior
        sample from the same generator if it draws at all.
        """
        check_shape(x, self.config.in_channels, "images")
        posterior = self._encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return decode_views(self._decode, z, latent_transform), posterior

    def encoder_side(self) -> list[nn.Module]:
        """Encoder and quant_conv: what decoder-only fine-tuning freezes."""
        return [m for m in (self.encoder, self.quant_conv) if m is not None]

    @property
    def decode_channels(self) -> int:
        return self.config.latent_channels

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------------------------- latents

    @property
    def _shift(self) -> float:
        return self.config.shift_factor or 0.0

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents -> diffusion-ready latents: (z - shift_factor) * scaling_factor."""
        return (z - self._shift) * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion-ready latents -> raw latents: z / scaling_factor + shift_factor."""
        return z / self.config.scaling_factor + self._shift

    @classmethod
    def _default_fields_for(cls, full: dict[str, Tensor], prefix: str) -> dict[str, Any]:
        # SDXL checkpoints carry a second text encoder under conditioner.embedders.1; same VAE shapes as SD.
        if prefix in LDM_PREFIXES and any(k.startswith("conditioner.embedders.1.") for k in full):
            return dataclasses.asdict(PRESETS["sdxl"])
        return {}
