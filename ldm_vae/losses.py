"""Training losses for KL and VQ autoencoders: the Latent Diffusion / taming-transformers recipe.

Implements LDM's ``LPIPSWithDiscriminator`` (Rombach et al., 2022, App. G) and taming's
``VQLPIPSWithDiscriminator`` (Esser et al., 2021, "Taming Transformers", Sec. 3.1):

    L = nll + w_reg * reg + lambda * f(step) * L_GAN,   nll = (|x - x_hat| + w_p * LPIPS) / e^s + s

with the adaptive weight of Esser et al. eq. 7, lambda = ||grad_L[nll]|| / (||grad_L[L_GAN]|| + 1e-4) on the
decoder's last layer L, and a PatchGAN discriminator (Isola et al., 2017) trained with the hinge loss.

Departures from the public scripts (each a known defect there):
  - the learned log-variance ``s`` is really optimized (LDM declares it but leaves it out of every optimizer);
  - LPIPS gradients reach the reconstruction (some scripts wrap the perceptual loss in ``no_grad``), while
    LPIPS itself stays frozen, in eval mode (no dropout) and out of every state dict;
  - missing ImageNet backbone weights fail at construction with the path to fill, instead of a download attempt;
  - the "vanilla" GAN loss uses the non-saturating generator term softplus(-D(x_hat)) (taming uses -D(x_hat)
    for both losses);
  - no gradient-norm work before the discriminator starts.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lpips
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_state_dict
from .interface import Regularization

# torchvision's ImageNet weights for each LPIPS backbone (file name from the official URL).
_BACKBONES = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights"}


class MissingWeightsError(RuntimeError):
    """Pretrained weights the loss needs are not on disk (and are never downloaded)."""


@dataclass(frozen=True)
class LossConfig:
    rec_loss: str = "l1"  # pixel term: "l1" |x - x_hat| or "l2" (x - x_hat)^2
    perceptual_weight: float = 1.0  # weight of LPIPS in the reconstruction term; 0 never builds LPIPS
    lpips_net: str = "vgg"  # LPIPS backbone: "vgg" (LDM/taming) or "alex"
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)) for KL models (LDM kl-f8: 1e-6)
    codebook_weight: float = 1.0  # weight of the quantizer's loss for VQ models (taming: 1.0)
    learn_logvar: bool = False  # learn the scalar log-variance s of the reconstruction likelihood
    logvar_init: float = 0.0  # initial (or fixed) value of s
    disc_weight: float = 0.5  # lambda multiplier: GAN weight = disc_weight * adaptive ratio
    disc_start: int = 50001  # first step at which the GAN terms are on (LDM kl-f8: 50001)
    disc_loss: str = "hinge"  # discriminator loss: "hinge" or "vanilla" (non-saturating BCE)
    disc_factor: float = 1.0  # GAN factor once the discriminator has started
    disc_num_layers: int = 3  # stride-2 conv layers of the PatchGAN (receptive field 70 px at 3)
    disc_channels: int = 64  # channels of the discriminator's first layer
    adaptive_weight: bool = True  # Esser et al. eq. 7 gradient-norm balancing; False uses disc_weight alone
    adaptive_weight_max: float = 1e4  # clamp of the adaptive ratio (taming/LDM: 1e4)
    # True: LDM's/taming's Lightning order. The discriminator's step runs the autoencoder again (a new posterior
    # sample) after the autoencoder has stepped. False: both losses from one forward, half the autoencoder compute.
    disc_second_pass: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (
            ("rec_loss", ("l1", "l2")),
            ("lpips_net", tuple(_BACKBONES)),
            ("disc_loss", ("hinge", "vanilla")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LossConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_num_layers < 1 or self.disc_channels < 1:
            raise ValueError("LossConfig.disc_num_layers and disc_channels must be >= 1")

    def regularizer_weight(self, name: str) -> float:
        """The weight of a regularizer's loss term, by its name (``kl`` or ``codebook``)."""
        weights = {"kl": self.kl_weight, "codebook": self.codebook_weight}
        if name not in weights:
            raise ValueError(f"no weight for a {name!r} regularizer (known: {', '.join(weights)})")
        return weights[name]


# ------------------------------------------------------------------------------------- discriminator


def weights_init(m: nn.Module) -> None:
    """DCGAN / taming init: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02) and biases 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix (Isola et al., 2017) as used by taming and LDM.

    Parameter names (``main.<i>.*``) match taming's ``NLayerDiscriminator``, so its discriminator weights load.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        self.n_layers = n_layers
        # BatchNorm follows every conv but the first and last, so those convs need no bias.
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    @property
    def min_size(self) -> int:
        """Smallest input edge that yields at least one logit."""
        return 3 * 2**self.n_layers

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> patch logits (B, 1, H / 2^n - 2, W / 2^n - 2)."""
        if x.ndim != 4 or min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"discriminator input must be (B, C, H, W) with H, W >= {self.min_size}, got {tuple(x.shape)}"
            )
        return self.main(x)


def build_discriminator(config: LossConfig, in_channels: int = 3) -> NLayerDiscriminator:
    """The discriminator that ``config`` describes (the trainer owns and optimizes it)."""
    return NLayerDiscriminator(in_channels, config.disc_channels, config.disc_num_layers)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Binary cross-entropy on logits: 0.5 * (E[softplus(-D(x))] + E[softplus(D(x_hat))])."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: Tensor, disc_loss: str = "hinge") -> Tensor:
    """Generator term: -E[D(x_hat)] for hinge, non-saturating E[softplus(-D(x_hat))] for vanilla."""
    if disc_loss == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


# ------------------------------------------------------------------------------------- LPIPS


def backbone_weights_path(net: str) -> Path:
    """Where torchvision caches ``net``'s ImageNet weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    import torchvision.models as tvm

    url = getattr(tvm, _BACKBONES[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_backbone(features: nn.Module, path: Path) -> None:
    # lpips splits torchvision's `features` Sequential into slices whose children keep their indices,
    # so "slice2.5.weight" is "features.5.weight" of the torchvision checkpoint.
    state = read_state_dict(path)
    mapped = {}
    for key in features.state_dict():
        _, index, param = key.split(".")
        src = state.get(f"features.{index}.{param}")
        if src is None or src.shape != features.get_parameter(key).shape:
            raise CheckpointError(f"{path}: not the torchvision ImageNet checkpoint (bad features.{index})")
        mapped[key] = src
    features.load_state_dict(mapped)


class PerceptualLoss(nn.Module):
    """Frozen LPIPS (Zhang et al., 2018) for images in [-1, 1]; returns (B, 1, 1, 1) distances.

    The LPIPS net is deliberately not a registered submodule: it stays out of ``parameters()`` (no optimizer
    or ``requires_grad_`` can reach it), out of ``state_dict()`` (checkpoints stay small), and ``train()``
    cannot switch its dropout on. ``.to()`` and dtype casts still reach it through ``_apply``. Gradients
    flow through it into the inputs.
    """

    def __init__(self, net: str = "vgg", random_backbone: bool = False) -> None:
        super().__init__()
        if net not in _BACKBONES:
            raise ValueError(f"LPIPS net must be one of {tuple(_BACKBONES)}, got {net!r}")
        path = backbone_weights_path(net)
        # Checked before lpips/torchvision get a chance to start a download that cannot succeed offline.
        if not random_backbone and not path.is_file():
            raise MissingWeightsError(
                f"LPIPS needs the ImageNet {net} weights at {path} (download {path.name} from "
                "https://download.pytorch.org/models/ and put it there, or set TORCH_HOME), "
                "or set perceptual_weight = 0"
            )
        # pretrained=False and pnet_rand=True: lpips builds both parts randomly and downloads nothing;
        # both weight files are then read here with weights_only loading (lpips' own torch.load does not ask for it).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation
            model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        linear = read_state_dict(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth")
        # "lins.<i>" aliases "lin<i>" (the same modules) and the scaling layer is constant, so the file holds
        # exactly the lin<i> weights.
        wanted = {k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins.")}
        if set(linear) != wanted:
            raise CheckpointError(f"lpips' {net}.pth does not fit LPIPS({net!r}): lpips version mismatch?")
        model.load_state_dict(linear, strict=False)
        if not random_backbone:
            _load_backbone(model.net, path)
        model.eval().requires_grad_(False)
        object.__setattr__(self, "lpips", model)
        self.net = net

    def _apply(self, fn: Any, recurse: bool = True) -> PerceptualLoss:
        self.lpips._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.lpips(x, y)  # (B, 1, 1, 1)


def build_lpips(net: str = "vgg", random_backbone: bool = False) -> PerceptualLoss:
    """Frozen LPIPS; ``random_backbone=True`` skips the ImageNet weights (for tests, never downloads)."""
    return PerceptualLoss(net, random_backbone=random_backbone)


# ------------------------------------------------------------------------------------- the loss


class AutoencoderLoss(nn.Module):
    """Reconstruction + regularization + adaptive GAN loss of any autoencoder of the package.

    The bottleneck's report (:class:`~ldm_vae.interface.Regularization`: the KL posterior of LDM's models, the
    quantizer info of taming's) brings its own loss term, its reduction of the reconstruction term and its logs;
    this class only weights it (``kl_weight`` or ``codebook_weight`` by the regularizer's name). It holds the
    frozen LPIPS and the optional learned log-variance, not the discriminator: the trainer owns the
    discriminator and passes its logits in.

    Args:
        config: loss hyper-parameters.
        random_lpips_backbone: build LPIPS with a random backbone (tests and smoke runs without weights).
        perceptual: a perceptual distance ``(x, y) -> (B, 1, 1, 1)`` to use instead of LPIPS (e.g. a stub in
            tests); only used when ``perceptual_weight > 0``.
    """

    def __init__(
        self, config: LossConfig, random_lpips_backbone: bool = False, perceptual: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.config = config
        if config.perceptual_weight <= 0:
            perceptual = None
        elif perceptual is None:
            perceptual = build_lpips(config.lpips_net, random_backbone=random_lpips_backbone)
        self.perceptual = perceptual
        logvar = torch.tensor(float(config.logvar_init))
        if config.learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar, persistent=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters for the autoencoder's optimizer: the log-variance when learned."""
        return [self.logvar] if self.config.learn_logvar else []

    def disc_factor_at(self, step: int) -> float:
        """GAN factor f(step): 0 before ``disc_start``, ``disc_factor`` from then on."""
        return self.config.disc_factor if step >= self.config.disc_start else 0.0

    def adaptive_weight(self, nll: Tensor, g: Tensor, last_layer: Tensor | None) -> Tensor:
        """Esser et al. eq. 7: ||grad nll|| / (||grad g|| + 1e-4), clamped, detached, times ``disc_weight``.

        Zero when gradients are off (validation), as in LDM.
        """
        cfg = self.config
        if not cfg.adaptive_weight:
            return torch.tensor(cfg.disc_weight, device=nll.device)
        if not (torch.is_grad_enabled() and nll.requires_grad and g.requires_grad):
            return torch.zeros((), device=nll.device)
        if last_layer is None:
            raise ValueError("the adaptive GAN weight needs last_layer (the decoder's last conv weight)")
        nll_grad, g_grad = (
            torch.autograd.grad(t, last_layer, retain_graph=True, allow_unused=True)[0] for t in (nll, g)
        )
        if nll_grad is None or g_grad is None:
            raise ValueError(
                "last_layer is not in the graph of the loss: pass the decoder's last conv weight"
            )
        # fp32 norms: under bf16/fp16 autocast the squared sums of large layers lose precision or overflow.
        ratio = torch.linalg.vector_norm(nll_grad.float()) / (torch.linalg.vector_norm(g_grad.float()) + 1e-4)
        return ratio.clamp(0.0, cfg.adaptive_weight_max).detach() * cfg.disc_weight

    def reconstruction_nll(
        self, x: Tensor, recon: Tensor, reg: Regularization
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The reconstruction term: (scalar nll, per-pixel term (B, C, H, W), LPIPS (B, 1, 1, 1) or 0).

        nll = (pixel + w_p * LPIPS) / e^s + s, reduced as ``reg.pixel_reduction`` says.
        """
        cfg = self.config
        if x.shape != recon.shape:
            raise ValueError(
                f"inputs {tuple(x.shape)} and reconstructions {tuple(recon.shape)} differ in shape"
            )
        diff = x.contiguous() - recon.contiguous()
        pixel = diff.abs() if cfg.rec_loss == "l1" else diff.pow(2)  # (B, C, H, W)
        rec = pixel
        perceptual = torch.zeros((), device=x.device)
        if self.perceptual is not None:
            perceptual = self.perceptual(x.contiguous(), recon.contiguous())  # (B, 1, 1, 1)
            rec = pixel + cfg.perceptual_weight * perceptual  # broadcast over pixels, as LDM/taming
        nll = rec / torch.exp(self.logvar) + self.logvar  # (B, C, H, W)
        # LDM sums over C, H, W and averages over the batch, like its KL; taming averages over every element.
        nll = nll.sum() / nll.shape[0] if reg.pixel_reduction == "sum" else nll.mean()
        return nll, pixel, perceptual

    def generator_loss(
        self,
        x: Tensor,
        recon: Tensor,
        reg: Regularization,
        logits_fake: Tensor | None,
        last_layer: Tensor | None,
        step: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder (generator) loss and its logs.

        Args:
            x: input images (B, 3, H, W) in [-1, 1].
            recon: reconstructions of ``x``, same shape.
            reg: the bottleneck's report (the KL posterior or the VQ quantizer's info).
            logits_fake: discriminator logits on ``recon`` (graph kept), or None to skip the GAN term.
            last_layer: the decoder's last conv weight, for the adaptive weight.
            step: global training step.

        Returns:
            The scalar loss, and detached scalar tensors under total, nll, rec (mean pixel term), perceptual
            (mean LPIPS), g, d_weight, disc_factor, logvar, and the regularizer's own logs (kl, or codebook,
            code_usage and perplexity).
        """
        cfg = self.config
        nll, pixel, perceptual = self.reconstruction_nll(x, recon, reg)
        loss = nll + cfg.regularizer_weight(reg.name) * reg.regularization_loss()

        factor = self.disc_factor_at(step)
        g = torch.zeros((), device=x.device)
        d_weight = torch.zeros((), device=x.device)
        if logits_fake is not None:
            g = generator_adversarial_loss(logits_fake, cfg.disc_loss)
            if factor > 0:
                d_weight = self.adaptive_weight(nll, g, last_layer)
                loss = loss + d_weight * factor * g

        logs = {
            "total": loss,
            "nll": nll,
            "rec": pixel.mean(),
            "perceptual": perceptual.mean(),
            "g": g,
            "d_weight": d_weight,
            "disc_factor": torch.tensor(factor, device=x.device),
            "logvar": self.logvar.clone(),  # a copy: the optimizer updates the parameter in place
        }
        return loss, {**{k: v.detach().float() for k, v in logs.items()}, **reg.logs()}

    def discriminator_loss(self, logits_real: Tensor, logits_fake: Tensor, step: int) -> tuple[Tensor, dict]:
        """f(step) * GAN loss of the discriminator, from its logits on ``x.detach()`` and ``recon.detach()``."""
        d_loss = (hinge_d_loss if self.config.disc_loss == "hinge" else vanilla_d_loss)(
            logits_real, logits_fake
        )
        loss = self.disc_factor_at(step) * d_loss
        logs = {
            "d_loss": d_loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
        }
        return loss, {k: v.detach().float() for k, v in logs.items()}
