"""The shipped demo weights (weights/demo, weights/digits): they load in ldm_vae and in diffusers (without
warnings), agree, and do their job."""

import json
import re

import diffusers
import pytest
import torch
from _diffusers_log import load_quietly
from _scripts import import_script
from PIL import Image

from ldm_vae import AutoencoderKL
from ldm_vae.demo import bundled_photos
from ldm_vae.ldm import load_pipeline
from ldm_vae.pretrained import WEIGHTS_DIR
from ldm_vae.workflows import reconstruct_images

DEMO = WEIGHTS_DIR / "demo"
CARD = (DEMO / "README.md").read_text()


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL.from_pretrained("demo")


def test_demo_vae_is_the_documented_kl_f8_in_fp16_safetensors(vae):
    cfg = vae.config
    assert (len(cfg.block_out_channels), cfg.latent_channels) == (4, 4)  # f = 8, 4 latent channels
    assert 0.2 < cfg.scaling_factor < 5  # 1 / std of the cached latents, not a preset's default
    stored = json.loads((DEMO / "vqvae" / "config.json").read_text())
    assert stored["_class_name"] == "AutoencoderKL"
    assert sum(f.stat().st_size for f in DEMO.rglob("*.safetensors")) < 20 * 2**20  # small: fp16
    assert not [f for f in DEMO.rglob("*") if f.suffix in {".bin", ".ckpt", ".pt", ".pth"}]  # no pickles


def test_demo_vae_reproduces_its_model_card(vae, tmp_path):
    # The card's table row for a photo never seen in training, recomputed from the shipped weights (fp32).
    row = re.search(r"^\| astronaut \| 512x512 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", CARD, re.M)
    Image.fromarray(bundled_photos(["astronaut"])["astronaut"]).save(tmp_path / "astronaut.png")
    (r,) = reconstruct_images(vae, [tmp_path / "astronaut.png"], [tmp_path / "out.png"], batch_size=1)
    assert (r["psnr"], r["ssim"], r["bicubic_psnr"]) == pytest.approx(
        tuple(map(float, row.groups())), abs=0.006
    )


@pytest.mark.parametrize("name", ["demo", "digits"])
def test_shipped_pipelines_load_in_diffusers_without_warnings_and_run(name):
    pipe = load_quietly(WEIGHTS_DIR / name)
    assert isinstance(pipe, diffusers.LDMPipeline)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
    ).images
    size = 8 * pipe.unet.config.sample_size
    assert images.shape == (1, size, size, 3) and images.std() > 0
    ours_vae, _, scheduler = load_pipeline(name)
    assert ours_vae.config.scaling_factor == pipe.vqvae.config.scaling_factor
    assert scheduler.config.clip_sample == pipe.scheduler.config.clip_sample == (name == "digits")
    if name == "digits":
        assert pipe.scheduler.config.clip_sample_range == scheduler.config.clip_sample_range == 3.5


def test_digits_vqvae_is_the_demo_autoencoder_with_the_digits_scale():
    from safetensors.torch import load_file

    name = "diffusion_pytorch_model.safetensors"
    demo, digits = load_file(DEMO / "vqvae" / name), load_file(WEIGHTS_DIR / "digits" / "vqvae" / name)
    assert demo.keys() == digits.keys() and all(torch.equal(demo[k], digits[k]) for k in demo)
    a, b = (json.loads((w / "vqvae" / "config.json").read_text()) for w in (DEMO, WEIGHTS_DIR / "digits"))
    assert {k: v for k, v in a.items() if k != "scaling_factor"} == {
        k: v for k, v in b.items() if k != "scaling_factor"
    }
    card = (WEIGHTS_DIR / "digits" / "README.md").read_text()
    assert f"`scaling_factor` {b['scaling_factor']:.6f}" in card


def test_demo_pipeline_loads_in_diffusers_and_matches_ours(vae):
    pipe = load_quietly(DEMO)
    assert isinstance(pipe, diffusers.LDMPipeline)
    ours_vae, unet, _ = load_pipeline(DEMO)
    z = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = pipe.vqvae.decode(z).sample
        assert torch.allclose(vae.decode(z), theirs, atol=1e-5)
        assert torch.allclose(ours_vae.decode(z), theirs, atol=1e-5)
        t = torch.tensor([500])
        assert torch.equal(unet(z, t).sample, pipe.unet(z, t).sample)
    images = pipe(
        batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
    ).images
    assert images.shape == (1, 128, 128, 3) and images.min() >= 0 and images.max() <= 1


def test_card_lists_every_round_of_the_history_once():
    rounds = json.loads((DEMO / "history.json").read_text())["vae_rounds"]
    table = re.findall(r"^\| (\d+) \| [\d-]+ \| `([^`]+)` \| (\d+) \|", CARD, re.M)
    assert table == [(str(i + 1), r["init"], str(r["steps"])) for i, r in enumerate(rounds)]
    assert f"Steps: {sum(r['steps'] for r in rounds)} in {len(rounds)} round(s)" in CARD


def test_shipping_a_round_again_replaces_it_rather_than_adding_one():
    build = import_script("build_demo_weights")
    one, two = ({"date": "2026-11-23", "init": "sd", "steps": s, "hours": 1.0} for s in (1500, 1300))
    assert build.add_round([one], two) == [one, two]
    assert build.add_round([one, two], {**two, "date": "2026-11-30"}) == [one, {**two, "date": "2026-11-30"}]
    assert build.add_round([], one) == [one]
