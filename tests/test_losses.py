"""Tests of the autoencoder training losses (ldm_vae/losses.py): values, gradients, schedules, LPIPS plumbing."""

from __future__ import annotations

import math

import lpips
import pytest
import torch
from torch import nn

from ldm_vae import AutoencoderKL, DiagonalGaussian
from ldm_vae.checkpoint import CheckpointError
from ldm_vae.losses import (
    AutoencoderLoss,
    LossConfig,
    MissingWeightsError,
    NLayerDiscriminator,
    PerceptualLoss,
    backbone_weights_path,
    build_discriminator,
    build_lpips,
    generator_adversarial_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm_vae.vq import VQInfo

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 0.5])


def vq_info(loss: torch.Tensor) -> VQInfo:
    """A quantizer report with the given loss (indices and usage do not enter the loss)."""
    zero = torch.zeros(())
    return VQInfo(
        torch.zeros(2, 4, 4, dtype=torch.long),
        loss,
        zero,
        zero,
        usage=torch.tensor(0.5),
        perplexity=torch.tensor(2.0),
    )


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


@pytest.fixture(scope="module")
def alex() -> PerceptualLoss:
    """LPIPS with a random AlexNet backbone (the package's own linear weights; nothing downloaded)."""
    return build_lpips("alex", random_backbone=True)


@pytest.fixture
def setup():
    """A tiny KL autoencoder, a small discriminator and a batch of two 32x32 images."""
    torch.manual_seed(0)
    model = AutoencoderKL.from_pretrained("tiny")
    disc = NLayerDiscriminator(channels=8, n_layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return model, disc, x


def no_lpips(**kw) -> LossConfig:
    return LossConfig(perceptual_weight=0.0, **kw)


# ------------------------------------------------------------------------------------- GAN losses


def test_discriminator_losses_on_hand_made_logits():
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 1.5]: 0.5 * (2.5/3 + 2.5/3).
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(5 / 6)
    want = 0.5 * (sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3)
    assert vanilla_d_loss(REAL, FAKE).item() == pytest.approx(want)
    # A perfect discriminator (|logits| >= 1 on the right side) has zero hinge loss.
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0


def test_generator_adversarial_terms():
    assert generator_adversarial_loss(FAKE, "hinge").item() == pytest.approx(0.5)
    want = sum(softplus(-f) for f in FAKE.tolist()) / 3
    assert generator_adversarial_loss(FAKE, "vanilla").item() == pytest.approx(want)


def test_discriminator_loss_schedule_and_logs():
    loss = AutoencoderLoss(no_lpips(disc_start=10, disc_factor=0.7))
    before, logs = loss.discriminator_loss(REAL, FAKE, step=9)
    assert before.item() == 0.0 and logs["d_loss"].item() == pytest.approx(5 / 6)
    after, logs = loss.discriminator_loss(REAL, FAKE, step=10)
    assert after.item() == pytest.approx(0.7 * 5 / 6)
    assert logs["logits_real"].item() == pytest.approx(0.5)
    assert logs["logits_fake"].item() == pytest.approx(-0.5)
    vanilla = AutoencoderLoss(no_lpips(disc_loss="vanilla", disc_start=0))
    want = vanilla_d_loss(REAL, FAKE).item()
    assert vanilla.discriminator_loss(REAL, FAKE, 0)[0].item() == pytest.approx(want)


def test_disc_factor_at():
    loss = AutoencoderLoss(no_lpips(disc_start=100, disc_factor=0.5))
    assert [loss.disc_factor_at(s) for s in (0, 99, 100, 10**6)] == [0.0, 0.0, 0.5, 0.5]


# ------------------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("n_layers", [2, 3])
def test_discriminator_output_shape(size, n_layers):
    disc = NLayerDiscriminator(channels=8, n_layers=n_layers)
    side = size // 2**n_layers - 2  # n stride-2 convs, then two 4x4 stride-1 pad-1 convs (-1 each)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, side, side)


def test_discriminator_layout_and_init():
    torch.manual_seed(0)
    disc = build_discriminator(LossConfig())  # 64 channels, 3 layers: taming's default
    # taming's parameter names, so its discriminator checkpoints load.
    assert [k for k in disc.state_dict() if k.endswith(("weight", "bias"))] == [
        "main.0.weight", "main.0.bias",
        "main.2.weight", "main.3.weight", "main.3.bias",
        "main.5.weight", "main.6.weight", "main.6.bias",
        "main.8.weight", "main.9.weight", "main.9.bias",
        "main.11.weight", "main.11.bias",
    ]  # fmt: skip
    assert [m.out_channels for m in disc.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 1]
    convs = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, nn.Conv2d)])
    assert abs(convs.mean().item()) < 1e-3 and convs.std().item() == pytest.approx(0.02, rel=0.02)
    bns = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight for m in bns])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.01)
    assert scales.std().item() == pytest.approx(0.02, rel=0.2)
    assert all((m.bias == 0).all() for m in bns)


def test_discriminator_rejects_too_small_input():
    with pytest.raises(ValueError, match=r"H, W >= 24"):
        NLayerDiscriminator(channels=8, n_layers=3)(torch.randn(1, 3, 16, 16))


# ------------------------------------------------------------------------------------- generator loss


def test_kl_term_zero_for_standard_normal_and_formula_otherwise():
    loss = AutoencoderLoss(no_lpips())
    x = torch.rand(2, 3, 8, 8)
    _, logs = loss.generator_loss(x, x, DiagonalGaussian(torch.zeros(2, 8, 4, 4)), None, None, step=0)
    assert logs["kl"].item() == 0.0 and logs["nll"].item() == 0.0 and logs["total"].item() == 0.0

    moments = torch.randn(2, 8, 4, 4)
    mu, lv = moments.chunk(2, dim=1)
    want = 0.5 * (mu**2 + lv.exp() - 1 - lv).sum() / 2  # summed over C, H, W, averaged over the batch
    _, logs = loss.generator_loss(x, x, DiagonalGaussian(moments), None, None, step=0)
    assert logs["kl"].item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["total"].item() == pytest.approx(1e-6 * want.item(), rel=1e-5)


@pytest.mark.parametrize("rec_loss", ["l1", "l2"])
def test_nll_normalisation_kl_sums_and_vq_averages(rec_loss):
    torch.manual_seed(0)
    x, recon = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    diff = (x - recon).abs() if rec_loss == "l1" else (x - recon) ** 2
    nll = diff / math.exp(0.5) + 0.5
    cfg = no_lpips(rec_loss=rec_loss, logvar_init=0.5, codebook_weight=2.0)
    posterior = DiagonalGaussian(torch.zeros(2, 8, 4, 4))
    _, logs = AutoencoderLoss(cfg).generator_loss(x, recon, posterior, None, None, 0)
    assert logs["nll"].item() == pytest.approx(nll.sum().item() / 2, rel=1e-5)  # LDM: sum / batch
    assert logs["rec"].item() == pytest.approx(diff.mean().item(), rel=1e-5)

    info = vq_info(torch.tensor(0.25))
    total, logs = AutoencoderLoss(cfg).generator_loss(x, recon, info, None, None, 0)
    assert logs["nll"].item() == pytest.approx(nll.mean().item(), rel=1e-5)  # taming: mean
    assert logs["codebook"].item() == 0.25 and "kl" not in logs
    assert total.item() == pytest.approx(nll.mean().item() + 2.0 * 0.25, rel=1e-5)


def test_gan_term_off_before_disc_start_and_on_at_it(setup, monkeypatch):
    model, disc, x = setup
    loss = AutoencoderLoss(no_lpips(disc_start=5))
    recon, post = model(x)
    logits = disc(recon)
    real_grad = torch.autograd.grad

    def no_grad_work(*a, **k):
        raise AssertionError("adaptive weight computed before disc_start")

    monkeypatch.setattr(torch.autograd, "grad", no_grad_work)
    total, logs = loss.generator_loss(x, recon, post, logits, model.decoder.conv_out.weight, step=4)
    assert logs["d_weight"].item() == 0.0 and logs["disc_factor"].item() == 0.0
    assert total.item() == (logs["nll"] + 1e-6 * logs["kl"]).item()  # exactly: no GAN term added
    monkeypatch.setattr(torch.autograd, "grad", real_grad)

    total, logs = loss.generator_loss(x, recon, post, logits, model.decoder.conv_out.weight, step=5)
    assert logs["d_weight"].item() > 0 and logs["disc_factor"].item() == 1.0 and logs["g"].item() != 0
    gan = total - (logs["nll"] + 1e-6 * logs["kl"])
    assert gan.item() == pytest.approx((logs["d_weight"] * logs["g"]).item(), rel=1e-4, abs=1e-6)


def test_adaptive_weight_is_ratio_of_gradient_norms(setup):
    model, disc, x = setup
    last = model.decoder.conv_out.weight
    recon, post = model(x)
    logits = disc(recon)
    _, logs = AutoencoderLoss(no_lpips(disc_start=0, disc_weight=0.5)).generator_loss(
        x, recon, post, logits, last, step=0
    )
    # By hand: LDM's nll with logvar 0 is sum|x - recon| / B; the hinge generator term is -mean(D(recon)).
    (nll_grad,) = torch.autograd.grad((x - recon).abs().sum() / 2, last, retain_graph=True)
    (g_grad,) = torch.autograd.grad(-logits.mean(), last)
    want = 0.5 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    assert logs["d_weight"].item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["g"].item() == pytest.approx(-logits.mean().item(), rel=1e-6)


def test_adaptive_weight_clamp_fixed_weight_and_validation(setup):
    model, disc, x = setup
    last = model.decoder.conv_out.weight
    recon, post = model(x)
    logits = disc(recon)
    args = (x, recon, post, logits, last, 0)
    clamped = AutoencoderLoss(no_lpips(disc_start=0, adaptive_weight_max=1e-3, disc_weight=0.5))
    assert clamped.generator_loss(*args)[1]["d_weight"].item() == pytest.approx(0.5e-3)
    fixed = AutoencoderLoss(no_lpips(disc_start=0, adaptive_weight=False, disc_weight=0.3))
    assert fixed.generator_loss(*args)[1]["d_weight"].item() == pytest.approx(0.3)
    # Validation without gradients: no autograd error, and no GAN term (as LDM).
    with torch.no_grad():
        recon, post = model(x)
        _, logs = clamped.generator_loss(x, recon, post, disc(recon), last, 0)
    assert logs["d_weight"].item() == 0.0 and torch.isfinite(logs["total"])


def test_last_layer_outside_the_graph_is_one_line_error(setup):
    model, disc, x = setup
    recon, post = model(x)
    loss = AutoencoderLoss(no_lpips(disc_start=0))
    with pytest.raises(ValueError, match="not in the graph"):
        loss.generator_loss(x, recon, post, disc(recon), nn.Parameter(torch.zeros(3, 8, 3, 3)), 0)
    with pytest.raises(ValueError, match="needs last_layer"):
        loss.generator_loss(x, recon, post, disc(recon), None, 0)


def test_generator_loss_under_bf16_autocast(setup):
    model, disc, x = setup
    loss = AutoencoderLoss(no_lpips(disc_start=0))
    last = model.decoder.conv_out.weight
    recon, post = model(x, sample_posterior=False)
    ref = loss.generator_loss(x, recon, post, disc(recon), last, 0)[1]["d_weight"].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, post = model(x, sample_posterior=False)
        total, logs = loss.generator_loss(x, recon, post, disc(recon), last, 0)
    total.backward()
    assert total.dtype == torch.float32 and torch.isfinite(last.grad).all()
    assert logs["d_weight"].item() == pytest.approx(ref, rel=0.1)  # same balance up to bf16 rounding


def test_generator_loss_backward_reaches_every_autoencoder_parameter(setup):
    model, disc, x = setup
    loss = AutoencoderLoss(no_lpips(disc_start=0))
    recon, post = model(x)
    total, _ = loss.generator_loss(x, recon, post, disc(recon), model.decoder.conv_out.weight, 0)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_shape_mismatch_is_one_line_error():
    loss = AutoencoderLoss(no_lpips())
    with pytest.raises(ValueError, match=r"differ in shape"):
        loss.generator_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), None, None, None, 0)


def test_config_validation():
    with pytest.raises(ValueError, match="disc_loss"):
        LossConfig(disc_loss="wgan")
    with pytest.raises(ValueError, match="lpips_net"):
        LossConfig(lpips_net="squeeze")
    with pytest.raises(ValueError, match="no weight for a 'entropy' regularizer"):
        no_lpips().regularizer_weight("entropy")


# ------------------------------------------------------------------------------------- learned logvar


def test_learned_logvar_is_optimised():
    cfg = no_lpips(learn_logvar=True, logvar_init=0.2)
    loss = AutoencoderLoss(cfg)
    params = loss.trainable_parameters()
    assert params == [loss.logvar] and loss.logvar.requires_grad
    assert list(loss.state_dict()) == ["logvar"]  # resumable; nothing else (no LPIPS) in it
    x, recon = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    opt = torch.optim.SGD(params, lr=0.1)
    total, _ = loss.generator_loss(x, recon, DiagonalGaussian(torch.zeros(2, 8, 4, 4)), None, None, 0)
    total.backward()
    # d/ds sum(r e^-s + s) / B = sum(1 - r e^-s) / B
    want = (1 - (x - recon).abs() * math.exp(-0.2)).sum() / 2
    assert loss.logvar.grad.item() == pytest.approx(want.item(), rel=1e-5)
    opt.step()
    assert loss.logvar.item() == pytest.approx(0.2 - 0.1 * want.item(), rel=1e-5)


def test_fixed_logvar_has_no_trainable_parameters():
    loss = AutoencoderLoss(no_lpips(logvar_init=0.3))
    assert loss.trainable_parameters() == [] and list(loss.parameters()) == [] and loss.state_dict() == {}
    assert loss.logvar.item() == pytest.approx(0.3)


# ------------------------------------------------------------------------------------- LPIPS


def test_missing_backbone_weights_fail_fast_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*a, **k):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    for net, name in (("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")):
        want = tmp_path / "hub" / "checkpoints" / name
        assert backbone_weights_path(net) == want
        with pytest.raises(MissingWeightsError, match="perceptual_weight = 0") as err:
            AutoencoderLoss(LossConfig(lpips_net=net))
        assert str(want) in str(err.value) and "\n" not in str(err.value)


def test_perceptual_weight_zero_never_builds_lpips(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def never(*a, **k):
        raise AssertionError("LPIPS constructed")

    monkeypatch.setattr(lpips, "LPIPS", never)
    loss = AutoencoderLoss(no_lpips())
    assert loss.perceptual is None
    x = torch.rand(1, 3, 8, 8)
    _, logs = loss.generator_loss(x, x, DiagonalGaussian(torch.zeros(1, 8, 4, 4)), None, None, 0)
    assert logs["perceptual"].item() == 0.0


def test_lpips_plumbing(alex):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    assert alex(x, x).flatten().tolist() == [0.0, 0.0]
    d = alex(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    d.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert list(alex.parameters()) == [] and alex.state_dict() == {}
    assert all(not p.requires_grad and p.grad is None for p in alex.lpips.parameters())
    # The package's linear weights were loaded (random init would not give these values).
    shipped = torch.load(f"{lpips.__path__[0]}/weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    assert torch.equal(alex.lpips.lin0.model[1].weight, shipped["lin0.model.1.weight"])


def test_lpips_stays_frozen_in_eval_through_train_and_casts(alex):
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    alex.train()
    assert not alex.lpips.training  # dropout in lpips' linear layers stays off
    assert torch.equal(alex(x, y), alex(x, y))
    alex.double()
    try:
        assert alex.lpips.lin0.model[1].weight.dtype == torch.float64
        assert alex(x.double(), y.double()).dtype == torch.float64
    finally:
        alex.float()


def test_generator_loss_with_lpips_sends_gradient_to_recon(alex, monkeypatch):
    monkeypatch.setattr("ldm_vae.losses.build_lpips", lambda net, random_backbone: alex)
    loss = AutoencoderLoss(LossConfig(lpips_net="alex", perceptual_weight=1.0))
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    info = vq_info(torch.tensor(0.0))
    total, logs = loss.generator_loss(x, recon, info, None, None, 0)
    p = alex(x, recon).detach()
    assert logs["perceptual"].item() == pytest.approx(p.mean().item(), rel=1e-5)
    assert total.item() == pytest.approx(((x - recon).abs().mean() + p.mean()).item(), rel=1e-5)
    (pixel_only,) = torch.autograd.grad((x - recon).abs().mean(), recon)
    total.backward()
    assert (recon.grad - pixel_only).abs().sum() > 0  # the LPIPS term contributes a gradient
    assert loss.state_dict() == {} and list(loss.parameters()) == []


def test_pretrained_backbone_loaded_from_torch_home(alex, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # A torchvision-layout file ("features.<i>.*"; the classifier is ignored) with recognisable values.
    torch.manual_seed(1)
    features = {
        f"features.{k.split('.', 1)[1]}": torch.randn_like(v) for k, v in alex.lpips.net.state_dict().items()
    }
    path = backbone_weights_path("alex")
    path.parent.mkdir(parents=True)
    torch.save(features, path)
    loaded = build_lpips("alex")
    assert torch.equal(loaded.lpips.net.slice1[0].weight, features["features.0.weight"])
    assert torch.equal(loaded.lpips.net.get_parameter("slice5.10.bias"), features["features.10.bias"])

    torch.save({"features.0.weight": features["features.0.weight"]}, path)
    with pytest.raises(CheckpointError, match="not the torchvision ImageNet checkpoint"):
        build_lpips("alex")


# ------------------------------------------------------------------------------------- VQ end to end


def test_vq_autoencoder_end_to_end():
    vq = pytest.importorskip("ldm_vae.vq")
    torch.manual_seed(0)
    model = vq.VQAutoencoder.from_pretrained("tiny")
    disc = NLayerDiscriminator(channels=8, n_layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, info = model(x)
    loss = AutoencoderLoss(no_lpips(disc_start=0))
    total, logs = loss.generator_loss(x, recon, info, disc(recon), model.decoder.conv_out.weight, 0)
    assert logs["codebook"].item() == pytest.approx(info.loss.item())
    assert logs["d_weight"].item() > 0
    total.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
