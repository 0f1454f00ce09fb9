"""The one model interface: KL and VQ autoencoders meet the same contract, and one loader picks the class."""

from __future__ import annotations

import pytest
import torch

from ldm_vae import AutoencoderKL, CheckpointError, VQAutoencoder
from ldm_vae.autoencoders import AUTOENCODERS, autoencoder_class, load_autoencoder
from ldm_vae.interface import Autoencoder, Regularization
from ldm_vae.io import write_json


@pytest.fixture(params=["kl", "vq"])
def model(request):
    torch.manual_seed(0)
    return AUTOENCODERS[request.param].from_pretrained("tiny")


def test_both_models_meet_the_contract(model):
    assert isinstance(model, Autoencoder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, reg = model(x, sample_posterior=False)
    assert isinstance(reg, Regularization) and recon.shape == x.shape
    logs = reg.logs()
    assert logs[reg.name] == pytest.approx(reg.regularization_loss().item())
    z = model.encode_latents(x)
    assert z.shape == (2, model.decode_channels, 16, 16)
    # encode_latents is what decode takes: decode(encode_latents(x)) is the deterministic reconstruction (VQ's
    # straight-through sum in forward rounds the codes by ~1e-8, ~1e-5 after the decoder).
    torch.testing.assert_close(
        model.decode(z), recon, rtol=0, atol=0 if isinstance(model, AutoencoderKL) else 1e-5
    )
    assert model.last_layer is model.decoder.conv_out.weight
    assert model.encoder in model.encoder_side() and model.decoder not in model.encoder_side()


def test_kl_encode_latents_samples_with_the_generator():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained("tiny")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    posterior = vae.encode(x)
    z = vae.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, posterior.sample(torch.Generator().manual_seed(3)))
    torch.testing.assert_close(vae.encode_latents(x), posterior.mode())


def test_vq_encode_latents_are_codebook_vectors():
    torch.manual_seed(0)
    vq = VQAutoencoder.from_pretrained("tiny")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = vq.encode_latents(x)
    _, info = vq.quantize(vq.encode(x))
    torch.testing.assert_close(z, vq.quantize.lookup(info.indices), rtol=0, atol=0)


def test_regularizers_carry_their_recipe():
    torch.manual_seed(0)
    _, kl = AutoencoderKL.from_pretrained("tiny")(torch.rand(2, 3, 32, 32))
    _, vq = VQAutoencoder.from_pretrained("tiny")(torch.rand(2, 3, 32, 32))
    assert (kl.name, kl.pixel_reduction) == ("kl", "sum")
    assert (vq.name, vq.pixel_reduction) == ("codebook", "mean")
    assert kl.regularization_loss().item() == pytest.approx(kl.kl().sum().item() / 2)
    assert set(vq.logs()) == {"codebook", "code_usage", "perplexity"}


def test_loader_picks_the_class_from_presets_folders_and_files(tmp_path):
    assert autoencoder_class("tiny") is AutoencoderKL  # KL presets first
    assert autoencoder_class("vq-f8") is VQAutoencoder
    torch.manual_seed(0)
    kl, vq = AutoencoderKL.from_pretrained("tiny"), VQAutoencoder.from_pretrained("tiny")
    kl.save_pretrained(tmp_path / "kl")
    vq.save_pretrained(tmp_path / "vq")
    kl.save_single_file(tmp_path / "kl.safetensors")
    vq.save_single_file(tmp_path / "vq.safetensors", prefix="first_stage_model.")
    for name, cls in (("kl", AutoencoderKL), ("vq", VQAutoencoder)):
        for src in (tmp_path / name, tmp_path / f"{name}.safetensors"):
            loaded = load_autoencoder(src, norm_num_groups=4) if src.is_file() else load_autoencoder(src)
            assert type(loaded) is cls
            ref = kl if cls is AutoencoderKL else vq
            for k, v in ref.state_dict().items():
                torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_loader_names_an_unknown_class(tmp_path):
    write_json({"_class_name": "AutoencoderTiny"}, tmp_path / "config.json")
    with pytest.raises(
        CheckpointError, match="holds a AutoencoderTiny; ldm_vae loads AutoencoderKL, VQModel"
    ):
        autoencoder_class(tmp_path)
