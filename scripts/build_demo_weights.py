"""Builds the shipped demo weights (``weights/demo/``) end to end, each stage resumable:

1. ``vae``: the KL-f8 autoencoder, ``scripts/train_vae.py --config scripts/configs/demo_kl_f8.toml``;
2. ``latents``: ``ldm-vae cache-latents`` of the photos through it (128 px: the center crop and 7 random crops
   and mirror images of each photo);
3. ``ldm``: the latent DDPM, ``scripts/train_ldm.py --config scripts/configs/ldm_demo.toml``;
4. ``ship``: copies the exported pipeline to ``weights/demo/``, runs ``ldm-vae demo`` on it, writes the model
   card (``weights/demo/README.md``) from the runs' logs and the demo's scores, and the README's pictures.

    python scripts/build_demo_weights.py --photos ../shared/data/photos --runs runs [--stages ship]

Stopped at any point, the same command continues (trainers resume from their latest checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_vae import PRESETS
from ldm_vae.runtime import autocast_precision

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("vae", "latents", "ldm", "ship")


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def logged(run_dir: Path) -> list[dict]:
    """The run's metrics lines, one per step (a resumed run re-logs the steps after its checkpoint: last wins)."""
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def training_hours(records: list[dict], steps_per_log: int, images_per_step: int | None = None) -> float:
    """Wall time of the training steps (not validation or checkpoints), summed over logging intervals."""
    seconds, last = 0.0, 0
    for rec in records:
        if "train/step_time" not in rec:
            continue
        steps = rec["step"] - last
        if images_per_step and "train/images_per_s" in rec:  # includes data loading, unlike step_time
            seconds += steps * images_per_step / rec["train/images_per_s"]
        else:
            seconds += steps * rec["train/step_time"]
        last = rec["step"]
    return seconds / 3600


def pictures(
    demo_out: Path, docs: Path, factor: int, names: tuple[str, ...] = ("astronaut", "coffee", "chelsea")
) -> None:
    """README pictures: original | reconstruction | bicubic x factor for a few photos, and the sample grid."""
    from ldm_vae.metrics import bicubic_baseline

    docs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        original = Image.open(demo_out / "originals" / f"{name}.png").convert("RGB")
        recon = Image.open(demo_out / "reconstructions" / f"{name}.png").convert("RGB")
        x = np.asarray(original, dtype=np.float32) / 127.5 - 1
        base = bicubic_baseline(torch.from_numpy(x).permute(2, 0, 1), factor).clamp(-1, 1)
        base = Image.fromarray(((base.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        h = 256
        tiles = [
            im.resize((round(im.width * h / im.height), h), Image.LANCZOS) for im in (original, recon, base)
        ]
        row = Image.new("RGB", (sum(t.width for t in tiles) + 8 * 2, h), "white")
        x0 = 0
        for t in tiles:
            row.paste(t, (x0, 0))
            x0 += t.width + 8
        rows.append(row)
    sheet = Image.new(
        "RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 8 * (len(rows) - 1)), "white"
    )
    y0 = 0
    for r in rows:
        sheet.paste(r, (0, y0))
        y0 += r.height + 8
    sheet.save(docs / "reconstructions.jpg", quality=90)
    # The demo's own list: its samples folder also holds grid.png, the 4x4 grid of the same samples.
    names = json.loads((demo_out / "metrics.json").read_text())["samples"]
    samples = [demo_out / "samples" / name for name in names]
    grid = Image.new("RGB", (8 * 132, ((len(samples) + 7) // 8) * 132), "white")
    for i, p in enumerate(samples):
        grid.paste(Image.open(p).convert("RGB").resize((128, 128)), ((i % 8) * 132, (i // 8) * 132))
    grid.save(docs / "samples.png")


def vae_round(vae_run: Path) -> dict:
    """One training round of the autoencoder (a run from a preset, or continued from earlier weights)."""
    cfg = json.loads((vae_run / "train_config.json").read_text())
    log = logged(vae_run)
    val = [r for r in log if "val/psnr_ema" in r][-1]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "init": cfg["model"]["init"],
        "steps": log[-1]["step"],
        "hours": training_hours(log, cfg["train"]["log_every"], cfg["data"]["batch_size"]),
        # What "auto" resolved to on the machine that trained (this build runs there, right after).
        "precision": autocast_precision(cfg["train"]["mixed_precision"]),
        "cpu": f"{os.cpu_count()}-core, {torch.backends.cpu.get_cpu_capability()}",
        "lr": cfg["optim"]["lr"],
        "val_psnr_ema": val["val/psnr_ema"],
        "val_ssim_ema": val["val/ssim_ema"],
    }


def add_round(history: list[dict], new: dict) -> list[dict]:
    """The rounds so far plus this one, which replaces the last if it is the same round shipped again."""
    undated = [{k: v for k, v in r.items() if k != "date"} for r in [*history[-1:], new]]
    if len(undated) == 2 and undated[0] == undated[1]:
        history = history[:-1]
    return [*history, new]


def card(
    vae_run: Path,
    latents: Path,
    ldm_run: Path,
    shipped: Path,
    demo: dict,
    rounds: list[dict],
    commands: list[str],
) -> str:
    """The model card of weights/demo, from the runs' resolved configs and logs and the demo's scores."""
    vae_cfg = json.loads((vae_run / "train_config.json").read_text())
    ldm_cfg = json.loads((ldm_run / "train_config.json").read_text())
    ldm_log = logged(ldm_run)
    ldm_hours = training_hours(ldm_log, ldm_cfg["train"]["log_every"])
    val = rounds[-1]
    ldm_vals = [r for r in ldm_log if "val/bpd_ema" in r]
    manifest = json.loads((latents / "latents.json").read_text())
    views = manifest.get("views", 1)
    vqvae = json.loads((shipped / "vqvae/config.json").read_text())
    unet = json.loads((shipped / "unet/config.json").read_text())
    size = sum(p.stat().st_size for p in shipped.rglob("*.safetensors")) / 2**20
    lines = [
        "# ldm_vae demo weights",
        "",
        "An unconditional latent-diffusion pipeline in the diffusers `LDMPipeline` layout: `vqvae/` is a small",
        'KL-f8 autoencoder (`ldm_vae.AutoencoderKL`, loaded by `AutoencoderKL.from_pretrained("demo")` and',
        "`--model demo`), `unet/` a diffusers `UNet2DModel` trained on its latents, `scheduler/` DDIM.",
        f"Weights are safetensors in fp16 ({size:.1f} MiB in all). Trained from scratch on a 2-core CPU (no GPU)",
        "by this repository's own trainers; a demonstration, not a production VAE.",
        "",
        "## Autoencoder (`vqvae/`)",
        "",
        f"- Architecture: KL-f8 (Stable Diffusion's layout, narrower): `block_out_channels` "
        f"{vqvae['block_out_channels']}, `layers_per_block` {vqvae['layers_per_block']}, `norm_num_groups` "
        f"{vqvae['norm_num_groups']}, {vqvae['latent_channels']} latent channels, mid-block attention; "
        f"`scaling_factor` {vqvae['scaling_factor']:.5f} (1/std of the cached latents, LDM's scale_by_std).",
        f"- Data: the 280 JPEG photographs of `../shared/data/photos` ({vae_cfg['data']['num_val']} held out for "
        f"validation), random {vae_cfg['data']['resolution']} px crops, batch {vae_cfg['data']['batch_size']}.",
        f"- Loss: {vae_cfg['loss']['rec_loss'].upper()} reconstruction + KL (weight {vae_cfg['loss']['kl_weight']}); "
        "no LPIPS (its ImageNet backbone cannot be downloaded here) and no GAN.",
        f"- Optimizer: AdamW lr {vae_cfg['optim']['lr']}, {vae_cfg['optim']['warmup_steps']} warm-up steps, cosine; "
        f"EMA {vae_cfg['train']['ema_decay']} (the shipped weights are the EMA).",
        f"- Steps: {sum(r['steps'] for r in rounds)} in {len(rounds)} round(s), "
        f"{sum(r['hours'] for r in rounds):.1f} h of training steps. A round after the first starts from the "
        "weights the previous one shipped (`--vae-init weights/demo/vqvae`: fresh optimizer, warm-up and cosine "
        "again), because a session's run folder does not outlive it here. Last validation (held-out photos, "
        f"{vae_cfg['data']['resolution']} px): PSNR {val['val_psnr_ema']:.2f} dB, SSIM {val['val_ssim_ema']:.4f}.",
        "",
        "| round | date | from | steps | hours | precision | CPU | lr | val PSNR dB (EMA) |",
        "|---:|---|---|---:|---:|---|---|---:|---:|",
        *(
            f"| {i} | {r['date']} | `{r['init']}` | {r['steps']} | {r['hours']:.2f} | {r['precision']} | "
            f"{r['cpu']} | {r['lr']} | {r['val_psnr_ema']:.2f} |"
            for i, r in enumerate(rounds, 1)
        ),
        "",
        "## Latent DDPM (`unet/`, `scheduler/`)",
        "",
        f"- `UNet2DModel`: `block_out_channels` {unet['block_out_channels']}, `layers_per_block` "
        f"{unet['layers_per_block']}, on 16x16x4 latents of 128 px images ({views} per photo: the center crop"
        + (" and random crops and mirror images" if views > 1 else "")
        + f", {manifest['num_items']} in all); epsilon objective, diffusers' DDPM "
        f"scheduler ({ldm_cfg['diffusion']['beta_schedule']}, {ldm_cfg['diffusion']['num_train_timesteps']} steps), "
        "sampled with DDIM.",
        f"- Steps: {ldm_log[-1]['step']} ({ldm_hours:.2f} h), batch {ldm_cfg['data']['batch_size']}, lr "
        f"{ldm_cfg['optim']['lr']}.",
        f"- Variational bound on the held-out latents (center crops of the last {ldm_cfg['data']['num_val']} "
        "photos, none of whose crops were trained on), in bits per dimension, against the same latents under the "
        "N(0, I) prior a VAE samples from (a bound on differential entropy: lower is better):",
        "",
        "| step | val loss (EMA) | bound bits/dim (EMA) | N(0, I) bits/dim |",
        "|---:|---:|---:|---:|",
        *(
            f"| {r['step']} | {r['val/loss_ema']:.4f} | {r['val/bpd_ema']:.3f} | {r['val/prior_bpd_ema']:.3f} |"
            for r in ldm_vals
        ),
        "",
        "## Measured (`ldm-vae demo`, scikit-image's colour photos, never seen in training)",
        "",
        "Reconstructions at full size, 8-bit as written, against the bicubic x8 down/up baseline:",
        "",
        "| image | size | PSNR dB | SSIM | bicubic PSNR dB | bicubic SSIM |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in demo["images"]:
        lines.append(
            f"| {Path(r['source']).stem} | {r['size'][0]}x{r['size'][1]} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
            f"{r['bicubic_psnr']:.2f} | {r['bicubic_ssim']:.4f} |"
        )
    m = demo["mean"]
    lines += [
        f"| **mean** | | **{m['psnr']:.2f}** | **{m['ssim']:.4f}** | {m['bicubic_psnr']:.2f} | "
        f"{m['bicubic_ssim']:.4f} |",
        "",
        f"Mean PSNR {m['psnr'] - m['bicubic_psnr']:+.2f} dB against bicubic (the target is +1.5 dB: "
        f"{'met' if m['psnr'] - m['bicubic_psnr'] >= 1.5 else 'not met yet'}). The demo ran in "
        f"{demo['seconds']:.0f} s ({demo['dtype']}).",
        "",
        "## How it was made",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=ROOT.parent / "shared/data/photos")
    p.add_argument("--runs", type=Path, default=ROOT / "runs")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument(
        "--weights", type=Path, default=ROOT / "weights/demo", help="where the pipeline is shipped"
    )
    p.add_argument("--docs", type=Path, default=ROOT / "docs/demo", help="where the README's pictures go")
    p.add_argument("--vae-steps", type=int, help="steps of this autoencoder round (default: the config's)")
    p.add_argument("--ldm-steps", type=int, help="steps of the latent DDPM (default: the config's)")
    p.add_argument(
        "--vae-init",
        help="start the autoencoder from these weights (e.g. weights/demo/vqvae) instead of the config's preset",
    )
    args = p.parse_args()
    py, runs = sys.executable, args.runs.resolve()
    photos = os.path.relpath(args.photos.resolve(), ROOT)  # the card's commands, as run from the repository
    vae_run, latents, ldm_run = runs / "demo", runs / "latents_demo", runs / "ldm_demo"
    rel = {
        k: os.path.relpath(v, ROOT) for k, v in {"vae": vae_run, "latents": latents, "ldm": ldm_run}.items()
    }

    def commands(vae_steps: int | None, ldm_steps: int | None) -> list[str]:
        return [
            f"python scripts/train_vae.py --config scripts/configs/demo_kl_f8.toml --data-dir {photos} "
            f"--output-dir {rel['vae']} --resume latest"
            + (f" --max-steps {vae_steps}" if vae_steps else "")
            + (f" --model.init {args.vae_init}" if args.vae_init else ""),
            f"ldm-vae cache-latents {photos} -o {rel['latents']} --model {rel['vae']}/vae --resolution 128 --views 8",
            f"python scripts/train_ldm.py --config scripts/configs/ldm_demo.toml --latent-dir {rel['latents']} "
            f"--output-dir {rel['ldm']} --resume latest" + (f" --max-steps {ldm_steps}" if ldm_steps else ""),
        ]

    train = commands(args.vae_steps, args.ldm_steps)
    cli = str(Path(py).with_name("ldm-vae"))  # the console script of the same venv
    if "vae" in args.stages:
        run(*train[0].replace("python", py, 1).split())
    if "latents" in args.stages:
        run(cli, *train[1].split()[1:])
    if "ldm" in args.stages:
        run(*train[2].replace("python", py, 1).split())
    if "ship" in args.stages:
        dest = args.weights.resolve()
        rounds = [vae_round(vae_run)]
        if rounds[0]["init"] not in PRESETS and (dest / "history.json").exists():  # continued: earlier rounds
            rounds = add_round(json.loads((dest / "history.json").read_text())["vae_rounds"], rounds[0])
        tmp = dest.with_name(".demo.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ldm_run / "pipeline", tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        demo_out = runs / "demo-output"
        # fp32: the card's scores then do not depend on the CPU ("auto" is bf16 only where it is native).
        run(cli, "demo", "-o", str(demo_out), "--pipeline", str(dest), "--dtype", "fp32")
        demo = json.loads((demo_out / "metrics.json").read_text())
        # The card shows the steps the runs were trained for, also when this invocation only ships.
        steps = [
            json.loads((r / "train_config.json").read_text())["train"]["max_steps"]
            for r in (vae_run, ldm_run)
        ]
        made = [
            *commands(*steps),
            "python scripts/build_demo_weights.py --stages ship  # copy here, demo, this card",
        ]
        (dest / "history.json").write_text(json.dumps({"vae_rounds": rounds}, indent=2) + "\n")
        (dest / "README.md").write_text(card(vae_run, latents, ldm_run, dest, demo, rounds, made))
        levels = len(json.loads((dest / "vqvae/config.json").read_text())["block_out_channels"])
        pictures(demo_out, args.docs, 2 ** (levels - 1))
        print(
            f"shipped {dest}; mean PSNR {demo['mean']['psnr']:.2f} dB vs bicubic {demo['mean']['bicubic_psnr']:.2f}"
        )


if __name__ == "__main__":
    main()
