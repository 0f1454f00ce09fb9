"""The demo on a tiny pipeline: every number in the report is recomputable from the files it wrote."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm_vae import AutoencoderKL, CheckpointError
from ldm_vae.cli import main
from ldm_vae.demo import DEMO_PHOTOS, run_demo
from ldm_vae.images import load_image, pad_to_multiple
from ldm_vae.ldm import NoiseConfig, UNetConfig, build_noise_scheduler, build_unet, export_pipeline
from ldm_vae.metrics import psnr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    torch.manual_seed(0)
    # f = 8 like the real demo model: the photos are up to 1000 px, and mid-block attention is quadratic.
    vae = AutoencoderKL.from_pretrained("tiny", block_out_channels=(8, 8, 16, 16), scaling_factor=0.7)
    unet = build_unet(
        UNetConfig(
            block_out_channels=(8, 16), attention_levels=(1,), attention_head_dim=8, norm_num_groups=4
        ),
        latent_channels=4,
        latent_size=8,
    )
    folder = tmp_path_factory.mktemp("weights") / "demo"
    export_pipeline(vae, unet, build_noise_scheduler(NoiseConfig()), folder)
    return folder


def test_demo_writes_a_consistent_report(pipeline, tmp_path):
    out = tmp_path / "out"
    summary = run_demo(out, pipeline, dtype="fp32", num_samples=3, steps=2)
    assert [r["output"] for r in summary["images"]] == [f"{n}.png" for n in DEMO_PHOTOS]
    report = (out / "report.html").read_text()
    for r in summary["images"]:
        original = load_image(out / "originals" / r["output"])
        recon = load_image(out / "reconstructions" / r["output"])
        assert original.shape == recon.shape and list(original.shape[1:]) == r["size"]
        assert psnr(original, recon).item() == pytest.approx(r["psnr"], abs=1e-4)
        assert f"reconstructions/{r['output']}" in report
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in saved["images"]]))
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "grid.png", "sample-00000.png", "sample-00001.png", "sample-00002.png"
    ]  # fmt: skip
    assert Image.open(out / "samples" / "sample-00000.png").size == (64, 64)  # 8x8 latents, f=8
    # The latents file holds the diffusion-ready posterior modes.
    vae = AutoencoderKL.from_pretrained(pipeline / "vqvae")
    x = pad_to_multiple(load_image(out / "originals" / "coffee.png"), 8)[None]
    with torch.no_grad():
        expected = vae.scale_latents(vae.encode(x).mode())[0]
    assert torch.allclose(load_file(out / "latents.safetensors")["coffee"], expected, atol=1e-5)


def test_demo_command_and_shipped_name(pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ldm_vae.pretrained.WEIGHTS_DIR", pipeline.parent)
    monkeypatch.setattr("ldm_vae.demo.WEIGHTS_DIR", pipeline.parent)
    monkeypatch.setattr("ldm_vae.demo.DEMO_PHOTOS", ("chelsea",))  # one small photo is enough here
    assert main(["demo", "-o", str(tmp_path / "d"), "-n", "1", "--steps", "1", "--dtype", "fp32"]) == 0
    assert "mean PSNR" in capsys.readouterr().err and (tmp_path / "d" / "report.html").is_file()
    # "demo" names the shipped autoencoder: the pipeline's vqvae/.
    loaded = AutoencoderKL.from_pretrained("demo")
    assert loaded.config.scaling_factor == 0.7
    monkeypatch.setattr("ldm_vae.pretrained.WEIGHTS_DIR", tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="shipped weights 'demo' not found"):
        AutoencoderKL.from_pretrained("demo")
    assert main(["demo", "-o", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: shipped weights 'demo' not found") and err.count("\n") == 1
