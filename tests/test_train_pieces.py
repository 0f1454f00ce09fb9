"""Unit tests of ldm_vae.training: configs and overrides, image-folder data, checkpoints, EMA, metrics log."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from torch import nn

from ldm_vae.checkpoint import CheckpointError
from ldm_vae.images import ImageError
from ldm_vae.losses import LossConfig
from ldm_vae.training import (
    CheckpointManager,
    ConfigError,
    DataConfig,
    EpochSampler,
    ImageFolderDataset,
    MetricsLog,
    ModelEMA,
    OptimConfig,
    TrainProgress,
    list_images,
    load_config,
    parse_command_line,
    read_metrics,
    validation_files,
    write_config,
)


@dataclass(frozen=True)
class Model:
    kind: Literal["kl", "vq"] = "kl"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cfg:
    model: Model = field(default_factory=Model)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


ALIASES = {"--data-dir": "data.train_dir"}


# ------------------------------------------------------------------------------------------- config


def test_overrides_are_parsed_by_field_type(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 1\nbetas = [0.5, 0.9]\n[model.overrides]\nlatent_channels = 8\n")
    argv = ["--config", str(path), "--data-dir", "/x", "--optim.disc_lr=none"]
    argv += [
        "--optim.betas",
        "0.9,0.99",
        "--data.val_files",
        "a.png,b.png",
        "--data.flip",
        "false",
        "--model.kind",
        "vq",
    ]
    argv += ["--model.overrides.block_out_channels", "[32,64]", "--loss.kl_weight", "1e-6"]
    cfg = parse_command_line(Cfg, argv, ALIASES)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.disc_lr is None
    assert cfg.data.train_dir == "/x" and cfg.data.val_files == ("a.png", "b.png") and cfg.data.flip is False
    assert cfg.model == Model("vq", {"latent_channels": 8, "block_out_channels": [32, 64]})
    assert cfg.loss.kl_weight == 1e-6 and cfg.loss.disc_start == LossConfig().disc_start
    # The recorded JSON and an equivalent YAML file read back to the same config.
    write_config(cfg, tmp_path / "run.json")
    assert load_config(Cfg, tmp_path / "run.json") == cfg
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("optim: {lr: 1.0, betas: [0.9, 0.99], disc_lr: null}\nmodel: {kind: vq}\n")
    assert load_config(Cfg, yaml_path).optim == cfg.optim


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lrr", "1"], "unknown config key 'optim.lrr' (known here: lr, scale_lr"),
        (["--optim.lr", "fast"], "optim.lr must be a number, got 'fast'"),
        (["--data.batch_size", "2.5"], "data.batch_size must be an integer, got '2.5'"),
        (["--optim.schedule", "linear"], "optim.schedule must be one of 'constant', 'cosine', got 'linear'"),
        (["--optim.betas", "0.9"], "optim.betas must have 2 items, got 1"),
        (["--optim", "1"], "--optim is a section"),
        (["--loss.rec_loss", "l3"], "LossConfig.rec_loss must be one of ('l1', 'l2'), got 'l3'"),
        (["--optim.lr"], "--optim.lr needs a value"),
        (["--data.batch_size", "0"], "data: DataConfig.batch_size = 0 is out of range"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_overrides_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_command_line(Cfg, argv, ALIASES)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_config_files_are_one_line_errors(tmp_path):
    cases = {
        "a.toml": ("[optim]\nlr = 'x'\n", "optim.lr must be a number"),
        "b.toml": ("[train]\nsteps = 3\n", "unknown config key 'train'"),
        "c.toml": ("[data]\nresolutio = 3\n", "unknown config key 'data.resolutio'"),
        "d.toml": ("[data\n", "cannot parse"),
        "e.yaml": ("- 1\n- 2\n", "expected a mapping"),
        "f.ini": ("", "unknown config format"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(Cfg, tmp_path / name)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Cfg, tmp_path / "missing.toml")


# ------------------------------------------------------------------------------------------- data


def _write(path: Path, size: tuple[int, int], seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_dataset_skips_unreadable_files_and_crops_deterministically(tmp_path):
    good = [_write(tmp_path / "d" / f"{i}.png", (40, 30), i) for i in range(3)]
    small = _write(tmp_path / "d" / "sub" / "small.jpg", (12, 20), 9)
    (tmp_path / "d" / "empty.jpg").write_bytes(b"")
    (tmp_path / "d" / "text.webp").write_text("not an image")
    (tmp_path / "d" / "notes.txt").write_text("ignored: not an image suffix")
    truncated = tmp_path / "d" / "zz_truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:200])  # valid header, cut data

    files = list_images(tmp_path / "d")
    assert len(files) == 7 and all(p.suffix != ".txt" for p in files)
    ds = ImageFolderDataset(files, resolution=16)
    assert sorted(p.name for p, _ in ds.skipped) == ["empty.jpg", "text.webp"]
    assert len(ds) == 5

    a, b, c = ds[(0, 123)], ds[(0, 123)], ds[(0, 124)]
    assert a.shape == (3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The 12x20 image is resized up to a 16-pixel short side before cropping.
    assert ds[(ds.files.index(small), 5)].shape == (3, 16, 16)
    # A file that fails to decode is replaced by the next one (index wraps), with a warning.
    with pytest.warns(UserWarning, match="zz_truncated.png: unreadable image skipped"):
        x = ds[(ds.files.index(truncated), 7)]
    assert torch.equal(x, ds[(0, 7)])


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochSampler(10, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10))
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert [i for i, _ in second] != [i for i, _ in first]
    assert {s for _, s in second}.isdisjoint({s for _, s in first})  # fresh crops every epoch
    assert list(EpochSampler(10, seed=4)) != first


def test_validation_images_are_listed_or_held_out(tmp_path):
    files = [Path(f"{i}.png") for i in range(10)]
    assert validation_files(files, ["x.png"], "", 8) == (files, [Path("x.png")])
    assert validation_files(files, [], "", 3) == (files[:7], files[7:])
    assert validation_files(files, [], "", 0) == (files, [])
    with pytest.raises(ImageError, match="cannot hold out 10"):
        validation_files(files, [], "", 10)
    val = [_write(tmp_path / "val" / f"{i}.jpg", (20, 20), i) for i in range(4)]
    assert validation_files(files, [], str(tmp_path / "val"), 2) == (files, val[:2])


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_checkpoints_are_kept_pruned_found_and_loaded(accelerator, tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    ema = ModelEMA(model, decay=0.9)
    manager = CheckpointManager(accelerator, tmp_path, keep=2)
    saved_weights = {}
    for step in (1, 2, 3):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        ema.update(model)
        saved_weights[step] = model.weight.detach().clone()
        tensors, scalars = ema.state()
        manager.save(step, {"step": step, "ema": scalars}, {"ema": tensors})
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-0000002", "checkpoint-0000003"]

    # Unfinished saves are invisible to latest() and deleted by clean_partial().
    (tmp_path / ".tmp-checkpoint-0000004").mkdir()
    (tmp_path / "checkpoint-0000005").mkdir()  # renamed without its state file: not complete
    assert manager.latest() == manager.resolve("latest") == tmp_path / "checkpoint-0000003"
    manager.clean_partial()
    assert not (tmp_path / ".tmp-checkpoint-0000004").exists()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.resolve(str(tmp_path / "checkpoint-0000005"))
    assert manager.resolve("") is None

    ema_weight_at_3 = ema.state()[0]["weight"].clone()
    with torch.no_grad():
        model.weight.zero_()
    state, tensors = manager.load(tmp_path / "checkpoint-0000002", names=("ema", "missing"))
    assert state["step"] == 2 and set(tensors) == {"ema"}
    assert torch.equal(model.weight, saved_weights[2])
    ema.load(tensors["ema"], state["ema"])
    assert ema.ema.optimization_step == 2 and not torch.equal(ema.state()[0]["weight"], ema_weight_at_3)


def test_ema_applied_swaps_weights_in_and_out():
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first step: diffusers' warmup decay is 0, so the average jumps to the weights
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # then decay = min(0.5, (1 + t) / (10 + t)) with t = 1
    decay = 2 / 11
    expected = decay * (start + 1) + (1 - decay) * (start + 2)
    trained = model.weight.detach().clone()
    with ema.applied(model):
        torch.testing.assert_close(model.weight, expected)
    assert torch.equal(model.weight, trained)
    with pytest.raises(CheckpointError, match="does not fit"):
        ema.load({"weight": start}, ema.state()[1])


def test_metrics_log_drops_lines_past_the_resumed_step(accelerator, tmp_path):
    log = MetricsLog(accelerator, tmp_path)
    for step in (1, 2, 3):
        log.log({"train/loss": 1.0 / step}, step)
    log.log({"train/loss": float("nan")}, 4)
    with open(log.path, "a") as f:
        f.write('{"step": 5, "train/lo')  # torn by a kill
    log.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    log.log({"train/loss": float("inf")}, 3)
    assert json.loads(log.path.read_text().splitlines()[-1]) == {"step": 3, "train/loss": "inf"}


def test_train_progress_saves_finished_epochs_as_the_next_and_rescales_positions():
    run = TrainProgress(step=7, epoch=2, batch=5, nonfinite_streak=1)
    assert run.state(batches_per_epoch=5, global_batch=8) == dict(
        step=7, epoch=3, batch=0, nonfinite_streak=1, global_batch=8
    )
    saved = run.state(batches_per_epoch=10, global_batch=8)
    assert TrainProgress.from_state(saved, global_batch=8) == run
    # Twice the processes: the same 40 samples of the epoch are 2.5 -> 2 batches of 16.
    assert TrainProgress.from_state(saved, global_batch=16) == TrainProgress(7, 2, 2, 1)
    old_format = {k: v for k, v in saved.items() if k != "global_batch"} | {
        "samples_per_batch": 4,
        "world_size": 2,
    }
    assert TrainProgress.from_state(old_format, global_batch=8) == run
