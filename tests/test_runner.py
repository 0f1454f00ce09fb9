"""The training runner: launch safety (world-size checks, the run-folder lock, too-small data sets), and exact
resumes and multi-process runs with the latent regularizers on."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _accelerate import fresh_accelerate, reset_accelerate  # noqa: F401 - fresh_accelerate is autouse
from accelerate import Accelerator
from PIL import Image

from ldm_vae import AutoencoderKL
from ldm_vae.training import ConfigError, load_config
from ldm_vae.training import train_vae as tv
from ldm_vae.training.runner import check_enough_data, check_world, run_lock

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scripts" / "configs" / "tiny_cpu.toml"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import skimage.data

    folder = tmp_path_factory.mktemp("runner_photos")
    for i, image in enumerate([skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()] * 2):
        Image.fromarray(image).resize((40 + i, 36 + i), Image.BICUBIC).save(folder / f"p{i}.png")
    return folder


def config(photos: Path, out: Path, *overrides: tuple[str, str]):
    base = [
        ("data.train_dir", str(photos)),
        ("train.output_dir", str(out)),
        ("data.resolution", "16"),
        ("data.batch_size", "2"),
        ("data.num_workers", "0"),
        ("data.num_val", "2"),
        ("loss.disc_channels", "8"),
        ("train.tensorboard", "false"),
        ("train.val_every", "0"),
        ("train.max_steps", "2"),
    ]
    return load_config(tv.Config, TINY, [*base, *overrides])


def test_world_mismatch_is_one_line():
    check_world(2, 2)
    with pytest.raises(
        ConfigError,
        match=r"^the launcher started 2 processes but each sees a world of 1: .*ACCELERATE_USE_CPU=1",
    ):
        check_world(2, 1)


def test_too_small_data_names_found_held_out_and_needed(photos, tmp_path):
    with pytest.raises(ConfigError) as info:
        check_enough_data(10, 8, 4, 2, "images", "photos/")
    assert str(info.value) == (
        "10 images found in photos/, 8 held out for validation: 2 left for training, fewer than one batch "
        "per process (4) x 2 process(es) = 8 needed"
    )
    # Through the trainer: 6 photos, 2 held out, batches of 4 need 4.
    with pytest.raises(ConfigError, match=r"6 images found in .*2 held out for validation: 4 left"):
        tv.main(config(photos, tmp_path / "run", ("data.batch_size", "5")))
    # More held out than there are images: the same line, before the split fails.
    with pytest.raises(ConfigError, match=r"6 images found in .*, 6 held out for validation: 0 left"):
        tv.main(config(photos, tmp_path / "run", ("data.num_val", "6")))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_second_run_on_a_held_folder_is_refused(photos, tmp_path):
    run = tmp_path / "run"
    with run_lock(Accelerator(), run):
        reset_accelerate()
        with pytest.raises(
            ConfigError,
            match=rf"^{re.escape(str(run))} is in use by another training run \(pid {os.getpid()}\)",
        ):
            tv.main(config(photos, run))
    assert not list(run.glob("checkpoint-*"))
    reset_accelerate()
    tv.main(config(photos, run))  # released: the next run goes ahead
    assert (run / "checkpoint-0000002").is_dir()


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from accelerate import Accelerator\n"
        "from ldm_vae.training.runner import run_lock\n"
        "with run_lock(Accelerator(), Path(sys.argv[1])):\n"
        "    print('locked', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with (
            pytest.raises(ConfigError, match=rf"in use by another training run \(pid {proc.pid}\)"),
            run_lock(Accelerator(), run),
        ):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reset_accelerate()
    with run_lock(Accelerator(), run):  # the kernel dropped the dead process's lock
        pass


def test_multi_process_launch_without_gpu_runs_as_cpu_ranks(photos, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` without ACCELERATE_USE_CPU on a machine without GPUs used
    to start two independent single-process runs on one folder; now they join as two gloo ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {
        "data.train_dir": photos,
        "train.output_dir": tmp_path / "run",
        "data.resolution": 16,
        "data.batch_size": 2,
        "data.num_workers": 0,
        "data.num_val": 0,
        "loss.disc_channels": 8,
        "loss.disc_start": 1,
        "train.tensorboard": "false",
        "train.val_every": 0,
        "train.max_steps": 2,
    }
    args = ["--config", str(TINY), *(f"--{k}={v}" for k, v in settings.items())]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    out = subprocess.run(
        [*launcher, "--main_process_port", str(port), str(ROOT / "scripts" / "train_vae.py"), *args],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("world_size=2 distributed_type=MULTI_CPU") == 1
    digests = dict(re.findall(r"\[rank (\d)/2\] weights sha256 (.*)", out.stdout))
    assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"], out.stdout


# ------------------------------------------------------------------------------------------- latent regularizers

# All three regularizers at once on 32-pixel crops of the tiny model (f = 2: 16-pixel latents), with the GAN on:
# EQ-VAE's downscales stop at 16 px and the scale term uses 2x only, both within the 12 px the discriminator needs.
REGULARIZED = {
    "data.resolution": 32,
    "eq_vae.enabled": "true",
    "eq_vae.min_scale": 0.5,
    "eq_vae.flips": "true",
    "scale_equivariance.enabled": "true",
    "scale_equivariance.factors": 2,
    "latent_noise.enabled": "true",
    "latent_noise.sigma_max": 0.2,
    "loss.disc_start": 1,
    "model.decoder_only": "true",
}


def test_regularized_decoder_only_run_resumes_bit_for_bit(photos, tmp_path):
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from ldm_vae.training import read_metrics

    regs = [(k, str(v)) for k, v in REGULARIZED.items()]
    common = [*regs, ("train.checkpoint_every", "2"), ("train.log_every", "1")]
    tv.main(config(photos, tmp_path / "ref", *common, ("train.max_steps", "4")))
    reset_accelerate()
    tv.main(config(photos, tmp_path / "run", *common, ("train.max_steps", "2")))
    reset_accelerate()
    tv.main(config(photos, tmp_path / "run", *common, ("train.max_steps", "4"), ("train.resume", "latest")))
    for name in ("model", "model_1", "ema"):  # autoencoder, discriminator, EMA: same draws after the resume
        ref = load_file(str(tmp_path / "ref" / "checkpoint-0000004" / f"{name}.safetensors"))
        got = load_file(str(tmp_path / "run" / "checkpoint-0000004" / f"{name}.safetensors"))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
    set_seed(0)  # the trainer's initial weights (train.seed 0)
    start = AutoencoderKL.from_pretrained("tiny").state_dict()
    final = load_file(str(tmp_path / "ref" / "checkpoint-0000004" / "model.safetensors"))
    frozen = [k for k in final if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(final[k], start[k]) for k in frozen)  # decoder_only: same latent space
    assert any(not torch.equal(final[k], start[k]) for k in final if k.startswith("decoder."))
    logs = [r for r in read_metrics(tmp_path / "ref") if "train/rec" in r]
    assert len(logs) == 4 and all("train/scale_eq" in r and "train/eq_applied" in r for r in logs)


def test_regularized_two_process_run_keeps_identical_weights(photos, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {
        **REGULARIZED,
        "data.train_dir": photos,
        "train.output_dir": tmp_path / "run",
        "data.batch_size": 2,
        "data.num_workers": 0,
        "data.num_val": 0,
        "loss.disc_channels": 8,
        "train.tensorboard": "false",
        "train.val_every": 0,
        "train.max_steps": 3,
    }
    args = ["--config", str(TINY), *(f"--{k}={v}" for k, v in settings.items())]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = subprocess.run(
        [*launcher, "--main_process_port", str(port), str(ROOT / "scripts" / "train_vae.py"), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world_size=2 distributed_type=MULTI_CPU" in out.stdout
    digests = dict(re.findall(r"\[rank (\d)/2\] weights sha256 (.*)", out.stdout))
    assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"], out.stdout
