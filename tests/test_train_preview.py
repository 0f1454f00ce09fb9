"""End-to-end tests of scripts/train_preview.py: a tiny preview distilled from a tiny KL teacher, 16 px crops, CPU."""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from _accelerate import fresh_accelerate  # noqa: F401 - autouse
from PIL import Image

from ldm_vae import AutoencoderKL, AutoencoderTiny
from ldm_vae.training import load_config, read_metrics
from ldm_vae.training import train_preview as tp

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Ten small colour photos (skimage's), 40-48 px."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    for i in range(10):
        im = Image.fromarray(sources[i % 4]).resize((40 + 4 * (i % 3), 40 + 4 * (i % 2)), Image.BICUBIC)
        im.save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """The tiny KL model (f = 2), random init, with a latent scale of 0.5 (exact in binary)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher") / "vae"
    AutoencoderKL.from_pretrained("tiny", scaling_factor=0.5).save_pretrained(folder)
    return folder


def config(photos: Path, teacher: Path, out: Path, *overrides: tuple[str, str]) -> tp.Config:
    base = [
        ("teacher.model", str(teacher)),
        ("data.train_dir", str(photos)),
        ("train.output_dir", str(out)),
        ("preview.encoder_width", "8"),
        ("preview.decoder_width", "8"),
        ("preview.num_encoder_blocks", "[1, 1]"),
        ("preview.num_decoder_blocks", "[1, 1]"),
        ("data.resolution", "16"),
        ("data.batch_size", "4"),
        ("data.num_workers", "0"),
        ("data.num_val", "2"),
        ("optim.lr", "2e-3"),
        ("train.tensorboard", "false"),
        ("train.log_every", "1"),
        ("train.val_every", "0"),
    ]
    return load_config(tp.Config, None, [*base, *overrides])


def test_training_exports_a_diffusers_autoencoder_tiny_for_the_teachers_latents(photos, teacher, tmp_path):
    cfg = config(photos, teacher, tmp_path / "run", ("train.max_steps", "2"), ("train.checkpoint_every", "1"))
    export = tp.main(cfg)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [
        "checkpoint-0000001",
        "checkpoint-0000002",
    ]
    ours = AutoencoderTiny.from_pretrained(export)
    theirs = diffusers.AutoencoderTiny.from_pretrained(export).eval()
    assert ours.config.latent_channels == 4 and ours.config.upsample_factor == 2
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z).sample, ours.decode(z), atol=0, rtol=0)
    val = [r for r in read_metrics(tmp_path / "run") if "val/psnr_vs_teacher" in r]
    assert val and {"val/psnr_vs_image_ema", "val/latent_mse", "val/teacher_psnr"} <= val[-1].keys()
    assert load_config(tp.Config, tmp_path / "run" / "train_config.json") == cfg


@torch.no_grad()
def test_the_decoder_learns_the_scaled_latents_a_pipeline_hands_its_vae(teacher):
    vae = AutoencoderKL.from_pretrained(teacher)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z, target, mode = tp.teacher_targets(vae, x, False, None)
    raw = vae.encode_latents(x)
    torch.testing.assert_close(
        z, raw * 0.5
    )  # diffusion-ready: what LDMPipeline divides by scaling_factor 1.0
    torch.testing.assert_close(target, vae.decode(raw).clamp(-1, 1))
    torch.testing.assert_close(mode, z)
    sampled, _, mode = tp.teacher_targets(vae, x, True, torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, z) and torch.equal(mode, z)  # the encoder always learns the mode


def test_loss_goes_down_with_the_adversarial_term_on(photos, teacher, tmp_path):
    cfg = config(
        photos,
        teacher,
        tmp_path / "run",
        ("train.max_steps", "24"),
        ("train.ema_decay", "0"),
        ("loss.adv_weight", "0.01"),
        ("loss.adv_start", "12"),
        ("loss.disc_num_layers", "1"),
        ("loss.disc_channels", "8"),
    )
    tp.main(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "train/rec_teacher" in r]
    first = sum(r["train/rec_teacher"] for r in rows[:4]) / 4
    last = sum(r["train/rec_teacher"] for r in rows[-4:]) / 4
    assert last < 0.7 * first
    assert "train/d_loss" not in rows[10] and "train/d_loss" in rows[13]  # logged from adv_start on


def test_config_errors_are_one_line(photos, teacher, tmp_path):
    with pytest.raises(
        tp.ConfigError, match=r"preview.num_decoder_blocks has 3 stages; .* 2x smaller .* takes 2"
    ):
        tp.main(config(photos, teacher, tmp_path / "a", ("preview.num_decoder_blocks", "[1, 1, 1]")))
    with pytest.raises(tp.ConfigError, match=r"teacher.model: .*nowhere"):
        tp.main(config(photos, teacher, tmp_path / "b", ("teacher.model", str(tmp_path / "nowhere"))))
    assert tp.cli(["--data-dir", str(photos), "--model", str(teacher), "--preview.act_fn", "tanh"]) == 1


def test_the_demo_recipe_loads():
    cfg = load_config(tp.Config, ROOT / "scripts" / "configs" / "preview_demo.toml")
    assert cfg.teacher.model == "demo" and cfg.preview.num_decoder_blocks == (3, 3, 1, 0)
