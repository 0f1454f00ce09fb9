"""``ldm-vae stats``: latent statistics against a direct computation, from images, caches and two processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_vae import AutoencoderKL, VQAutoencoder
from ldm_vae.cli import main
from ldm_vae.latents import cache_latents, prepare_image
from ldm_vae.seeds import mix_seed
from ldm_vae.workflows import stats as st


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import skimage.data

    folder = tmp_path_factory.mktemp("stats_photos")
    for i, image in enumerate([skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()] * 2):
        Image.fromarray(image).resize((24 + 3 * i, 20 + 2 * i), Image.BICUBIC).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return AutoencoderKL.from_pretrained("tiny").save_pretrained(tmp_path_factory.mktemp("kl") / "vae")


def stats_args(photos: Path, model: Path) -> list[str]:
    return [
        "stats",
        str(photos),
        "--model",
        str(model),
        "--dtype",
        "fp32",
        "--resolution",
        "16",
        "--views",
        "2",
    ]


def direct(vae, files, resolution: int, views: int, seed: int = 0) -> dict:
    """The statistics computed the plain way: every item's moments, stacked, reduced in float64."""
    first, second = [], []
    with torch.no_grad():
        for k in range(len(files) * views):
            x = prepare_image(files[k // views], resolution, k % views, mix_seed(seed, k))[None]
            a, b = vae.encode_moments(x)
            first.append(a.double())
            second.append(b.double())
    m1, m2 = torch.cat(first), torch.cat(second)  # (N, C, h, w)
    mean_c, sq_c = m1.mean(dim=(0, 2, 3)), m2.mean(dim=(0, 2, 3))
    return {
        "mean": m1.mean().item(),
        "std": (m2.mean() - m1.mean() ** 2).sqrt().item(),
        "channel_mean": mean_c.tolist(),
        "channel_std": (sq_c - mean_c**2).sqrt().tolist(),
    }


def assert_matches(stats: st.LatentStats, want: dict) -> None:
    assert stats.mean == pytest.approx(want["mean"], rel=1e-9, abs=1e-12)
    assert stats.std == pytest.approx(want["std"], rel=1e-9)
    assert list(stats.channel_mean) == pytest.approx(want["channel_mean"], rel=1e-9, abs=1e-12)
    assert list(stats.channel_std) == pytest.approx(want["channel_std"], rel=1e-9)


def test_image_stats_equal_a_direct_computation(photos, kl_dir):
    vae = AutoencoderKL.from_pretrained(kl_dir)
    files = sorted(photos.iterdir())
    stats = st.image_stats(vae, files, resolution=16, views=3, batch_size=1).stats()  # as direct()
    assert (stats.items, stats.elements_per_channel) == (18, 18 * 8 * 8)
    assert_matches(stats, direct(vae, files, 16, 3))
    assert stats.scaling_factor == pytest.approx(1 / stats.std)
    # Two processes' shares, summed, are the whole (what all_reduce does across ranks).
    halves = [st.image_stats(vae, files, 16, 3, batch_size=1, rank=r, world=2) for r in (0, 1)]
    halves[0].first += halves[1].first
    halves[0].second += halves[1].second
    halves[0].count += halves[1].count
    halves[0].items += halves[1].items
    assert_matches(halves[0].stats(), direct(vae, files, 16, 3))


def test_vq_stats_are_those_of_the_codebook_vectors(photos):
    torch.manual_seed(0)
    vq = VQAutoencoder.from_pretrained("tiny")
    files = sorted(photos.iterdir())
    stats = st.image_stats(vq, files, resolution=16).stats()
    z = torch.cat([vq.encode_latents(prepare_image(f, 16)[None]) for f in files]).double()
    assert stats.mean == pytest.approx(z.mean().item(), rel=1e-9)
    assert stats.std == pytest.approx(z.std(unbiased=False).item(), rel=1e-9)


def test_a_cache_gives_the_statistics_of_its_images(photos, kl_dir, tmp_path):
    vae = AutoencoderKL.from_pretrained(kl_dir)
    files = sorted(photos.iterdir())
    manifest = cache_latents(
        vae, files, tmp_path / "cache", root=photos, resolution=16, views=2, shard_size=5
    )
    from_cache, _ = st.cache_stats(tmp_path / "cache")
    from_images = st.image_stats(vae, files, 16, 2)
    for a, b in ((from_cache.stats(), from_images.stats()),):
        assert a.mean == pytest.approx(b.mean, rel=1e-6) and a.std == pytest.approx(b.std, rel=1e-6)
        assert list(a.channel_std) == pytest.approx(list(b.channel_std), rel=1e-6)
    assert from_cache.stats().scaling_factor == pytest.approx(manifest["scale"], rel=1e-9)


def test_cli_prints_the_factors_and_writes_a_model_with_them(photos, kl_dir, tmp_path, capsys):
    out = tmp_path / "scaled"
    args = stats_args(photos, kl_dir)
    assert main([*args, "--write", str(out), "--shift"]) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "latent_stats.json").read_text())
    assert f"{written['scaling_factor']:.6g}" in printed and "want 0, 1" in printed
    model = AutoencoderKL.from_pretrained(out)
    assert model.config.scaling_factor == pytest.approx(written["scaling_factor"], rel=1e-12)
    assert model.config.shift_factor == pytest.approx(written["mean"], rel=1e-12)
    src = AutoencoderKL.from_pretrained(kl_dir)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    # The written model's factors map these latents to mean 0 and std 1.
    assert re.search(r"mean -?0(\.0+)?(e[+-]\d+)?, std 1(\.0+)? ", _rerun(photos, out, capsys))


def _rerun(photos: Path, model: Path, capsys) -> str:
    assert main(stats_args(photos, model)) == 0
    return capsys.readouterr().out


def test_cli_refusals_are_one_line(photos, kl_dir, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["stats", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    assert "not empty" in error(str(photos), "--model", str(kl_dir), "--write", str(tmp_path / "full"))
    assert "no such directory" in error(str(tmp_path / "nowhere"), "--model", str(kl_dir))
    assert "not a positive multiple" in error(str(photos), "--model", str(kl_dir), "--resolution", "15")


def test_vq_model_has_no_shift_to_write(photos, tmp_path, capsys):
    torch.manual_seed(0)
    folder = VQAutoencoder.from_pretrained("tiny").save_pretrained(tmp_path / "vq")
    args = [
        "stats",
        str(photos),
        "--model",
        str(folder),
        "--resolution",
        "16",
        "--write",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--shift"]) == 1
    assert "a VQAutoencoder has no shift_factor" in capsys.readouterr().err
    assert main(args) == 0  # the scale alone
    assert VQAutoencoder.from_pretrained(tmp_path / "o").config.scaling_factor != 1.0


def test_two_processes_split_the_images_and_agree_with_one(photos, kl_dir):
    args = stats_args(photos, kl_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "ldm_vae.cli", *args], capture_output=True, text=True, env=env
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), "-m", "ldm_vae.cli"]
    two = subprocess.run([*launch, *args], capture_output=True, text=True, env=env, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    # The ranks' own messages come before the launcher's summary: show both ends.
    assert two.returncode == 0, two.stderr[:3000] + "\n[...]\n" + two.stderr[-1500:]
    assert two.stdout.count("scaling_factor (1 / std)") == 1  # only the main process prints
    assert two.stdout.splitlines()[:5] == one.stdout.splitlines()[:5]  # float64 sums: the same to the digit
