"""Latents files of ``ldm-vae encode`` / ``decode``: VQ code indices, folders of mixed sizes, format 1 files,
and one-line refusals (tiny models, f = 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import photo, run_cli
from einops import rearrange
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from skimage import data

from ldm_vae import VQAutoencoder
from ldm_vae.images import crop_to, load_image, pad_to_multiple, to_uint8
from ldm_vae.workflows import FILE_FORMAT, batches_by_shape, codebook_sha256

FP32 = ["--dtype", "fp32"]
# name -> (H, W): three padded sizes; odd.png pads to 32x32 and so shares a batch with a.png.
MIXED = {"a.png": (32, 32), "b.png": (40, 24), "c.jpg": (48, 32), "odd.png": (31, 31)}
STEMS = ["a", "b", "c", "odd"]


@pytest.fixture(scope="module")
def vq(vq_dir) -> VQAutoencoder:
    return VQAutoencoder.from_pretrained(vq_dir)


@pytest.fixture
def mixed(tmp_path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    sources = (data.astronaut, data.coffee, data.chelsea, data.rocket)
    for (name, (h, w)), source in zip(MIXED.items(), sources, strict=True):
        photo(folder / name, h, w, source)
    return folder


@pytest.fixture
def same(tmp_path) -> Path:
    """Three images that pad to 32x32."""
    folder = tmp_path / "same"
    folder.mkdir()
    for name, (h, w), source in (
        ("a.png", (32, 32), data.astronaut),
        ("b.jpg", (32, 32), data.coffee),
        ("odd.png", (31, 31), data.chelsea),
    ):
        photo(folder / name, h, w, source)
    return folder


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_batches_by_shape_groups_equal_shapes_in_order():
    shapes = [(2, 2), (3, 1), (2, 2), (2, 2), (3, 1)]
    assert list(batches_by_shape(shapes, 2)) == [[0, 2], [3], [1, 4]]
    assert list(batches_by_shape([(1, 1)] * 5, 2)) == [[0, 1], [2, 3], [4]]


# ------------------------------------------------------------------------------------------ VQ code indices


def test_vq_indices_round_trip_is_decode_of_the_code_vectors(tmp_path, capsys, same, vq_dir, vq):
    lat, out = tmp_path / "codes.safetensors", tmp_path / "out"
    code, _, err = run_cli(capsys, "encode", same, "-o", lat, "--model", vq_dir, *FP32, "--indices")
    assert code == 0 and err == f"wrote indices (3, 16, 16) to {lat}\n", err
    meta = _metadata(lat)
    assert meta["latents_format"] == FILE_FORMAT and meta["kind"] == "indices"
    assert meta["layout"] == "stacked" and meta["num_vq_embeddings"] == "32"
    assert meta["codebook_sha256"] == codebook_sha256(vq) and meta["model"] == str(vq_dir)
    assert "scaling_factor" not in meta and list(load_file(lat)) == ["indices"]
    indices = load_file(lat)["indices"]
    assert indices.dtype == torch.int32 and indices.shape == (3, 16, 16)
    names = ["a.png", "b.jpg", "odd.png"]
    x = torch.stack([pad_to_multiple(load_image(same / n), 2) for n in names])  # (3, 3, 32, 32)
    with torch.no_grad():
        _, info = vq.quantize(vq.encode(x))
        assert torch.equal(indices.long(), info.indices)
        assert 1 < len(indices.unique()) <= 32  # real codes, not one constant
        code_vectors = rearrange(vq.quantize.codebook()[indices.long()], "b h w c -> b c h w")
        want = vq.decode(code_vectors)  # (3, 3, 32, 32)
    code, _, err = run_cli(capsys, "decode", lat, "-o", out, "--model", vq_dir, *FP32)
    assert code == 0 and "warning" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "odd.png"]
    for i, stem in enumerate(["a", "b", "odd"]):
        size = (31, 31) if stem == "odd" else (32, 32)
        np.testing.assert_array_equal(_png(out / f"{stem}.png"), to_uint8(crop_to(want[i], size)))
    # The scaled code vectors of a plain encode decode to the same images (up to the layout's rounding).
    plain, plain_out = tmp_path / "z.safetensors", tmp_path / "plain"
    assert run_cli(capsys, "encode", same, "-o", plain, "--model", vq_dir, *FP32)[0] == 0
    torch.testing.assert_close(load_file(plain)["latents"], code_vectors * 0.5, rtol=0, atol=0)
    assert run_cli(capsys, "decode", plain, "-o", plain_out, "--model", vq_dir, *FP32)[0] == 0
    for stem in ["a", "b", "odd"]:
        diff = _png(plain_out / f"{stem}.png").astype(int) - _png(out / f"{stem}.png")
        assert np.abs(diff).max() <= 1


def test_indices_decoded_with_another_codebook_warn_and_bf16_does_not(tmp_path, capsys, same, vq_dir):
    lat = tmp_path / "codes.safetensors"
    assert run_cli(capsys, "encode", same, "-o", lat, "--model", vq_dir, *FP32, "--indices")[0] == 0
    code, _, err = run_cli(
        capsys, "decode", lat, "-o", tmp_path / "bf16", "--model", vq_dir, "--dtype", "bf16"
    )
    assert code == 0 and "warning" not in err, err  # the codebook rounded to bf16 is the fingerprint
    torch.manual_seed(1)
    other = tmp_path / "other"
    VQAutoencoder.from_pretrained("tiny", vq_embed_dim=3).save_pretrained(other)  # 32 codes, other values
    code, _, err = run_cli(capsys, "decode", lat, "-o", tmp_path / "out", "--model", other, *FP32)
    assert code == 0 and f"warning: {lat} was encoded with another codebook ({vq_dir})" in err
    assert len(list((tmp_path / "out").iterdir())) == 3


# ------------------------------------------------------------------------------------------ mixed sizes


@pytest.mark.parametrize("case", ["kl", "vq", "vq-indices"])
def test_mixed_sizes_round_trip_equals_per_image_encode_and_decode(
    tmp_path, capsys, mixed, model_dir, vq_dir, case
):
    model = model_dir if case == "kl" else vq_dir
    flags = ["--indices"] if case == "vq-indices" else []
    one = [*FP32, "--batch-size", "1"]  # for exact equality: a batch computes a little differently
    extra, batched_extra = [*one, *flags], [*FP32, "--batch-size", "4", *flags]
    kind = "indices" if case == "vq-indices" else "latents"
    lat, out = tmp_path / "all.safetensors", tmp_path / "out"
    code, _, err = run_cli(capsys, "encode", mixed, "-o", lat, "--model", model, *extra)
    assert code == 0 and err == f"wrote {kind} of 4 images in 3 shapes (one tensor per image) to {lat}\n"
    meta = _metadata(lat)
    assert meta["layout"] == "per-image" and meta["kind"] == kind and meta["keys"] == '["a", "b", "c", "odd"]'
    tensors = load_file(lat)
    assert sorted(tensors) == STEMS
    code, _, err = run_cli(capsys, "decode", lat, "-o", out, "--model", model, *one)
    assert code == 0 and "warning" not in err, err
    assert sorted(p.name for p in out.iterdir()) == [f"{s}.png" for s in STEMS]
    for (name, (h, w)), stem in zip(MIXED.items(), STEMS, strict=True):
        z = tensors[stem]
        c = () if kind == "indices" else (3 if case == "vq" else 4,)
        assert z.shape == (*c, -(-h // 2), -(-w // 2))
        # The same image encoded and decoded on its own: the same latents and the same PNG, bit for bit.
        single, single_out = tmp_path / f"{stem}.safetensors", tmp_path / f"out-{stem}"
        assert run_cli(capsys, "encode", mixed / name, "-o", single, "--model", model, *extra)[0] == 0
        assert torch.equal(z, load_file(single)[kind][0])
        assert run_cli(capsys, "decode", single, "-o", single_out, "--model", model, *one)[0] == 0
        png = _png(out / f"{stem}.png")
        assert png.shape == (h, w, 3)
        np.testing.assert_array_equal(png, _png(single_out / f"{stem}.png"))
    # Batched (a.png and odd.png together): the same up to float rounding.
    batched = tmp_path / "batched.safetensors"
    assert run_cli(capsys, "encode", mixed, "-o", batched, "--model", model, *batched_extra)[0] == 0
    for stem in STEMS:
        b = load_file(batched)[stem]
        if kind == "indices":
            assert (b != tensors[stem]).float().mean() <= 0.01  # a near tie may flip a code
        else:
            assert (b - tensors[stem]).abs().max() <= 1e-5


def test_format_1_files_still_decode(tmp_path, capsys, same, model_dir):
    # What ldm-vae wrote before format 2: the same tensor and metadata, without latents_format/kind/layout.
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    assert run_cli(capsys, "encode", same, "-o", new, "--model", model_dir, *FP32)[0] == 0
    meta = {k: v for k, v in _metadata(new).items() if k not in ("latents_format", "kind", "layout")}
    assert {"scaling_factor", "source_names", "original_sizes"} <= set(meta)
    save_file(load_file(new), str(old), metadata=meta)
    for f in (new, old):
        assert run_cli(capsys, "decode", f, "-o", tmp_path / f.stem, "--model", model_dir, *FP32)[0] == 0
    for stem in ("a", "b", "odd"):
        np.testing.assert_array_equal(
            _png(tmp_path / "old" / f"{stem}.png"), _png(tmp_path / "new" / f"{stem}.png")
        )
    assert _png(tmp_path / "old" / "odd.png").shape == (31, 31, 3)


# ------------------------------------------------------------------------------------------ refusals


def _rewrite(path: Path, change) -> None:
    """Rewrites a latents file after ``change(tensors, metadata)`` edits them in place."""
    tensors, meta = load_file(path), _metadata(path)
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _set_index(value: int):
    def change(tensors, meta):
        tensors["indices"][1, 2, 3] = value

    return change


BAD = {
    "kl-model": "holds VQ code indices (of {vq_dir}); {model_dir} is a AutoencoderKL without a codebook",
    "codebook-size": "indices of a 32-code codebook ({vq_dir}), but {small} has 16 codes",
    "out-of-range": "highest 32); the codebook has 32 codes (0..31)",
    "negative": "code indices out of range (lowest -1, highest ",
    "float-indices": "indices must be an integer (N, h, w) tensor, got torch.float32 (3, 16, 16)",
    "newer-format": "latents file format 'ldm-vae-latents-file/3'; this ldm-vae reads",
    "keys": "metadata 'keys' do not list the file's 4 per-image tensors",
    "encode-kl": "--indices: {model_dir} is a AutoencoderKL, which has no codebook (VQ models only)",
    "encode-sample": "--sample with --indices: quantization is deterministic",
}


@pytest.mark.parametrize("case", list(BAD))
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, same, mixed, model_dir, vq_dir, case):
    small = tmp_path / "small"
    lat, out = tmp_path / "codes.safetensors", tmp_path / "out"
    if case.startswith("encode"):
        model = model_dir if case == "encode-kl" else vq_dir
        argv = ["encode", same, "-o", out / "z.safetensors", "--model", model, "--indices"]
        argv += ["--sample"] if case == "encode-sample" else []
    else:
        images = mixed if case == "keys" else same
        assert run_cli(capsys, "encode", images, "-o", lat, "--model", vq_dir, *FP32, "--indices")[0] == 0
        model = {"kl-model": model_dir, "codebook-size": small}.get(case, vq_dir)
        if case == "codebook-size":
            VQAutoencoder.from_pretrained("tiny", vq_embed_dim=3, num_vq_embeddings=16).save_pretrained(small)
        change = {
            "out-of-range": _set_index(32),
            "negative": _set_index(-1),
            "float-indices": lambda t, m: t.update(indices=t["indices"].float()),
            "newer-format": lambda t, m: m.update(latents_format="ldm-vae-latents-file/3"),
            "keys": lambda t, m: m.update(keys='["a", "b", "c", "d"]'),
        }.get(case)
        if change is not None:
            _rewrite(lat, change)
        argv = ["decode", lat, "-o", out, "--model", model]
    code, stdout, err = run_cli(capsys, *argv, *FP32)
    want = BAD[case].format(vq_dir=vq_dir, model_dir=model_dir, small=small)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and want in err, err
    assert stdout == "" and not out.exists()
