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
