"""ldm_vae: latent-diffusion image autoencoders, exactly compatible with diffusers and LDM/SD checkpoints."""

# Imported so that with ldm_vae imported, diffusers finds the vqvae class the shipped pipelines name (it resolves
# a model_index.json library outside its own only from modules already imported).
from . import ldm_pipeline  # noqa: F401
from .autoencoder_kl import AutoencoderKL
from .autoencoder_kl_flux2 import AutoencoderKLFlux2
from .autoencoder_tiny import AutoencoderTiny
from .checkpoint import CheckpointError
from .config import (
    FLUX2_PRESETS,
    PRESETS,
    VQ_PRESETS,
    AutoencoderKLConfig,
    AutoencoderKLFlux2Config,
    AutoencoderTinyConfig,
    ConfigKeyError,
    VQConfig,
)
from .distributions import DiagonalGaussian
from .vq import VQAutoencoder, VQInfo

__all__ = [
    "FLUX2_PRESETS",
    "PRESETS",
    "VQ_PRESETS",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "AutoencoderKLFlux2",
    "AutoencoderKLFlux2Config",
    "AutoencoderTiny",
    "AutoencoderTinyConfig",
    "CheckpointError",
    "ConfigKeyError",
    "DiagonalGaussian",
    "VQAutoencoder",
    "VQConfig",
    "VQInfo",
]
__version__ = "0.1.0"
