#!/usr/bin/env python
"""Training-step speed of scripts/train_vae.py in fp32 and under bf16 autocast, on this machine.

Runs the real training loop (``ldm_vae.training.train_vae.main``) for a few steps per precision on a small KL model and reads the
per-step compute time it logs (forward, losses with the adaptive GAN weight, discriminator step, backward, AdamW,
EMA; data loading excluded), then prints the median after warm-up. The precisions alternate over ``--rounds``
so that a change in the machine's load (it may be shared) hits both alike:

    python scripts/benchmark_train.py [--data-dir DIR] [--rounds 2] [--steps 6] [--warmup 2] [--resolution 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from ldm_vae.runtime import native_bf16
from ldm_vae.training import load_config, read_metrics
from ldm_vae.training import train_vae as tv

HERE = Path(__file__).resolve().parent
PHOTOS = Path("/work/shared/data/photos")


def synthetic_photos(folder: Path, count: int, size: int) -> Path:
    """Smooth random images, for machines without a photo folder."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:03d}.png")
    return folder


def run(tv, data_dir: Path, out: Path, precision: str, args: argparse.Namespace) -> list[float]:
    """Per-step compute seconds of one short training run."""
    overrides = [
        ("model.overrides.block_out_channels", args.channels),
        ("model.overrides.layers_per_block", "2"),
        ("model.overrides.norm_num_groups", "32"),
        ("loss.disc_start", "0"),  # the full step: generator, adaptive weight and discriminator
        ("loss.disc_num_layers", "3"),
        ("loss.disc_channels", "64"),
        ("data.train_dir", str(data_dir)),
        ("data.resolution", str(args.resolution)),
        ("data.batch_size", str(args.batch_size)),
        ("data.num_workers", "2"),
        ("data.num_val", "0"),
        ("train.output_dir", str(out)),
        ("train.mixed_precision", precision),
        ("train.max_steps", str(args.warmup + args.steps)),
        ("train.checkpoint_every", "1000000"),
        ("train.val_every", "0"),
        ("train.log_every", "1"),
        ("train.tensorboard", "false"),
    ]
    cfg = load_config(tv.Config, HERE / "configs" / "tiny_cpu.toml", overrides)
    AcceleratorState._reset_state(reset_partial_state=True)  # a new mixed-precision setting per run
    GradientState._reset_state()
    tv.main(cfg)
    times = [r["train/step_time"] for r in read_metrics(out) if "train/step_time" in r]
    return times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=PHOTOS if PHOTOS.is_dir() else None)
    parser.add_argument("--rounds", type=int, default=2, help="runs per precision, alternating")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--channels", default="32,64,128,128")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir or synthetic_photos(Path(tmp) / "photos", 32, args.resolution + 32)
        times: dict[str, list[float]] = {"no": [], "bf16": []}
        for i in range(args.rounds):
            for precision in times:
                times[precision] += run(tv, data, Path(tmp) / f"{precision}-{i}", precision, args)
        medians = {precision: statistics.median(t) for precision, t in times.items()}
        best = {precision: min(t) for precision, t in times.items()}  # the least disturbed step

    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {native_bf16('cpu')}"
    )
    print(
        f"KL model channels ({args.channels}), {args.resolution} px crops, batch {args.batch_size}, GAN on;"
    )
    print(f"median of {args.rounds} x {args.steps} steps, each run after {args.warmup} warm-up steps\n")
    print("| precision     | median step (s) | images/s | fastest step (s) |")
    print("|---------------|-----------------|----------|------------------|")
    for precision, label in (("no", "fp32"), ("bf16", "bf16 autocast")):
        m, b = medians[precision], best[precision]
        print(f"| {label:<13} | {m:15.3f} | {args.batch_size / m:8.2f} | {b:16.3f} |")
    ratio, ratio_best = medians["no"] / medians["bf16"], best["no"] / best["bf16"]
    print(f"\nbf16 speed-up: {ratio:.2f}x (medians), {ratio_best:.2f}x (fastest steps)")


if __name__ == "__main__":
    main()
