"""Latent caching for latent diffusion: an image folder -> the KL posterior N(mean, std^2) of every image, in
sharded safetensors, plus the latent scale of Latent Diffusion's ``scale_by_std``.

Caching the posterior rather than one sample lets training draw a fresh z = mean + std * eps every epoch, as
training on the fly would (Rombach et al., 2022, Sec. 3 and App. G). The scale is LDM's: 1 / std of sampled
latents over the cached set, so the diffusion model sees unit-variance data ``(z - shift) * scale``. With
``views`` > 1 each image also gives random crops and mirror images (the augmentation LDM trains with on the fly),
which a few hundred photos need: a DDPM trained on one latent per photo memorizes them and, on held-out
latents, predicts the noise at small t worse than predicting zero.

Layout of a cache folder::

    shard-00000.safetensors  mean, std: (n, C, h, w) float32; metadata: names (JSON list), fingerprint,
                             settings, images (name, SHA-256) of its items
    shard-00001.safetensors  ...
    latents.json             manifest: shards, model, resolution, views, scale, shift, fingerprint, settings,
                             images (written last)

The fingerprint covers everything the latents depend on: every image file's bytes (SHA-256), the weights, the
model config, the compute dtype and memory layout, the tiling, resolution, shard size, views, seed and the
cache format. Shards are written atomically and skipped on a rerun with the same fingerprint, so an interrupted
run resumes; a rerun with another one is refused, saying what changed, and readers refuse shards the manifest's
fingerprint does not vouch for. Under
``accelerate launch`` process r of k encodes shards r, r + k, r + 2k, ...; the main process writes the manifest
once all have finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from .autoencoder_kl import AutoencoderKL
from .checkpoint import CheckpointError, read_state_dict
from .images import center_crop, load_image, resize_short_side
from .io import write_json, write_safetensors
from .seeds import mix_seed
from .tiling import MaxMemory

MANIFEST_NAME = "latents.json"
FORMAT = "ldm-vae-latents/2"  # 2: image content hashes, dtype, layout and tiling in the fingerprint


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ------------------------------------------------------------------------------------------- planning


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """Item indices of each shard: consecutive runs of ``shard_size`` (the last one shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    return [range(i, min(i + shard_size, num_items)) for i in range(0, num_items, shard_size)]


def shards_of_process(num_shards: int, rank: int, world: int) -> list[int]:
    """The shards process ``rank`` of ``world`` encodes: every ``world``-th, starting at ``rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return list(range(rank, num_shards, world))


def prepare_image(path: str | os.PathLike, resolution: int, view: int = 0, seed: int = 0) -> Tensor:
    """An image file -> (3, resolution, resolution) in [-1, 1].

    View 0 is LDM's preprocessing for unconditional models: the short side resized to ``resolution``, then the
    center square. Views 1, 2, ... are augmentations drawn from ``seed``, like the random crops the autoencoder
    trains on: the short side resized to a random size between ``resolution`` and its own, a random square of
    that, mirrored half the time.
    """
    x = load_image(path)  # (3, H, W)
    if view == 0:
        return center_crop(resize_short_side(x, resolution), resolution)
    rng = np.random.default_rng(seed)
    short = int(rng.integers(resolution, max(resolution, min(x.shape[-2:])) + 1))
    x = resize_short_side(x, short)  # (3, H', W'), short side in [resolution, min(H, W)]
    h, w = x.shape[-2:]
    top, left = int(rng.integers(h - resolution + 1)), int(rng.integers(w - resolution + 1))
    x = x[:, top : top + resolution, left : left + resolution]
    return (x.flip(-1) if rng.random() < 0.5 else x).contiguous()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_settings(
    vae: AutoencoderKL,
    resolution: int,
    shard_size: int,
    views: int = 1,
    seed: int = 0,
    tile_size: int | None = None,
    max_memory: MaxMemory = None,
) -> dict[str, Any]:
    """Everything besides the images that a cache's latents depend on, as JSON values."""
    weights = safetensors_bytes({k: v.float().contiguous() for k, v in vae.state_dict().items()})
    settings = {
        "format": FORMAT,
        "weights": hashlib.sha256(weights).hexdigest(),
        "model_config": vae.config.to_diffusers(),
        # Precision and layout change the rounding of every latent, so a resumed cache must not mix them.
        "dtype": str(vae.dtype).removeprefix("torch."),
        "memory_format": str(getattr(vae, "memory_format", torch.contiguous_format)).removeprefix("torch."),
        "tile_size": tile_size,
        "max_memory": max_memory,
        "resolution": resolution,
        "shard_size": shard_size,
        "views": views,
        "seed": seed,
    }
    # As the manifest stores them (tuples become lists), so settings read back compare equal to these.
    return json.loads(json.dumps(settings))


def check_views(factor: int, num_files: int, resolution: int, views: int) -> None:
    """Raises ValueError (one line) unless ``views`` crops of ``resolution`` px of ``num_files`` images can be
    encoded by a model that downsamples by ``factor``."""
    if resolution < factor or resolution % factor:
        raise ValueError(f"resolution {resolution} is not a positive multiple of the model's factor {factor}")
    if not num_files:
        raise ValueError("no images to encode")
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")


def cache_fingerprint(settings: dict[str, Any], images: Sequence[Sequence[str]]) -> str:
    """SHA-256 of a cache's settings and its (name, content SHA-256) images: equal fingerprints, equal latents."""
    key = json.dumps({"settings": settings, "images": [list(i) for i in images]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


# How a changed setting is named; "{old}" is the cache's value, "{new}" this run's.
_CHANGES = {
    "format": "written in latent format {old}, this run writes {new}",
    "dtype": "computed in {old}, this run computes in {new}",
    "memory_format": "computed in {old} layout, this run in {new}",
    "weights": "encoded by other weights",
    "model_config": "encoded by a model of another config",
    "tile_size": "encoded with tile size {old}, this run with {new}",
    "max_memory": "encoded with max memory {old}, this run with {new}",
    "resolution": "encoded at resolution {old}, this run at {new}",
    "shard_size": "written in shards of {old} latents, this run in shards of {new}",
    "views": "{old} view(s) per image, this run {new}",
    "seed": "views drawn with seed {old}, this run with seed {new}",
}


def _image_changes(old: Sequence[Sequence[str]], new: Sequence[Sequence[str]]) -> str:
    """What differs between two (name, sha256) lists, e.g. "a/img03.png changed"; "" if nothing."""
    before, after = dict(map(tuple, old)), dict(map(tuple, new))
    changed = [n for n in after if n in before and before[n] != after[n]]
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    parts = []
    for names, how in ((changed, "changed"), (added, "added"), (removed, "removed")):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{', '.join(names[:3])}{more} {how}")
    if not parts and [n for n, _ in old] != [n for n, _ in new]:
        parts.append("images in another order")
    return ", ".join(parts)


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def describe_change(
    old: dict[str, Any],
    new: dict[str, Any],
    old_images: Sequence[Sequence[str]] | None = None,
    new_images: Sequence[Sequence[str]] | None = None,
    elsewhere: str = "",
) -> str:
    """What made a cache's settings and images ``old`` differ from this run's ``new``, in words.

    Args:
        elsewhere: what to say when the settings and the images compared are the same (the change lies in
            images not compared, e.g. those of other shards).
    """
    changes = [
        _CHANGES[k].format(old=_shown(old.get(k)), new=_shown(new[k]))
        for k in _CHANGES
        if old.get(k) != new[k]
        # Weights cast to another dtype hash differently, and the layout follows the dtype: the dtype says it all.
        and not (k in ("weights", "memory_format") and old.get("dtype") != new["dtype"])
    ]
    if not changes and old_images is not None and new_images is not None:
        images = _image_changes(old_images, new_images) or elsewhere
        changes.append(f"latents of another image set ({images})" if images else "")
    return "; ".join(c for c in changes if c) or "latents of another model, image set or settings"


# ------------------------------------------------------------------------------------------- writing


def _shard_header(path: Path) -> dict[str, str] | None:
    """The metadata of a readable shard, or None for a file that cannot be read as one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if {"mean", "std"} - set(f.keys()):
                return None
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return None


@dataclass(frozen=True)
class CacheKey:
    """What a cache's latents depend on, and its fingerprint (:func:`cache_fingerprint`) for the equality check."""

    settings: dict[str, Any]
    images: list[list[str]]  # [name, SHA-256 of the file's bytes] per image, in item order
    fingerprint: str

    @classmethod
    def of(cls, settings: dict[str, Any], images: list[list[str]]) -> CacheKey:
        return cls(settings, images, cache_fingerprint(settings, images))

    def images_of(self, items: range) -> list[list[str]]:
        """The images a shard's ``items`` are views of."""
        views = self.settings["views"]
        return self.images[items.start // views : (items.stop - 1) // views + 1]


REWRITE = "write to a new folder or delete this one"  # advice when cache-latents finds another cache
RECACHE = "re-run cache-latents into a new folder"  # advice when a reader finds a cache it cannot trust
OLD_FORMAT = "written by an older ldm-vae, without image content hashes"
ELSEWHERE = "images outside this shard changed, added or removed"


def _shard_mismatch(header: dict[str, str], key: CacheKey, items: range) -> str | None:
    """Why a shard (its metadata ``header``, holding ``items``) is not of the cache ``key``; None if it is."""
    if header.get("fingerprint") == key.fingerprint:
        return None
    try:
        settings, images = json.loads(header["settings"]), json.loads(header["images"])
    except (KeyError, TypeError, json.JSONDecodeError):
        return OLD_FORMAT
    return describe_change(settings, key.settings, images, key.images_of(items), ELSEWHERE)


def _done_shards(out_dir: Path, key: CacheKey, shards: Sequence[range]) -> set[int]:
    """The shards of this cache already written; raises if any is of another cache (nothing is overwritten).

    A changed image makes every shard mismatch, but only the shard holding it can name it: that one is reported.
    """
    done, refused = set(), []
    for i, items in enumerate(shards):
        path = out_dir / shard_name(i)
        header = _shard_header(path) if path.is_file() else None
        if header is None:
            continue  # missing, or unreadable (e.g. a copy cut short): (re)computed
        reason = _shard_mismatch(header, key, items)
        if reason is None:
            done.add(i)
        else:
            refused.append((path, reason))
    if refused:
        path, reason = next((r for r in refused if ELSEWHERE not in r[1]), refused[0])
        raise CheckpointError(f"{path}: {reason}; {RECACHE if reason == OLD_FORMAT else REWRITE}")
    return done


def cache_latents(
    vae: AutoencoderKL,
    files: Sequence[Path],
    out_dir: str | os.PathLike,
    *,
    root: str | os.PathLike,
    resolution: int = 256,
    batch_size: int = 8,
    shard_size: int = 1000,
    model_name: str = "",
    tile_size: int | None = None,
    max_memory: MaxMemory = None,
    views: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Encodes ``files`` into ``out_dir`` (see the module docstring); skips shards already done.

    Call it on every process of an Accelerate launch (or in a single process without one).

    Args:
        vae: the autoencoder, in eval mode, on its device.
        files: the images, in a fixed order (the same on every process).
        out_dir: the cache folder (created).
        root: the folder names are recorded relative to.
        resolution: square image size; a multiple of the VAE's downsampling factor.
        batch_size: images per encoder pass.
        shard_size: latents per shard.
        model_name: how the model was named (recorded in the manifest).
        tile_size, max_memory: exact tiled encoding: tile edge in pixels, or the activation bytes that pick it.
        views: latents per image: view 0 is the center crop, the others random crops and flips
            (:func:`prepare_image`), so a small image set gives the diffusion model more to learn from. Item
            ``k`` is view ``k % views`` of image ``k // views``.
        seed: draws the random views.
        progress: show a progress bar (main process, interactive stderr only).

    Returns:
        The manifest on the main process, None on the others.

    Raises:
        CheckpointError: ``out_dir`` holds latents of other images or settings (one line saying what changed).
    """
    from accelerate import PartialState

    # FLUX.2's latents are used in 2x2 patches (stats reads them so): its resolution is a multiple of 16.
    check_views(vae.config.diffusion_downsample_factor, len(files), resolution, views)
    out_dir = Path(out_dir)
    state = PartialState(cpu=vae.device.type == "cpu")  # cpu: gloo ranks under `accelerate launch`
    quiet = None if progress and state.is_local_main_process else True
    names = [
        Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else Path(p).name for p in files
    ]
    # Contents, not names or mtimes: a photo replaced under its name (even with its mtime restored) is caught.
    hashes = [
        file_sha256(p) for p in tqdm(files, "hashing images", unit="img", file=sys.stderr, disable=quiet)
    ]
    settings = cache_settings(vae, resolution, shard_size, views, seed, tile_size, max_memory)
    key = CacheKey.of(settings, [[n, h] for n, h in zip(names, hashes, strict=True)])
    _check_manifest(out_dir, key)
    shards = shard_ranges(len(files) * views, shard_size)
    # Every process checks every shard, so a foreign cache fails everywhere before anything is written.
    done = _done_shards(out_dir, key, shards)
    mine = [
        i for i in shards_of_process(len(shards), state.process_index, state.num_processes) if i not in done
    ]
    bar = tqdm(
        total=sum(len(shards[i]) for i in mine),
        desc="caching latents",
        unit="img",
        file=sys.stderr,
        disable=quiet,
    )
    with torch.inference_mode():
        for i in mine:
            means, stds = [], []
            items = shards[i]
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                x = torch.stack(  # (B, 3, R, R)
                    [
                        prepare_image(files[k // views], resolution, k % views, mix_seed(seed, k))
                        for k in batch
                    ]
                )
                # over (B, C, R/f, R/f)
                posterior = vae.encode(x.to(vae.device), tile_size=tile_size, max_memory=max_memory)
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
                bar.update(len(batch))
            metadata = {
                "names": json.dumps(
                    [names[k // views] + (f"#{k % views}" if k % views else "") for k in items]
                ),
                "fingerprint": key.fingerprint,
                # What the fingerprint covers, so a rerun without the manifest can say what changed.
                "settings": json.dumps(settings),
                "images": json.dumps(key.images_of(items)),
                "process": f"{state.process_index}/{state.num_processes}",  # which process wrote it
            }
            write_safetensors(
                {"mean": torch.cat(means), "std": torch.cat(stds)}, out_dir / shard_name(i), metadata
            )
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    manifest = _manifest(vae, out_dir, shards, key, model_name)
    write_json(manifest, out_dir / MANIFEST_NAME)
    return manifest


def _check_manifest(out_dir: Path, key: CacheKey) -> None:
    """Raises unless ``out_dir`` has no manifest or the manifest of this very cache."""
    if not (out_dir / MANIFEST_NAME).is_file():
        return
    manifest = read_manifest(out_dir)  # refuses older formats and manifests edited out of their fingerprint
    if manifest["fingerprint"] != key.fingerprint:
        reason = describe_change(manifest["settings"], key.settings, manifest["images"], key.images)
        raise CheckpointError(f"{out_dir}: {reason}; {REWRITE}")


def latent_moments(means: Sequence[Tensor], stds: Sequence[Tensor]) -> tuple[float, float]:
    """(mean, std) over every element of the sampled latents z = mean + std * eps, in closed form.

    E[z] = avg(mean) and E[z^2] = avg(mean^2 + std^2), so the std is the one an infinite number of posterior
    samples would give (LDM estimates it from one sampled batch). Sums run in float64 across shards.
    """
    n, s1, s2 = 0, 0.0, 0.0
    for mu, sigma in zip(means, stds, strict=True):
        mu, sigma = mu.double(), sigma.double()
        n += mu.numel()
        s1 += mu.sum().item()
        s2 += (mu.square() + sigma.square()).sum().item()
    mean = s1 / n
    return mean, math.sqrt(max(s2 / n - mean * mean, 0.0))


def _manifest(
    vae: AutoencoderKL,
    out_dir: Path,
    shards: list[range],
    key: CacheKey,
    model: str,
) -> dict[str, Any]:
    """Reads every shard back (all processes' work) and describes the cache."""
    means, stds, entries = [], [], []
    done = _done_shards(out_dir, key, shards)
    for i, items in enumerate(shards):
        path = out_dir / shard_name(i)
        if i not in done:
            raise CheckpointError(f"{path}: missing after encoding (did a process fail?)")
        tensors = read_state_dict(path)
        if len(tensors["mean"]) != len(items):
            raise CheckpointError(f"{path}: holds {len(tensors['mean'])} latents, expected {len(items)}")
        means.append(tensors["mean"])
        stds.append(tensors["std"])
        entries.append({"file": path.name, "count": len(items)})
    mean, std = latent_moments(means, stds)
    if not std > 0:
        raise ValueError("the cached latents have zero variance: cannot compute a latent scale")
    return {
        "format": FORMAT,
        "model": model,
        "fingerprint": key.fingerprint,
        "resolution": key.settings["resolution"],
        "latent_shape": list(means[0].shape[1:]),
        "num_items": sum(e["count"] for e in entries),
        "views": key.settings[
            "views"
        ],  # item k is view k % views of image k // views (view 0: the center crop)
        "shards": entries,
        # LDM's scale_by_std: the DDPM trains on (z - shift) * scale, z sampled from the posterior.
        "scale": 1.0 / std,
        "shift": getattr(vae.config, "shift_factor", None) or 0.0,
        "latent_mean": mean,
        "latent_std": std,
        "scale_method": "1 / std of posterior samples z = mean + std * eps over all cached elements (closed form)",
        "vae_scaling_factor": getattr(vae.config, "scaling_factor", None),  # None: FLUX.2 (per channel)
        # What the fingerprint covers: a rerun compares them to say what changed.
        "settings": key.settings,
        "images": key.images,
    }


# ------------------------------------------------------------------------------------------- reading


def read_manifest(latent_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished cache; a one-line CheckpointError otherwise."""
    path = Path(latent_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{latent_dir}: no {MANIFEST_NAME} (not a latent cache, or caching did not finish)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("ldm-vae-latents/"):
        raise CheckpointError(f"{path}: not an ldm-vae latent manifest ({FORMAT})")
    if fmt == "ldm-vae-latents/1":
        raise CheckpointError(f"{path}: {OLD_FORMAT} ({fmt}); {RECACHE}")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: latent format {fmt}, this ldm-vae reads {FORMAT}; {RECACHE}")
    try:
        intact = cache_fingerprint(manifest["settings"], manifest["images"]) == manifest["fingerprint"]
    except (KeyError, TypeError):
        intact = False
    if not intact:
        raise CheckpointError(f"{path}: its fingerprint does not match its settings and images; {RECACHE}")
    return manifest


def _manifest_key(manifest: dict[str, Any]) -> CacheKey:
    return CacheKey(manifest["settings"], manifest["images"], manifest["fingerprint"])


def held_out_split(manifest: dict[str, Any], num_val: int) -> tuple[range, range]:
    """(training, held-out) item indices of a cache: the held-out ones are the center crops (view 0) of its last
    ``num_val`` images, and none of those images' views are trained on.

    Raises:
        ValueError: ``num_val`` not in [0, number of images).
    """
    views = manifest.get("views", 1)
    n = manifest["num_items"] // views  # images
    if not 0 <= num_val < n:
        raise ValueError(f"{num_val} held-out images: must be in [0, {n}) for a cache of {n} images")
    return range((n - num_val) * views), range((n - num_val) * views, n * views, views)


class LatentDataset(Dataset):
    """Diffusion-ready latents ``(z - shift) * scale`` from a cache folder, all held in memory.

    An item is an index, or an ``(index, seed)`` pair as :class:`~ldm_vae.training.EpochSampler` yields: then
    z = mean + std * eps with eps drawn from a generator seeded by ``seed``, so a resumed run draws the same
    latents. With ``sample=False`` z is the posterior mean.

    Args:
        latent_dir: a finished cache (with its manifest).
        indices: the items to use (e.g. all but a held-out tail); default all.
        sample: sample the posterior (training) or take its mean.
    """

    def __init__(
        self, latent_dir: str | os.PathLike, indices: Sequence[int] | None = None, sample: bool = True
    ):
        self.manifest = read_manifest(latent_dir)
        key = _manifest_key(self.manifest)
        means, stds, names = [], [], []
        start = 0
        for entry in self.manifest["shards"]:
            path = Path(latent_dir) / entry["file"]
            items, start = range(start, start + entry["count"]), start + entry["count"]
            tensors = read_state_dict(path)
            header = _shard_header(path) or {}
            # Only latents the manifest's fingerprint vouches for are trained on.
            reason = _shard_mismatch(header, key, items)
            if reason is None and len(tensors["mean"]) != entry["count"]:
                reason = f"holds {len(tensors['mean'])} latents, the manifest says {entry['count']}"
            if reason is not None:
                raise CheckpointError(f"{path}: does not match {MANIFEST_NAME} ({reason}); {RECACHE}")
            means.append(tensors["mean"])
            stds.append(tensors["std"])
            names += json.loads(header["names"])
        mean, std = torch.cat(means), torch.cat(stds)  # (N, C, h, w) each
        index = (
            torch.arange(len(mean)) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        )
        self.mean, self.std = mean[index], std[index]
        self.names = [names[i] for i in index.tolist()]
        self.scale, self.shift = float(self.manifest["scale"]), float(self.manifest["shift"])
        self.sample = sample

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, item: int | tuple[int, int]) -> Tensor:
        index, seed = item if isinstance(item, tuple) else (item, None)
        z = self.mean[index]  # (C, h, w)
        if self.sample:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            z = z + self.std[index] * torch.randn(z.shape, generator=generator)
        return (z - self.shift) * self.scale

    def fixed_samples(self, seed: int) -> Tensor:
        """Every item (N, C, h, w), posterior samples seeded by (seed, position): a fixed evaluation set."""
        if not len(self):
            return torch.empty(0, *self.mean.shape[1:])
        return torch.stack([self[(i, mix_seed(seed, i))] for i in range(len(self))])

    def fixed_draws(self, seed: int, draws: int = 4) -> Tensor:
        """``draws`` posterior samples of every item (draws * N, C, h, w), seeded apart from
        :meth:`fixed_samples` (seeds ``mix_seed(seed, 1 + k)``): the training data Gaussian baselines are
        fitted to (:func:`ldm_vae.ldm.gaussian_baselines`)."""
        return torch.cat([self.fixed_samples(mix_seed(seed, 1 + k)) for k in range(draws)])
