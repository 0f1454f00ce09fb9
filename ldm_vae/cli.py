"""The ``ldm-vae`` command line: encode images to diffusion-ready latents, decode them, measure reconstructions,
convert checkpoints, and describe a model (KL and VQ autoencoders alike); cache latents, sample and evaluate
a latent-diffusion pipeline.

Every command checks all of its inputs before it writes anything, never writes over an input, and writes each
file atomically, so a bad input or an interrupted run leaves no partial output. Bad input prints one
``error: ...`` line on stderr and exits 1 (``--debug`` shows the traceback instead).

This module parses arguments and checks them; :mod:`ldm_vae.workflows` does the work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from . import workflows as wf
from .autoencoders import load_autoencoder
from .images import collect_images
from .runtime import DTYPE_NAMES, DTYPES

if TYPE_CHECKING:  # accelerate takes a second to import; the commands that need it import it when they run
    from accelerate import PartialState

    from .interface import Autoencoder


class CLIError(wf.WorkflowError):
    """A bad argument the user can fix; printed as one line."""


def _tiling(args: argparse.Namespace) -> dict[str, int | str | None]:
    """Workflow keyword arguments for exact tiling (both None: one untiled pass)."""
    return {"tile_size": args.tile_size, "max_memory": args.max_memory}


# ------------------------------------------------------------------------------------------ autoencoder


def cmd_encode(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise CLIError(f"{out}: the output must be a .safetensors file")
    if out.is_dir():
        raise CLIError(f"{out}: is a directory; give a .safetensors file name")
    paths = collect_images(args.inputs)
    wf.check_no_overwrite([out], paths)
    vae = wf.load_model(args.model, args.dtype, args.device, args.compile)
    file = wf.encode_to_file(
        vae,
        paths,
        out,
        args.model,
        args.batch_size,
        args.sample,
        args.seed,
        **_tiling(args),
        indices=args.indices,
    )
    print(f"wrote {file.describe()} to {out}", file=sys.stderr)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    out_dir = wf.output_dir(args.output)
    file = wf.read_latents_file(args.latents)  # checked before the model loads
    vae = wf.load_model(args.model, args.dtype, args.device, args.compile)
    outputs = wf.decode_to_folder(vae, file, out_dir, args.model, args.batch_size, **_tiling(args))
    print(f"wrote {len(outputs)} images to {out_dir}", file=sys.stderr)
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    out_dir = wf.output_dir(args.output)
    paths = collect_images(args.inputs)
    outputs = wf.png_outputs(out_dir, [p.name for p in paths])
    metrics_path = out_dir / "metrics.json"
    wf.check_no_overwrite([*outputs, metrics_path], paths)
    vae = wf.load_model(args.model, args.dtype, args.device, args.compile)
    rows = wf.reconstruct_images(vae, paths, outputs, args.batch_size, **_tiling(args))
    mean = wf.mean_metrics(rows)
    wf.write_reconstruct_report(rows, mean, vae, args.model, metrics_path)
    wf.print_table(rows, mean, vae.config.downsample_factor)
    print(f"wrote {len(rows)} reconstruction(s) and {metrics_path.name} to {out_dir}", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.to == "ldm" and Path(args.dst).suffix != ".safetensors":
        raise CLIError(f"{args.dst}: an LDM single file must end in .safetensors")
    wf.convert_checkpoint(args.src, args.dst, args.to, args.dtype, args.config)
    print(f"wrote {args.to} {args.dtype} weights to {args.dst}", file=sys.stderr)
    return 0


def cmd_check_fp16(args: argparse.Namespace) -> int:
    from .workflows import fp16

    paths = collect_images(args.inputs)
    if args.json:
        wf.check_no_overwrite([Path(args.json)], paths)
    vae = wf.load_model(args.model, "fp32", args.device)
    images = fp16.load_check_images(paths, args.resolution, vae.config.downsample_factor)
    report = fp16.check_fp16(vae, images)
    print(fp16.format_fp16_report(report, top=None if args.all else args.top))
    if args.json:
        fp16.write_fp16_report(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if report.safe or not args.strict else 3


def cmd_info(args: argparse.Namespace) -> int:
    vae = load_autoencoder(args.model, dtype="fp32")
    print("\n".join(wf.describe_model(vae, args.model, args.size)))
    return 0


# ------------------------------------------------------------------------------------------ latent diffusion
# These commands import their modules when they run: diffusers takes seconds to import, the others never need it.


def _launched_model(args: argparse.Namespace) -> tuple[Autoencoder, PartialState]:
    """The model of a command that `accelerate launch -m ldm_vae.cli` may run in several processes, and the
    process state: one GPU per process, gloo ranks on CPUs, and a random-init preset the same everywhere."""
    from accelerate import PartialState

    device = wf.resolve_device(args.device)
    state = PartialState(cpu=device.type == "cpu")
    if device.type == "cuda":
        device = state.device
    torch.manual_seed(0)  # a random-init preset is then the same model in every process and on every rerun
    return wf.load_model(args.model, args.dtype, device, args.compile), state


def cmd_cache_latents(args: argparse.Namespace) -> int:
    from .latents import cache_latents

    data_dir, out_dir = Path(args.data_dir), Path(args.output)
    paths = wf.cache_inputs(data_dir, out_dir)
    vae = wf.require_posterior(_launched_model(args)[0], args.model)
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    manifest = cache_latents(
        vae,
        paths,
        out_dir,
        root=data_dir,
        resolution=args.resolution,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        model_name=model,
        tile_size=args.tile_size,
        max_memory=args.max_memory,
        views=args.views,
        seed=args.seed,
    )
    if manifest is not None:  # the main process
        shape = "x".join(map(str, manifest["latent_shape"]))
        print(
            f"wrote {manifest['num_items']} latents ({shape}) in {len(manifest['shards'])} shard(s) to {out_dir}; "
            f"scale {manifest['scale']:.6g} (1 / std of posterior samples)",
            file=sys.stderr,
        )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .workflows import stats as st

    out_dir = wf.output_dir(args.write) if args.write else None
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()):
        raise CLIError(f"{out_dir}: not empty; --write creates a new model folder")
    vae, state = _launched_model(args)
    if st.is_cache(args.data):
        sums, manifest = st.cache_stats(args.data, vae)
        if manifest["model"] != args.model and Path(args.model).resolve() != Path(manifest["model"]):
            print(
                f"warning: {args.data} was encoded by {manifest['model']}, not {args.model}", file=sys.stderr
            )
    else:
        files = st.stats_inputs(args.data)
        sums = st.image_stats(
            vae, files, args.resolution, args.views, args.seed, args.batch_size, args.tile_size,
            state.process_index, state.num_processes,
        )  # fmt: skip
        sums.all_reduce()
    stats = sums.stats()
    if state.is_main_process:
        print(st.describe_stats(stats, vae))
        if out_dir is not None:
            st.write_with_factors(vae, stats, out_dir, args.shift)
            print(
                f"wrote the model with the measured factors and latent_stats.json to {out_dir}",
                file=sys.stderr,
            )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .images import collect_images
    from .workflows import evaluate as ev

    out_dir = wf.output_dir(args.output)
    protocol = ev.parse_protocol(args.protocol, args.dtype, args.rounds)
    files = collect_images(args.images)
    wf.check_no_overwrite([out_dir / "results.json", out_dir / "report.html"], files)
    results = ev.evaluate(
        files,
        args.model,
        out_dir,
        protocol,
        wf.resolve_device(args.device),
        not args.no_fp16,
        args.equivariance,
    )
    print(ev.format_results(results))
    print(f"wrote results.json and report.html to {out_dir}", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .ldm import load_pipeline, sampling_scheduler

    out_dir = wf.output_dir(args.output)
    vae, unet, scheduler = load_pipeline(args.pipeline, wf.resolve_device(args.device))
    scheduler = sampling_scheduler(scheduler, args.scheduler)
    wf.write_samples(
        vae, unet, scheduler, out_dir, args.num, args.steps, args.seed, args.eta, args.batch_size
    )
    print(f"wrote {args.num} samples and grid.png to {out_dir}", file=sys.stderr)
    return 0


def cmd_ldm_eval(args: argparse.Namespace) -> int:
    device = wf.resolve_device(args.device)
    what, rows = wf.ldm_eval(
        args.pipeline, args.latents, device, args.last, args.timesteps, args.seed, args.batch_size
    )
    print(what)
    print(wf.format_bits_table(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    out_dir = wf.output_dir(args.output)
    summary = run_demo(
        out_dir,
        args.pipeline,
        args.dtype,
        args.num,
        args.steps,
        args.seed,
        digits_pipeline=args.digits_pipeline,
        bound_timesteps=args.bound_timesteps,
    )
    bits = summary["digits"]["bits_per_dim"]
    print(
        f"wrote the report to {out_dir / 'report.html'} ({summary['seconds']} s): "
        f"mean PSNR {summary['mean']['psnr']:.2f} dB vs bicubic {summary['mean']['bicubic_psnr']:.2f} dB; "
        f"held-out digits {bits['ddpm_bound']:.3f} bits/dim (DDPM bound) vs {bits['full']:.3f} (full-covariance "
        f"Gaussian), {bits['per_channel']:.3f} (per-channel Gaussian), {bits['prior']:.3f} (N(0, I))",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------------------ argument types


def _byte_size(text: str) -> int | str:
    """'auto', '2.5GB' (10**9), '2.5G' or '2.5GiB' (2**30), '800M', '64K' or a plain number of bytes."""
    if text.strip().lower() == "auto":
        return "auto"
    t = text.strip().upper()
    base = 1000 if t.endswith("B") and not t.endswith("IB") else 1024  # GB is decimal, G and GiB binary
    t = t.removesuffix("B").removesuffix("I")
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    try:
        value = float(t[:-1]) * base ** powers[t[-1]] if t and t[-1] in powers else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 2.5GB, 2.5GiB, 800M)") from None
    if value < 2**20:
        raise argparse.ArgumentTypeError(f"memory size {text!r} is below 1M")
    return int(value)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


# ------------------------------------------------------------------------------------------ parser

ENCODE_DETAILS = (
    "Writes one (N, C, h, w) 'latents' tensor, scaled for diffusion, with the source names and sizes as "
    "metadata. Each image is padded to the model's multiple on its own; images of several sizes get one "
    "(C, h, w) tensor each, named by image. --indices (VQ models): (h, w) code indices instead."
)
DECODE_DETAILS = (
    "One PNG per image, named after its source image and cropped to its original size; reads latents and "
    "VQ code-index files, stacked or one tensor per image."
)
RECONSTRUCT_DETAILS = (
    "Writes the reconstructions (PNG) and metrics.json with per-image and mean PSNR/SSIM, and those of a "
    "bicubic down/up baseline by the model's downsampling factor."
)
CONVERT_DETAILS = (
    "Reads anything from_pretrained reads; writes a diffusers folder (save_pretrained) or a .safetensors "
    "file with original LDM names (FLUX.2: black-forest-labs' ae.safetensors layout)."
)
CACHE_DETAILS = (
    "Center-crops each image to RESOLUTION (with --views V, adds V - 1 random crops and mirror images), "
    "encodes it and stores the posterior mean and std in shard-NNNNN.safetensors files plus latents.json "
    "with the latent scale (1 / std of posterior samples). KL models only (FLUX.2's included: its raw posterior, "
    "RESOLUTION a multiple of 16). "
    "Rerunning skips finished shards; a rerun whose images (their contents), model, dtype, tiling or settings "
    "differ is refused, saying what changed. Under `accelerate launch -m ldm_vae.cli` processes share the shards."
)
STATS_DETAILS = (
    "Moments of the latents z a diffusion model trains on, over an image folder (center crops and --views as "
    "cache-latents makes them; KL posteriors in closed form, float64 sums) or a cache-latents folder: the global "
    "std (scaling_factor = 1 / std, LDM's scale_by_std), the global mean (shift_factor) and per-channel means "
    "and stds (latents_mean / latents_std), next to the model's factors. FLUX.2 models: per-channel means and "
    "stds of the 2x2 latent patches next to the BatchNorm running statistics that normalize them (--write stores "
    "the measured ones). Under `accelerate launch -m ldm_vae.cli` processes split the images."
)
EVAL_REPORT_DETAILS = (
    "Writes results.json (per image and mean) and report.html (central crops at 1:1 with difference heat maps). "
    "Drift: PSNR and mean colour shift (8-bit levels) after k encode/decode round trips saved as 8-bit. "
    "coco256: short side 256, center crop, as the SD/SDXL VAE model cards measure on COCO-2017 val."
)
SAMPLE_DETAILS = (
    "Writes sample-NNNNN.png and grid.png; DDIM with eta 0 gives the same images for any --batch-size."
)
DEMO_DETAILS = (
    "Samples the digits latent DDPM next to real digits and the VAE's N(0, I) prior, with held-out bits/dim "
    "against fitted Gaussians; reconstructs scikit-image's photos (PSNR/SSIM against bicubic); interpolates "
    "between two photos' latents; shows one latent's channels; samples the photo DDPM; writes report.html."
)
EVAL_DETAILS = (
    "DDPM's bound with a continuous Gaussian decoder term (a bound on differential entropy, so it can be "
    "negative), next to the same latents' NLL under N(0, I) and, with --last, under Gaussians fitted to the "
    "other latents (per channel, and full covariance with Ledoit-Wolf shrinkage). Latents are scaled by the "
    "pipeline's scaling_factor; the cache's own scale must agree within 1%."
)

CHECK_FP16_DETAILS = (
    "Runs the images through the model in fp32 with hooks on every block (resnets, attentions and their "
    "projections, resamplers, conv_in/conv_out), then through an fp16 copy. A block whose fp32 maximum exceeds "
    "65504 overflows in fp16. scripts/configs/fp16_fix_demo.toml fine-tunes such a model to be fp16-safe."
)

# The subparsers action of ``ldm-vae`` (argparse keeps the class private).
_Sub = argparse._SubParsersAction


def _common_parent() -> argparse.ArgumentParser:
    """Options of every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return common


def _model_parent() -> argparse.ArgumentParser:
    """Options of the commands that run an autoencoder."""
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument(
        "--model",
        required=True,
        help="preset (random init: sd, sdxl, flux, flux2, flux2-small-decoder, tiny, kl-f4 ... kl-f32, vq-f4 ... "
        "vq-f16, vqgan-imagenet-f16-*), 'demo' (shipped weights), a diffusers folder "
        "(AutoencoderKL, VQModel or AutoencoderKLFlux2), or an LDM/SD .safetensors/.ckpt file",
    )
    run.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    run.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile encoder and decoder (one compile per input shape; tiled runs stay eager)",
    )
    run.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="auto", help="auto: bf16 where the hardware has it, else fp32"
    )
    run.add_argument(
        "--batch-size", type=_positive_int, default=4, help="images per forward pass (default 4)"
    )
    run.add_argument(
        "--tile-size", type=_positive_int, default=None, help="exact tiling, tile edge in pixels"
    )
    run.add_argument(
        "--max-memory",
        type=_byte_size,
        default="auto",
        metavar="SIZE",
        help="activation memory for exact tiling, e.g. 2.5GB (10^9) or 2.5GiB (2^30) (picks --tile-size if "
        "not given); default auto: untiled when the image fits half the free memory, else tiled within it",
    )
    return run


def _command(
    sub: _Sub,
    parents: Sequence[argparse.ArgumentParser],
    func: Callable[[argparse.Namespace], int],
    summary: str,
    details: str = "",
) -> argparse.ArgumentParser:
    """The subcommand named after ``func`` (``cmd_ldm_eval``: ``ldm-eval``), which runs it."""
    name = func.__name__.removeprefix("cmd_").replace("_", "-")
    p = sub.add_parser(name, parents=parents, help=summary, description=f"{summary}. {details}".strip())
    p.set_defaults(func=func)
    return p


def add_encode_parser(sub: _Sub, model: Sequence[argparse.ArgumentParser]) -> None:
    summary = "images -> diffusion-ready latents or VQ code indices (.safetensors)"
    p = _command(sub, model, cmd_encode, summary, ENCODE_DETAILS)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    p.add_argument("--sample", action="store_true", help="sample the posterior (default: its mode)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")
    p.add_argument(
        "--indices",
        action="store_true",
        help="VQ models: write the code indices (int32) instead of the scaled code vectors",
    )


def add_decode_parser(sub: _Sub, model: Sequence[argparse.ArgumentParser]) -> None:
    p = _command(
        sub, model, cmd_decode, "latents or code indices (.safetensors) -> PNG images", DECODE_DETAILS
    )
    p.add_argument("latents", metavar="LATENTS.safetensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")


def add_reconstruct_parser(sub: _Sub, model: Sequence[argparse.ArgumentParser]) -> None:
    summary = "encode + decode images, scored with PSNR/SSIM"
    p = _command(sub, model, cmd_reconstruct, summary, RECONSTRUCT_DETAILS)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")


def add_convert_parser(sub: _Sub, common: Sequence[argparse.ArgumentParser]) -> None:
    summary = "checkpoint -> diffusers folder or LDM single file"
    p = _command(sub, common, cmd_convert, summary, CONVERT_DETAILS)
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", choices=("diffusers", "ldm"), required=True)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument(
        "--config",
        help="for a single-file SRC: config.json or diffusers folder giving what tensor shapes cannot "
        "(norm_num_groups, scaling_factor, ...); default: inferred, with SD's values for the rest",
    )


def add_cache_latents_parser(sub: _Sub, model: Sequence[argparse.ArgumentParser]) -> None:
    summary = "image folder -> sharded posterior latents for diffusion training"
    p = _command(sub, model, cmd_cache_latents, summary, CACHE_DETAILS)
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("-o", "--output", required=True, metavar="LATENT_DIR")
    p.add_argument("--resolution", type=_positive_int, default=256, help="square image size (default 256)")
    p.add_argument("--shard-size", type=_positive_int, default=1000, help="latents per shard (default 1000)")
    p.add_argument(
        "--views",
        type=_positive_int,
        default=1,
        help="latents per image: the center crop, then random crops and mirror images (default 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random views (default 0)")


def add_stats_parser(sub: _Sub, model: Sequence[argparse.ArgumentParser]) -> None:
    summary = "latent statistics: scaling_factor, shift_factor and per-channel mean/std of a data set"
    p = _command(sub, model, cmd_stats, summary, STATS_DETAILS)
    p.add_argument("data", metavar="DATA_OR_LATENT_DIR")
    p.add_argument("--resolution", type=_positive_int, default=256, help="square image size (default 256)")
    p.add_argument(
        "--views", type=_positive_int, default=1, help="latents per image, as cache-latents (default 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random views (default 0)")
    p.add_argument(
        "--write", metavar="OUT_DIR", help="write a copy of the model with the measured scaling_factor"
    )
    p.add_argument("--shift", action="store_true", help="with --write: also write the measured shift_factor")


def add_eval_parser(sub: _Sub, common: Sequence[argparse.ArgumentParser]) -> None:
    summary = "compare autoencoders on the same images: PSNR, SSIM, LPIPS, colour drift, fp16, speed, memory"
    p = _command(sub, common, cmd_eval, summary, EVAL_REPORT_DETAILS)
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS")
    p.add_argument("--model", action="append", required=True, help="a model to compare (repeat for several)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    p.add_argument("--protocol", default="native", help="native (default), coco256, or center<N>")
    p.add_argument(
        "--rounds", type=_int_list, default=(1, 5, 10), help="round trips for drift (default 1,5,10)"
    )
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--no-fp16", action="store_true", help="skip the fp16 finiteness check")
    p.add_argument(
        "--equivariance",
        action="store_true",
        help="also the equivariance PSNR: decode(tau(z)) vs tau(x) for flips, rotations, 2x/4x downscales",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_sample_parser(sub: _Sub, common: Sequence[argparse.ArgumentParser]) -> None:
    summary = "sample a latent-diffusion pipeline to PNG images"
    p = _command(sub, common, cmd_sample, summary, SAMPLE_DETAILS)
    p.add_argument(
        "--pipeline",
        required=True,
        metavar="DIR",
        help="a folder exported by scripts/train_ldm.py, or 'demo'",
    )
    p.add_argument("-n", "--num", type=_positive_int, default=16, help="number of images (default 16)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    p.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default 50)")
    p.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="samples per pass (default 16)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_demo_parser(sub: _Sub, common: Sequence[argparse.ArgumentParser]) -> None:
    p = _command(sub, common, cmd_demo, "the one-command demo on the shipped weights", DEMO_DETAILS)
    p.add_argument("-o", "--output", default="demo-output", metavar="OUT_DIR", help="default: demo-output/")
    p.add_argument("--pipeline", default=None, metavar="DIR", help="default: the shipped weights/demo")
    p.add_argument(
        "--digits-pipeline", default=None, metavar="DIR", help="default: the shipped weights/digits"
    )
    p.add_argument(
        "--bound-timesteps",
        type=_positive_int,
        default=50,
        help="importance-sampled timesteps of the digits' held-out bound (default 50)",
    )
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="autoencoder dtype (default auto)")
    p.add_argument("-n", "--num", type=_positive_int, default=16, help="samples (default 16)")
    p.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def add_ldm_eval_parser(sub: _Sub, common: Sequence[argparse.ArgumentParser]) -> None:
    summary = "variational bound of a pipeline on cached latents, in bits/dim"
    p = _command(sub, common, cmd_ldm_eval, summary, EVAL_DETAILS)
    p.add_argument("latents", metavar="LATENT_DIR")
    p.add_argument("--pipeline", required=True, metavar="DIR")
    p.add_argument(
        "--last",
        type=_positive_int,
        help="only the center crops of the last N images (the trainer's held-out data.num_val)",
    )
    p.add_argument(
        "--timesteps",
        type=int,
        default=100,
        help="importance-sampled timesteps of the sum over t; 0: all (default 100)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the posterior samples and the noise (default 0)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=16, help="latents per pass (default 16)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_check_fp16_parser(sub: _Sub, common: Sequence[argparse.ArgumentParser]) -> None:
    summary = (
        "is the model fp16-safe? per-block max |activation| in fp32 vs 65504, fp16 encode/decode finiteness"
    )
    p = _command(sub, common, cmd_check_fp16, summary, CHECK_FP16_DETAILS)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    p.add_argument("--model", required=True, help="as for the other commands: preset, demo, folder or file")
    p.add_argument(
        "--resolution",
        type=_positive_int,
        default=None,
        help="center crops of this side (short side resized first); default: whole images, padded",
    )
    p.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    p.add_argument(
        "--top",
        type=_positive_int,
        default=8,
        help="list the N largest blocks and any overflowing (default 8)",
    )
    p.add_argument("--all", action="store_true", help="list every block, in network order")
    p.add_argument("--strict", action="store_true", help="exit code 3 when the model is not fp16-safe")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_info_parser(sub: _Sub, common: Sequence[argparse.ArgumentParser]) -> None:
    p = _command(sub, common, cmd_info, "config, parameter counts and latent shape of a model")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--size", nargs=2, type=_positive_int, metavar=("H", "W"), help="image size for the shape")


# Subcommands in --help order, each with whether it runs an autoencoder (and so takes --model and its options).
SUBCOMMANDS: tuple[tuple[Callable[[_Sub, Sequence[argparse.ArgumentParser]], None], bool], ...] = (
    (add_encode_parser, True),
    (add_decode_parser, True),
    (add_reconstruct_parser, True),
    (add_convert_parser, False),
    (add_cache_latents_parser, True),
    (add_stats_parser, True),
    (add_sample_parser, False),
    (add_demo_parser, False),
    (add_ldm_eval_parser, False),
    (add_eval_parser, False),
    (add_check_fp16_parser, False),
    (add_info_parser, False),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``ldm-vae`` parser; each subcommand sets ``func``, the ``cmd_*`` that runs it."""
    parser = argparse.ArgumentParser(
        prog="ldm-vae",
        description="Latent-diffusion autoencoders: encode, decode, reconstruct, convert; cache latents, sample.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_parent()
    model = [common, _model_parent()]
    for add, runs_model in SUBCOMMANDS:
        add(sub, model if runs_model else [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``ldm-vae``; returns the exit code (argparse exits 2 itself on usage errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    # ValueError covers WorkflowError, ImageError, CheckpointError and the models' input checks.
    except (ValueError, OSError, MemoryError, torch.OutOfMemoryError) as e:
        if args.debug:
            raise
        print(f"error: {wf.one_line(e)}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Destroys the ``torch.distributed`` group a launched command opened (no-op otherwise): a process that
    exits with a live gloo group can abort (SIGABRT) in interpreter teardown, failing a run that succeeded."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
