"""VQAutoencoder and its quantizer: invariants, losses, EMA codebook and dead-code restarts."""

import pytest
import torch

from ldm_vae import VQAutoencoder
from ldm_vae.vq import VectorQuantizer


@pytest.fixture
def vq():
    torch.manual_seed(0)
    return VQAutoencoder.from_pretrained("tiny")


@torch.no_grad()
def test_output_is_codebook_at_indices(vq):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = vq.encode(x)
    z_q, info = vq.quantize_latents(h)
    codes = vq.quantize.embedding.weight
    assert info.indices.shape == (2, 16, 16) and info.indices.dtype == torch.long
    expected = codes[info.indices].permute(0, 3, 1, 2)
    assert torch.allclose(z_q, expected, atol=1e-6)  # straight-through z + (e - z) is e up to rounding
    # Each index is the nearest code.
    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    assert torch.equal(torch.cdist(flat, codes).argmin(1), info.indices.flatten())
    # decode_indices is decode of the looked-up codes.
    assert torch.allclose(vq.decode_indices(info.indices), vq.decode(expected), atol=1e-5)
    assert 0 < info.usage <= 1 and 1 <= info.perplexity <= 32


def test_losses_and_straight_through_gradient():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, beta=0.25)
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    z_q, info = q(z)
    e = q.embedding.weight[info.indices.flatten()].detach()
    mse = ((z.detach().permute(0, 2, 3, 1).reshape(-1, 2) - e) ** 2).mean()
    assert torch.allclose(info.commitment_loss, mse) and torch.allclose(info.codebook_loss, mse)
    assert torch.allclose(info.loss, 1.25 * mse)
    z_q.sum().backward(retain_graph=True)
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: d z_q / d z = I
    # Non-legacy: beta weighs the commitment term, so the encoder gets 2 * beta * (z - e) / numel.
    z.grad = None
    info.loss.backward()
    diff = z.detach() - z_q.detach()
    assert torch.allclose(z.grad, 2 * 0.25 * diff / diff.numel(), atol=1e-7)


def test_legacy_beta_placement():
    torch.manual_seed(0)
    z = torch.randn(1, 2, 4, 4)
    new = VectorQuantizer(8, 2, beta=0.1)
    old = VectorQuantizer(8, 2, beta=0.1, legacy=True)
    old.load_state_dict(new.state_dict())
    _, a = new(z)
    _, b = old(z)
    mse = a.commitment_loss
    assert torch.allclose(a.loss, 0.1 * mse + mse) and torch.allclose(b.loss, mse + 0.1 * mse)
    # Same value, different gradients: legacy pushes the codebook with weight beta.
    e = torch.randn(1, 2, 4, 4, requires_grad=True)
    q = VectorQuantizer(8, 2, beta=0.1, legacy=True)
    _, info = q(e)
    info.loss.backward()
    g_legacy = q.embedding.weight.grad.clone()
    q2 = VectorQuantizer(8, 2, beta=0.1)
    q2.load_state_dict(q.state_dict())
    _, info2 = q2(e)
    info2.loss.backward()
    assert torch.allclose(g_legacy, 0.1 * q2.embedding.weight.grad, atol=1e-7)


def test_l2_normalized_codes_are_unit_vectors():
    q = VectorQuantizer(16, 4, l2_normalize=True)
    z_q, _ = q(torch.randn(2, 4, 3, 3) * 5)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)


def test_ema_codebook_moves_toward_assigned_means():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, ema_decay=0.5).train()
    assert not q.embedding.weight.requires_grad
    z = torch.randn(1, 2, 8, 8)
    before = q.embedding.weight.clone()
    _, info = q(z)
    assert info.codebook_loss == 0  # the codebook learns by EMA, not by gradient
    used = info.indices.unique()
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in used:
        mean = flat[info.indices.flatten() == k].mean(0)
        # moved part of the way from its old value toward the mean of the vectors assigned to it
        assert (q.embedding.weight[k] - mean).norm() < (before[k] - mean).norm()
    # EMA statistics are training state: never exported to the diffusers layout.
    vq = VQAutoencoder.from_pretrained("tiny", ema_decay=0.99)
    assert any(k.startswith("quantize.ema_") for k in vq.state_dict())
    assert not any(k.startswith("quantize.ema_") for k in vq._export_state_dict(None))


def test_dead_codes_restart_from_batch():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, restart_dead_codes=True).train()
    with torch.no_grad():
        q.embedding.weight[1:] = 100.0  # far from all data: only code 0 is ever used
    z = torch.randn(1, 2, 6, 6)
    for _ in range(500):  # usage EMA (0.99) decays below the threshold, then the dead codes restart
        q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    restarted = q.embedding.weight[1:]
    assert (restarted < 50).all()
    # Each restarted code is one of the batch's encoder outputs.
    assert torch.cdist(restarted, flat).min(1).values.max() < 1e-6
    _, info = q(z)
    assert info.usage > 1 / 8


def test_forward_and_training_step_reduce_loss():
    torch.manual_seed(0)
    vq = VQAutoencoder.from_pretrained("tiny").train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        recon, info = vq(x)
        loss = (recon - x).abs().mean() + info.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
