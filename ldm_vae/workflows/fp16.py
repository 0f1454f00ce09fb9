"""Is an autoencoder safe to run in fp16? Per-block activation maxima in fp32 against fp16's 65504, and whether
an fp16 encode and decode stay finite (the check behind ``ldm-vae check-fp16``).

The SDXL VAE is the known case: its fp32 activations exceed 65504, so its fp16 decode is NaN unless upcast
(diffusers' ``force_upcast``); sdxl-vae-fp16-fix (Boer Bohan, 2023) fine-tuned it to keep its outputs with
smaller activations. :mod:`ldm_vae.training.fp16_fix` is that fine-tune here.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..activations import FP16_MAX, record_maxima
from ..images import center_crop, load_image, pad_to_multiple, resize_short_side
from ..interface import Autoencoder
from ..io import write_json
from ..metrics import psnr
from ..modules import Attention
from .base import WorkflowError


@dataclass(frozen=True)
class FP16Report:
    """The fp16 verdict of one model on some images."""

    maxima: dict[
        str, float
    ]  # block name -> largest |activation| in fp32 over all images (encoder.*, decoder.*)
    fp16_maxima: dict[str, float]  # the same blocks run in fp16 (inf or NaN once they overflowed)
    encode_finite: bool  # every fp16 encode gave finite latents
    decode_finite: bool  # every fp16 decode (of the fp32 latents) gave finite images, with no fp32 fallback
    fp16_psnr: float | None  # mean PSNR (dB) of the fp16 decode against the fp32 one; None if not finite
    limit: float = FP16_MAX  # fp16's largest finite value
    overflowing: tuple[str, ...] = field(default=())  # blocks whose fp32 maximum exceeds ``limit``

    @property
    def largest(self) -> tuple[str, float]:
        """(block, value) of the largest fp32 activation."""
        name = max(self.maxima, key=self.maxima.__getitem__)
        return name, self.maxima[name]

    @property
    def safe(self) -> bool:
        return self.encode_finite and self.decode_finite and not self.overflowing

    @property
    def verdict(self) -> str:
        """One line: safe or not, and why."""
        name, value = self.largest
        where = f"largest activation {value:.4g} in {name}"
        if self.safe:
            return f"fp16-safe: {where}, {self.limit / value:.2g}x under the fp16 limit; fp16 encode and decode finite"
        failed = [w for w, ok in (("encode", self.encode_finite), ("decode", self.decode_finite)) if not ok]
        parts = (
            [f"{len(self.overflowing)} block(s) exceed {self.limit:.0f} in fp32"] if self.overflowing else []
        )
        parts += [f"fp16 {' and '.join(failed)} not finite"] if failed else []
        return f"NOT fp16-safe: {'; '.join(parts)} ({where})"

    def to_json(self) -> dict:
        def num(v: float | None) -> float | str | None:
            return v if v is None or math.isfinite(v) else str(v)  # JSON has no inf/nan

        d = asdict(self)
        d["maxima"] = {k: num(v) for k, v in self.maxima.items()}
        d["fp16_maxima"] = {k: num(v) for k, v in self.fp16_maxima.items()}
        d["overflowing"] = list(self.overflowing)
        d.update(safe=self.safe, verdict=self.verdict)
        return d


def load_check_images(paths: Sequence[Path], resolution: int | None, multiple: int) -> list[Tensor]:
    """Image files -> (1, 3, H, W) tensors in [-1, 1]: center crops of side ``resolution`` (short side resized
    to it first), or the whole images padded to ``multiple``."""
    out = []
    for p in paths:
        x = load_image(p)
        x = (
            center_crop(resize_short_side(x, resolution), resolution)
            if resolution
            else pad_to_multiple(x, multiple)
        )
        out.append(x[None])
    return out


def _fp16_copy(model: Autoencoder) -> Autoencoder:
    half = copy.deepcopy(model)
    return half.to_runtime("fp16", model.device)  # type: ignore[attr-defined]


@torch.inference_mode()
def check_fp16(model: Autoencoder, images: Sequence[Tensor]) -> FP16Report:
    """Runs ``model`` (fp32) and an fp16 copy of it on ``images`` and reports how fp16 fares.

    Args:
        model: an fp32 autoencoder; it is not changed.
        images: (B, 3, H, W) batches in [-1, 1].

    Raises:
        WorkflowError: no images, or a model that is not fp32.
    """
    if not images:
        raise WorkflowError("check_fp16 needs at least one image")
    if model.dtype != torch.float32:  # type: ignore[attr-defined]
        raise WorkflowError(f"check_fp16 measures an fp32 model, got {model.dtype}")  # type: ignore[attr-defined]
    device = model.device  # type: ignore[attr-defined]
    half = _fp16_copy(model)
    latents, decoded = [], []
    with record_maxima(model) as maxima:
        for x in images:
            z = model.encode_latents(x.to(device))
            latents.append(z)
            decoded.append(model.decode(z))
    enc_ok, dec_ok, scores = True, True, []
    with record_maxima(half) as fp16_maxima:
        for x, z, ref in zip(images, latents, decoded, strict=True):
            enc_ok &= bool(torch.isfinite(half.encode_latents(x.to(device))).all())
            with warnings.catch_warnings():  # the fp32 fallback's warning: here it is the finding
                warnings.simplefilter("ignore")
                out = half.decode(z)
            ok = half.dtype == torch.float16 and bool(torch.isfinite(out).all())  # type: ignore[attr-defined]
            if not ok and half.dtype != torch.float16:  # type: ignore[attr-defined]
                half = _fp16_copy(model)  # decode fell back to fp32: keep measuring fp16
            dec_ok &= ok
            if ok:
                scores.append(psnr(out.clamp(-1, 1), ref.clamp(-1, 1)).mean().item())
    over = tuple(n for n, v in maxima.items() if not v <= FP16_MAX)  # NaN counts as overflowing
    return FP16Report(
        maxima=dict(maxima),
        fp16_maxima={n: fp16_maxima.get(n, math.nan) for n in maxima},
        encode_finite=enc_ok,
        decode_finite=dec_ok,
        fp16_psnr=sum(scores) / len(scores) if dec_ok else None,
        overflowing=over,
    )


def format_fp16_report(report: FP16Report, top: int | None = 8) -> str:
    """A table of the blocks (fp32 max, fp16 max, share of the limit, overflow mark), then the verdict.

    Args:
        report: what :func:`check_fp16` found.
        top: list only the ``top`` largest blocks (overflowing ones always); None lists all in network order.
    """
    names = list(report.maxima)
    if top is not None:
        largest = set(sorted(names, key=lambda n: -report.maxima[n])[:top]) | set(report.overflowing)
        names = [n for n in names if n in largest]
    lines = [f"{'block':<40} {'fp32 max':>10} {'fp16 max':>10} {'/ 65504':>8}"]
    for name in names:
        v = report.maxima[name]
        mark = "  OVERFLOW" if name in report.overflowing else ""
        lines.append(
            f"{name:<40} {v:>10.4g} {report.fp16_maxima[name]:>10.4g} {v / report.limit:>8.3f}{mark}"
        )
    lines.append(
        f"fp16 limit {report.limit:.0f}; fp16 encode finite: {'yes' if report.encode_finite else 'NO'}; "
        f"fp16 decode finite: {'yes' if report.decode_finite else 'NO'}"
        + (f" (PSNR vs fp32 decode {report.fp16_psnr:.2f} dB)" if report.fp16_psnr is not None else "")
    )
    lines.append(report.verdict)
    return "\n".join(lines)


def write_fp16_report(report: FP16Report, path: str | Path) -> None:
    """The report as JSON (infinities as strings), written atomically."""
    write_json(report.to_json(), path)


# ------------------------------------------------------------------------------------------- a broken model


@torch.no_grad()
def rescale_attention_values(attention: Attention, factor: float) -> None:
    """Multiplies ``to_v`` (weight and bias) by ``factor`` and divides ``to_out``'s weight by it, in place.

    Attention is linear in v, so the output is unchanged in exact arithmetic; with a power of two ``factor``
    every product is exactly rescaled in floating point too, so fp32 outputs are bit-identical, while v (and
    so fp16's range) grows ``factor`` times. A function-preserving way to make an fp16-unsafe model.
    """
    attention.to_v.weight.mul_(factor)
    attention.to_v.bias.mul_(factor)
    attention.to_out[0].weight.div_(factor)
