"""The latent regularizers (ldm_vae.latent_regularizers): EQ-VAE's transforms, scale equivariance, latent noise,
their per-step draws and config checks, and the equivariance metric.

An autoencoder equivariant by construction (area downscale + a signed channel permutation, and its exact inverse
+ nearest upsampling) scores exactly zero on images it reproduces; a random autoencoder does not; transforms
that disagree between image and latent are caught."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_vae import AutoencoderKL, DiagonalGaussian
from ldm_vae.interface import decode_views
from ldm_vae.latent_regularizers import (
    EQUIVARIANCE_GROUPS,
    EQVAEConfig,
    LatentNoiseConfig,
    LatentPlan,
    LatentRegularizers,
    ScaleEquivarianceConfig,
    SpatialTransform,
    equivariance_psnr,
    evaluation_transforms,
)
from ldm_vae.losses import AutoencoderLoss, LossConfig
from ldm_vae.seeds import mix_seed
from ldm_vae.training import ConfigError, load_config
from ldm_vae.training import train_vae as tv

D4 = [(k, flip) for k in range(4) for flip in (False, True)]


class BlockAutoencoder(nn.Module):
    """Equivariant by construction: encode = f x f area pooling then a signed channel permutation (a 1x1 conv),
    decode = its inverse then nearest upsampling. Both commute with flips and quarter turns, and it reproduces
    exactly the images that are constant on f x f blocks (with dyadic values every sum is exact)."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(downsample_factor=factor, scaling_factor=0.5)
        perm = torch.tensor([[0.0, -1, 0], [0, 0, 1], [1, 0, 0]])  # orthogonal: its inverse is its transpose
        self.enc = nn.Conv2d(3, 3, 1, bias=False)
        self.dec = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.enc.weight.copy_(perm[:, :, None, None])
            self.dec.weight.copy_(perm.T[:, :, None, None])

    def encode_latents(self, x: Tensor) -> Tensor:
        return self.enc(F.avg_pool2d(x, self.config.downsample_factor))

    def decode(self, z: Tensor) -> Tensor:
        return F.interpolate(self.dec(z), scale_factor=self.config.downsample_factor, mode="nearest")

    def forward(self, x, sample_posterior=True, generator=None, latent_transform=None):
        z = self.encode_latents(x)
        return decode_views(self.decode, z, latent_transform), DiagonalGaussian(torch.cat([z, 0 * z], 1))


def smooth_images(model: BlockAutoencoder, h: int, w: int, seed: int = 0) -> Tensor:
    """Images the block model reproduces whose latents are also constant on 4 x 4 blocks (so a 2x or 4x
    bilinear downscale of image and latent agree exactly); values are multiples of 1/8 in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(-8, 9, (2, 3, h // 4, w // 4), generator=g).float() / 8  # (B, 3, h/4, w/4)
    latents = model.enc(F.interpolate(coarse, scale_factor=4, mode="nearest"))  # (B, 3, h, w)
    return model.decode(latents)  # (B, 3, f h, f w)


def l2_loss() -> AutoencoderLoss:
    return AutoencoderLoss(LossConfig(rec_loss="l2", perceptual_weight=0.0))


def regularizers(factor: int = 4, scaling_factor: float = 1.0, **sections) -> LatentRegularizers:
    eq = sections.get("eq", EQVAEConfig())
    scale = sections.get("scale", ScaleEquivarianceConfig())
    noise = sections.get("noise", LatentNoiseConfig())
    return LatentRegularizers(eq, scale, noise, factor, scaling_factor)


def step_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def nll(loss: AutoencoderLoss, model: nn.Module, x: Tensor, plan: LatentPlan) -> list[float]:
    recons, reg = model(x, latent_transform=plan)
    return [
        loss.reconstruction_nll(t, r, reg)[0].item() for t, r in zip(plan.targets(x), recons, strict=True)
    ]


# ------------------------------------------------------------------------------------------- zero when equivariant


@pytest.mark.parametrize("factor", [2, 4])
def test_equivariant_model_scores_zero_on_every_flip_and_rotation(factor):
    model = BlockAutoencoder(factor)
    x = smooth_images(model, 16, 16)
    assert torch.equal(model(x)[0], x)  # it reproduces these images
    loss = l2_loss()
    for k, flip in D4:
        plan = LatentPlan((SpatialTransform(rot=k, flip=flip),), factor)
        recons, _ = model(x, latent_transform=plan)
        assert torch.equal(recons[0], plan.targets(x)[0]), (k, flip)
        assert nll(loss, model, x, plan) == [0.0]
    # The same through the per-step draws of EQ-VAE (rotations and flips, no downscale).
    regs = regularizers(factor, eq=EQVAEConfig(enabled=True, prob=1.0, min_scale=1.0, flips=True))
    drawn = set()
    for batch in range(12):
        plan = regs.draw(step_generator(0, 0, 0, batch), (16, 16))
        drawn.add((plan.views[0].rot, plan.views[0].flip))
        assert plan.eq_applied and nll(loss, model, x, plan) == [0.0]
    assert len(drawn) >= 4  # several group elements were exercised


@pytest.mark.parametrize("factor", [2, 4])
def test_equivariant_model_scores_zero_on_the_scale_term(factor):
    model = BlockAutoencoder(factor)
    x = smooth_images(model, 16, 16)
    loss = l2_loss()
    regs = regularizers(factor, scale=ScaleEquivarianceConfig(enabled=True))
    factors = set()
    for batch in range(8):
        plan = regs.draw(step_generator(0, 0, 0, batch), (16, 16))
        (main, *views), reg = model(x, latent_transform=plan)
        targets = plan.targets(x)
        assert torch.equal(main, x) and len(views) == 1
        term, logs = regs.scale_loss(loss, targets[1:], views, reg, x.shape[-2] * x.shape[-1])
        assert term.item() == 0.0 and logs["scale_eq"].item() == 0.0
        factors.add(x.shape[-1] // views[0].shape[-1])
    assert factors == {2, 4}


def test_transforms_that_disagree_between_image_and_latent_are_caught():
    """The zeros above are not vacuous: a rotation or flip applied differently to x and z scores above zero."""
    model, loss = BlockAutoencoder(4), l2_loss()
    x = smooth_images(model, 16, 16)
    recon = model.decode(torch.rot90(model.encode_latents(x), 1, dims=(-2, -1)))
    assert F.mse_loss(recon, torch.rot90(x, 3, dims=(-2, -1))).item() > 0.01  # opposite turns
    flipped = model.decode(torch.flip(model.encode_latents(x), dims=(-1,)))
    assert F.mse_loss(flipped, torch.flip(x, dims=(-2,))).item() > 0.01  # the other axis
    # A target resized to another multiple of the latent size cannot even be compared.
    plan = LatentPlan((SpatialTransform((8, 8)),), factor=2)  # says f = 2, the model has f = 4
    with pytest.raises(ValueError, match="differ in shape"):
        nll(loss, model, x, plan)


# ------------------------------------------------------------------------------------------- a random model


def test_a_random_model_scores_above_zero_on_every_transform():
    torch.manual_seed(0)
    model = AutoencoderKL.from_pretrained("tiny", block_out_channels=(8, 16, 16)).eval()  # f = 4
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = l2_loss()
    views = tuple(SpatialTransform(rot=k, flip=flip) for k, flip in D4[1:])
    with torch.no_grad():  # one forward decodes all seven non-trivial flips and rotations
        assert all(v > 0 for v in nll(loss, model, x, LatentPlan(views, 4)))
        regs = regularizers(4, scale=ScaleEquivarianceConfig(enabled=True))
        plan = regs.draw(step_generator(1), (8, 8))
        (_, *scaled), reg = model(x, sample_posterior=False, latent_transform=plan)
        term, _ = regs.scale_loss(loss, plan.targets(x)[1:], scaled, reg, 32 * 32)
        assert term.item() > 0
        scores = equivariance_psnr(model, x)
    assert set(scores) == {"identity", *EQUIVARIANCE_GROUPS["d4"], *EQUIVARIANCE_GROUPS["scale"]}
    assert all(torch.isfinite(v).all() for v in scores.values())


def test_equivariance_metric_is_exact_for_the_equivariant_model_at_any_shape():
    model = BlockAutoencoder(4)
    x = smooth_images(model, 16, 24)  # latents 16x24: rotations swap the sides of both
    scores = equivariance_psnr(model, x)
    assert set(scores) == {"identity", *EQUIVARIANCE_GROUPS["d4"], *EQUIVARIANCE_GROUPS["scale"]}
    assert all(torch.isinf(v).all() for v in scores.values()), scores
    # A rough image (not reproduced by the model) scores finite everywhere, identity included.
    rough = torch.rand(1, 3, 64, 96) * 2 - 1
    assert all(torch.isfinite(v).all() for v in equivariance_psnr(model, rough).values())
    with pytest.raises(ValueError, match="not a multiple of the model's factor 4"):
        equivariance_psnr(model, rough[..., :94])


# ------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_image_and_latent_transforms_align_with_the_models_factor(factor):
    regs = regularizers(
        factor,
        eq=EQVAEConfig(enabled=True, prob=1.0, flips=True),
        scale=ScaleEquivarianceConfig(enabled=True, factors=(2, 4)),
    )
    h = 16
    z = torch.randn(2, 4, h, h)
    x = torch.randn(2, 3, h * factor, h * factor)
    sizes = set()
    for batch in range(20):
        plan = regs.draw(step_generator(3, 0, 0, batch), (h, h))
        latents, targets = plan(z), plan.targets(x)
        assert len(latents) == len(targets) == 2
        for zt, xt in zip(latents, targets, strict=True):
            assert xt.shape[-2:] == (zt.shape[-2] * factor, zt.shape[-1] * factor)
        n = latents[0].shape[-1]
        assert math.ceil(0.25 * h) <= n <= h - 1  # EQ-VAE's sizes: [ceil(h / 4), h - 1]
        assert 1 <= plan.views[0].rot <= 3
        sizes.add(n)
    assert len(sizes) > 5


def test_evaluation_transforms_are_the_d4_group_and_two_downscales():
    z = torch.arange(2 * 4 * 4.0).reshape(1, 2, 4, 4)
    ts = evaluation_transforms((4, 4))
    assert torch.equal(ts["vflip"].latent(z), torch.flip(z, dims=(-2,)))
    assert torch.equal(ts["hflip"].latent(z), torch.flip(z, dims=(-1,)))
    assert torch.equal(ts["rot270"].latent(ts["rot90"].latent(z)), z)
    assert torch.equal(ts["down2"].latent(z), F.avg_pool2d(z, 2))  # 2x bilinear = 2x2 box average
    assert ts["down4"].latent(z).shape[-2:] == (1, 1)
    assert set(evaluation_transforms((2, 2))) == {*EQUIVARIANCE_GROUPS["d4"], "down2"}  # no 0-pixel latents


# ------------------------------------------------------------------------------------------- noise


def test_noise_with_sigma_zero_is_the_plain_reconstruction_exactly():
    torch.manual_seed(0)
    model = AutoencoderKL.from_pretrained("tiny")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = l2_loss()
    plain, reg = model(x, generator=torch.Generator().manual_seed(5))
    plan = regularizers(2, noise=LatentNoiseConfig(enabled=True, sigma_max=0.0)).draw(
        torch.Generator().manual_seed(5), (8, 8)
    )
    assert plan.noise == (0.0, 0.0)
    (noisy,), reg2 = model(x, generator=plan.generator, latent_transform=plan)
    assert torch.equal(noisy, plain)
    assert torch.equal(
        loss.generator_loss(x, noisy, reg2, None, None, 0)[0],
        loss.generator_loss(x, plain, reg, None, None, 0)[0],
    )


def test_noise_is_per_sample_in_diffusion_units_and_from_the_step_generator():
    regs = regularizers(
        2, scaling_factor=0.25, noise=LatentNoiseConfig(enabled=True, sigma_min=0.1, sigma_max=0.3)
    )
    z = torch.zeros(64, 4, 32, 32)
    plan = regs.draw(torch.Generator().manual_seed(1), (32, 32))
    assert plan.noise == pytest.approx((0.4, 1.2))  # raw units: sigma / scaling_factor
    (a,) = plan(z)
    stds = a.std(dim=(1, 2, 3))  # each sample's own sigma (4096 draws each)
    assert 0.38 < stds.min() < 0.6 and 1.0 < stds.max() < 1.22
    assert stds.std() > 0.15  # sigma differs per sample
    (b,) = regs.draw(torch.Generator().manual_seed(1), (32, 32))(z)
    (c,) = regs.draw(torch.Generator().manual_seed(2), (32, 32))(z)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------- draws


def test_draws_repeat_per_step_seed_and_differ_between_ranks():
    regs = regularizers(
        4,
        eq=EQVAEConfig(enabled=True, flips=True),
        scale=ScaleEquivarianceConfig(enabled=True),
    )

    def plans(rank: int) -> list:
        return [regs.draw(step_generator(0, rank, 0, b), (16, 16)).views for b in range(1, 41)]

    assert plans(0) == plans(0)  # a resumed step draws what the uninterrupted one drew
    assert plans(0) != plans(1)
    applied = [regs.draw(step_generator(0, 0, 1, b), (16, 16)).eq_applied for b in range(400)]
    assert 0.4 < sum(applied) / 400 < 0.6  # prob 0.5
    assert regularizers(4).draw(step_generator(0), (16, 16)) is None  # all off: the plain forward


# ------------------------------------------------------------------------------------------- config checks


def test_crops_the_transforms_cannot_map_are_refused_in_one_line():
    eq = EQVAEConfig(enabled=True)
    with pytest.raises(
        ValueError, match=r"^data.resolution 100 is not a multiple of the model's downsample factor 8"
    ):
        regularizers(8, eq=eq).check(100)
    scale = ScaleEquivarianceConfig(enabled=True, factors=(2, 4))
    with pytest.raises(
        ValueError, match=r"^scale_equivariance.factors 4 does not divide the 6-pixel latents"
    ):
        regularizers(8, scale=scale).check(48)
    regularizers(8, scale=scale).check(64)  # 8-pixel latents: both factors divide
    with pytest.raises(
        ValueError, match=r"^eq_vae.min_scale 0.25 makes 8-pixel images .* discriminator's 12 px"
    ):
        regularizers(2, eq=eq).check(32, min_image=12)
    with pytest.raises(ValueError, match=r"scale_equivariance.factors 4 makes 8-pixel images"):
        regularizers(2, scale=scale).check(32, min_image=12)
    with pytest.raises(ValueError, match=r"^eq_vae.min_scale 0.25: 1-pixel latents .* leave no smaller size"):
        regularizers(8, eq=eq).check(8)
    regularizers(8, noise=LatentNoiseConfig(enabled=True)).check(100)  # noise alone needs no alignment


def test_config_sections_check_their_values():
    for bad in (("eq_vae.prob", "1.5"), ("eq_vae.min_scale", "0"), ("scale_equivariance.factors", "1,2")):
        with pytest.raises(ConfigError, match=r"out of range"):
            load_config(tv.Config, None, [bad])
    with pytest.raises(ConfigError, match=r"sigma_max = 0\.01 is out of range"):
        load_config(tv.Config, None, [("latent_noise.sigma_min", "0.05"), ("latent_noise.sigma_max", "0.01")])
    with pytest.raises(ConfigError, match="leaves no transform"):
        load_config(
            tv.Config,
            None,
            [("eq_vae.enabled", "true"), ("eq_vae.min_scale", "1"), ("eq_vae.rotations", "false")],
        )
    with pytest.raises(ConfigError, match=r"unknown config key 'eq_vae\.probability'"):
        load_config(tv.Config, None, [("eq_vae.probability", "0.5")])
    cfg = load_config(tv.Config, None, [("scale_equivariance.factors", "2")])
    assert cfg.scale_equivariance.factors == (2,) and not cfg.eq_vae.enabled and not cfg.latent_noise.enabled
