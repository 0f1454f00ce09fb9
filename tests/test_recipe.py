"""Tests that pin the autoencoder recipe inside the trainer's objective (ldm_vae.training.train_vae): each one
fails for a change that the loss-level and end-to-end tests would not notice (found by a mutation run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _accelerate import fresh_accelerate  # noqa: F401 - autouse
from accelerate import Accelerator
from PIL import Image
from torch import nn

from ldm_vae import DiagonalGaussian
from ldm_vae.losses import AutoencoderLoss, LossConfig
from ldm_vae.training import OptimConfig, build_optimizer, build_scheduler, learning_rates, load_config
from ldm_vae.training import train_vae as tv

TINY = Path(__file__).resolve().parents[1] / "scripts" / "configs" / "tiny_cpu.toml"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import skimage.data

    folder = tmp_path_factory.mktemp("recipe_photos")
    for i, image in enumerate([skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()] * 4):
        Image.fromarray(image).resize((40 + i, 36 + i), Image.BICUBIC).save(folder / f"p{i:02d}.png")
    return folder


def objective(photos: Path, tmp_path: Path, *overrides: tuple[str, str]) -> tv.VAEObjective:
    base = [
        ("data.train_dir", str(photos)),
        ("train.output_dir", str(tmp_path / "run")),
        ("data.batch_size", "4"),
        ("data.num_workers", "0"),
        ("data.num_val", "2"),
        ("loss.disc_start", "0"),
        ("loss.disc_channels", "8"),
        ("train.tensorboard", "false"),
    ]
    cfg = load_config(tv.Config, TINY, [*base, *overrides])
    accelerator = Accelerator()
    obj = tv.VAEObjective(cfg, accelerator)
    obj.prepare(accelerator)
    return obj


def batch(seed: int = 0) -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def generator(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- optimizers


def test_learned_logvar_is_in_the_trainers_optimizer_and_moves(photos, tmp_path):
    obj = objective(
        photos,
        tmp_path,
        ("loss.learn_logvar", "true"),
        ("loss.logvar_init", "0.3"),
        ("optim.warmup_steps", "0"),
    )
    logvar = obj.loss_fn.logvar
    assert any(p is logvar for group in obj.opt_ae.param_groups for p in group["params"])
    for optimizer in obj.optimizers:
        optimizer.zero_grad()
    out = obj.loss(batch(), generator(), step=0)
    out.losses[0].backward()
    obj.apply_gradients(step=0)
    assert logvar.item() != pytest.approx(0.3, abs=1e-7)


def test_discriminator_optimizer_and_schedule_follow_the_config(photos, tmp_path):
    obj = objective(
        photos,
        tmp_path,
        ("optim.lr", "1e-3"),
        ("optim.disc_lr", "3e-4"),
        ("optim.betas", "0.6,0.95"),
        ("optim.eps", "1e-7"),
        ("optim.weight_decay", "0.01"),
        ("optim.warmup_steps", "4"),
    )
    ae, disc = obj.opt_ae.param_groups[0], obj.opt_d.param_groups[0]
    assert (ae["initial_lr"], disc["initial_lr"]) == (1e-3, 3e-4)
    for group in (ae, disc):
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.6, 0.95), 1e-7, 0.01)
    disc_params = {id(p) for p in obj.disc.parameters()}
    assert {id(p) for p in disc["params"]} == disc_params
    assert not disc_params & {id(p) for p in ae["params"]}
    # Linear warmup over 4 optimizer steps, on both schedules.
    for _ in range(2):
        for scheduler in obj.schedulers:
            scheduler.step()
    assert [s.get_last_lr()[0] for s in obj.schedulers] == pytest.approx([0.5e-3, 1.5e-4])


def test_learning_rates_scale_with_the_global_batch_only_when_asked():
    assert learning_rates(OptimConfig(lr=1e-4, disc_lr=2e-4), 4, 2, 3) == (1e-4, 2e-4)
    scaled = learning_rates(OptimConfig(lr=1e-4, scale_lr=True), 4, 2, 3)
    assert scaled == pytest.approx((1e-4 * 24, 1e-4 * 24))


def test_build_optimizer_and_cosine_schedule():
    p = nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(lr=1.0, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, schedule="cosine", warmup_steps=2)
    opt = build_optimizer([p], cfg, lr=0.5)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.5, (0.8, 0.9), 1e-6, 0.1)
    sched = build_scheduler(opt, cfg, max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # Warmup 0, 0.25 then cosine from 0.5 down: halfway through the decay (step 6 of 2..10) it is 0.25.
    assert lrs[:3] == pytest.approx([0.0, 0.25, 0.5]) and lrs[6] == pytest.approx(0.25)
    constant = build_scheduler(build_optimizer([p], OptimConfig(warmup_steps=0), lr=0.5), OptimConfig(), 10)
    assert constant.get_last_lr() == [0.5]


# ------------------------------------------------------------------------------------------- the step


def test_training_reconstructs_a_posterior_sample_drawn_from_the_step_generator(photos, tmp_path):
    obj = objective(photos, tmp_path, ("loss.disc_weight", "0"))
    x = batch()
    logs = obj.loss(x, generator(), step=0).logs
    sampled, _ = obj.model(x, sample_posterior=True, generator=generator())
    mean, _ = obj.model(x, sample_posterior=False)
    assert logs["rec"].item() == pytest.approx((x - sampled).abs().mean().item(), rel=1e-6)
    assert abs(logs["rec"].item() - (x - mean).abs().mean().item()) > 1e-4


def test_adaptive_weight_is_taken_on_the_decoders_last_layer(photos, tmp_path):
    obj = objective(photos, tmp_path, ("loss.disc_factor", "0.5"))
    x = batch()
    logs = obj.loss(x, generator(), step=0).logs
    # The same quantities by hand: Esser et al. eq. 7 on decoder.conv_out.weight.
    recon, posterior = obj.model(x, sample_posterior=True, generator=generator())
    logvar = obj.loss_fn.logvar
    nll = (((x - recon).abs()) / torch.exp(logvar) + logvar).sum() / x.shape[0]
    g = -obj.disc(recon).mean()
    layer = obj.model.decoder.conv_out.weight
    grads = [torch.autograd.grad(t, layer, retain_graph=True)[0] for t in (nll, g)]
    want = (grads[0].norm() / (grads[1].norm() + 1e-4)).clamp(0, 1e4) * 0.5  # disc_weight 0.5
    assert logs["d_weight"].item() == pytest.approx(want.item(), rel=1e-4)
    # disc_factor enters the generator loss exactly once.
    kl = posterior.regularization_loss()
    total = nll + 1e-6 * kl + want * 0.5 * g
    assert logs["total"].item() == pytest.approx(total.item(), rel=1e-5)
    assert logs["disc_factor"].item() == 0.5


def test_discriminator_loss_carries_the_factor_once_and_trains_in_train_mode(photos, tmp_path):
    obj = objective(photos, tmp_path, ("loss.disc_factor", "0.25"))
    norms = [m for m in obj.disc.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    out = obj.loss(batch(), generator(), step=0)
    d_loss = out.losses[1]
    assert d_loss.item() == pytest.approx(0.25 * out.logs["d_loss"].item(), rel=1e-6)
    # Train mode: BatchNorm normalizes with batch statistics and updates its running ones.
    assert obj.disc.training and all(
        not torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True)
    )


def test_generator_gradients_never_reach_the_discriminator(photos, tmp_path):
    obj = objective(photos, tmp_path)
    for optimizer in obj.optimizers:
        optimizer.zero_grad(set_to_none=True)
    g_loss, d_loss = obj.loss(batch(), generator(), step=0).losses
    g_loss.backward()
    assert all(p.grad is None for p in obj.disc.parameters())
    ae_grads = {n: p.grad.clone() for n, p in obj.model.named_parameters() if p.grad is not None}
    assert ae_grads
    d_loss.backward()
    assert all(p.grad is not None for p in obj.disc.parameters())
    # ... and the discriminator's loss sends nothing back into the autoencoder.
    for n, p in obj.model.named_parameters():
        if n in ae_grads:
            torch.testing.assert_close(p.grad, ae_grads[n], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- LPIPS in the loss


class StubPerceptual(nn.Module):
    """A perceptual distance with a known value and gradient: 10 * mean squared difference per image."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 10 * (x - y).pow(2).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)


def test_kl_recipe_sums_lpips_over_pixels_and_the_adaptive_weight_sees_it():
    torch.manual_seed(0)
    cfg = LossConfig(perceptual_weight=0.7, logvar_init=0.2, disc_start=0, disc_weight=1.0)
    loss = AutoencoderLoss(cfg, perceptual=StubPerceptual())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    layer = nn.Parameter(torch.randn(3, 3, 1, 1))
    recon = torch.nn.functional.conv2d(x, layer)  # a "decoder" whose last layer is `layer`
    logits = 1e3 * (recon * torch.linspace(-1, 1, 8)).mean(dim=1, keepdim=True)  # a "discriminator" on recon
    posterior = DiagonalGaussian(torch.zeros(2, 8, 4, 4))
    _, logs = loss.generator_loss(x, recon, posterior, logits, layer, step=0)

    p = 10 * (x - recon).pow(2).mean(dim=(1, 2, 3), keepdim=True)
    nll = (((x - recon).abs() + 0.7 * p) / torch.exp(torch.tensor(0.2)) + 0.2).sum() / 2  # per pixel, summed
    assert logs["nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert logs["perceptual"].item() == pytest.approx(p.mean().item(), rel=1e-5)
    g = -logits.mean()
    grads = [torch.autograd.grad(t, layer, retain_graph=True)[0] for t in (nll, g)]
    want = grads[0].norm() / (grads[1].norm() + 1e-4)
    assert logs["d_weight"].item() == pytest.approx(want.item(), rel=1e-4)
    nll_without_lpips = (((x - recon).abs()) / torch.exp(torch.tensor(0.2)) + 0.2).sum() / 2
    without = torch.autograd.grad(nll_without_lpips, layer, retain_graph=True)[0].norm() / (
        grads[1].norm() + 1e-4
    )
    assert abs(without.item() - want.item()) > 0.01 * want.item()  # the check above can tell them apart


def test_fp16_scaler_unscales_both_optimizers_with_one_scale_and_updates_once(photos, tmp_path):
    """With fp16 on a GPU, Accelerate's optimizer wrapper updates the GradScaler after each optimizer: the
    discriminator would unscale with a scale the autoencoder's step had just grown. A CPU GradScaler shows it."""
    obj = objective(photos, tmp_path, ("optim.warmup_steps", "0"))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)  # grows 2x at every update
    obj.accelerator.scaler = scaler
    for optimizer in obj.optimizers:
        optimizer.zero_grad(set_to_none=True)
    g_loss, d_loss = obj.loss(batch(), generator(), step=0).losses
    scaler.scale(g_loss).backward()
    scaler.scale(d_loss).backward()
    true_d = {n: p.grad / 4.0 for n, p in obj.disc.named_parameters()}
    obj.apply_gradients(step=0)
    for n, p in obj.disc.named_parameters():  # unscaled in place by the scale the gradients were made with
        torch.testing.assert_close(p.grad, true_d[n], rtol=1e-6, atol=0)
    assert scaler.get_scale() == 8.0  # one update per optimizer step, not one per optimizer


# ------------------------------------------------------------------------------------------- latent regularizers


def test_eq_vae_step_compares_the_decode_of_tau_z_with_tau_x(photos, tmp_path):
    obj = objective(
        photos,
        tmp_path,
        ("eq_vae.enabled", "true"),
        ("eq_vae.prob", "1"),
        ("eq_vae.min_scale", "0.5"),  # 16-30 px images: the 2-layer discriminator takes >= 12
    )
    x = batch()
    out = obj.loss(x, generator(), step=0)
    assert out.logs["eq_applied"].item() == 1.0 and out.losses[1] is not None  # the GAN ran on tau(x) too
    plan = obj.latent_regs.draw(generator(), (16, 16))
    tau = plan.views[0]
    assert tau.size is not None and tau.size[0] < 16 and 1 <= tau.rot <= 3
    (recon,), _ = obj.model(x, sample_posterior=True, generator=generator(), latent_transform=plan)
    target = plan.targets(x)[0]
    assert target.shape[-2:] == (2 * tau.size[0], 2 * tau.size[1])
    assert out.logs["rec"].item() == pytest.approx((target - recon).abs().mean().item(), rel=1e-6)
    # ... to a precision that tells another quarter turn of the target apart.
    other = torch.rot90(target, 2, dims=(-2, -1))
    assert out.logs["rec"].item() != pytest.approx((other - recon).abs().mean().item(), rel=1e-4)


def test_scale_equivariance_adds_the_downscaled_term_per_pixel(photos, tmp_path):
    obj = objective(
        photos,
        tmp_path,
        ("loss.disc_weight", "0"),
        ("scale_equivariance.enabled", "true"),
        ("scale_equivariance.factors", "2"),
        ("scale_equivariance.weight", "0.5"),
    )
    x = batch()
    logs = obj.loss(x, generator(), step=0).logs
    recon, posterior = obj.model(x, sample_posterior=True, generator=generator())
    z = posterior.sample(generator())
    small = obj.model._decode(torch.nn.functional.avg_pool2d(z, 2))  # 2x bilinear = 2x2 average
    x_small = torch.nn.functional.avg_pool2d(x, 2)
    se = (x_small - small).abs().sum() / 4 * 4  # LDM's sum over pixels, scaled back to full resolution
    assert logs["scale_eq"].item() == pytest.approx(se.item(), rel=1e-5)
    nll = (x - recon).abs().sum() / 4
    total = nll + 1e-6 * posterior.regularization_loss() + 0.5 * se
    assert logs["total"].item() == pytest.approx(total.item(), rel=1e-5)


def test_latent_noise_with_sigma_zero_leaves_the_step_bit_for_bit_unchanged(photos, tmp_path):
    plain = objective(photos, tmp_path)
    zero = objective(photos, tmp_path, ("latent_noise.enabled", "true"), ("latent_noise.sigma_max", "0"))
    noisy = objective(photos, tmp_path, ("latent_noise.enabled", "true"), ("latent_noise.sigma_max", "0.5"))
    x = batch()
    want = plain.loss(x, generator(), step=0).losses
    got = zero.loss(x, generator(), step=0).losses
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert not torch.equal(noisy.loss(x, generator(), step=0).losses[0], want[0])


# ------------------------------------------------------------------------------------------- LDM's second pass


def test_second_pass_discriminator_judges_the_updated_autoencoder_with_a_new_sample(photos, tmp_path):
    """disc_second_pass = true is LDM's Lightning order: the autoencoder steps, then runs again (a new posterior
    sample from the step's generator) for the discriminator's loss."""
    import copy

    obj = objective(photos, tmp_path, ("loss.disc_second_pass", "true"), ("optim.warmup_steps", "0"))
    for optimizer in obj.optimizers:
        optimizer.zero_grad(set_to_none=True)
    x, gen = batch(), generator()
    ae_before, disc_before = copy.deepcopy(obj.model), copy.deepcopy(obj.disc)
    g_loss, d_loss = obj.loss(x, gen, step=0).losses
    assert d_loss is None  # nothing for the discriminator yet
    g_loss.backward()
    after_first = gen.get_state()
    seen = {}
    inner = obj.opt_d.optimizer
    real_step = inner.step

    def spy(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in obj.disc.named_parameters()})
        return real_step(*args, **kwargs)

    inner.step = spy
    obj.apply_gradients(step=0)
    assert seen and not obj.disc_batches

    def disc_grads(ae: nn.Module) -> dict[str, torch.Tensor]:
        disc = copy.deepcopy(disc_before)
        recon, _ = ae(x, sample_posterior=True, generator=torch.Generator().set_state(after_first))
        loss, _ = obj.loss_fn.discriminator_loss(disc(x), disc(recon.detach()), 0)
        loss.backward()
        return {n: p.grad for n, p in disc.named_parameters()}

    want, stale = disc_grads(obj.model), disc_grads(ae_before)
    for n, g in seen.items():
        torch.testing.assert_close(g, want[n], rtol=1e-5, atol=1e-7)
    assert any((seen[n] - stale[n]).abs().max() > 1e-6 for n in seen)  # the pre-step autoencoder differs
    assert "d_loss" in obj.loss(x, generator(), step=1).logs  # its logs join the next micro-step's


def test_second_pass_trains_end_to_end_and_differs_from_one_forward(photos, tmp_path):
    runs = {}
    for second in ("false", "true"):
        obj_dir = tmp_path / second
        cfg = load_config(
            tv.Config,
            TINY,
            [
                ("data.train_dir", str(photos)),
                ("train.output_dir", str(obj_dir)),
                ("data.batch_size", "4"),
                ("data.num_workers", "0"),
                ("data.num_val", "2"),
                ("loss.disc_start", "0"),
                ("loss.disc_channels", "8"),
                ("loss.disc_second_pass", second),
                ("train.max_steps", "2"),
                ("train.ema_decay", "0"),
                ("train.tensorboard", "false"),
                ("optim.warmup_steps", "0"),
            ],
        )
        from safetensors.torch import load_file

        runs[second] = load_file(tv.main(cfg) / "diffusion_pytorch_model.safetensors")
    # Step 1's autoencoder update is the same (same discriminator); after it the discriminators differ, so the
    # second step's autoencoder update differs too.
    assert any(not torch.equal(runs["false"][k], runs["true"][k]) for k in runs["false"])
