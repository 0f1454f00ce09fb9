"""VQ autoencoder (VQGAN, Esser et al., 2021; van den Oord et al., 2017) on the same Encoder/Decoder as the KL model.

Quantizer loss (VQ-VAE eq. 3): ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 with the straight-through estimator
z_q = z + sg[e - z]. taming's historical "legacy" placement puts beta on the codebook term instead.
EMA codebook updates follow VQ-VAE App. A.1; dead codes are re-seeded from current encoder outputs
(Dhariwal et al., 2020, Jukebox Sec. 3.2). Latent Diffusion's index remapping (taming's ``VectorQuantizer2``,
``remap``/``unknown_index``) renumbers the codes in a ``used`` list; it changes the reported indices only, never
the quantized latents.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import checkpoint as ckpt
from .checks import check_indices, check_input, check_shape, is_integer
from .config import VQ_PRESETS, VQConfig
from .interface import LatentTransform, decode_views
from .modules import Decoder, Encoder
from .pretrained import PretrainedMixin
from .tiling import MaxMemory, tiled_forward


@dataclass
class VQInfo:
    """What the quantizer reports for one batch: the VQ model's :class:`~ldm_vae.interface.Regularization`
    (taming's recipe weights ``loss`` and averages the reconstruction term over every element)."""

    name: ClassVar[str] = "codebook"
    pixel_reduction: ClassVar[Literal["sum", "mean"]] = "mean"

    indices: Tensor  # (B, h, w) long: code index per latent position (a position in ``used`` under a remap)
    loss: Tensor  # scalar: codebook + commitment terms, beta already applied
    codebook_loss: (
        Tensor  # scalar: ||sg[z] - e||^2 (0 under EMA updates, where no gradient trains the codebook)
    )
    commitment_loss: Tensor  # scalar: ||z - sg[e]||^2 (unweighted)
    # 0-d detached tensors, not floats: reading them back is a host sync the training step does not wait on.
    usage: Tensor  # fraction of the codebook used in this batch
    perplexity: Tensor  # exp(entropy of code usage); = number of codes when used uniformly

    def regularization_loss(self) -> Tensor:
        return self.loss.mean()

    def logs(self) -> dict[str, Tensor]:
        loss = self.regularization_loss().detach().float()
        as_log = {"dtype": torch.float32, "device": loss.device}
        return {
            "codebook": loss,
            "code_usage": torch.as_tensor(self.usage, **as_log).detach(),
            "perplexity": torch.as_tensor(self.perplexity, **as_log).detach(),
        }


def _all_reduce_sum(t: Tensor) -> Tensor:
    # EMA statistics and restarts must agree across data-parallel ranks, or the codebooks drift apart.
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with straight-through gradients.

    ``embedding.weight`` is diffusers' ``quantize.embedding.weight``. EMA statistics are buffers that exist only
    when EMA updates are on; they are training state, never exported. With ``num_used_codes``, the ``used``
    buffer (VectorQuantizer2's, exported) renumbers the reported indices: index i stands for codebook row
    ``used[i]``.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        legacy: bool = False,
        l2_normalize: bool = False,
        ema_decay: float | None = None,
        restart_dead_codes: bool = False,
        dead_threshold: float = 0.01,
        num_used_codes: int | None = None,
        unknown_index: str | int = "random",
    ) -> None:
        super().__init__()
        self.num_codes, self.dim, self.beta, self.legacy = num_codes, dim, beta, legacy
        self.l2_normalize, self.ema_decay = l2_normalize, ema_decay
        self.restart_dead_codes, self.dead_threshold = restart_dead_codes, dead_threshold
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)  # taming's init
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(num_codes))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if restart_dead_codes:
            # Running fraction of assignments per code, starting uniform; a code whose share decays below
            # dead_threshold / num_codes (about 460 steps unused at decay 0.99) is dead.
            self.register_buffer("ema_usage", torch.full((num_codes,), 1.0 / num_codes))
        # Persistent, so checkpoints carry it as the original's; the first rows until a checkpoint sets it.
        self.used: Tensor | None
        self.register_buffer("used", None if num_used_codes is None else torch.arange(num_used_codes))
        self.unknown_index = unknown_index

    def codebook(self, weight: Tensor | None = None) -> Tensor:
        """The code vectors (num_codes, dim): ``weight`` (default ``embedding.weight``), unit-normalized if set."""
        e = self.embedding.weight if weight is None else weight
        return F.normalize(e, dim=1) if self.l2_normalize else e

    @property
    def num_indices(self) -> int:
        """How many distinct indices ``forward`` reports and ``lookup`` takes (VectorQuantizer2's ``re_embed``)."""
        if self.used is None:
            return self.num_codes
        return self.used.shape[0] + (self.unknown_index == "extra")

    def remap(self, rows: Tensor) -> Tensor:
        """Codebook rows -> model indices (VectorQuantizer2.remap_to_used): the first position of each row in
        ``used``; a row not in it gets ``unknown_index``. The identity without ``used``."""
        if self.used is None:
            return rows
        u = self.used.shape[0]
        # A (num_codes,) table of first positions (u: absent), not the original's (N, u) match matrix.
        positions = torch.arange(u, device=rows.device)
        first = rows.new_full((self.num_codes,), u).scatter_reduce_(0, self.used, positions, "amin")
        new = first[rows]
        if self.unknown_index == "random":
            # One draw per position, sync-free: the original draws only for the unknown ones (same uniform law
            # on [0, u), other numbers).
            fill = torch.randint(0, u, rows.shape, device=rows.device)
        else:
            fill = torch.full_like(rows, u if self.unknown_index == "extra" else int(self.unknown_index))
        return torch.where(new < u, new, fill)

    def unmap(self, indices: Tensor) -> Tensor:
        """Model indices -> codebook rows (VectorQuantizer2.unmap_to_all): ``used[i]``; the "extra" index is
        row ``used[0]``, as the original sets it to 0. The identity without ``used``."""
        if self.used is None:
            return indices
        return self.used[torch.where(indices < self.used.shape[0], indices, 0)]

    def embed(self, rows: Tensor) -> Tensor:
        """Codebook rows (B, h, w) -> their vectors (B, dim, h, w)."""
        return rearrange(F.embedding(rows, self.codebook()), "b h w c -> b c h w")

    def lookup(self, indices: Tensor) -> Tensor:
        """Model indices (B, h, w), as ``forward`` reports them -> quantized latents (B, dim, h, w)."""
        return self.embed(self.unmap(indices))

    def nearest(self, z: Tensor) -> Tensor:
        """Latents (B, dim, h, w) -> the nearest codebook row per position (B, h, w), before any remap."""
        b, _, h, w = z.shape
        return self._assign(z)[3].view(b, h, w)

    def _assign(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(z as (B, h, w, dim), its rows (N, dim), the codebook (num_codes, dim), nearest row per row (N,))."""
        # Contiguous channels-last copies as diffusers makes them: layouts decide the rounding downstream.
        z = rearrange(z, "b c h w -> b h w c").float().contiguous()
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, self.dim)  # (N, dim)
        weight = self.embedding.weight
        if self.training and self.restart_dead_codes:
            # _update rewrites the weight in place on every step (sync-free), so the graph holds a copy.
            weight = weight.clone()
        codes = self.codebook(weight).float()
        return z, flat, codes, torch.argmin(torch.cdist(flat, codes), dim=1)

    def forward(self, z: Tensor) -> tuple[Tensor, VQInfo]:
        """Latents (B, dim, h, w) -> (z_q with straight-through gradient, VQInfo)."""
        b, _, h, w = z.shape
        z, flat, codes, indices = self._assign(z)
        z_q = codes[indices].view_as(z)

        commitment = torch.mean((z - z_q.detach()) ** 2)
        codebook_term = torch.mean((z.detach() - z_q) ** 2) if self.ema_decay is None else z.new_zeros(())
        if self.legacy:  # taming's placement: beta scales the codebook term
            loss = commitment + self.beta * codebook_term
        else:
            loss = self.beta * commitment + codebook_term

        # index_add_, not bincount: CUDA's bincount reads the largest index back to the host. Sums of ones are
        # exact in float32, so the counts are bincount's.
        counts = flat.new_zeros(self.num_codes).index_add_(0, indices, flat.new_ones(indices.shape))
        if self.training:
            self._update(flat.detach(), indices, counts)
        probs = counts / counts.sum()
        perplexity = torch.exp(-torch.sum(probs * torch.log(probs.clamp_min(1e-10))))

        z_q = z + (z_q - z).detach()  # straight-through: forward is z_q, gradient flows to z
        info = VQInfo(
            indices=self.remap(indices.view(b, h, w)),  # usage and perplexity above count codebook rows
            loss=loss,
            codebook_loss=codebook_term.detach(),
            commitment_loss=commitment.detach(),
            usage=(counts > 0).float().mean().detach(),
            perplexity=perplexity.detach(),
        )
        return rearrange(z_q, "b h w c -> b c h w").contiguous(), info

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        onehot_sum = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, indices, flat)
        if self.ema_decay is not None:
            d = self.ema_decay
            counts_all = _all_reduce_sum(counts.clone())
            sums_all = _all_reduce_sum(onehot_sum)
            self.ema_cluster_size.mul_(d).add_(counts_all, alpha=1 - d)
            self.ema_embed_sum.mul_(d).add_(sums_all, alpha=1 - d)
            n = self.ema_cluster_size.sum()
            # Laplace smoothing keeps unused codes from dividing by zero (VQ-VAE App. A.1 implementations).
            size = (self.ema_cluster_size + 1e-5) / (n + self.num_codes * 1e-5) * n
            self.embedding.weight.copy_(self.ema_embed_sum / size[:, None])
        if self.restart_dead_codes:
            counts_all = _all_reduce_sum(counts.clone())
            self.ema_usage.mul_(0.99).add_(counts_all / counts_all.sum().clamp_min(1), alpha=0.01)
            dead = self.ema_usage < self.dead_threshold / self.num_codes  # (num_codes,) bool
            # Sync-free: every code draws a candidate from the batch and only dead codes take theirs, so no
            # count of dead codes is read back to size the draw (the draw thus takes num_codes samples of the
            # global RNG on every step).
            pick = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
            new = flat[pick]  # (num_codes, dim)
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(new, src=0)  # every rank restarts with rank 0's choice
            col = dead[:, None]
            weight = self.embedding.weight
            weight.copy_(torch.where(col, new.to(weight.dtype), weight))
            self.ema_usage.copy_(torch.where(dead, 1.0 / self.num_codes, self.ema_usage))
            if self.ema_decay is not None:
                self.ema_cluster_size.copy_(torch.where(dead, 1.0, self.ema_cluster_size))
                self.ema_embed_sum.copy_(torch.where(col, new, self.ema_embed_sum))


class VQAutoencoder(PretrainedMixin, nn.Module):
    """VQGAN-style autoencoder; ``state_dict()`` matches diffusers' ``VQModel``."""

    config_class: ClassVar[type] = VQConfig
    presets: ClassVar[dict[str, Any]] = VQ_PRESETS
    diffusers_class_name: ClassVar[str] = "VQModel"
    training_only_prefixes: ClassVar[tuple[str, ...]] = ("quantize.ema_",)

    def __init__(self, config: VQConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = self._config_with(config, overrides)
        self.config = config
        self.encoder = Encoder(config.in_channels, config.latent_channels, config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer(
            config.num_vq_embeddings,
            config.embed_dim,
            beta=config.beta,
            legacy=config.legacy,
            l2_normalize=config.l2_normalize,
            ema_decay=config.ema_decay,
            restart_dead_codes=config.restart_dead_codes,
            num_used_codes=config.num_used_codes,
            unknown_index=config.unknown_index,
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config.latent_channels, config.out_channels, config)

    def encode(self, x: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> pre-quantization latents (B, embed_dim, H/f, W/f), float32."""
        check_input(x, self.config.in_channels, "images")
        return self._encode(x, tile_size, max_memory)

    def _encode(self, x: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None) -> Tensor:
        # encode without the NaN/Inf check (a host sync): the training forward's path.
        h = tiled_forward(self.encoder, self._to_model(x), tile_size, 1, max_memory)
        return self.quant_conv(h).float()

    def quantize_latents(self, h: Tensor) -> tuple[Tensor, VQInfo]:
        """Latents -> (codebook vectors with straight-through gradient, VQInfo)."""
        return self.quantize(h)

    def decode(self, z_q: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None) -> Tensor:
        """Quantized latents (B, embed_dim, h, w) -> images (B, C, h*f, w*f), float32."""
        check_input(z_q, self.config.embed_dim, "latents")
        return self._decode(z_q, tile_size, max_memory)

    def _decode(self, z_q: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None) -> Tensor:
        # decode without the NaN/Inf check (a host sync): the training forward's path.
        z = self.post_quant_conv(self._to_model(z_q))
        return tiled_forward(self.decoder, z, tile_size, self.config.downsample_factor, max_memory).float()

    def encode_latents(
        self,
        x: Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tile_size: int | None = None,
        max_memory: MaxMemory = None,
    ) -> Tensor:
        """Images -> quantized latents (B, embed_dim, H/f, W/f), what ``decode`` takes: exactly the codebook
        vectors of the nearest codes (``forward``'s straight-through sum z + (e - z) rounds them), whatever the
        remap. Quantization is deterministic: ``sample`` and ``generator`` are accepted for the common contract
        and change nothing."""
        return self.quantize.embed(self.quantize.nearest(self.encode(x, tile_size, max_memory)))

    def encode_moments(
        self, x: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None
    ) -> tuple[Tensor, Tensor]:
        """(E[z], E[z^2]) per element of ``encode_latents(x)``: quantization is deterministic, so (z_q, z_q^2)."""
        z_q = self.encode_latents(x, tile_size=tile_size, max_memory=max_memory)
        return z_q, z_q.square()

    def decode_indices(
        self, indices: Tensor, tile_size: int | None = None, max_memory: MaxMemory = None
    ) -> Tensor:
        """Code indices (B, h, w), as ``forward`` reports them (positions in ``used`` under a remap) -> images.

        Raises:
            ValueError: not an integer (B, h, w) tensor, or an index outside [0, ``quantize.num_indices``).
        """
        check_indices(indices, self.quantize.num_indices)
        return self.decode(self.quantize.lookup(indices.long()), tile_size, max_memory)

    def set_remap(
        self, used: Tensor | str | os.PathLike | None, unknown_index: str | int = "random"
    ) -> VQAutoencoder:
        """Renumbers the code indices as LDM's ``VectorQuantizer2(remap=..., unknown_index=...)``; returns self.

        Checkpoints of a remapped model carry ``used`` and load with it; this is for a list that comes apart.

        Args:
            used: the codebook rows in use, in index order: a 1-D integer tensor or the original's ``.npy``
                file (read without pickles); None removes the remap.
            unknown_index: "random", "extra" or an int, as :class:`~ldm_vae.config.VQConfig`'s field.

        Raises:
            CheckpointError: an unreadable ``.npy``, or rows outside the codebook.
            ValueError: an invalid ``unknown_index``.
        """
        if used is not None and not isinstance(used, Tensor):
            used = read_used_codes(used)
        n = None if used is None else int(used.shape[0])
        config = self._config_with(self.config, {"num_used_codes": n, "unknown_index": unknown_index})
        if used is not None:
            check_used_codes(used, config.num_vq_embeddings, "used")
            used = used.to(device=self.device, dtype=torch.long)
        self.config, self.quantize.used, self.quantize.unknown_index = config, used, unknown_index
        return self

    def _check_loaded(self, source: str) -> None:
        if self.quantize.used is not None:
            check_used_codes(self.quantize.used, self.config.num_vq_embeddings, f"{source}: quantize.used")

    def forward(
        self,
        x: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        latent_transform: LatentTransform | None = None,
    ) -> tuple[Tensor | tuple[Tensor, ...], VQInfo]:
        """Reconstruction and quantizer info, as ``AutoencoderKL.forward`` returns (recon, posterior).

        ``sample_posterior`` and ``generator`` are the common contract's; the quantizer ignores them. As
        ``AutoencoderKL.forward``, it checks the input's shape only and reads nothing back from the device;
        ``latent_transform`` acts on the quantized latents the decoder sees.
        """
        check_shape(x, self.config.in_channels, "images")
        z_q, info = self.quantize(self._encode(x))
        return decode_views(self._decode, z_q, latent_transform), info

    def encoder_side(self) -> list[nn.Module]:
        """Encoder, quant_conv and codebook: what decoder-only fine-tuning freezes."""
        return [self.encoder, self.quant_conv, self.quantize]

    @property
    def decode_channels(self) -> int:
        return self.config.embed_dim

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    def scale_latents(self, z: Tensor) -> Tensor:
        return z * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        return z / self.config.scaling_factor


def read_used_codes(path: str | os.PathLike) -> Tensor:
    """The ``used`` list of a ``.npy`` file (VectorQuantizer2's ``remap``), read with ``allow_pickle=False``.

    Raises:
        CheckpointError: unreadable, pickled, or not a 1-D integer array.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: not a readable .npy of code indices ({e})") from None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ckpt.CheckpointError(f"{path}: expected a 1-D integer array, got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))


def check_used_codes(used: Tensor, num_codes: int, what: str) -> None:
    """Raises CheckpointError with one line unless ``used`` is a 1-D integer tensor of rows in [0, num_codes)."""
    if used.ndim != 1 or not is_integer(used):
        raise ckpt.CheckpointError(
            f"{what}: expected a 1-D integer tensor, got {used.dtype} {tuple(used.shape)}"
        )
    if used.numel() == 0 or int(used.min()) < 0 or int(used.max()) >= num_codes:
        raise ckpt.CheckpointError(f"{what}: codebook rows must lie in [0, {num_codes}) and be at least one")
