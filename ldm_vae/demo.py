"""The one-command demo: what a VAE and latent diffusion are about (Kingma & Welling, 2014, "Auto-Encoding
Variational Bayes"; Rombach et al., 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"), on the
shipped weights, in one folder with an HTML report.

1. Latent diffusion on handwritten digits (``weights/digits``): scikit-learn's digits (:mod:`ldm_vae.digits`)
   are encoded by the photo-trained KL-f8 autoencoder; the digits DDPM's samples are shown next to real training
   digits (and each sample's nearest training digit), next to decoded draws from the VAE's own N(0, I) prior;
   the held-out digits' bits/dim under the DDPM's variational bound, Gaussians fitted to the training latents
   and N(0, I) are computed here.
2. Photos bundled with scikit-image (never seen in training) reconstructed against the bicubic x8 baseline.
3. A latent interpolation between two photos, linear and spherical, decoded at several points.
4. The latent channels of one photo shown as pictures.
5. Samples of the photo DDPM (``weights/demo``).
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
from .digits import DIGIT_SIZE, DIGITS_HELD_OUT, write_digits
from .images import center_crop, load_image, pad_to_multiple, resize_short_side, save_image
from .io import atomic_path, write_json
from .latents import LatentDataset, cache_latents, held_out_split, latent_moments, read_manifest
from .ldm import (
    BASELINE_NAMES,
    decode_latents,
    gaussian_baselines,
    gaussian_bits_per_dim,
    load_pipeline,
    sampling_scheduler,
    vlb_bits_per_dim,
)
from .pretrained import DEMO_PIPELINE, DIGITS_PIPELINE, WEIGHTS_DIR
from .workflows import print_table, reconstruct_images, write_samples

# scikit-image's colour photographs (all ship inside the package, none was used in training).
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
INTERPOLATION_SIZE = 256  # px: the center squares interpolated between (32x32x4 latents)
INTERPOLATION_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
CHANNEL_RANGE = 3.0  # latent channels are shown from -3 (black) to +3 (white), in units of the scaled latents


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
    digits_pipeline: str | Path | None = None,
    digits_limit: int | None = None,
    digits_held_out: int = DIGITS_HELD_OUT,
    bound_timesteps: int = 50,
) -> dict:
    """Runs the demo into ``out_dir`` and returns its summary (also written as ``metrics.json``).

    Args:
        out_dir: output folder (created).
        pipeline: the photo latent-diffusion pipeline folder; its ``vqvae/`` is the autoencoder. Default: the
            shipped ``weights/demo``.
        dtype: the autoencoder's dtype for the photos (``auto``: bf16 where native); digits run in fp32, so
            their bits/dim are the model card's.
        num_samples: images to sample from each latent DDPM and from the prior.
        steps: DDIM steps.
        seed: sampling seed (also of the posterior samples the bits/dim are computed on).
        photos: names of scikit-image photos to reconstruct (default: ``DEMO_PHOTOS``).
        digits_pipeline: the digits pipeline folder (default: the shipped ``weights/digits``).
        digits_limit: use only the first digits (tests); default all 1797.
        digits_held_out: the last digits held out (the digits DDPM's ``data.num_val``).
        bound_timesteps: importance-sampled timesteps of the held-out bound.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    vae, unet, scheduler = load_pipeline(pipeline or DEMO_PIPELINE, dtype=dtype)
    folder = Path(pipeline) if pipeline is not None else WEIGHTS_DIR / DEMO_PIPELINE

    # 1. Latent diffusion on digits, with the baselines it has to beat.
    digits = digits_section(
        out / "digits",
        digits_pipeline,
        num_samples,
        steps,
        seed,
        digits_limit,
        digits_held_out,
        bound_timesteps,
    )

    # 2. Reconstructions of photos the model never saw, scored as written (8-bit), with the bicubic baseline.
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

    # Their diffusion-ready latents.
    latents = {}
    with torch.inference_mode():
        for path in originals:
            x = pad_to_multiple(load_image(path), vae.config.downsample_factor)[None]
            latents[path.stem] = vae.scale_latents(vae.encode(x).mode())[0].contiguous()
    with atomic_path(out / "latents.safetensors") as tmp:
        save_file(latents, str(tmp))

    # 3. and 4. What the latent space looks like.
    interpolation = (
        interpolate_photos(vae, originals[:2], out / "interpolation") if len(originals) > 1 else None
    )
    channels = latent_channels(latents[originals[0].stem], out / "channels")

    # 5. New photos from the photo DDPM, decoded by the same autoencoder.
    samples = write_samples(
        vae, unet, sampling_scheduler(scheduler, "ddim"), out / "samples", num_samples, steps, seed
    )
    summary = {
        "pipeline": str(folder),
        "dtype": str(vae.dtype).removeprefix("torch."),
        "digits": digits,
        "images": rows,
        "mean": mean,
        "latent_shapes": {k: list(v.shape) for k, v in latents.items()},
        "interpolation": interpolation,
        "channels": channels,
        "samples": [p.name for p in samples],
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(summary, out / "metrics.json")
    _write_report(out, summary)
    return summary


# ------------------------------------------------------------------------------------------- digits


def _grid(images: torch.Tensor, path: Path) -> Path:
    """(N, 3, H, W) in [-1, 1] as one PNG grid, white padding."""
    from torchvision.utils import make_grid

    nrow = max(1, round(len(images) ** 0.5))
    return save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), path)


def digits_section(
    out: Path,
    pipeline: str | Path | None,
    num_samples: int,
    steps: int,
    seed: int,
    limit: int | None,
    held_out: int,
    bound_timesteps: int,
) -> dict:
    """The digits part of the demo (fp32): samples, grids and held-out bits/dim; returns its summary.

    The digits are written as PNGs and cached with ``cache_latents`` exactly as the digits DDPM's training data
    was, so the held-out set, the posterior samples (``seed``) and the numbers are the trainer's validation's.
    """
    vae, unet, scheduler = load_pipeline(pipeline or DIGITS_PIPELINE, dtype="fp32")
    files = write_digits(out / "images", DIGIT_SIZE, limit)
    cache = out / "latents"
    cache_latents(
        vae, files, cache, root=out / "images", resolution=DIGIT_SIZE, batch_size=64, progress=False,
        model_name=str(pipeline or DIGITS_PIPELINE),
    )  # fmt: skip
    train_items, held = held_out_split(read_manifest(cache), held_out)
    train, val = LatentDataset(cache, train_items), LatentDataset(cache, held)
    scale = vae.config.scaling_factor  # what the UNet was trained with
    train.scale = val.scale = scale
    z = val.fixed_samples(seed)  # (N, C, 8, 8): the trainer's held-out posterior samples
    noise = sampling_scheduler(scheduler, "ddpm", 0.0)
    bound = vlb_bits_per_dim(unet, noise, z, bound_timesteps or None, torch.Generator().manual_seed(seed))
    bits = {"ddpm_bound": bound["total"].mean().item()}
    for key, fit in gaussian_baselines(train.fixed_draws(seed)).items():
        bits[key] = gaussian_bits_per_dim(z, *fit).mean().item()

    # Samples: the DDPM's, and the VAE's own prior N(0, I) decoded, next to real training digits.
    ddpm = write_samples(
        vae, unet, sampling_scheduler(scheduler, "ddim"), out / "ddpm", num_samples, steps, seed
    )
    c, s = unet.config.in_channels, unet.config.sample_size
    prior_z = torch.randn(num_samples, c, s, s, generator=torch.Generator().manual_seed(seed))
    prior = decode_latents(vae, prior_z)  # (N, 3, 64, 64)
    _grid(prior, out / "prior" / "grid.png")
    real = torch.stack([load_image(files[i]) for i in train_items])  # (N_train, 3, 64, 64) in [-1, 1]
    _grid(real[:num_samples], out / "real.png")
    # Memorization check: each sample's nearest training digit (RMSE in [-1, 1] pixels), and the same distance
    # for held-out real digits, which no training digit copies.
    generated = torch.stack([load_image(p) for p in ddpm])
    held_images = torch.stack([load_image(files[i]) for i in held])

    def nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = torch.cdist(x.flatten(1).double(), real.flatten(1).double()) / x[0].numel() ** 0.5
        return d.min(1)

    dist, idx = nearest(generated)
    _grid(real[idx], out / "nearest.png")
    held_dist, _ = nearest(held_images)
    _, std = latent_moments([train.mean], [train.std])
    return {
        "pipeline": str(pipeline or WEIGHTS_DIR / DIGITS_PIPELINE),
        "num_train": len(train),
        "num_held_out": len(val),
        "latent_shape": list(z.shape[1:]),
        "scaling_factor": scale,
        "training_scale": 1.0 / std,  # recomputed here from the training digits: equals the pipeline's
        "bound_timesteps": bound_timesteps,
        "bits_per_dim": bits,
        "nearest_rmse_samples": dist.mean().item(),
        "nearest_rmse_held_out": held_dist.mean().item(),
        "samples": [p.name for p in ddpm],
    }


# ------------------------------------------------------------------------------------------- latent space


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two latents (any shape) along the great circle through them."""
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:  # parallel: the great circle degenerates to the line
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def interpolate_photos(vae: AutoencoderKL, paths: Sequence[Path], out: Path) -> dict:
    """Decodes points on the linear and the spherical path between two photos' scaled latents.

    Writes ``linear-K.png`` / ``slerp-K.png`` per point and a strip of each; returns the points and the RMS of
    the latents there (a linear midpoint of two nearly orthogonal latents has about 1/sqrt(2) of their norm,
    so it decodes as a faded blend; the spherical path keeps the norm).
    """
    size, f = INTERPOLATION_SIZE, vae.config.downsample_factor
    xs = [center_crop(resize_short_side(load_image(p), size), size) for p in paths]  # (3, 256, 256) each
    with torch.inference_mode():
        a, b = (vae.scale_latents(vae.encode(x[None].to(vae.device)).mode())[0].float() for x in xs)
        result = {"endpoints": [p.stem for p in paths], "size": size, "points": list(INTERPOLATION_POINTS)}
        for kind in ("linear", "slerp"):
            zs = [(1 - t) * a + t * b if kind == "linear" else slerp(a, b, t) for t in INTERPOLATION_POINTS]
            images = decode_latents(vae, torch.stack(zs).to(vae.device)).cpu()  # (K, 3, 256, 256)
            for k, image in enumerate(images):
                save_image(image, out / f"{kind}-{k}.png")
            from torchvision.utils import make_grid

            save_image(make_grid(images, nrow=len(images), padding=4, pad_value=1.0), out / f"{kind}.png")
            result[f"{kind}_rms"] = [z.square().mean().sqrt().item() for z in zs]
    result["latent_shape"] = [a.shape[0], size // f, size // f]
    return result


def latent_channels(z: torch.Tensor, out: Path) -> dict:
    """Each channel of one photo's scaled latent (C, h, w) as a grey picture, -3 black to +3 white.

    Returns each channel's mean and std (the VAE's latents are not N(0, I) per channel: the KL term is weak).
    """
    z = z.float().cpu()
    for k, channel in enumerate(z):
        grey = (channel / CHANNEL_RANGE).clamp(-1, 1).expand(3, -1, -1)  # (3, h, w) in [-1, 1]
        save_image(grey, out / f"channel-{k}.png")
    return {"shape": list(z.shape), "mean": z.mean((1, 2)).tolist(), "std": z.std((1, 2)).tolist()}


# ------------------------------------------------------------------------------------------- report


def _write_report(out: Path, summary: dict) -> Path:
    rows, mean, f = summary["images"], summary["mean"], 8
    esc = html.escape
    d = summary["digits"]
    bits = d["bits_per_dim"]
    names = {"ddpm_bound": "latent DDPM, variational bound", **BASELINE_NAMES}
    bits_rows = "".join(
        f"<tr><td style=text-align:left>{esc(names[k])}</td><td>{v:.3f}</td></tr>"
        for k, v in sorted(bits.items(), key=lambda kv: kv[1])
    )
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
    interp = summary["interpolation"]
    if interp:
        a, b = interp["endpoints"]
        pts = ", ".join(f"{t:g}" for t in interp["points"])
        rms = "".join(
            f"<tr><td style=text-align:left>{kind}</td>"
            + "".join(f"<td>{v:.3f}</td>" for v in interp[f"{kind}_rms"])
            + "</tr>"
            for kind in ("linear", "slerp")
        )
        interp_html = f"""<h2 id=interpolation>Latent interpolation: {esc(a)} to {esc(b)}</h2>
<p>Both photos' {interp["size"]} px center squares are encoded to {"x".join(map(str, interp["latent_shape"]))}
latents (posterior means, scaled); the points t = {pts} on the straight line (1-t) z<sub>a</sub> + t z<sub>b</sub>
and on the great circle through them (slerp) are decoded. The decoder only ever saw latents of real images: the
in-between points are blends, not new photos (a VAE's latent space is smooth, not semantic, at this size). RMS of
the latent at each point, which the straight line shrinks in the middle:</p>
<table><tr><th></th>{"".join(f"<th>t={t:g}</th>" for t in interp["points"])}</tr>{rms}</table>
<p>linear</p><img class=strip src='interpolation/linear.png'>
<p>spherical</p><img class=strip src='interpolation/slerp.png'>"""
    else:
        interp_html = ""
    ch = summary["channels"]
    chans = "".join(
        f"<figure><img class=chan src='channels/channel-{k}.png'><figcaption>channel {k}: mean {m:+.2f}, "
        f"std {s:.2f}</figcaption></figure>"
        for k, (m, s) in enumerate(zip(ch["mean"], ch["std"], strict=True))
    )
    first = next(iter(summary["latent_shapes"]))
    grid = "<img class=grid src='samples/grid.png'>" if summary["samples"] else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ldm_vae demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:2px 10px;text-align:right}}
tr.mean{{font-weight:bold}}figure{{display:inline-block;margin:6px}}figure img{{height:220px}}
img.grid{{max-width:100%;image-rendering:pixelated}}img.digits{{width:300px;image-rendering:pixelated}}
img.strip{{max-width:100%}}img.chan{{height:256px;image-rendering:pixelated}}</style></head><body>
<h1>ldm_vae demo</h1>
<p>A VAE compresses an image to a small latent (here f={f}: 8x fewer pixels per side, 4 channels) and decodes it
back; latent diffusion trains a denoising diffusion model on those latents instead of pixels. Shipped weights:
<code>{esc(summary["pipeline"])}</code> (photos) and <code>{esc(d["pipeline"])}</code> (digits), autoencoder in
{esc(summary["dtype"])} for the photos and fp32 for the digits ({summary["seconds"]} s in all).</p>

<h2 id=digits>Latent diffusion on handwritten digits</h2>
<p>scikit-learn's 8x8 handwritten digits, upscaled to 64 px, encoded by the same photo-trained autoencoder to
{"x".join(map(str, d["latent_shape"]))} latents; a small DDPM was trained on the latents of {d["num_train"]} of
them. Left to right: real training digits; the DDPM's samples (DDIM, decoded); each sample's nearest training
digit (mean RMSE {d["nearest_rmse_samples"]:.3f}, against {d["nearest_rmse_held_out"]:.3f} for held-out real
digits: the samples are not copies); decoded draws from the VAE's N(0, I) prior.</p>
<figure><img class=digits src='digits/real.png'><figcaption>real (training set)</figcaption></figure>
<figure><img class=digits src='digits/ddpm/grid.png'><figcaption>latent DDPM samples</figcaption></figure>
<figure><img class=digits src='digits/nearest.png'><figcaption>nearest training digit</figcaption></figure>
<figure><img class=digits src='digits/prior/grid.png'><figcaption>VAE prior N(0, I), decoded</figcaption></figure>
<p>Held-out bits per dimension of the last {d["num_held_out"]} digits' latents (posterior samples, scaled by
{d["scaling_factor"]:.5f}; {d["bound_timesteps"]} importance-sampled timesteps for the bound), lower is better.
Continuous densities on latents, so negative values are possible; the Gaussians are fitted to the training
latents.</p>
<table><tr><th style=text-align:left>model</th><th>bits/dim</th></tr>{bits_rows}</table>
<p>The VAE's prior is what a VAE alone samples from: its samples are not digits, because the encoder's latents
of digits sit in a small corner of latent space that N(0, I) rarely visits. The DDPM learns that corner.</p>

<h2 id=reconstructions>Reconstructions (f={f}) against bicubic x{f} down/up</h2>
<table><tr><th>image</th><th>size</th><th>PSNR</th><th>SSIM</th><th>bicubic PSNR</th><th>bicubic SSIM</th></tr>
{table}</table>
{pairs}
{interp_html}
<h2 id=channels>The latent channels of {esc(first)}</h2>
<p>The {ch["shape"][0]} channels of its {"x".join(map(str, ch["shape"]))} scaled latent, each as a picture
(black -{CHANNEL_RANGE:g}, white +{CHANNEL_RANGE:g}): the latent is still an image, 8x smaller, which is why
convolutional diffusion models work on it.</p>
{chans}
<h2 id=samples>Samples from the photo latent DDPM, decoded by the autoencoder</h2>
<p>Trained on crops of a few hundred photos: textures and colours, not objects.</p>
{grid}
</body></html>
"""
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
