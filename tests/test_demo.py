"""The demo on a tiny pipeline: every number in the report is recomputable from the files it wrote."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm_vae import AutoencoderKL, CheckpointError
from ldm_vae.cli import main
from ldm_vae.demo import DEMO_PHOTOS, run_demo
from ldm_vae.images import load_image, pad_to_multiple
from ldm_vae.latents import LatentDataset, held_out_split
from ldm_vae.ldm import (
    NoiseConfig,
    UNetConfig,
    build_noise_scheduler,
    build_unet,
    export_pipeline,
    gaussian_baselines,
    gaussian_bits_per_dim,
    sampling_scheduler,
)
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
    root = tmp_path_factory.mktemp("weights")
    export_pipeline(vae, unet, build_noise_scheduler(NoiseConfig()), root / "demo")
    # The digits pipeline: the same autoencoder with its own scale, a UNet on the 8x8 latents of 64 px digits,
    # and x_0 clipping saved in its scheduler, as weights/digits has them.
    digits = AutoencoderKL.from_pretrained(root / "demo" / "vqvae", scaling_factor=0.9)
    sched = sampling_scheduler(build_noise_scheduler(NoiseConfig()), "ddim", 3.5)
    export_pipeline(digits, unet, sched, root / "digits")
    return root / "demo"


def run_tiny(out, pipeline, **kwargs):
    return run_demo(
        out, pipeline, dtype="fp32", num_samples=3, steps=2, digits_pipeline=pipeline.parent / "digits",
        digits_limit=40, digits_held_out=8, bound_timesteps=4, **kwargs,
    )  # fmt: skip


def test_demo_writes_a_consistent_report(pipeline, tmp_path):
    out = tmp_path / "out"
    summary = run_tiny(out, pipeline)
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

    # The report's sections, in order, the digits first.
    ids = re.findall(r"<h2 id=(\w+)>", report)
    assert ids == ["digits", "reconstructions", "interpolation", "channels", "samples"]

    # The latent channels of the first photo, as pictures: -3 black, +3 white.
    first = load_file(out / "latents.safetensors")[DEMO_PHOTOS[0]]
    for k, channel in enumerate(first):
        png = np.asarray(Image.open(out / "channels" / f"channel-{k}.png").convert("L")).astype(np.float64)
        expected = ((channel.clamp(-3, 3) / 3 + 1) * 127.5).numpy()
        assert np.abs(png - expected).max() <= 0.5 + 1e-3
        assert f"channel {k}: mean {saved['channels']['mean'][k]:+.2f}" in report

    # Interpolation: the endpoints decode the two photos' latents; the RMS the report shows is the run's.
    interp = saved["interpolation"]
    assert (
        interp["endpoints"] == list(DEMO_PHOTOS[:2])
        and interp["points"][0] == 0
        and interp["points"][-1] == 1
    )
    assert interp["linear_rms"][0] == pytest.approx(interp["slerp_rms"][0], rel=1e-5)
    assert interp["linear_rms"][2] < interp["slerp_rms"][2]  # the straight line shrinks in the middle
    for kind in ("linear", "slerp"):
        assert (out / "interpolation" / f"{kind}.png").is_file()
        assert "".join(f"<td>{v:.3f}</td>" for v in interp[f"{kind}_rms"]) in report
    a, b = (Image.open(out / "interpolation" / f"{k}-0.png") for k in ("linear", "slerp"))
    # t = 0 is the same point on both paths (up to the rounding of sin(omega) / sin(omega)).
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1

    # Digits: the held-out bits/dim recomputed here from the cache the demo wrote.
    d = saved["digits"]
    assert (d["num_train"], d["num_held_out"], d["latent_shape"]) == (32, 8, [4, 8, 8])
    cache = out / "digits" / "latents"
    train_items, held = held_out_split(json.loads((cache / "latents.json").read_text()), 8)
    train, val = LatentDataset(cache, train_items), LatentDataset(cache, held)
    train.scale = val.scale = 0.9
    z = val.fixed_samples(0)
    fits = gaussian_baselines(train.fixed_draws(0))
    for key, fit in fits.items():
        assert d["bits_per_dim"][key] == pytest.approx(gaussian_bits_per_dim(z, *fit).mean().item(), rel=1e-9)
    assert d["bits_per_dim"]["prior"] == pytest.approx(gaussian_bits_per_dim(z).mean().item())
    for value in d["bits_per_dim"].values():
        assert f"<td>{value:.3f}</td>" in report
    assert d["training_scale"] == pytest.approx(
        1 / (train.mean.var(correction=0) + train.std.square().mean()).sqrt().item(), rel=1e-5
    )
    for name in ("real.png", "nearest.png", "ddpm/grid.png", "prior/grid.png"):
        assert f"digits/{name}" in report and (out / "digits" / name).is_file()
    assert Image.open(out / "digits" / "ddpm" / "sample-00000.png").size == (64, 64)
    assert f"mean RMSE {d['nearest_rmse_samples']:.3f}" in report


def test_demo_command_and_shipped_name(pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ldm_vae.pretrained.WEIGHTS_DIR", pipeline.parent)
    monkeypatch.setattr("ldm_vae.demo.WEIGHTS_DIR", pipeline.parent)
    monkeypatch.setattr("ldm_vae.demo.DEMO_PHOTOS", ("chelsea",))  # one small photo is enough here
    args = [
        "demo",
        "-o",
        str(tmp_path / "d"),
        "-n",
        "1",
        "--steps",
        "1",
        "--dtype",
        "fp32",
        "--bound-timesteps",
        "2",
    ]
    assert main(args) == 0  # weights/demo and weights/digits by name
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


def test_measure_extent_blocks_equal_whole_when_a_block_is_the_whole_photo():
    """With one block covering the photo, all four ways are the same computation; with smaller blocks they
    differ (GroupNorm and attention see less), and the colour oracle never scores below the plain whole."""
    from _scripts import import_script

    extent = import_script("measure_extent")
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny").eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    one = extent.measure(vae, x, 32)
    assert (
        one["blocks"]
        == one["whole"]
        == one["encoder whole, decoder blocks"]
        == one["encoder blocks, decoder whole"]
    )
    four = extent.measure(vae, x, 16)
    assert four["blocks"] != four["whole"]
    assert four["whole, colour oracle"] >= four["whole"] - 0.01
