"""Latent DDPM (ldm_vae/ldm.py, scripts/train_ldm.py, `ldm-vae sample`/`ldm-eval`): training, sampling, the
variational bound in bits/dim, and the exported diffusers LDMPipeline."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _accelerate import reset_accelerate
from _diffusers_log import load_quietly
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_vae import AutoencoderKL
from ldm_vae.cli import main as cli_main
from ldm_vae.latents import LatentDataset, cache_latents
from ldm_vae.ldm import (
    NoiseConfig,
    UNetConfig,
    build_noise_scheduler,
    build_unet,
    decode_latents,
    diffusion_loss,
    export_pipeline,
    gaussian_baselines,
    gaussian_bits_per_dim,
    ledoit_wolf,
    load_pipeline,
    sample_latents,
    sampling_scheduler,
    vlb_bits_per_dim,
)
from ldm_vae.training import load_config, read_metrics
from ldm_vae.training import train_ldm as tl

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = UNetConfig(
    block_out_channels=(8, 16), attention_levels=(1,), attention_head_dim=8, norm_num_groups=4
)
ENTROPY_N01 = 0.5 * math.log2(2 * math.pi * math.e)  # differential entropy of N(0, 1), bits


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add spin-waiting on a shared machine
    reset_accelerate()
    yield
    reset_accelerate()
    torch.set_num_threads(threads)


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_unet(TINY_UNET, latent_channels=4, latent_size=8).eval()


def structured_latents(n: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth unit-variance fields (2x2 upsampled to 8x8) plus a little noise: low intrinsic dimension."""
    z = F.interpolate(
        torch.randn(n, 4, 2, 2, generator=generator), size=8, mode="bilinear", align_corners=False
    )
    z = z / z.std() + 0.1 * torch.randn(z.shape, generator=generator)
    return z / z.std()


# ------------------------------------------------------------------------------------------- training


def test_a_few_training_steps_reduce_the_loss():
    g = torch.Generator().manual_seed(0)
    data = structured_latents(256, g)
    unet, scheduler = tiny_unet().train(), build_noise_scheduler(NoiseConfig())
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)

    def held_out_loss() -> float:
        with torch.no_grad():
            return diffusion_loss(unet, scheduler, data[:64], torch.Generator().manual_seed(1)).item()

    before = held_out_loss()
    for _ in range(40):
        loss = diffusion_loss(unet, scheduler, data[torch.randint(0, 256, (32,), generator=g)], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.5 * before


def test_unet_config_errors():
    with pytest.raises(ValueError, match="attention level 2 does not exist"):
        build_unet(UNetConfig(block_out_channels=(8, 16), attention_levels=(2,), norm_num_groups=4), 4, 8)
    with pytest.raises(ValueError, match="not divisible by 4"):
        build_unet(UNetConfig(block_out_channels=(8, 16, 16), norm_num_groups=4), 4, 6)


# ------------------------------------------------------------------------------------------- sampling


def test_sampling_shapes_and_seeds():
    unet, train = tiny_unet(), build_noise_scheduler(NoiseConfig())
    for kind in ("ddim", "ddpm"):
        sched = sampling_scheduler(train, kind)

        def run(seed: int, sched=sched) -> torch.Tensor:
            return sample_latents(unet, sched, 3, 6, torch.Generator().manual_seed(seed))

        a, b, c = run(0), run(0), run(1)
        assert a.shape == (3, 4, 8, 8) and torch.isfinite(a).all()
        assert torch.equal(a, b) and not torch.allclose(a, c)


def test_ddim_eta0_is_deterministic_given_the_initial_noise():
    unet, train = tiny_unet(), build_noise_scheduler(NoiseConfig())
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ddim = sampling_scheduler(train, "ddim")
    outs = [sample_latents(unet, ddim, 2, 8, torch.Generator().manual_seed(s), noise=noise) for s in (1, 2)]
    assert torch.equal(outs[0], outs[1])  # the generator is never drawn from
    # Per-sample: a batch of one gives the same latent as its row in a batch of two, up to rounding (the batch
    # size picks the conv kernels: 2e-5 apart after 8 steps on an AVX2 CPU; a leak between samples is O(1)).
    one = sample_latents(unet, ddim, 1, 8, noise=noise[1:])
    torch.testing.assert_close(one[0], outs[0][1], atol=1e-4, rtol=1e-4)
    stochastic = [
        sample_latents(unet, ddim, 2, 8, torch.Generator().manual_seed(s), eta=1.0, noise=noise)
        for s in (1, 2)
    ]
    assert not torch.allclose(stochastic[0], stochastic[1])
    ddpm = sampling_scheduler(train, "ddpm")
    stochastic = [
        sample_latents(unet, ddpm, 2, 8, torch.Generator().manual_seed(s), noise=noise) for s in (1, 2)
    ]
    assert not torch.allclose(stochastic[0], stochastic[1])


# ------------------------------------------------------------------------------------------- bits per dim


def test_standard_normal_latents_cost_the_analytic_entropy_under_the_prior():
    x = torch.randn(4000, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # E[-log2 N(x; 0, 1)] = 0.5 * log2(2 pi e) = 2.047 bits/dim (continuous density, no discretization).
    assert gaussian_bits_per_dim(x).mean().item() == pytest.approx(ENTROPY_N01, abs=3e-3)
    assert gaussian_bits_per_dim(torch.zeros(1, 3, 2, 2)).item() == pytest.approx(
        0.5 * math.log2(2 * math.pi)
    )


def optimal_denoiser(scheduler, s: float):
    """E[eps | x_t] for x_0 ~ N(0, s^2 I): the best possible eps prediction, in closed form."""
    abar = scheduler.alphas_cumprod

    def unet(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(1 - a).sqrt() * x / (a * s * s + 1 - a))

    return unet


@pytest.mark.parametrize(
    ("variance_type", "s"), [("fixed_small", 0.3), ("fixed_large", 0.3), ("fixed_small", 30.0)]
)
def test_bound_of_the_optimal_denoiser_on_gaussian_data_matches_its_expectation(variance_type, s):
    sched = build_noise_scheduler(NoiseConfig(variance_type=variance_type))
    x = s * torch.randn(2048, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # MC error ~0.01 bits
    exact = vlb_bits_per_dim(optimal_denoiser(sched, s), sched, x, None, torch.Generator().manual_seed(1))
    # The expectation, written independently from DDPM eq. 5/12: with eps error E||.||^2 = 1 - (1-abar)/v per
    # dim (v = abar s^2 + 1 - abar), L_{t-1} = KL of equal-mean-error Gaussians, L_0 a Gaussian NLL.
    betas, abar = sched.betas.double(), sched.alphas_cumprod.double()
    alphas, abar_prev = 1 - betas, torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    mse = 1 - (1 - abar) / (abar * s * s + 1 - abar)
    q_var = betas * (1 - abar_prev) / (1 - abar)
    p_var = q_var.clone() if variance_type == "fixed_small" else betas.clone()
    p_var[0] = q_var[1]
    t = torch.arange(1, len(betas))
    kl = 0.5 * (torch.log(p_var[t] / q_var[t]) + q_var[t] / p_var[t] - 1)
    kl += betas[t] ** 2 / (2 * p_var[t] * alphas[t] * (1 - abar[t])) * mse[t]
    l0 = 0.5 * torch.log(2 * math.pi * p_var[0]) + (1 - abar[0]) / abar[0] * mse[0] / (2 * p_var[0])
    lt = 0.5 * (abar[-1] * s * s - abar[-1] - torch.log(1 - abar[-1]))
    expected = ((lt + kl.sum() + l0) / math.log(2)).item()
    assert exact["total"].mean().item() == pytest.approx(expected, abs=0.02)
    # L_T of each sample in closed form (its x, not the expectation): exact to float64 rounding. For s = 30 it
    # is ~0.09 bits/dim, so a bound that dropped it or flipped its sign would miss ``expected`` above by
    # 0.09 or 0.18, beyond its 0.02 tolerance.
    dims = x[0].numel()
    own_lt = 0.5 * (abar[-1] * x.double().square() - abar[-1] - torch.log(1 - abar[-1])).flatten(1).sum(1)
    torch.testing.assert_close(exact["prior"], own_lt / (dims * math.log(2)), rtol=1e-10, atol=0)
    if s > 1:
        assert exact["prior"].mean().item() > 0.05
    torch.testing.assert_close(exact["total"], exact["prior"] + exact["diffusion"] + exact["decoder"])
    # A bound: above the data's differential entropy, and (for narrow data) far below the N(0, I) prior's.
    assert ENTROPY_N01 + math.log2(s) < exact["total"].mean().item()
    if s < 1:
        assert exact["total"].mean().item() < gaussian_bits_per_dim(x).mean().item() - 0.3
    # The importance-sampled estimate agrees with the exact sum over t.
    estimate = vlb_bits_per_dim(optimal_denoiser(sched, s), sched, x, 25, torch.Generator().manual_seed(2))
    # (Wider data, larger eps errors at small t: the estimate's spread grows.)
    assert estimate["total"].mean().item() == pytest.approx(expected, abs=0.05 if s < 1 else 0.15)


def test_gaussian_nll_with_a_mean_and_covariance_is_torchs_multivariate_normal():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    cov, mean = a @ a.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64), torch.randn(12, generator=g)
    x = torch.randn(5, 3, 2, 2, generator=g)  # 12 dims
    mvn = torch.distributions.MultivariateNormal(mean.double(), covariance_matrix=cov)
    expected = -mvn.log_prob(x.double().flatten(1)) / (12 * math.log(2))
    torch.testing.assert_close(gaussian_bits_per_dim(x, mean, cov), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [30, 400])  # fewer samples than dimensions (strong shrinkage), and more
def test_ledoit_wolf_is_sklearns(n):
    from sklearn.covariance import LedoitWolf

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 40, generator=g, dtype=torch.float64) @ torch.randn(
        40, 40, generator=g, dtype=torch.float64
    )
    mean, cov = ledoit_wolf(x)
    ref = LedoitWolf().fit(x.numpy())
    np.testing.assert_allclose(mean.numpy(), ref.location_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), ref.covariance_, rtol=1e-9, atol=1e-12)
    assert 0 < ref.shrinkage_ < 1


def test_gaussian_baselines_fit_what_they_say():
    g = torch.Generator().manual_seed(0)
    # Channel c has mean c and std 1 + c; positions are correlated (a smooth field), which only "full" models.
    field = F.interpolate(torch.randn(3000, 3, 2, 2, generator=g), size=4, mode="bilinear")
    z = field / field.std() * torch.arange(1.0, 4.0).view(1, 3, 1, 1) + torch.arange(3.0).view(1, 3, 1, 1)
    fits = gaussian_baselines(z)
    assert fits["prior"] == (None, None)
    mean_c, cov_c = fits["per_channel"]
    per = z.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean_c, per.mean(1).repeat_interleave(16))
    torch.testing.assert_close(cov_c, torch.diag(per.var(1, correction=0).repeat_interleave(16)))
    held = z[:200]
    bits = {k: gaussian_bits_per_dim(held, *fit).mean().item() for k, fit in fits.items()}
    assert bits["full"] < bits["per_channel"] - 0.5 < bits["prior"] - 0.5  # each model more of the structure


def test_trained_ddpm_beats_the_prior_on_structured_held_out_latents():
    g = torch.Generator().manual_seed(0)
    train, held = structured_latents(512, g), structured_latents(64, g)
    torch.manual_seed(0)
    cfg = UNetConfig(
        block_out_channels=(16, 32), attention_levels=(1,), attention_head_dim=8, norm_num_groups=8
    )
    unet, sched = build_unet(cfg, 4, 8), build_noise_scheduler(NoiseConfig())
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    for _ in range(120):
        loss = diffusion_loss(unet, sched, train[torch.randint(0, 512, (32,), generator=g)], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    bound = vlb_bits_per_dim(unet, sched, held, 32, torch.Generator().manual_seed(1))["total"].mean().item()
    prior = gaussian_bits_per_dim(held).mean().item()
    assert prior == pytest.approx(ENTROPY_N01, abs=0.05)
    assert bound < prior - 0.75  # about 0.9 vs 2.05 bits/dim


# ------------------------------------------------------------------------------------------- pipeline


@pytest.fixture
def exported(tmp_path) -> tuple[Path, AutoencoderKL]:
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny", scaling_factor=0.7)
    unet, sched = tiny_unet(), build_noise_scheduler(NoiseConfig())
    return export_pipeline(vae, unet, sched, tmp_path / "pipeline"), vae


def test_exported_pipeline_loads_in_diffusers_and_matches_our_sampler(exported, tmp_path):
    from diffusers import LDMPipeline, VQModel

    from ldm_vae.ldm_pipeline import KLAutoencoderForLDMPipeline

    folder, vae = exported
    # No "Expected types for vqvae: VQModel, got AutoencoderKL": the KL model is typed as the VQModel slot.
    pipe = load_quietly(folder)
    assert isinstance(pipe, LDMPipeline) and pipe.vqvae.config.scaling_factor == 0.7
    assert isinstance(pipe.vqvae, KLAutoencoderForLDMPipeline) and isinstance(pipe.vqvae, VQModel)
    # vqvae/ stays an ordinary AutoencoderKL folder: diffusers' own class loads it with the same weights.
    from diffusers import AutoencoderKL as DiffusersKL

    plain = DiffusersKL.from_pretrained(folder / "vqvae")
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(pipe.vqvae.encode(x).latents, plain.encode(x).latent_dist.mode())
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(pipe.vqvae.decode(z).sample, plain.decode(z).sample)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=5, output_type="np"
    )
    images = images.images  # (3, 16, 16, 3) in [0, 1]

    ours_vae, unet, sched = load_pipeline(folder)
    z = sample_latents(unet, sampling_scheduler(sched, "ddim"), 3, 5, torch.Generator().manual_seed(7))
    ours = (decode_latents(ours_vae, z) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert images.shape == (3, 16, 16, 3) and images.std() > 0
    np.testing.assert_allclose(images, ours, atol=1e-5)
    # The pipeline unscales with the VAE's scaling_factor: decoding z / 0.7 by hand gives the same.
    by_hand = ((vae.decode(z / 0.7).clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1)).detach().numpy()
    np.testing.assert_allclose(images, by_hand, atol=1e-5)

    # `ldm-vae sample`: the same images as PNGs, in any batch size.
    args = ["sample", "--pipeline", str(folder), "-n", "3", "-o", str(tmp_path / "s"), "--steps", "5"]
    assert cli_main([*args, "--seed", "7", "--batch-size", "2"]) == 0
    for i in range(3):
        png = np.asarray(Image.open(tmp_path / "s" / f"sample-{i:05d}.png")).astype(np.float64)
        assert np.abs(png - images[i] * 255).max() <= 0.5 + 1e-3
    assert Image.open(tmp_path / "s" / "grid.png").size == (
        2 + 2 * 18,
        2 + 2 * 18,
    )  # 2x2 grid of 16 px + padding


def test_export_in_fp16_and_refusals(exported, tmp_path, capsys):
    _, vae = exported
    unet = tiny_unet()
    half = export_pipeline(vae, unet, build_noise_scheduler(NoiseConfig()), tmp_path / "half", dtype="fp16")
    with safe_open(str(half / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict == {torch.float16}
    assert next(unet.parameters()).dtype == torch.float32  # the model itself is left as it was
    _, loaded, _ = load_pipeline(half)
    assert next(loaded.parameters()).dtype == torch.float32
    flux = AutoencoderKL.from_pretrained("tiny", shift_factor=0.1)
    with pytest.raises(ValueError, match="cannot add a shift"):
        export_pipeline(flux, unet, build_noise_scheduler(NoiseConfig()), tmp_path / "flux")
    assert not (tmp_path / "flux").exists()
    assert cli_main(["sample", "--pipeline", str(tmp_path), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a pipeline folder" in err


# ------------------------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory) -> Path:
    """Twenty 16 px crops of skimage photos encoded by a tiny VAE: 4x8x8 latents."""
    import skimage.data

    root = tmp_path_factory.mktemp("ldm")
    photos = root / "photos"
    photos.mkdir()
    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    for i in range(20):
        im = Image.fromarray(sources[i % 4]).resize((20 + i, 18 + i), Image.BICUBIC)
        im.save(photos / f"img{i:02d}.png")
    torch.manual_seed(0)
    vae_dir = AutoencoderKL.from_pretrained("tiny").save_pretrained(root / "vae")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    cache_latents(
        vae, sorted(photos.iterdir()), root / "latents", root=photos, resolution=16, model_name=str(vae_dir)
    )
    reset_accelerate()
    return root / "latents"


def config(latents: Path, out: Path, *overrides: tuple[str, str]):
    base = [
        ("data.latent_dir", str(latents)),
        ("train.output_dir", str(out)),
        ("data.batch_size", "4"),
        ("data.num_val", "4"),
        ("model.block_out_channels", "8,16"),
        ("model.attention_levels", "1"),
        ("model.attention_head_dim", "8"),
        ("model.norm_num_groups", "4"),
        ("train.tensorboard", "false"),
        ("train.log_every", "1"),
        ("train.val_every", "4"),
        ("train.checkpoint_every", "2"),
        ("train.ema_decay", "0.9"),
        ("sample.num_images", "4"),
        ("sample.steps", "3"),
        ("sample.vlb_timesteps", "4"),
        ("optim.lr", "3e-3"),
    ]
    return load_config(tl.Config, None, [*base, *overrides])


def test_trainer_runs_resumes_exactly_and_exports_a_pipeline(latent_cache, tmp_path, capsys):
    straight = tl.main(config(latent_cache, tmp_path / "a", ("train.max_steps", "8")))
    logs = read_metrics(tmp_path / "a")
    losses = [r["train/loss"] for r in logs if "train/loss" in r]
    assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:3])
    val = [r for r in logs if "val/bpd_ema" in r]
    assert [r["step"] for r in val] == [4, 8] and all(r["val/prior_bpd"] > 0 for r in val)
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir()) == [
        "step-0000004.png",
        "step-0000008.png",
    ]
    assert Image.open(tmp_path / "a" / "samples" / "step-0000008.png").size == (38, 38)  # 2x2 of 16 px

    # Stopped at step 4, resumed to 8: the same weights as the straight run.
    tl.main(config(latent_cache, tmp_path / "b", ("train.max_steps", "4")))
    reset_accelerate()
    resumed = tl.main(
        config(latent_cache, tmp_path / "b", ("train.max_steps", "8"), ("train.resume", "latest"))
    )
    (_, unet_a, _), (_, unet_b, _) = load_pipeline(straight), load_pipeline(resumed)
    for (name, a), b in zip(unet_a.state_dict().items(), unet_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # The exported pipeline carries the scale of the training latents only (not the manifest's, which also
    # covers the held-out images), and the validation logs the Gaussian baselines next to the bound.
    manifest = json.loads((latent_cache / "latents.json").read_text())
    train, held = tl.load_data(tl.Config().data.__class__(latent_dir=str(latent_cache), num_val=4), 1)[:2]
    scale = json.loads((straight / "vqvae" / "config.json").read_text())["scaling_factor"]
    plain = LatentDataset(latent_cache, range(16), sample=False)
    own = 1 / (plain.mean.double().var(correction=0) + plain.std.double().square().mean()).sqrt().item()
    assert scale == tl.training_scale(train) == pytest.approx(own, rel=1e-9) and scale != manifest["scale"]
    last = [r for r in logs if "val/full_cov_bpd" in r][-1]
    assert {"val/bpd", "val/prior_bpd", "val/per_channel_bpd", "val/bpd_ema"} <= set(last)

    # ldm-eval: every row against a direct computation on the same latents.
    capsys.readouterr()
    args = ["ldm-eval", str(latent_cache), "--pipeline", str(straight), "--last", "4", "--timesteps", "4"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "4 latents (4x8x8)" in out and "fitted to the other 16 latents" in out

    def row(name: str) -> float:
        return float(re.search(re.escape(name) + r" +(-?[\d.]+)", out)[1])

    _, unet, sched = load_pipeline(straight)
    for d in (train, held):
        d.scale = scale
    z = held.fixed_samples(0)
    direct = vlb_bits_per_dim(
        unet, sampling_scheduler(sched, "ddpm", 0.0), z, 4, torch.Generator().manual_seed(0)
    )
    fits = gaussian_baselines(train.fixed_draws(0))
    expected = {
        "DDPM variational bound (continuous)": direct["total"].mean().item(),
        "L_T (prior term)": direct["prior"].mean().item(),
        "L_0 (Gaussian decoder term)": direct["decoder"].mean().item(),
        "N(0, I) prior NLL": gaussian_bits_per_dim(z).mean().item(),
        "Gaussian per channel (fitted) NLL": gaussian_bits_per_dim(z, *fits["per_channel"]).mean().item(),
        "Gaussian full covariance, Ledoit-Wolf (fitted) NLL": gaussian_bits_per_dim(z, *fits["full"])
        .mean()
        .item(),
    }
    for name, value in expected.items():
        assert row(name) == pytest.approx(value, abs=5e-5), name  # the table prints 4 decimals
    # The trainer's last validation scored the same held-out latents with the same baselines.
    assert last["val/full_cov_bpd"] == pytest.approx(
        expected["Gaussian full covariance, Ledoit-Wolf (fitted) NLL"]
    )
    assert last["val/prior_bpd"] == pytest.approx(expected["N(0, I) prior NLL"])

    # A cache whose scale is within 1% of the pipeline's (recomputed elsewhere, or with the held-out views) is
    # evaluated; one 2% off is another VAE's or another data set's latents, refused in one line.
    shutil.copytree(latent_cache, tmp_path / "recached")
    for factor, ok in ((1.005, True), (1.02, False)):
        edited = {**manifest, "scale": scale * factor}
        (tmp_path / "recached" / "latents.json").write_text(json.dumps(edited))
        assert cli_main([*args[:1], str(tmp_path / "recached"), *args[2:]]) == (0 if ok else 1)
        err = capsys.readouterr().err
        assert ok or (err.count("\n") == 1 and "more than 1% apart" in err)


def test_trainer_errors_are_one_line(latent_cache, tmp_path, capsys):
    def error(*args: str) -> str:
        assert tl.cli(["--latent-dir", str(latent_cache), "--output-dir", str(tmp_path / "run"), *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    too_few = error()
    assert "20 latents found in" in too_few and "16 held out for validation: 4 left for training" in too_few
    assert "fewer than one batch per process (16) x 1 process(es) = 16 needed" in too_few
    assert "attention level 5 does not exist" in error(
        "--data.batch_size", "4", "--model.attention_levels", "5"
    )
    assert "data.num_val: 20 held-out images: must be in [0, 20)" in error("--data.num_val", "20")
    assert "no latents.json" in error("--latent-dir", str(tmp_path))
    assert not (tmp_path / "run").exists()


def test_views_are_held_out_by_image(latent_cache, tmp_path):
    photos = latent_cache.parent / "photos"
    vae = AutoencoderKL.from_pretrained(latent_cache.parent / "vae")
    out = tmp_path / "views"
    cache_latents(vae, sorted(photos.iterdir()), out, root=photos, resolution=16, views=3, shard_size=7)
    reset_accelerate()
    cfg = config(out, tmp_path / "run")  # data.num_val = 4 images
    train, val, manifest = tl.load_data(cfg.data, world=1)
    assert manifest["num_items"] == 60 and len(train) == 48 and len(val) == 4
    held_out = [f"img{i:02d}.png" for i in range(16, 20)]
    assert val.names == held_out  # the center crops (view 0) of the last four photos ...
    assert not {n.split("#")[0] for n in train.names} & set(
        held_out
    )  # ... none of whose views are trained on
    plain = LatentDataset(latent_cache, sample=False)
    torch.testing.assert_close(val.mean, plain.mean[16:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ldm_demo.toml", "ldm_tiny_cpu.toml"])
def test_shipped_configs_load_and_stay_small(name):
    cfg = load_config(tl.Config, ROOT / "scripts" / "configs" / name)
    unet = build_unet(cfg.model, latent_channels=4, latent_size=16)
    fp16_bytes = 2 * sum(p.numel() for p in unet.parameters())
    assert fp16_bytes < 6 * 2**20  # the shipped UNet stays a few MB in fp16
    assert cfg.optim.betas == (0.9, 0.999) and cfg.data.num_val == 16


def test_sampling_scheduler_clip_range():
    base = build_noise_scheduler(NoiseConfig())
    clipped = sampling_scheduler(base, "ddim", 3.5)
    assert clipped.config.clip_sample and clipped.config.clip_sample_range == 3.5
    assert sampling_scheduler(clipped, "ddpm").config.clip_sample_range == 3.5  # None keeps the setting
    assert not sampling_scheduler(clipped, "ddim", 0.0).config.clip_sample
    assert not sampling_scheduler(base, "ddim").config.clip_sample
    with pytest.raises(ValueError, match="clip range must be >= 0"):
        sampling_scheduler(base, "ddim", -1.0)
    # Clipping acts: a step from a large x_t with a zero eps prediction keeps x_0 within the range.
    clipped.set_timesteps(2)
    x = torch.full((1, 1, 2, 2), 50.0)
    t = clipped.timesteps[-1]
    out = clipped.step(torch.zeros_like(x), t, x).pred_original_sample
    assert out.max().item() == 3.5


def test_refreshing_a_vqvae_keeps_its_scale_and_dtype_and_refuses_a_new_encoder(tmp_path):
    from _scripts import import_script

    build = import_script("build_demo_weights")
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny", scaling_factor=0.5)
    src = vae.save_pretrained(tmp_path / "run" / "vae")  # a training run's export: fp32
    dest = tmp_path / "shipped" / "vqvae"
    AutoencoderKL.from_pretrained(src, scaling_factor=0.25).save_pretrained(dest, dtype="fp16")
    with torch.no_grad():  # a decoder-only round from the fp16 weights: the encoder is their exact upcast
        for p in vae.encoder.parameters():
            p.copy_(p.half().float())
        for p in vae.decoder.parameters():
            p.add_(0.01)
    vae.save_pretrained(src)
    build.refresh_vqvae(src, dest, "retrain the DDPM")
    shipped = load_file(dest / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in shipped.values()} == {torch.float16}  # the shipped dtype, not the run's
    new = AutoencoderKL.from_pretrained(dest)
    assert new.config.scaling_factor == 0.25
    for (name, a), b in zip(new.state_dict().items(), vae.state_dict().values(), strict=True):
        assert torch.equal(a, b.half().float()), name
    with torch.no_grad():  # a new encoder: every latent changed, the DDPM is stale
        next(vae.encoder.parameters()).add_(0.01)
    vae.save_pretrained(src)
    with pytest.raises(SystemExit, match=r"its encoder differs .*: retrain the DDPM"):
        build.refresh_vqvae(src, dest, "retrain the DDPM")
    assert AutoencoderKL.from_pretrained(dest).config.scaling_factor == 0.25  # refused: nothing lost


def test_card_splice_replaces_named_sections_and_keeps_the_rest_verbatim():
    from _scripts import import_script

    build = import_script("build_demo_weights")
    card = "# Title\n\nintro\n\n## Autoencoder (`vqvae/`)\n\nold AE\n\n## Latent DDPM\n\n| kept |\n\n## How\n\n```bash\na\nb\n```\n"
    out = build.splice(card, {"Autoencoder": ["## Autoencoder (`vqvae/`)", "", "new AE", ""]})
    assert out == card.replace("old AE", "new AE")
    assert build.code_lines(build.sections(card)[-1]) == ["a", "b"]
    assert build.section(card, "Latent") == ["## Latent DDPM", "", "| kept |", ""]
    assert build.section("## Only\nx\n", "Only") == ["## Only", "x"]  # no preamble: an empty first part
    with pytest.raises(SystemExit, match="no section"):
        build.splice(card, {"Samples": []})


@pytest.mark.parametrize(("psnr", "verdict"), [(26.6, "met"), (26.4, "missed by 0.20 dB")])
def test_card_states_the_psnr_target_met_or_missed_by_how_much(psnr, verdict):
    from _scripts import import_script

    build = import_script("build_demo_weights")
    row = {
        "source": "a.png",
        "size": [8, 8],
        "psnr": psnr,
        "ssim": 0.7,
        "bicubic_psnr": 24.3,
        "bicubic_ssim": 0.6,
    }
    demo = {"images": [row], "mean": row, "seconds": 1.0, "dtype": "fp32"}
    text = "\n".join(build.measured_section(demo))
    assert f"Mean PSNR {psnr - 24.3:+.2f} dB against bicubic (the target is +2.3 dB: {verdict})" in text
