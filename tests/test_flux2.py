"""FLUX.2's autoencoder against diffusers' AutoencoderKLFlux2 and its pipelines, on identical random weights."""

from __future__ import annotations

import contextlib
import json
import shutil
import types
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from _cli import photo as _photo
from _cli import run_cli as _run
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from skimage import data
from test_tiling import check_close

from ldm_vae import (
    FLUX2_PRESETS,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLFlux2Config,
    CheckpointError,
    ConfigKeyError,
)
from ldm_vae.autoencoders import autoencoder_class, load_autoencoder
from ldm_vae.checkpoint import to_ldm
from ldm_vae.images import crop_to, load_image, pad_to_multiple, to_uint8
from ldm_vae.interface import Autoencoder
from ldm_vae.latents import prepare_image
from ldm_vae.metrics import psnr
from ldm_vae.workflows import stats as st

TINY = AutoencoderKLFlux2Config(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=32
)
FP32 = ["--dtype", "fp32"]
CONFIGS = {
    "tiny": TINY,
    # Three levels (f = 4), a decoder of half the width (FLUX.2's small decoder is 3/4), no quant_conv.
    "narrow-decoder": AutoencoderKLFlux2Config(
        block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(4, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        use_quant_conv=False,
    ),
}


def flux2(config: AutoencoderKLFlux2Config, seed: int = 0) -> AutoencoderKLFlux2:
    """A model with random weights and random BatchNorm statistics (the init's zeros and ones hide mix-ups)."""
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(config).eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.25, 4.0)
    return model


def diffusers_twin(model: AutoencoderKLFlux2) -> diffusers.AutoencoderKLFlux2:
    """diffusers' AutoencoderKLFlux2 with the same config and the same weights and statistics."""
    # force_upcast is a key of FLUX.2's config.json, not of diffusers' __init__ (it would only warn).
    skip = ("_class_name", "force_upcast")
    twin = diffusers.AutoencoderKLFlux2.from_config(
        {k: v for k, v in model.config.to_diffusers().items() if k not in skip}
    )
    twin.load_state_dict(model.state_dict(), strict=True)  # our names are diffusers' names
    return twin.eval()


class ZeroVelocity(torch.nn.Module):
    """A stand-in transformer predicting zero velocity: flow-matching steps then keep the latents unchanged,
    so a pipeline's output_type="latent" result is its own post-processing of the latents it was given."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(in_channels=in_channels)
        self.unused = torch.nn.Parameter(torch.zeros(()))

    dtype = torch.float32
    device = torch.device("cpu")

    @contextlib.contextmanager
    def cache_context(self, name: str):
        yield

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor]:
        return (torch.zeros_like(hidden_states),)


def klein_pipeline(model: AutoencoderKLFlux2) -> Flux2KleinPipeline:
    vae = diffusers_twin(model)
    transformer = ZeroVelocity(vae.bn.num_features)
    pipe = Flux2KleinPipeline(
        diffusers.FlowMatchEulerDiscreteScheduler(), vae, None, None, transformer
    )  # no text encoder: prompt embeddings are passed in
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_bit_identical_to_diffusers(name):
    ours = flux2(CONFIGS[name])
    theirs = diffusers_twin(ours)
    for shape in [(2, 3, 32, 32), (1, 3, 40, 24)]:
        x = torch.rand(shape) * 2 - 1
        post, post_d = ours.encode(x), theirs.encode(x).latent_dist
        assert torch.equal(post.mean, post_d.mean) and torch.equal(post.logvar, post_d.logvar)
        mean, second = ours.encode_moments(x)
        assert torch.equal(mean, post_d.mean) and torch.equal(second, post_d.mean.square() + post_d.var)
        z = torch.randn_like(post.mean)
        assert torch.equal(ours.decode(z), theirs.decode(z).sample)
        recon, _ = ours(x, sample_posterior=False)
        assert torch.equal(recon, theirs(x).sample)
        recon, _ = ours(x, generator=torch.Generator().manual_seed(3))  # the same posterior sample
        assert torch.equal(recon, theirs(x, True, generator=torch.Generator().manual_seed(3)).sample)


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_is_diffusers_state_dict(name):
    ours = flux2(CONFIGS[name])
    theirs = diffusers_twin(ours).state_dict()
    assert [(k, v.shape, v.dtype) for k, v in ours.state_dict().items()] == [
        (k, v.shape, v.dtype) for k, v in theirs.items()
    ]
    assert list(ours.state_dict())[-3:] == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]


@pytest.mark.parametrize("preset", FLUX2_PRESETS)
def test_presets_are_diffusers_defaults_and_flux2_configs(preset):
    config = FLUX2_PRESETS[preset]
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours = AutoencoderKLFlux2(config)
        theirs = diffusers.AutoencoderKLFlux2(decoder_block_out_channels=config.decoder_block_out_channels)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    mine = {k: v for k, v in config.to_diffusers().items() if k not in ("_class_name", "force_upcast")}
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.config.items() if k in mine}
    assert mine == defaults  # every key diffusers knows, at its default (bar the decoder widths)
    assert ours.bn.num_features == 128 and ours.config.diffusion_downsample_factor == 16
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in theirs.parameters())


def test_config_is_strict():
    with pytest.raises(ConfigKeyError, match="'scaling_factor' for AutoencoderKLFlux2Config"):
        AutoencoderKLFlux2.from_pretrained("flux2", scaling_factor=0.3)
    with pytest.raises(ValueError, match="square patches"):
        AutoencoderKLFlux2Config(patch_size=(2, 1))
    with pytest.raises(ValueError, match="decoder_block_out_channels has 2 levels"):
        AutoencoderKLFlux2Config(decoder_block_out_channels=(32, 64))
    with pytest.raises(ValueError, match="not all divisible by norm_num_groups 32"):
        AutoencoderKLFlux2Config(decoder_block_out_channels=(96, 192, 384, 400))


def test_meets_the_interface_and_loads_by_name():
    model = flux2(TINY)
    assert isinstance(model, Autoencoder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon, reg = model(x, sample_posterior=False)
        assert torch.equal(model.decode(model.encode_latents(x)), recon)
    assert reg.name == "kl" and model.decode_channels == 4
    assert autoencoder_class("flux2") is AutoencoderKLFlux2
    assert autoencoder_class("flux2-small-decoder") is AutoencoderKLFlux2


# ------------------------------------------------------------------------------------------ latent scaling


@torch.no_grad()
def test_patches_are_the_pipelines():
    model = flux2(TINY)
    z = torch.randn(3, 4, 6, 10)
    patched = model.patchify(z)
    assert torch.equal(patched, Flux2Pipeline._patchify_latents(z))
    assert torch.equal(model.unpatchify(patched), Flux2Pipeline._unpatchify_latents(patched))
    assert torch.equal(model.unpatchify(patched), z)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_scale_latents_is_the_pipelines_image_encoding(name):
    model = flux2(CONFIGS[name])
    pipe = klein_pipeline(model)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    want = pipe._encode_vae_image(x, generator=None)  # mode, patchify, normalize with vae.bn
    assert torch.equal(model.scale_latents(model.encode_latents(x)), want)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_unscale_latents_is_what_the_pipeline_decodes(name):
    model = flux2(CONFIGS[name])
    pipe = klein_pipeline(model)
    f = model.config.diffusion_downsample_factor
    z = torch.randn(2, model.bn.num_features, 3, 5)  # diffusion-ready: (B, 4C, h, w)
    raw = pipe(
        prompt_embeds=torch.zeros(2, 4, 8),
        height=3 * f,
        width=5 * f,
        latents=z,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",  # the latents vae.decode would get: un-normalized and unpatchified
    ).images
    assert torch.equal(model.unscale_latents(z), raw)
    assert torch.allclose(model.scale_latents(raw), z, atol=1e-5)


def test_scaling_refuses_latents_that_do_not_fit():
    model = flux2(TINY)
    with pytest.raises(
        ValueError, match=r"latents of 5x6 do not split into 2x2 patches \(.*multiples of 4\)"
    ):
        model.scale_latents(torch.zeros(1, 4, 5, 6))
    with pytest.raises(ValueError, match=r"diffusion-ready latents must have shape \(B, 16, H, W\)"):
        model.unscale_latents(torch.zeros(1, 4, 4, 4))


# ------------------------------------------------------------------------------------------ runtime


@torch.no_grad()
def test_exact_tiling_equals_untiled():
    model = flux2(CONFIGS["narrow-decoder"])
    x = torch.rand(1, 3, 52, 36) * 2 - 1
    z = torch.randn(1, 4, 13, 9)
    ref_enc, ref_dec = model.encode(x), model.decode(z)
    for tile in (8, 16):
        enc = model.encode(x, tile_size=tile)
        check_close(enc.mean, ref_enc.mean)
        check_close(enc.logvar, ref_enc.logvar)
        check_close(model.decode(z, tile_size=tile), ref_dec)


@torch.no_grad()
def test_fast_path_matches_reference():
    """As AutoencoderKL's: channels_last fp32 equals the reference to rounding, bf16 stays within 40 dB; the
    BatchNorm statistics stay fp32, so the latent scaling is the reference's exactly."""
    ref = flux2(CONFIGS["narrow-decoder"])
    fast32, fast16 = flux2(ref.config), flux2(ref.config)
    for fast in (fast32, fast16):
        fast.load_state_dict(ref.state_dict())
    fast32.to(memory_format=torch.channels_last)
    fast16.to_runtime("bf16")
    assert fast16.dtype == torch.bfloat16 and fast16.bn.running_var.dtype == torch.float32
    x = torch.rand(2, 3, 40, 24) * 2 - 1
    z = ref.encode(x).mean
    expected = ref.decode(z)
    assert (fast32.decode(z) - expected).abs().max() <= 1e-5
    assert (fast32.encode(x).mean - z).abs().max() <= 1e-5
    assert psnr(fast16.decode(z), expected, data_range=float(expected.max() - expected.min())).min() >= 40
    assert psnr(fast16.encode(x).mean, z, data_range=float(z.max() - z.min())).min() >= 40
    assert torch.equal(fast16.scale_latents(z), ref.scale_latents(z))


# ------------------------------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory) -> Path:
    return flux2(CONFIGS["narrow-decoder"]).save_pretrained(tmp_path_factory.mktemp("flux2") / "vae")


@torch.no_grad()
def test_save_pretrained_loads_in_diffusers_and_back(flux2_dir, tmp_path):
    ours = AutoencoderKLFlux2.from_pretrained(flux2_dir)
    assert json.loads((flux2_dir / "config.json").read_text())["_class_name"] == "AutoencoderKLFlux2"
    theirs = diffusers.AutoencoderKLFlux2.from_pretrained(flux2_dir).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(ours.encode(x).mean, theirs.encode(x).latent_dist.mean)
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(ours.decode(z), theirs.decode(z).sample)
    assert torch.equal(ours.bn.running_var, theirs.bn.running_var)
    theirs.save_pretrained(tmp_path / "back")  # and diffusers' own folder loads here
    back = load_autoencoder(tmp_path / "back")
    assert type(back) is AutoencoderKLFlux2 and back.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_a_folder_without_the_batchnorm_step_counter_loads(flux2_dir, tmp_path):
    """diffusers' convert_flux2_to_diffusers.py drops bn.num_batches_tracked; such folders still load, and
    anything else missing is still refused."""
    folder = tmp_path / "converted"
    shutil.copytree(flux2_dir, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["bn.num_batches_tracked"]
    save_file(state, weights)
    ours = AutoencoderKLFlux2.from_pretrained(folder)
    assert torch.equal(ours.bn.running_mean, state["bn.running_mean"])
    assert "bn.num_batches_tracked" in ours.state_dict()  # still exported
    del state["bn.running_var"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"1 missing \(bn.running_var\)"):
        AutoencoderKLFlux2.from_pretrained(folder)


@pytest.mark.parametrize("prefix", ["", "vae."])
def test_a_diffusers_named_single_file_loads_with_its_shapes(flux2_dir, tmp_path, prefix):
    """A diffusers-named single file (e.g. FLUX.2's vae/diffusion_pytorch_model.safetensors on its own) loads
    too, through BFL's names; the BatchNorm names the class."""
    ours = AutoencoderKLFlux2.from_pretrained(flux2_dir)
    tensors = load_file(flux2_dir / "diffusion_pytorch_model.safetensors")
    single = tmp_path / "flux2-vae.safetensors"
    save_file({prefix + k: v for k, v in tensors.items()}, single)
    loaded = load_autoencoder(single, norm_num_groups=4)  # group counts are not in the shapes
    assert type(loaded) is AutoencoderKLFlux2 and loaded.config == ours.config  # widths and patch inferred
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="holds a AutoencoderKLFlux2, not a AutoencoderKL"):
        AutoencoderKL.from_pretrained(single)


def bfl_state_shapes(
    ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, in_channels: int = 3, out_ch: int = 3
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of black-forest-labs' ``AutoEncoder(AutoEncoderParams(...)).state_dict()``, the keys their
    ``load_ae`` loads from ``ae.safetensors`` with ``strict=True``.

    Written out by reading src/flux2/autoencoder.py (black-forest-labs/flux2 at ab7cca6; it is no dependency, so
    the test cannot import it), following each ``__init__``: ``Encoder`` registers ``quant_conv`` (2z -> 2z, 1x1)
    first, then ``conv_in``, ``down[i].block[j]`` (``num_res_blocks`` ResnetBlocks of width ch * ch_mult[i],
    input ch * (1, *ch_mult)[i]) and ``down[i].downsample.conv`` except at the last level (its ``attn`` lists stay
    empty), ``mid.block_1 / attn_1 / block_2``, ``norm_out``, ``conv_out`` (-> 2z). ``Decoder``:
    ``post_quant_conv`` (z -> z), ``conv_in``, the mid block, ``up[i].block[0..num_res_blocks]`` from the last
    level down and ``up[i].upsample.conv`` for i != 0, ``norm_out``, ``conv_out``. A ResnetBlock is ``norm1,
    conv1, norm2, conv2`` plus ``nin_shortcut`` (1x1) when its widths differ; an AttnBlock is ``norm`` and the
    1x1 convs ``q, k, v, proj_out``; every GroupNorm is affine. ``AutoEncoder.bn`` is ``BatchNorm2d(4 z,
    affine=False, track_running_stats=True)``: its buffers running_mean, running_var and num_batches_tracked
    (0-d), so the file must hold the statistics.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_in: int, c_out: int, k: int) -> None:
        shapes.update({f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)})

    def norm(name: str, c: int) -> None:
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    def resnet(name: str, c_in: int, c_out: int) -> None:
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def mid(coder: str, c: int) -> None:
        resnet(f"{coder}.mid.block_1", c, c)
        norm(f"{coder}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{coder}.mid.attn_1.{proj}", c, c, 1)
        resnet(f"{coder}.mid.block_2", c, c)

    z, last = z_channels, len(ch_mult) - 1
    conv("encoder.quant_conv", 2 * z, 2 * z, 1)
    conv("encoder.conv_in", in_channels, ch, 3)
    for i, mult in enumerate(ch_mult):
        block_in = ch * (1, *ch_mult)[i]
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
        if i != last:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * z, 3)
    conv("decoder.post_quant_conv", z, z, 1)
    block_in = ch * ch_mult[last]
    conv("decoder.conv_in", z, block_in, 3)
    mid("decoder", block_in)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, out_ch, 3)
    shapes |= {"bn.running_mean": (4 * z,), "bn.running_var": (4 * z,), "bn.num_batches_tracked": ()}
    return shapes


def test_single_files_have_black_forest_labs_keys_and_shapes():
    """FLUX.2's single files are BFL's ae.safetensors: with the flux2 preset (their AutoEncoderParams()), exactly
    the keys and shapes their AutoEncoder loads strictly; with the tiny config, those of AutoEncoderParams(ch=8,
    ch_mult=[1, 2], num_res_blocks=1, z_channels=4)."""
    with torch.device("meta"):  # shapes only: no 84M parameters allocated
        full = AutoencoderKLFlux2(FLUX2_PRESETS["flux2"])
    for model, params in ((full, (128, [1, 2, 4, 4], 2, 32)), (flux2(TINY), (8, [1, 2], 1, 4))):
        exported = model.single_file_state_dict()
        assert {k: tuple(v.shape) for k, v in exported.items()} == bfl_state_shapes(*params)
        assert exported["bn.num_batches_tracked"].dtype == torch.int64


@torch.no_grad()
def test_black_forest_labs_layout_round_trip_is_bit_identical(tmp_path, capsys):
    """diffusers-layout weights -> convert --to ldm (BFL's layout) -> load: diffusers' outputs bit for bit; and
    back to a diffusers folder that diffusers loads with the same state dict."""
    theirs = diffusers_twin(flux2(TINY))
    diffusers_sd = theirs.state_dict()
    src, bfl = tmp_path / "diffusers-named.safetensors", tmp_path / "ae.safetensors"
    save_file(diffusers_sd, src)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY.to_diffusers()))  # the GroupNorm groups, which shapes cannot tell
    code, _, err = _run(capsys, "convert", src, bfl, "--to", "ldm", "--config", config)
    assert code == 0, err
    written = load_file(bfl)
    # BFL's layout is the LDM one with the two quant convs moved into the coders, and nothing else.
    plain = to_ldm(diffusers_sd, 2)
    moved = {f"encoder.{k}" if k.startswith("quant_conv.") else k: v for k, v in plain.items()}
    moved = {f"decoder.{k}" if k.startswith("post_quant_conv.") else k: v for k, v in moved.items()}
    assert written.keys() == moved.keys() and all(torch.equal(written[k], moved[k]) for k in moved)
    assert "quant_conv.weight" in plain and "quant_conv.weight" not in written
    loaded = load_autoencoder(bfl, norm_num_groups=4, sample_size=32)  # what shapes cannot tell
    assert type(loaded) is AutoencoderKLFlux2 and loaded.config == TINY
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = loaded.encode(x).mean
    assert torch.equal(mean, theirs.encode(x).latent_dist.mean)
    assert torch.equal(loaded.decode(mean), theirs.decode(mean).sample)
    for name in ("running_mean", "running_var"):  # the statistics travel with the file
        assert torch.equal(getattr(loaded.bn, name), getattr(theirs.bn, name))
    back = tmp_path / "back"
    assert _run(capsys, "convert", bfl, back, "--to", "diffusers", "--config", config)[0] == 0
    again = diffusers.AutoencoderKLFlux2.from_pretrained(back).state_dict()
    assert again.keys() == diffusers_sd.keys() and all(torch.equal(again[k], diffusers_sd[k]) for k in again)
    with pytest.raises(CheckpointError, match="holds a AutoencoderKLFlux2, not a AutoencoderKL"):
        AutoencoderKL.from_pretrained(bfl)


def test_a_folder_of_another_class_is_refused(tmp_path):
    torch.manual_seed(0)
    AutoencoderKL.from_pretrained("tiny").save_pretrained(tmp_path / "kl")
    with pytest.raises(CheckpointError, match="holds a AutoencoderKL, not a AutoencoderKLFlux2"):
        AutoencoderKLFlux2.from_pretrained(tmp_path / "kl")


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "astronaut.png", 32, 32)
    _photo(folder / "odd.png", 29, 30, data.chelsea)  # pads to 32x32 (f = 4, patches of 2: 8)
    return folder


@torch.no_grad()
def test_cli_encode_writes_the_pipelines_latents_and_decode_inverts_them(tmp_path, capsys, images, flux2_dir):
    vae = AutoencoderKLFlux2.from_pretrained(flux2_dir)
    lat, out = tmp_path / "z.safetensors", tmp_path / "out"
    code, _, err = _run(capsys, "encode", images, "-o", lat, "--model", flux2_dir, *FP32)
    assert code == 0, err
    with safe_open(str(lat), "pt") as f:
        meta, z = f.metadata(), f.get_tensor("latents")
    assert meta["latent_normalization"] == "AutoencoderKLFlux2" and "scaling_factor" not in meta
    assert z.shape == (2, 16, 4, 4)  # 4 x 4 channels of 2x2 patches, 32 / 8
    x = torch.stack([pad_to_multiple(load_image(images / n), 8) for n in ("astronaut.png", "odd.png")])
    want = klein_pipeline(vae)._encode_vae_image(x, generator=None)
    torch.testing.assert_close(z, want, rtol=0, atol=1e-6)
    code, _, err = _run(capsys, "decode", lat, "-o", out, "--model", flux2_dir, *FP32)
    assert code == 0 and "warning" not in err, err
    decoded = vae.decode(vae.unscale_latents(z))
    for i, (name, size) in enumerate((("astronaut", (32, 32)), ("odd", (29, 30)))):
        png = np.asarray(Image.open(out / f"{name}.png"))
        np.testing.assert_array_equal(png, to_uint8(crop_to(decoded[i], size)))


def test_cli_decode_refuses_latents_of_another_model(tmp_path, capsys, images, flux2_dir):
    torch.manual_seed(0)
    kl = AutoencoderKL.from_pretrained("tiny").save_pretrained(tmp_path / "kl")
    lat = tmp_path / "kl.safetensors"
    assert _run(capsys, "encode", images / "astronaut.png", "-o", lat, "--model", kl, *FP32)[0] == 0
    code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "out", "--model", flux2_dir, *FP32)
    assert code == 1 and "latents have 4 channels but" in err and "takes 16" in err
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_cli_mixed_sizes_pad_to_16_and_round_trip_per_image(tmp_path, capsys, flux2_dir):
    """A folder of several sizes: one tensor per image, each image padded to the diffusion multiple (8 for
    this f = 4 model; 16 for FLUX.2's), its latents and PNG those of encoding and decoding it alone."""
    vae = AutoencoderKLFlux2.from_pretrained(flux2_dir)
    folder = tmp_path / "mixed"
    folder.mkdir()
    # 36x28 pads to 40x32: padding to the autoencoder's 4 only would leave 9x7 latents, no 2x2 patches.
    sizes = {"a.png": (32, 32), "b.png": (36, 28), "odd.png": (31, 31)}
    for (name, (h, w)), source in zip(
        sizes.items(), (data.astronaut, data.coffee, data.chelsea), strict=True
    ):
        _photo(folder / name, h, w, source)
    lat, out, one = tmp_path / "all.safetensors", tmp_path / "out", [*FP32, "--batch-size", "1"]
    code, _, err = _run(capsys, "encode", folder, "-o", lat, "--model", flux2_dir, *one)
    assert code == 0 and "latents of 3 images in 2 shapes" in err, err
    with safe_open(str(lat), "pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "latents" and meta["layout"] == "per-image"
    assert meta["latent_normalization"] == "AutoencoderKLFlux2" and "scaling_factor" not in meta
    tensors = load_file(lat)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "a": (16, 4, 4),
        "b": (16, 5, 4),
        "odd": (16, 4, 4),
    }
    code, _, err = _run(capsys, "decode", lat, "-o", out, "--model", flux2_dir, *one)
    assert code == 0 and "warning" not in err, err
    for name, size in sizes.items():
        stem = name.removesuffix(".png")
        x = pad_to_multiple(load_image(folder / name), 8)[None]  # (1, 3, H', W'), multiples of 8
        z = vae.scale_latents(vae.encode_latents(x))
        assert torch.equal(tensors[stem], z[0])
        want = to_uint8(crop_to(vae.decode(vae.unscale_latents(tensors[stem][None]))[0], size))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}.png")), want)
    code, _, err = _run(
        capsys, "encode", folder, "-o", tmp_path / "i.safetensors", "--model", flux2_dir, "--indices"
    )
    assert code == 1 and "no codebook (VQ models only)" in err


def test_cli_decode_refuses_the_other_normalization(tmp_path, capsys, images, flux2_dir):
    """Latents of matching channel counts but the other normalization (global factors vs FLUX.2's own
    statistics) are refused both ways, before anything is written."""
    torch.manual_seed(0)
    kl = AutoencoderKL.from_pretrained("tiny", latent_channels=16).save_pretrained(tmp_path / "kl16")
    flux_lat, kl_lat = tmp_path / "flux2.safetensors", tmp_path / "kl.safetensors"
    image = images / "astronaut.png"
    assert _run(capsys, "encode", image, "-o", flux_lat, "--model", flux2_dir, *FP32)[0] == 0
    assert _run(capsys, "encode", image, "-o", kl_lat, "--model", kl, *FP32)[0] == 0
    for lat, model, used in ((flux_lat, kl, "AutoencoderKLFlux2's"), (kl_lat, flux2_dir, "scaling_factor")):
        code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "out", "--model", model, *FP32)
        assert code == 1 and f"normalized with {used}" in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()


def test_cli_reconstruct_info_and_convert(tmp_path, capsys, images, flux2_dir):
    vae = AutoencoderKLFlux2.from_pretrained(flux2_dir)
    code, stdout, err = _run(
        capsys, "reconstruct", images, "-o", tmp_path / "rec", "--model", flux2_dir, *FP32
    )
    assert code == 0, err
    with torch.no_grad():
        recon = vae.decode(vae.encode_latents(pad_to_multiple(load_image(images / "odd.png"), 4)[None]))[0]
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "rec" / "odd.png")), to_uint8(crop_to(recon, (29, 30)))
    )
    code, stdout, _ = _run(capsys, "info", flux2_dir)
    dec = sum(p.numel() for m in (vae.post_quant_conv, vae.decoder) for p in m.parameters())
    assert code == 0 and f"decoder: {dec:,}" in stdout and "decoder_block_out_channels: (4, 8, 8)" in stdout
    code, stdout, _ = _run(capsys, "info", flux2_dir, "--size", "37", "29")
    assert code == 0 and "latent shape for a 37x29 image: (4, 10, 8) (image padded to 40x32)" in stdout
    assert "diffusion-ready shape (scale_latents, 2x2 patches): (16, 5, 4) (image padded to 40x32)" in stdout
    # diffusers folder -> fp16 folder; its weights file alone -> a folder again; no LDM single file.
    half = tmp_path / "half"
    assert _run(capsys, "convert", flux2_dir, half, "--to", "diffusers", "--dtype", "fp16")[0] == 0
    saved = load_file(half / "diffusion_pytorch_model.safetensors")
    assert (
        saved["bn.running_var"].dtype == torch.float16
        and saved["bn.num_batches_tracked"].dtype == torch.int64
    )
    diffusers.AutoencoderKLFlux2.from_pretrained(half)
    single, back = half / "diffusion_pytorch_model.safetensors", tmp_path / "back"
    config = ["--config", flux2_dir]  # what shapes cannot tell: GroupNorm groups
    assert _run(capsys, "convert", single, back, "--to", "diffusers", *config)[0] == 0
    assert AutoencoderKLFlux2.from_pretrained(back).config == vae.config
    # BFL's single-file layout, also for a config their AutoEncoder cannot build (narrower decoder, no quant_conv).
    ae = tmp_path / "ae.safetensors"
    assert _run(capsys, "convert", flux2_dir, ae, "--to", "ldm")[0] == 0
    keys = set(load_file(ae))
    assert (
        "decoder.post_quant_conv.weight" in keys
        and not {"quant_conv.weight", "encoder.quant_conv.weight"} & keys
    )
    loaded = load_autoencoder(ae, norm_num_groups=4)
    assert loaded.config == vae.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_cli_cache_latents_and_stats(tmp_path, capsys, images, flux2_dir):
    vae = AutoencoderKLFlux2.from_pretrained(flux2_dir)
    cache = tmp_path / "cache"
    common = ["--model", flux2_dir, *FP32, "--resolution", "16"]
    code, _, err = _run(capsys, "cache-latents", images, "-o", cache, *common)
    assert code == 0, err
    manifest = json.loads((cache / "latents.json").read_text())
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["vae_scaling_factor"] is None  # raw posteriors
    code, _, err = _run(capsys, "cache-latents", images, "-o", tmp_path / "c2", *common[:-1], "12")
    assert code == 1 and "not a positive multiple of the model's factor 8" in err
    # stats: per channel of the 2x2 patches, against the BatchNorm statistics.
    files = sorted(images.iterdir())
    with torch.no_grad():
        moments = [vae.encode_moments(prepare_image(f, 16)[None]) for f in files]
    first = torch.cat([vae.patchify(a) for a, _ in moments]).double()
    second = torch.cat([vae.patchify(b) for _, b in moments]).double()
    mean_c = first.mean(dim=(0, 2, 3))
    std_c = (second.mean(dim=(0, 2, 3)) - mean_c.square()).sqrt()
    for source in (images, cache):
        stats = (st.cache_stats(cache, vae)[0] if source == cache else st.image_stats(vae, files, 16)).stats()
        assert list(stats.channel_mean) == pytest.approx(mean_c.tolist(), rel=1e-5, abs=1e-6)
        assert list(stats.channel_std) == pytest.approx(std_c.tolist(), rel=1e-5)
    written = tmp_path / "normalized"
    code, stdout, err = _run(capsys, "stats", images, *common, "--write", written)
    assert code == 0, err
    assert "16 channels (2x2 patches)" in stdout and "want 0, 1" in stdout
    fitted = AutoencoderKLFlux2.from_pretrained(written)
    torch.testing.assert_close(fitted.bn.running_mean.double(), mean_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fitted.bn.running_var.double(), std_c.square(), rtol=1e-5, atol=1e-6)
    # With the measured statistics the normalized latents have mean 0 and, per channel, variance var / (var + eps).
    code, stdout, _ = _run(capsys, "stats", images, "--model", written, *FP32, "--resolution", "16")
    seen = stdout.split("diffusion model sees mean ")[1].split(" (want")[0]
    mean_seen, std_seen = (float(v) for v in seen.split(", std "))
    var = std_c.square()
    assert abs(mean_seen) < 1e-6 and std_seen == pytest.approx(
        (var / (var + 1e-4)).mean().sqrt().item(), rel=1e-3
    )
    code, _, err = _run(capsys, "stats", images, *common, "--write", tmp_path / "o", "--shift")
    assert code == 1 and "normalizes each channel by its own mean and std" in err
