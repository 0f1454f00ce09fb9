"""Input checks shared by both autoencoders, so neither model module imports the other."""

from __future__ import annotations

import torch
from torch import Tensor


def check_shape(x: Tensor, channels: int, what: str) -> None:
    """Raises ValueError with one line when ``x`` is not (B, channels, H, W).

    Reads only the static shape, so it costs no device sync and traces under torch.compile.
    """
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")


def check_input(x: Tensor, channels: int, what: str) -> None:
    """Raises ValueError with one line when ``x`` is not (B, channels, H, W) or holds NaN/Inf.

    The NaN/Inf test reads a value back from the device (a host sync): the public ``encode``/``decode`` run
    it, the training ``forward`` does not.
    """
    check_shape(x, channels, what)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or Inf")


def is_integer(t: Tensor) -> bool:
    """Whether ``t`` holds integers (bool excluded): what code indices and codebook rows must be."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_indices(indices: Tensor, num_indices: int) -> None:
    """Raises ValueError with one line unless ``indices`` is an integer (B, h, w) tensor in [0, num_indices).

    Reads the extremes back from the device (a host sync), as ``check_input`` does.
    """
    if indices.ndim != 3 or not is_integer(indices):
        raise ValueError(
            f"code indices must be an integer tensor of shape (B, h, w), got {indices.dtype} {tuple(indices.shape)}"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_indices):
        raise ValueError(
            f"code indices must lie in [0, {num_indices}), got [{int(indices.min())}, {int(indices.max())}]"
        )
