"""The one config builder: presets, diffusers folders and single files accept the same keys and refuse the rest."""

import json
import os

import diffusers
import pytest
import torch

from ldm_vae import AutoencoderKL, ConfigKeyError, VQAutoencoder
from ldm_vae.config import AutoencoderKLConfig, VQConfig, build_model_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach for the hub in these tests

TINY_DIFFUSERS = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    return AutoencoderKL.from_pretrained("tiny").save_pretrained(tmp_path_factory.mktemp("kl") / "m")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("kl") / "x.safetensors"
    return AutoencoderKL.from_pretrained("tiny").save_single_file(path)


def assert_one_line_naming(err: pytest.ExceptionInfo, key: str) -> None:
    message = str(err.value)
    assert "\n" not in message and f"unknown config key '{key}'" in message
    assert "(valid: in_channels, out_channels," in message


# ------------------------------------------------------------------------------------------- refused


def test_preset_with_an_unknown_override():
    with pytest.raises(ConfigKeyError) as err:
        AutoencoderKL.from_pretrained("tiny", scaling_fator=0.2)
    assert_one_line_naming(err, "scaling_fator")
    assert str(err.value).startswith("preset 'tiny': ")


def test_diffusers_folder_with_an_unknown_override(folder):
    with pytest.raises(ConfigKeyError) as err:
        AutoencoderKL.from_pretrained(folder, scaling_fator=0.2)
    assert_one_line_naming(err, "scaling_fator")


def test_diffusers_folder_whose_config_has_an_unknown_key(folder, tmp_path):
    (tmp_path / "m").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / "m" / name).write_bytes((folder / name).read_bytes())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "attention_heads": 8}))
    with pytest.raises(ConfigKeyError) as err:
        AutoencoderKL.from_pretrained(tmp_path / "m")
    assert_one_line_naming(err, "attention_heads")
    assert "act_fn" in str(err.value)  # diffusers' own keys are listed as accepted too


def test_single_file_with_an_unknown_override(single):
    with pytest.raises(ConfigKeyError) as err:
        AutoencoderKL.from_pretrained(single, norm_num_groups=4, scaling_fator=0.2)
    assert_one_line_naming(err, "scaling_fator")
    assert str(err.value).startswith(f"{single}: ")


def test_single_file_with_a_config_dict_holding_an_unknown_key(single):
    with pytest.raises(ConfigKeyError) as err:
        AutoencoderKL.from_pretrained(single, config={"norm_num_groups": 4, "scaling_fator": 0.2})
    assert_one_line_naming(err, "scaling_fator")


def test_unknown_keys_are_value_errors_and_all_named_at_once():
    with pytest.raises(ValueError, match=r"unknown config keys 'foo', 'bar' for VQConfig"):
        VQAutoencoder.from_pretrained("tiny", foo=1, bar=2)


def test_diffusers_only_keys_are_not_overrides():
    # act_fn is a diffusers config key, not a field: accepted in a config.json, refused as an override.
    with pytest.raises(ConfigKeyError, match="unknown config key 'act_fn'"):
        AutoencoderKL.from_pretrained("tiny", act_fn="silu")


def test_each_class_accepts_only_its_own_diffusers_keys():
    vq = build_model_config(VQConfig, {"norm_type": "group", "lookup_from_codebook": False}, {}, "x")
    assert vq == VQConfig()
    with pytest.raises(ConfigKeyError, match="x: unknown config key 'norm_type' for AutoencoderKLConfig"):
        build_model_config(AutoencoderKLConfig, {"norm_type": "group"}, {}, "x")


def test_architecture_checks_still_apply_to_config_dicts(single):
    with pytest.raises(ValueError, match="unsupported act_fn 'gelu'"):
        AutoencoderKL.from_pretrained(single, config={"norm_num_groups": 4, "act_fn": "gelu"})


def test_a_single_file_of_the_other_kind_is_named(single):
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not a VQModel"):
        VQAutoencoder.from_pretrained(single)


# ------------------------------------------------------------------------------------------ accepted


def test_valid_overrides_apply_in_every_source(folder, single):
    assert AutoencoderKL.from_pretrained("tiny", scaling_factor=0.5).config.scaling_factor == 0.5
    assert AutoencoderKL.from_pretrained(folder, scaling_factor=0.5).config.scaling_factor == 0.5
    from_file = AutoencoderKL.from_pretrained(single, norm_num_groups=4, scaling_factor=0.5)
    assert from_file.config.scaling_factor == 0.5 and from_file.config.norm_num_groups == 4
    from_dict = AutoencoderKL.from_pretrained(
        single, config={"_class_name": "AutoencoderKL", "act_fn": "silu", "norm_num_groups": 4}
    )
    assert from_dict.config.norm_num_groups == 4
    assert (
        AutoencoderKL.from_pretrained(single, config=folder).config
        == AutoencoderKL.from_pretrained(folder).config
    )


@torch.no_grad()
def test_a_diffusers_written_kl_config_loads(tmp_path):
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**TINY_DIFFUSERS, scaling_factor=0.3)
    theirs.save_pretrained(tmp_path / "m")
    ours = AutoencoderKL.from_pretrained(tmp_path / "m")
    assert ours.config.scaling_factor == 0.3 and ours.config.block_out_channels == (8, 16)
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # Its config.json also serves as the config= of a single file.
    single = ours.save_single_file(tmp_path / "x.safetensors")
    assert AutoencoderKL.from_pretrained(single, config=tmp_path / "m").config == ours.config


@torch.no_grad()
def test_a_diffusers_written_vq_config_loads(tmp_path):
    torch.manual_seed(0)
    theirs = diffusers.VQModel(**TINY_DIFFUSERS, latent_channels=4, num_vq_embeddings=32, scaling_factor=1.0)
    theirs.save_pretrained(tmp_path / "m")
    ours = VQAutoencoder.from_pretrained(tmp_path / "m")
    assert ours.config.num_vq_embeddings == 32 and ours.config.latent_channels == 4
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_trainer_reports_a_bad_model_override_as_one_config_line():
    from ldm_vae.training import train_vae as tv

    with pytest.raises(tv.ConfigError) as err:
        tv.build_autoencoder(tv.ModelConfig(overrides={"scaling_fator": 0.2}), gradient_checkpointing=False)
    assert str(err.value).startswith("model.overrides: preset 'tiny': unknown config key 'scaling_fator'")
    assert "\n" not in str(err.value)


def test_constructor_overrides_go_through_the_builder():
    assert AutoencoderKL(latent_channels=8).config.latent_channels == 8
    for cls, key in ((AutoencoderKL, "scaling_fator"), (VQAutoencoder, "num_codes")):
        with pytest.raises(ConfigKeyError) as err:
            cls(**{key: 1})
        assert str(err.value).startswith(f"{cls.__name__}: unknown config key '{key}'")
        assert "\n" not in str(err.value)


def test_level_types_follow_a_level_count_override_only_when_plain():
    # All-plain level types follow block_out_channels; attention levels must be restated with a new count.
    vae = AutoencoderKL.from_pretrained("sd", block_out_channels=(8, 16), norm_num_groups=4)
    assert vae.config.down_block_types == ("DownEncoderBlock2D",) * 2
    with pytest.raises(ValueError, match="down_block_types has 4 entries for 1 block_out_channels levels"):
        VQAutoencoder.from_pretrained("vq-f8", block_out_channels=(8,), norm_num_groups=4)
    small = VQAutoencoder.from_pretrained(
        "vq-f8",
        block_out_channels=(8,),
        down_block_types=("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",),
        norm_num_groups=4,
    )
    assert len(small.encoder.down_blocks[0].attentions) == 2


def test_attention_block_types_are_fields_and_go_to_config_json():
    cfg = build_model_config(
        VQConfig, {"down_block_types": ["AttnDownEncoderBlock2D"] * 4, "norm_type": "group"}, {}, "x"
    )
    assert cfg.down_block_types == ("AttnDownEncoderBlock2D",) * 4  # lists from JSON become tuples
    assert cfg.up_block_types == ("UpDecoderBlock2D",) * 4  # absent: all plain
    assert cfg.to_diffusers()["down_block_types"] == ["AttnDownEncoderBlock2D"] * 4


def test_kl_and_vq_preset_names_are_distinct_but_tiny():
    from ldm_vae.config import PRESETS, VQ_PRESETS

    assert set(PRESETS) & set(VQ_PRESETS) == {"tiny"}
