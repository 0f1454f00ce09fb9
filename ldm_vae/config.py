"""Frozen model configs. Field names are diffusers' config keys, so export is ``asdict()`` plus a class name.

The KL autoencoder is the first stage of Latent Diffusion (Rombach et al., 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G); the VQ variant follows VQGAN (Esser et al., 2021).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

# diffusers needs these keys to rebuild the same Encoder/Decoder; we only build this one block type.
_ENCODER_BLOCK = "DownEncoderBlock2D"
_DECODER_BLOCK = "UpDecoderBlock2D"


class _Levels:
    """What both autoencoder configs derive from their level widths."""

    block_out_channels: tuple[int, ...]
    norm_num_groups: int

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the config stays hashable and frozen.
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {c} is not divisible by norm_num_groups {self.norm_num_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along one edge (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class AutoencoderKLConfig(_Levels):
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    block_out_channels: tuple[int, ...] = (
        128,
        256,
        512,
        512,
    )  # width per level; len-1 = number of 2x downsamples
    layers_per_block: int = 2  # resnets per encoder level (decoder levels get one more)
    latent_channels: int = 4  # channels of z
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    scaling_factor: float = 0.18215  # z_diffusion = (z - shift_factor) * scaling_factor (LDM's scale_by_std)
    shift_factor: float | None = None  # None means 0 (SD); Flux uses 0.1159
    use_quant_conv: bool = True  # 1x1 conv on the moments after the encoder (LDM's quant_conv)
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    mid_block_add_attention: bool = True  # single-head self-attention in both mid blocks
    force_upcast: bool = True  # diffusers pipelines run this VAE in fp32 when True (fp16 overflow risk)
    sample_size: int = 512  # nominal training resolution (informational; diffusers' tiling uses it)

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` that ``diffusers.AutoencoderKL`` reads."""
        n = len(self.block_out_channels)
        cfg = {"_class_name": "AutoencoderKL", **dataclasses.asdict(self)}
        cfg["block_out_channels"] = list(self.block_out_channels)
        cfg.update(down_block_types=[_ENCODER_BLOCK] * n, up_block_types=[_DECODER_BLOCK] * n, act_fn="silu")
        return cfg


@dataclass(frozen=True)
class VQConfig(_Levels):
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level, as AutoencoderKLConfig
    layers_per_block: int = 2  # resnets per encoder level
    latent_channels: int = 4  # encoder output channels (before quant_conv)
    norm_num_groups: int = 32  # GroupNorm groups
    num_vq_embeddings: int = 16384  # codebook size
    vq_embed_dim: int | None = None  # code dimension; None means latent_channels
    scaling_factor: float = 1.0  # diffusion-ready latents = z * scaling_factor (LDM VQ models use 1.0)
    mid_block_add_attention: bool = True  # self-attention in both mid blocks
    force_upcast: bool = False  # diffusers' key; VQ models are fp16-safe in practice
    sample_size: int = 256  # nominal training resolution
    # Quantizer options (not diffusers config keys; diffusers ignores extra keys on load).
    beta: float = 0.25  # commitment weight
    legacy: bool = False  # taming's historical beta placement (beta on the codebook term)
    l2_normalize: bool = False  # cosine-similarity codes (ViT-VQGAN)
    ema_decay: float | None = (
        None  # EMA codebook updates when set (e.g. 0.99); then the codebook gets no grads
    )
    restart_dead_codes: bool = False  # re-seed codes unused for a while from current encoder outputs

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` that ``diffusers.VQModel`` reads."""
        n = len(self.block_out_channels)
        cfg = {"_class_name": "VQModel", **dataclasses.asdict(self)}
        # Training-only quantizer options mean nothing to diffusers (it would warn about them).
        for key in ("beta", "legacy", "ema_decay", "restart_dead_codes"):
            cfg.pop(key)
        if not self.l2_normalize:  # kept when set: a cosine codebook changes inference
            cfg.pop("l2_normalize")
        cfg["block_out_channels"] = list(self.block_out_channels)
        cfg.update(
            down_block_types=[_ENCODER_BLOCK] * n,
            up_block_types=[_DECODER_BLOCK] * n,
            act_fn="silu",
            norm_type="group",
            lookup_from_codebook=False,
        )
        return cfg


ConfigT = TypeVar("ConfigT", AutoencoderKLConfig, VQConfig)


class ConfigKeyError(ValueError):
    """A config key or override the config class does not know; the message is one line naming it."""


# Keys of diffusers' AutoencoderKL / VQModel __init__ that are not our fields: the architecture choices checked
# below (we build one of each), and keys with no effect here (lookup_from_codebook only changes what diffusers'
# decode() takes as input).
_DIFFUSERS_ONLY_KEYS: dict[type, tuple[str, ...]] = {
    AutoencoderKLConfig: ("down_block_types", "up_block_types", "act_fn", "latents_mean", "latents_std"),
    VQConfig: ("down_block_types", "up_block_types", "act_fn", "norm_type", "lookup_from_codebook"),
}


def build_model_config(
    cls: type[ConfigT], fields: dict[str, Any], overrides: dict[str, Any], source: str
) -> ConfigT:
    """Builds ``cls``: the one path for presets, diffusers folders and single files.

    Args:
        cls: ``AutoencoderKLConfig`` or ``VQConfig``.
        fields: a diffusers ``config.json`` dict, a preset's fields, or fields read off tensor shapes. Keys may
            be fields of ``cls``, diffusers' own keys for the class (architecture checks, refused when they ask
            for blocks we do not build), or ``_``-prefixed metadata (``_class_name``, ``_diffusers_version``).
        overrides: fields of ``cls`` to change, applied last.
        source: what is being loaded (a path, ``preset 'sd'``), first in error messages.

    Raises:
        ConfigKeyError: a key that is none of the above, or an override that is not a field.
        ValueError: an architecture ldm_vae does not implement, or an invalid field value.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    extra = _DIFFUSERS_ONLY_KEYS[cls]
    _refuse_unknown(cls, source, [k for k in overrides if k not in names], names)
    unknown = [k for k in fields if k not in names and k not in extra and not k.startswith("_")]
    _refuse_unknown(cls, source, unknown, names, extra)
    n = len(fields.get("block_out_channels", cls.block_out_channels))
    for key, want in (("down_block_types", _ENCODER_BLOCK), ("up_block_types", _DECODER_BLOCK)):
        got = fields.get(key)
        if got is not None and (len(got) != n or any(t != want for t in got)):
            raise ValueError(f"unsupported {key} {got}: ldm_vae builds only {want} blocks")
    if fields.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported act_fn {fields['act_fn']!r}: ldm_vae uses silu")
    if fields.get("norm_type", "group") != "group":
        raise ValueError(
            f"unsupported norm_type {fields['norm_type']!r} (MoVQ spatial norm is not implemented)"
        )
    if fields.get("latents_mean") is not None or fields.get("latents_std") is not None:
        raise ValueError("per-channel latents_mean/latents_std configs are not supported")
    kwargs = {k: v for k, v in fields.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)


def _refuse_unknown(
    cls: type, source: str, unknown: list[str], names: list[str], extra: tuple[str, ...] = ()
) -> None:
    if not unknown:
        return
    keys = ", ".join(repr(k) for k in unknown)
    also = f"; a config.json may also hold {', '.join(extra)} and _-prefixed metadata" if extra else ""
    raise ConfigKeyError(
        f"{source}: unknown config key{'s' if len(unknown) > 1 else ''} {keys} for {cls.__name__} "
        f"(valid: {', '.join(names)}{also})"
    )


PRESETS: dict[str, AutoencoderKLConfig] = {
    # Stable Diffusion 1.x / 2.x VAE (kl-f8).
    "sd": AutoencoderKLConfig(),
    # SDXL VAE: same architecture, its own latent scale; trained at 1024.
    "sdxl": AutoencoderKLConfig(scaling_factor=0.13025, sample_size=1024),
    # Flux VAE: 16 latent channels, no 1x1 quant convs, shifted latents.
    "flux": AutoencoderKLConfig(
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=1024,
    ),
    # For tests: two levels (f=2), a few channels.
    "tiny": AutoencoderKLConfig(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=1.0, sample_size=32
    ),
}

VQ_PRESETS: dict[str, VQConfig] = {
    # VQ-f8 of Latent Diffusion (vq-f8: 16384 codes of dim 4).
    "vq-f8": VQConfig(),
    # For tests: two levels (f=2), 32 codes.
    "tiny": VQConfig(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        num_vq_embeddings=32,
        latent_channels=4,
        sample_size=32,
    ),
}
