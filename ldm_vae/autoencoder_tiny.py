"""Tiny preview autoencoder of TAESD (Ollin Boer Bohan, "Tiny AutoEncoder for Stable Diffusion", 2023; diffusers'
``AutoencoderTiny``), distilled from a full VAE: plain 3x3 conv + ReLU residual blocks, no normalization, no
attention.

Images (B, 3, H, W) in [-1, 1] <-> the full VAE's *diffusion-ready* latents (B, latent_channels, H/f, W/f),
i.e. what a pipeline's denoiser works on, so a pipeline's ``vae.decode(latents / vae.config.scaling_factor)``
with ``scaling_factor`` 1.0 hands the preview exactly its latents. The modules carry diffusers' parameter names
(``state_dict()`` equals diffusers' ``AutoencoderTiny``'s); the original ``taesd_encoder.pth`` /
``taesd_decoder.pth`` files (madebyollin/taesd: bare ``nn.Sequential`` indices) are read and written through the
one table :data:`TAESD_LAYOUT`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.models.activations import get_activation
from torch import Tensor, nn

from . import checkpoint as ckpt
from .checks import check_input, check_shape
from .config import AutoencoderTinyConfig, build_model_config
from .io import write_json, write_safetensors
from .pretrained import WEIGHTS_DIR
from .runtime import resolve_dtype

TINY_PRESETS: dict[str, AutoencoderTinyConfig] = {
    # TAESD / TAESDXL: 4 latent channels, f = 8, width 64 (about 2.4 M parameters in all).
    "taesd": AutoencoderTinyConfig(),
    # For tests: two stages (f = 2), width 8.
    "tiny": AutoencoderTinyConfig(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
    ),
}

#: Shipped previews, by name: folders under the weights directory (``weights/``, or ``$LDM_VAE_WEIGHTS``).
TINY_SHIPPED = {"demo-preview": "demo-preview"}  # distilled from the shipped demo VAE ("demo")

#: The original TAESD files, one per network: (diffusers prefix, original index - diffusers index). The original
#: decoder starts with a parameter-free Clamp module that diffusers does in ``forward``, so its indices are one
#: higher; the encoder's are the same.
TAESD_LAYOUT: dict[str, tuple[str, int]] = {
    "encoder": ("encoder.layers.", 0),
    "decoder": ("decoder.layers.", 1),
}

#: File names of the original layout in a folder: ``<name>_encoder.pth`` and ``<name>_decoder.pth`` (taesd, taesdxl,
#: taesd3, taef1, ...), or ``.safetensors``.
TAESD_SUFFIXES = (".pth", ".safetensors")


class TinyBlock(nn.Module):
    """conv-act-conv-act-conv plus a skip (1x1 conv when the width changes), then ReLU (diffusers'
    ``AutoencoderTinyBlock``; parameter names ``conv.{0,2,4}``, ``skip``)."""

    def __init__(self, in_channels: int, out_channels: int, act_fn: str) -> None:
        super().__init__()
        act = get_activation(act_fn)  # one module, reused in both places as diffusers does
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            act,
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            act,
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    """Images in [-1, 1] -> latents; ``layers`` is TAESD's encoder Sequential (diffusers' ``EncoderTiny``)."""

    def __init__(self, config: AutoencoderTinyConfig) -> None:
        super().__init__()
        width = config.encoder_block_out_channels[0]
        layers: list[nn.Module] = []
        for i, blocks in enumerate(config.num_encoder_blocks):
            if i == 0:
                layers.append(nn.Conv2d(config.in_channels, width, 3, padding=1))
            else:  # the downsample: a strided conv without bias
                layers.append(nn.Conv2d(width, width, 3, padding=1, stride=2, bias=False))
            layers += [TinyBlock(width, width, config.act_fn) for _ in range(blocks)]
        layers.append(nn.Conv2d(width, config.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.add(1).div(2))  # TAESD works on images in [0, 1]


class TinyDecoder(nn.Module):
    """Latents -> images in [-1, 1]; ``layers`` is TAESD's decoder Sequential without its leading Clamp
    (diffusers' ``DecoderTiny``)."""

    def __init__(self, config: AutoencoderTinyConfig) -> None:
        super().__init__()
        width = config.decoder_block_out_channels[0]
        layers: list[nn.Module] = [
            nn.Conv2d(config.latent_channels, width, 3, padding=1),
            get_activation(config.act_fn),
        ]
        last = len(config.num_decoder_blocks) - 1
        for i, blocks in enumerate(config.num_decoder_blocks):
            layers += [TinyBlock(width, width, config.act_fn) for _ in range(blocks)]
            if i < last:
                layers.append(
                    nn.Upsample(scale_factor=config.upsampling_scaling_factor, mode=config.upsample_fn)
                )
            out = config.out_channels if i == last else width
            layers.append(nn.Conv2d(width, out, 3, padding=1, bias=i == last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        z = torch.tanh(z / 3) * 3  # TAESD's soft clamp of the input latents to (-3, 3)
        return self.layers(z).mul(2).sub(1)  # [0, 1] -> [-1, 1]


class AutoencoderTiny(nn.Module):
    """TAESD-shaped preview autoencoder; ``state_dict()`` is diffusers' ``AutoencoderTiny`` state dict.

    Example:
        >>> tiny = AutoencoderTiny.from_pretrained("weights/demo-preview")
        >>> preview = tiny.decode(latents)  # the diffusion-ready latents the full VAE would decode
    """

    config_class: ClassVar[type] = AutoencoderTinyConfig
    presets: ClassVar[dict[str, AutoencoderTinyConfig]] = TINY_PRESETS
    diffusers_class_name: ClassVar[str] = "AutoencoderTiny"

    def __init__(self, config: AutoencoderTinyConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config or AutoencoderTinyConfig()
        if overrides:
            config = build_model_config(
                type(config), dataclasses.asdict(config), overrides, "AutoencoderTiny"
            )
        self.config = config
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)

    # ------------------------------------------------------------------------------------- model

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> diffusion-ready latents (B, latent_channels, H/f, W/f), float32."""
        check_input(x, self.config.in_channels, "images")
        return self.encoder(x.to(self.dtype)).float()

    def decode(self, z: Tensor) -> Tensor:
        """Diffusion-ready latents (B, latent_channels, h, w) -> images (B, C, h*f, w*f) in about [-1, 1],
        float32 (not clamped, as diffusers')."""
        check_input(z, self.config.latent_channels, "latents")
        return self.decoder(z.to(self.dtype)).float()

    def forward(self, x: Tensor, quantize: bool = True) -> Tensor:
        """Reconstruction, through latents rounded to 8 bits as diffusers' ``forward`` does (``quantize``)."""
        check_shape(x, self.config.in_channels, "images")
        z = self.encoder(x.to(self.dtype))
        if quantize:
            z = self.from_unit_range(self.to_unit_range(z).mul(255).round().div(255))
        return self.decoder(z).float()

    def to_unit_range(self, z: Tensor) -> Tensor:
        """Latents -> [0, 1] for 8-bit storage (diffusers' ``scale_latents``), clamped."""
        return z.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def from_unit_range(self, u: Tensor) -> Tensor:
        """[0, 1] -> latents (diffusers' ``unscale_latents``)."""
        return u.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_runtime(
        self, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu"
    ) -> AutoencoderTiny:
        """Moves to ``device`` and ``dtype`` (``auto``: bf16 where native), in eval mode."""
        return self.to(device=device, dtype=resolve_dtype(dtype, device)).eval()

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> AutoencoderTiny:
        """A shipped name (``demo-preview``), a preset name (random init), a diffusers ``AutoencoderTiny`` folder (or a pipeline folder whose
        ``vae/`` is one), a single diffusers-named file, or TAESD's own files: a folder holding
        ``*_encoder.pth`` and ``*_decoder.pth`` (or ``.safetensors``).

        Raises:
            CheckpointError: unreadable source or weights that do not fit (names missing, unexpected and
                mis-shaped keys).
            ConfigKeyError: an override or config key that AutoencoderTinyConfig does not know.
        """
        name = str(src)
        if name in TINY_SHIPPED and not Path(name).exists():
            src = WEIGHTS_DIR / TINY_SHIPPED[name]
            if not (src / ckpt.CONFIG_NAME).is_file():
                raise ckpt.CheckpointError(
                    f"shipped preview {name!r} not found at {src} (set LDM_VAE_WEIGHTS)"
                )
        elif name in cls.presets and not Path(name).exists():
            fields = dataclasses.asdict(cls.presets[name])
            return cls(
                build_model_config(cls.config_class, fields, overrides, f"preset {name!r}")
            ).to_runtime(dtype, device)
        path = Path(src).expanduser()
        pair = taesd_files(path) if path.is_dir() else None
        if pair is not None:
            return cls.from_taesd(*pair, dtype=dtype, device=device, **overrides)
        path = ckpt.resolve_source(path)
        if path.is_dir():
            raw = ckpt.read_config(path)
            if raw.get("_class_name", cls.diffusers_class_name) != cls.diffusers_class_name:
                raise ckpt.CheckpointError(f"{path}: holds a {raw['_class_name']}, not an AutoencoderTiny")
            model = cls(build_model_config(cls.config_class, raw, overrides, str(path)))
            ckpt.check_and_load(model, ckpt.read_diffusers_weights(path), str(path))
        elif path.is_file():
            state_dict = ckpt.read_state_dict(path)
            fields = {**infer_tiny_fields(state_dict, str(path)), **overrides}
            model = cls(build_model_config(cls.config_class, fields, {}, str(path)))
            ckpt.check_and_load(model, state_dict, str(path))
        else:
            raise ckpt.CheckpointError(f"{src}: not a file, a folder, or a preset ({', '.join(cls.presets)})")
        return model.to_runtime(dtype, device)

    @classmethod
    def from_taesd(
        cls,
        encoder: str | os.PathLike,
        decoder: str | os.PathLike,
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> AutoencoderTiny:
        """The original TAESD pair (``taesd_encoder.pth``, ``taesd_decoder.pth``; safetensors or weights-only
        pickles); the config is read off the tensor shapes, ``overrides`` set the rest (e.g. ``act_fn``)."""
        state_dict = from_taesd_layout(ckpt.read_state_dict(encoder), ckpt.read_state_dict(decoder))
        source = f"{encoder} + {decoder}"
        fields = {**infer_tiny_fields(state_dict, source), **overrides}
        model = cls(build_model_config(cls.config_class, fields, {}, source))
        ckpt.check_and_load(model, state_dict, source)
        return model.to_runtime(dtype, device)

    # ------------------------------------------------------------------------------------- saving

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """Writes the diffusers layout (``config.json`` + safetensors) that ``diffusers.AutoencoderTiny``
        loads; ``dtype`` casts the weights (e.g. ``fp16``)."""
        folder = Path(folder)
        write_safetensors(self._state_dict(dtype), folder / ckpt.WEIGHTS_NAME)
        write_json(self.config.to_diffusers(), folder / ckpt.CONFIG_NAME)
        return folder

    def save_taesd(
        self,
        folder: str | os.PathLike,
        name: str = "taesd",
        suffix: str = ".pth",
        dtype: str | torch.dtype | None = None,
    ) -> tuple[Path, Path]:
        """Writes ``<name>_encoder<suffix>`` and ``<name>_decoder<suffix>`` in the original layout, which
        madebyollin/taesd's ``TAESD(encoder_path=..., decoder_path=...)`` loads. ``.pth`` files are
        plain tensor dicts (``torch.load(weights_only=True)`` reads them)."""
        if suffix not in TAESD_SUFFIXES:
            raise ValueError(f"suffix {suffix!r}: TAESD files are {' or '.join(TAESD_SUFFIXES)}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        parts = to_taesd_layout(self._state_dict(dtype))
        paths = []
        for part in ("encoder", "decoder"):
            path = folder / f"{name}_{part}{suffix}"
            if suffix == ".safetensors":
                write_safetensors(parts[part], path)
            else:
                torch.save({k: v.detach().cpu().contiguous() for k, v in parts[part].items()}, path)
            paths.append(path)
        return paths[0], paths[1]

    def _state_dict(self, dtype: str | torch.dtype | None) -> dict[str, Tensor]:
        state_dict = self.state_dict()
        if dtype is None:
            return state_dict
        torch_dtype = resolve_dtype(dtype)
        return {k: v.to(torch_dtype) for k, v in state_dict.items()}


# ------------------------------------------------------------------------------------------ layouts


def taesd_files(folder: Path) -> tuple[Path, Path] | None:
    """(encoder, decoder) files of the original layout in ``folder`` (one pair), or None when it has none."""
    for suffix in TAESD_SUFFIXES:
        encoders = sorted(folder.glob(f"*_encoder{suffix}"))
        if encoders:
            if len(encoders) > 1:
                raise ckpt.CheckpointError(
                    f"{folder}: several TAESD encoders ({', '.join(p.name for p in encoders)})"
                )
            decoder = encoders[0].with_name(
                encoders[0].name.replace(f"_encoder{suffix}", f"_decoder{suffix}")
            )
            if not decoder.is_file():
                raise ckpt.CheckpointError(f"{folder}: {encoders[0].name} without {decoder.name}")
            return encoders[0], decoder
    return None


def from_taesd_layout(encoder: dict[str, Tensor], decoder: dict[str, Tensor]) -> dict[str, Tensor]:
    """The two original state dicts (Sequential indices) -> one diffusers-named state dict."""
    out: dict[str, Tensor] = {}
    for part, state_dict in (("encoder", encoder), ("decoder", decoder)):
        prefix, offset = TAESD_LAYOUT[part]
        for key, value in state_dict.items():
            index, _, rest = key.partition(".")
            # A key that is not "<index>.<name>" stays as it is, so strict loading names it as unexpected.
            out[f"{prefix}{int(index) - offset}.{rest}" if index.isdigit() else f"{part}:{key}"] = value
    return out


def to_taesd_layout(state_dict: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A diffusers-named state dict -> ``{"encoder": ..., "decoder": ...}`` in the original layout."""
    parts: dict[str, dict[str, Tensor]] = {"encoder": {}, "decoder": {}}
    for part, (prefix, offset) in TAESD_LAYOUT.items():
        for key, value in state_dict.items():
            if key.startswith(prefix):
                index, _, rest = key[len(prefix) :].partition(".")
                parts[part][f"{int(index) + offset}.{rest}"] = value
    return parts


_LAYER = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)")


def infer_tiny_fields(state_dict: dict[str, Tensor], source: str) -> dict[str, Any]:
    """Config fields read off a diffusers-named state dict: channels, widths and blocks per stage.

    A layer index holds either a block (``<i>.conv.0.weight``) or a plain conv (``<i>.weight``); the activation,
    upsampling and the Clamp hold no tensors. The encoder is conv, blocks, (strided conv, blocks)..., conv; the
    decoder conv, (blocks, conv)... with the last conv the only one with a bias.

    Raises:
        CheckpointError: no tiny-autoencoder tensors, or an order of layers TAESD does not have.
    """
    layers: dict[str, dict[int, str]] = {"encoder": {}, "decoder": {}}
    for key in state_dict:
        m = _LAYER.fullmatch(key)
        if m:
            kind = "block" if m.group(3).startswith("conv.") else "conv"
            layers[m.group(1)][int(m.group(2))] = kind
    if not layers["encoder"] or not layers["decoder"]:
        raise ckpt.CheckpointError(
            f"{source}: no AutoencoderTiny encoder.layers / decoder.layers tensors found"
        )

    def kinds(part: str) -> list[str]:
        found = [kind for _, kind in sorted(layers[part].items())]
        if found[0] != "conv" or found[-1] != "conv":
            raise ckpt.CheckpointError(f"{source}: the {part} does not start and end with a conv")
        return found

    # Encoder: each stage is a conv followed by its blocks; the last conv is the output projection.
    enc_stages: list[int] = []
    for kind in kinds("encoder")[:-1]:
        if kind == "conv":
            enc_stages.append(0)
        else:
            enc_stages[-1] += 1
    # Decoder: after the input conv, each stage is its blocks followed by a conv.
    dec_stages, count = [], 0
    for kind in kinds("decoder")[1:]:
        if kind == "block":
            count += 1
        else:
            dec_stages.append(count)
            count = 0
    enc_first, enc_last = (
        _weight(state_dict, "encoder", layers, 0),
        _weight(state_dict, "encoder", layers, -1),
    )
    dec_first, dec_last = (
        _weight(state_dict, "decoder", layers, 0),
        _weight(state_dict, "decoder", layers, -1),
    )
    return {
        "in_channels": enc_first.shape[1],
        "latent_channels": enc_last.shape[0],
        "encoder_block_out_channels": [enc_first.shape[0]] * len(enc_stages),
        "num_encoder_blocks": enc_stages,
        "out_channels": dec_last.shape[0],
        "decoder_block_out_channels": [dec_first.shape[0]] * len(dec_stages),
        "num_decoder_blocks": dec_stages,
    }


def _weight(state_dict: dict[str, Tensor], part: str, layers: dict[str, dict[int, str]], pos: int) -> Tensor:
    index = sorted(layers[part])[pos]
    return state_dict[f"{part}.layers.{index}.weight"]
