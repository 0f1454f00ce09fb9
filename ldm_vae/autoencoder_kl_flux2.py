"""FLUX.2's autoencoder (Black Forest Labs, 2025; diffusers' ``AutoencoderKLFlux2``).

It is the KL autoencoder of Latent Diffusion (Rombach et al., 2022, Sec. 3.1) with 32 latent channels, an
optional narrower decoder (``decoder_block_out_channels``), and a BatchNorm (Ioffe and Szegedy, 2015) over 2x2
patches of the latents whose running statistics turn raw latents into the transformer's inputs:

    z (B, 32, H/8, W/8) -> patches (B, 128, H/16, W/16) -> (z_p - running_mean) / sqrt(running_var + eps)

That is what diffusers' FLUX.2 pipelines do (``Flux2Pipeline._patchify_latents`` and the ``vae.bn`` lines of
``_encode_vae_image``; the inverse before ``vae.decode``). The BatchNorm only holds statistics: no forward
runs it, here as in diffusers.

Single files are black-forest-labs' own ``ae.safetensors`` layout (their ``src/flux2/autoencoder.py``): LDM
names with the quant convs inside the encoder and decoder (``checkpoint.LAYOUTS``, ``"bfl"``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from . import checkpoint as ckpt
from .autoencoder_kl import AutoencoderKL
from .checks import check_shape
from .config import FLUX2_PRESETS, AutoencoderKLFlux2Config


class AutoencoderKLFlux2(AutoencoderKL):
    """FLUX.2's KL autoencoder; ``state_dict()`` is diffusers' ``AutoencoderKLFlux2`` state dict.

    Encoding, decoding, tiling and ``forward`` are AutoencoderKL's; what differs is the decoder's widths, the
    latent BatchNorm ``bn`` and the latent scaling that uses it.
    """

    config_class: ClassVar[type] = AutoencoderKLFlux2Config
    presets: ClassVar[dict[str, Any]] = FLUX2_PRESETS
    diffusers_class_name: ClassVar[str] = "AutoencoderKLFlux2"
    # Single files are black-forest-labs' ae.safetensors: LDM names, the quant convs inside encoder and decoder.
    single_file_layout: ClassVar[str] = "bfl"
    # diffusers' scripts/convert_flux2_to_diffusers.py skips the BatchNorm's step counter, so folders made by it
    # lack it; nothing reads it (the statistics are used, never updated).
    optional_on_load: ClassVar[tuple[str, ...]] = ("bn.num_batches_tracked",)

    def __init__(self, config: AutoencoderKLFlux2Config | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c = self.config
        # Registered last, as diffusers does: state_dict() ends with bn.running_mean, running_var and
        # num_batches_tracked.
        self.bn = nn.BatchNorm2d(
            c.latent_patch**2 * c.latent_channels,
            eps=c.batch_norm_eps,
            momentum=c.batch_norm_momentum,
            affine=False,
            track_running_stats=True,
        )

    def to_runtime(self, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu") -> Any:
        """As AutoencoderKL's, but the BatchNorm statistics stay fp32: latents are fp32 whatever the model's
        dtype, and bf16 statistics would move each normalized latent by up to 0.4% of its std for no speed."""
        stats = [
            b.float() for b in (self.bn.running_mean, self.bn.running_var)
        ]  # before the cast rounds them
        super().to_runtime(dtype, device)
        self.bn.float()
        with torch.no_grad():
            for buffer, value in zip((self.bn.running_mean, self.bn.running_var), stats, strict=True):
                buffer.copy_(value)
        return self

    # ------------------------------------------------------------------------------------- latents

    def patchify(self, z: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C*p*p, h/p, w/p), channel c*p*p + i*p + j holding pixel (i, j) of each patch
        (the FLUX.2 pipelines' ``_patchify_latents``)."""
        p = self.config.latent_patch
        check_shape(z, self.config.latent_channels, "latents")
        if z.shape[2] % p or z.shape[3] % p:
            f = self.config.diffusion_downsample_factor
            raise ValueError(
                f"latents of {z.shape[2]}x{z.shape[3]} do not split into {p}x{p} patches "
                f"(FLUX.2 images must be multiples of {f})"
            )
        return rearrange(z, "b c (h i) (w j) -> b (c i j) h w", i=p, j=p)

    def unpatchify(self, z: Tensor) -> Tensor:
        """The inverse of :meth:`patchify` (the pipelines' ``_unpatchify_latents``)."""
        p = self.config.latent_patch
        check_shape(z, self.bn.num_features, "diffusion-ready latents")
        return rearrange(z, "b (c i j) h w -> b c (h i) (w j)", i=p, j=p)

    def latent_normalization(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of each patch channel, (1, C*p*p, 1, 1) in ``like``'s dtype and device: the running mean
        and sqrt(running_var + eps), computed in the statistics' dtype as the pipelines do."""
        mean = self.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents (B, C, h, w) -> diffusion-ready (B, C*p*p, h/p, w/p): patches normalized per channel."""
        z = self.patchify(z)
        mean, std = self.latent_normalization(z)
        return (z - mean) / std

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion-ready latents (B, C*p*p, h, w) -> raw latents (B, C, h*p, w*p)."""
        check_shape(z, self.bn.num_features, "diffusion-ready latents")
        mean, std = self.latent_normalization(z)
        return self.unpatchify(z * std + mean)

    # ------------------------------------------------------------------------------------- I/O

    @classmethod
    def _infer_fields(cls, state_dict: dict[str, Tensor]) -> dict[str, Any]:
        return ckpt.infer_flux2_fields(state_dict)

    @classmethod
    def _default_fields_for(cls, full: dict[str, Tensor], prefix: str) -> dict[str, Any]:
        return {}  # no SDXL guess: every field that matters is in the shapes or FLUX.2's defaults
