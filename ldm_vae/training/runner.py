"""One training runner for every objective of the package (the autoencoder, the latent DDPM, ...).

The runner owns what every training run does the same way: the Accelerator and launch checks, the run-folder
lock, the existing-checkpoints guard, exact resume, the optimizer-step window (gradient accumulation, non-finite
skipping on all ranks together, EMA, LR schedules), metrics logging, checkpoints through
``accelerator.save_state``, validation scheduling and the export. An objective (:class:`Objective`) brings only
its networks, data, loss step, validation and export, so a new one is about a page of code.

Exact resumes: every random draw of a step (posterior noise, diffusion timesteps) comes from a generator seeded
by (seed, rank, epoch, batch), and the data order from :class:`~ldm_vae.training.EpochSampler`, so a resumed run
repeats an uninterrupted one without saving RNG streams beyond Accelerate's.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..images import save_image
from ..runtime import autocast_precision
from ..seeds import mix_seed
from .checkpointing import CheckpointManager
from .config import ConfigError, TrainConfig, write_config
from .ema import ModelEMA
from .loop import TrainProgress, after_step, due, nonfinite_anywhere
from .tracking import MetricsLog, tensorboard_tracker

try:  # POSIX advisory locks; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


@dataclass
class StepOutput:
    """What an objective's loss step returns for one micro-batch."""

    losses: tuple[Tensor | None, ...]  # backpropagated in this order; None: not computed at this step
    logs: dict[str, Tensor]  # detached scalars, averaged over the micro-batches between two log lines


class Objective(Protocol):
    """What one training objective gives the runner. Attributes are read after :meth:`prepare`."""

    name: str  # tracker name, e.g. "train_vae"
    export_name: str  # folder under the run directory that the export is written to
    grid_name: str  # TensorBoard name of the validation grid
    progress_key: str  # the log value shown on the progress bar
    unit: str  # what a batch item is ("images", "latents"), for the throughput log
    batch_size: int  # per process and micro-step
    loader: Any  # the training DataLoader (prepared)
    optimizers: list[torch.optim.Optimizer]  # all of them; zeroed after every window
    schedulers: list[Any]  # stepped once per optimizer step; the first one's learning rate is logged
    model: nn.Module  # the unwrapped network whose EMA is kept and exported

    def prepare(self, accelerator: Accelerator) -> list[nn.Module]:
        """Passes models, optimizers, schedulers and the loader through ``accelerator.prepare``; returns the
        prepared modules that gradient accumulation must cover."""
        ...

    def loss(self, batch: Any, generator: torch.Generator, step: int) -> StepOutput:
        """Forward pass and losses of one micro-batch at optimizer step ``step``."""
        ...

    def apply_gradients(self, step: int) -> None:
        """The optimizer steps of a finished window whose losses were all finite."""
        ...

    def validate(self, ema: ModelEMA | None) -> tuple[dict[str, float], Tensor] | None:
        """(metrics, grid image) on the main process, or None when there is nothing to validate."""
        ...

    def export(self, folder: Path) -> None:
        """Writes the trained result (main process; the EMA weights are applied when configured)."""
        ...

    def state_tensors(self) -> dict[str, dict[str, Tensor]]:
        """Extra named tensors a checkpoint must keep (e.g. a learned log-variance), by file name."""
        ...

    def load_state_tensors(self, tensors: dict[str, dict[str, Tensor]]) -> None: ...

    def digest_modules(self) -> dict[str, nn.Module]:
        """Modules whose weights every rank reports at the end (data-parallel ranks must agree)."""
        ...


# ------------------------------------------------------------------------------------------- launch


def launched_processes() -> int:
    """How many processes the launcher started (``accelerate launch`` and torchrun set WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def make_accelerator(train: TrainConfig, run_dir: Path) -> Accelerator:
    """The run's Accelerator; N launched processes without a GPU become N CPU (gloo) ranks.

    Raises:
        ConfigError: the launcher started N processes but the accelerator sees another world size (each process
            would train on its own, all in one folder).
    """
    launched = launched_processes()
    # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs starts N processes that each see
    # a world of one unless told to use the CPU; joining them as gloo ranks is what the user asked for.
    cpu = launched > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=autocast_precision(train.mixed_precision),
        gradient_accumulation_steps=train.grad_accum,
        # Schedulers are stepped once per optimizer step by the runner (not num_processes times by Accelerate).
        step_scheduler_with_optimizer=False,
        log_with=tensorboard_tracker(train.tensorboard),
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
    )
    check_world(launched, accelerator.num_processes)
    return accelerator


def check_world(launched: int, seen: int) -> None:
    """Raises ConfigError (one line, before any step) when the accelerator's world is not the launcher's."""
    if seen != launched:
        raise ConfigError(
            f"the launcher started {launched} processes but each sees a world of {seen}: "
            "on CPUs set ACCELERATE_USE_CPU=1, on GPUs launch at most one process per visible GPU"
        )


@contextmanager
def run_lock(accelerator: Accelerator, run_dir: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``run_dir`` for the run (main process), so a second run started on the same
    folder is refused instead of interleaving checkpoints. The lock is the kernel's (``flock``): it dies with
    the process, so a killed run never leaves a folder locked.

    Raises:
        ConfigError: on every process, when another live run holds the folder.
    """
    handle, holder = None, 0
    if accelerator.is_main_process and fcntl is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            holder = int(text) if text.isdigit() else -1
            handle.close()
            handle = None
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
    # Every rank learns the outcome, so all stop together instead of waiting for a main process that left.
    holder = int(accelerator.reduce(torch.tensor(holder, device=accelerator.device), "max"))
    if holder:
        who = f"pid {holder}" if holder > 0 else "another process"
        raise ConfigError(
            f"{run_dir} is in use by another training run ({who}); wait for it or use another folder"
        )
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock; the file stays (its content names the last holder)


# ------------------------------------------------------------------------------------------- the run


def run_training(cfg: Any, build: Callable[[Accelerator], Objective]) -> Path:
    """Trains the objective that ``build`` makes; returns its export folder ``<output_dir>/<export_name>``.

    Args:
        cfg: the whole config dataclass (recorded as ``train_config.json``); ``cfg.train`` drives the run.
        build: makes the objective for the run's Accelerator (models, data, optimizers; nothing written yet).
    """
    train: TrainConfig = cfg.train
    run_dir = Path(train.output_dir)
    accelerator = make_accelerator(train, run_dir)
    accelerator.print(
        f"world_size={accelerator.num_processes} distributed_type={accelerator.distributed_type.value} "
        f"device={accelerator.device} mixed_precision={accelerator.mixed_precision}"
    )
    try:
        ckpts = CheckpointManager(accelerator, run_dir, keep=train.keep_checkpoints)
        resume_point(ckpts, train)  # fails fast, before the objective reads any data
        objective = build(accelerator)  # every check on config and data, before anything is written
        with run_lock(accelerator, run_dir):
            start = resume_point(ckpts, train)  # again: another run may have written here meanwhile
            return _run(cfg, train, run_dir, accelerator, objective, ckpts, start)
    finally:
        accelerator.end_training()


def resume_point(ckpts: CheckpointManager, train: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    Raises:
        ConfigError: a fresh run (no ``resume``) in a folder that already holds checkpoints.
    """
    start = ckpts.resolve(train.resume)
    if start is None and not train.resume and ckpts.checkpoints():
        raise ConfigError(
            f"{ckpts.folder} already holds checkpoints: pass --resume latest or another --output-dir"
        )
    return start


def _run(
    cfg: Any,
    train: TrainConfig,
    run_dir: Path,
    accelerator: Accelerator,
    objective: Objective,
    ckpts: CheckpointManager,
    start: Path | None,
) -> Path:
    """The run itself, once the objective is built and the folder locked."""
    rank, world = accelerator.process_index, accelerator.num_processes
    modules = objective.prepare(accelerator)
    ema = ModelEMA(objective.model, train.ema_decay) if train.ema_decay > 0 else None

    # ----------------------------------------------------------------------------------- resume
    metrics = MetricsLog(accelerator, run_dir)
    global_batch = objective.batch_size * world
    run = TrainProgress()
    if start is not None:
        saved, tensors = ckpts.load(start, ("ema", *objective.state_tensors()))
        run = TrainProgress.from_state(saved, global_batch)
        if ema is not None and "ema" in tensors:
            ema.load(tensors.pop("ema"), saved["ema"])
        objective.load_state_tensors(tensors)
        accelerator.print(f"resumed from {start} at step {run.step}")
    elif train.resume == "latest":
        accelerator.print(f"no checkpoint in {run_dir}: starting a new run")
    ckpts.clean_partial()
    if accelerator.is_main_process:
        write_config(cfg, run_dir / "train_config.json")
        metrics.truncate_after(run.step)
    accelerator.init_trackers(objective.name)
    accelerator.wait_for_everyone()

    def save_checkpoint() -> Path:
        ema_tensors, ema_scalars = ema.state() if ema is not None else ({}, None)
        state = {**run.state(len(objective.loader), global_batch), "ema": ema_scalars}
        tensors = {"ema": ema_tensors} if ema is not None else {}
        return ckpts.save(run.step, state, {**tensors, **objective.state_tensors()})

    def validate() -> None:
        result = objective.validate(ema) if accelerator.is_main_process else None
        if result is not None:
            values, grid = result
            save_image(grid, run_dir / "samples" / f"step-{run.step:07d}.png")
            metrics.log(values, run.step)
            metrics.log_image(objective.grid_name, grid, run.step)
        accelerator.wait_for_everyone()

    # ----------------------------------------------------------------------------------- loop
    window_ok = True  # no non-finite loss in the current accumulation window
    meter = _LogMeter(objective, items_per_step=global_batch * train.grad_accum)
    bar = tqdm(
        total=train.max_steps, initial=run.step, disable=not accelerator.is_local_main_process, desc="train"
    )
    try:
        while run.step < train.max_steps:
            for batch in run.epoch_batches(accelerator, objective.loader):
                t0 = time.perf_counter()
                run.batch += 1
                generator = torch.Generator(accelerator.device).manual_seed(
                    mix_seed(train.seed, rank, run.epoch, run.batch)
                )
                # run.step: optimizer steps done before this one (LDM's global_step).
                with accelerator.accumulate(*modules):
                    out, ok = _micro_step(accelerator, objective, batch, generator, run.step)
                    window_ok &= ok
                    if accelerator.sync_gradients:
                        _end_window(objective, ema, window_ok, run.step)
                meter.add(out.logs if ok else None, time.perf_counter() - t0)
                if not accelerator.sync_gradients:
                    continue

                # ------------------------------------------------------------------- one optimizer step done
                streak = run.count_step(window_ok, metrics, train.max_nonfinite, ckpts.latest())
                window_ok = True
                meter.steps += 1
                if meter.count and due(run.step, train.log_every, train):
                    values = meter.flush()
                    metrics.log(values, run.step)
                    bar.set_postfix({objective.progress_key: f"{values[meter.progress]:.4g}"})
                bar.update(1)
                if after_step(run.step, streak, train, validate, save_checkpoint):
                    break
            else:
                run.next_epoch()
    finally:
        bar.close()
    if not train.val_every or run.step % train.val_every:
        validate()
    return _export(accelerator, objective, ema, run_dir / objective.export_name, train.export_ema)


def _micro_step(
    accelerator: Accelerator, objective: Objective, batch: Any, generator: torch.Generator, step: int
) -> tuple[StepOutput, bool]:
    """The objective's losses of one micro-batch, backpropagated unless any rank saw a non-finite one."""
    out = objective.loss(batch, generator, step)
    ok = not nonfinite_anywhere(accelerator, *out.losses)
    if ok:
        for loss in out.losses:
            if loss is not None:
                accelerator.backward(loss)
    return out, ok


def _end_window(objective: Objective, ema: ModelEMA | None, window_ok: bool, step: int) -> None:
    """The optimizer step that closes an accumulation window (skipped after a non-finite loss)."""
    if window_ok:
        objective.apply_gradients(step)
        if ema is not None:
            ema.update(objective.model)
    for scheduler in objective.schedulers:
        scheduler.step()
    # Zeroed after each window (Accelerate ignores zero_grad inside one): every optimizer starts its next
    # backward from clean gradients, also after a skipped window.
    for optimizer in objective.optimizers:
        optimizer.zero_grad(set_to_none=True)


class _LogMeter:
    """What happened since the last log line: log sums over finite micro-batches, optimizer steps, compute
    seconds and the wall clock."""

    def __init__(self, objective: Objective, items_per_step: int) -> None:
        self.objective, self.items_per_step = objective, items_per_step
        self.progress = f"train/{objective.progress_key}"
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count, self.steps, self.compute, self.start = 0, 0, 0.0, time.perf_counter()

    def add(self, logs: dict[str, Tensor] | None, seconds: float) -> None:
        self.compute += seconds
        if logs is not None:
            for k, v in logs.items():
                self.sums[k] += float(v)
            self.count += 1

    def flush(self) -> dict[str, float]:
        """The means since the last line, the learning rate and the throughput; starts a new interval."""
        values = {f"train/{k}": v / self.count for k, v in self.sums.items()}
        values["train/lr"] = self.objective.schedulers[0].get_last_lr()[0]
        per_s = self.items_per_step * self.steps / (time.perf_counter() - self.start)
        values[f"train/{self.objective.unit}_per_s"] = per_s
        values["train/step_time"] = self.compute / self.steps  # excludes data loading
        self._reset()
        return values


def _export(
    accelerator: Accelerator, objective: Objective, ema: ModelEMA | None, export_dir: Path, export_ema: bool
) -> Path:
    """The objective's export (main process; EMA weights when configured) and every rank's weight digests."""
    if accelerator.is_main_process:
        use_ema = ema is not None and export_ema
        with ema.applied(objective.model) if use_ema else nullcontext():
            objective.export(export_dir)
        accelerator.print(f"exported {'EMA' if use_ema else 'raw'} weights to {export_dir}")
    # Every rank reports: data-parallel training must have kept the weights identical everywhere.
    named = objective.digest_modules()
    digests = " ".join(f"{n}={weights_digest(m)}" for n, m in named.items() if list(m.parameters()))
    rank, world = accelerator.process_index, accelerator.num_processes
    print(f"[rank {rank}/{world}] weights sha256 {digests}", flush=True)
    accelerator.wait_for_everyone()
    return export_dir


def weights_digest(module: nn.Module) -> str:
    """Short SHA-256 of the parameters. Buffers are left out: DDP broadcasts BatchNorm running statistics from
    rank 0 at each forward, so between forwards each rank holds its own (they are unused in train mode)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_enough_data(found: int, held_out: int, batch_size: int, world: int, what: str, where: str) -> None:
    """One line when the data cannot fill one global batch: found, held out, left and needed.

    Raises:
        ConfigError: fewer training items than ``batch_size * world``.
    """
    left, needed = found - held_out, batch_size * world
    if left < needed:
        raise ConfigError(
            f"{found} {what} found in {where}, {held_out} held out for validation: {left} left for training, "
            f"fewer than one batch per process ({batch_size}) x {world} process(es) = {needed} needed"
        )
