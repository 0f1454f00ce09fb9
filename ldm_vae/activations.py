"""Per-block activation magnitudes of an autoencoder, for fp16 safety.

fp16's largest finite value is 65504; an activation above it becomes inf and the decode NaN/Inf. This is why the
SDXL VAE needs fp32 and why its fp16 fix (Ollin Boer Bohan's "sdxl-vae-fp16-fix", 2023) fine-tuned the
network to keep its outputs while scaling its internal activations down. This module measures the
largest |activation| of each named block with forward hooks (:func:`record_maxima`), and collects a
differentiable penalty on activations above a threshold for that fine-tune (:func:`activation_penalty`).

A block is a resnet, an attention, a down/upsampler, or a top-level layer of the encoder/decoder (``conv_in``,
``conv_norm_out``, ``conv_out``) or of the model (``quant_conv``, ``post_quant_conv``). Each block's maximum
covers its output and the outputs of the convolutions, linears and norms inside it: in an attention,
``to_v``'s output can overflow while the block's output (a residual sum) does not. Hooks only see modules
that are called, so values inside fused kernels (attention logits inside ``scaled_dot_product_attention``) are
not measured.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .modules import Attention, Downsample, GroupNorm, ResnetBlock, Upsample

FP16_MAX = 65504.0  # torch.finfo(torch.float16).max
BLOCK_TYPES = (ResnetBlock, Attention, Downsample, Upsample)  # measured as one block with their insides
LEAF_TYPES = (nn.Conv2d, nn.Linear, GroupNorm)  # inside a block, or a block of their own at the top level


def activation_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Block name -> the modules whose outputs count for it (the block first), in execution-ish order."""
    blocks: dict[str, list[nn.Module]] = {}
    for name, m in model.named_modules():
        owner = next((b for b in blocks if name.startswith(b + ".")), None)
        if owner is not None:
            if isinstance(m, LEAF_TYPES):
                blocks[owner].append(m)
        elif isinstance(m, (*BLOCK_TYPES, *LEAF_TYPES)):
            blocks[name] = [m]
    return blocks


def _register(model: nn.Module, hook_for) -> list[torch.utils.hooks.RemovableHandle]:
    return [
        m.register_forward_hook(hook_for(name))
        for name, modules in activation_blocks(model).items()
        for m in modules
    ]


@contextmanager
def record_maxima(model: nn.Module) -> Iterator[dict[str, float]]:
    """Records max |activation| per block (see :func:`activation_blocks`) over everything run inside.

    Yields a dict that is filled when the block exits: name -> max over all calls, for the blocks that ran.
    The maxima stay on the device as tensors while recording and are read back once at the end.
    """
    maxima: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, Tensor):
                a = output.detach().abs().amax().float()
                maxima[name] = a if name not in maxima else torch.maximum(maxima[name], a)

        return hook

    result: dict[str, float] = {}
    handles = _register(model, hook_for)
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        if maxima:
            values = torch.stack(list(maxima.values())).cpu().tolist()  # the one host sync
            result.update(zip(maxima, values, strict=True))


@dataclass
class ActivationPenalty:
    """What :func:`activation_penalty` collected in one forward pass."""

    threshold: float  # |activation| above this is penalized
    penalty: Tensor = field(default_factory=lambda: torch.zeros(()))  # differentiable, 0-d
    max: Tensor = field(default_factory=lambda: torch.zeros(()))  # largest |activation| seen, detached, 0-d


@contextmanager
def activation_penalty(model: nn.Module, threshold: float) -> Iterator[ActivationPenalty]:
    """Collects sum over measured points of mean(relu(|a| / threshold - 1)^2), differentiably.

    Zero while every activation is under ``threshold``; above it, the squared hinge grows with how far and how
    many elements exceed it, and its gradient pushes exactly those elements down. Relative units (|a| /
    threshold) keep the term O(1) whatever the threshold. Hooks are removed on exit, so a recomputation in the
    backward pass (gradient checkpointing) adds nothing.
    """
    out = ActivationPenalty(threshold)
    terms: list[Tensor] = []
    maxima: list[Tensor] = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, Tensor) and output.is_floating_point():
                a = output.float().abs()
                terms.append(torch.relu(a / threshold - 1).square().mean())
                maxima.append(a.detach().amax())

        return hook

    handles = _register(model, hook_for)
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        if terms:
            out.penalty = torch.stack(terms).sum()
            out.max = torch.stack(maxima).amax()
