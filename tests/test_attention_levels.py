"""Attention inside levels (diffusers' AttnDownEncoderBlock2D / AttnUpDecoderBlock2D, LDM's attn_resolutions):
parity with diffusers, the LDM conversion table, shape inference and the LDM model-zoo presets."""

import dataclasses
import os

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from ldm_vae import AutoencoderKL, AutoencoderKLConfig, VQAutoencoder, VQConfig
from ldm_vae.checkpoint import from_ldm, infer_config_fields, to_ldm
from ldm_vae.config import PRESETS, VQ_PRESETS, attention_block_types, build_model_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach for the hub in these tests

# Three levels, attention at the two lowest resolutions (encoder levels 1, 2 = diffusers' up_blocks 0, 1).
LEVELS = (False, True, True)
KL = AutoencoderKLConfig(
    block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, **attention_block_types(LEVELS)
)
VQ = VQConfig(
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    num_vq_embeddings=32,
    **attention_block_types(LEVELS),
)
NEW_PRESETS = {
    AutoencoderKL: ("kl-f4", "kl-f8", "kl-f16", "kl-f32"),
    VQAutoencoder: (
        "vq-f4",
        "vq-f4-noattn",
        "vq-f8",
        "vq-f8-n256",
        "vq-f16",
        "vqgan-imagenet-f16-1024",
        "vqgan-imagenet-f16-16384",
    ),
}
PRESET_CASES = [(cls, name) for cls, names in NEW_PRESETS.items() for name in names]


def twin(model):
    """The diffusers model of ``model``'s config (from its config.json dict), with the same weights."""
    cfg = {k: v for k, v in model.config.to_diffusers().items() if k != "_class_name"}
    theirs = getattr(diffusers, model.diffusers_class_name).from_config(cfg)
    assert list(theirs.state_dict()) == list(model.state_dict())  # same names, same order
    theirs.load_state_dict(model.state_dict(), strict=True)
    return theirs.eval()


def test_modules_carry_diffusers_names():
    keys = set(AutoencoderKL(KL).state_dict())
    for part in ("group_norm.weight", "to_q.weight", "to_k.bias", "to_v.weight", "to_out.0.weight"):
        assert f"encoder.down_blocks.1.attentions.0.{part}" in keys
        assert f"decoder.up_blocks.1.attentions.1.{part}" in keys  # layers_per_block + 1 per decoder level
    assert not any(
        k.startswith(("encoder.down_blocks.0.attentions", "decoder.up_blocks.2.attentions")) for k in keys
    )


@torch.no_grad()
def test_vq_parity_with_diffusers():
    torch.manual_seed(0)
    ours = VQAutoencoder(VQ).eval()
    theirs = twin(ours)
    for shape in [(2, 3, 32, 32), (1, 3, 40, 24)]:
        x = torch.rand(shape) * 2 - 1
        h = ours.encode(x)
        assert (h - theirs.encode(x).latents).abs().max() <= 1e-5
        z_q = ours.encode_latents(x)
        assert (ours.decode(z_q) - theirs.decode(z_q, force_not_quantize=True).sample).abs().max() <= 1e-5
        assert (ours(x)[0] - theirs(x).sample).abs().max() <= 1e-5


@pytest.mark.parametrize("cls, config", [(AutoencoderKL, KL), (VQAutoencoder, VQ)], ids=["kl", "vq"])
@torch.no_grad()
def test_diffusers_config_json_round_trips(cls, config, tmp_path):
    torch.manual_seed(0)
    ours = cls(config)
    ours.save_pretrained(tmp_path / "a")
    theirs = getattr(diffusers, cls.diffusers_class_name).from_pretrained(tmp_path / "a")
    assert list(theirs.config.down_block_types) == list(config.down_block_types)
    theirs.save_pretrained(tmp_path / "b")
    back = cls.from_pretrained(tmp_path / "b")
    assert back.config == ours.config
    sa, sb = back.state_dict(), ours.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_attention_units_are_global_and_follow_their_resnet():
    enc, dec = AutoencoderKL(KL).encoder, AutoencoderKL(KL).decoder
    for net, blocks in ((enc, enc.down_blocks), (dec, dec.up_blocks)):
        units = net.units()
        fns = [u.fn for u in units]
        for block in (b for b in blocks if len(b.attentions)):
            for resnet, attn in zip(block.resnets, block.attentions, strict=True):
                i = fns.index(resnet)
                assert fns[i + 1] is attn and units[i + 1].is_global
        assert sum(u.is_global for u in units) == sum(len(b.attentions) for b in blocks) + 1  # + mid


# ------------------------------------------------------------------------------------------- LDM layout


def test_ldm_names_both_directions():
    model = AutoencoderKL(KL)
    sd = model.state_dict()
    ldm = to_ldm(sd, 3)
    for part in ("norm.weight", "q.weight", "k.bias", "v.weight", "proj_out.weight"):
        assert f"encoder.down.1.attn.0.{part}" in ldm and f"encoder.down.2.attn.0.{part}" in ldm
        # diffusers' up_blocks.0 (lowest resolution) is LDM's up.2; decoder levels hold 2 attentions here.
        assert f"decoder.up.2.attn.1.{part}" in ldm and f"decoder.up.1.attn.1.{part}" in ldm
    assert not any(".attentions." in k or "to_q" in k or "group_norm" in k for k in ldm)
    assert ldm["encoder.down.1.attn.0.q.weight"].shape == (16, 16, 1, 1)  # LDM's 1x1 convs
    assert ldm["decoder.up.2.attn.0.proj_out.weight"].shape == (16, 16, 1, 1)
    back = from_ldm(ldm, list(sd), 3)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("cls, config", [(AutoencoderKL, KL), (VQAutoencoder, VQ)], ids=["kl", "vq"])
@torch.no_grad()
def test_single_file_round_trip(cls, config, tmp_path):
    torch.manual_seed(0)
    ours = cls(config).eval()
    path = ours.save_single_file(tmp_path / "m.safetensors", prefix="first_stage_model.")
    assert "first_stage_model.decoder.up.1.attn.1.q.weight" in load_file(path)
    # Shapes tell the attention levels; GroupNorm groups and sample_size are not in the tensors.
    loaded = cls.from_pretrained(path, norm_num_groups=4, sample_size=config.sample_size)
    assert loaded.config.down_block_types == config.down_block_types
    assert loaded.config.up_block_types == config.up_block_types
    sa, sb = loaded.state_dict(), ours.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    # 1e-5 as test_weights_io: loaded tensors' alignment can pick other oneDNN kernels.
    assert (loaded(x, sample_posterior=False)[0] - ours(x, sample_posterior=False)[0]).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------- presets

# What each preset must be (LDM models/first_stage_models/*/config.yaml; taming configs/imagenet_vqgan.yaml):
# (ch_mult, z_channels, encoder levels with attention, mid attention, codes).
ZOO = {
    "kl-f4": ((1, 2, 4), 3, (), True, None),
    "kl-f8": ((1, 2, 4, 4), 4, (), True, None),
    "kl-f16": ((1, 1, 2, 2, 4), 16, (4,), True, None),
    "kl-f32": ((1, 1, 2, 2, 4, 4), 64, (4, 5), True, None),
    "vq-f4": ((1, 2, 4), 3, (), True, 8192),
    "vq-f4-noattn": ((1, 2, 4), 3, (), False, 8192),
    "vq-f8": ((1, 2, 2, 4), 4, (3,), True, 16384),
    "vq-f8-n256": ((1, 2, 2, 4), 4, (3,), True, 256),
    "vq-f16": ((1, 1, 2, 2, 4), 8, (4,), True, 16384),
    "vqgan-imagenet-f16-1024": ((1, 1, 2, 2, 4), 256, (4,), True, 1024),
    "vqgan-imagenet-f16-16384": ((1, 1, 2, 2, 4), 256, (4,), True, 16384),
}


def preset(cls, name):
    return (PRESETS if cls is AutoencoderKL else VQ_PRESETS)[name]


@pytest.mark.parametrize("cls, name", PRESET_CASES, ids=[n for _, n in PRESET_CASES])
def test_preset_is_its_source_config(cls, name):
    mult, z, attn, mid, codes = ZOO[name]
    cfg = preset(cls, name)
    assert cfg.block_out_channels == tuple(128 * m for m in mult)
    assert (cfg.layers_per_block, cfg.norm_num_groups, cfg.latent_channels) == (2, 32, z)
    # LDM's attn_resolutions at 256 px: level i runs at 256 / 2**i.
    levels = tuple(i in attn for i in range(len(mult)))
    assert (cfg.down_block_types, cfg.up_block_types) == tuple(attention_block_types(levels).values())
    assert cfg.mid_block_add_attention is mid
    if codes is not None:
        assert (cfg.num_vq_embeddings, cfg.embed_dim) == (codes, z)


@pytest.mark.parametrize("cls, name", PRESET_CASES, ids=[n for _, n in PRESET_CASES])
def test_inference_recovers_real_preset_from_its_keys_and_shapes(cls, name):
    cfg = preset(cls, name)
    with torch.device("meta"):  # real sizes, no memory, nothing run
        model = cls(cfg)
    ldm = to_ldm(model.state_dict(), len(cfg.block_out_channels))
    inferred = infer_config_fields(ldm)
    if "vq_embed_dim" in inferred:
        assert inferred.pop("vq_embed_dim") == cfg.embed_dim
    assert inferred == {k: getattr(cfg, k) for k in inferred}
    # The file's keys are those a model of the inferred config expects, with the same shapes.
    with torch.device("meta"):
        rebuilt = cls(build_model_config(type(cfg), {**dataclasses.asdict(cfg), **inferred}, {}, name))
    assert {k: v.shape for k, v in to_ldm(rebuilt.state_dict(), len(cfg.block_out_channels)).items()} == {
        k: v.shape for k, v in ldm.items()
    }


@pytest.mark.parametrize("cls, name", PRESET_CASES, ids=[n for _, n in PRESET_CASES])
@torch.no_grad()
def test_small_channel_preset_loads_back_from_its_single_file(cls, name, tmp_path):
    cfg = preset(cls, name)
    small = {"block_out_channels": tuple(c // 16 for c in cfg.block_out_channels), "norm_num_groups": 4}
    if cls is VQAutoencoder:
        small["num_vq_embeddings"] = 64
    torch.manual_seed(0)
    model = cls(cfg, **small).eval()
    path = model.save_single_file(tmp_path / f"{name}.safetensors")
    loaded = cls.from_pretrained(path, norm_num_groups=4, scaling_factor=cfg.scaling_factor)
    expected = model.config
    if cls is VQAutoencoder:
        expected = dataclasses.replace(expected, vq_embed_dim=expected.embed_dim)
    assert dataclasses.replace(loaded.config, sample_size=expected.sample_size) == expected
    sa, sb = loaded.state_dict(), model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
