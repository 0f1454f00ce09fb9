"""Reconstruction metrics, per image, in pure torch.

- PSNR = 10 log10(R^2 / MSE), R the data range (2 for images in [-1, 1]).
- SSIM of Wang, Bovik, Sheikh & Simoncelli (2004), "Image Quality Assessment: From Error Visibility to
  Structural Similarity", Eq. 13, with their 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, on
  images scaled to [0, 1], averaged over the valid window positions and then the channels. This equals
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1.0)``.
- A bicubic down/up baseline: what a plain ``f``-times downscale keeps, to judge an ``f``-times VAE against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _batched(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"images must be (C, H, W) or (B, C, H, W), got {tuple(a.shape)}")
    return a, b


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """PSNR in dB per image: (B,) for (B, C, H, W) inputs, a scalar for (C, H, W); inf where a == b."""
    single = a.ndim == 3
    a, b = _batched(a, b)
    mse = (a.double() - b.double()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    out = (10.0 * torch.log10(data_range**2 / mse)).float()  # mse == 0 gives inf
    return out[0] if single else out


def _gaussian_window(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    return g / g.sum()  # (size,)


SSIM_STRIP_ELEMENTS = 2**22  # input elements per strip of the SSIM map (float64: 32 MB, ~10 temporaries)


def _ssim_map(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    """SSIM at each "valid" window position of (B, C, h, w) images in [0, 1] (float64): (B, C, h', w')."""
    n, c, h, w = a.shape
    size = g.numel()

    def blur(x: Tensor) -> Tensor:
        # Separable Gaussian over each channel; "valid" positions only, as skimage crops its borders.
        x = x.reshape(n * c, 1, h, w)
        x = F.conv2d(x, g.view(1, 1, size, 1))
        return F.conv2d(x, g.view(1, 1, 1, size)).reshape(n, c, h - size + 1, w - size + 1)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1 after rescaling
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM per image (Wang et al. 2004) of images in [-1, 1], computed on them mapped to [0, 1].

    Images smaller than the 11-pixel window use the largest odd window that fits (skimage refuses them).

    Returns:
        (B,) for (B, C, H, W) inputs, a scalar for (C, H, W).
    """
    single = a.ndim == 3
    a, b = _batched(a, b)
    n, c, h, w = a.shape
    size = min(SSIM_WINDOW, h - (h + 1) % 2, w - (w + 1) % 2)
    g = _gaussian_window(size, SSIM_SIGMA).to(a.device)  # float64

    # The SSIM map is local (one window), so it is summed over strips of output rows: the same values, but a
    # 9000x9000 image needs a few strips' temporaries instead of a dozen float64 copies of itself.
    valid_h, valid_w = h - size + 1, w - size + 1
    rows = max(1, SSIM_STRIP_ELEMENTS // max(1, n * c * w))
    total = torch.zeros(n, c, dtype=torch.float64, device=a.device)
    for r0 in range(0, valid_h, rows):
        r1 = min(valid_h, r0 + rows)
        # SSIM's luminance term is not shift-invariant, so the [0, 1] mapping (the usual setting) matters.
        sa, sb = ((t[..., r0 : r1 + size - 1, :].double() + 1.0) / 2.0 for t in (a, b))
        total += _ssim_map(sa, sb, g).sum(dim=(2, 3))
    out = (total / (valid_h * valid_w)).mean(dim=1).float()  # (B,)
    return out[0] if single else out


def bicubic_baseline(x: Tensor, factor: int) -> Tensor:
    """Downscales (B, C, H, W) or (C, H, W) by ``factor`` (bicubic, antialiased) and upscales back, clamped.

    The low-resolution image has ceil(H / factor) x ceil(W / factor) pixels: as many positions as the latent
    of an f = ``factor`` autoencoder.
    """
    single = x.ndim == 3
    x4 = x[None] if single else x
    h, w = x4.shape[-2:]
    small = (-(-h // factor), -(-w // factor))
    down = F.interpolate(x4.float(), size=small, mode="bicubic", antialias=True, align_corners=False)
    up = F.interpolate(down, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    up = up.clamp(-1.0, 1.0)
    return up[0] if single else up
