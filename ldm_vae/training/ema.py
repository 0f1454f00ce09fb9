"""Exponential moving average of a model's weights (Polyak averaging), on diffusers' ``EMAModel``.

The decay warms up as min(decay, (1 + t) / (10 + t)) over optimizer steps t, so early averages are not
dominated by the initial weights. This wrapper adds parameter names, so the averages are saved as safetensors
and load by name rather than by position in a pickle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from torch import Tensor, nn

from ..checkpoint import CheckpointError


class ModelEMA:
    """EMA of every parameter of ``model`` (frozen ones are copied, as diffusers does)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.names = [name for name, _ in model.named_parameters()]
        self.ema = EMAModel(model.parameters(), decay=decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights (call after each optimizer step)."""
        self.ema.step(model.parameters())

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily loads the averaged weights into ``model`` (for validation or export)."""
        self.ema.store(model.parameters())
        self.ema.copy_to(model.parameters())
        try:
            yield model
        finally:
            self.ema.restore(model.parameters())

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(name -> averaged tensor, JSON-able scalars such as the step count)."""
        scalars = dict(self.ema.state_dict())
        shadow = scalars.pop("shadow_params")
        return dict(zip(self.names, shadow, strict=True)), scalars

    def load(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing or len(tensors) != len(self.names):
            raise CheckpointError(
                f"EMA state does not fit the model ({len(missing)} missing, e.g. {missing[:2]})"
            )
        device = self.ema.shadow_params[0].device if self.ema.shadow_params else "cpu"
        self.ema.load_state_dict({**scalars, "shadow_params": [tensors[n].to(device) for n in self.names]})
