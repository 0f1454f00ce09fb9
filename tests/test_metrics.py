"""PSNR/SSIM against scikit-image, their invariants, and the bicubic baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm_vae.metrics import bicubic_baseline, psnr, ssim


def _photo(h: int = 48, w: int = 40) -> torch.Tensor:
    """A real colour photo crop as (3, H, W) in [-1, 1]."""
    arr = data.astronaut()[100 : 100 + h, 180 : 180 + w]
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)


def _pair(seed: int = 0, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.stack([_photo(), torch.rand(3, 48, 40) * 2 - 1])
    g = torch.Generator().manual_seed(seed)
    b = (a + noise * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    return a, b


def _skimage_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    to01 = lambda t: ((t.double() + 1) / 2).permute(1, 2, 0).numpy()  # noqa: E731
    return structural_similarity(
        to01(a),
        to01(b),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=2,
    )


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.5])
def test_ssim_and_psnr_match_skimage(noise):
    a, b = _pair(noise=noise)
    got_ssim, got_psnr = ssim(a, b), psnr(a, b)
    assert got_ssim.shape == got_psnr.shape == (2,)
    for i in range(2):
        assert got_ssim[i].item() == pytest.approx(_skimage_ssim(a[i], b[i]), abs=1e-5)
        want = peak_signal_noise_ratio(a[i].double().numpy(), b[i].double().numpy(), data_range=2.0)
        assert got_psnr[i].item() == pytest.approx(want, abs=1e-4)


def test_unbatched_inputs_give_scalars_equal_to_batched():
    a, b = _pair()
    assert ssim(a[0], b[0]).ndim == 0 and psnr(a[0], b[0]).ndim == 0
    assert ssim(a[0], b[0]).item() == pytest.approx(ssim(a, b)[0].item(), abs=1e-7)
    assert psnr(a[1], b[1]).item() == pytest.approx(psnr(a, b)[1].item(), abs=1e-5)


def test_identity_symmetry_and_monotonicity():
    a, b = _pair()
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-6)
    assert torch.isinf(psnr(a, a)).all()
    torch.testing.assert_close(ssim(a, b), ssim(b, a))
    torch.testing.assert_close(psnr(a, b), psnr(b, a))
    scores = [ssim(*_pair(noise=n))[0].item() for n in (0.01, 0.05, 0.2, 0.8)]
    assert scores == sorted(scores, reverse=True) and scores[-1] < 0.5
    # PSNR of a known MSE: uniform offset 0.2 in range 2 -> 10 log10(4 / 0.04) = 20 dB.
    assert psnr(a[0] * 0.5, a[0] * 0.5 + 0.2).item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_is_not_shift_invariant_but_uses_the_0_1_mapping():
    # Mean luminance matters: a brightness change lowers SSIM even with identical structure.
    a = _photo() * 0.5
    assert ssim(a, a + 0.3).item() < 0.99


def test_ssim_on_images_smaller_than_the_window():
    a, b = _pair()
    small_a, small_b = a[:, :, :7, :6], b[:, :, :7, :6]
    assert torch.allclose(ssim(small_a, small_a), torch.ones(2), atol=1e-6)
    assert (ssim(small_a, small_b) < 1).all()
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, b[:, :, :10])


@pytest.mark.parametrize(("h", "w", "factor"), [(48, 40, 8), (37, 29, 8), (37, 29, 2)])
def test_bicubic_baseline(h, w, factor):
    x = _photo(h, w)
    y = bicubic_baseline(x, factor)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    batched = bicubic_baseline(x[None], factor)
    torch.testing.assert_close(batched[0], y)
    # A constant image survives exactly; detail does not, and more so for a larger factor.
    const = torch.full((3, h, w), 0.25)
    torch.testing.assert_close(bicubic_baseline(const, factor), const, atol=1e-5, rtol=0)
    assert psnr(x, y).item() < psnr(x, bicubic_baseline(x, 1)).item()
    if factor > 2:
        assert psnr(x, y).item() < psnr(x, bicubic_baseline(x, 2)).item()
    assert math.isinf(psnr(x, bicubic_baseline(x, 1)).item()) or psnr(x, bicubic_baseline(x, 1)).item() > 60
