"""Exact tiled execution of the Encoder/Decoder (placeholder: filled in by the tiling work)."""

from __future__ import annotations

from torch import Tensor, nn


def run(net: nn.Module, x: Tensor, tile_size: int | None, pixels_per_input: float) -> Tensor:
    """Runs ``net`` on ``x`` in one pass, or exactly tiled with ``tile_size`` image pixels per tile edge."""
    if tile_size is None:
        return net(x)
    raise NotImplementedError("exact tiling is not implemented yet")
