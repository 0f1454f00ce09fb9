"""AutoencoderKL against diffusers on identical random weights, and the model's own invariants."""

import diffusers
import pytest
import torch

from ldm_vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from ldm_vae.config import PRESETS

CONFIGS = {
    "tiny": PRESETS["tiny"],
    "sd-shaped": PRESETS["sd"],
    "16ch-no-quant-conv": PRESETS["flux"],
    "no-mid-attention": AutoencoderKLConfig(
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False
    ),
    # Attention inside the two lowest-resolution levels (AttnDownEncoderBlock2D / AttnUpDecoderBlock2D).
    "attention-levels": AutoencoderKLConfig(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
    ),
}


def diffusers_twin(model: AutoencoderKL) -> diffusers.AutoencoderKL:
    """A diffusers AutoencoderKL with the same config and the same weights."""
    cfg = {k: v for k, v in model.config.to_diffusers().items() if k != "_class_name"}
    twin = diffusers.AutoencoderKL.from_config(cfg)
    twin.load_state_dict(model.state_dict(), strict=True)  # our names are diffusers' names
    return twin.eval()


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_parity_with_diffusers(name):
    torch.manual_seed(0)
    ours = AutoencoderKL(CONFIGS[name]).eval()
    theirs = diffusers_twin(ours)
    for shape in [(2, 3, 32, 32), (1, 3, 40, 24)]:
        x = torch.rand(shape) * 2 - 1
        post, post_d = ours.encode(x), theirs.encode(x).latent_dist
        assert (post.mean - post_d.mean).abs().max() <= 1e-5
        assert (post.logvar - post_d.logvar).abs().max() <= 1e-5
        z = torch.randn_like(post.mean)
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max() <= 1e-5
        # Same generator, same posterior sample (the reparameterization draws the same noise).
        s1 = post.sample(torch.Generator().manual_seed(3))
        s2 = post_d.sample(torch.Generator().manual_seed(3))
        assert (s1 - s2).abs().max() <= 1e-5


def test_state_dict_keys_are_diffusers_keys():
    ours = AutoencoderKL.from_pretrained("sd")
    theirs = diffusers_twin(ours)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert (
        sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 83653863
    )


@torch.no_grad()
def test_forward_returns_reconstruction_and_posterior():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, post = vae(x, sample_posterior=False)
    assert recon.shape == x.shape and recon.dtype == torch.float32
    assert torch.equal(recon, vae.decode(post.mode()))
    assert post.mean.shape == (2, 4, 16, 16)  # tiny is f=2


def test_kl_of_standard_normal_is_zero_and_formula():
    zeros = torch.zeros(3, 8, 4, 4)
    assert torch.equal(DiagonalGaussian(zeros).kl(), torch.zeros(3))
    mean, logvar = torch.full((1, 2, 1, 1), 0.5), torch.full((1, 2, 1, 1), -1.0)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    expected = 2 * 0.5 * (0.25 + torch.exp(torch.tensor(-1.0)) - 1 + 1)
    assert torch.allclose(post.kl(), expected.reshape(1))
    assert torch.allclose(post.std, torch.exp(torch.tensor(-0.5)))
    # Clamped like LDM/diffusers, so exp() stays finite.
    assert DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, 100.0)], 1)).logvar.max() == 20.0


def test_sample_is_reparameterized_and_seeded():
    moments = torch.randn(2, 8, 4, 4, requires_grad=True)
    post = DiagonalGaussian(moments)
    a = post.sample(torch.Generator().manual_seed(0))
    b = post.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    a.sum().backward()
    assert moments.grad is not None and moments.grad[:, :4].eq(1).all()


def test_latent_scaling_round_trip():
    vae = AutoencoderKL.from_pretrained("flux")
    z = torch.randn(1, 16, 4, 4)
    assert torch.allclose(vae.scale_latents(z), (z - 0.1159) * 0.3611)
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-6)
    sd = AutoencoderKL(PRESETS["tiny"], scaling_factor=0.18215)
    assert torch.allclose(sd.scale_latents(z[:, :4]), z[:, :4] * 0.18215)


def test_bad_inputs_raise_one_line_errors():
    vae = AutoencoderKL.from_pretrained("tiny")
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\), got \(1, 4, 8, 8\)"):
        vae.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="latents must have shape"):
        vae.decode(torch.zeros(4, 8, 8))
    z = torch.zeros(1, 4, 8, 8)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="latents contain NaN or Inf"):
        vae.decode(z)


def test_fp16_decode_overflow_upcasts_and_retries():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny")
    with torch.no_grad():
        # Every weight fits fp16, but the activations do not: silu(10) * 1000 summed over 8 channels * 9
        # taps is 7.2e5, far beyond fp16's 65504.
        vae.decoder.conv_norm_out.weight.zero_()
        vae.decoder.conv_norm_out.bias.fill_(10.0)
        vae.decoder.conv_out.weight.fill_(1000.0)
    vae.to_runtime("fp16")
    with pytest.warns(UserWarning, match="upcasting"), torch.no_grad():
        out = vae.decode(torch.zeros(1, 4, 4, 4))
    assert vae.dtype == torch.float32
    inner = out[..., 1:-1, 1:-1]  # away from the zero padding every 3x3 tap sees the same input
    assert torch.isfinite(out).all() and torch.allclose(inner, inner.flatten()[0].expand_as(inner))
    bias = vae.decoder.conv_out.bias[:, None, None]
    expected = 8 * 9 * torch.nn.functional.silu(torch.tensor(10.0)) * 1000 + bias
    assert torch.allclose(inner[0], expected.expand_as(inner[0]), rtol=1e-5)


@torch.no_grad()
def test_encode_decode_accept_fp32_in_any_model_dtype():
    torch.manual_seed(0)
    ref = AutoencoderKL.from_pretrained("tiny")
    fast = AutoencoderKL(ref.config)
    fast.load_state_dict(ref.state_dict())
    fast.to_runtime("bf16")
    assert fast.dtype == torch.bfloat16
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    a, b = ref.encode(x).mean, fast.encode(x).mean
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert fast.decode(a).dtype == torch.float32


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny").train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1

    def grads():
        vae.zero_grad()
        recon, post = vae(x, generator=torch.Generator().manual_seed(0))
        (recon.square().mean() + post.kl().mean()).backward()
        return [p.grad.clone() for p in vae.parameters()]

    plain = grads()
    vae.encoder.gradient_checkpointing = vae.decoder.gradient_checkpointing = True
    ckpt = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt, strict=True))


@torch.no_grad()
def test_fast_path_matches_reference():
    """channels_last switches on the fused conv+residual and the sub-pixel upsample; in fp32 they are the
    same math as the reference to rounding, and the bf16 fast path stays within 40 dB PSNR."""
    torch.manual_seed(0)
    ref = AutoencoderKL(CONFIGS["no-mid-attention"]).eval()
    fast32 = AutoencoderKL(ref.config).eval()
    fast32.load_state_dict(ref.state_dict())
    fast32.to(memory_format=torch.channels_last)
    fast16 = AutoencoderKL(ref.config)
    fast16.load_state_dict(ref.state_dict())
    fast16.to_runtime("bf16")
    x = torch.rand(2, 3, 40, 24) * 2 - 1
    z = ref.encode(x).mean
    expected = ref.decode(z)
    assert (fast32.decode(z) - expected).abs().max() <= 1e-5
    assert (fast32.encode(x).mean - z).abs().max() <= 1e-5
    from ldm_vae.metrics import psnr

    span = float(expected.max() - expected.min())
    assert psnr(fast16.decode(z), expected, data_range=span).min() >= 40
    assert psnr(fast16.encode(x).mean, z, data_range=float(z.max() - z.min())).min() >= 40
