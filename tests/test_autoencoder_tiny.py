"""AutoencoderTiny against diffusers' (same random weights), its file layouts in and out, and as a pipeline's VAE."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm_vae import AutoencoderTiny, AutoencoderTinyConfig, CheckpointError, ConfigKeyError
from ldm_vae.autoencoder_tiny import from_taesd_layout, infer_tiny_fields, to_taesd_layout

# Two stages (f = 2), width 8, uneven block counts and 3 latent channels, so every count is read for real.
TINY = AutoencoderTinyConfig(
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    num_encoder_blocks=(1, 2),
    num_decoder_blocks=(2, 1),
    latent_channels=3,
    latent_magnitude=2.5,
    latent_shift=0.25,
)


def diffusers_kwargs(config: AutoencoderTinyConfig) -> dict:
    return {
        k: v for k, v in config.to_diffusers().items() if not k.startswith("_") and k != "block_out_channels"
    }


@pytest.fixture(scope="module")
def pair() -> tuple[AutoencoderTiny, diffusers.AutoencoderTiny]:
    """Ours (random init, seed 0) and diffusers' with the same weights, both in eval mode."""
    torch.manual_seed(0)
    ours = AutoencoderTiny(TINY).eval()
    # Non-zero biases everywhere and weights large enough that every ReLU is sometimes on and sometimes off.
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ref = diffusers.AutoencoderTiny(**diffusers_kwargs(TINY)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_state_dict_is_diffusers_for_taesd_and_tiny_configs():
    for config in (AutoencoderTinyConfig(), TINY):
        ours, ref = (
            AutoencoderTiny(config).state_dict(),
            diffusers.AutoencoderTiny(**diffusers_kwargs(config)),
        )
        theirs = ref.state_dict()
        assert list(ours) == list(theirs)
        assert all(ours[k].shape == theirs[k].shape for k in ours)


@torch.no_grad()
def test_encode_decode_forward_match_diffusers(pair):
    ours, ref = pair
    x = images()
    z = ours.encode(x)
    assert z.shape == (2, 3, 16, 16)
    torch.testing.assert_close(z, ref.encode(x).latents, atol=0, rtol=0)
    torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=0, rtol=0)
    # forward rounds the latents to 8 bits with latent_magnitude / latent_shift, as diffusers' does.
    torch.testing.assert_close(ours(x), ref(x).sample, atol=0, rtol=0)
    assert not torch.equal(ours(x), ours(x, quantize=False))
    u = ours.to_unit_range(z)
    assert u.min() >= 0 and u.max() <= 1
    torch.testing.assert_close(u, ref.scale_latents(z))
    torch.testing.assert_close(ours.from_unit_range(u), ref.unscale_latents(u))


@torch.no_grad()
def test_diffusers_folder_round_trips_both_ways(pair, tmp_path):
    ours, ref = pair
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny" and "block_out_channels" not in config
    loaded = diffusers.AutoencoderTiny.from_pretrained(tmp_path / "ours").eval()
    assert loaded.config.latent_magnitude == 2.5 and list(loaded.config.num_decoder_blocks) == [2, 1]
    # What pipelines read for vae_scale_factor; diffusers registers it itself.
    assert list(loaded.config.block_out_channels) == [8, 8]
    x = images()
    torch.testing.assert_close(loaded(x).sample, ours(x), atol=0, rtol=0)

    ref.save_pretrained(tmp_path / "theirs")
    back = AutoencoderTiny.from_pretrained(tmp_path / "theirs")
    assert back.config == TINY
    torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)
    half = AutoencoderTiny.from_pretrained(tmp_path / "ours", dtype="fp16")
    assert half.dtype == torch.float16 and half.decode(ours.encode(x)).dtype == torch.float32
    ours.save_pretrained(tmp_path / "fp16", dtype="fp16")
    assert {
        v.dtype for v in load_file(tmp_path / "fp16" / "diffusion_pytorch_model.safetensors").values()
    } == {torch.float16}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@torch.no_grad()
def test_original_taesd_files_round_trip(pair, tmp_path, suffix):
    ours, ref = pair
    enc_path, dec_path = ours.save_taesd(tmp_path, name="taesd", suffix=suffix)
    assert (enc_path.name, dec_path.name) == (f"taesd_encoder{suffix}", f"taesd_decoder{suffix}")
    read = load_file if suffix == ".safetensors" else lambda p: torch.load(p, weights_only=True)
    enc, dec = read(enc_path), read(dec_path)
    # madebyollin/taesd: the encoder is EncoderTiny's Sequential as is; the decoder is a parameter-free Clamp
    # followed by DecoderTiny's layers, so a Sequential of that shape loads the file strictly.
    taesd_encoder = ref.encoder.layers
    taesd_decoder = nn.Sequential(nn.Identity(), *ref.decoder.layers)
    taesd_encoder.load_state_dict(enc, strict=True)
    taesd_decoder.load_state_dict(dec, strict=True)
    assert "0.weight" in enc and "1.weight" in dec and not any(k.startswith("0.") for k in dec)
    x = images()
    z = taesd_encoder((x + 1) / 2)
    torch.testing.assert_close(ours.encode(x), z, atol=0, rtol=0)
    torch.testing.assert_close(ours.decode(z), taesd_decoder(torch.tanh(z / 3) * 3) * 2 - 1, atol=0, rtol=0)

    # A folder holding the pair loads through from_pretrained (config read off the shapes) and from_taesd.
    for loaded in (AutoencoderTiny.from_pretrained(tmp_path), AutoencoderTiny.from_taesd(enc_path, dec_path)):
        assert loaded.config == AutoencoderTinyConfig(
            **{**TINY.__dict__, "latent_magnitude": 3.0, "latent_shift": 0.5}
        )
        torch.testing.assert_close(loaded.decode(z), ours.decode(z), atol=0, rtol=0)


def test_layout_table_round_trips_and_infers_the_config(pair):
    ours, _ = pair
    sd = ours.state_dict()
    parts = to_taesd_layout(sd)
    back = from_taesd_layout(parts["encoder"], parts["decoder"])
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    fields = infer_tiny_fields(sd, "x")
    assert fields == {
        "in_channels": 3,
        "latent_channels": 3,
        "encoder_block_out_channels": [8, 8],
        "num_encoder_blocks": [1, 2],
        "out_channels": 3,
        "decoder_block_out_channels": [8, 8],
        "num_decoder_blocks": [2, 1],
    }
    assert infer_tiny_fields(AutoencoderTiny().state_dict(), "x")["num_decoder_blocks"] == [3, 3, 3, 1]


@torch.no_grad()
def test_single_diffusers_named_file_loads(pair, tmp_path):
    ours, _ = pair
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "tiny.safetensors")
    loaded = AutoencoderTiny.from_pretrained(
        tmp_path / "tiny.safetensors", latent_magnitude=2.5, latent_shift=0.25
    )
    assert loaded.config == TINY
    x = images()
    torch.testing.assert_close(loaded(x), ours(x), atol=0, rtol=0)


def test_strict_loading_names_missing_unexpected_and_misshaped_keys(pair, tmp_path):
    ours, _ = pair
    enc_path, dec_path = ours.save_taesd(tmp_path, suffix=".safetensors")
    dec = load_file(dec_path)
    dec["extra.weight"] = torch.zeros(1)  # unexpected
    dec["4.conv.0.bias"] = torch.zeros(5)  # mis-shaped: original index 4 is diffusers' decoder.layers.3
    save_file(dec, dec_path)
    match = (
        r"1 unexpected \(decoder:extra\.weight\); "
        r"1 shape mismatch \(decoder\.layers\.3\.conv\.0\.bias: checkpoint \(5,\) vs model \(8,\)\)"
    )
    with pytest.raises(CheckpointError, match=match):
        AutoencoderTiny.from_taesd(enc_path, dec_path)
    ours.save_pretrained(tmp_path / "folder")
    weights = tmp_path / "folder" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    del sd["encoder.layers.1.conv.2.weight"]
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match=r"1 missing \(encoder\.layers\.1\.conv\.2\.weight\)"):
        AutoencoderTiny.from_pretrained(tmp_path / "folder")


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"decoder_block_out_channels \[64, 32\] must all be equal"):
        AutoencoderTinyConfig(decoder_block_out_channels=(64, 32), num_decoder_blocks=(1, 1))
    with pytest.raises(ValueError, match="encoder_block_out_channels has 2 stages, num_encoder_blocks 4"):
        AutoencoderTinyConfig(encoder_block_out_channels=(8, 8))
    with pytest.raises(ValueError, match="unsupported act_fn 'tanh'"):
        AutoencoderTinyConfig(act_fn="tanh")
    with pytest.raises(ConfigKeyError, match="unknown config key 'latent_chanels'"):
        AutoencoderTiny.from_pretrained("tiny", latent_chanels=3)
    (tmp_path / "kl").mkdir()
    (tmp_path / "kl" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(CheckpointError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        AutoencoderTiny.from_pretrained(tmp_path / "kl")
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4, H, W\)"):
        AutoencoderTiny.from_pretrained("tiny").decode(torch.zeros(1, 3, 4, 4))


@torch.no_grad()
def test_export_is_the_vae_of_a_diffusers_latent_diffusion_pipeline(pair, tmp_path):
    """LDMPipeline decodes ``vqvae.decode(latents / scaling_factor)``: with scaling_factor 1.0 the preview gets
    the denoised latents as they are, and the pipeline's image is our decode of them."""
    ours, _ = pair
    ours.save_pretrained(tmp_path / "vqvae")
    vae = diffusers.AutoencoderTiny.from_pretrained(tmp_path / "vqvae")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    pipe = diffusers.LDMPipeline(vqvae=vae, unet=unet, scheduler=diffusers.DDIMScheduler())
    seen = []
    decode = vae.decode
    vae.decode = lambda z, *a, **k: (seen.append(z.clone()), decode(z, *a, **k))[1]
    image = pipe(
        batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    image = torch.from_numpy(image.images).permute(0, 3, 1, 2)
    assert image.shape == (1, 3, 16, 16) and len(seen) == 1
    expected = (ours.decode(seen[0]) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)
