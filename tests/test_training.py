"""End-to-end tests of scripts/train_vae.py on a tiny model, 16-32 px crops, CPU."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _accelerate import fresh_accelerate, reset_accelerate  # noqa: F401 - fresh_accelerate is autouse
from PIL import Image
from safetensors.torch import load_file

from ldm_vae import CheckpointError
from ldm_vae.losses import AutoencoderLoss, MissingWeightsError
from ldm_vae.training import checkpointing as checkpointing_module
from ldm_vae.training import load_config, read_metrics, to_dict
from ldm_vae.training import train_vae as tv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_vae.py"
TINY = ROOT / "scripts" / "configs" / "tiny_cpu.toml"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Twelve small colour photos (skimage's), 36-48 px, some smaller than a 40 px crop."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    for i in range(12):
        im = Image.fromarray(sources[i % 4]).resize((48 + 4 * (i % 3), 36 + 4 * (i % 4)), Image.BICUBIC)
        sub = folder / ("a" if i < 6 else "b")
        sub.mkdir(exist_ok=True)
        im.save(sub / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return folder


def config(photos: Path, out: Path, *overrides: tuple[str, str]):
    base = [
        ("data.train_dir", str(photos)),
        ("train.output_dir", str(out)),
        ("data.resolution", "16"),
        ("data.batch_size", "4"),
        ("data.num_workers", "0"),
        ("data.num_val", "2"),
        ("loss.disc_channels", "8"),
        ("train.tensorboard", "false"),
        ("train.log_every", "1"),
        ("train.val_every", "0"),
    ]
    return load_config(tv.Config, TINY, [*base, *overrides])


def cli_args(cfg) -> list[str]:
    """The command line that reproduces ``cfg`` (every field given explicitly)."""
    args = []
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            if isinstance(value, dict):
                args += [a for k, v in value.items() for a in (f"--{section}.{key}.{k}", json.dumps(v))]
            else:
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                args += [f"--{section}.{key}", "none" if value is None else text]
    return args


def state(folder: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{name}.safetensors"))


def assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ------------------------------------------------------------------------------------------- runs


def test_two_steps_write_a_checkpoint_and_a_diffusers_export(photos, tmp_path):
    from diffusers import AutoencoderKL as DiffusersKL

    cfg = config(photos, tmp_path / "run", ("train.max_steps", "2"), ("train.checkpoint_every", "1"))
    export = tv.main(cfg)

    ckpts = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-0000001", "checkpoint-0000002"]
    last = tmp_path / "run" / "checkpoint-0000002"
    saved = json.loads((last / "trainer_state.json").read_text())
    # 10 training images (2 held out for validation) in batches of 4: both steps used up epoch 0.
    assert (saved["step"], saved["epoch"], saved["batch"], saved["ema"]["optimization_step"]) == (2, 1, 0, 2)
    # Autoencoder and discriminator are separate files; the export is the EMA of the autoencoder only.
    ae, disc, ema = state(last), state(last, "model_1"), state(last, "ema")
    assert ae.keys() == ema.keys() and all(k.startswith("main.") for k in disc)
    vae = DiffusersKL.from_pretrained(export)
    exported = {k: v for k, v in vae.state_dict().items()}
    assert exported.keys() == ema.keys()
    assert_same(exported, ema, atol=0)
    assert any(not torch.equal(ema[k], ae[k]) for k in ae)  # EMA differs from the raw weights
    # The recorded config reads back to the same config.
    assert load_config(tv.Config, tmp_path / "run" / "train_config.json") == cfg


def test_loss_goes_down_and_the_discriminator_starts_at_disc_start(photos, tmp_path):
    run = tmp_path / "run"
    cfg = config(
        photos,
        run,
        ("data.resolution", "32"),
        ("train.max_steps", "48"),
        ("loss.disc_start", "24"),
        ("train.checkpoint_every", "12"),
        ("train.keep_checkpoints", "10"),
        ("optim.lr", "2e-3"),
        ("optim.warmup_steps", "0"),
    )
    tv.main(cfg)
    logs = [r for r in read_metrics(run) if "train/rec" in r]
    assert [r["step"] for r in logs] == list(range(1, 49))
    rec = np.array([r["train/rec"] for r in logs])
    assert rec[-10:].mean() < 0.8 * rec[:5].mean(), rec  # about 0.65 observed

    # Steps are counted after they complete: step s ran with global step s - 1, GAN on from s - 1 >= 24.
    before, after = logs[:24], logs[24:]
    assert all(
        r["train/d_weight"] == 0 and r["train/disc_factor"] == 0 and "train/d_loss" not in r for r in before
    )
    assert all(r["train/d_weight"] > 0 and r["train/disc_factor"] == 1 and "train/d_loss" in r for r in after)
    disc = {s: state(run / f"checkpoint-{s:07d}", "model_1") for s in (12, 24, 36)}
    assert_same(disc[12], disc[24], atol=0)  # untouched before disc_start
    assert any(not torch.equal(disc[24][k], disc[36][k]) for k in disc[24])


def test_sigkill_then_resume_matches_an_uninterrupted_run(photos, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed run is a subprocess with OMP_NUM_THREADS=1: same kernels, same sums
    common = [
        ("train.max_steps", "24"),
        ("loss.disc_start", "6"),
        ("loss.learn_logvar", "true"),
        ("train.checkpoint_every", "3"),
        ("train.keep_checkpoints", "2"),
    ]
    try:
        reference = config(photos, tmp_path / "ref", *common)
        tv.main(reference)

        killed = config(photos, tmp_path / "run", *common)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *cli_args(killed)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        target = random.Random().randint(4, 16)
        metrics = tmp_path / "run" / "metrics.jsonl"
        while proc.poll() is None:
            steps = (
                [int(m) for m in re.findall(r'"step": (\d+)', metrics.read_text())]
                if metrics.exists()
                else []
            )
            if steps and max(steps) >= target:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]

        reset_accelerate()
        capsys.readouterr()
        tv.main(config(photos, tmp_path / "run", *common, ("train.resume", "latest")))
        resumed = re.search(r"resumed from .*checkpoint-(\d+) at step (\d+)", capsys.readouterr().out)
    finally:
        torch.set_num_threads(threads)

    assert resumed and 3 <= int(resumed[2]) <= 24 and int(resumed[1]) == int(resumed[2]), target
    final_ref, final = tmp_path / "ref" / "checkpoint-0000024", tmp_path / "run" / "checkpoint-0000024"
    for name in ("model", "model_1", "ema", "loss"):  # bitwise: same kernels, same data, same noise
        assert_same(state(final, name), state(final_ref, name), atol=0)
    assert_same(
        state(tmp_path / "run" / "vae", "diffusion_pytorch_model"),
        state(tmp_path / "ref" / "vae", "diffusion_pytorch_model"),
    )
    # metrics.jsonl holds each step once: what the killed run logged past its checkpoint was dropped.
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "train/rec" in r]
    assert steps == list(range(1, 25))


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(photos, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = config(photos, run, ("train.max_steps", "6"), ("train.checkpoint_every", "2"))
    real_write = checkpointing_module.write_safetensors
    calls = []

    def dies_on_second_save(tensors, path, *args, **kwargs):
        calls.append(path)
        if "0000004" in str(path):
            raise OSError("disk full (simulated)")
        return real_write(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing_module, "write_safetensors", dies_on_second_save)
    with pytest.raises(OSError, match="simulated"):
        tv.main(cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000002"]
    partial = run / ".tmp-checkpoint-0000004"
    assert (partial / "model.safetensors").is_file()  # Accelerate's part was written, ours was not
    assert not (partial / "trainer_state.json").exists()

    reset_accelerate()
    tv.main(
        config(
            photos, run, ("train.max_steps", "6"), ("train.checkpoint_every", "2"), ("train.resume", "latest")
        )
    )
    assert not partial.exists()
    assert sorted(p.name for p in run.glob("checkpoint-*"))[-1] == "checkpoint-0000006"
    assert json.loads((run / "checkpoint-0000006" / "trainer_state.json").read_text())["step"] == 6


def test_nonfinite_losses_are_skipped_then_stop_the_run(photos, tmp_path, monkeypatch):
    real = AutoencoderLoss.generator_loss
    bad_steps = {2} | set(range(5, 100))

    def poisoned(self, x, recon, reg, logits_fake, last_layer, step):
        loss, logs = real(self, x, recon, reg, logits_fake, last_layer, step)
        return (loss * float("nan"), logs) if step in bad_steps else (loss, logs)

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", poisoned)
    run = tmp_path / "run"
    cfg = config(
        photos, run, ("train.max_steps", "20"), ("train.checkpoint_every", "2"), ("train.max_nonfinite", "3")
    )
    with pytest.raises(
        tv.NonFiniteLossError, match=r"3 non-finite losses in a row \(steps 6-8\).*checkpoint-0000004"
    ):
        tv.main(cfg)
    records = read_metrics(run)
    skipped = [r["step"] for r in records if r.get("train/nonfinite")]
    assert skipped == [3, 6, 7, 8]  # global step s - 1 runs as logged step s
    assert [r["step"] for r in records if "train/rec" in r] == [1, 2, 4, 5]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000002", "checkpoint-0000004"]
    # The skipped step 3 changed no weight: checkpoint 4 differs from 2 by exactly one optimizer step (EMA count).
    assert (
        json.loads((run / "checkpoint-0000004" / "trainer_state.json").read_text())["ema"][
            "optimization_step"
        ]
        == 3
    )
    # The stop leaves no trace in the last good checkpoint: it resumes.
    monkeypatch.undo()
    reset_accelerate()
    tv.main(
        config(
            photos, run, ("train.max_steps", "6"), ("train.checkpoint_every", "2"), ("train.resume", "latest")
        )
    )
    assert (run / "checkpoint-0000006").is_dir()


def test_two_processes_keep_identical_weights(photos, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(
        photos,
        tmp_path / "run",
        ("train.max_steps", "4"),
        ("loss.disc_start", "1"),
        ("loss.learn_logvar", "true"),
        ("train.checkpoint_every", "2"),
        ("train.keep_checkpoints", "1"),
    )
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*launcher, "--main_process_port", str(port), str(SCRIPT), *cli_args(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world_size=2 distributed_type=MULTI_CPU" in out.stdout
    digests = dict(re.findall(r"\[rank (\d)/2\] weights sha256 (.*)", out.stdout))
    assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"], out.stdout
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-0000004"]
    assert not list((tmp_path / "run").glob(".tmp-*"))
    saved = json.loads((tmp_path / "run" / "checkpoint-0000004" / "trainer_state.json").read_text())
    # One batch of 4 per rank and epoch (10 images, 8 per global batch): four steps, four epochs.
    assert (saved["global_batch"], saved["epoch"], saved["batch"]) == (8, 4, 0)


def test_vq_decoder_only_bf16_with_accumulation_and_checkpointing(photos, tmp_path):
    from diffusers import VQModel

    from ldm_vae import VQAutoencoder

    start = VQAutoencoder.from_pretrained("tiny").save_pretrained(tmp_path / "start")
    cfg = config(
        photos,
        tmp_path / "run",
        ("model.kind", "vq"),
        ("model.init", str(start)),
        ("model.decoder_only", "true"),
        ("model.overrides.ema_decay", "0.9"),  # an EMA codebook: it must stay frozen too
        ("train.mixed_precision", "bf16"),
        ("train.grad_accum", "2"),
        ("train.gradient_checkpointing", "true"),
        ("train.max_steps", "3"),
        ("train.ema_decay", "0"),
        ("loss.disc_start", "0"),
        ("train.val_every", "2"),  # validation switches modes in between
    )
    export = tv.main(cfg)
    before = load_file(str(start / "diffusion_pytorch_model.safetensors"))
    after = {k: v for k, v in VQModel.from_pretrained(export).state_dict().items()}
    assert after.keys() == before.keys()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    saved = json.loads((tmp_path / "run" / "checkpoint-0000003" / "trainer_state.json").read_text())
    assert (saved["epoch"], saved["batch"]) == (3, 0)  # two micro-batches (one epoch) per optimizer step
    logs = [r for r in read_metrics(tmp_path / "run") if "train/rec" in r]
    assert len(logs) == 3 and all(0 < r["train/code_usage"] <= 1 for r in logs)


def test_missing_lpips_weights_fail_before_data_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    cfg = config(tmp_path / "no-such-folder", tmp_path / "run", ("loss.perceptual_weight", "1.0"))
    with pytest.raises(MissingWeightsError, match="perceptual_weight = 0"):
        tv.main(cfg)


def test_command_line_errors_are_one_line(photos, tmp_path, capsys):
    assert tv.cli(["--config", str(TINY), "--train.max_stepz", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'train.max_stepz'" in err
    assert (
        tv.cli(
            [
                "--config",
                str(TINY),
                "--data-dir",
                str(photos),
                "--output-dir",
                str(tmp_path),
                "--optim.lr",
                "fast",
            ]
        )
        == 1
    )
    assert "optim.lr must be a number, got 'fast'" in capsys.readouterr().err
    # A fresh run does not write over another run's checkpoints.
    (tmp_path / "run" / "checkpoint-0000005").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-0000005" / "trainer_state.json").write_text("{}")
    assert (
        tv.cli(["--config", str(TINY), "--data-dir", str(photos), "--output-dir", str(tmp_path / "run")]) == 1
    )
    assert "already holds checkpoints" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        tv.main(config(photos, tmp_path / "other", ("train.resume", str(tmp_path / "nowhere"))))


def test_example_configs_load_with_their_recipes():
    names = ["tiny_cpu", "sd_ft_mse", "sd_ft_full", "kl_f8_scratch", "vq_f8_scratch"]
    configs = {f"{n}.toml": load_config(tv.Config, TINY.parent / f"{n}.toml") for n in names}
    mse = configs["sd_ft_mse.toml"]
    assert mse.model.decoder_only and (
        mse.loss.rec_loss,
        mse.loss.perceptual_weight,
        mse.loss.disc_weight,
    ) == ("l2", 0.1, 0)
    kl = configs["kl_f8_scratch.toml"]
    assert (kl.loss.kl_weight, kl.loss.disc_start, kl.loss.disc_weight, kl.optim.lr, kl.optim.scale_lr) == (
        1e-6,
        50001,
        0.5,
        4.5e-6,
        True,
    )
    assert (kl.train.grad_accum, kl.data.batch_size) == (2, 12)  # LDM: accumulate_grad_batches 2, batch 12
    # LDM's Lightning loop runs the autoencoder again for the discriminator; the fine-tune recipes do not.
    assert [c.loss.disc_second_pass for c in configs.values()] == [False, False, False, True, True]
    vq = configs["vq_f8_scratch.toml"]
    assert vq.model.kind == "vq" and vq.model.overrides == {
        "legacy": True
    }  # taming's VectorQuantizer2 default
    assert (vq.data.batch_size, vq.loss.disc_weight, vq.loss.disc_start, vq.loss.disc_num_layers) == (
        10,
        0.6,
        1,
        2,
    )
    assert configs["tiny_cpu.toml"].loss.perceptual_weight == 0  # runs here: no LPIPS weights needed
    # The recipes autocast in bf16 only where the hardware runs it natively (resolved when training starts).
    assert {c.train.mixed_precision for n, c in configs.items() if n != "tiny_cpu.toml"} == {"auto"}


def test_validation_reports_lpips_when_the_perceptual_net_exists():
    from ldm_vae import AutoencoderKL
    from ldm_vae.losses import build_lpips

    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny").train()
    images = torch.rand(3, 3, 64, 64) * 2 - 1  # AlexNet's pooling needs more than 16 px
    perceptual = build_lpips("alex", random_backbone=True)
    values, grid = tv.validate(vae, None, images, 2, perceptual=perceptual)
    assert vae.training  # modes restored
    with torch.no_grad():
        recon = vae(images, sample_posterior=False)[0].clamp(-1, 1)
    assert values["val/lpips"] == pytest.approx(perceptual(recon, images).mean().item(), rel=1e-5)
    assert "val/lpips" not in tv.validate(vae, None, images, 2)[0]
    assert grid.shape[0] == 3  # an RGB grid: inputs and reconstructions


@pytest.mark.parametrize("name", ["eq_vae", "scale_equivariance", "latent_noise"])
def test_regularizer_example_configs_switch_on_their_section_only(name):
    cfg = load_config(tv.Config, TINY.parent / f"demo_ft_{name}.toml")
    sections = ("eq_vae", "scale_equivariance", "latent_noise", "fp16_fix")
    assert [getattr(cfg, s).enabled for s in sections] == [s == name for s in sections]
    assert cfg.model.init == "weights/demo/vqvae" and cfg.train.max_steps == 150
