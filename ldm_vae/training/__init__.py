"""Training: one runner (:mod:`.runner`) and its objectives (:mod:`.train_vae`, the autoencoder;
:mod:`.train_ldm`, the latent DDPM), on shared pieces: typed configs with command-line overrides, image-folder
data, EMA, atomic checkpoints, loop state, metrics logging. ``scripts/train_*.py`` are thin entry points."""

from ..seeds import mix_seed
from .checkpointing import CheckpointManager
from .config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    build_config,
    load_config,
    parse_command_line,
    read_config_file,
    to_dict,
    write_config,
)
from .data import (
    EpochSampler,
    ImageFolderDataset,
    list_images,
    load_validation_images,
    validation_files,
)
from .ema import ModelEMA
from .loop import NonFiniteLossError, TrainProgress, after_step, due, nonfinite_anywhere
from .optim import build_optimizer, build_scheduler, learning_rates
from .tracking import MetricsLog, read_metrics, tensorboard_tracker

__all__ = [
    "CheckpointManager",
    "ConfigError",
    "DataConfig",
    "EpochSampler",
    "ImageFolderDataset",
    "MetricsLog",
    "ModelEMA",
    "NonFiniteLossError",
    "OptimConfig",
    "TrainConfig",
    "TrainProgress",
    "after_step",
    "apply_overrides",
    "build_config",
    "build_optimizer",
    "build_scheduler",
    "due",
    "learning_rates",
    "list_images",
    "load_config",
    "load_validation_images",
    "mix_seed",
    "nonfinite_anywhere",
    "parse_command_line",
    "read_config_file",
    "read_metrics",
    "tensorboard_tracker",
    "to_dict",
    "validation_files",
    "write_config",
]
