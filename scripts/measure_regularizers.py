#!/usr/bin/env python
"""Measures the latent regularizers (issue 15) on the shipped demo autoencoder, one short fine-tune each.

    python scripts/measure_regularizers.py --out runs/regs --steps 150 --ldm-steps 2000

For each variant (``none``, ``eq_vae``, ``scale_equivariance``, ``latent_noise``) the script fine-tunes
``weights/demo/vqvae`` with ``scripts/configs/demo_kl_f8.toml`` on the photos for the same number of steps, seed
and data order (the whole autoencoder; the variant's section switched on with its defaults), then measures:

1. the reconstruction PSNR of scikit-image's colour photos (the demo's six, never trained on), on their coco256
   crops (short side 256, center crop; float output, not 8-bit);
2. the equivariance PSNR (:func:`ldm_vae.latent_regularizers.equivariance_psnr`) on the same crops;
3. the held-out bits/dim of the same short latent DDPM (``scripts/configs/ldm_demo.toml``) trained on the
   variant's cached latents of the photos (``ldm-vae cache-latents``).

The shipped model itself is measured as ``shipped`` (no fine-tune). Writes ``<out>/results.json`` and prints a
markdown table; a variant whose results exist is not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_vae import AutoencoderKL  # noqa: E402
from ldm_vae.cli import main as ldm_vae_cli  # noqa: E402
from ldm_vae.demo import bundled_photos  # noqa: E402
from ldm_vae.latent_regularizers import EQUIVARIANCE_GROUPS, equivariance_psnr  # noqa: E402
from ldm_vae.training import read_metrics  # noqa: E402
from ldm_vae.workflows import evaluate as ev  # noqa: E402

VARIANTS = {
    "none": [],
    "eq_vae": [("eq_vae.enabled", "true")],
    "scale_equivariance": [("scale_equivariance.enabled", "true")],
    "latent_noise": [("latent_noise.enabled", "true")],
}
INIT = ROOT / "weights" / "demo" / "vqvae"
CONFIGS = ROOT / "scripts" / "configs"


def train(script: str, config: str, overrides: list[tuple[str, str]]) -> None:
    """``scripts/<script>.py --config scripts/configs/<config>.toml --k v ...`` in its own process (Accelerate
    keeps process-global state, and each run has its own precision)."""
    args = [f"--{k}={v}" for k, v in overrides]
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / f"{script}.py"),
        "--config",
        str(CONFIGS / f"{config}.toml"),
    ]
    subprocess.run([*cmd, *args], check=True)


def fine_tune(variant: str, args: argparse.Namespace, out: Path) -> Path:
    """The variant's fine-tune of the shipped demo VAE; returns its exported folder."""
    export = out / "vae"
    if (export / "config.json").is_file():
        return export
    shipped_scale = json.loads((INIT / "config.json").read_text())["scaling_factor"]
    overrides = [
        ("model.init", str(INIT)),
        # The recipe config trains from scratch with scale 1; keep the shipped latent scale (noise sigmas are in
        # its units).
        ("model.overrides.scaling_factor", str(shipped_scale)),
        ("data.train_dir", args.photos),
        ("data.num_workers", "0"),
        ("train.output_dir", str(out)),
        ("train.max_steps", str(args.steps)),
        ("train.seed", str(args.seed)),
        ("train.checkpoint_every", str(args.steps)),
        ("train.val_every", str(args.steps)),
        ("train.tensorboard", "false"),
        ("optim.lr", str(args.lr)),
        ("optim.warmup_steps", "0"),
        ("optim.schedule", "constant"),
        *VARIANTS[variant],
    ]
    train("train_vae", "demo_kl_f8", overrides)
    return export


def photo_files(folder: Path) -> list[Path]:
    """The demo's scikit-image photos as PNG files (written once)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, pixels in bundled_photos().items():
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(pixels).save(path)
        files.append(path)
    return files


def equivariance_scores(vae: AutoencoderKL, files: list[Path]) -> dict[str, float]:
    protocol = ev.parse_protocol("coco256", "fp32", [1])
    x = torch.stack([ev.prepare(f, protocol) for f in files])  # (6, 3, 256, 256)
    scores = equivariance_psnr(vae, x)
    means = {name: scores[name].mean().item() for name in scores}
    for group, names in EQUIVARIANCE_GROUPS.items():
        means[group] = float(np.mean([means[n] for n in names]))
    return means


def ldm_bits(vae_dir: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Caches the photos' latents under ``vae_dir`` and trains the short DDPM; held-out bits/dim at the end."""
    cache = out / "latents"
    settings = ["--resolution", "128", "--views", str(args.views), "--seed", str(args.seed)]
    code = ldm_vae_cli(["cache-latents", args.photos, "-o", str(cache), "--model", str(vae_dir), *settings])
    if code:
        raise SystemExit(f"cache-latents failed for {vae_dir}")
    run = out / "ldm"
    if not (run / "pipeline").exists():
        overrides = [
            ("data.latent_dir", str(cache)),
            ("train.output_dir", str(run)),
            ("train.max_steps", str(args.ldm_steps)),
            ("train.seed", str(args.seed)),
            ("train.checkpoint_every", str(args.ldm_steps)),
            ("train.val_every", str(args.ldm_steps)),
            ("train.tensorboard", "false"),
            ("optim.warmup_steps", "50"),
            ("sample.num_images", "4"),
            ("sample.steps", "10"),
        ]
        train("train_ldm", "ldm_demo", overrides)
    last = [r for r in read_metrics(run) if "val/bpd" in r][-1]
    return {k: last[f"val/{k}"] for k in ("bpd", "bpd_ema", "prior_bpd", "loss")}


def measure(variant: str, args: argparse.Namespace, files: list[Path]) -> dict:
    out = Path(args.out) / variant
    start = time.perf_counter()
    vae_dir = INIT if variant == "shipped" else fine_tune(variant, args, out)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.inference_mode():
        result = {"equivariance": equivariance_scores(vae, files)}  # "identity": the plain reconstruction
    print(f"{variant}: fine-tune and equivariance done after {time.perf_counter() - start:.0f} s", flush=True)
    result["ldm"] = ldm_bits(vae_dir, args, out) if args.ldm_steps else None
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def table(results: dict) -> str:
    head = "| variant | photo PSNR | EQ-d4 PSNR | EQ-scale PSNR | DDPM bits/dim (EMA) | N(0, I) | seconds |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        e, b = r["equivariance"], r["ldm"]
        bits = f"{b['bpd']:.3f} ({b['bpd_ema']:.3f}) | {b['prior_bpd']:.3f}" if b else "not run | -"
        lines.append(
            f"| {name} | {e['identity']:.2f} | {e['d4']:.2f} | {e['scale']:.2f} | {bits} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/regs")
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "photos"))
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps per variant")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (constant)")
    parser.add_argument("--ldm-steps", type=int, default=300, help="DDPM steps per variant (0: no DDPM)")
    parser.add_argument("--views", type=int, default=4, help="cache-latents views per photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="shipped," + ",".join(VARIANTS))
    args = parser.parse_args()
    results_path = Path(args.out) / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    files = photo_files(Path(args.out) / "photos")
    for variant in args.variants.split(","):
        if variant not in results:
            results[variant] = measure(variant, args, files)
            results[variant]["settings"] = {
                k: getattr(args, k) for k in ("steps", "lr", "ldm_steps", "views")
            }
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1))
        print(f"{variant}: {json.dumps(results[variant])}", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
