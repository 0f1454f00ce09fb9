"""fp16 safety: activation hooks, check_fp16, the function-preserving rescale, and the fp16_fix fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _accelerate import fresh_accelerate, reset_accelerate  # noqa: F401 - fresh_accelerate is autouse
from _cli import photo, run_cli
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ldm_vae import AutoencoderKL
from ldm_vae.activations import FP16_MAX, activation_blocks, activation_penalty, record_maxima
from ldm_vae.training import ConfigError, load_config, read_metrics
from ldm_vae.training import train_vae as tv
from ldm_vae.training.fp16_fix import FP16FixConfig, relative_param_groups
from ldm_vae.workflows.fp16 import check_fp16, format_fp16_report, rescale_attention_values

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scripts" / "configs" / "tiny_cpu.toml"
FACTOR = 2.0**18  # random-init tiny v is O(1): 2^18 lifts it well past 65504


def tiny(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL.from_pretrained("tiny").eval()


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 3, size + 3, size + 3, generator=g), 4, stride=1)  # smooth, like photos
    return x * 2 - 1


def broken(seed: int = 0) -> AutoencoderKL:
    model = tiny(seed)
    rescale_attention_values(model.decoder.mid_block.attentions[0], FACTOR)
    return model


# ------------------------------------------------------------------------------------------- hooks


def test_blocks_are_named_and_cover_the_attention_projections():
    blocks = activation_blocks(tiny())
    for name in (
        "encoder.conv_in",
        "encoder.down_blocks.0.resnets.0",
        "encoder.down_blocks.0.downsamplers.0",
        "encoder.mid_block.attentions.0",
        "encoder.conv_norm_out",
        "decoder.up_blocks.0.upsamplers.0",
        "decoder.conv_out",
        "quant_conv",
        "post_quant_conv",
    ):
        assert name in blocks, name
    # the attention itself, its group_norm, to_q, to_k, to_v and to_out.0
    assert len(blocks["decoder.mid_block.attentions.0"]) == 6


@torch.no_grad()
def test_recorded_maxima_equal_a_manual_forward():
    model, x = tiny(), images()
    with record_maxima(model) as maxima:
        z = model.encode_latents(x)
        model.decode(z)
    assert torch.tensor(maxima["encoder.conv_in"]) == model.encoder.conv_in(x).abs().max()
    # The decoder's mid-block attention, op by op: its input is conv_in then the first mid resnet.
    dec = model.decoder
    h = dec.mid_block.resnets[0](dec.conv_in(model.post_quant_conv(z)))
    att = dec.mid_block.attentions[0]
    b, c, hh, ww = h.shape
    tokens = att.group_norm(h.view(b, c, hh * ww)).transpose(1, 2)
    q, k, v = att.to_q(tokens), att.to_k(tokens), att.to_v(tokens)
    o = att.to_out[0](F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])
    out = o.transpose(1, 2).reshape(b, c, hh, ww) + h
    manual = max(t.abs().max().item() for t in (tokens, q, k, v, o, out))
    assert maxima["decoder.mid_block.attentions.0"] == pytest.approx(manual, rel=1e-6)
    assert set(maxima) == set(activation_blocks(model))  # every block ran and was recorded


def test_hooks_are_removed_after_recording():
    model = tiny()
    with record_maxima(model):
        pass
    assert all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------- check_fp16


@torch.no_grad()
def test_the_rescaled_model_is_bit_identical_in_fp32_and_flagged():
    x = images()
    good, bad = tiny(), broken()
    assert torch.equal(good(x, sample_posterior=False)[0], bad(x, sample_posterior=False)[0])
    ok, flagged = check_fp16(good, [x]), check_fp16(bad, [x])
    assert ok.safe and ok.decode_finite and not ok.overflowing and ok.fp16_psnr > 30
    assert ok.verdict.startswith("fp16-safe")
    assert not flagged.safe and not flagged.decode_finite and flagged.encode_finite
    assert flagged.overflowing == ("decoder.mid_block.attentions.0",)
    assert flagged.maxima["decoder.mid_block.attentions.0"] > FP16_MAX
    assert flagged.verdict.startswith("NOT fp16-safe") and "decode not finite" in flagged.verdict
    assert bad.dtype == torch.float32  # the checked model is left as it was
    json.dumps(flagged.to_json())  # infinities and NaNs are written as strings


def test_the_table_lists_the_largest_blocks_and_always_the_overflowing_ones():
    report = check_fp16(broken(), [images(1)])
    rows = lambda text: [line.split()[0] for line in text.splitlines()[1:-2]]  # noqa: E731
    assert rows(format_fp16_report(report, top=1)) == ["decoder.mid_block.attentions.0"]
    assert len(rows(format_fp16_report(report, top=3))) == 3
    assert rows(format_fp16_report(report, top=None)) == list(report.maxima)  # every block, in network order


@torch.no_grad()
def test_a_vq_model_is_checked_too(vq_dir):
    from ldm_vae.autoencoders import load_autoencoder

    report = check_fp16(load_autoencoder(vq_dir), [images(1)])
    assert report.safe and "decoder.mid_block.attentions.0" in report.maxima


# ------------------------------------------------------------------------------------------- penalty


def test_penalty_is_zero_under_the_threshold_and_positive_with_a_gradient_above():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(2, 3, 8, 8) * 10
    y = net(x).abs().max().item()
    with activation_penalty(net, threshold=2 * y) as pen:
        net(x)
    assert pen.penalty.item() == 0 and pen.max.item() == pytest.approx(y)
    t = y / 2
    with activation_penalty(net, threshold=t) as pen:
        out = net(x)
    expected = torch.relu(out.abs() / t - 1).square().mean()
    torch.testing.assert_close(pen.penalty, expected)
    assert pen.penalty.item() > 0
    pen.penalty.backward()
    assert net[0].weight.grad.abs().sum() > 0
    with torch.no_grad():  # a small step along the gradient lowers it
        net[0].weight -= 1e-3 * net[0].weight.grad / net[0].weight.grad.norm()
    with activation_penalty(net, threshold=t) as after:
        net(x)
    assert after.penalty.item() < pen.penalty.item()


def test_relative_lr_groups_scale_with_each_tensors_rms():
    def v_over_out(model: AutoencoderKL) -> float:
        att = model.decoder.mid_block.attentions[0]
        lr = {id(g["params"][0]): g["lr"] for g in relative_param_groups(att, 1e-2)}
        return lr[id(att.to_v.weight)] / lr[id(att.to_out[0].weight)]

    # to_v grew FACTOR times and to_out shrank as much: their learning rates moved apart by FACTOR^2.
    assert v_over_out(broken()) / v_over_out(tiny()) == pytest.approx(FACTOR**2, rel=1e-5)
    att = tiny().decoder.mid_block.attentions[0]
    (group,) = [g for g in relative_param_groups(att, 1e-2) if g["params"][0] is att.to_q.weight]
    assert group["lr"] == pytest.approx(1e-2 * att.to_q.weight.square().mean().sqrt().item())


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    for i, src in enumerate([skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea] * 2):
        Image.fromarray(src()).resize((40, 36), Image.BICUBIC).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "broken"
    broken().save_pretrained(folder)
    return folder


def fix_config(photos: Path, model: Path, out: Path, *overrides: tuple[str, str]):
    base = [
        ("model.init", str(model)),
        ("data.train_dir", str(photos)),
        ("train.output_dir", str(out)),
        ("data.resolution", "16"),
        ("data.batch_size", "2"),
        ("data.num_workers", "0"),
        ("data.num_val", "2"),
        ("train.tensorboard", "false"),
        ("train.log_every", "1"),
        ("train.val_every", "0"),
        ("train.max_steps", "2"),
        ("train.ema_decay", "0.9"),
        ("train.checkpoint_every", "1"),
        ("optim.lr", "0.05"),
        ("optim.warmup_steps", "0"),
        ("fp16_fix.enabled", "true"),
        ("fp16_fix.threshold", "1024"),
    ]
    return load_config(tv.Config, TINY, [*base, *overrides])


def test_two_fix_steps_lower_the_penalty_and_keep_the_teacher_out(photos, broken_dir, tmp_path):
    cfg = fix_config(photos, broken_dir, tmp_path / "run", ("model.decoder_only", "true"))
    export = tv.main(cfg)
    logs = [r for r in read_metrics(tmp_path / "run") if "train/fp16_fix/penalty" in r]
    assert [r["step"] for r in logs] == [1, 2]
    assert logs[0]["train/fp16_fix/penalty"] > 0
    assert logs[1]["train/fp16_fix/penalty"] < logs[0]["train/fp16_fix/penalty"]
    # the student starts as the teacher (in train mode: a shortcut input made contiguous rounds differently)
    assert logs[0]["train/fp16_fix/output_mse"] < 1e-10
    assert "train/fp16_fix/latent_mse" not in logs[0]  # decoder-only: the latents are the teacher's
    student_keys = set(AutoencoderKL.from_pretrained(broken_dir).state_dict())
    last = tmp_path / "run" / "checkpoint-0000002"
    for name in ("model", "ema"):
        assert set(load_file(str(last / f"{name}.safetensors"))) == student_keys  # no teacher inside
    fixed = AutoencoderKL.from_pretrained(export)
    start = AutoencoderKL.from_pretrained(broken_dir)
    # decoder-only: encoder untouched, the attention's over-range value projection shrank
    assert torch.equal(fixed.encoder.conv_in.weight, start.encoder.conv_in.weight)
    v = fixed.decoder.mid_block.attentions[0].to_v.weight.abs().mean()
    assert v < start.decoder.mid_block.attentions[0].to_v.weight.abs().mean()
    # resume one more step: the teacher is rebuilt from model.init, not read from the checkpoint
    tv.main(fix_config(photos, broken_dir, tmp_path / "run", ("model.decoder_only", "true"),
                       ("train.max_steps", "3"), ("train.resume", "latest")))  # fmt: skip
    assert (tmp_path / "run" / "checkpoint-0000003").is_dir()


def test_a_full_fix_matches_latents_too(photos, broken_dir, tmp_path):
    cfg = fix_config(photos, broken_dir, tmp_path / "run", ("train.max_steps", "1"), ("train.ema_decay", "0"))
    tv.main(cfg)
    (row,) = [r for r in read_metrics(tmp_path / "run") if "train/fp16_fix/latent_mse" in r]
    assert row["train/fp16_fix/latent_mse"] < 1e-10  # same weights, same posterior noise


def test_fix_refuses_what_it_cannot_combine_with(photos, broken_dir, tmp_path):
    for extra in (("eq_vae.enabled", "true"), ("train.gradient_checkpointing", "true")):
        with pytest.raises(ConfigError, match="fp16_fix does not combine"):
            tv.main(fix_config(photos, broken_dir, tmp_path / "run", extra))
    with pytest.raises(ValueError, match="threshold"):
        FP16FixConfig(threshold=1e6)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_reports_and_writes_json(capsys, broken_dir, tmp_path):
    img = photo(tmp_path / "a.png", 32, 32)
    code, out, _ = run_cli(capsys, "check-fp16", "--model", broken_dir, img, "--json", tmp_path / "r.json")
    assert code == 0
    assert "decoder.mid_block.attentions.0" in out and "OVERFLOW" in out
    assert out.strip().splitlines()[-1].startswith("NOT fp16-safe")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["overflowing"] == ["decoder.mid_block.attentions.0"] and report["safe"] is False
    code, _, _ = run_cli(capsys, "check-fp16", "--model", broken_dir, img, "--strict")
    assert code == 3


def test_cli_one_line_errors(capsys, broken_dir, tmp_path):
    for argv in (
        ("check-fp16", "--model", broken_dir, tmp_path / "missing.png"),
        ("check-fp16", "--model", tmp_path / "no-model", photo(tmp_path / "b.png", 16, 16)),
    ):
        code, _, err = run_cli(capsys, *argv)
        assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
