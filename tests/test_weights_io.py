"""Every weight format in and out: diffusers folders (single and sharded), LDM/SD single files, pickles."""

import json
import os
import pickle
import stat

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_vae import AutoencoderKL, CheckpointError, VQAutoencoder
from ldm_vae.checkpoint import to_ldm

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach for the hub in these tests


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL.from_pretrained("tiny")


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@torch.no_grad()
def outputs(model, x):
    """(posterior mean, decode of the mean) for ours or diffusers'."""
    if isinstance(model, diffusers.AutoencoderKL):
        mean = model.encode(x).latent_dist.mean
        return mean, model.decode(mean).sample
    mean = model.encode(x).mean
    return mean, model.decode(mean)


def assert_same(a, b):
    # 1e-5, not 0: diffusers' own from_pretrained and from_config+load_state_dict models already differ by
    # ~1e-6 on identical weights (oneDNN picks kernels by memory alignment of the mmapped tensors).
    for u, v in zip(a, b, strict=True):
        assert (u - v).abs().max() <= 1e-5


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------ diffusers folders


def test_ours_to_diffusers_folder_to_diffusers(vae, x, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["block_out_channels"] == [8, 16]
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert_same(outputs(vae, x), outputs(theirs, x))


def test_diffusers_folder_to_ours_single_and_sharded(vae, x, tmp_path):
    theirs = diffusers.AutoencoderKL.from_config(
        {k: v for k, v in vae.config.to_diffusers().items() if k != "_class_name"}
    )
    theirs.load_state_dict(vae.state_dict())
    theirs.save_pretrained(tmp_path / "single")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for folder in ("single", "sharded"):
        ours = AutoencoderKL.from_pretrained(tmp_path / folder)
        assert_same_weights(ours, vae)
        assert_same(outputs(ours, x), outputs(theirs, x))


def test_pipeline_folder_resolves_to_vae_subfolder(vae, tmp_path):
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "pipe"), vae)


def test_save_in_reduced_precision(vae, tmp_path):
    vae.save_pretrained(tmp_path / "half", dtype="fp16")
    tensors = load_file(tmp_path / "half" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    loaded = AutoencoderKL.from_pretrained(tmp_path / "half")
    assert loaded.dtype == torch.float32  # loads as asked (fp32 default), from fp16 values
    assert torch.equal(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight.half().float())


# ---------------------------------------------------------------------------------- LDM single files


def test_ours_to_ldm_file_to_diffusers_and_back(vae, x, tmp_path):
    vae.save_pretrained(tmp_path / "cfg")
    path = vae.save_single_file(tmp_path / "vae.safetensors")
    keys = set(load_file(path))
    assert "encoder.down.0.block.0.norm1.weight" in keys and "decoder.up.1.block.1.conv2.weight" in keys
    assert "encoder.mid.attn_1.q.weight" in keys and load_file(path)["encoder.mid.attn_1.q.weight"].ndim == 4
    theirs = diffusers.AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "cfg"))
    assert_same(outputs(vae, x), outputs(theirs, x))
    # Shapes cannot tell GroupNorm groups: tiny uses 4 instead of the default 32.
    ours = AutoencoderKL.from_pretrained(path, norm_num_groups=4, scaling_factor=1.0, sample_size=32)
    assert_same_weights(ours, vae)
    assert ours.config == vae.config


def test_full_sd_checkpoint_takes_only_the_vae(vae, tmp_path):
    ldm = to_ldm(vae.state_dict(), 2)
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    full["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)
    full["first_stage_model.loss.logvar"] = torch.zeros(())  # LDM training checkpoints hold their loss too
    save_file(full, tmp_path / "sd.safetensors")
    ours = AutoencoderKL.from_pretrained(tmp_path / "sd.safetensors", config=vae.config)
    assert_same_weights(ours, vae)

    # The same as a Lightning pickle: {"state_dict": ..., "global_step": ...}, loaded weights-only.
    torch.save({"state_dict": full, "global_step": 10}, tmp_path / "sd.ckpt")
    assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "sd.ckpt", config=vae.config), vae)


def test_vae_prefix_and_diffusers_named_single_file(vae, tmp_path):
    save_file({f"vae.{k}": v for k, v in to_ldm(vae.state_dict(), 2).items()}, tmp_path / "a.safetensors")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "b.safetensors")
    for name in ("a", "b"):
        loaded = AutoencoderKL.from_pretrained(tmp_path / f"{name}.safetensors", norm_num_groups=4)
        assert_same_weights(loaded, vae)


def test_config_inferred_from_shapes(tmp_path):
    torch.manual_seed(0)
    src = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    src.save_single_file(tmp_path / "f.safetensors")
    got = AutoencoderKL.from_pretrained(tmp_path / "f.safetensors").config
    assert (got.block_out_channels, got.layers_per_block, got.latent_channels) == ((32, 64, 64), 1, 16)
    assert not (got.use_quant_conv or got.use_post_quant_conv or got.mid_block_add_attention)


def test_sdxl_checkpoint_gets_sdxl_scaling(vae, tmp_path):
    full = {f"first_stage_model.{k}": v for k, v in to_ldm(vae.state_dict(), 2).items()}
    full["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(4)
    save_file(full, tmp_path / "sdxl.safetensors")
    got = AutoencoderKL.from_pretrained(tmp_path / "sdxl.safetensors", norm_num_groups=4)
    assert got.config.scaling_factor == 0.13025


# ------------------------------------------------------------------------------------------ refusals


class Payload:
    """Unpickling this would create a file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"x": Payload(str(marker))}}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        AutoencoderKL.from_pretrained(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_mismatched_checkpoint_names_keys(vae, tmp_path):
    sd = dict(vae.state_dict())
    sd.pop("decoder.conv_out.bias")
    sd["encoder.conv_in.weight"] = torch.zeros(8, 3, 5, 5)
    sd["extra.weight"] = torch.zeros(1)
    (tmp_path / "model").mkdir()
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, tmp_path / "model" / "diffusion_pytorch_model.safetensors"
    )
    (tmp_path / "model" / "config.json").write_text(json.dumps(vae.config.to_diffusers()))
    with pytest.raises(CheckpointError) as err:
        AutoencoderKL.from_pretrained(tmp_path / "model")
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 missing (decoder.conv_out.bias)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "encoder.conv_in.weight: checkpoint (8, 3, 5, 5) vs model (8, 3, 3, 3)" in msg


def test_wrong_model_class_and_architecture(vae, tmp_path):
    VQAutoencoder.from_pretrained("tiny").save_pretrained(tmp_path / "vq")
    with pytest.raises(CheckpointError, match="holds a VQModel, not a AutoencoderKL"):
        AutoencoderKL.from_pretrained(tmp_path / "vq")
    cfg = vae.config.to_diffusers() | {"down_block_types": ["DownBlock2D", "DownBlock2D"]}
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported down_block_types"):
        AutoencoderKL.from_pretrained(tmp_path / "odd")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", None])
def test_unreadable_files(vae, tmp_path, content):
    path = tmp_path / "bad.safetensors"
    if content is None:  # truncated: a real file cut in half
        vae.save_single_file(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: "):
        AutoencoderKL.from_pretrained(path)


def test_unknown_source(tmp_path):
    with pytest.raises(CheckpointError, match="not a file, a folder, or a preset"):
        AutoencoderKL.from_pretrained("no-such-model")
    with pytest.raises(CheckpointError, match="no such file"):
        AutoencoderKL.from_pretrained(tmp_path / "missing.safetensors")


def test_interrupted_save_keeps_previous_file(vae, tmp_path, monkeypatch):
    vae.save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "diffusion_pytorch_model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed in the middle of writing

    monkeypatch.setattr("ldm_vae.io.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        AutoencoderKL.from_pretrained("tiny").save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]


def test_saved_files_get_the_umask_permissions_not_mkstemps_0600(vae, tmp_path):
    old = os.umask(0o022)
    try:
        vae.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644


# ----------------------------------------------------------------------------------------------- VQ


@torch.no_grad()
def test_vq_diffusers_folder_round_trip_and_parity(tmp_path):
    torch.manual_seed(0)
    ours = VQAutoencoder.from_pretrained("tiny")
    ours.save_pretrained(tmp_path / "vq")
    theirs = diffusers.VQModel.from_pretrained(tmp_path / "vq")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, _ = ours(x)
    assert (recon - theirs(x).sample).abs().max() <= 1e-5
    assert (ours.encode(x) - theirs.encode(x).latents).abs().max() <= 1e-5
    theirs.save_pretrained(tmp_path / "back")
    assert_same_weights(VQAutoencoder.from_pretrained(tmp_path / "back"), ours)


def test_taming_vq_checkpoint_in(tmp_path):
    torch.manual_seed(0)
    ours = VQAutoencoder.from_pretrained("tiny")
    ldm = to_ldm(ours.state_dict(), 2)
    assert "quantize.embedding.weight" in ldm
    # taming checkpoints carry the discriminator and LPIPS under loss.*; they are dropped.
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    torch.save({"state_dict": ldm}, tmp_path / "last.ckpt")
    loaded = VQAutoencoder.from_pretrained(tmp_path / "last.ckpt", norm_num_groups=4)
    assert_same_weights(loaded, ours)
    assert loaded.config.num_vq_embeddings == 32 and loaded.config.embed_dim == 4
