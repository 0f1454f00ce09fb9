"""Frozen model configs. Field names are diffusers' config keys, so export is ``asdict()`` plus a class name.

The KL autoencoder is the first stage of Latent Diffusion (Rombach et al., 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G); the VQ variant follows VQGAN (Esser et al., 2021).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

# The level types of diffusers' Encoder/Decoder that ldm_vae builds: plain, or with self-attention after each
# resnet (LDM's attn_resolutions).
ENCODER_BLOCK = "DownEncoderBlock2D"
ATTN_ENCODER_BLOCK = "AttnDownEncoderBlock2D"
DECODER_BLOCK = "UpDecoderBlock2D"
ATTN_DECODER_BLOCK = "AttnUpDecoderBlock2D"
_BLOCK_TYPES = {
    "down_block_types": (ENCODER_BLOCK, ATTN_ENCODER_BLOCK),
    "up_block_types": (DECODER_BLOCK, ATTN_DECODER_BLOCK),
}


def attention_block_types(encoder_levels: tuple[bool, ...]) -> dict[str, tuple[str, ...]]:
    """``down_block_types`` / ``up_block_types`` with attention at the given encoder levels.

    LDM puts attention at the same resolutions in both networks; diffusers numbers decoder levels from the
    lowest resolution, so the decoder's types are the encoder's reversed.
    """
    down = tuple(ATTN_ENCODER_BLOCK if a else ENCODER_BLOCK for a in encoder_levels)
    up = tuple(ATTN_DECODER_BLOCK if a else DECODER_BLOCK for a in reversed(encoder_levels))
    return {"down_block_types": down, "up_block_types": up}


class _Levels:
    """What both autoencoder configs derive from their level widths and level types."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    norm_num_groups: int

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the config stays hashable and frozen.
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        n = len(self.block_out_channels)
        for key, (plain, attn) in _BLOCK_TYPES.items():
            types = tuple(str(t) for t in getattr(self, key)) or (plain,) * n  # () means all plain
            if any(t not in (plain, attn) for t in types):
                raise ValueError(f"unsupported {key} {list(types)}: ldm_vae builds {plain} and {attn} blocks")
            if len(types) != n:
                raise ValueError(f"{key} has {len(types)} entries for {n} block_out_channels levels")
            object.__setattr__(self, key, types)
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {c} is not divisible by norm_num_groups {self.norm_num_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along one edge (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_patch(self) -> int:
        """Latent pixels per edge that ``scale_latents`` packs into one diffusion-ready position (1: none)."""
        return 1

    @property
    def diffusion_downsample_factor(self) -> int:
        """Image pixels per diffusion-ready latent position along one edge: what images are padded to."""
        return self.downsample_factor * self.latent_patch

    @property
    def decoder_levels(self) -> _Levels:
        """The level widths and types the Decoder is built from (the encoder's, unless a config narrows it)."""
        return self


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
    # Encoder level types (DownEncoderBlock2D, or AttnDownEncoderBlock2D: attention after each resnet); () is
    # all plain. Decoder level types likewise, numbered from the lowest resolution as diffusers does.
    down_block_types: tuple[str, ...] = ()
    up_block_types: tuple[str, ...] = ()
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
        cfg = {"_class_name": "AutoencoderKL", **_lists(dataclasses.asdict(self))}
        cfg.update(act_fn="silu")
        return cfg


@dataclass(frozen=True)
class VQConfig(_Levels):
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level, as AutoencoderKLConfig
    down_block_types: tuple[str, ...] = ()  # encoder level types, as AutoencoderKLConfig (() is all plain)
    up_block_types: tuple[str, ...] = ()  # decoder level types, from the lowest resolution
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
    # LDM's VectorQuantizer2 index remapping (its ``remap``): the length of the ``used`` buffer that lists the
    # codebook rows in use; model indices are positions in it. None: indices are codebook rows.
    num_used_codes: int | None = None
    # The index of a code that is not in ``used``: "random" (uniform in [0, num_used_codes)), "extra"
    # (num_used_codes, an index of its own) or an int in [0, num_used_codes). Only with num_used_codes.
    unknown_index: str | int = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_used_codes is None:
            return
        u = self.num_used_codes
        if u < 1:
            raise ValueError(f"num_used_codes {u} must be at least 1")
        ok = self.unknown_index in ("random", "extra") or (
            type(self.unknown_index) is int and 0 <= self.unknown_index < u
        )
        if not ok:
            raise ValueError(
                f"unknown_index {self.unknown_index!r}: expected 'random', 'extra' or an int in [0, {u})"
            )

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` that ``diffusers.VQModel`` reads."""
        cfg = {"_class_name": "VQModel", **_lists(dataclasses.asdict(self))}
        # Training-only quantizer options mean nothing to diffusers (it would warn about them).
        for key in ("beta", "legacy", "ema_decay", "restart_dead_codes"):
            cfg.pop(key)
        if not self.l2_normalize:  # kept when set: a cosine codebook changes inference
            cfg.pop("l2_normalize")
        # Kept when set, for ldm_vae to read back; diffusers ignores them (and the used buffer) with a warning.
        if self.num_used_codes is None:
            cfg.pop("num_used_codes")
            cfg.pop("unknown_index")
        cfg.update(
            act_fn="silu",
            norm_type="group",
            lookup_from_codebook=False,
        )
        return cfg


@dataclass(frozen=True)
class AutoencoderKLFlux2Config(_Levels):
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder width per level, as AutoencoderKL
    # Decoder width per level, from the highest resolution like block_out_channels (FLUX.2's small decoder:
    # 96, 192, 384, 384); None means block_out_channels.
    decoder_block_out_channels: tuple[int, ...] | None = None
    down_block_types: tuple[str, ...] = ()  # encoder level types, as AutoencoderKLConfig (() is all plain)
    up_block_types: tuple[str, ...] = ()  # decoder level types, from the lowest resolution
    layers_per_block: int = 2  # resnets per encoder level (decoder levels get one more)
    latent_channels: int = 32  # channels of z
    norm_num_groups: int = 32  # GroupNorm groups everywhere (decoder widths included)
    use_quant_conv: bool = True  # 1x1 conv on the moments after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    mid_block_add_attention: bool = True  # single-head self-attention in both mid blocks
    # The latent BatchNorm over patch_size patches of z (latent_channels * 4 channels): its running statistics
    # normalize the diffusion-ready latents, (z_patch - running_mean) / sqrt(running_var + batch_norm_eps).
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1  # momentum of those running statistics where they are updated
    patch_size: tuple[int, int] = (2, 2)  # latent pixels per patch (rows, columns); square here
    force_upcast: bool = True  # a key of FLUX.2's config.json (not of diffusers' __init__); fp32 pipelines
    sample_size: int = 1024  # nominal training resolution (informational; diffusers' tiling uses it)

    def __post_init__(self) -> None:
        super().__post_init__()
        patch = tuple(int(p) for p in self.patch_size)
        if len(patch) != 2 or patch[0] != patch[1] or patch[0] < 1:
            raise ValueError(f"patch_size {list(patch)}: ldm_vae supports square patches, e.g. [2, 2]")
        object.__setattr__(self, "patch_size", patch)
        if self.decoder_block_out_channels is not None:
            widths = tuple(int(c) for c in self.decoder_block_out_channels)
            if len(widths) != len(self.block_out_channels):
                raise ValueError(
                    f"decoder_block_out_channels has {len(widths)} levels, block_out_channels "
                    f"{len(self.block_out_channels)}"
                )
            if any(c % self.norm_num_groups for c in widths):
                raise ValueError(
                    f"decoder_block_out_channels {list(widths)} are not all divisible by norm_num_groups "
                    f"{self.norm_num_groups}"
                )
            object.__setattr__(self, "decoder_block_out_channels", widths)

    @property
    def latent_patch(self) -> int:
        return self.patch_size[0]

    @property
    def decoder_levels(self) -> AutoencoderKLFlux2Config:
        if self.decoder_block_out_channels is None:
            return self
        return dataclasses.replace(
            self, block_out_channels=self.decoder_block_out_channels, decoder_block_out_channels=None
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` that ``diffusers.AutoencoderKLFlux2`` reads."""
        cfg = {"_class_name": "AutoencoderKLFlux2", **_lists(dataclasses.asdict(self))}
        cfg.update(act_fn="silu")
        return cfg


# Activations diffusers' get_activation builds (AutoencoderTiny's act_fn), and nn.Upsample's modes.
TINY_ACTIVATIONS = ("relu", "silu", "swish", "mish", "gelu")
TINY_UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")


@dataclass(frozen=True)
class AutoencoderTinyConfig:
    """TAESD's tiny autoencoder (diffusers' ``AutoencoderTiny``): plain conv + ReLU residual blocks, no norms.

    Its latents are the *diffusion-ready* latents of the VAE it was distilled from (for SD: raw latents times
    0.18215), so ``scaling_factor`` stays 1.0 and a pipeline's ``latents / scaling_factor`` hands them over as
    they are.
    """

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    # Encoder width per stage; stage i > 0 starts with a stride-2 conv. diffusers' blocks keep their input
    # width, so every stage has the same width.
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (
        64,
        64,
        64,
        64,
    )  # decoder width per stage, likewise uniform
    act_fn: str = "relu"  # activation inside the blocks (diffusers' get_activation names)
    upsample_fn: str = "nearest"  # nn.Upsample mode between decoder stages
    latent_channels: int = 4  # channels of the latents
    upsampling_scaling_factor: int = 2  # decoder upsampling per stage
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # residual blocks per encoder stage
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # residual blocks per decoder stage
    latent_magnitude: float = 3.0  # latents in [-m, m] map to [0, 1] for 8-bit storage (TAESD's convention)
    latent_shift: float = 0.5  # where latent 0 lands in that [0, 1] range
    force_upcast: bool = False  # diffusers' key: no fp32 upcast needed (no norms, small activations)
    scaling_factor: float = 1.0  # 1.0: the latents are already diffusion-ready (see the class docstring)
    shift_factor: float | None = 0.0  # 0.0 likewise; None (some configs) means 0

    def __post_init__(self) -> None:
        for key in ("encoder_block_out_channels", "decoder_block_out_channels"):
            object.__setattr__(self, key, tuple(int(c) for c in getattr(self, key)))
        for key in ("num_encoder_blocks", "num_decoder_blocks"):
            object.__setattr__(self, key, tuple(int(n) for n in getattr(self, key)))
        for side in ("encoder", "decoder"):
            widths, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if not widths or len(widths) != len(blocks):
                raise ValueError(
                    f"{side}_block_out_channels has {len(widths)} stages, num_{side}_blocks {len(blocks)}"
                )
            if len(set(widths)) != 1:
                # diffusers builds every block and stride/upsample conv at its own stage's width on the previous
                # stage's output, so mixed widths build but cannot run.
                raise ValueError(
                    f"{side}_block_out_channels {list(widths)} must all be equal (diffusers' layout)"
                )
            if min(blocks) < 0:
                raise ValueError(f"num_{side}_blocks {list(blocks)} must be non-negative")
        if self.act_fn not in TINY_ACTIVATIONS:
            raise ValueError(
                f"unsupported act_fn {self.act_fn!r}: choose one of {', '.join(TINY_ACTIVATIONS)}"
            )
        if self.upsample_fn not in TINY_UPSAMPLE_MODES:
            raise ValueError(
                f"unsupported upsample_fn {self.upsample_fn!r}: choose one of {', '.join(TINY_UPSAMPLE_MODES)}"
            )

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along one edge on the encoder side (8 for TAESD)."""
        return 2 ** (len(self.num_encoder_blocks) - 1)

    @property
    def upsample_factor(self) -> int:
        """Image pixels per latent pixel along one edge on the decoder side."""
        return self.upsampling_scaling_factor ** (len(self.num_decoder_blocks) - 1)

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` that ``diffusers.AutoencoderTiny`` reads. Without ``block_out_channels``: diffusers
        registers that copy of the decoder widths itself when it builds the model (and warns when a file has it)."""
        cfg = {"_class_name": "AutoencoderTiny", **_lists(dataclasses.asdict(self))}
        cfg["shift_factor"] = self.shift_factor or 0.0
        return cfg


def _lists(fields: dict[str, Any]) -> dict[str, Any]:
    """Tuple fields as JSON lists, as diffusers writes them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


ConfigT = TypeVar("ConfigT", AutoencoderKLConfig, VQConfig, AutoencoderKLFlux2Config, AutoencoderTinyConfig)


class ConfigKeyError(ValueError):
    """A config key or override the config class does not know; the message is one line naming it."""


# Keys of diffusers' AutoencoderKL / VQModel / AutoencoderKLFlux2 __init__ that are not our fields: the architecture choices checked
# below (we build one of each; the level types are fields, checked by the config), and keys with no effect here
# (lookup_from_codebook only changes what diffusers' decode() takes as input).
_DIFFUSERS_ONLY_KEYS: dict[type, tuple[str, ...]] = {
    AutoencoderKLConfig: ("act_fn", "latents_mean", "latents_std"),
    VQConfig: ("act_fn", "norm_type", "lookup_from_codebook"),
    AutoencoderKLFlux2Config: ("act_fn",),
    AutoencoderTinyConfig: ("block_out_channels",),  # diffusers' copy of decoder_block_out_channels
}


def build_model_config(
    cls: type[ConfigT], fields: dict[str, Any], overrides: dict[str, Any], source: str
) -> ConfigT:
    """Builds ``cls``: the one path for presets, diffusers folders and single files.

    Args:
        cls: ``AutoencoderKLConfig``, ``VQConfig`` or ``AutoencoderKLFlux2Config``.
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
    if "act_fn" not in names and fields.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported act_fn {fields['act_fn']!r}: ldm_vae uses silu")
    if fields.get("norm_type", "group") != "group":
        raise ValueError(
            f"unsupported norm_type {fields['norm_type']!r} (MoVQ spatial norm is not implemented)"
        )
    if fields.get("latents_mean") is not None or fields.get("latents_std") is not None:
        raise ValueError("per-channel latents_mean/latents_std configs are not supported")
    kwargs = {k: v for k, v in fields.items() if k in names}
    kwargs.update(overrides)
    _replain_levels(kwargs, overrides)
    return cls(**kwargs)


def _replain_levels(kwargs: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Drops all-plain level types that an override of ``block_out_channels`` changed the length of.

    Plain types follow the number of levels (``preset, block_out_channels=(8,)`` stays valid); types with
    attention do not, and then the config refuses the mismatch.
    """
    if "block_out_channels" not in overrides:
        return
    n = len(overrides["block_out_channels"])
    for key, (plain, _) in _BLOCK_TYPES.items():
        types = kwargs.get(key, ())
        if key not in overrides and len(types) != n and all(t == plain for t in types):
            kwargs.pop(key, None)


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
    # The KL first stages of the LDM model zoo (CompVis/latent-diffusion models/first_stage_models/*/config.yaml:
    # ch 128, num_res_blocks 2, resolution 256). Their latent scale belongs to each diffusion model's config, so
    # it is 1.0 here except for kl-f8, whose SD value is the one in common use.
    # models/first_stage_models/kl-f4/config.yaml: ch_mult 1,2,4, z_channels 3, attn_resolutions [].
    "kl-f4": AutoencoderKLConfig(
        block_out_channels=(128, 256, 512), latent_channels=3, scaling_factor=1.0, sample_size=256
    ),
    # models/first_stage_models/kl-f8/config.yaml: ch_mult 1,2,4,4, z_channels 4, attn_resolutions [].
    "kl-f8": AutoencoderKLConfig(sample_size=256),
    # models/first_stage_models/kl-f16/config.yaml: ch_mult 1,1,2,2,4, z_channels 16, attn_resolutions [16].
    "kl-f16": AutoencoderKLConfig(
        block_out_channels=(128, 128, 256, 256, 512),
        **attention_block_types((False, False, False, False, True)),
        latent_channels=16,
        scaling_factor=1.0,
        sample_size=256,
    ),
    # models/first_stage_models/kl-f32/config.yaml: ch_mult 1,1,2,2,4,4, z_channels 64, attn_resolutions
    # [16, 8].
    "kl-f32": AutoencoderKLConfig(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        **attention_block_types((False, False, False, False, True, True)),
        latent_channels=64,
        scaling_factor=1.0,
        sample_size=256,
    ),
}

VQ_PRESETS: dict[str, VQConfig] = {
    # The VQ first stages of the LDM model zoo (CompVis/latent-diffusion models/first_stage_models/*/config.yaml:
    # ch 128, num_res_blocks 2, resolution 256, z_channels = embed_dim).
    # models/first_stage_models/vq-f4/config.yaml: ch_mult 1,2,4, 8192 codes of dim 3, attn_resolutions [].
    "vq-f4": VQConfig(block_out_channels=(128, 256, 512), latent_channels=3, num_vq_embeddings=8192),
    # models/first_stage_models/vq-f4-noattn/config.yaml: as vq-f4 with attn_type none (no mid attention).
    "vq-f4-noattn": VQConfig(
        block_out_channels=(128, 256, 512),
        latent_channels=3,
        num_vq_embeddings=8192,
        mid_block_add_attention=False,
    ),
    # models/first_stage_models/vq-f8/config.yaml: ch_mult 1,2,2,4, 16384 codes of dim 4, attn_resolutions [32].
    "vq-f8": VQConfig(
        block_out_channels=(128, 256, 256, 512), **attention_block_types((False, False, False, True))
    ),
    # models/first_stage_models/vq-f8-n256/config.yaml: as vq-f8 with 256 codes.
    "vq-f8-n256": VQConfig(
        block_out_channels=(128, 256, 256, 512),
        **attention_block_types((False, False, False, True)),
        num_vq_embeddings=256,
    ),
    # models/first_stage_models/vq-f16/config.yaml: ch_mult 1,1,2,2,4, 16384 codes of dim 8, attn_resolutions
    # [16].
    "vq-f16": VQConfig(
        block_out_channels=(128, 128, 256, 256, 512),
        **attention_block_types((False, False, False, False, True)),
        latent_channels=8,
    ),
    # taming-transformers' ImageNet f16 VQGANs (configs/imagenet_vqgan.yaml: ch 128, ch_mult 1,1,2,2,4,
    # num_res_blocks 2, z_channels 256, 1024 codes of dim 256, attn_resolutions [16]); the 16384-code model's
    # config is the same with n_embed 16384.
    "vqgan-imagenet-f16-1024": VQConfig(
        block_out_channels=(128, 128, 256, 256, 512),
        **attention_block_types((False, False, False, False, True)),
        latent_channels=256,
        num_vq_embeddings=1024,
    ),
    "vqgan-imagenet-f16-16384": VQConfig(
        block_out_channels=(128, 128, 256, 256, 512),
        **attention_block_types((False, False, False, False, True)),
        latent_channels=256,
        num_vq_embeddings=16384,
    ),
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

FLUX2_PRESETS: dict[str, AutoencoderKLFlux2Config] = {
    # FLUX.2 [dev] and [klein] VAE: diffusers' AutoencoderKLFlux2 defaults, which are black-forest-labs/flux2
    # src/flux2/autoencoder.py's AutoEncoderParams (ch 128, ch_mult 1,2,4,4, num_res_blocks 2, z_channels 32,
    # BatchNorm eps 1e-4 over 2x2 patches) and the vae/config.json of the FLUX.2 [klein] repositories.
    "flux2": AutoencoderKLFlux2Config(),
    # black-forest-labs/FLUX.2-small-decoder config.json: the same encoder, a decoder of 3/4 the width.
    "flux2-small-decoder": AutoencoderKLFlux2Config(decoder_block_out_channels=(96, 192, 384, 384)),
}
