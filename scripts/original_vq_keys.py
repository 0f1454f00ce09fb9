"""Checks ldm_vae's VQ single files against the original taming-transformers modules, and writes the key fixture
that tests/test_vq_formats.py compares exports with (tests/data/original_vq_keys.json).

For each case it builds the original first stage (the five modules of taming's / LDM's ``VQModel``: Encoder,
Decoder, ``VectorQuantizer2``, quant_conv, post_quant_conv; the loss and Lightning left out), records its state
dict's keys and shapes, loads ldm_vae's ``single_file_state_dict()`` into it with ``strict=True`` and compares
outputs on the same weights: pre-quantization latents, quantized latents, code indices (remapped as the original
remaps them), reconstructions and decodes from indices. It also checks taming's v1 ``VectorQuantizer``.

taming is not a dependency of ldm_vae; put its modules on the path by hand, e.g.::

    pip install --no-deps --target /tmp/taming taming-transformers-rom1504  # quantize.py, model.py: CompVis HEAD's
    PYTHONPATH=/tmp/taming:. python scripts/original_vq_keys.py [--write tests/data/original_vq_keys.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm_vae import VQAutoencoder
from ldm_vae.config import VQ_PRESETS, VQConfig, attention_block_types

# name -> (the original's VQModel params as its config files write them, ldm_vae's config, remap rows or None).
# vq-f8: CompVis/latent-diffusion models/first_stage_models/vq-f8/config.yaml; vqgan-imagenet-f16-1024:
# CompVis/taming-transformers configs/imagenet_vqgan.yaml (with ckpt's n_embed 1024).
_TINY_DD = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], resolution=32, z_channels=4)
_ATTN_DD = dict(
    ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16, 8], resolution=32, z_channels=4
)
_F8_DD = dict(
    ch=128, ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[32], resolution=256, z_channels=4
)
_F16_DD = dict(
    ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], resolution=256, z_channels=256
)
_ATTN_CFG = VQConfig(
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    num_vq_embeddings=32,
    **attention_block_types((False, True, True)),
)
_USED = [7, 3, 30, 12, 3, 0, 21, 9, 16, 25, 1, 28]  # 12 rows, 3 twice (the original takes its first position)
CASES: dict[str, tuple[dict[str, Any], int, int, VQConfig, list[int] | None]] = {
    "tiny": (_TINY_DD, 32, 4, VQ_PRESETS["tiny"], None),
    "tiny-attn": (_ATTN_DD, 32, 4, _ATTN_CFG, None),
    "tiny-remap": (_TINY_DD, 32, 4, VQ_PRESETS["tiny"], _USED),
    "vq-f8": (_F8_DD, 16384, 4, VQ_PRESETS["vq-f8"], None),
    "vqgan-imagenet-f16-1024": (_F16_DD, 1024, 256, VQ_PRESETS["vqgan-imagenet-f16-1024"], None),
}


class FirstStage(nn.Module):
    """taming.models.vqgan.VQModel's modules (LDM's VQModel has the same), without its loss and Lightning."""

    def __init__(self, ddconfig: dict[str, Any], n_embed: int, embed_dim: int, remap: str | None) -> None:
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(
            n_embed, embed_dim, beta=0.25, remap=remap, unknown_index="extra", sane_index_shape=True
        )
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)


def original(name: str, tmp: Path) -> FirstStage:
    import taming.modules.diffusionmodules.model as taming_model

    dd, n_embed, embed_dim, cfg, used = CASES[name]
    dd = {**dd, "in_channels": 3, "out_ch": 3, "double_z": False, "dropout": 0.0}
    remap = None
    if used is not None:
        remap = str(tmp / f"{name}.npy")
        np.save(remap, np.array(used, dtype=np.int64))
    # taming's GroupNorm has 32 groups, too many for 8 channels; the group count changes no key or shape.
    groups = cfg.norm_num_groups
    taming_model.Normalize = lambda c: nn.GroupNorm(groups, c, eps=1e-6, affine=True)
    return FirstStage(dd, n_embed, embed_dim, remap)


def ours(name: str) -> VQAutoencoder:
    _, _, _, cfg, used = CASES[name]
    model = VQAutoencoder(cfg)
    if used is not None:
        model.set_remap(torch.tensor(used), unknown_index="extra")
    return model.eval()


@torch.no_grad()
def check(name: str, theirs: FirstStage) -> None:
    torch.manual_seed(0)
    model = ours(name)
    # Spread the codebook over the latents' range so that many rows are hit (taming's init is +-1/n).
    model.quantize.embedding.weight.normal_()
    theirs.load_state_dict(model.single_file_state_dict(), strict=True)
    theirs.eval()
    size = 32 if name.startswith("tiny") else 64
    x = torch.rand(2, 3, size, size) * 2 - 1
    h_theirs = theirs.quant_conv(theirs.encoder(x))
    z_q, _, (_, _, ind_theirs) = theirs.quantize(h_theirs)
    h = model.encode(x)
    _, info = model.quantize(h)
    rec_theirs = theirs.decoder(theirs.post_quant_conv(z_q))
    shape = (*ind_theirs.shape, theirs.quantize.e_dim)
    # A copy: the original's unmap_to_all rewrites the "extra" index in its argument.
    entry = theirs.quantize.get_codebook_entry(ind_theirs.clone(), shape)
    from_ind = theirs.decoder(theirs.post_quant_conv(entry))
    diffs = {
        "h": (h - h_theirs).abs().max().item(),
        "z_q": (model.encode_latents(x) - z_q).abs().max().item(),
        "recon": (model(x)[0] - rec_theirs).abs().max().item(),
        "decode_indices": (model.decode_indices(ind_theirs) - from_ind).abs().max().item(),
    }
    same = (info.indices == ind_theirs).float().mean().item()
    print(f"{name}: strict load ok; max |ours - original| {diffs}; indices equal at {same:.2%} of positions")


@torch.no_grad()
def check_v1() -> None:
    from taming.modules.vqvae.quantize import VectorQuantizer as V1

    torch.manual_seed(0)
    model = ours("tiny")
    v1 = V1(32, 4, beta=0.25)
    v1.embedding.weight.normal_()
    model.quantize.embedding.weight.copy_(v1.embedding.weight)
    z = torch.randn(2, 4, 8, 8)
    with torch.enable_grad():
        z1 = z.clone().requires_grad_(True)
        zq1, loss1, (_, _, ind1) = v1(z1)
        loss1.backward()
        legacy = VQAutoencoder(VQ_PRESETS["tiny"], legacy=True).quantize
        legacy.load_state_dict(model.quantize.state_dict())
        z2 = z.clone().requires_grad_(True)
        zq2, info = legacy(z2)
        info.loss.backward()
    print(
        "taming v1 VectorQuantizer vs ours(legacy=True): indices equal",
        torch.equal(ind1.view(2, 8, 8), info.indices),
        "| max |z_q|, loss, dL/dz, dL/de diffs:",
        (zq1 - zq2).abs().max().item(),
        (loss1 - info.loss).abs().item(),
        (z1.grad - z2.grad).abs().max().item(),
        (v1.embedding.weight.grad - legacy.embedding.weight.grad).abs().max().item(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the key fixture (json) here")
    args = parser.parse_args()
    fixture: dict[str, Any] = {
        "_comment": "Keys and shapes of the original first stage's state dict (taming-transformers-rom1504 0.0.6, "
        "whose quantize.py and model.py are CompVis/taming-transformers HEAD's; the loss left out), written by "
        "scripts/original_vq_keys.py --write from the original modules themselves."
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            theirs = original(name, Path(tmp))
            fixture[name] = {k: list(v.shape) for k, v in theirs.state_dict().items()}
            check(name, theirs)
    check_v1()
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
