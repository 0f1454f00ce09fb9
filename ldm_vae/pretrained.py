"""``from_pretrained`` / ``save_pretrained`` / ``save_single_file`` shared by both autoencoders."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .config import build_model_config
from .io import write_json, write_safetensors
from .runtime import memory_format_for, resolve_dtype

# Shipped weights: <repo>/weights/ (editable install) or $LDM_VAE_WEIGHTS. weights/demo is the demo's
# latent-diffusion pipeline folder; its vqvae/ is the demo autoencoder. weights/digits is the digits pipeline.
WEIGHTS_DIR = Path(os.environ.get("LDM_VAE_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
DEMO_PIPELINE = "demo"
DIGITS_PIPELINE = (
    "digits"  # the digits DDPM on the same autoencoder (its vqvae/ a copy with the digits' scale)
)
SHIPPED = {"demo": f"{DEMO_PIPELINE}/vqvae"}


class PretrainedMixin:
    """Weights in and out. Subclasses set the class attributes and have ``config`` and ``__init__(config)``."""

    config_class: ClassVar[type]
    memory_format: torch.memory_format = torch.contiguous_format  # layout inputs are converted to
    presets: ClassVar[dict[str, Any]]
    diffusers_class_name: ClassVar[str]
    training_only_prefixes: ClassVar[tuple[str, ...]] = ()  # state never exported (e.g. EMA codebook stats)
    # Exported, but a file may lack them (they keep their init): state that converters of official weights drop.
    optional_on_load: ClassVar[tuple[str, ...]] = ()
    # Names of single files (checkpoint.LAYOUTS): "ldm" (LDM / SD / taming) or "bfl" (black-forest-labs' FLUX.2).
    single_file_layout: ClassVar[str] = "ldm"

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device = "cpu",
        config: Any = None,
        variant: str | None = None,
        **overrides: Any,
    ) -> Any:
        """Builds a model from a preset name, a diffusers folder, or an original LDM/SD single file.

        Args:
            src: preset name (random init; ``demo`` is the shipped model), a diffusers model folder (or a
                pipeline folder with ``vae/``), or a ``.safetensors``/``.ckpt``/``.pt``/``.bin`` file with
                diffusers or original LDM names, optionally under ``first_stage_model.``/``vae.``.
            dtype: ``auto``, ``fp32``, ``bf16``, ``fp16`` or a torch dtype.
            device: where the weights go.
            config: for single files, a config (dataclass, dict, config.json path or folder) that replaces
                the one inferred from tensor shapes.
            variant: diffusers weight variant, e.g. ``fp16`` for ``diffusion_pytorch_model.fp16.safetensors``.
            **overrides: config fields to change, e.g. ``scaling_factor=0.13025``.

        Raises:
            CheckpointError: unreadable source, or weights that do not fit (names the keys).
            ConfigKeyError: an override, or a key of the config, that the config class does not know.
        """
        name = str(src)
        if name in SHIPPED and not Path(name).exists():
            folder = WEIGHTS_DIR / SHIPPED[name]
            if not (folder / ckpt.CONFIG_NAME).is_file():
                raise ckpt.CheckpointError(
                    f"shipped weights {name!r} not found at {folder} (set LDM_VAE_WEIGHTS to the weights folder)"
                )
            src = folder
        elif name in cls.presets and not Path(name).exists():
            preset = dataclasses.asdict(cls.presets[name])
            model = cls(build_model_config(cls.config_class, preset, overrides, f"preset {name!r}"))
            return model.to_runtime(dtype, device)

        path = ckpt.resolve_source(src)
        if path.is_dir():
            raw_cfg = ckpt.read_config(path)
            expected = cls.diffusers_class_name
            if raw_cfg.get("_class_name", expected) != expected:
                raise ckpt.CheckpointError(f"{path}: holds a {raw_cfg['_class_name']}, not a {expected}")
            # Built before the weights are read, so a bad config fails fast.
            model = cls(build_model_config(cls.config_class, raw_cfg, overrides, str(path)))
            state_dict = ckpt.read_diffusers_weights(path, variant)
            ckpt.check_and_load(
                model, state_dict, str(path), optional=cls.training_only_prefixes + cls.optional_on_load
            )
            model._check_loaded(str(path))
        elif path.is_file() or path.suffix:
            model = cls._from_single_file(path, config, overrides)
        else:
            known = ", ".join([*cls.presets, *SHIPPED])
            raise ckpt.CheckpointError(f"{src}: not a file, a folder, or a preset ({known})")
        return model.to_runtime(dtype, device)

    @classmethod
    def _from_single_file(cls, path: Path, config: Any, overrides: dict[str, Any]) -> Any:
        full = ckpt.read_state_dict(path)
        state_dict, prefix = ckpt.strip_prefix(full)
        if not ckpt.is_ldm_layout(state_dict):
            if not any(k.startswith("encoder.down_blocks.") for k in state_dict):
                raise ckpt.CheckpointError(
                    f"{path}: no autoencoder tensors found (neither LDM nor diffusers names)"
                )
            # A diffusers-named single file: go through LDM names so one shape-inference path serves both.
            n = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down_blocks."))
            state_dict = ckpt.to_ldm(state_dict, n, cls.single_file_layout)
        held = ckpt.single_file_class(state_dict)  # a codebook, a latent BatchNorm, or neither
        if held != cls.diffusers_class_name:
            raise ckpt.CheckpointError(f"{path}: holds a {held}, not a {cls.diffusers_class_name}")
        fields = {**cls._default_fields_for(full, prefix), **cls._infer_fields(state_dict)}
        if config is not None:
            fields.update(_config_fields(config))
        model = cls(build_model_config(cls.config_class, fields, overrides, str(path)))
        levels = len(model.config.block_out_channels)
        converted = ckpt.from_ldm(state_dict, list(model.state_dict()), levels, cls.single_file_layout)
        ckpt.check_and_load(
            model, converted, str(path), optional=cls.training_only_prefixes + cls.optional_on_load
        )
        model._check_loaded(str(path))
        return model

    def _check_loaded(self, source: str) -> None:
        """Checks loaded values that shapes cannot (e.g. a VQ remap's codebook rows); raises CheckpointError."""

    @classmethod
    def _infer_fields(cls, state_dict: dict[str, Tensor]) -> dict[str, Any]:
        """Config fields read off the tensor shapes of a state dict in :attr:`single_file_layout`."""
        return ckpt.infer_config_fields(state_dict, cls.single_file_layout)

    @classmethod
    def _default_fields_for(cls, full: dict[str, Tensor], prefix: str) -> dict[str, Any]:
        """Config fields that shapes cannot tell, guessed from the surrounding checkpoint."""
        return {}

    @classmethod
    def _config_with(cls, config: Any, overrides: dict[str, Any]) -> Any:
        """``config`` (default: the config class's defaults) with constructor ``overrides``, through the one
        builder, so an unknown field is a one-line ConfigKeyError as for every other source."""
        base = config or cls.config_class()
        if not overrides:
            return base
        return build_model_config(type(base), dataclasses.asdict(base), overrides, cls.__name__)

    # ------------------------------------------------------------------------------------- runtime

    def to_runtime(self, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu") -> Any:
        """Moves to ``device`` and ``dtype`` (``auto`` picks bf16 where native), in eval mode.

        Reduced precision on CPU also switches to channels_last, which oneDNN's bf16 convolutions want.
        """
        assert isinstance(self, nn.Module)
        torch_dtype = resolve_dtype(dtype, device)
        self.memory_format = memory_format_for(torch_dtype, device)
        self.to(device=device, dtype=torch_dtype, memory_format=self.memory_format)
        return self.eval()

    def compile_(
        self,
        backend: str = "inductor",
        mode: str | None = None,
        fullgraph: bool = True,
        dynamic: bool | None = None,
        options: dict[str, Any] | None = None,
    ) -> Any:
        """Compiles the encoder and the decoder in place with ``torch.compile``; returns the model.

        Each network is compiled whole (one graph per input shape, no graph breaks with ``fullgraph``) through
        ``nn.Module.compile``, so ``state_dict()`` keys and saved files are unchanged. Exact tiled runs
        (``tile_size``/``max_memory``) call the networks' units one by one on crops of varying shapes; those stay
        eager (a run whose one tile is the whole input is compiled). quant_conv, the bottleneck and
        post_quant_conv stay eager too. The arguments are ``torch.compile``'s.
        """
        assert isinstance(self, nn.Module)
        for net in (self.encoder, self.decoder):  # type: ignore[attr-defined]
            net.compile(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic, options=options)
        return self

    def _to_model(self, x: Tensor) -> Tensor:
        """Casts an input to the model's dtype; only the fast path changes its memory layout (the reference
        path leaves it, as diffusers does, so layouts and therefore rounding match)."""
        x = x.to(self.dtype)
        if self.memory_format == torch.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype  # type: ignore[attr-defined]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------------- saving

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """Writes the diffusers layout (``config.json`` + safetensors) that ``diffusers.*.from_pretrained`` reads."""
        folder = Path(folder)
        state_dict = self._export_state_dict(dtype)
        write_safetensors(state_dict, folder / ckpt.WEIGHTS_NAME)
        write_json(self.config.to_diffusers(), folder / ckpt.CONFIG_NAME)  # type: ignore[attr-defined]
        return folder

    def save_single_file(
        self, path: str | os.PathLike, dtype: str | torch.dtype | None = None, prefix: str = ""
    ) -> Path:
        """Writes original LDM key names to a ``.safetensors`` file (``prefix`` e.g. ``first_stage_model.``).

        The tensors are :meth:`single_file_state_dict`'s: what the original modules load with ``strict=True``.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: single files are written as .safetensors only")
        write_safetensors(self.single_file_state_dict(dtype, prefix), path)
        return path

    def single_file_state_dict(
        self, dtype: str | torch.dtype | None = None, prefix: str = ""
    ) -> dict[str, Tensor]:
        """The state dict under original LDM / taming names in :attr:`single_file_layout` (attention weights as
        1x1 convs), training-only state left out; ``dtype`` casts floating tensors only."""
        levels = len(self.config.block_out_channels)  # type: ignore[attr-defined]
        ldm = ckpt.to_ldm(self._export_state_dict(dtype), levels, self.single_file_layout)
        return {prefix + k: v for k, v in ldm.items()}

    def _export_state_dict(self, dtype: str | torch.dtype | None) -> dict[str, Tensor]:
        state_dict = {
            k: v
            for k, v in self.state_dict().items()  # type: ignore[attr-defined]
            if not k.startswith(self.training_only_prefixes)
        }
        if dtype is not None:
            torch_dtype = resolve_dtype(dtype)
            # Floating tensors only: integer buffers (a VQ remap's code rows, a BatchNorm's num_batches_tracked)
            # keep their type.
            state_dict = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        return state_dict


def _config_fields(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)  # type: ignore[arg-type]
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    path = path / ckpt.CONFIG_NAME if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ckpt.CheckpointError(f"{path}: cannot read config ({e})") from None
