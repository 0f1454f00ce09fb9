"""Fixtures shared by the test files: tiny KL and VQ model folders (random init, seed 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm_vae import AutoencoderKL, VQAutoencoder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The ``tiny`` KL model (f = 2), random init with seed 0, as a diffusers folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    AutoencoderKL.from_pretrained("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    """The ``tiny`` VQ model (f = 2, 32 codes), random init with seed 0, as a diffusers folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny-vq"
    # Code dim 3 (not latent_channels 4) and scale 0.5 (exact in binary), so both are checked for real.
    VQAutoencoder.from_pretrained("tiny", vq_embed_dim=3, scaling_factor=0.5).save_pretrained(folder)
    return folder
