"""Encoder and decoder of the Latent Diffusion autoencoder (Rombach et al., 2022, App. G; Esser et al., 2021).

Module and parameter names are diffusers' (``down_blocks.i.resnets.j.norm1``, ``mid_block.attentions.0.to_q``,
``down_blocks.i.attentions.j.to_q`` in attention levels),
so ``state_dict()`` is a diffusers ``AutoencoderKL``/``VQModel`` state dict with no renaming.

Each network is a flat list of :class:`Unit` s. ``forward`` runs them in order; the exact tiler
(:mod:`ldm_vae.tiling`) runs the same units over tiles, which is why the sequence is data, not code. The tiler
hands each call its GroupNorm statistics as an argument (a :data:`NormProvider`); it sets nothing on the modules.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

EPS = 1e-6  # every GroupNorm in the LDM autoencoder uses this epsilon
_MKLDNN = torch.backends.mkldnn.is_available()  # a build property: probed once, never inside forward


class Architecture(Protocol):
    """The config fields that shape an Encoder/Decoder (both autoencoder configs have them)."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]  # per encoder level; Attn* levels run attention after each resnet
    up_block_types: tuple[str, ...]  # per decoder level, from the lowest resolution
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool


NormProvider = Callable[["GroupNorm", Tensor], Tensor]
"""``provider(norm, x)`` -> ``x`` normalized (affine included) with statistics the caller chose.

The exact tiler passes one per tile, so that each norm uses whole-image statistics, not its tile's.
"""


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with an optional fused SiLU and optional caller-supplied statistics."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = EPS) -> None:
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x: Tensor, act: bool = False, stats: NormProvider | None = None) -> Tensor:
        """Normalizes ``x`` over its own positions, or as ``stats(self, x)`` when a provider is given."""
        if stats is None:  # the normal path: one fused op, no state read beyond the parameters
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            y = stats(self, x)
        if act:
            # group_norm's output is a fresh tensor that its backward does not need, but silu's backward
            # needs its input, so only overwrite it when no graph is being recorded.
            y = F.silu(y, inplace=not torch.is_grad_enabled())
        return y


def conv_add(conv: nn.Conv2d, x: Tensor, other: Tensor) -> Tensor:
    """conv(x) + other, fused into the convolution by oneDNN on CPU where it can be."""
    if torch.compiler.is_compiling():
        # Under torch.compile the plain ops trace without breaks and inductor fuses the add itself; the oneDNN
        # op and its capability probe (a function dynamo refuses to trace) stay eager-only.
        return conv(x).add_(other)
    if x.device.type == "cpu" and x.dtype == other.dtype and _MKLDNN:
        try:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
                "add", None, None, [], None,
            )  # fmt: skip
        except (RuntimeError, AttributeError):  # older oneDNN builds or unsupported dtype: unfused below
            pass
    return conv(x).add_(other)


class ResnetBlock(nn.Module):
    """Pre-norm residual block: x + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, stats: NormProvider | None = None) -> Tensor:
        """Residual block on x (B, C_in, H, W) -> (B, C_out, H, W).

        Args:
            x: input activation.
            stats: normalization provider for both norms; None normalizes over x's own positions.
        """
        h = self.conv1(self.norm1(x, act=True, stats=stats))  # (B, C_out, H, W)
        h = self.norm2(h, act=True, stats=stats)
        if self.conv2.weight.is_contiguous(memory_format=torch.channels_last) and not torch.is_grad_enabled():
            # Fast inference layout: the residual add rides on conv2 (oneDNN's binary post-op), which saves
            # a full pass over the activation and an allocation.
            skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
            return conv_add(self.conv2, h, skip)
        h = self.conv2(h)
        # Reference path, op for op as diffusers: memory layouts pick the conv kernels, hence the rounding.
        # diffusers >= 0.42 makes the shortcut's input contiguous only in training (its issue #12975).
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x.contiguous() if self.training else x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over all positions, with a residual (LDM's AttnBlock).

    diffusers builds the same module in the mid block and in Attn*EncoderBlock2D/Attn*DecoderBlock2D levels:
    ``attention_head_dim`` = channels (one head), GroupNorm with eps 1e-6, residual, output rescale 1.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' index 1 is a no-op dropout

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        # The reshapes mirror diffusers' AttnProcessor2_0 stride for stride (batch stride included): tensor
        # layouts pick GroupNorm/conv kernels downstream, and so the rounding that parity tests compare.
        h = self.group_norm(x.view(b, c, height * width)).transpose(1, 2)  # (B, H*W, C) tokens
        q, k, v = (rearrange(proj(h), "b l c -> b 1 l c") for proj in (self.to_q, self.to_k, self.to_v))
        h = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 l c -> b l c")  # one head
        h = self.to_out[0](h).transpose(1, 2).reshape(b, c, height, width)  # (B, C, H, W), channels-last view
        return h + x  # out of place and in this operand order, as diffusers


class Downsample(nn.Module):
    """Stride-2 3x3 conv with LDM's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H // 2, W // 2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x followed by a 3x3 conv.

    Fast inference path: a 3x3 conv over a nearest-upsampled image sees each input pixel through 2x2 blocks
    of equal values, so each of the four output phases is a 2x2 conv of the low-resolution input with summed
    taps (sub-pixel convolution). One 2x2 conv with 4x the output channels does 16 instead of 36
    multiply-adds per input pixel and channel pair, and never builds the upsampled input.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv.weight.is_contiguous(memory_format=torch.channels_last) and not torch.is_grad_enabled():
            return self._subpixel(x)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)

    def _phase_kernels(self) -> tuple[Tensor, Tensor]:
        # Folded from the weight on every call, a pure function of it: nothing is cached on the module, so
        # forward mutates no state (thread-safe, traceable by torch.compile, never stale after a weight
        # update). The fold is a few passes over the weight: ~5% of a 512-channel bf16 call on a 64x64 input.
        w = self.conv.weight
        wf = w.float()  # (O, I, 3, 3)

        def phases(t: Tensor, dim: int) -> list[Tensor]:
            # Output phase 0 reads input offsets (-1, 0) with taps (k0, k1 + k2); phase 1 reads (0, +1)
            # with taps (k0 + k1, k2).
            k0, k1, k2 = t.unbind(dim)
            return [torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)]

        kernels = [col for row in phases(wf, 2) for col in phases(row, 3)]  # (a, b) = 00, 01, 10, 11
        kernel = torch.cat(kernels).to(w.dtype).contiguous(memory_format=torch.channels_last)
        return kernel, self.conv.bias.repeat(4)

    def _subpixel(self, x: Tensor) -> Tensor:
        kernel, bias = self._phase_kernels()
        b, c, h, w = x.shape
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, bias)  # (B, 4C, H+1, W+1): all phases at each anchor
        out = torch.empty(
            b, c, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )
        phased = rearrange(out, "b c (h a) (w e) -> b c h a w e", a=2, e=2)  # a view: writes land in out
        for i, ph in enumerate(y.chunk(4, dim=1)):
            a, e = divmod(i, 2)
            phased[:, :, :, a, :, e] = ph[:, :, a : a + h, e : e + w]
        return out  # (B, C, 2H, 2W)


def resnet_chain(in_channels: int, out_channels: int, layers: int, groups: int) -> nn.ModuleList:
    """``layers`` resnets; the first changes the width."""
    chans = [in_channels] + [out_channels] * layers
    return nn.ModuleList(ResnetBlock(a, b, groups) for a, b in itertools.pairwise(chans))


def attention_chain(channels: int, layers: int, groups: int, attention: bool) -> nn.ModuleList:
    """One attention per resnet of an attention level (after it), or none."""
    return nn.ModuleList(Attention(channels, groups) for _ in range(layers if attention else 0))


class DownBlock(nn.Module):
    """One encoder level (diffusers' DownEncoderBlock2D, or AttnDownEncoderBlock2D with ``attention``)."""

    def __init__(
        self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool, attention: bool
    ) -> None:
        super().__init__()
        # Attentions first: diffusers' Attn blocks register them first, which orders state_dict keys.
        self.attentions = attention_chain(out_channels, layers, groups, attention)
        self.resnets = resnet_chain(in_channels, out_channels, layers, groups)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])


class UpBlock(nn.Module):
    """One decoder level (diffusers' UpDecoderBlock2D, or AttnUpDecoderBlock2D with ``attention``)."""

    def __init__(
        self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool, attention: bool
    ) -> None:
        super().__init__()
        self.attentions = attention_chain(out_channels, layers, groups, attention)
        self.resnets = resnet_chain(in_channels, out_channels, layers, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution (diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        # Registered in diffusers' order, so state_dict() lists keys in the same order too.
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])


@dataclass(frozen=True)
class Unit:
    """One step of a network, as the exact tiler sees it.

    Attributes:
        fn: the computation, ``fn(x)``; when ``norms`` is non-empty and the unit is not global,
            ``fn(x, stats)`` takes a :data:`NormProvider` for those norms too.
        scale: output resolution / input resolution (0.5, 1 or 2).
        convs: 3x3 convolutions in ``fn``; each spreads a tile edge's error by one pixel (the tiler counts it
            at the coarser of the unit's input and output resolutions, which is conservative).
        is_global: needs every position at once (attention), so it is never tiled.
    """

    fn: Callable[..., Tensor]
    scale: float = 1.0
    convs: int = 0
    is_global: bool = False
    norms: tuple[GroupNorm, ...] = ()  # GroupNorms inside fn, in execution order
    # Output channels where fn is not a module whose convolutions tell them (the heads); None: the last conv's.
    out_channels: int | None = None

    @classmethod
    def of(cls, module: nn.Module, **kwargs) -> Unit:
        """A unit running ``module``, with its GroupNorms listed."""
        norms = tuple(m for m in module.modules() if isinstance(m, GroupNorm))
        return cls(module, norms=norms, **kwargs)

    def __call__(self, x: Tensor, stats: NormProvider | None = None) -> Tensor:
        """Runs ``fn`` on ``x``, with ``stats`` for its GroupNorms when given."""
        if stats is None or not self.norms:  # convolutions, resampling: nothing to normalize
            return self.fn(x)
        if self.is_global:
            # Attention normalizes all positions at once, so its own statistics already are the global ones.
            raise ValueError("a global unit runs untiled and takes no normalization provider")
        return self.fn(x, stats)


def _mid_units(mid: MidBlock) -> list[Unit]:
    units = [Unit.of(mid.resnets[0], convs=2)]
    units += [Unit.of(a, is_global=True) for a in mid.attentions]
    return [*units, Unit.of(mid.resnets[1], convs=2)]


def _level_units(block: DownBlock | UpBlock) -> list[Unit]:
    """Each resnet, followed by its attention in an attention level (global: never tiled)."""
    attentions = [[Unit.of(a, is_global=True)] for a in block.attentions] or [[] for _ in block.resnets]
    return [u for r, a in zip(block.resnets, attentions, strict=True) for u in (Unit.of(r, convs=2), *a)]


class _Sequential(nn.Module):
    """Runs :meth:`units` in order, with optional per-unit gradient checkpointing."""

    gradient_checkpointing: bool = False

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for unit in self.units():
            x = checkpoint(unit, x, use_reentrant=False) if ckpt else unit(x)
        return x


class Encoder(_Sequential):
    """Image (B, in_channels, H, W) -> (B, out_channels, H/f, W/f), f = 2 ** (levels - 1)."""

    def __init__(self, in_channels: int, out_channels: int, arch: Architecture) -> None:
        super().__init__()
        chans, groups, layers = arch.block_out_channels, arch.norm_num_groups, arch.layers_per_block
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                chans[max(i - 1, 0)],
                c,
                layers,
                groups,
                downsample=i < len(chans) - 1,
                attention=arch.down_block_types[i].startswith("Attn"),
            )
            for i, c in enumerate(chans)
        )
        self.mid_block = MidBlock(chans[-1], groups, arch.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def _head(self, x: Tensor, stats: NormProvider | None = None) -> Tensor:
        return self.conv_out(self.conv_norm_out(x, act=True, stats=stats))  # (B, out_channels, h, w)

    def units(self) -> list[Unit]:
        units = [Unit.of(self.conv_in, convs=1)]  # (B, chans[0], H, W)
        for block in self.down_blocks:
            units += _level_units(block)
            units += [Unit.of(d, scale=0.5, convs=1) for d in block.downsamplers]  # halves H, W
        head = Unit(self._head, convs=1, norms=(self.conv_norm_out,), out_channels=self.conv_out.out_channels)
        return [*units, *_mid_units(self.mid_block), head]


class Decoder(_Sequential):
    """Latent (B, in_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, in_channels: int, out_channels: int, arch: Architecture) -> None:
        super().__init__()
        chans, groups = tuple(reversed(arch.block_out_channels)), arch.norm_num_groups
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                chans[max(i - 1, 0)],
                c,
                arch.layers_per_block + 1,
                groups,
                upsample=i < len(chans) - 1,
                attention=arch.up_block_types[i].startswith("Attn"),
            )
            for i, c in enumerate(chans)
        )
        # After up_blocks: diffusers registers them in this order (and so orders state_dict keys).
        self.mid_block = MidBlock(chans[0], groups, arch.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def _head(self, x: Tensor, stats: NormProvider | None = None) -> Tensor:
        return self.conv_out(self.conv_norm_out(x, act=True, stats=stats))  # (B, out_channels, H, W)

    def units(self) -> list[Unit]:
        units = [Unit.of(self.conv_in, convs=1), *_mid_units(self.mid_block)]  # (B, chans[0], h, w)
        for block in self.up_blocks:
            units += _level_units(block)
            units += [Unit.of(u, scale=2.0, convs=1) for u in block.upsamplers]  # doubles H, W
        head = Unit(self._head, convs=1, norms=(self.conv_norm_out,), out_channels=self.conv_out.out_channels)
        return [*units, head]
