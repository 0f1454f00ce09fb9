"""VQ autoencoder (VQGAN, Esser et al., 2021; van den Oord et al., 2017) on the same Encoder/Decoder as the KL model.

Quantizer loss (VQ-VAE eq. 3): ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 with the straight-through estimator
z_q = z + sg[e - z]. taming's historical "legacy" placement puts beta on the codebook term instead.
EMA codebook updates follow VQ-VAE App. A.1; dead codes are re-seeded from current encoder outputs
(Dhariwal et al., 2020, Jukebox Sec. 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checks import check_input, check_shape
from .config import VQ_PRESETS, VQConfig
from .interface import LatentTransform, decode_views
from .modules import Decoder, Encoder
from .pretrained import PretrainedMixin
from .tiling import tiled_forward


@dataclass
class VQInfo:
    """What the quantizer reports for one batch: the VQ model's :class:`~ldm_vae.interface.Regularization`
    (taming's recipe weights ``loss`` and averages the reconstruction term over every element)."""

    name: ClassVar[str] = "codebook"
    pixel_reduction: ClassVar[Literal["sum", "mean"]] = "mean"

    indices: Tensor  # (B, h, w) long: code index per latent position
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
    when EMA updates are on; they are training state, never exported.
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

    def codebook(self, weight: Tensor | None = None) -> Tensor:
        """The code vectors (num_codes, dim): ``weight`` (default ``embedding.weight``), unit-normalized if set."""
        e = self.embedding.weight if weight is None else weight
        return F.normalize(e, dim=1) if self.l2_normalize else e

    def lookup(self, indices: Tensor) -> Tensor:
        """Indices (B, h, w) -> quantized latents (B, dim, h, w)."""
        return rearrange(F.embedding(indices, self.codebook()), "b h w c -> b c h w")

    def forward(self, z: Tensor) -> tuple[Tensor, VQInfo]:
        """Latents (B, dim, h, w) -> (z_q with straight-through gradient, VQInfo)."""
        b, _, h, w = z.shape
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
        indices = torch.argmin(torch.cdist(flat, codes), dim=1)  # (N,)
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
            indices=indices.view(b, h, w),
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
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config.latent_channels, config.out_channels, config)

    def encode(self, x: Tensor, tile_size: int | None = None, max_memory: int | None = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> pre-quantization latents (B, embed_dim, H/f, W/f), float32."""
        check_input(x, self.config.in_channels, "images")
        return self._encode(x, tile_size, max_memory)

    def _encode(self, x: Tensor, tile_size: int | None = None, max_memory: int | None = None) -> Tensor:
        # encode without the NaN/Inf check (a host sync): the training forward's path.
        h = tiled_forward(self.encoder, self._to_model(x), tile_size, 1, max_memory)
        return self.quant_conv(h).float()

    def quantize_latents(self, h: Tensor) -> tuple[Tensor, VQInfo]:
        """Latents -> (codebook vectors with straight-through gradient, VQInfo)."""
        return self.quantize(h)

    def decode(self, z_q: Tensor, tile_size: int | None = None, max_memory: int | None = None) -> Tensor:
        """Quantized latents (B, embed_dim, h, w) -> images (B, C, h*f, w*f), float32."""
        check_input(z_q, self.config.embed_dim, "latents")
        return self._decode(z_q, tile_size, max_memory)

    def _decode(self, z_q: Tensor, tile_size: int | None = None, max_memory: int | None = None) -> Tensor:
        # decode without the NaN/Inf check (a host sync): the training forward's path.
        z = self.post_quant_conv(self._to_model(z_q))
        return tiled_forward(self.decoder, z, tile_size, self.config.downsample_factor, max_memory).float()

    def encode_latents(
        self,
        x: Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tile_size: int | None = None,
        max_memory: int | None = None,
    ) -> Tensor:
        """Images -> quantized latents (B, embed_dim, H/f, W/f), what ``decode`` takes: exactly the codebook
        vectors of the nearest codes (``forward``'s straight-through sum z + (e - z) rounds them). Quantization
        is deterministic: ``sample`` and ``generator`` are accepted for the common contract and change nothing."""
        _, info = self.quantize(self.encode(x, tile_size, max_memory))
        return self.quantize.lookup(info.indices)

    def encode_moments(
        self, x: Tensor, tile_size: int | None = None, max_memory: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(E[z], E[z^2]) per element of ``encode_latents(x)``: quantization is deterministic, so (z_q, z_q^2)."""
        z_q = self.encode_latents(x, tile_size=tile_size, max_memory=max_memory)
        return z_q, z_q.square()

    def decode_indices(
        self, indices: Tensor, tile_size: int | None = None, max_memory: int | None = None
    ) -> Tensor:
        """Code indices (B, h, w) -> images."""
        return self.decode(self.quantize.lookup(indices), tile_size, max_memory)

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
