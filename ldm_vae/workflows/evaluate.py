"""``ldm-vae eval``: several autoencoders on the same images under one stated protocol.

Per image and model: PSNR and SSIM of the 8-bit reconstruction (Wang et al., 2004, for SSIM), LPIPS (Zhang et
al., 2018) where its backbone weights are present, and the colour drift of k repeated encode/decode round trips
(each round trip saved as 8-bit, as img2img and inpainting users chain them). Per model: whether an fp16 decode
stays finite, time per megapixel and peak memory on the current device. With ``equivariance``, the latent
regularizers' metric too (:func:`ldm_vae.latent_regularizers.equivariance_psnr`: decode(tau(z)) against tau(x)
for flips, rotations and 2x/4x downscales). Published numbers (e.g. SD-VAE ft-MSE on
COCO-2017 val at 256 px) are only comparable under one protocol, so the protocol is part of every output.
"""

from __future__ import annotations

import contextlib
import html
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..images import center_crop, load_image, pad_to_multiple, resize_short_side, round_to_8bit, save_image
from ..interface import Autoencoder
from ..io import atomic_path, write_json
from ..latent_regularizers import EQUIVARIANCE_GROUPS, equivariance_psnr
from ..metrics import psnr, ssim
from .base import WorkflowError, progress
from .models import load_model


@dataclass(frozen=True)
class Protocol:
    """How images are prepared before they are encoded."""

    name: str  # "native", or "coco256" / "center<N>"
    size: int | None  # None: each image at its own size (padded to the model's multiple, scored unpadded)
    dtype: str  # the compute dtype asked for (auto, fp32, bf16, fp16)
    rounds: tuple[int, ...]  # round trips at which drift is reported

    def describe(self) -> str:
        prep = (
            "each image at its own size, padded to the model's multiple (reflect), scored on the original pixels"
            if self.size is None
            else f"short side resized to {self.size} (bicubic, antialiased), center {self.size}x{self.size} crop"
        )
        return f"{self.name}: {prep}; 8-bit outputs; dtype {self.dtype}; drift after {list(self.rounds)} round trips"


def parse_protocol(name: str, dtype: str, rounds: Sequence[int]) -> Protocol:
    """``native``, ``coco256`` (the SD/SDXL VAE model cards' 256 px COCO protocol) or ``center<N>``."""
    if name == "native":
        size = None
    elif name == "coco256":
        size = 256
    elif m := re.fullmatch(r"center(\d+)", name):
        size = int(m[1])
    else:
        raise WorkflowError(f"unknown protocol {name!r}: native, coco256 or center<N> (e.g. center512)")
    if not rounds or min(rounds) < 1:
        raise WorkflowError(f"round trips must be positive integers, got {list(rounds)}")
    return Protocol(name, size, dtype, tuple(sorted(set(rounds))))


def prepare(path: Path, protocol: Protocol) -> Tensor:
    """An image file -> (3, H, W) in [-1, 1] on the 8-bit grid, as the protocol prepares it."""
    x = load_image(path)
    if protocol.size is not None:
        x = center_crop(resize_short_side(x, protocol.size), protocol.size)
    return round_to_8bit(x)


# ------------------------------------------------------------------------------------------- measuring


def round_trip(vae: Autoencoder, x: Tensor) -> Tensor:
    """One encode/decode of (3, H, W), padded to the model's multiple, cropped back and saved as 8-bit."""
    return _encode_decode(vae, x)[0]


def _encode_decode(vae: Autoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """(:func:`round_trip` of ``x``, the latents it decoded (1, C, h, w))."""
    h, w = x.shape[-2:]
    padded = pad_to_multiple(x, vae.config.downsample_factor)[None].to(vae.device)
    z = vae.encode_latents(padded)
    return round_to_8bit(vae.decode(z)[0, :, :h, :w].cpu()), z


def drift(original: Tensor, recon: Tensor) -> dict[str, Any]:
    """PSNR against the original and the mean colour shift per channel, in 8-bit levels."""
    shift = ((recon - original).mean(dim=(1, 2)) * 127.5).tolist()
    return {"psnr": psnr(original, recon).item(), "color_shift": [round(v, 4) for v in shift]}


class PeakMemory:
    """Peak memory of a stretch of work: CUDA's allocator peak, or the process's resident peak (Linux VmHWM,
    reset through /proc/self/clear_refs) on CPU; None where neither can be read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):  # not Linux: the peak is then the process's since it started
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return None
        m = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(m[1]) * 1024 if m else None


def fp16_finite(src: str, device: torch.device, latents: list[Tensor]) -> bool:
    """Whether the model decodes every latent to finite values in fp16 (no overflow, no fp32 fallback)."""
    vae = load_model(src, "fp16", device)
    with torch.inference_mode():
        return _decodes_finite(vae, latents, device)


def _decodes_finite(vae: Autoencoder, latents: list[Tensor], device: torch.device) -> bool:
    for z in latents:
        out = vae.decode(z.to(device))
        # AutoencoderKL.decode redoes an overflowing fp16 decode in fp32 (and stays fp32): that is a failure.
        if vae.dtype != torch.float16 or not torch.isfinite(out).all():
            return False
    return True


def evaluate_model(
    src: str,
    names: Sequence[str],
    originals: Sequence[Tensor],
    protocol: Protocol,
    device: torch.device,
    perceptual: Any,
    fp16: bool,
    equivariance: bool = False,
) -> tuple[dict[str, Any], list[Tensor]]:
    """(results of one model on the prepared images ``originals``, its 8-bit first reconstructions)."""
    memory = PeakMemory(device)
    memory.reset()
    vae = load_model(src, protocol.dtype, device)
    rows, recons, latents, seconds, pixels = [], [], [], 0.0, 0
    with torch.inference_mode():
        round_trip(vae, originals[0])  # untimed: first calls pay one-off set-up costs
        for name, x in progress(list(zip(names, originals, strict=True)), len(names), f"eval {src}"):
            start = time.perf_counter()
            current, z = _encode_decode(vae, x)
            seconds += time.perf_counter() - start
            pixels += x.shape[-1] * x.shape[-2]
            latents.append(z.float().cpu())  # for the fp16 check
            row = {"image": name, "size": list(x.shape[-2:])}
            row.update(psnr=psnr(x, current).item(), ssim=ssim(x, current).item())
            row["lpips"] = perceptual(x[None], current[None]).item() if perceptual is not None else None
            trips, first = {1: drift(x, current)}, current
            for k in range(2, protocol.rounds[-1] + 1):
                current = round_trip(vae, current)
                if k in protocol.rounds:
                    trips[k] = drift(x, current)
            row["drift"] = {str(k): trips[k] for k in protocol.rounds}
            if equivariance:  # untimed; on the padded image the latents come from
                padded = pad_to_multiple(x, vae.config.downsample_factor)[None].to(vae.device)
                row["equivariance"] = {k: v.item() for k, v in equivariance_psnr(vae, padded, z).items()}
            rows.append(row)
            recons.append(first)
        peak = memory.peak()
    finite = fp16_finite(src, device, latents) if fp16 else None
    result = {
        "mean": _means(rows, protocol),
        "images": rows,
        "fp16_finite": finite,
        "seconds_per_megapixel": seconds / (pixels / 1e6),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "CUDA allocator peak"
        if device.type == "cuda"
        else "process resident peak (VmHWM)",
        "dtype": str(vae.dtype).removeprefix("torch."),
    }
    return result, recons


def _means(rows: list[dict], protocol: Protocol) -> dict[str, Any]:
    def avg(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None and math.isfinite(v)]
        return sum(kept) / len(kept) if kept else None

    mean = {k: avg([r[k] for r in rows]) for k in ("psnr", "ssim", "lpips")}
    for k in map(str, protocol.rounds):
        mean[f"drift_psnr_{k}"] = avg([r["drift"][k]["psnr"] for r in rows])
        shifts = [r["drift"][k]["color_shift"] for r in rows]
        mean[f"color_shift_{k}"] = [avg([s[c] for s in shifts]) for c in range(3)]
    if rows and "equivariance" in rows[0]:
        for group, names in EQUIVARIANCE_GROUPS.items():  # avg skips inf: a transform a model maps exactly
            mean[f"equivariance_{group}"] = avg(
                [r["equivariance"][n] for r in rows for n in names if n in r["equivariance"]]
            )
    return mean


# ------------------------------------------------------------------------------------------- reporting


def format_results(results: dict[str, Any]) -> str:
    """One line per model: the means, fp16 finiteness, speed and memory; the protocol first."""
    k = str(results["protocol"]["rounds"][-1])
    head = f"{'model':<24} {'PSNR':>7} {'SSIM':>6} {'LPIPS':>6} {f'PSNR@{k}':>8} {f'shift@{k} (R,G,B)':>20} "
    head += f"{'fp16':>5} {'s/MP':>7} {'peak GB':>8}"
    groups = [
        g
        for g in EQUIVARIANCE_GROUPS
        if any(f"equivariance_{g}" in r["mean"] for r in results["models"].values())
    ]
    head += "".join(f" {'EQ-' + g:>8}" for g in groups)
    lines = [f"protocol: {results['protocol']['description']}", f"LPIPS: {results['lpips']}", head]
    for name, r in results["models"].items():
        m = r["mean"]
        eq = "".join(f" {_maybe(m.get(f'equivariance_{g}')):>8}" for g in groups)
        lp = f"{m['lpips']:.4f}" if m["lpips"] is not None else "n/a"
        shift = ",".join(f"{v:+.2f}" for v in m[f"color_shift_{k}"])
        fp16 = {True: "yes", False: "NO", None: "-"}[r["fp16_finite"]]
        peak = f"{r['peak_memory_bytes'] / 1e9:.2f}" if r["peak_memory_bytes"] else "-"
        lines.append(
            f"{name[-24:]:<24} {m['psnr']:>7.2f} {m['ssim']:>6.4f} {lp:>6} {m[f'drift_psnr_{k}']:>8.2f} "
            f"{shift:>20} {fp16:>5} {r['seconds_per_megapixel']:>7.2f} {peak:>8}{eq}"
        )
    if groups:
        lines.append(
            "EQ-d4 / EQ-scale: mean PSNR (dB) of decode(tau(z)) against tau(x), flips+rotations / 2x,4x"
        )
    return "\n".join(lines)


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _crop(x: Tensor, size: int = 192) -> Tensor:
    """The central ``size`` x ``size`` pixels (1:1) of (3, H, W)."""
    h, w = x.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[:, top : top + size, left : left + size]


def heat_map(original: Tensor, recon: Tensor, gain: float = 4.0) -> Tensor:
    """|recon - original| averaged over channels, times ``gain``, as a black-red-yellow-white image in [-1, 1]."""
    d = ((recon - original).abs().mean(dim=0) / 2 * gain).clamp(0, 1)  # (H, W) in [0, 1]
    rgb = torch.stack([(3 * d).clamp(0, 1), (3 * d - 1).clamp(0, 1), (3 * d - 2).clamp(0, 1)])
    return rgb * 2 - 1


def write_report(
    out: Path, files: Sequence[Path], protocol: Protocol, originals: list[Tensor], recons: dict, table: str
) -> Path:
    """``report.html``: per image, the original and each model's reconstruction at 1:1 with its heat map."""
    esc = html.escape
    rows = []
    for i, (path, x) in enumerate(zip(files, originals, strict=True)):
        cells = [f"<td><img src='crops/{i:04d}-original.png'><br>original</td>"]
        save_image(_crop(x), out / "crops" / f"{i:04d}-original.png")
        for j, (name, images) in enumerate(recons.items()):
            save_image(_crop(images[i]), out / "crops" / f"{i:04d}-m{j}.png")
            save_image(_crop(heat_map(x, images[i])), out / "crops" / f"{i:04d}-m{j}-diff.png")
            cells.append(
                f"<td><img src='crops/{i:04d}-m{j}.png'><img src='crops/{i:04d}-m{j}-diff.png'><br>{esc(name)}</td>"
            )
        rows.append(f"<tr><th>{esc(path.name)}</th>{''.join(cells)}</tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ldm-vae eval</title>
<style>body{{font-family:sans-serif}}td{{padding:4px;text-align:center;vertical-align:top}}
img{{image-rendering:pixelated;margin:1px}}pre{{background:#f4f4f4;padding:8px}}</style></head><body>
<h1>ldm-vae eval</h1><p>Protocol: {esc(protocol.describe())}</p>
<pre>{esc(table)}</pre>
<p>Central crops at 1:1; beside each reconstruction, |reconstruction - original| x4 (black: equal).</p>
<table>{"".join(rows)}</table></body></html>
"""
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path


def evaluate(
    files: Sequence[Path],
    models: Sequence[str],
    out: Path,
    protocol: Protocol,
    device: torch.device,
    fp16: bool,
    equivariance: bool = False,
) -> dict[str, Any]:
    """Runs every model on ``files``; writes ``results.json``, ``report.html`` and crops into ``out``."""
    if not files:
        raise WorkflowError("no images to evaluate")
    if len(set(models)) != len(models):
        raise WorkflowError("a model is named twice")
    perceptual, lpips_note = _lpips(device)
    results: dict[str, Any] = {
        "protocol": {**asdict(protocol), "description": protocol.describe()},
        "lpips": lpips_note,
        "device": str(device),
        "models": {},
    }
    originals = [prepare(p, protocol) for p in files]  # decoded once, shared by every model
    names, recons = [p.name for p in files], {}
    for src in models:
        results["models"][src], recons[src] = evaluate_model(
            src, names, originals, protocol, device, perceptual, fp16, equivariance
        )
    write_json(results, out / "results.json")
    write_report(out, files, protocol, originals, recons, format_results(results))
    return results


def _lpips(device: torch.device) -> tuple[Any, str]:
    """LPIPS (VGG) when its ImageNet weights are on disk, else None and a note saying where they go."""
    from ..losses import MissingWeightsError, backbone_weights_path, build_lpips

    try:
        return build_lpips("vgg").to(device).eval(), "LPIPS (VGG), Zhang et al. 2018"
    except MissingWeightsError:
        return None, f"not computed: no VGG ImageNet weights at {backbone_weights_path('vgg')}"
