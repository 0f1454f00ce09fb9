"""The ``ldm-vae`` command line: encode images to diffusion-ready latents, decode them, measure reconstructions,
convert checkpoints, and describe a model.

Every command checks all of its inputs before it writes anything, never writes over an input, and writes each
file atomically, so a bad input or an interrupted run leaves no partial output. Bad input prints one
``error: ...`` line on stderr and exits 1 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from . import __version__
from .autoencoder_kl import AutoencoderKL
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from .images import (
    collect_images,
    crop_to,
    load_image,
    pad_to_multiple,
    padded_size,
    round_to_8bit,
    save_image,
)
from .io import write_json, write_safetensors
from .metrics import bicubic_baseline, psnr, ssim
from .runtime import DTYPE_NAMES, DTYPES

LATENTS_KEY = "latents"


class CLIError(ValueError):
    """Bad input the user can fix; printed as one line."""


# ------------------------------------------------------------------------------------------ helpers


def _progress(items: Iterable, total: int, desc: str) -> Iterator:
    # disable=None: a bar on an interactive stderr only, so logs and pipes stay clean.
    return iter(tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False))


def _batches(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown device {name!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} requested but CUDA is not available")
    return device


def _load_model(args: argparse.Namespace) -> AutoencoderKL:
    device = _device(args.device)
    vae = AutoencoderKL.from_pretrained(args.model, dtype=args.dtype, device=device)
    if vae.config.in_channels != 3 or vae.config.out_channels != 3:
        raise CLIError(
            f"{args.model}: model takes {vae.config.in_channels}-channel and gives "
            f"{vae.config.out_channels}-channel images; image files are RGB"
        )
    return vae


def _tiling(args: argparse.Namespace) -> dict[str, int | None]:
    """encode/decode keyword arguments for exact tiling (both None: one untiled pass)."""
    return {"tile_size": args.tile_size, "max_memory": args.max_memory}


def _output_dir(path: str | Path) -> Path:
    """An output folder path, refused when a file is in the way (folders are created on first write)."""
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"{out_dir}: exists and is not a directory")
    return out_dir


def _check_no_overwrite(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Refuses any output path that is, or resolves to, an input file."""
    sources = {p.resolve(): p for p in inputs}
    for out in outputs:
        if out.resolve() in sources:
            raise CLIError(
                f"{out}: output would overwrite the input {sources[out.resolve()]}; choose another"
            )


def _files_of(path: Path) -> list[Path]:
    """The file, or every file in the folder."""
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


def output_stems(names: Sequence[str]) -> list[str]:
    """File stems for outputs, one per source name, unique even on case-insensitive filesystems.

    ``a.jpg`` and ``a.png`` become ``a`` and ``a_2``; directories in names are dropped.
    """
    used: set[str] = set()
    stems = []
    for name in names:
        stem = Path(name).stem or "image"
        candidate, k = stem, 1
        while candidate.lower() in used:
            k += 1
            candidate = f"{stem}_{k}"
        used.add(candidate.lower())
        stems.append(candidate)
    return stems


def _image_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """Decodes every image once, so a bad file fails before anything is written; returns (H, W) each."""
    sizes = []
    for path in _progress(paths, len(paths), "checking"):
        x = load_image(path)
        sizes.append((x.shape[1], x.shape[2]))
    return sizes


def _load_batch(paths: Sequence[Path], multiple: int) -> Tensor:
    """Images of one padded size -> (B, 3, H', W'), H' and W' multiples of ``multiple``."""
    return torch.stack([pad_to_multiple(load_image(p), multiple) for p in paths])


# ------------------------------------------------------------------------------------------ encode


def cmd_encode(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise CLIError(f"{out}: the output must be a .safetensors file")
    if out.is_dir():
        raise CLIError(f"{out}: is a directory; give a .safetensors file name")
    paths = collect_images(args.inputs)
    _check_no_overwrite([out], paths)
    vae = _load_model(args)
    f = vae.config.downsample_factor
    sizes = _image_sizes(paths)
    # One tensor holds every latent, so they must share a shape. Padding images to a common size would
    # change their latents (the encoder would see the padding), so differing sizes are refused instead.
    shapes: dict[tuple[int, int], list[Path]] = {}
    for path, size in zip(paths, sizes, strict=True):
        shapes.setdefault(padded_size(size, f), []).append(path)
    if len(shapes) > 1:
        listing = ", ".join(
            f"{h}x{w} ({len(ps)}, e.g. {ps[0].name})" for (h, w), ps in list(shapes.items())[:3]
        )
        raise CLIError(
            f"images have {len(shapes)} different (padded) sizes: {listing}; one latents file holds one "
            "size: encode each size to its own file, or crop/resize the images first"
        )

    generator = torch.Generator(vae.device).manual_seed(args.seed) if args.sample else None
    chunks = []
    batches = list(_batches(range(len(paths)), args.batch_size))
    with torch.inference_mode():
        for batch in _progress(batches, len(batches), "encoding"):
            x = _load_batch([paths[i] for i in batch], f).to(vae.device)  # (B, 3, H', W')
            posterior = vae.encode(x, **_tiling(args))
            z = posterior.sample(generator) if args.sample else posterior.mode()  # (B, C, H'/f, W'/f)
            chunks.append(vae.scale_latents(z).float().cpu())
    latents = torch.cat(chunks)  # (N, C, h, w)
    metadata = {
        "scaling_factor": json.dumps(vae.config.scaling_factor),
        "shift_factor": json.dumps(vae.config.shift_factor or 0.0),
        "source_names": json.dumps([p.name for p in paths]),
        "original_sizes": json.dumps([list(s) for s in sizes]),
        "model": str(args.model),
        "posterior": f"sample(seed={args.seed})" if args.sample else "mode",
    }
    write_safetensors({LATENTS_KEY: latents}, out, metadata)
    print(f"wrote {LATENTS_KEY} {tuple(latents.shape)} to {out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ decode


def read_latents(path: Path) -> tuple[Tensor, dict[str, str]]:
    """The ``latents`` tensor (N, C, h, w) float32 and the metadata of a latents file, checked."""
    if not path.is_file():
        raise CLIError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            if LATENTS_KEY not in keys:
                shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                raise CLIError(f"{path}: no tensor named {LATENTS_KEY!r} (has: {shown or 'none'})")
            z = f.get_tensor(LATENTS_KEY)
    except (SafetensorError, OSError) as e:
        raise CLIError(f"{path}: not a readable safetensors file ({e})") from None
    if z.ndim != 4 or not z.is_floating_point():
        raise CLIError(
            f"{path}: {LATENTS_KEY} must be a float (N, C, h, w) tensor, got {z.dtype} {tuple(z.shape)}"
        )
    if not torch.isfinite(z).all():
        raise CLIError(f"{path}: {LATENTS_KEY} contain NaN or Inf")
    return z.float(), metadata


def _metadata_list(metadata: dict[str, str], key: str, n: int, path: Path) -> list | None:
    if key not in metadata:
        return None
    try:
        values = json.loads(metadata[key])
    except json.JSONDecodeError:
        raise CLIError(f"{path}: metadata {key!r} is not JSON") from None
    if not isinstance(values, list) or len(values) != n:
        raise CLIError(f"{path}: metadata {key!r} should list {n} entries, one per latent")
    return values


def _latent_scale(vae: AutoencoderKL, metadata: dict[str, str], path: Path) -> tuple[float, float]:
    """The (scaling, shift) the file was written with, else the model's; warns when they differ."""
    model = (vae.config.scaling_factor, vae.config.shift_factor or 0.0)
    try:
        stored = tuple(
            float(json.loads(metadata[k]) or 0.0) if k in metadata else m
            for k, m in zip(("scaling_factor", "shift_factor"), model, strict=True)
        )
    except (json.JSONDecodeError, TypeError, ValueError):
        raise CLIError(f"{path}: metadata scaling_factor/shift_factor are not numbers") from None
    if stored != model:
        print(
            f"warning: {path} was scaled with scaling_factor={stored[0]}, shift_factor={stored[1]} but the "
            f"model uses {model[0]}, {model[1]}; unscaling with the file's values",
            file=sys.stderr,
        )
    return stored  # type: ignore[return-value]


def cmd_decode(args: argparse.Namespace) -> int:
    src, out_dir = Path(args.latents), Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"{out_dir}: exists and is not a directory")
    z, metadata = read_latents(src)
    n, c, h, w = z.shape
    names = _metadata_list(metadata, "source_names", n, src) or [f"latent_{i:05d}" for i in range(n)]
    sizes = _metadata_list(metadata, "original_sizes", n, src)
    vae = _load_model(args)
    f = vae.config.downsample_factor
    if c != vae.config.latent_channels:
        raise CLIError(
            f"{src}: latents have {c} channels but {args.model} takes {vae.config.latent_channels}"
        )
    if sizes is not None and any(
        not (isinstance(s, list) and len(s) == 2 and 0 < s[0] <= h * f and 0 < s[1] <= w * f) for s in sizes
    ):
        raise CLIError(
            f"{src}: metadata original_sizes do not fit latents of {h}x{w} (images {h * f}x{w * f})"
        )
    scaling, shift = _latent_scale(vae, metadata, src)
    outputs = [out_dir / f"{stem}.png" for stem in output_stems([str(x) for x in names])]
    _check_no_overwrite(outputs, [src])

    batches = list(_batches(range(n), args.batch_size))
    with torch.inference_mode():
        for batch in _progress(batches, len(batches), "decoding"):
            raw = z[batch] / scaling + shift  # undo scale_latents with the file's own values
            images = vae.decode(raw.to(vae.device), **_tiling(args)).cpu()  # (B, 3, h*f, w*f)
            for i, image in zip(batch, images, strict=True):
                save_image(crop_to(image, sizes[i]) if sizes else image, outputs[i])
    print(f"wrote {n} images to {out_dir}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ reconstruct


def reconstruct_images(
    vae: AutoencoderKL,
    paths: Sequence[Path],
    outputs: Sequence[Path],
    batch_size: int,
    tile_size: int | None = None,
    max_memory: int | None = None,
) -> list[dict]:
    """Encodes and decodes each image, writes the 8-bit reconstruction, and scores it (PSNR/SSIM, and the
    bicubic x f down/up baseline) as written to disk."""
    f = vae.config.downsample_factor
    sizes = _image_sizes(paths)
    # Batch images of equal padded size; GroupNorm statistics are per image, so batching changes nothing.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(padded_size(size, f), []).append(i)
    batches = [b for idx in groups.values() for b in _batches(idx, batch_size)]
    rows: list[dict] = [{} for _ in paths]
    with torch.inference_mode():
        for batch in _progress(batches, len(batches), "reconstructing"):
            x = _load_batch([paths[i] for i in batch], f)  # (B, 3, H', W')
            z = vae.encode(x.to(vae.device), tile_size=tile_size, max_memory=max_memory).mode()
            recon = vae.decode(z, tile_size=tile_size, max_memory=max_memory).cpu()  # (B, 3, H', W')
            for i, xi, ri in zip(batch, x, recon, strict=True):
                original = crop_to(xi, sizes[i])
                # Scored as written to disk (8-bit), like the bicubic baseline.
                ri = round_to_8bit(crop_to(ri, sizes[i]))
                base = round_to_8bit(bicubic_baseline(original, f))
                save_image(ri, outputs[i])
                rows[i] = {
                    "source": str(paths[i]),
                    "output": outputs[i].name,
                    "size": list(sizes[i]),
                    "psnr": psnr(original, ri).item(),
                    "ssim": ssim(original, ri).item(),
                    "bicubic_psnr": psnr(original, base).item(),
                    "bicubic_ssim": ssim(original, base).item(),
                }
    return rows


def cmd_reconstruct(args: argparse.Namespace) -> int:
    out_dir = _output_dir(args.output)
    paths = collect_images(args.inputs)
    outputs = [out_dir / f"{stem}.png" for stem in output_stems([p.name for p in paths])]
    metrics_path = out_dir / "metrics.json"
    _check_no_overwrite([*outputs, metrics_path], paths)
    vae = _load_model(args)
    f = vae.config.downsample_factor
    rows = reconstruct_images(vae, paths, outputs, args.batch_size, **_tiling(args))
    keys = ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    report = {
        "model": str(args.model),
        "downsample_factor": f,
        "dtype": str(vae.dtype).removeprefix("torch."),
        "images": [{k: _json_number(v) for k, v in r.items()} for r in rows],
        "mean": {k: _json_number(v) for k, v in mean.items()},
    }
    write_json(report, metrics_path)
    _print_table(rows, mean, f)
    print(f"wrote {len(rows)} reconstruction(s) and {metrics_path.name} to {out_dir}", file=sys.stderr)
    return 0


def _json_number(v: object) -> object:
    # PSNR of an exact reconstruction is inf, which strict JSON cannot hold.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _print_table(rows: list[dict], mean: dict[str, float], f: int) -> None:
    width = max(12, *(len(r["output"]) for r in rows))
    head = (
        f"{'image':<{width}}  {'size':>11}  {'PSNR':>7}  {'SSIM':>6}  {f'bicubic x{f} PSNR':>17}  {'SSIM':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in [*rows, {"output": "mean", "size": None, **mean}]:
        size = "x".join(map(str, r["size"])) if r["size"] else ""
        print(
            f"{r['output']:<{width}}  {size:>11}  {r['psnr']:>7.2f}  {r['ssim']:>6.4f}  "
            f"{r['bicubic_psnr']:>17.2f}  {r['bicubic_ssim']:>6.4f}"
        )


# ------------------------------------------------------------------------------------------ convert / info


def cmd_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if args.to == "ldm":
        if dst.suffix != ".safetensors":
            raise CLIError(f"{dst}: an LDM single file must end in .safetensors")
        if dst.is_dir():
            raise CLIError(f"{dst}: is a directory")
        outputs = [dst]
    else:
        if dst.exists() and not dst.is_dir():
            raise CLIError(f"{dst}: exists and is not a directory")
        outputs = [dst / CONFIG_NAME, dst / WEIGHTS_NAME]
    if src.exists():
        _check_no_overwrite(outputs, _files_of(src))
    try:
        vae = AutoencoderKL.from_pretrained(src, dtype="fp32", config=args.config)
    except CheckpointError:
        raise
    except ValueError as e:  # a config built from shapes alone that the architecture rejects
        hint = "; pass --config with the model's config.json" if args.config is None and src.is_file() else ""
        raise CLIError(f"{src}: {_one_line(e)}{hint}") from None
    if args.to == "ldm":
        vae.save_single_file(dst, dtype=args.dtype)
    else:
        vae.save_pretrained(dst, dtype=args.dtype)
    print(f"wrote {args.to} {args.dtype} weights to {dst}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    vae = AutoencoderKL.from_pretrained(args.model, dtype="fp32")
    cfg = vae.config
    print(f"model: {args.model}")
    for field in dataclasses.fields(cfg):
        print(f"  {field.name}: {getattr(cfg, field.name)}")
    print(f"  downsample_factor: {cfg.downsample_factor}")

    def count(*modules: torch.nn.Module | None) -> int:
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())

    encoder, decoder = count(vae.encoder, vae.quant_conv), count(vae.post_quant_conv, vae.decoder)
    print("parameters:")
    print(f"  encoder: {encoder:,} (with quant_conv)")
    print(f"  decoder: {decoder:,} (with post_quant_conv)")
    print(f"  total:   {count(vae):,}")
    h, w = args.size or (cfg.sample_size, cfg.sample_size)
    ph, pw = padded_size((h, w), cfg.downsample_factor)
    padded = f" (image padded to {ph}x{pw})" if (ph, pw) != (h, w) else ""
    f = cfg.downsample_factor
    print(f"latent shape for a {h}x{w} image: ({cfg.latent_channels}, {ph // f}, {pw // f}){padded}")
    return 0


# ------------------------------------------------------------------------------------------ latent diffusion
# These commands import their modules when they run: diffusers takes seconds to import, the others never need it.


def cmd_cache_latents(args: argparse.Namespace) -> int:
    from .latents import cache_latents
    from .training.data import readable

    data_dir, out_dir = Path(args.data_dir), Path(args.output)
    if not data_dir.is_dir():
        raise CLIError(f"{data_dir}: {'is a file' if data_dir.exists() else 'no such directory'}")
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"{out_dir}: exists and is not a directory")
    paths = collect_images([data_dir])
    # Headers only, so a bad file fails in seconds rather than after hours of encoding.
    _, bad = readable(_progress(paths, len(paths), "checking"))
    if bad:
        raise CLIError(
            f"{bad[0][0]}: not a readable image ({bad[0][1]}); {len(bad)} such file(s) in {data_dir}"
        )
    if _device(args.device).type == "cuda":  # one GPU per process under `accelerate launch`
        from accelerate import PartialState

        args.device = str(PartialState().device)
    torch.manual_seed(0)  # a random-init preset is then the same model in every process and on every rerun
    vae = _load_model(args)
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


def write_samples(
    vae: AutoencoderKL,
    unet: torch.nn.Module,
    scheduler: object,
    out_dir: Path,
    num: int,
    steps: int,
    seed: int,
    eta: float = 0.0,
    batch_size: int = 16,
) -> list[Path]:
    """Samples ``num`` latents, decodes them, writes ``sample-NNNNN.png`` and ``grid.png``; returns the files."""
    from torchvision.utils import make_grid

    from .ldm import decode_latents, sample_latents

    generator = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    # All initial noise in one draw, as LDMPipeline(batch_size=n, generator=...) draws it.
    noise = torch.randn(num, c, s, s, generator=generator)  # (n, C, s, s)
    images, files = [], []
    for batch in _batches(range(num), batch_size):
        z = sample_latents(
            unet, scheduler, len(batch), steps, generator, eta, noise=noise[batch], progress=True
        )
        for i, image in zip(batch, decode_latents(vae, z).cpu(), strict=True):
            files.append(save_image(image, out_dir / f"sample-{i:05d}.png"))
            images.append(image)
    grid = make_grid(torch.stack(images), nrow=max(1, round(num**0.5)), padding=2, pad_value=1.0)
    save_image(grid, out_dir / "grid.png")
    return files


def cmd_sample(args: argparse.Namespace) -> int:
    from .ldm import load_pipeline, sampling_scheduler

    out_dir = _output_dir(args.output)
    device = _device(args.device)
    vae, unet, scheduler = load_pipeline(args.pipeline, device)
    scheduler = sampling_scheduler(scheduler, args.scheduler)
    write_samples(vae, unet, scheduler, out_dir, args.num, args.steps, args.seed, args.eta, args.batch_size)
    print(f"wrote {args.num} samples and grid.png to {out_dir}", file=sys.stderr)
    return 0


def cmd_ldm_eval(args: argparse.Namespace) -> int:
    from .latents import LatentDataset, held_out_split
    from .ldm import gaussian_bits_per_dim, load_pipeline, sampling_scheduler, vlb_bits_per_dim

    vae, unet, scheduler = load_pipeline(args.pipeline, _device(args.device))
    data = LatentDataset(args.latents)
    if args.last is not None:
        try:
            data = LatentDataset(args.latents, held_out_split(data.manifest, args.last)[1])
        except ValueError as e:
            raise CLIError(f"--last {args.last}: {e}") from None
    if not math.isclose(vae.config.scaling_factor, data.scale, rel_tol=1e-5) or data.shift:
        raise CLIError(
            f"{args.pipeline}: its VAE scales latents by {vae.config.scaling_factor}, the cache by {data.scale} "
            f"(shift {data.shift}): the UNet was not trained on these latents"
        )
    z = data.fixed_samples(args.seed)  # (N, C, h, w), diffusion-ready
    if tuple(z.shape[1:]) != (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size):
        raise CLIError(
            f"latents of shape {tuple(z.shape[1:])} do not fit the UNet ({unet.config.sample_size} px)"
        )
    noise = sampling_scheduler(scheduler, "ddpm")  # the training betas and variances
    generator = torch.Generator().manual_seed(args.seed)
    timesteps = args.timesteps or None
    parts: dict[str, list[Tensor]] = {}
    batches = list(_batches(range(len(z)), args.batch_size))
    for batch in _progress(batches, len(batches), "bound"):
        for key, value in vlb_bits_per_dim(unet, noise, z[batch], timesteps, generator).items():
            parts.setdefault(key, []).append(value)
    mean = {k: torch.cat(v).mean().item() for k, v in parts.items()}
    how = "all timesteps" if timesteps is None else f"{timesteps} importance-sampled timesteps"
    print(
        f"{len(z)} latents ({'x'.join(map(str, z.shape[1:]))}) of {args.latents}, posterior samples (seed {args.seed})"
    )
    rows = [
        ("DDPM variational bound (continuous)", mean["total"]),
        ("  L_T (prior term)", mean["prior"]),
        (f"  sum of L_t-1 ({how})", mean["diffusion"]),
        ("  L_0 (Gaussian decoder term)", mean["decoder"]),
        ("N(0, I) prior NLL", gaussian_bits_per_dim(z).mean().item()),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'':<{width}}  {'bits/dim':>9}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>9.4f}")
    return 0


# ------------------------------------------------------------------------------------------ parser


ENCODE_DETAILS = (
    "Writes one (N, C, h, w) 'latents' tensor, scaled for diffusion, with the source names and sizes as "
    "metadata. Images are padded to the model's multiple; all must pad to the same size."
)
DECODE_DETAILS = "One PNG per latent, named after its source image and cropped to its original size."
RECONSTRUCT_DETAILS = (
    "Writes the reconstructions (PNG) and metrics.json with per-image and mean PSNR/SSIM, and those of a "
    "bicubic down/up baseline by the model's downsampling factor."
)
CONVERT_DETAILS = (
    "Reads anything from_pretrained reads; writes a diffusers folder (save_pretrained) or a .safetensors "
    "file with original LDM names."
)
CACHE_DETAILS = (
    "Center-crops each image to RESOLUTION (with --views V, adds V - 1 random crops and mirror images), "
    "encodes it and stores the posterior mean and std in shard-NNNNN.safetensors files plus latents.json "
    "with the latent scale (1 / std of posterior samples). "
    "Rerunning skips finished shards; under `accelerate launch -m ldm_vae.cli` processes share the shards."
)
SAMPLE_DETAILS = (
    "Writes sample-NNNNN.png and grid.png; DDIM with eta 0 gives the same images for any --batch-size."
)
EVAL_DETAILS = (
    "DDPM's bound with a continuous Gaussian decoder term (a bound on differential entropy, so it can be "
    "negative), next to the same latents' NLL under N(0, I)."
)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    out_dir = _output_dir(args.output)
    summary = run_demo(out_dir, args.pipeline, args.dtype, args.num, args.steps, args.seed)
    print(
        f"wrote the report to {out_dir / 'report.html'} ({summary['seconds']} s): "
        f"mean PSNR {summary['mean']['psnr']:.2f} dB vs bicubic {summary['mean']['bicubic_psnr']:.2f} dB",
        file=sys.stderr,
    )
    return 0


def _byte_size(text: str) -> int:
    """'2.5GB' (10**9), '2.5G' or '2.5GiB' (2**30), '800M', '64K' or a plain number of bytes."""
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument(
        "--model",
        required=True,
        help="preset (sd, sdxl, flux, tiny: random init), 'demo' (shipped weights), a diffusers folder, or an "
        "LDM/SD .safetensors/.ckpt file",
    )
    run.add_argument("--device", default="cpu", help="torch device (default: cpu)")
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
        default=None,
        metavar="SIZE",
        help="exact tiling within this activation memory, e.g. 2.5GB (10^9) or 2.5GiB (2^30) (picks --tile-size if not given)",
    )

    parser = argparse.ArgumentParser(
        prog="ldm-vae",
        description="Latent-diffusion autoencoders: encode, decode, reconstruct, convert; cache latents, sample.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        func: Callable[[argparse.Namespace], int], summary: str, details: str = "", model: bool = True
    ) -> argparse.ArgumentParser:
        name = func.__name__.removeprefix("cmd_").replace("_", "-")
        parents = [common, run] if model else [common]
        p = sub.add_parser(name, parents=parents, help=summary, description=f"{summary}. {details}".strip())
        p.set_defaults(func=func)
        return p

    p = command(cmd_encode, "images -> diffusion-ready latents (.safetensors)", ENCODE_DETAILS)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    p.add_argument("--sample", action="store_true", help="sample the posterior (default: its mode)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")

    p = command(cmd_decode, "latents (.safetensors) -> PNG images", DECODE_DETAILS)
    p.add_argument("latents", metavar="LATENTS.safetensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")

    p = command(cmd_reconstruct, "encode + decode images, scored with PSNR/SSIM", RECONSTRUCT_DETAILS)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")

    p = command(
        cmd_convert, "checkpoint -> diffusers folder or LDM single file", CONVERT_DETAILS, model=False
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", choices=("diffusers", "ldm"), required=True)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument(
        "--config",
        help="for a single-file SRC: config.json or diffusers folder giving what tensor shapes cannot "
        "(norm_num_groups, scaling_factor, ...); default: inferred, with SD's values for the rest",
    )

    p = command(
        cmd_cache_latents, "image folder -> sharded posterior latents for diffusion training", CACHE_DETAILS
    )
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

    p = command(cmd_sample, "sample a latent-diffusion pipeline to PNG images", SAMPLE_DETAILS, model=False)
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

    p = command(
        cmd_demo,
        "the one-command demo on the shipped weights",
        "Reconstructs scikit-image's photos (PSNR/SSIM against bicubic), encodes them, samples the latent DDPM, "
        "and writes report.html.",
        model=False,
    )
    p.add_argument("-o", "--output", default="demo-output", metavar="OUT_DIR", help="default: demo-output/")
    p.add_argument("--pipeline", default=None, metavar="DIR", help="default: the shipped weights/demo")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="autoencoder dtype (default auto)")
    p.add_argument("-n", "--num", type=_positive_int, default=16, help="samples (default 16)")
    p.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    p = command(
        cmd_ldm_eval,
        "variational bound of a pipeline on cached latents, in bits/dim",
        EVAL_DETAILS,
        model=False,
    )
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

    p = command(cmd_info, "config, parameter counts and latent shape of a model", model=False)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--size", nargs=2, type=_positive_int, metavar=("H", "W"), help="image size for the shape")
    return parser


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``ldm-vae``; returns the exit code (argparse exits 2 itself on usage errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    # ValueError covers ImageError, CheckpointError, CLIError and the models' input checks.
    except (ValueError, OSError, MemoryError, torch.OutOfMemoryError) as e:
        if args.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
