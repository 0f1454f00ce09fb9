"""ldm_vae: latent-diffusion image autoencoders, exactly compatible with diffusers and LDM/SD checkpoints."""

from .autoencoder_kl import AutoencoderKL
from .checkpoint import CheckpointError
from .config import PRESETS, VQ_PRESETS, AutoencoderKLConfig, ConfigKeyError, VQConfig
from .distributions import DiagonalGaussian
from .vq import VQAutoencoder, VQInfo

__all__ = [
    "PRESETS",
    "VQ_PRESETS",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CheckpointError",
    "ConfigKeyError",
    "DiagonalGaussian",
    "VQAutoencoder",
    "VQConfig",
    "VQInfo",
]
__version__ = "0.1.0"
