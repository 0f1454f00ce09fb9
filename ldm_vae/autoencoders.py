"""Every autoencoder class of the package behind one loader, for callers that take whatever a user names
(the CLI, the trainers' ``model.kind``): the class is read off the source, never switched on by the caller."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from . import checkpoint as ckpt
from .autoencoder_kl import AutoencoderKL
from .autoencoder_kl_flux2 import AutoencoderKLFlux2
from .interface import Autoencoder
from .pretrained import SHIPPED, WEIGHTS_DIR
from .vq import VQAutoencoder

#: Model classes by the short name training configs use (``model.kind``).
AUTOENCODERS: dict[str, type] = {"kl": AutoencoderKL, "vq": VQAutoencoder, "flux2": AutoencoderKLFlux2}
_BY_DIFFUSERS_NAME = {cls.diffusers_class_name: cls for cls in AUTOENCODERS.values()}


def autoencoder_class(src: str | os.PathLike) -> type:
    """The class that loads ``src``: a preset's (KL presets first), a diffusers folder's ``_class_name``, or, for
    a single file, the class its tensors name (a codebook: VQ; a latent BatchNorm: FLUX.2; else KL).

    Raises:
        CheckpointError: a folder of a class this package does not implement, or an unreadable source.
    """
    name = str(src)
    if not Path(name).exists():
        if name in SHIPPED:
            src = WEIGHTS_DIR / SHIPPED[name]
        else:
            for cls in AUTOENCODERS.values():
                if name in cls.presets:
                    return cls
    path = ckpt.resolve_source(src)
    if path.is_dir():
        class_name = ckpt.read_config(path).get("_class_name", AutoencoderKL.diffusers_class_name)
        if class_name not in _BY_DIFFUSERS_NAME:
            known = ", ".join(_BY_DIFFUSERS_NAME)
            raise ckpt.CheckpointError(f"{path}: holds a {class_name}; ldm_vae loads {known}")
        return _BY_DIFFUSERS_NAME[class_name]
    return _BY_DIFFUSERS_NAME[ckpt.single_file_class(_keys(path))]


def _keys(path: Path) -> list[str]:
    """A single file's tensor names; none when it cannot be read (``from_pretrained`` then names the problem)."""
    if path.suffix == ".safetensors":
        try:  # the header only: no tensor is read
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError):
            return []
    return list(ckpt.read_state_dict(path)) if path.is_file() else []


def load_autoencoder(
    src: str | os.PathLike,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> Autoencoder:
    """``from_pretrained`` of whichever class ``src`` holds (see :func:`autoencoder_class`)."""
    return autoencoder_class(src).from_pretrained(src, dtype=dtype, device=device, **kwargs)
