"""Reading and writing autoencoder weights: diffusers folders and original LDM / Stable Diffusion single files.

Our modules carry diffusers' parameter names, so a diffusers folder loads with no renaming. Original LDM names
(``encoder.down.0.block.1.nin_shortcut``, ``decoder.up.3.upsample.conv``, ``mid.attn_1.q``,
``encoder.down.4.attn.1.proj_out``) live only in
``_LDM_RULES`` below. No file is ever unpickled with code execution: safetensors, or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .config import attention_block_types

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Prefixes of the autoencoder inside full LDM / SD checkpoints (and some community VAE files).
LDM_PREFIXES = ("first_stage_model.", "vae.")
# The codebook of a VQ autoencoder (taming's VectorQuantizer and VectorQuantizer2, diffusers' VQModel alike), and
# VectorQuantizer2's optional list of the codebook rows in use (its ``remap``).
CODEBOOK_KEY = "quantize.embedding.weight"
USED_KEY = "quantize.used"
# FLUX.2's BatchNorm over 2x2 latent patches; only its running statistics are used.
FLUX2_BN_KEY = "bn.running_mean"


class CheckpointError(ValueError):
    """A weights file or folder that cannot be read, or does not fit the model."""


# ------------------------------------------------------------------------------------------ reading


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads a safetensors or (weights-only) pickle file into a flat name -> tensor dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and loading them could run "
            f"code ({first}); convert it to .safetensors in a trusted environment"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from None
    # Lightning checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}.
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj


def read_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a diffusers model folder."""
    config_path = folder / CONFIG_NAME
    try:
        return json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read config ({e})") from None


def read_diffusers_weights(folder: Path, variant: str | None = None) -> dict[str, Tensor]:
    """The weights of a diffusers model folder: single safetensors, sharded index, or legacy ``.bin``."""
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    single, index, legacy = (
        folder / f"{stem}.safetensors",
        folder / f"{stem}.safetensors.index.json",
        folder / f"{stem}.bin",
    )
    if single.is_file():
        return read_state_dict(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: cannot read shard index ({e})") from None
        state_dict: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(read_state_dict(folder / shard))
        missing = set(weight_map) - set(state_dict)
        if missing:
            raise CheckpointError(
                f"{index}: {len(missing)} tensors listed but absent, e.g. {sorted(missing)[:3]}"
            )
        return state_dict
    if legacy.is_file():
        return read_state_dict(legacy)
    raise CheckpointError(f"{folder}: has {CONFIG_NAME} but no {single.name}, {index.name} or {legacy.name}")


# ------------------------------------------------------------------------------------ LDM <-> diffusers

# Single-file layouts: "ldm" for LDM, Stable Diffusion and taming files (quant convs at the top level), "bfl" for
# black-forest-labs' FLUX.2 ae.safetensors (LDM names, quant convs inside the encoder and decoder).
LAYOUTS = ("ldm", "bfl")
# Attention submodules: diffusers name -> LDM name (LDM's AttnBlock).
_LDM_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTN_PART = r"(group_norm|to_[qkv]|to_out\.0)"

# The one conversion table: diffusers name pattern -> LDM name, and the single-file layouts (``LAYOUTS``) the
# rule belongs to. ``n`` is the number of levels; LDM numbers decoder levels from the highest resolution,
# diffusers from the lowest.
_LDM_RULES: list[tuple[str, Callable[[re.Match, int], str], tuple[str, ...]]] = [
    (r"^(encoder|decoder)\.conv_norm_out\.", lambda m, n: f"{m[1]}.norm_out.", LAYOUTS),
    (
        r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.",
        lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.",
        LAYOUTS,
    ),
    (
        r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
        lambda m, n: f"encoder.down.{m[1]}.downsample.",
        LAYOUTS,
    ),
    (
        rf"^encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.{_ATTN_PART}\.",
        lambda m, n: f"encoder.down.{m[1]}.attn.{m[2]}.{_LDM_ATTN[m[3]]}.",
        LAYOUTS,
    ),
    (
        r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
        lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.",
        LAYOUTS,
    ),
    (
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.",
        LAYOUTS,
    ),
    (
        rf"^decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.{_ATTN_PART}\.",
        lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.attn.{m[2]}.{_LDM_ATTN[m[3]]}.",
        LAYOUTS,
    ),
    (r"\.mid_block\.resnets\.(\d+)\.", lambda m, n: f".mid.block_{int(m[1]) + 1}.", LAYOUTS),
    (r"\.mid_block\.attentions\.0\.group_norm\.", lambda m, n: ".mid.attn_1.norm.", LAYOUTS),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", lambda m, n: f".mid.attn_1.{m[1]}.", LAYOUTS),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", lambda m, n: ".mid.attn_1.proj_out.", LAYOUTS),
    (r"\.conv_shortcut\.", lambda m, n: ".nin_shortcut.", LAYOUTS),
    # black-forest-labs' FLUX.2 Encoder and Decoder own the quant convs (its Encoder.forward ends with
    # quant_conv, Decoder.forward starts with post_quant_conv: the same computation as diffusers' top-level ones).
    (r"^quant_conv\.", lambda m, n: "encoder.quant_conv.", ("bfl",)),
    (r"^post_quant_conv\.", lambda m, n: "decoder.post_quant_conv.", ("bfl",)),
]
# LDM's attention projections are 1x1 convs; diffusers' are Linear layers.
_LDM_CONV1X1 = re.compile(
    r"\.(mid\.attn_1|down\.\d+\.attn\.\d+|up\.\d+\.attn\.\d+)\.(q|k|v|proj_out)\.weight$"
)


def diffusers_to_ldm_key(key: str, num_levels: int, layout: str = "ldm") -> str:
    """A diffusers name in a single-file ``layout`` (one of :data:`LAYOUTS`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"single-file layout {layout!r}: not one of {', '.join(LAYOUTS)}")
    for pattern, repl, layouts in _LDM_RULES:
        if layout in layouts:
            key = re.sub(pattern, lambda m, r=repl: r(m, num_levels), key)
    return key


def to_ldm(state_dict: dict[str, Tensor], num_levels: int, layout: str = "ldm") -> dict[str, Tensor]:
    """diffusers names -> original LDM names in ``layout`` (attention weights become 1x1 convs)."""
    out = {}
    for key, value in state_dict.items():
        new = diffusers_to_ldm_key(key, num_levels, layout)
        out[new] = value[:, :, None, None] if _LDM_CONV1X1.search(new) and value.ndim == 2 else value
    return out


def from_ldm(
    ldm: dict[str, Tensor], diffusers_keys: list[str], num_levels: int, layout: str = "ldm"
) -> dict[str, Tensor]:
    """Original LDM names in ``layout`` -> diffusers names, for the keys a model of known config expects.

    LDM keys no model key maps to are kept under their own name, so strict loading reports them.
    """
    names = {diffusers_to_ldm_key(k, num_levels, layout): k for k in diffusers_keys}
    out = {}
    for key, value in ldm.items():
        if _LDM_CONV1X1.search(key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[names.get(key, key)] = value
    return out


def is_ldm_layout(state_dict: dict[str, Tensor]) -> bool:
    return any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in state_dict)


def strip_prefix(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Takes the autoencoder out of a full LDM/SD checkpoint (UNet, text encoder, ... are dropped).

    Training checkpoints of LDM and taming also hold their loss (``loss.discriminator.*``, LPIPS,
    ``loss.logvar``); those are not part of the autoencoder and are dropped too.
    """
    found = ""
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            found = prefix
            break
    return {k: v for k, v in state_dict.items() if not k.startswith("loss.")}, found


def infer_config_fields(state_dict: dict[str, Tensor], layout: str = "ldm") -> dict[str, Any]:
    """Config fields read off tensor shapes of an autoencoder state dict in LDM ``layout``.

    GroupNorm group counts and the latent scale cannot be read off shapes; callers override them. Attention
    levels are those holding ``attn.0`` tensors (LDM's ``attn_resolutions``), read for encoder and decoder
    separately.
    """

    def shape(key: str) -> tuple[int, ...]:
        return _shape(state_dict, key)

    levels = sorted(
        {int(m[1]) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.block\.0\.", k))}
    )
    if not levels:
        raise CheckpointError("cannot infer the architecture: no encoder.down.* tensors")
    blocks = {int(m[1]) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    fields: dict[str, Any] = {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "block_out_channels": tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels),
        "layers_per_block": len(blocks),
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state_dict,
        "down_block_types": attention_block_types(
            tuple(f"encoder.down.{i}.attn.0.q.weight" in state_dict for i in levels)
        )["down_block_types"],
        # LDM's decoder.up.i is at encoder level i's resolution, diffusers' up_blocks[n - 1 - i].
        "up_block_types": attention_block_types(
            tuple(f"decoder.up.{i}.attn.0.q.weight" in state_dict for i in levels)
        )["up_block_types"],
    }
    if CODEBOOK_KEY in state_dict:
        n_codes, dim = shape(CODEBOOK_KEY)
        fields.update(
            num_vq_embeddings=n_codes, vq_embed_dim=dim, latent_channels=shape("encoder.conv_out.weight")[0]
        )
        if USED_KEY in state_dict:  # VectorQuantizer2's remap; a non-1-D tensor is a shape mismatch on load
            fields["num_used_codes"] = shape(USED_KEY)[0]
    else:
        n = len(levels)  # the quant convs' names in this layout, from the one table
        fields.update(
            use_quant_conv=diffusers_to_ldm_key("quant_conv.weight", n, layout) in state_dict,
            use_post_quant_conv=diffusers_to_ldm_key("post_quant_conv.weight", n, layout) in state_dict,
        )
    return fields


def _shape(state_dict: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"cannot infer the architecture: no tensor {key!r} in the checkpoint")
    return tuple(state_dict[key].shape)


def infer_flux2_fields(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """:func:`infer_config_fields` of an ``AutoencoderKLFlux2`` in black-forest-labs' layout (``"bfl"``: LDM
    names, the quant convs inside encoder and decoder, ``bn.*``), plus its decoder widths and latent patch size.
    """
    fields = infer_config_fields(state_dict, "bfl")
    levels = range(len(fields["block_out_channels"]))
    # LDM's decoder.up.i works at encoder level i's resolution, as decoder_block_out_channels[i] does.
    decoder = tuple(_shape(state_dict, f"decoder.up.{i}.block.0.conv1.weight")[0] for i in levels)
    if decoder != fields["block_out_channels"]:
        fields["decoder_block_out_channels"] = decoder
    per_channel = _shape(state_dict, FLUX2_BN_KEY)[0] / fields["latent_channels"]
    patch = math.isqrt(int(per_channel))
    if patch * patch != per_channel:
        raise CheckpointError(
            f"bn.running_mean has {int(per_channel * fields['latent_channels'])} entries: not "
            f"{fields['latent_channels']} latent channels times a square patch"
        )
    fields["patch_size"] = (patch, patch)
    return fields


# Tensors that name the autoencoder class a single file holds, in this order: a codebook, or FLUX.2's latent
# BatchNorm (diffusers' and black-forest-labs' name alike). Anything else is an AutoencoderKL.
_CLASS_KEYS = ((CODEBOOK_KEY, "VQModel"), (FLUX2_BN_KEY, "AutoencoderKLFlux2"))


def single_file_class(keys: Iterable[str]) -> str:
    """The diffusers class name of the autoencoder behind a single file's keys, bare or under any prefix:
    ``VQModel`` (a codebook), ``AutoencoderKLFlux2`` (a latent BatchNorm) or ``AutoencoderKL``. The one test of
    a file's kind."""
    keys = list(keys)
    for key, name in _CLASS_KEYS:
        if any(k == key or k.endswith("." + key) for k in keys):
            return name
    return "AutoencoderKL"


# ------------------------------------------------------------------------------------------ loading


def check_and_load(
    model: nn.Module, state_dict: dict[str, Tensor], source: str, optional: tuple[str, ...] = ()
) -> None:
    """Loads ``state_dict`` into ``model`` strictly, naming what does not fit.

    Keys starting with an ``optional`` prefix (training-only state) may be absent and keep their init.

    Raises:
        CheckpointError: on any missing key, unexpected key or shape mismatch (first few of each, and counts).
    """
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state_dict) if not k.startswith(optional))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if state_dict[k].shape != own[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
            problems.append(f"{len(items)} {label} ({shown})")
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({len(own)} tensors): " + "; ".join(problems))
    with torch.no_grad():
        for k, v in own.items():
            if k in state_dict:
                v.copy_(state_dict[k])


def resolve_source(src: str | os.PathLike) -> Path:
    """A path for ``src``; a pipeline folder resolves to its ``vae/`` (or ``vqvae/``) subfolder."""
    path = Path(src).expanduser()
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        for sub in ("vae", "vqvae"):
            if (path / sub / CONFIG_NAME).is_file():
                return path / sub
        raise CheckpointError(f"{path}: a folder without {CONFIG_NAME} (nor vae/{CONFIG_NAME})")
    return path
