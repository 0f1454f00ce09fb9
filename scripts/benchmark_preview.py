"""Decode speed of a preview decoder (``AutoencoderTiny``) against the full VAE decoder it was distilled from,
on the same latents, same process, same threads.

The latents are the teacher's posterior means of a scikit-image photo (astronaut), resized to each size: the
full decoder gets the raw latents, the preview their diffusion-ready form ``teacher.scale_latents(z)`` (what a
pipeline hands either as its ``vae``). Runs are interleaved (full, preview, full, preview, ...) after a warm-up
call each, so a change in machine load hits both alike; the table gives medians and the ratio of medians.
Usage:

    python scripts/benchmark_preview.py [--teacher demo] [--preview weights/demo-preview] [--sizes 256 512] \\
        [--rounds 7] [--threads 2] [--dtype fp32] [--json bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from ldm_vae import AutoencoderTiny
from ldm_vae.autoencoders import load_autoencoder
from ldm_vae.demo import bundled_photos
from ldm_vae.pretrained import WEIGHTS_DIR


def photo_latents(teacher, size: int) -> torch.Tensor:
    """Raw latents (1, C, size/f, size/f) of the astronaut photo resized to ``size`` px."""
    pixels = torch.from_numpy(bundled_photos(["astronaut"])["astronaut"]).permute(2, 0, 1)[None].float()
    x = F.interpolate(pixels / 127.5 - 1, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)
    with torch.inference_mode():
        return teacher.encode_latents(x.to(teacher.dtype))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="demo", help="the full VAE (shipped name, folder or file)")
    parser.add_argument("--preview", default=str(WEIGHTS_DIR / "demo-preview"), help="AutoencoderTiny folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image edge in pixels")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed runs per model and size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher = load_autoencoder(args.teacher, dtype=args.dtype)
    preview = AutoencoderTiny.from_pretrained(args.preview, dtype=args.dtype)
    rows = []
    for size in args.sizes:
        z = photo_latents(teacher, size)
        scaled = teacher.scale_latents(z)
        runs = {"full": lambda z=z: teacher.decode(z), "preview": lambda s=scaled: preview.decode(s)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            for fn in runs.values():
                fn()  # warm-up: oneDNN primitive creation, allocator
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    times[name].append(timed(fn))
        full, fast = statistics.median(times["full"]), statistics.median(times["preview"])
        rows.append({"size": size, "full_s": full, "preview_s": fast, "speedup": full / fast, "runs": times})

    params = {
        "full decoder": sum(p.numel() for p in teacher.decoder.parameters())
        + sum(p.numel() for p in getattr(teacher, "post_quant_conv", torch.nn.Identity()).parameters()),
        "preview decoder": sum(p.numel() for p in preview.decoder.parameters()),
    }
    print(
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), {args.dtype}, "
        f"medians of {args.rounds} interleaved runs"
    )
    print(
        f"parameters: full decoder {params['full decoder']:,}, preview decoder {params['preview decoder']:,}"
    )
    print("| image | full decode s | preview decode s | speed-up |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']}x{r['size']} | {r['full_s']:.3f} | {r['preview_s']:.3f} | {r['speedup']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"threads": args.threads, "dtype": args.dtype, "params": params, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
