"""``ldm-vae eval``: the comparison report's numbers against a direct computation, its files and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_vae import AutoencoderKL, VQAutoencoder
from ldm_vae.cli import main
from ldm_vae.metrics import psnr, ssim
from ldm_vae.workflows import evaluate as ev


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two photos (40x36, 44x32) and a tiny KL and VQ model saved to folders."""
    import skimage.data

    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    images.mkdir()
    for name, size in (("astronaut", (40, 36)), ("coffee", (44, 32))):
        Image.fromarray(getattr(skimage.data, name)()).resize(size, Image.BICUBIC).save(
            images / f"{name}.png"
        )
    torch.manual_seed(0)
    kl = AutoencoderKL.from_pretrained("tiny").save_pretrained(root / "kl")
    vq = VQAutoencoder.from_pretrained("tiny").save_pretrained(root / "vq")
    return images, kl, vq


def test_numbers_equal_a_direct_computation(setup, tmp_path, capsys):
    images, kl, vq = setup
    out = tmp_path / "out"
    args = ["eval", str(images), "--model", str(kl), "--model", str(vq), "-o", str(out), "--rounds", "1,2"]
    assert main([*args, "--protocol", "center32"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["size"] == 32 and "center 32x32 crop" in printed
    assert results["lpips"].startswith("not computed: no VGG ImageNet weights at")  # absent on this machine
    protocol = ev.parse_protocol("center32", "fp32", [1, 2])
    for src, cls in ((kl, AutoencoderKL), (vq, VQAutoencoder)):
        vae = cls.from_pretrained(src)
        r = results["models"][str(src)]
        for row, path in zip(r["images"], sorted(images.iterdir()), strict=True):
            x = ev.prepare(path, protocol)
            once = ev.round_trip(vae, x)
            twice = ev.round_trip(vae, once)
            assert row["size"] == [32, 32] and row["lpips"] is None
            assert row["psnr"] == pytest.approx(psnr(x, once).item(), abs=1e-4)
            assert row["ssim"] == pytest.approx(ssim(x, once).item(), abs=1e-5)
            assert row["drift"]["1"]["psnr"] == row["psnr"]
            assert row["drift"]["2"]["psnr"] == pytest.approx(psnr(x, twice).item(), abs=1e-4)
            shift = ((twice - x).mean(dim=(1, 2)) * 127.5).tolist()
            assert row["drift"]["2"]["color_shift"] == pytest.approx(shift, abs=1e-3)
        assert r["mean"]["psnr"] == pytest.approx(sum(i["psnr"] for i in r["images"]) / 2)
        assert r["fp16_finite"] is True and r["seconds_per_megapixel"] > 0
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
    html = (out / "report.html").read_text()
    assert html.count("<tr>") == 2 and "crops/0001-m1-diff.png" in html and "center 32x32" in html
    assert {p.name for p in (out / "crops").iterdir()} >= {
        "0000-original.png",
        "0000-m0.png",
        "0001-m1-diff.png",
    }


def test_native_protocol_keeps_each_images_size(setup, tmp_path):
    images, kl, _ = setup
    protocol = ev.parse_protocol("native", "fp32", [1])
    results = ev.evaluate(sorted(images.iterdir()), [str(kl)], tmp_path, protocol, torch.device("cpu"), False)
    sizes = [row["size"] for row in results["models"][str(kl)]["images"]]
    assert sizes == [[36, 40], [32, 44]] and results["models"][str(kl)]["fp16_finite"] is None
    assert ev.prepare(next(images.iterdir()), ev.parse_protocol("coco256", "fp32", [1])).shape == (
        3,
        256,
        256,
    )


def test_lpips_column_uses_the_perceptual_net_when_present(setup, tmp_path, monkeypatch):
    images, kl, _ = setup

    def stub(x, y):
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setattr(ev, "_lpips", lambda device: (stub, "stub"))
    protocol = ev.parse_protocol("center32", "fp32", [1])
    files = sorted(images.iterdir())
    results = ev.evaluate(files, [str(kl)], tmp_path, protocol, torch.device("cpu"), False)
    vae = AutoencoderKL.from_pretrained(kl)
    x = ev.prepare(files[0], protocol)
    want = stub(x[None], ev.round_trip(vae, x)[None]).item()
    assert results["models"][str(kl)]["images"][0]["lpips"] == pytest.approx(want, rel=1e-5)


def test_an_overflowing_model_is_not_fp16_finite(setup, tmp_path):
    images, kl, _ = setup
    vae = AutoencoderKL.from_pretrained(kl)
    with torch.no_grad():  # values past fp16's 65504 in the decoder (fp32 still decodes them)
        vae.decoder.conv_in.weight.mul_(1e7)
    vae.save_pretrained(tmp_path / "hot")
    protocol = ev.parse_protocol("center32", "fp32", [1])
    results = ev.evaluate(
        sorted(images.iterdir()), [str(tmp_path / "hot")], tmp_path / "o", protocol, torch.device("cpu"), True
    )
    assert results["models"][str(tmp_path / "hot")]["fp16_finite"] is False


def test_heat_map_is_black_where_equal():
    x = torch.rand(3, 8, 8) * 2 - 1
    assert torch.equal(ev.heat_map(x, x), torch.full((3, 8, 8), -1.0))
    assert ev.heat_map(x, -x).max() > -1


def test_refusals_are_one_line(setup, tmp_path, capsys):
    images, kl, _ = setup
    for extra, message in (
        (["--protocol", "imagenet"], "unknown protocol 'imagenet'"),
        (["--model", str(kl)], "a model is named twice"),
        (["--rounds", "0"], "round trips must be positive"),
    ):
        assert main(["eval", str(images), "--model", str(kl), "-o", str(tmp_path / "o"), *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_equivariance_columns_equal_the_metric_on_the_padded_image(setup, tmp_path, capsys):
    from ldm_vae.images import pad_to_multiple
    from ldm_vae.latent_regularizers import EQUIVARIANCE_GROUPS, equivariance_psnr

    images, kl, _ = setup
    out = tmp_path / "out"
    args = ["eval", str(images), "--model", str(kl), "-o", str(out), "--rounds", "1", "--no-fp16"]
    assert main([*args, "--equivariance"]) == 0
    printed = capsys.readouterr().out
    assert "EQ-d4" in printed and "EQ-scale" in printed and "decode(tau(z)) against tau(x)" in printed
    r = json.loads((out / "results.json").read_text())["models"][str(kl)]
    vae = AutoencoderKL.from_pretrained(kl)
    protocol = ev.parse_protocol("native", "fp32", [1])
    with torch.no_grad():
        for row, path in zip(r["images"], sorted(images.iterdir()), strict=True):
            padded = pad_to_multiple(ev.prepare(path, protocol), 2)[None]
            want = equivariance_psnr(vae, padded)
            assert row["equivariance"] == pytest.approx({k: v.item() for k, v in want.items()}, abs=1e-4)
    d4 = [row["equivariance"][n] for row in r["images"] for n in EQUIVARIANCE_GROUPS["d4"]]
    assert r["mean"]["equivariance_d4"] == pytest.approx(sum(d4) / len(d4))
    # Without the flag nothing is computed and the table keeps its columns.
    assert main([*args, "-o", str(tmp_path / "plain")]) == 0
    assert "EQ-d4" not in capsys.readouterr().out
