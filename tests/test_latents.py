"""Latent caching (ldm_vae/latents.py and `ldm-vae cache-latents`): shard contents, resume, scale, process split."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_vae import AutoencoderKL
from ldm_vae.checkpoint import CheckpointError
from ldm_vae.cli import main
from ldm_vae.latents import (
    MANIFEST_NAME,
    LatentDataset,
    held_out_split,
    latent_moments,
    prepare_image,
    shard_name,
    shard_ranges,
    shards_of_process,
)
from ldm_vae.training import mix_seed

RES = 16


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and spinning OpenMP workers slow a shared 2-core machine down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Ten small photos of assorted sizes (some below, some above the 16 px crop), in two subfolders."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    for i in range(10):
        size = (12 + 7 * (i % 4), 14 + 5 * (i % 3))
        sub = folder / ("a" if i < 5 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(sources[i % 4]).resize(size, Image.BICUBIC).save(sub / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return AutoencoderKL.from_pretrained("tiny").save_pretrained(tmp_path_factory.mktemp("vae") / "tiny")


def cache(photos: Path, vae_dir: Path, out: Path, *extra: str) -> int:
    args = ["cache-latents", str(photos), "-o", str(out), "--model", str(vae_dir), "--dtype", "fp32"]
    return main([*args, "--resolution", str(RES), "--shard-size", "4", "--batch-size", "3", *extra])


@pytest.fixture(scope="module")
def cached(photos, vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "latents"
    assert cache(photos, vae_dir, out) == 0
    return out


def reference(photos: Path, vae_dir: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Names, means and stds computed directly with vae.encode, one image at a time."""
    vae = AutoencoderKL.from_pretrained(vae_dir)
    files = sorted(p for p in photos.rglob("*.png"))
    with torch.no_grad():
        posts = [vae.encode(prepare_image(p, RES)[None]) for p in files]
    names = [p.relative_to(photos).as_posix() for p in files]
    return names, torch.cat([q.mean for q in posts]), torch.cat([q.std for q in posts])


# ------------------------------------------------------------------------------------------- planning


def test_shard_plan_and_process_split_cover_everything_once():
    assert shard_ranges(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert shard_ranges(0, 4) == []
    for num_shards in range(8):
        for world in range(1, 5):
            parts = [shards_of_process(num_shards, r, world) for r in range(world)]
            flat = sorted(i for p in parts for i in p)
            assert flat == list(range(num_shards))  # every shard once: disjoint and complete
            assert all(i % world == r for r, p in enumerate(parts) for i in p)  # every world-th shard
    with pytest.raises(ValueError):
        shards_of_process(4, 2, 2)
    with pytest.raises(ValueError):
        shard_ranges(3, 0)


def test_prepare_image_crops_the_center_and_shrinks_the_short_side(tmp_path):
    # 16 x 48: columns carry their index; no resize is needed, so the crop is exactly columns 16..31.
    ramp = np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (16, 1, 3))
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    x = prepare_image(tmp_path / "wide.png", 16)
    expected = torch.arange(16, 32, dtype=torch.float32) * 5 / 255 * 2 - 1
    assert x.shape == (3, 16, 16) and torch.allclose(x[0, 5], expected, atol=1e-6)
    # 64 x 40, one colour: shrunk to 25 x 16 (short side 16), cropped to 16 x 16, colour kept.
    Image.new("RGB", (40, 64), (200, 30, 90)).save(tmp_path / "tall.png")
    y = prepare_image(tmp_path / "tall.png", 16)
    assert y.shape == (3, 16, 16)
    assert torch.allclose(y, torch.tensor([200, 30, 90]).view(3, 1, 1) / 127.5 - 1, atol=1e-5)


# ------------------------------------------------------------------------------------------- contents


def test_shards_hold_the_encoder_posterior(cached, photos, vae_dir):
    names, mean, std = reference(photos, vae_dir)
    manifest = json.loads((cached / MANIFEST_NAME).read_text())
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["num_items"] == 10 and manifest["latent_shape"] == [4, 8, 8]
    got_names, got_mean, got_std = [], [], []
    for entry in manifest["shards"]:
        with safe_open(str(cached / entry["file"]), framework="pt") as f:
            got_names += json.loads(f.metadata()["names"])
            got_mean.append(f.get_tensor("mean"))
            got_std.append(f.get_tensor("std"))
    assert got_names == names
    # Batches of 3 vs single images: GroupNorm statistics are per image, only float rounding differs.
    torch.testing.assert_close(torch.cat(got_mean), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got_std), std, atol=1e-5, rtol=1e-5)


def test_scale_is_one_over_the_std_of_posterior_samples(cached, photos, vae_dir):
    _, mean, std = reference(photos, vae_dir)
    # Independently: the std of many posterior samples z = mean + std * eps, over every element.
    g = torch.Generator().manual_seed(0)
    z = mean[None] + std[None] * torch.randn((400, *mean.shape), generator=g, dtype=torch.float64)
    manifest = json.loads((cached / MANIFEST_NAME).read_text())
    assert manifest["scale"] == pytest.approx(1 / z.std().item(), rel=2e-3)
    # ... and in closed form: Var z = E[mean^2 + std^2] - E[mean]^2.
    var = (mean.double().square() + std.double().square()).mean() - mean.double().mean().square()
    assert manifest["scale"] == pytest.approx(var.rsqrt().item(), rel=1e-5)  # batched vs single encodes
    assert latent_moments([mean], [std])[1] == pytest.approx(var.sqrt().item(), rel=1e-9)
    assert manifest["shift"] == 0.0 and manifest["vae_scaling_factor"] == 1.0


def test_rerun_recomputes_only_the_missing_shard(photos, vae_dir, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    assert cache(photos, vae_dir, out) == 0
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("shard-*")}
    original = load_file(str(out / shard_name(1)))
    (out / shard_name(1)).unlink()
    calls = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(
        AutoencoderKL, "encode", lambda self, x, **kw: calls.append(len(x)) or encode(self, x, **kw)
    )
    assert cache(photos, vae_dir, out) == 0
    assert calls == [3, 1]  # shard 1 alone: 4 images in batches of 3
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("shard-*")}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n != shard_name(1))
    recomputed = load_file(str(out / shard_name(1)))
    assert all(torch.equal(recomputed[k], original[k]) for k in ("mean", "std"))
    # A complete cache reruns without encoding anything.
    calls.clear()
    assert cache(photos, vae_dir, out) == 0
    assert calls == []


def test_a_cache_of_other_settings_is_refused_and_kept(cached, photos, vae_dir, capsys):
    before = {p.name: p.read_bytes() for p in cached.iterdir()}
    assert cache(photos, vae_dir, cached, "--shard-size", "5") == 1  # overrides the earlier --shard-size 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "latents: written in shards of 4 latents, this run in shards of 5; write to a new folder" in err
    assert {p.name: p.read_bytes() for p in cached.iterdir()} == before


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a folder: (mtime_ns, bytes)."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def own_photos(tmp_path) -> Path:
    """Six 20 x 20 PNGs stored uncompressed, so a repainted one keeps its size to the byte."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png", compress_level=0)
    return folder


def test_an_image_replaced_under_its_name_size_and_mtime_is_refused(own_photos, vae_dir, tmp_path, capsys):
    out = tmp_path / "latents"
    assert cache(own_photos, vae_dir, out) == 0  # shards of 4: img00-03, img04-05
    capsys.readouterr()
    target = own_photos / "img04.png"
    st = target.stat()
    Image.new("RGB", (20, 20), (200, 30, 90)).save(target, compress_level=0)  # another photo, same name
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    before = snapshot(out)
    assert cache(own_photos, vae_dir, out) == 1
    assert (
        f"{out}: latents of another image set (img04.png changed); write to a new folder"
        in one_line_error(capsys)
    )
    # Interrupted before the manifest: the shard holding the image names it, the other shard notwithstanding.
    (out / MANIFEST_NAME).unlink()
    assert cache(own_photos, vae_dir, out) == 1
    err = one_line_error(capsys)
    assert f"{out / shard_name(1)}: latents of another image set (img04.png changed)" in err
    assert snapshot(out) == {k: v for k, v in before.items() if k != MANIFEST_NAME}
    # Images added and removed are named too.
    target.rename(own_photos / "new.png")
    assert cache(own_photos, vae_dir, out) == 1
    assert "(new.png added, img04.png removed)" in one_line_error(capsys)


def test_another_dtype_or_tiling_is_refused(own_photos, vae_dir, tmp_path, capsys):
    out = tmp_path / "latents"
    assert cache(own_photos, vae_dir, out) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert cache(own_photos, vae_dir, out, "--dtype", "bf16") == 1  # overrides the earlier --dtype fp32
    err = one_line_error(capsys)
    assert f"{out}: computed in float32, this run computes in bfloat16; write to a new folder" in err
    assert cache(own_photos, vae_dir, out, "--tile-size", "8") == 1
    assert f"{out}: encoded with tile size none, this run with 8; write" in one_line_error(capsys)
    assert cache(own_photos, vae_dir, out, "--max-memory", "2MiB") == 1
    assert "encoded with max memory auto, this run with 2097152" in one_line_error(capsys)
    assert snapshot(out) == before


def test_an_unchanged_rerun_rewrites_no_shard(own_photos, vae_dir, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    assert cache(own_photos, vae_dir, out, "--tile-size", "8") == 0
    shards = {k: v for k, v in snapshot(out).items() if k.startswith("shard-")}
    assert len(shards) == 2
    calls = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(
        AutoencoderKL, "encode", lambda self, x, **kw: calls.append(len(x)) or encode(self, x, **kw)
    )
    assert cache(own_photos, vae_dir, out, "--tile-size", "8") == 0
    assert calls == [] and {k: v for k, v in snapshot(out).items() if k.startswith("shard-")} == shards


def test_readers_trust_a_cache_only_through_its_fingerprint(cached, photos, vae_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(cached, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    assert manifest["settings"]["dtype"] == "float32" and manifest["settings"]["tile_size"] is None
    assert len(manifest["images"]) == 10 and all(len(h) == 64 for _, h in manifest["images"])
    # A manifest edited out of its fingerprint.
    edited = {**manifest, "images": [[n, "0" * 64] for n, _ in manifest["images"]]}
    (copy / MANIFEST_NAME).write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="fingerprint does not match its settings and images"):
        LatentDataset(copy)
    # A shard of another cache under a matching manifest.
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    other = tmp_path / "other"
    assert cache(photos, vae_dir, other, "--seed", "3") == 0
    shutil.copy(other / shard_name(1), copy / shard_name(1))
    with pytest.raises(
        CheckpointError, match=r"shard-00001.safetensors: does not match latents.json \(views"
    ):
        LatentDataset(copy)


def test_a_cache_of_the_previous_format_is_refused(cached, photos, vae_dir, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(cached, old)
    capsys.readouterr()
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    for k in ("settings", "images"):
        del manifest[k]
    (old / MANIFEST_NAME).write_text(json.dumps({**manifest, "format": "ldm-vae-latents/1"}))
    message = (
        "written by an older ldm-vae, without image content hashes (ldm-vae-latents/1); re-run cache-latents"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        LatentDataset(old)
    assert cache(photos, vae_dir, old) == 1
    assert f"{old / MANIFEST_NAME}: {message} into a new folder" in one_line_error(capsys)
    # An interrupted run of the previous format: shards without settings or image hashes.
    (old / MANIFEST_NAME).unlink()
    tensors = load_file(str(old / shard_name(0)))
    with safe_open(str(old / shard_name(0)), framework="pt") as f:
        metadata = {k: f.metadata()[k] for k in ("names", "process")}
    metadata["fingerprint"] = "0" * 64  # the old fingerprint covered less, so it differs from the new one
    save_file(tensors, str(old / shard_name(0)), metadata)
    assert cache(photos, vae_dir, old) == 1
    err = one_line_error(capsys)
    assert f"{old / shard_name(0)}: written by an older ldm-vae, without image content hashes; re-run" in err


def test_bad_inputs_fail_before_writing(photos, vae_dir, tmp_path, capsys):
    assert cache(tmp_path / "missing", vae_dir, tmp_path / "out") == 1
    assert "no such directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (20, 20)).save(bad / "ok.png")
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    assert cache(bad, vae_dir, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.jpg: not a readable image" in err
    assert cache(photos, vae_dir, tmp_path / "out", "--resolution", "15") == 1
    assert "not a positive multiple of the model's factor 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_views_add_seeded_random_crops_after_each_center_crop(cached, photos, vae_dir, tmp_path):
    out = tmp_path / "views"
    assert cache(photos, vae_dir, out, "--views", "3", "--seed", "7") == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["num_items"] == 30 and manifest["views"] == 3
    plain, data = LatentDataset(cached, sample=False), LatentDataset(out, sample=False)
    assert data.names[:4] == [plain.names[0], plain.names[0] + "#1", plain.names[0] + "#2", plain.names[1]]
    # View 0 of every image is the center crop the plain cache holds (batched differently: rounding only).
    torch.testing.assert_close(data.mean[0::3], plain.mean, atol=1e-5, rtol=1e-5)
    # The other views are the encoder's posterior of the seeded crops, and differ from the center crop.
    vae = AutoencoderKL.from_pretrained(vae_dir)
    files = sorted(photos.rglob("*.png"))
    for k in (1, 5, 29):
        x = prepare_image(files[k // 3], RES, k % 3, mix_seed(7, k))
        with torch.no_grad():
            torch.testing.assert_close(data.mean[k], vae.encode(x[None]).mean[0], atol=1e-5, rtol=1e-5)
    # (A photo little larger than the crop has few other squares: some views may repeat the center one.)
    same = [torch.allclose(data.mean[k], data.mean[k - k % 3], atol=1e-3) for k in range(30) if k % 3]
    assert sum(same) <= 5
    assert cache(photos, vae_dir, out, "--views", "3", "--seed", "8") == 1  # other views: refused


def test_random_views_are_squares_of_the_image_at_a_random_scale(tmp_path):
    # 16 x 48 ramp, one value per column: every view is 16 consecutive columns (no resize possible), some mirrored.
    ramp = np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (16, 1, 3))
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    columns = torch.arange(48, dtype=torch.float32) * 5 / 255 * 2 - 1
    mirrored = 0
    for seed in range(12):
        row = prepare_image(tmp_path / "wide.png", 16, view=1, seed=seed)[0, 3]
        mirrored += bool(row[0] > row[-1])
        start = int(torch.argmin((columns[None, :33] - row.sort().values[0]).abs()))
        torch.testing.assert_close(row.sort().values, columns[start : start + 16], atol=1e-6, rtol=0)
    assert 0 < mirrored < 12
    # 64 x 40 with a bright left half: a larger image is shrunk by a random amount before the crop.
    im = np.zeros((64, 40, 3), np.uint8)
    im[:, :20] = 255
    Image.fromarray(im).save(tmp_path / "tall.png")
    views = [prepare_image(tmp_path / "tall.png", 16, view=1, seed=s) for s in range(12)]
    assert all(v.shape == (3, 16, 16) and v.min() >= -1 and v.max() <= 1 for v in views)
    assert len({round(float(v.mean()), 3) for v in views}) > 3  # different scales and offsets
    torch.testing.assert_close(prepare_image(tmp_path / "tall.png", 16, 1, 3), views[3], atol=0, rtol=0)


def test_held_out_split_keeps_every_view_of_a_held_out_image_apart():
    assert held_out_split({"num_items": 10}, 3) == (range(7), range(7, 10))  # a cache without views
    train, val = held_out_split({"num_items": 30, "views": 3}, 2)
    assert list(val) == [24, 27] and train == range(
        24
    )  # center crops of images 8, 9; no view of them trained
    assert held_out_split({"num_items": 30, "views": 3}, 0) == (range(30), range(30, 30, 3))
    with pytest.raises(ValueError, match=r"10 held-out images: must be in \[0, 10\)"):
        held_out_split({"num_items": 30, "views": 3}, 10)


# ------------------------------------------------------------------------------------------- dataset


def test_dataset_samples_the_posterior_with_the_given_seed(cached):
    data = LatentDataset(cached)
    scale = json.loads((cached / MANIFEST_NAME).read_text())["scale"]
    assert len(data) == 10 and data.scale == scale
    eps = torch.randn(data.mean[3].shape, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(data[(3, 123)], (data.mean[3] + data.std[3] * eps) * scale)
    assert not torch.equal(data[(3, 123)], data[(3, 124)])
    torch.testing.assert_close(LatentDataset(cached, sample=False)[3], data.mean[3] * scale)
    tail = LatentDataset(cached, range(7, 10))
    assert tail.names == data.names[7:] and torch.equal(tail.mean, data.mean[7:])
    fixed = tail.fixed_samples(5)
    assert fixed.shape == (3, 4, 8, 8) and torch.equal(fixed[1], tail[(1, mix_seed(5, 1))])


# ------------------------------------------------------------------------------------------- processes


def test_two_processes_write_disjoint_shards_with_the_same_contents(cached, photos, vae_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "latents"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["cache-latents", str(photos), "-o", str(out), "--model", str(vae_dir), "--dtype", "fp32"]
    args += ["--resolution", str(RES), "--shard-size", "4", "--batch-size", "3"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [*launcher, "--main_process_port", str(port), "-m", "ldm_vae.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    writers = {}
    for i in range(3):
        with safe_open(str(out / shard_name(i)), framework="pt") as f:
            writers[i] = f.metadata()["process"]
    assert writers == {0: "0/2", 1: "1/2", 2: "0/2"}
    for i in range(3):
        one, two = load_file(str(cached / shard_name(i))), load_file(str(out / shard_name(i)))
        for k in ("mean", "std"):  # equal up to float rounding (thread counts may differ)
            torch.testing.assert_close(one[k], two[k], atol=1e-6, rtol=1e-6)
    ref, got = (json.loads((d / MANIFEST_NAME).read_text()) for d in (cached, out))
    assert got["scale"] == pytest.approx(ref["scale"], rel=1e-6) and got["shards"] == ref["shards"]
