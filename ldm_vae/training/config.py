"""Training configs: TOML/YAML/JSON files mapped onto typed frozen dataclasses, plus ``--section.field value``
overrides parsed by each field's type.

A trainer declares its config as a dataclass whose fields are section dataclasses (``model``, ``loss``,
``data``, ...). Nothing is looked up by name or executed: a file can only set fields that exist, with values of
the declared type, and an unknown key is a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import yaml

from ..io import write_json

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclasses; the message is one line."""


# ------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Image-folder data (shared by the VAE and latent-diffusion trainers)."""

    train_dir: str = ""  # image folder, searched recursively (--data-dir)
    resolution: int = 256  # square random crops; smaller images get their short side resized up first
    flip: bool = True  # random horizontal flips
    batch_size: int = 4  # per process and per micro-step
    num_workers: int = 2  # DataLoader worker processes (0 loads in the training process)
    val_files: tuple[str, ...] = ()  # fixed validation images; else the first num_val of val_dir
    val_dir: str = (
        ""  # held-out folder; when val_files and val_dir are both empty, num_val train images are held out
    )
    num_val: int = 8  # validation images (0 disables image validation)

    def __post_init__(self) -> None:
        _require(self, resolution=self.resolution >= 8, batch_size=self.batch_size >= 1)
        _require(self, num_workers=self.num_workers >= 0, num_val=self.num_val >= 0)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule; the discriminator (if any) gets its own copy of both."""

    lr: float = 1e-4  # base learning rate
    scale_lr: bool = False  # LDM: lr *= batch_size * grad_accum * num_processes
    disc_lr: float | None = None  # discriminator learning rate (None: the autoencoder's, scaled alike)
    betas: tuple[float, float] = (0.5, 0.9)  # LDM/taming use (0.5, 0.9) for both networks
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"  # after the linear warmup
    warmup_steps: int = 0  # linear warmup from 0, in optimizer steps

    def __post_init__(self) -> None:
        _require(self, lr=self.lr > 0, disc_lr=self.disc_lr is None or self.disc_lr > 0)
        _require(self, warmup_steps=self.warmup_steps >= 0, weight_decay=self.weight_decay >= 0)


@dataclass(frozen=True)
class TrainConfig:
    """The training run: length, precision, checkpoints, logging."""

    output_dir: str = "runs/vae"  # run folder: checkpoints, metrics.jsonl, samples, tensorboard, export
    max_steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    # Accelerate autocast; "auto" is bf16 where the hardware runs it natively, else fp32 ("no")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False  # recompute encoder/decoder activations in the backward pass
    seed: int = 0
    ema_decay: float = 0.999  # EMA of the trained weights (0 disables); warms up as (1 + t) / (10 + t)
    export_ema: bool = True  # export the EMA weights (else the raw ones) at the end
    checkpoint_every: int = 500  # steps between checkpoints (a last one is always written at the end)
    keep_checkpoints: int = 3  # complete checkpoints kept on disk
    resume: str = ""  # "" (fresh run), "latest" (newest checkpoint in output_dir, if any) or a folder
    val_every: int = 500  # steps between validations (and at the end)
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard scalars
    tensorboard: bool = True  # log scalars and validation grids through Accelerate's TensorBoard tracker
    max_nonfinite: int = 5  # consecutive non-finite losses that stop the run

    def __post_init__(self) -> None:
        _require(self, max_steps=self.max_steps >= 1, grad_accum=self.grad_accum >= 1)
        _require(
            self, checkpoint_every=self.checkpoint_every >= 1, keep_checkpoints=self.keep_checkpoints >= 1
        )
        _require(self, val_every=self.val_every >= 0, log_every=self.log_every >= 1)
        _require(self, max_nonfinite=self.max_nonfinite >= 1, ema_decay=0 <= self.ema_decay < 1)


def _require(section: Any, **checks: bool) -> None:
    """Raises ValueError naming the first field whose check failed."""
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{type(section).__name__}.{name} = {getattr(section, name)!r} is out of range")


# ------------------------------------------------------------------------------------------- loading


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parses a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file into a dict of sections."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format (use .toml, .yaml, .yml or .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{path}: cannot parse ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def build_config(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Builds the dataclass ``cls`` from nested dicts, checking every key and value against the field types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])!r} (known: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], _join(where, k), from_cli=False) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def apply_overrides(cfg: T, overrides: Sequence[tuple[str, str]]) -> T:
    """Applies ``("section.field", "text")`` pairs to ``cfg``, parsing each text by the field's type.

    A ``dict`` field takes sub-keys (``model.overrides.latent_channels``), whose text is parsed as a YAML
    scalar or flow list (``8``, ``1e-6``, ``true``, ``[64, 128]``, ``64,128``).
    """
    data = to_dict(cfg)
    for key, text in overrides:
        _set_path(data, type(cfg), key.split("."), text, key)
    return build_config(type(cfg), data)


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[tuple[str, str]] = ()
) -> T:
    """``cls`` defaults, updated by the file at ``path`` (if any), then by command-line overrides."""
    cfg = build_config(cls, read_config_file(path)) if path else cls()
    return apply_overrides(cfg, overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) of a config dataclass: what the run folder records."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def write_config(cfg: Any, path: str | os.PathLike) -> None:
    """Records the resolved config as JSON (atomically); ``--config`` reads it back."""
    write_json(to_dict(cfg), path)


# ------------------------------------------------------------------------------------------- command line


# Shortcut flags every trainer takes; each adds the one for its data (--data-dir, --latent-dir).
RUN_ALIASES = {
    "--output-dir": "train.output_dir",
    "--max-steps": "train.max_steps",
    "--resume": "train.resume",
}


def parse_command_line(
    cls: type[T], argv: Sequence[str] | None = None, aliases: Mapping[str, str] | None = None, prog: str = ""
) -> T:
    """``--config FILE``, shortcut flags (``aliases``: flag -> ``section.field``) and ``--section.field value``.

    Raises:
        ConfigError: unknown key, unparsable value, or a flag without a value.
    """
    aliases = dict(aliases or {})
    parser = argparse.ArgumentParser(
        prog=prog or None,
        allow_abbrev=False,  # "--data" must not silently mean "--data-dir"
        description="Any config field can be set with --section.field value (e.g. --optim.lr 1e-4).",
    )
    parser.add_argument("--config", help="TOML, YAML or JSON config file")
    for flag, key in aliases.items():
        parser.add_argument(flag, dest=key, metavar="VALUE", help=f"same as --{key}")
    args, rest = parser.parse_known_args(argv)
    overrides = [(key, getattr(args, key)) for key in aliases.values() if getattr(args, key) is not None]
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}: overrides look like --section.field value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(f"--{key} needs a value")
            value, i = rest[i + 1], i + 1
        overrides.append((key, value))
        i += 1
    return load_config(cls, args.config, overrides)


# ------------------------------------------------------------------------------------------- internals


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _set_path(data: dict[str, Any], cls: Any, parts: list[str], text: str, full: str) -> None:
    name = parts[0]
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
        if name not in names:
            raise ConfigError(f"unknown config key {full!r} (known here: {', '.join(names)})")
        tp = typing.get_type_hints(cls)[name]
        if len(parts) == 1:
            if dataclasses.is_dataclass(tp) or _origin(tp) is dict:
                raise ConfigError(f"--{full} is a section; set its fields as --{full}.<field> value")
            data[name] = _coerce(text, tp, full, from_cli=True)
            return
        sub = data.setdefault(name, {})
        _set_path(sub, tp, parts[1:], text, full)
    elif _origin(cls) is dict and len(parts) == 1:
        data[name] = _yaml_scalar(text)
    else:
        raise ConfigError(f"unknown config key {full!r}")


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp) or (tp if isinstance(tp, type) else None)


def _yaml_scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and "," in value:  # "64,128" -> [64, 128]
        return [_yaml_scalar(p.strip()) for p in value.split(",")]
    return value


def _coerce(value: Any, tp: Any, where: str, from_cli: bool) -> Any:
    """Checks (file values) or parses (command-line text) ``value`` as type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build_config(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, where, from_cli)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        return _coerce_tuple(value, args, where, from_cli)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        return _coerce_bool(value, where, from_cli)
    if tp in (int, float):
        return _coerce_number(value, tp, where, from_cli)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # a programming error in the dataclasses


def _coerce_union(value: Any, args: tuple, where: str, from_cli: bool) -> Any:
    """``X | None`` and other unions: None when allowed, else the first option that takes the value."""
    if type(None) in args and (value is None or (from_cli and str(value).lower() in ("none", "null"))):
        return None
    errors = []
    for option in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, option, where, from_cli)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0])


def _coerce_tuple(value: Any, args: tuple, where: str, from_cli: bool) -> tuple:
    """``tuple[T, ...]`` or a fixed ``tuple[A, B]``; command-line text is a YAML flow list or ``a,b``."""
    items = value
    text_items = from_cli and isinstance(value, str)
    if text_items:
        items = [] if not value.strip() else _yaml_scalar(value)
        items = items if isinstance(items, list) else [items]
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where} must be a list, got {value!r}")
    item_types = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(item_types) != len(items):
        raise ConfigError(f"{where} must have {len(item_types)} items, got {len(items)}")
    return tuple(
        _coerce(str(v) if text_items else v, t, f"{where}[{i}]", text_items)
        for i, (v, t) in enumerate(zip(items, item_types, strict=True))
    )


def _coerce_bool(value: Any, where: str, from_cli: bool) -> bool:
    if from_cli and isinstance(value, str) and value.lower() in _BOOLS:
        return _BOOLS[value.lower()]
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where} must be true or false, got {value!r}")


def _coerce_number(value: Any, tp: type, where: str, from_cli: bool) -> int | float:
    """An int or float; a file's ``1.5`` is no integer, and ``true`` is no number."""
    wanted = "an integer" if tp is int else "a number"
    if from_cli and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where} must be {wanted}, got {value!r}") from None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (tp is int and isinstance(value, float))
    ):
        raise ConfigError(f"{where} must be {wanted}, got {value!r}")
    return tp(value)


_BOOLS = {
    "true": True,
    "false": False,
    "1": True,
    "0": False,
    "yes": True,
    "no": False,
    "on": True,
    "off": False,
}
