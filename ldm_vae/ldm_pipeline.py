"""A KL autoencoder (Kingma & Welling, 2014; Rombach et al., 2022) in the ``vqvae`` slot of diffusers'
unconditional ``LDMPipeline``, which that pipeline annotates as a ``VQModel``.

``LDMPipeline`` decodes ``vqvae.decode(latents / vqvae.config.scaling_factor).sample``; a diffusers
``AutoencoderKL`` does exactly what it needs there, but ``DiffusionPipeline.from_pretrained`` type-checks each
component against the pipeline's annotations and warns "Expected types for vqvae: VQModel, got
AutoencoderKL". :class:`KLAutoencoderForLDMPipeline` is that ``AutoencoderKL``'s modules (built by diffusers
itself, so the ``vqvae/`` folder is an ordinary ``AutoencoderKL`` folder: same config, same weight names) behind
the ``VQModel`` type: it subclasses ``VQModel`` for the type check only and never quantizes. A pipeline folder
names it as ``"vqvae": ["ldm_vae.ldm_pipeline", "KLAutoencoderForLDMPipeline"]`` in ``model_index.json``;
diffusers resolves it from the already imported package (``import ldm_vae`` imports this module; no code
travels with the weights, and without the import diffusers refuses the folder, naming the module).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ModelMixin, VQModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput

# model_index.json's entry for the vqvae slot.
VQVAE_ENTRY = ["ldm_vae.ldm_pipeline", "KLAutoencoderForLDMPipeline"]


class KLAutoencoderForLDMPipeline(VQModel):
    """diffusers' ``AutoencoderKL`` (same config keys and weights) typed as the ``VQModel`` LDMPipeline expects.

    ``encode`` returns the posterior mean (LDM's ``mode()``) as a ``VQModel`` returns its pre-quantization
    latents; ``decode`` takes unscaled latents and, unlike a ``VQModel``, never quantizes them.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ) -> None:
        ModelMixin.__init__(self)  # not VQModel's: its encoder, codebook and decoder are not this model's
        kl = AutoencoderKL(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )
        # The KL model's own modules under its own names, so its weight files load unchanged.
        self.encoder, self.decoder = kl.encoder, kl.decoder
        self.quant_conv, self.post_quant_conv = kl.quant_conv, kl.post_quant_conv

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images (B, 3, H, W) in [-1, 1] -> the posterior mean (B, C, H/f, W/f), unscaled."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean = moments.chunk(2, dim=1)[0]
        if not return_dict:
            return (mean,)
        from diffusers.models.autoencoders.vq_model import VQEncoderOutput

        return VQEncoderOutput(latents=mean)

    def decode(
        self,
        h: torch.Tensor,
        force_not_quantize: bool = True,
        return_dict: bool = True,
        shape: tuple[int, ...] | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Unscaled latents (B, C, h, w) -> images (B, 3, H, W), as ``AutoencoderKL.decode`` (never quantized:
        ``force_not_quantize`` and ``shape`` exist for ``VQModel``'s signature)."""
        z = self.post_quant_conv(h) if self.post_quant_conv is not None else h
        dec = self.decoder(z)
        commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)  # there is no codebook
        if not return_dict:
            return dec, commit_loss
        return DecoderOutput(sample=dec, commit_loss=commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruction through the posterior mean."""
        dec = self.decode(self.encode(sample, return_dict=False)[0]).sample
        return DecoderOutput(sample=dec) if return_dict else (dec,)
