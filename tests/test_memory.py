"""Never out of memory by default: ``max_memory="auto"`` budgets from the free memory, tiles exactly when an
image needs it, retries an allocator failure once, and fails with one line otherwise."""

import warnings

import pytest
import torch
from test_tiling import THREE_LEVELS, check_close

from ldm_vae import AutoencoderKL, VQAutoencoder, runtime, tiling
from ldm_vae.config import VQ_PRESETS
from ldm_vae.metrics import ssim

CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 5184000000 bytes. Error code 12"


@pytest.fixture
def tiled_runs(monkeypatch):
    """Counts exact tiled runs (one per tiled encoder/decoder call)."""
    runs = []
    real = tiling._TiledRun.__init__

    def init(self, units, tile_size, pixels_per_input, store_budget):
        runs.append((tile_size, store_budget))
        real(self, units, tile_size, pixels_per_input, store_budget)

    monkeypatch.setattr(tiling._TiledRun, "__init__", init)
    return runs


def free_memory(monkeypatch, nbytes):
    monkeypatch.setattr(tiling, "available_memory", lambda device="cpu": nbytes)


@torch.no_grad()
def test_auto_runs_untiled_when_the_working_set_fits(monkeypatch, tiled_runs):
    torch.manual_seed(0)
    vae = AutoencoderKL(THREE_LEVELS).eval()
    z = torch.randn(1, 4, 16, 16)
    free_memory(monkeypatch, 10 * 2**30)
    assert torch.equal(vae.decode(z, max_memory="auto"), vae.decode(z))  # the same single pass, bit for bit
    assert tiled_runs == []


@pytest.mark.parametrize("model", [AutoencoderKL, VQAutoencoder])
@torch.no_grad()
def test_auto_tiles_exactly_within_half_the_free_memory(monkeypatch, tiled_runs, model):
    torch.manual_seed(0)
    vae = model(THREE_LEVELS if model is AutoencoderKL else VQ_PRESETS["tiny"]).eval()
    f = vae.config.downsample_factor
    z = torch.randn(1, vae.config.latent_channels, 256 // f, 256 // f)
    need = tiling.working_set(vae.decoder.units(), z, f)
    free_memory(monkeypatch, need // 2)  # half of it is the budget: a quarter of what one pass needs
    check_close(vae.decode(z, max_memory="auto"), vae.decode(z))
    assert len(tiled_runs) == 1
    tile_size, store_budget = tiled_runs[0]
    assert tile_size < 256 and store_budget == int(need // 2 * tiling.AUTO_SHARE * tiling.STORE_SHARE)


@torch.no_grad()
def test_an_allocator_failure_is_retried_tiled_in_half_the_budget(monkeypatch, tiled_runs):
    torch.manual_seed(0)
    vae = AutoencoderKL(THREE_LEVELS).eval()
    z = torch.randn(1, 4, 32, 32)
    ref = vae.decode(z)
    free_memory(monkeypatch, 10 * 2**30)  # the estimate says it fits, but the allocator disagrees once
    calls = []
    real_forward = type(vae.decoder).forward

    def failing_once(self, x):
        calls.append(x.shape)
        if len(calls) == 1:
            raise RuntimeError(CPU_OOM)
        return real_forward(self, x)

    monkeypatch.setattr(type(vae.decoder), "forward", failing_once)
    with pytest.warns(
        UserWarning, match=r"out of memory \(DefaultCPUAllocator.*retrying Decoder tiled within"
    ):
        out = vae.decode(z, max_memory="auto")
    check_close(out, ref)
    need = tiling.working_set(vae.decoder.units(), z, 4)
    assert len(tiled_runs) == 1 and tiled_runs[0][1] == int(need // 2 * tiling.STORE_SHARE)


@pytest.mark.parametrize("error", [RuntimeError(CPU_OOM), torch.OutOfMemoryError("CUDA out of memory.")])
@torch.no_grad()
def test_what_still_cannot_fit_is_one_line_naming_size_and_need(monkeypatch, error):
    vae = AutoencoderKL(THREE_LEVELS).eval()
    z = torch.randn(1, 4, 32, 48)
    free_memory(monkeypatch, 4 * 2**30)

    def out_of_memory(self, x):
        raise error

    monkeypatch.setattr(tiling._TiledRun, "__call__", out_of_memory)
    monkeypatch.setattr(type(vae.decoder), "forward", out_of_memory)
    with warnings.catch_warnings(), pytest.raises(MemoryError) as info:
        warnings.simplefilter("ignore")
        vae.decode(z, max_memory="auto")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("Decoder on 1x128x192 px needs about ")
    assert "GB of activations untiled and failed tiled within" in message and "4.3 GB free" in message


@torch.no_grad()
def test_other_errors_are_not_retried(monkeypatch):
    vae = AutoencoderKL(THREE_LEVELS).eval()
    free_memory(monkeypatch, 10 * 2**30)

    def broken(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(type(vae.decoder), "forward", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        vae.decode(torch.randn(1, 4, 8, 8), max_memory="auto")


def test_available_memory_is_the_least_of_what_linux_says(monkeypatch):
    monkeypatch.setattr(runtime, "_meminfo_available", lambda: 20 * 2**30)
    monkeypatch.setattr(runtime, "_cgroup_headroom", lambda: 12 * 2**30)
    monkeypatch.setattr(runtime, "_address_space_headroom", lambda: None)
    assert runtime.available_memory("cpu") == 12 * 2**30
    monkeypatch.setattr(runtime, "_address_space_headroom", lambda: 3 * 2**30)  # ulimit -v
    assert runtime.available_memory("cpu") == 3 * 2**30
    for name in ("_meminfo_available", "_cgroup_headroom", "_address_space_headroom"):
        monkeypatch.setattr(runtime, name, lambda: None)
    assert runtime.available_memory("cpu") is None
    assert runtime.available_memory("meta") is None


def test_the_real_readings_are_plausible():
    free = runtime._meminfo_available()
    assert free is None or 0 < free < 2**50
    assert runtime._address_space_headroom() is None  # the test process runs without ulimit -v


def test_ssim_in_strips_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 45, 38) * 2 - 1, torch.rand(2, 3, 45, 38) * 2 - 1
    whole = ssim(a, b)
    monkeypatch.setattr("ldm_vae.metrics.SSIM_STRIP_ELEMENTS", 2 * 3 * 38 * 4)  # 4 rows per strip
    strips = ssim(a, b)
    assert torch.allclose(strips, whole, rtol=0, atol=1e-6) and not torch.equal(whole, torch.zeros(2))
