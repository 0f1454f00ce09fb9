#!/usr/bin/env python
"""The work an exact tiled run does, against the untiled pass (issue 14, item 7).

Counts the convolution FLOPs of the SD-shaped decoder (or encoder) on meta tensors, so a 2048 px run costs
seconds and no memory: the untiled pass, and the exact tiler under a ``max_memory`` budget (its store schedule
and tile size as a real run of that dtype chooses them). Untiled FLOPs grow with the pixels, so the untiled
2048 figure is also four untiled 1024 decodes. ``--time`` also times, on real tensors, the exact-tiled
decode at the largest size against ``(size / 1024)^2`` untiled 1024 decodes, interleaved, medians::

    python scripts/benchmark_tiling.py [--sizes 1024 2048] [--max-memory 2.5e9] [--dtype bf16] [--time]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_vae import AutoencoderKL, tiling

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ConvFlops:
    """Counts 2 * MACs of every Conv2d call of ``model`` while active."""

    def __init__(self, model: nn.Module) -> None:
        self.total, self.handles = 0, []
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                self.handles.append(m.register_forward_hook(self._hook))

    def _hook(self, m: nn.Conv2d, _inputs, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1]
        self.total += 2 * out.numel() * (m.in_channels // m.groups) * k

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def tiled_flops(vae: AutoencoderKL, op: str, x: torch.Tensor, max_memory: int | None) -> int:
    net, ppi = (vae.decoder, 8) if op == "decode" else (vae.encoder, 1)
    counter = ConvFlops(net)
    try:
        with torch.no_grad():
            tiling.tiled_forward(net, x, None, ppi, max_memory)
    finally:
        counter.remove()
    return counter.total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048])
    p.add_argument("--max-memory", type=float, default=2.5e9, help="bytes for the tiled runs")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--op", choices=["decode", "encode"], default="decode")
    p.add_argument("--time", action="store_true", help="also time the largest size on real tensors")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    dtype, budget = DTYPES[args.dtype], int(args.max_memory)
    vae = AutoencoderKL.from_pretrained("sd").to(device="meta", dtype=dtype).eval()
    print(f"SD-shaped {args.op}, {args.dtype}, exact tiling within {budget / 1e9:.2f} GB; conv GFLOPs")
    print("| size | untiled | exact-tiled | ratio |")
    print("|---:|---:|---:|---:|")
    for size in args.sizes:
        shape = (1, 4, size // 8, size // 8) if args.op == "decode" else (1, 3, size, size)
        x = torch.zeros(shape, device="meta", dtype=dtype)
        untiled, tiled = (tiled_flops(vae, args.op, x, m) for m in (None, budget))
        print(f"| {size} | {untiled / 1e9:.0f} | {tiled / 1e9:.0f} | {tiled / untiled:.2f} |", flush=True)
    if args.time:
        size = max(args.sizes)
        n = (size // 1024) ** 2
        real = (
            AutoencoderKL.from_pretrained("sd").to(dtype=dtype).eval().to(memory_format=torch.channels_last)
        )
        big = torch.randn(1, 4, size // 8, size // 8, dtype=dtype)
        small = torch.randn(1, 4, 128, 128, dtype=dtype)
        times = {"tiled": [], "untiled": []}
        with torch.no_grad():
            for _ in range(args.rounds):
                t = time.perf_counter()
                real.decode(big, max_memory=budget)
                times["tiled"].append(time.perf_counter() - t)
                t = time.perf_counter()
                for _ in range(n):
                    real.decode(small)
                times["untiled"].append(time.perf_counter() - t)
        a, b = (statistics.median(times[k]) for k in ("tiled", "untiled"))
        print(f"time: exact-tiled {size} {a:.1f} s, {n} untiled 1024 decodes {b:.1f} s, ratio {a / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
