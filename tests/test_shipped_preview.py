"""The shipped preview decoder (weights/demo-preview): it loads in ldm_vae and diffusers, reproduces its model
card, and previews the demo pipeline's samples."""

import re

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from ldm_vae import AutoencoderKL, AutoencoderTiny
from ldm_vae.demo import bundled_photos
from ldm_vae.images import round_to_8bit
from ldm_vae.metrics import psnr
from ldm_vae.pretrained import WEIGHTS_DIR

PREVIEW = WEIGHTS_DIR / "demo-preview"
CARD = (PREVIEW / "README.md").read_text()


@pytest.fixture(scope="module")
def models():
    return AutoencoderKL.from_pretrained("demo"), AutoencoderTiny.from_pretrained("demo-preview")


def test_preview_is_small_fp16_safetensors_that_diffusers_loads(models):
    _, ours = models
    files = list(PREVIEW.rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) < 2 * 2**20
    assert not [f for f in PREVIEW.rglob("*") if f.suffix in {".bin", ".ckpt", ".pt", ".pth"}]
    assert {v.dtype for f in files for v in load_file(f).values()} == {torch.float16}
    theirs = diffusers.AutoencoderTiny.from_pretrained(PREVIEW).float()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z).sample, ours.decode(z), atol=1e-6, rtol=0)
    assert ours.config.scaling_factor == 1.0 and ours.config.latent_channels == 4


@torch.no_grad()
def test_preview_reproduces_its_model_card(models):
    vae, preview = models
    row = re.search(r"^\| astronaut \| 512x512 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", CARD, re.M)
    pixels = torch.from_numpy(bundled_photos(["astronaut"])["astronaut"]).permute(2, 0, 1)[None]
    x = pixels.float() / 127.5 - 1
    z = vae.encode_latents(x)
    full = round_to_8bit(vae.decode(z))
    fast = round_to_8bit(preview.decode(vae.scale_latents(z)))
    measured = (psnr(fast, full).item(), psnr(fast, x).item(), psnr(full, x).item())
    assert measured == pytest.approx(tuple(map(float, row.groups())), abs=0.006)


@torch.no_grad()
def test_preview_is_the_vqvae_of_the_demo_pipeline(models):
    """Swapped in as the demo LDMPipeline's vqvae, the preview decodes the denoised latents as they are (its
    scaling_factor is 1.0): the pipeline's image is our decode of what it handed the preview."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(WEIGHTS_DIR / "demo")
    pipe.vqvae = diffusers.AutoencoderTiny.from_pretrained(PREVIEW).float()
    seen = []
    decode = pipe.vqvae.decode
    pipe.vqvae.decode = lambda z, *a, **k: (seen.append(z.clone()), decode(z, *a, **k))[1]
    out = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    assert out.shape == (2, 128, 128, 3) and len(seen) == 1
    _, preview = models
    expected = (preview.decode(seen[0]) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-6, rtol=0)
