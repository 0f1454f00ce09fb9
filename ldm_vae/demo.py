"""The one-command demo: the whole path the package exists for, on the shipped weights.

Photos bundled with scikit-image (never seen in training) are reconstructed by the shipped KL-f8 autoencoder
and scored against the bicubic x8 down/up baseline; they are encoded to latents; the shipped latent DDPM
samples new latents, which the autoencoder decodes. Everything lands in one folder with an HTML report.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from .autoencoder_kl import AutoencoderKL
from .checkpoint import CheckpointError
from .images import load_image, pad_to_multiple
from .io import atomic_path, write_json
from .ldm import load_pipeline, sampling_scheduler
from .pretrained import DEMO_PIPELINE, WEIGHTS_DIR
from .workflows import print_table, reconstruct_images, write_samples

# scikit-image's colour photographs (all ship inside the package, none was used in training).
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def bundled_photos(names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The demo photos (default: all of ``DEMO_PHOTOS``) as uint8 (H, W, 3) arrays."""
    try:
        from skimage import data
    except ImportError:
        raise CheckpointError("the demo photos come from scikit-image: pip install 'ldm-vae[demo]'") from None
    return {name: getattr(data, name)()[..., :3] for name in names or DEMO_PHOTOS}


def run_demo(
    out_dir: str | Path,
    pipeline: str | Path | None = None,
    dtype: str = "auto",
    num_samples: int = 16,
    steps: int = 50,
    seed: int = 0,
    photos: Sequence[str] | None = None,
) -> dict:
    """Runs the demo into ``out_dir`` and returns its summary (also written as ``metrics.json``).

    Args:
        out_dir: output folder (created).
        pipeline: the latent-diffusion pipeline folder; its ``vqvae/`` is the autoencoder. Default: the shipped
            ``weights/demo``.
        dtype: the autoencoder's dtype (``auto``: bf16 where native).
        num_samples: images to sample from the latent DDPM.
        steps: DDIM steps.
        seed: sampling seed.
        photos: names of scikit-image photos to reconstruct (default: ``DEMO_PHOTOS``).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    vae, unet, scheduler = load_pipeline(pipeline or "demo", dtype=dtype)
    folder = Path(pipeline) if pipeline is not None else WEIGHTS_DIR / DEMO_PIPELINE

    # 1. Reconstructions of photos the model never saw, scored as written (8-bit), with the bicubic baseline.
    originals = []
    for name, pixels in bundled_photos(photos).items():
        path = out / "originals" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
        originals.append(path)
    recons = [out / "reconstructions" / p.name for p in originals]
    rows = reconstruct_images(vae, originals, recons, batch_size=1)
    keys = ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    print_table(rows, mean, vae.config.downsample_factor)

    # 2. Their diffusion-ready latents.
    latents = {}
    with torch.inference_mode():
        for path in originals:
            x = pad_to_multiple(load_image(path), vae.config.downsample_factor)[None]
            latents[path.stem] = vae.scale_latents(vae.encode(x).mode())[0].contiguous()
    with atomic_path(out / "latents.safetensors") as tmp:
        save_file(latents, str(tmp))

    # 3. New images from the latent DDPM, decoded by the same autoencoder.
    samples = write_samples(
        vae, unet, sampling_scheduler(scheduler, "ddim"), out / "samples", num_samples, steps, seed
    )
    summary = {
        "pipeline": str(folder),
        "dtype": str(vae.dtype).removeprefix("torch."),
        "images": rows,
        "mean": mean,
        "latent_shapes": {k: list(v.shape) for k, v in latents.items()},
        "samples": [p.name for p in samples],
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(summary, out / "metrics.json")
    _write_report(out, rows, mean, vae, samples, summary)
    return summary


def _write_report(
    out: Path, rows: list[dict], mean: dict, vae: AutoencoderKL, samples: list[Path], summary: dict
) -> Path:
    f = vae.config.downsample_factor
    esc = html.escape
    table = "".join(
        f"<tr><td>{esc(Path(r['source']).stem)}</td><td>{r['size'][0]}x{r['size'][1]}</td>"
        f"<td>{r['psnr']:.2f}</td><td>{r['ssim']:.4f}</td><td>{r['bicubic_psnr']:.2f}</td>"
        f"<td>{r['bicubic_ssim']:.4f}</td></tr>"
        for r in rows
    )
    table += (
        f"<tr class=mean><td>mean</td><td></td><td>{mean['psnr']:.2f}</td><td>{mean['ssim']:.4f}</td>"
        f"<td>{mean['bicubic_psnr']:.2f}</td><td>{mean['bicubic_ssim']:.4f}</td></tr>"
    )
    pairs = "".join(
        f"<figure><img src='originals/{esc(Path(r['source']).name)}'><img src='reconstructions/{esc(r['output'])}'>"
        f"<figcaption>{esc(Path(r['source']).stem)}: original | reconstruction ({r['psnr']:.2f} dB)"
        "</figcaption></figure>"
        for r in rows
    )
    grid = "<img class=grid src='samples/grid.png'>" if samples else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ldm_vae demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:2px 10px;text-align:right}}
tr.mean{{font-weight:bold}}figure{{display:inline-block;margin:6px}}figure img{{height:220px}}
img.grid{{max-width:100%;image-rendering:pixelated}}</style></head><body>
<h1>ldm_vae demo</h1>
<p>Shipped weights: <code>{esc(summary["pipeline"])}</code>, autoencoder in {esc(summary["dtype"])}
({summary["seconds"]} s in all).</p>
<h2>Reconstructions (f={f}) against bicubic x{f} down/up</h2>
<table><tr><th>image</th><th>size</th><th>PSNR</th><th>SSIM</th><th>bicubic PSNR</th><th>bicubic SSIM</th></tr>
{table}</table>
{pairs}
<h2>Samples from the latent DDPM, decoded by the autoencoder</h2>
{grid}
</body></html>
"""
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
