"""How a KL autoencoder's reconstructions depend on the extent it sees, on scikit-image's colour photos.

GroupNorm statistics and the mid-block attention are computed over the whole latent, so a model trained on
small crops meets other statistics on a whole photo. This scores, in fp32 and 8-bit as written, each photo
(cropped to a multiple of ``--block``) four ways: encoded and decoded whole; encoded and decoded in independent
``--block`` px blocks; and the two mixtures (encoder whole, decoder in blocks, and the reverse). It also scores
the whole-photo reconstruction with its mean colour error per channel removed, an oracle (it uses the
original) that measures how much of the error is a global colour shift.

    python scripts/measure_extent.py --model demo [--block 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor

from ldm_vae import AutoencoderKL
from ldm_vae.demo import DEMO_PHOTOS, bundled_photos
from ldm_vae.images import round_to_8bit
from ldm_vae.metrics import psnr

WAYS = (
    "whole",
    "blocks",
    "encoder whole, decoder blocks",
    "encoder blocks, decoder whole",
    "whole, colour oracle",
)


def blockwise(fn, x: Tensor, block: int, scale: float) -> Tensor:
    """``fn`` applied to each ``block`` x ``block`` tile of ``x`` (B, C, H, W) on its own, tiles reassembled;
    ``scale`` is the output's size per input pixel."""
    rows = []
    for i in range(0, x.shape[-2], block):
        rows.append(
            torch.cat([fn(x[..., i : i + block, j : j + block]) for j in range(0, x.shape[-1], block)], -1)
        )
    out = torch.cat(rows, -2)
    assert out.shape[-2:] == (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
    return out


@torch.no_grad()
def measure(vae: AutoencoderKL, photo: Tensor, block: int) -> dict[str, float]:
    """PSNR (dB) of the ways of :data:`WAYS` for one photo (1, 3, H, W) in [-1, 1], H and W multiples of block."""
    f = vae.config.downsample_factor
    z_whole = vae.encode_latents(photo)
    z_blocks = blockwise(vae.encode_latents, photo, block, 1 / f)
    whole = vae.decode(z_whole).clamp(-1, 1)
    oracle = (whole - (whole - photo).mean((-2, -1), keepdim=True)).clamp(-1, 1)
    out = {
        "whole": whole,
        "blocks": blockwise(vae.decode, z_blocks, block // f, f).clamp(-1, 1),
        "encoder whole, decoder blocks": blockwise(vae.decode, z_whole, block // f, f).clamp(-1, 1),
        "encoder blocks, decoder whole": vae.decode(z_blocks).clamp(-1, 1),
        "whole, colour oracle": oracle,
    }
    return {k: psnr(round_to_8bit(v), photo).item() for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="shipped name, folder or file of a KL autoencoder")
    p.add_argument(
        "--block", type=int, default=128, help="block edge in px (a multiple of the model's factor)"
    )
    p.add_argument("--photos", nargs="+", default=list(DEMO_PHOTOS))
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    vae = AutoencoderKL.from_pretrained(args.model).float().eval()
    if args.block % vae.config.downsample_factor:
        p.error(f"--block must be a multiple of {vae.config.downsample_factor}")
    rows = {}
    for name, a in bundled_photos(args.photos).items():
        h, w = (a.shape[0] // args.block) * args.block, (a.shape[1] // args.block) * args.block
        x = torch.from_numpy(a[:h, :w]).permute(2, 0, 1)[None].float() / 127.5 - 1
        rows[name] = measure(vae, x, args.block)
        print(name, f"{h}x{w}", "  ".join(f"{k}: {v:.2f}" for k, v in rows[name].items()), flush=True)
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in WAYS}
    print(f"\nmean PSNR dB of {len(rows)} photos, {args.block} px blocks, fp32, 8-bit:")
    for k, v in mean.items():
        print(f"  {k:32s} {v:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "block": args.block, "photos": rows, "mean": mean}, f, indent=2)


if __name__ == "__main__":
    main()
