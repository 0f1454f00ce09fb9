"""torch.compile: encoder and decoder compile whole (fullgraph, one graph per shape), and the training forward
reads nothing back from the device."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import Tensor

from ldm_vae import AutoencoderKL, VQAutoencoder
from ldm_vae.metrics import psnr
from ldm_vae.runtime import native_bf16
from ldm_vae.workflows import load_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphCounter:
    """A torch.compile backend that runs graphs eagerly and counts how many it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]):
        self.graphs += 1
        return gm.forward


def _pair(dtype: str) -> tuple[AutoencoderKL, AutoencoderKL]:
    """(fp32 reference, the same weights at ``dtype`` through to_runtime)."""
    torch.manual_seed(0)
    ref = AutoencoderKL.from_pretrained("tiny")
    vae = AutoencoderKL(ref.config)
    vae.load_state_dict(ref.state_dict())
    return ref, vae.to_runtime(dtype)


DTYPES = [
    "fp32",
    pytest.param("bf16", marks=pytest.mark.skipif(not native_bf16(), reason="no native bf16")),
    "fp16",
]


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_fullgraph_matches_eager(dtype):
    """Both networks trace whole in every runtime; fp32 is the same math, reduced precision stays within the
    fast path's 40 dB of the fp32 reference (compiled code trades the fused oneDNN conv+add for plain ops)."""
    ref, vae = _pair(dtype)
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    z = ref.encode(x).mean
    for net, inp, expected in [
        ("encoder", x, ref.encoder(x)),
        ("decoder", z, ref.decoder(ref.post_quant_conv(z))),
    ]:
        counter = GraphCounter()
        module = getattr(vae, net)
        compiled = torch.compile(module, fullgraph=True, backend=counter, dynamic=False)
        inp = vae._to_model(inp if net == "encoder" else ref.post_quant_conv(z))
        out = compiled(inp).float()
        assert counter.graphs == 1
        if dtype == "fp32":
            assert (out - expected).abs().max() <= 1e-5
        else:
            assert psnr(out, expected, data_range=float(expected.max() - expected.min())).min() >= 40
            assert (out - module(inp).float()).abs().max() <= 0.05 * float(expected.abs().max())


@pytest.mark.parametrize("dtype", ["fp32", DTYPES[1]])
@torch.no_grad()
def test_one_graph_per_shape(dtype):
    """Repeated calls of one shape reuse the graph (no recompiles across blocks or calls); a new shape compiles
    once more."""
    _, vae = _pair(dtype)
    counter = GraphCounter()
    vae.compile_(backend=counter, dynamic=False)
    z = torch.randn(1, 4, 8, 8)
    for _ in range(3):
        vae.decode(z)
    assert counter.graphs == 1
    vae.decode(torch.randn(1, 4, 8, 12))
    vae.decode(torch.randn(1, 4, 8, 12))
    assert counter.graphs == 2
    vae.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    vae.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert counter.graphs == 3


def test_compile_keeps_state_dict_keys(tmp_path):
    vae = AutoencoderKL.from_pretrained("tiny")
    keys = list(vae.state_dict())
    assert vae.compile_(backend="eager") is vae
    assert list(vae.state_dict()) == keys
    folder = vae.save_pretrained(tmp_path / "vae")
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(keys)
    assert all(not k.startswith("_orig_mod") and "._orig_mod." not in k for k in keys)
    assert AutoencoderKL.from_pretrained(folder).state_dict().keys() == vae.state_dict().keys()


@torch.no_grad()
def test_tiled_runs_with_compile_switch_on():
    """Tiled runs call units eagerly on crops; with the switch on they give what they give without it."""
    torch.manual_seed(0)
    plain = AutoencoderKL.from_pretrained("tiny")
    compiled = AutoencoderKL(plain.config).eval()
    compiled.load_state_dict(plain.state_dict())
    compiled.compile_(backend="eager")
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    z = plain.encode(x).mean
    for tiling in ({"tile_size": 16}, {"max_memory": 1 << 16}):
        assert (compiled.decode(z, **tiling) - plain.decode(z, **tiling)).abs().max() <= 1e-4
        assert (compiled.encode(x, **tiling).mean - plain.encode(x, **tiling).mean).abs().max() <= 1e-4
    assert (compiled.decode(z, tile_size=16) - plain.decode(z)).abs().max() <= 1e-4


@torch.no_grad()
def test_inductor_decoder_matches_eager():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny")
    z = torch.randn(1, 4, 8, 8)
    expected = vae.decoder(z)
    out = torch.compile(vae.decoder, fullgraph=True, dynamic=False)(z)
    assert (out - expected).abs().max() <= 1e-5


def test_load_model_compile_flag():
    vae = load_model("tiny", "fp32", compile=True)
    assert vae.encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None


# ------------------------------------------------------------------------------------------ host syncs


class HostSync(AssertionError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    """Makes every Python-side read of a tensor's value raise, for the duration of a ``with`` block."""

    class Guard:
        def __enter__(self):
            def refuse(self, *args, **kwargs):
                raise HostSync("a tensor value was read back to the host")

            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
                monkeypatch.setattr(torch.Tensor, name, refuse)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Guard()


def _nan_refused(vae, channels: int) -> None:
    bad = torch.zeros(1, 3, 16, 16)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^images contain NaN or Inf$"):
        vae.encode(bad)
    with pytest.raises(ValueError, match=r"^latents contain NaN or Inf$"):
        vae.decode(torch.full((1, channels, 8, 8), float("inf")))


def test_kl_training_forward_makes_no_host_sync(no_host_sync):
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny").train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with no_host_sync:
        recon, posterior = vae(x)
        loss = recon.square().mean() + posterior.regularization_loss()
        logs = posterior.logs()
    loss.backward()
    assert recon.shape == x.shape and set(logs) == {"kl"}
    _nan_refused(vae, 4)
    with pytest.raises(ValueError, match=r"^images must have shape"):  # the shape check stays in forward
        vae(torch.zeros(1, 4, 16, 16))


@pytest.mark.parametrize(
    "options", [{}, {"ema_decay": 0.99, "restart_dead_codes": True}], ids=["plain", "ema"]
)
def test_vq_training_forward_makes_no_host_sync(no_host_sync, options):
    torch.manual_seed(0)
    vae = VQAutoencoder.from_pretrained("tiny", **options).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with no_host_sync:
        for _ in range(2):  # the second step runs after a restart may have rewritten codes in place
            recon, info = vae(x)
            loss = recon.square().mean() + info.regularization_loss()
            logs = info.logs()
        assert info.usage.ndim == 0 and info.perplexity.ndim == 0
    loss.backward()
    assert set(logs) == {"codebook", "code_usage", "perplexity"} and 0 < float(logs["code_usage"]) <= 1
    _nan_refused(vae, vae.config.embed_dim)


def test_dead_code_restart_with_l2_codes_keeps_backward_valid():
    """Restarts rewrite the codebook in place every step; the forward's graph must not hold the weight."""
    torch.manual_seed(0)
    vae = VQAutoencoder.from_pretrained("tiny", restart_dead_codes=True, l2_normalize=True).train()
    recon, info = vae(torch.rand(2, 3, 16, 16) * 2 - 1)
    (recon.square().mean() + info.regularization_loss()).backward()
    assert vae.quantize.embedding.weight.grad is not None


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_compiled_training_step(checkpointing):
    """A compiled model trains: forward and backward through both graphs, with gradient checkpointing too."""
    torch.manual_seed(0)
    plain = AutoencoderKL.from_pretrained("tiny").train()
    compiled = AutoencoderKL(plain.config).train()
    compiled.load_state_dict(plain.state_dict())
    compiled.compile_(backend="aot_eager")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    grads = []
    for vae in (plain, compiled):
        vae.encoder.gradient_checkpointing = vae.decoder.gradient_checkpointing = checkpointing
        recon, posterior = vae(x, sample_posterior=False)
        (recon.square().mean() + posterior.regularization_loss()).backward()
        grads.append(vae.decoder.conv_out.weight.grad)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5


def test_cli_compile_option():
    from ldm_vae.cli import build_parser

    args = build_parser().parse_args(["decode", "z.safetensors", "-o", "out", "--model", "tiny", "--compile"])
    assert args.compile
    assert not build_parser().parse_args(["decode", "z.safetensors", "-o", "out", "--model", "tiny"]).compile
