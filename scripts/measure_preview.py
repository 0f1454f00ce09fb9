"""How close a preview decoder (``AutoencoderTiny``) comes to the full VAE decoder, on scikit-image's colour photos
(never seen in training), at full size.

Per photo: the teacher's latents z (posterior mean) are decoded by the full decoder and, as
``teacher.scale_latents(z)``, by the preview; both are scored 8-bit (as written to disk) against each other and
against the original. The preview's own encoder is scored too (preview encode -> preview decode, and the MSE of
its latents to the teacher's scaled ones). Optionally writes a figure: crops of original | full decode | preview.
Usage:

    python scripts/measure_preview.py [--teacher demo] [--preview weights/demo-preview] [--json out.json] \\
        [--figure docs/preview_demo.png]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from ldm_vae import AutoencoderTiny
from ldm_vae.autoencoders import load_autoencoder
from ldm_vae.demo import bundled_photos
from ldm_vae.images import crop_to, pad_to_multiple, round_to_8bit, to_uint8
from ldm_vae.metrics import psnr
from ldm_vae.pretrained import WEIGHTS_DIR

KEYS = ("preview_vs_full", "preview_vs_original", "full_vs_original", "preview_roundtrip_vs_original")


def figure(rows: list[list[torch.Tensor]], crop: int, gap: int = 4) -> Image.Image:
    """Rows of (3, H, W) images in [-1, 1], each center-cropped to ``crop`` px, side by side on white."""
    tiles = []
    for row in rows:
        cells = []
        for x in row:
            h, w = x.shape[-2:]
            top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
            cells.append(to_uint8(x[:, top : top + crop, left : left + crop]))
        height = max(c.shape[0] for c in cells)
        white = np.full((height, gap, 3), 255, np.uint8)
        line: list[np.ndarray] = []
        for c in cells:
            line += [np.pad(c, ((0, height - c.shape[0]), (0, 0), (0, 0)), constant_values=255), white]
        tiles.append(np.concatenate(line[:-1], axis=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, gap), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    return Image.fromarray(np.concatenate(tiles, axis=0)[:-gap])


def pipeline_samples(pipeline: str, preview: str, n: int, steps: int = 10) -> dict:
    """The pipeline's samples (seed 0) decoded by its vqvae and by the preview: PSNR of each pair, and how many
    previews are closest to their own full decode among the n."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(pipeline)
    kwargs = {"batch_size": n, "num_inference_steps": steps, "output_type": "np"}
    full = torch.from_numpy(pipe(generator=torch.manual_seed(0), **kwargs).images)
    pipe.vqvae = diffusers.AutoencoderTiny.from_pretrained(preview).float()
    fast = torch.from_numpy(pipe(generator=torch.manual_seed(0), **kwargs).images)
    mse = ((fast[:, None] - full[None]) ** 2).mean(dim=(2, 3, 4))  # (preview i, full decode j), in [0, 1]
    own = (10 * torch.log10(1 / mse.diagonal())).tolist()
    matched = int((mse.argmin(dim=1) == torch.arange(n)).sum())
    print(
        f"pipeline samples ({n}, {steps} DDIM steps): preview vs full PSNR dB "
        + ", ".join(f"{v:.2f}" for v in own)
        + f"; {matched}/{n} previews closest to their own full decode"
    )
    return {"psnr": own, "matched": matched, "steps": steps}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="demo", help="the full VAE (shipped name, folder or file)")
    parser.add_argument("--preview", default=str(WEIGHTS_DIR / "demo-preview"), help="AutoencoderTiny folder")
    parser.add_argument("--photos", nargs="+", help="scikit-image photo names (default: the demo's six)")
    parser.add_argument(
        "--pipeline-samples", type=int, default=0, help="also: N samples of this latent-diffusion pipeline"
    )
    parser.add_argument("--pipeline", default=str(WEIGHTS_DIR / "demo"), help="LDMPipeline folder (vqvae/)")
    parser.add_argument("--json", help="also write the per-photo figures here")
    parser.add_argument("--figure", help="PNG: original | full decode | preview, one row per --figure-photos")
    parser.add_argument("--figure-photos", nargs="+", default=["astronaut", "coffee"])
    parser.add_argument("--figure-crop", type=int, default=256, help="center crop of each figure cell, px")
    args = parser.parse_args()

    teacher = load_autoencoder(args.teacher)
    preview = AutoencoderTiny.from_pretrained(args.preview)
    f = teacher.config.diffusion_downsample_factor
    results, panels = [], []
    for name, pixels in bundled_photos(args.photos).items():
        original = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
        size = original.shape[-2:]
        x = pad_to_multiple(original[None], f)
        z = teacher.encode_latents(x)
        scaled = teacher.scale_latents(z)
        full = round_to_8bit(crop_to(teacher.decode(z)[0], size))
        fast = round_to_8bit(crop_to(preview.decode(scaled)[0], size))
        own = preview.encode(x)
        roundtrip = round_to_8bit(crop_to(preview.decode(own)[0], size))
        row = {
            "image": name,
            "size": f"{size[0]}x{size[1]}",
            "preview_vs_full": psnr(fast, full).item(),
            "preview_vs_original": psnr(fast, original).item(),
            "full_vs_original": psnr(full, original).item(),
            "preview_roundtrip_vs_original": psnr(roundtrip, original).item(),
            "encoder_latent_mse": torch.mean((own - scaled) ** 2).item(),
            "latent_var": scaled.var().item(),
        }
        results.append(row)
        if name in args.figure_photos:
            panels.append([original, full, fast])
        print(f"{name}: " + ", ".join(f"{k} {row[k]:.2f}" for k in KEYS), flush=True)

    print(
        "\n| image | size | preview vs full dB | preview vs original dB | full vs original dB | "
        "preview enc+dec vs original dB | encoder latent MSE |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['image']} | {r['size']} | "
            + " | ".join(f"{r[k]:.2f}" for k in KEYS)
            + f" | {r['encoder_latent_mse']:.4f} |"
        )
    mean = {k: float(np.mean([r[k] for r in results])) for k in (*KEYS, "encoder_latent_mse", "latent_var")}
    print(
        "| **mean** | | "
        + " | ".join(f"**{mean[k]:.2f}**" for k in KEYS)
        + f" | {mean['encoder_latent_mse']:.4f} |"
    )
    print(f"(variance of the teacher's scaled latents: {mean['latent_var']:.3f})")
    samples = (
        pipeline_samples(args.pipeline, args.preview, args.pipeline_samples)
        if args.pipeline_samples
        else None
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": results, "mean": mean, "pipeline_samples": samples}, fh, indent=2)
    if args.figure:
        figure(panels, args.figure_crop).save(args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
