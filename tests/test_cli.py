"""The ``ldm-vae`` command line, run in-process through ``main(argv)`` on the ``tiny`` model (f = 2)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import photo as _photo
from _cli import run_cli as _run
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from skimage import data

from ldm_vae import AutoencoderKL, VQAutoencoder
from ldm_vae.cli import main
from ldm_vae.images import crop_to, load_image, pad_to_multiple, round_to_8bit, to_uint8
from ldm_vae.metrics import psnr, ssim
from ldm_vae.workflows import output_stems

FP32 = ["--dtype", "fp32"]


@pytest.fixture(scope="module")
def vae(model_dir) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(model_dir)


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "astronaut.png", 32, 32)
    _photo(folder / "coffee.jpg", 32, 32, data.coffee)
    _photo(folder / "odd.png", 31, 31, data.chelsea)  # pads to 32x32 too (f = 2)
    return folder


def _reference_latents(vae: AutoencoderKL, path: Path) -> torch.Tensor:
    x = pad_to_multiple(load_image(path), vae.config.downsample_factor)[None]
    with torch.no_grad():
        return vae.scale_latents(vae.encode(x).mode())[0]


# ------------------------------------------------------------------------------------------ encode/decode


def test_encode_writes_scaled_posterior_modes_and_metadata(tmp_path, capsys, images, model_dir, vae):
    out = tmp_path / "lat" / "z.safetensors"
    code, _, err = _run(capsys, "encode", images, "-o", out, "--model", model_dir, *FP32, "--batch-size", "2")
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        z = f.get_tensor("latents")
    names = ["astronaut.png", "coffee.jpg", "odd.png"]
    assert json.loads(meta["source_names"]) == names
    assert json.loads(meta["original_sizes"]) == [[32, 32], [32, 32], [31, 31]]
    assert float(meta["scaling_factor"]) == vae.config.scaling_factor and float(meta["shift_factor"]) == 0.0
    assert meta["model"] == str(model_dir) and meta["posterior"] == "mode"
    assert z.shape == (3, 4, 16, 16) and z.dtype == torch.float32
    for i, name in enumerate(names):
        torch.testing.assert_close(z[i], _reference_latents(vae, images / name), atol=1e-5, rtol=1e-5)


def test_encode_sample_is_seeded(tmp_path, capsys, images, model_dir, vae):
    paths = [images / "astronaut.png", images / "coffee.jpg"]
    outs = [tmp_path / f"{k}.safetensors" for k in ("a", "b", "c")]
    for out, seed in zip(outs, ("7", "7", "8"), strict=True):
        args = ["encode", *paths, "-o", out, "--model", model_dir, *FP32, "--sample", "--seed", seed]
        assert _run(capsys, *args)[0] == 0
    za, zb, zc = (load_file(o)["latents"] for o in outs)
    torch.testing.assert_close(za, zb, rtol=0, atol=0)
    assert not torch.allclose(za, zc)
    x = torch.stack([load_image(p) for p in paths])
    with torch.no_grad():
        want = vae.scale_latents(vae.encode(x).sample(torch.Generator().manual_seed(7)))
    torch.testing.assert_close(za, want, atol=1e-5, rtol=1e-5)


def test_decode_writes_cropped_pngs_equal_to_the_decoded_tensor(tmp_path, capsys, images, model_dir, vae):
    lat = tmp_path / "z.safetensors"
    assert _run(capsys, "encode", images, "-o", lat, "--model", model_dir, *FP32)[0] == 0
    out = tmp_path / "out"
    code, _, err = _run(capsys, "decode", lat, "-o", out, "--model", model_dir, *FP32, "--batch-size", "2")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "coffee.png", "odd.png"]
    z = load_file(lat)["latents"]
    with torch.no_grad():
        decoded = vae.decode(vae.unscale_latents(z))  # (3, 3, 32, 32)
    for i, name in enumerate(["astronaut", "coffee", "odd"]):
        png = np.asarray(Image.open(out / f"{name}.png"))
        size = (31, 31) if name == "odd" else (32, 32)
        assert png.shape == (*size, 3)
        np.testing.assert_array_equal(png, to_uint8(crop_to(decoded[i], size)))


def test_tiled_cli_equals_untiled(tmp_path, capsys, model_dir):
    src = _photo(tmp_path / "x.png", 64, 48)
    outs = {}
    for name, extra in (("plain", ()), ("tiled", ("--tile-size", "16")), ("budget", ("--max-memory", "1M"))):
        lat = tmp_path / f"{name}.safetensors"
        assert _run(capsys, "encode", src, "-o", lat, "--model", model_dir, *FP32, *extra)[0] == 0
        assert _run(capsys, "decode", lat, "-o", tmp_path / name, "--model", model_dir, *FP32, *extra)[0] == 0
        outs[name] = (
            load_file(lat)["latents"],
            np.asarray(Image.open(tmp_path / name / "x.png"), dtype=float),
        )
    for name in ("tiled", "budget"):
        assert (outs[name][0] - outs["plain"][0]).abs().max() <= 1e-4
        assert np.abs(outs[name][1] - outs["plain"][1]).max() <= 1  # PNG rounding at most
    with pytest.raises(SystemExit) as exc:
        main(
            ["decode", str(tmp_path / "plain.safetensors"), "-o", str(tmp_path / "x"), "--max-memory", "lots"]
        )
    assert exc.value.code == 2 and "not a memory size" in capsys.readouterr().err


def test_memory_sizes_gb_is_decimal_g_and_gib_binary():
    from ldm_vae.cli import _byte_size

    assert _byte_size("2.5GB") == 2_500_000_000
    assert _byte_size("2.5G") == _byte_size("2.5GiB") == _byte_size("2.5gib") == int(2.5 * 2**30)
    assert _byte_size("800M") == 800 * 2**20 and _byte_size("800MB") == 800_000_000
    assert _byte_size("3000000") == 3_000_000
    with pytest.raises(argparse.ArgumentTypeError, match="below 1M"):
        _byte_size("64K")


def test_odd_size_round_trip_crops_back(tmp_path, capsys, model_dir):
    src = _photo(tmp_path / "x.png", 37, 29)
    lat, out = tmp_path / "x.safetensors", tmp_path / "out"
    assert _run(capsys, "encode", src, "-o", lat, "--model", model_dir, *FP32)[0] == 0
    assert load_file(lat)["latents"].shape == (1, 4, 19, 15)
    assert _run(capsys, "decode", lat, "-o", out, "--model", model_dir, *FP32)[0] == 0
    assert Image.open(out / "x.png").size == (29, 37)


def test_decode_without_metadata_and_with_a_different_scale(tmp_path, capsys, model_dir, vae):
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    plain, scaled = tmp_path / "plain.safetensors", tmp_path / "scaled.safetensors"
    save_file({"latents": z}, str(plain))
    save_file({"latents": z * 0.5}, str(scaled), metadata={"scaling_factor": "0.5", "shift_factor": "0.0"})
    code, _, err = _run(capsys, "decode", plain, "-o", tmp_path / "a", "--model", model_dir, *FP32)
    assert code == 0 and err.count("warning") == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["latent_00000.png", "latent_00001.png"]
    code, _, err = _run(capsys, "decode", scaled, "-o", tmp_path / "b", "--model", model_dir, *FP32)
    assert code == 0 and "warning" in err and "scaling_factor=0.5" in err
    with torch.no_grad():
        want = to_uint8(vae.decode(z)[1])  # z * 0.5 / 0.5: the file's own factor undoes its scaling
    for folder in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / folder / "latent_00001.png")), want)


# ------------------------------------------------------------------------------------------ reconstruct


def test_reconstruct_writes_images_and_metrics(tmp_path, capsys, images, model_dir, vae):
    (images / "sub").mkdir()
    _photo(images / "sub" / "wide.png", 20, 26)  # another size, in a subfolder
    out = tmp_path / "rec"
    code, stdout, err = _run(capsys, "reconstruct", images, "-o", out, "--model", model_dir, *FP32)
    assert code == 0, err
    names = ["astronaut.png", "coffee.png", "odd.png", "wide.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "metrics.json"])
    report = json.loads((out / "metrics.json").read_text())
    rows = report["images"]
    assert [r["output"] for r in rows] == names and report["downsample_factor"] == 2
    for r in rows:
        x, y = load_image(r["source"]), load_image(out / r["output"])
        assert list(y.shape[1:]) == r["size"] == list(x.shape[1:])
        assert r["psnr"] == pytest.approx(psnr(x, y).item(), abs=1e-4)
        assert r["ssim"] == pytest.approx(ssim(x, y).item(), abs=1e-5)
        assert 0 < r["bicubic_ssim"] <= 1 and r["bicubic_psnr"] > 10
    # The stored PNG is the model's reconstruction, quantized.
    x = load_image(images / "odd.png")
    with torch.no_grad():
        recon = vae.decode(vae.encode(pad_to_multiple(x, 2)[None]).mode())[0]
    torch.testing.assert_close(
        load_image(out / "odd.png"), round_to_8bit(crop_to(recon, (31, 31))), atol=1e-6, rtol=0
    )
    for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim"):
        assert report["mean"][key] == pytest.approx(np.mean([r[key] for r in rows]))
    lines = stdout.strip().splitlines()
    assert "PSNR" in lines[0] and "bicubic x2" in lines[0] and len(lines) == 2 + len(rows) + 1
    assert lines[-1].startswith("mean") and f"{report['mean']['psnr']:.2f}" in lines[-1]


def test_reconstruct_refuses_to_overwrite_its_inputs(tmp_path, capsys, images, model_dir):
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    code, _, err = _run(capsys, "reconstruct", images, "-o", images, "--model", model_dir)
    assert code == 1 and "would overwrite the input" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_output_stems_are_unique():
    assert output_stems(["a.jpg", "a.png", "A.tif", "x/b.png", "y/b.png", "c"]) == [
        "a",
        "a_2",
        "A_3",
        "b",
        "b_2",
        "c",
    ]


# ------------------------------------------------------------------------------------------ bad input


def _bad_input(tmp_path: Path, case: str, model_dir: Path) -> list:
    """argv for one bad-input case; every output goes under tmp_path / 'out'."""
    out = tmp_path / "out"
    if case in ("missing", "empty", "truncated", "not-image", "no-images"):
        target = tmp_path / {
            "missing": "a.png",
            "empty": "a.png",
            "truncated": "a.jpg",
            "not-image": "a.jpg",
        }.get(case, "dir")
        if case == "empty":
            target.write_bytes(b"")
        elif case == "truncated":
            _photo(target, 64, 64)
            Image.open(target).save(target, format="JPEG")
            target.write_bytes(target.read_bytes()[:600])
        elif case == "not-image":
            target.write_text("not an image\n")
        elif case == "no-images":
            target.mkdir()
            (target / "notes.txt").write_text("x")
        good = _photo(tmp_path / "good.png", 32, 32)  # a good file first: nothing may be written for it
        return ["reconstruct", good, target, "-o", out, "--model", model_dir]
    if case in ("unknown-model", "bad-checkpoint"):
        model = "no-such-model"
        if case == "bad-checkpoint":
            model = tmp_path / "bad"
            shutil.copytree(model_dir, model)
            cfg = json.loads((model / "config.json").read_text())
            (model / "config.json").write_text(json.dumps({**cfg, "latent_channels": 8}))
        return ["reconstruct", _photo(tmp_path / "good.png", 32, 32), "-o", out, "--model", model]
    z = {
        "no-latents": {"other": torch.zeros(1, 4, 4, 4)},
        "channels": {"latents": torch.zeros(1, 3, 4, 4)},
    }.get(case, {"latents": torch.tensor([0.0, float("nan")]).repeat(32).view(1, 4, 4, 4)})
    save_file(z, str(tmp_path / "z.safetensors"))
    return ["decode", tmp_path / "z.safetensors", "-o", out, "--model", model_dir]


BAD_CASES = {
    "missing": "no such file",
    "empty": "empty",
    "truncated": "truncated",
    "not-image": "not an image (unrecognized format)",
    "no-images": "no images",
    "unknown-model": "not a file, a folder, or a preset",
    "bad-checkpoint": "does not fit the model",
    "no-latents": "no tensor named 'latents' (has: other)",
    "channels": "latents have 3 channels but",
    "nan": "NaN or Inf",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_one_line_exit_1_nothing_written(tmp_path, capsys, model_dir, case):
    argv = _bad_input(tmp_path, case, model_dir)
    code, stdout, err = _run(capsys, *argv, *FP32)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and BAD_CASES[case] in err, err
    assert "Traceback" not in err and stdout == ""
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_exception(tmp_path, model_dir):
    from ldm_vae.images import ImageError

    with pytest.raises(ImageError, match="no such file"):
        main(
            ["reconstruct", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o"), "--model", "x", "--debug"]
        )


@pytest.mark.parametrize(
    "argv",
    [
        ["encode", "a.png", "-o", "z.safetensors"],  # --model is required
        ["decode", "z.safetensors", "-o", "o", "--model", "m", "--batch-size", "0"],
        ["convert", "a", "b", "--to", "onnx"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ convert/info


def test_convert_round_trip_diffusers_ldm_diffusers(tmp_path, capsys, model_dir, vae):
    single, folder = tmp_path / "vae.safetensors", tmp_path / "back"
    assert _run(capsys, "convert", model_dir, single, "--to", "ldm")[0] == 0
    assert any(k.startswith("encoder.down.0.block.0.") for k in load_file(single))  # LDM names
    # GroupNorm groups and the latent scale are not in an LDM file's shapes: tiny needs its config.
    code, _, err = _run(capsys, "convert", single, folder, "--to", "diffusers")
    assert code == 1 and "norm_num_groups" in err and not folder.exists()
    assert _run(capsys, "convert", single, folder, "--to", "diffusers", "--config", model_dir)[0] == 0
    for loaded in (
        AutoencoderKL.from_pretrained(single, config=model_dir),
        AutoencoderKL.from_pretrained(folder),
    ):
        assert loaded.config == vae.config
        for (k, a), (k2, b) in zip(loaded.state_dict().items(), vae.state_dict().items(), strict=True):
            assert k == k2
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convert_dtype_and_refusals(tmp_path, capsys, model_dir, vae):
    half = tmp_path / "half.safetensors"
    assert _run(capsys, "convert", model_dir, half, "--to", "ldm", "--dtype", "fp16")[0] == 0
    weights = load_file(half)
    assert {v.dtype for v in weights.values()} == {torch.float16}
    torch.testing.assert_close(weights["decoder.conv_out.weight"], vae.decoder.conv_out.weight.half())
    code, _, err = _run(capsys, "convert", model_dir, tmp_path / "x.ckpt", "--to", "ldm")
    assert code == 1 and ".safetensors" in err and not (tmp_path / "x.ckpt").exists()
    before = (model_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    code, _, err = _run(capsys, "convert", model_dir, model_dir, "--to", "diffusers", "--dtype", "fp16")
    assert code == 1 and "would overwrite the input" in err
    assert (model_dir / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_info_reports_counts_and_latent_shape(capsys, model_dir, vae):
    code, out, _ = _run(capsys, "info", model_dir, "--size", "37", "29")
    assert code == 0
    enc = sum(p.numel() for m in (vae.encoder, vae.quant_conv) for p in m.parameters())
    dec = sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters())
    assert f"encoder: {enc:,}" in out and f"decoder: {dec:,}" in out
    assert f"total:   {enc + dec:,}" in out
    assert "latent_channels: 4" in out and "(4, 19, 15) (image padded to 38x30)" in out


def test_installed_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("ldm-vae")
    if not exe.exists():
        exe = Path(shutil.which("ldm-vae") or "ldm-vae")
    missing = tmp_path / "missing.png"
    proc = subprocess.run(
        [str(exe), "encode", str(missing), "-o", str(tmp_path / "z.safetensors"), "--model", "tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr == f"error: {missing}: no such file or directory\n"
    assert not (tmp_path / "z.safetensors").exists()


# ------------------------------------------------------------------------------------------ VQ models
# The same commands on a VQ model, through the common interface: latents are the exact codebook vectors.


@pytest.fixture(scope="module")
def vq(vq_dir) -> VQAutoencoder:
    return VQAutoencoder.from_pretrained(vq_dir)


def test_vq_encode_writes_scaled_codebook_vectors_and_decode_decodes_them(
    tmp_path, capsys, images, vq_dir, vq
):
    lat, out = tmp_path / "z.safetensors", tmp_path / "out"
    code, _, err = _run(capsys, "encode", images, "-o", lat, "--model", vq_dir, *FP32, "--batch-size", "2")
    assert code == 0, err
    with safe_open(str(lat), "pt") as f:
        meta, z = f.metadata(), f.get_tensor("latents")
    assert float(meta["scaling_factor"]) == 0.5 and float(meta["shift_factor"]) == 0.0
    assert z.shape == (3, 3, 16, 16)
    names = ["astronaut.png", "coffee.jpg", "odd.png"]
    x = torch.stack([pad_to_multiple(load_image(images / n), 2) for n in names])  # (3, 3, 32, 32)
    with torch.no_grad():
        want = vq.encode_latents(x)  # (3, 3, 16, 16): raw codebook vectors
        decoded = vq.decode(want)
    torch.testing.assert_close(z, vq.scale_latents(want), rtol=0, atol=0)
    # Every latent vector is a codebook row times the scale.
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 3)
    distance = torch.cdist(vectors, vq.quantize.codebook().detach() * 0.5).min(dim=1).values
    assert distance.max() == 0
    code, _, err = _run(capsys, "decode", lat, "-o", out, "--model", vq_dir, *FP32)
    assert code == 0 and "warning" not in err, err
    for i, name in enumerate(["astronaut", "coffee", "odd"]):
        size = (31, 31) if name == "odd" else (32, 32)
        png = np.asarray(Image.open(out / f"{name}.png"))
        np.testing.assert_array_equal(png, to_uint8(crop_to(decoded[i], size)))


def test_vq_reconstruct_writes_the_models_reconstructions(tmp_path, capsys, images, vq_dir, vq):
    out = tmp_path / "rec"
    code, stdout, err = _run(capsys, "reconstruct", images, "-o", out, "--model", vq_dir, *FP32)
    assert code == 0, err
    x = load_image(images / "odd.png")
    with torch.no_grad():
        recon = vq.decode(vq.encode_latents(pad_to_multiple(x, 2)[None]))[0]
    y = load_image(out / "odd.png")
    torch.testing.assert_close(y, round_to_8bit(crop_to(recon, (31, 31))), atol=1e-6, rtol=0)
    report = json.loads((out / "metrics.json").read_text())
    row = next(r for r in report["images"] if r["output"] == "odd.png")
    assert row["psnr"] == pytest.approx(psnr(x, y).item(), abs=1e-4)
    assert report["downsample_factor"] == 2 and "bicubic x2" in stdout


def test_vq_decode_refuses_latents_of_another_width(tmp_path, capsys, images, model_dir, vq_dir):
    lat = tmp_path / "kl.safetensors"
    assert _run(capsys, "encode", images, "-o", lat, "--model", model_dir, *FP32)[0] == 0  # 4 channels
    code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "out", "--model", vq_dir, *FP32)
    assert code == 1 and "latents have 4 channels but" in err and "takes 3" in err
    assert not (tmp_path / "out").exists()


def test_vq_info_counts_the_codebook_and_shapes_code_vectors(capsys, vq_dir, vq):
    code, out, _ = _run(capsys, "info", vq_dir, "--size", "37", "29")
    assert code == 0
    enc = sum(p.numel() for m in (vq.encoder, vq.quant_conv) for p in m.parameters())
    dec = sum(p.numel() for m in (vq.post_quant_conv, vq.decoder) for p in m.parameters())
    assert f"encoder: {enc:,}" in out and f"decoder: {dec:,}" in out
    assert "codebook: 96 (32 codes of dim 3)" in out
    assert f"total:   {enc + dec + 96:,}" in out
    assert "num_vq_embeddings: 32" in out and "(3, 19, 15) (image padded to 38x30)" in out
    assert "code indices (encode --indices): (19, 15), 0..31" in out


def test_tiny_names_the_kl_preset(capsys):
    # "tiny" is a KL and a VQ preset; the KL one wins, as in load_autoencoder.
    code, out, _ = _run(capsys, "info", "tiny")
    assert code == 0 and "shift_factor: None" in out and "num_vq_embeddings" not in out
    assert "codebook" not in out


def test_vq_convert_round_trip(tmp_path, capsys, vq_dir, vq):
    single, folder = tmp_path / "vq.safetensors", tmp_path / "back"
    assert _run(capsys, "convert", vq_dir, single, "--to", "ldm")[0] == 0
    assert "quantize.embedding.weight" in load_file(single)
    assert _run(capsys, "convert", single, folder, "--to", "diffusers", "--config", vq_dir)[0] == 0
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "VQModel"
    loaded = VQAutoencoder.from_pretrained(folder)
    assert loaded.config == vq.config
    for (k, a), (k2, b) in zip(loaded.state_dict().items(), vq.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_latents_refuses_a_vq_model(tmp_path, capsys, images, vq_dir):
    out = tmp_path / "cache"
    code, stdout, err = _run(
        capsys, "cache-latents", images, "-o", out, "--model", vq_dir, "--resolution", "16"
    )
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert "has no posterior" in err and "KL" in err and "encode --indices" in err and stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("preset", ["flux", "vq-f8"])
def test_latent_scaling_is_what_scale_latents_does(preset):
    from ldm_vae.autoencoders import autoencoder_class
    from ldm_vae.workflows import latent_scaling

    config = autoencoder_class(preset).presets[preset]
    small = (8,) * len(config.block_out_channels)  # as many levels as the preset: vq-f8 has attention levels
    vae = autoencoder_class(preset)(config, block_out_channels=small, norm_num_groups=4, layers_per_block=1)
    scaling, shift = latent_scaling(vae)
    z = torch.randn(2, vae.decode_channels, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vae.scale_latents(z), (z - shift) * scaling, rtol=0, atol=0)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)


@pytest.mark.parametrize("command", ["decode", "reconstruct", "convert", "cache-latents", "sample", "demo"])
def test_a_file_where_the_output_folder_goes_is_refused(tmp_path, capsys, images, model_dir, command):
    blocker = tmp_path / "out"
    blocker.write_text("mine\n")
    lat = tmp_path / "z.safetensors"
    save_file({"latents": torch.zeros(1, 4, 4, 4)}, str(lat))
    model = ["--model", model_dir]
    argv = {
        "decode": ["decode", lat, *model],
        "reconstruct": ["reconstruct", images, *model],
        "convert": ["convert", model_dir, blocker, "--to", "diffusers"],
        "cache-latents": ["cache-latents", images, *model],
        "sample": ["sample", "--pipeline", tmp_path / "none"],
        "demo": ["demo", "--pipeline", tmp_path / "none"],
    }[command]
    code, _, err = _run(capsys, *argv, *([] if command == "convert" else ["-o", blocker]))
    assert code == 1 and err == f"error: {blocker}: exists and is not a directory\n"
    assert blocker.read_text() == "mine\n"
