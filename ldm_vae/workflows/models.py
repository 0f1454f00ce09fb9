"""Loading, converting and describing an autoencoder, whichever kind the source holds."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..autoencoders import load_autoencoder
from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from ..images import padded_size
from ..interface import Autoencoder
from .base import WorkflowError, check_no_overwrite, files_of, one_line, output_dir


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device from its name, refused when unknown or when CUDA is asked for but absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise WorkflowError(f"unknown device {name!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WorkflowError(f"device {name!r} requested but CUDA is not available")
    return device


def load_model(
    src: str | os.PathLike, dtype: str = "auto", device: str | torch.device = "cpu", compile: bool = False
) -> Autoencoder:
    """The autoencoder ``src`` names (see :func:`~ldm_vae.autoencoders.load_autoencoder`), refused unless it
    takes and gives RGB images, as image files hold; ``compile`` compiles its encoder and decoder
    (``compile_()``: inductor, full graph)."""
    vae = load_autoencoder(src, dtype=dtype, device=resolve_device(device))
    if vae.config.in_channels != 3 or vae.config.out_channels != 3:
        raise WorkflowError(
            f"{src}: model takes {vae.config.in_channels}-channel and gives "
            f"{vae.config.out_channels}-channel images; image files are RGB"
        )
    if compile:
        vae.compile_()  # type: ignore[attr-defined]
    return vae


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, to: str, dtype: str = "fp32", config: Any = None
) -> None:
    """Writes ``src`` (anything ``from_pretrained`` reads) as a diffusers folder (``to="diffusers"``) or an LDM
    single ``.safetensors`` file (``to="ldm"``), never over a file of ``src``.

    Args:
        config: for a single-file ``src``, what its tensor shapes cannot tell (see ``from_pretrained``).
    """
    src, dst = Path(src), Path(dst)
    if to == "ldm":
        if dst.is_dir():
            raise WorkflowError(f"{dst}: is a directory")
        outputs = [dst]
    else:
        outputs = [output_dir(dst) / CONFIG_NAME, dst / WEIGHTS_NAME]
    if src.exists():
        check_no_overwrite(outputs, files_of(src))
    try:
        vae = load_autoencoder(src, dtype="fp32", config=config)
    except CheckpointError:
        raise
    except ValueError as e:  # a config built from shapes alone that the architecture rejects
        hint = "; pass --config with the model's config.json" if config is None and src.is_file() else ""
        raise WorkflowError(f"{src}: {one_line(e)}{hint}") from None
    if to == "ldm":
        vae.save_single_file(dst, dtype=dtype)
    else:
        vae.save_pretrained(dst, dtype=dtype)


def _count(*modules: torch.nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def describe_model(vae: Autoencoder, name: str, size: tuple[int, int] | None = None) -> list[str]:
    """The lines of ``ldm-vae info``: config, parameter counts, and the latent shape for a ``size`` image
    (default: the model's ``sample_size``)."""
    cfg = vae.config
    f = cfg.downsample_factor
    lines = [f"model: {name}"]
    lines += [f"  {field.name}: {getattr(cfg, field.name)}" for field in dataclasses.fields(cfg)]
    lines.append(f"  downsample_factor: {f}")
    # Both kinds are encoder -> [quant_conv] -> bottleneck -> [post_quant_conv] -> decoder.
    encoder = _count(vae.encoder, getattr(vae, "quant_conv", None))
    decoder = _count(getattr(vae, "post_quant_conv", None), vae.decoder)
    lines += ["parameters:", f"  encoder: {encoder:,} (with quant_conv)"]
    lines.append(f"  decoder: {decoder:,} (with post_quant_conv)")
    codebook = getattr(vae, "quantize", None)  # a VQ bottleneck: its codes are parameters too
    if codebook is not None:
        lines.append(f"  codebook: {_count(codebook):,} ({codebook.num_codes:,} codes of dim {codebook.dim})")
    lines.append(f"  total:   {_count(vae):,}")  # type: ignore[arg-type]
    h, w = size or (cfg.sample_size, cfg.sample_size)
    ph, pw = padded_size((h, w), f)
    padded = f" (image padded to {ph}x{pw})" if (ph, pw) != (h, w) else ""
    lines.append(f"latent shape for a {h}x{w} image: ({vae.decode_channels}, {ph // f}, {pw // f}){padded}")
    if codebook is not None:
        lines.append(f"code indices (encode --indices): ({ph // f}, {pw // f}), 0..{codebook.num_codes - 1}")
    p = cfg.latent_patch
    if p > 1:  # FLUX.2: scale_latents packs p x p latent patches into channels
        fp = cfg.diffusion_downsample_factor
        qh, qw = padded_size((h, w), fp)
        padded = f" (image padded to {qh}x{qw})" if (qh, qw) != (h, w) else ""
        shape = f"({vae.decode_channels * p * p}, {qh // fp}, {qw // fp})"
        lines.append(f"diffusion-ready shape (scale_latents, {p}x{p} patches): {shape}{padded}")
    return lines
