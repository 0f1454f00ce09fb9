"""VQ checkpoint formats: Latent Diffusion's index remapping (taming's VectorQuantizer2 ``remap`` / ``used`` /
``unknown_index``), taming v1 / VectorQuantizer2 / LDM training ``.ckpt`` files, and exports whose keys are the
original modules' (tests/data/original_vq_keys.json, written by scripts/original_vq_keys.py from those modules).

Expected remapped indices are written from the original's semantics: the index of codebook row r is the first
position of r in ``used``; a row not in ``used`` gets len(used) ("extra"), a given int, or a uniform draw in
[0, len(used)) ("random"); decoding index i takes row used[i], and the "extra" index row used[0].
"""

import dataclasses
import json
import os
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from _scripts import import_script
from safetensors.torch import load_file

from ldm_vae import AutoencoderKL, CheckpointError, VQAutoencoder, VQConfig
from ldm_vae.autoencoders import autoencoder_class, load_autoencoder
from ldm_vae.checkpoint import single_file_class, strip_prefix, to_ldm
from ldm_vae.vq import VectorQuantizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURE = json.loads((Path(__file__).parent / "data" / "original_vq_keys.json").read_text())
USED = [9, 2, 14, 2, 0, 7]  # codebook rows in use; row 2 twice (its first position, 1, is its index)
ROWS = [2, 9, 5, 14, 0, 11, 7, 2, 3, 9, 15, 0]  # the nearest row at each of 12 positions; 5, 11, 3, 15 unused


def expected_index(row: int, unknown):
    """The original's remap_to_used for one row (None: a random draw)."""
    if row in USED:
        return USED.index(row)
    return {"extra": len(USED), "random": None}.get(unknown, unknown)


def quantizer(**kwargs) -> tuple[VectorQuantizer, torch.Tensor]:
    """A 16-code quantizer with codes far apart and latents (1, 2, 3, 4) next to the codes of ROWS."""
    q = VectorQuantizer(16, 2, **kwargs)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.stack([torch.arange(16.0), -torch.arange(16.0) / 2], 1))
        if q.used is not None:
            q.used.copy_(torch.tensor(USED))
    z = q.embedding.weight.detach()[ROWS] + 0.1 * torch.randn(
        len(ROWS), 2, generator=torch.Generator().manual_seed(0)
    )
    return q, z.T.reshape(1, 2, 3, 4)


# ------------------------------------------------------------------------------------------------ remap


@pytest.mark.parametrize("unknown", ["extra", 4, "random"])
@torch.no_grad()
def test_remapped_indices_are_positions_in_used(unknown):
    q, z = quantizer(num_used_codes=len(USED), unknown_index=unknown)
    plain, _ = quantizer()
    z_q, info = q(z)
    z_plain, info_plain = plain(z)
    assert torch.equal(info_plain.indices.flatten(), torch.tensor(ROWS))  # the construction's nearest rows
    assert torch.equal(z_q, z_plain)  # the remap renumbers indices and leaves the latents alone
    assert torch.equal(info.usage, info_plain.usage) and torch.equal(info.perplexity, info_plain.perplexity)
    got = info.indices.flatten().tolist()
    for row, index in zip(ROWS, got, strict=True):
        want = expected_index(row, unknown)
        if want is None:
            assert 0 <= index < len(USED)
        else:
            assert index == want, (row, index, want)
    # Decoding index i takes row used[i]; the "extra" index takes row used[0].
    rows_back = [USED[i] if i < len(USED) else USED[0] for i in got]
    assert torch.equal(q.lookup(info.indices), plain.embed(torch.tensor(rows_back).view(1, 3, 4)))
    assert q.num_indices == len(USED) + (unknown == "extra")


def test_random_unknown_indices_are_uniform_draws():
    q, z = quantizer(num_used_codes=len(USED), unknown_index="random")
    torch.manual_seed(0)
    draws = torch.stack([q(z)[1].indices.flatten() for _ in range(300)])  # (300, 12)
    unknown = [i for i, r in enumerate(ROWS) if r not in USED]
    counts = torch.bincount(draws[:, unknown].flatten(), minlength=len(USED))
    assert counts.shape == (len(USED),) and counts.min() > 0.7 * counts.float().mean()  # every index, evenly
    known = [i for i, r in enumerate(ROWS) if r in USED]
    assert (draws[:, known] == draws[0, known]).all()  # known rows never move


@pytest.mark.parametrize("unknown", ["extra", 2])
@torch.no_grad()
def test_checkpoint_with_used_buffer_loads_and_remaps(unknown, tmp_path):
    torch.manual_seed(0)
    model = VQAutoencoder.from_pretrained("tiny").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = model.encode(x)
    flat = h.permute(0, 2, 3, 1).reshape(-1, 4)
    rows = torch.cdist(flat, model.quantize.embedding.weight).argmin(1)  # the nearest rows, (512,)
    hit = rows.unique().tolist()
    # Half the rows hit here are in use, with rows never hit between them, in a shuffled order.
    used = [*hit[::2], *[r for r in range(32) if r not in hit][:3]][::-1]
    state = to_ldm(model.state_dict(), 2)
    state["quantize.used"] = torch.tensor(used, dtype=torch.int32)  # np.load of an int32 .npy
    state["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, tmp_path / "last.ckpt")

    loaded = VQAutoencoder.from_pretrained(tmp_path / "last.ckpt", norm_num_groups=4, unknown_index=unknown)
    assert (loaded.config.num_used_codes, loaded.config.unknown_index) == (len(used), unknown)
    assert loaded.quantize.used.dtype == torch.long and loaded.quantize.used.tolist() == used
    _, info = loaded(x)
    extra = len(used) if unknown == "extra" else unknown
    want = [used.index(r) if r in used else extra for r in rows.tolist()]
    assert info.indices.flatten().tolist() == want
    assert torch.equal(loaded.encode_latents(x), model.encode_latents(x))  # the nearest codes, unremapped
    back_rows = torch.tensor([used[i] if i < len(used) else used[0] for i in want]).view(2, 16, 16)
    expected = model.decode(model.quantize.embed(back_rows))
    torch.testing.assert_close(loaded.decode_indices(info.indices), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_remap_round_trips_through_single_file_and_diffusers_folder(tmp_path):
    torch.manual_seed(0)
    model = VQAutoencoder.from_pretrained("tiny").set_remap(
        torch.tensor([5, 1, 30, 8]), unknown_index="extra"
    )
    path = model.save_single_file(tmp_path / "m.safetensors", dtype="fp16")
    written = load_file(path)
    assert written["quantize.used"].dtype == torch.int64 and written["quantize.used"].tolist() == [
        5,
        1,
        30,
        8,
    ]
    back = VQAutoencoder.from_pretrained(path, norm_num_groups=4, unknown_index="extra")
    assert back.config.num_used_codes == 4 and back.quantize.used.tolist() == [5, 1, 30, 8]

    model.save_pretrained(tmp_path / "folder")
    again = VQAutoencoder.from_pretrained(tmp_path / "folder", dtype="bf16")
    assert again.config == model.config and again.quantize.used.dtype == torch.long
    assert again.quantize.used.tolist() == [5, 1, 30, 8]

    # diffusers' VQModel hard-codes remap=None: it loads the folder (warning about the key and the buffer) with
    # the same outputs, but its indices are codebook rows, ours positions in used.
    theirs = diffusers.VQModel.from_pretrained(tmp_path / "folder").eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    h = model.encode(x)
    assert (model(x)[0] - theirs(x).sample).abs().max() <= 1e-5
    their_rows = theirs.quantize(h)[2][2].view(1, 16, 16)
    assert torch.equal(their_rows, model.quantize.nearest(h))
    assert torch.equal(model.quantize.remap(their_rows), model.quantize(h)[1].indices)


def test_remap_from_npy_file_and_bad_remaps(tmp_path):
    torch.manual_seed(0)
    np.save(tmp_path / "used.npy", np.array([3, 0, 17], dtype=np.int64))
    model = VQAutoencoder.from_pretrained("tiny").set_remap(tmp_path / "used.npy", unknown_index=1)
    assert model.quantize.used.tolist() == [3, 0, 17] and model.quantize.num_indices == 3
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match=r"not a readable \.npy"):
        model.set_remap(tmp_path / "obj.npy")  # pickles are never loaded
    with pytest.raises(CheckpointError, match=r"rows must lie in \[0, 32\)"):
        model.set_remap(torch.tensor([3, 32]))
    with pytest.raises(ValueError, match="unknown_index 3"):
        model.set_remap(torch.tensor([3, 0, 17]), unknown_index=3)  # not an index of a used row
    with pytest.raises(ValueError, match="unknown_index 'bogus'"):
        VQConfig(num_vq_embeddings=8, num_used_codes=4, unknown_index="bogus")
    assert model.set_remap(None).quantize.used is None and model.config.num_used_codes is None
    # A checkpoint whose used rows fall outside its codebook is refused on load, in one line.
    state = to_ldm(model.state_dict(), 2)
    state["quantize.used"] = torch.tensor([0, 40])
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(
        CheckpointError, match=r"bad.ckpt: quantize.used: codebook rows must lie in \[0, 32\)"
    ):
        VQAutoencoder.from_pretrained(tmp_path / "bad.ckpt", norm_num_groups=4)


def test_decode_indices_checks_its_input():
    torch.manual_seed(0)
    model = VQAutoencoder.from_pretrained("tiny").set_remap(torch.tensor([3, 0, 17]), unknown_index="extra")
    assert model.decode_indices(torch.full((1, 4, 4), 3, dtype=torch.int32)).shape == (1, 3, 8, 8)  # "extra"
    with pytest.raises(ValueError, match=r"code indices must lie in \[0, 4\), got \[0, 4\]"):
        model.decode_indices(torch.tensor([[[0, 4]]]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model.decode_indices(torch.zeros(1, 4, 4))


# ------------------------------------------------------------------------------------ original .ckpt files


def test_strip_prefix_drops_loss_and_other_models():
    t = torch.zeros(1)
    taming = {"encoder.conv_in.weight": t, "quantize.embedding.weight": t, "loss.logvar": t}
    taming |= {"loss.perceptual_loss.net.slice1.0.weight": t, "loss.discriminator.main.0.weight": t}
    assert strip_prefix(taming) == ({"encoder.conv_in.weight": t, "quantize.embedding.weight": t}, "")
    ldm = {f"first_stage_model.{k}": v for k, v in taming.items() if not k.startswith("loss.")}
    ldm |= {"model.diffusion_model.input_blocks.0.0.weight": t, "cond_stage_model.embedding.weight": t}
    assert strip_prefix(ldm) == (
        {"encoder.conv_in.weight": t, "quantize.embedding.weight": t},
        "first_stage_model.",
    )


@pytest.mark.parametrize("layout", ["taming-v1", "ldm-v2-used", "ldm-full"])
@torch.no_grad()
def test_original_training_checkpoints_load(layout, tmp_path):
    """taming's VectorQuantizer (v1: the codebook only) and VectorQuantizer2 with ``used`` (LDM) inside Lightning
    training checkpoints with their loss (LPIPS, discriminator), and an LDM checkpoint with the first stage."""
    torch.manual_seed(0)
    ours = VQAutoencoder.from_pretrained("tiny")
    state = to_ldm(ours.state_dict(), 2)
    if layout == "ldm-v2-used":
        ours.set_remap(torch.tensor([4, 0, 9]))
        state["quantize.used"] = torch.tensor([4, 0, 9])
    if layout == "ldm-full":
        state = {f"first_stage_model.{k}": v for k, v in state.items()}
        state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)
    else:
        state["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
        state["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
        state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 4.5e-6, "params": [0]}]}
    ckpt = {"state_dict": state, "global_step": 1000, "epoch": 3, "optimizer_states": [optimizer]}
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert autoencoder_class(tmp_path / "last.ckpt") is VQAutoencoder
    loaded = load_autoencoder(tmp_path / "last.ckpt", norm_num_groups=4)
    sa, sb = loaded.state_dict(), ours.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(CheckpointError, match="holds a VQModel, not a AutoencoderKL"):
        AutoencoderKL.from_pretrained(tmp_path / "last.ckpt")


def test_one_test_tells_the_kind_of_a_single_file(tmp_path):
    assert single_file_class(["first_stage_model.quantize.embedding.weight"]) == "VQModel"
    assert single_file_class(["quantize.embedding.weight", "encoder.conv_in.weight"]) == "VQModel"
    assert single_file_class(["quant_conv.weight", "vae.encoder.conv_in.weight"]) == "AutoencoderKL"
    path = AutoencoderKL.from_pretrained("tiny").save_single_file(tmp_path / "kl.safetensors")
    assert autoencoder_class(path) is AutoencoderKL
    with pytest.raises(CheckpointError, match="holds a AutoencoderKL, not a VQModel"):
        VQAutoencoder.from_pretrained(path)


# ----------------------------------------------------------------------------- exports vs the original keys

CASES = import_script("original_vq_keys").CASES


def exported(name: str, device: str = "cpu") -> dict[str, list[int]]:
    _, _, _, cfg, used = CASES[name]
    with torch.device(device):  # meta: real shapes, no memory
        model = VQAutoencoder(cfg)
    if used is not None:
        model.set_remap(torch.tensor(used), unknown_index="extra")
    return {k: list(v.shape) for k, v in model.single_file_state_dict().items()}


@pytest.mark.parametrize("name", list(CASES))
def test_export_has_exactly_the_original_keys_and_shapes(name):
    assert exported(name, "meta") == FIXTURE[name]


@pytest.mark.parametrize("name", ["tiny", "tiny-attn", "tiny-remap"])
@torch.no_grad()
def test_original_key_set_loads_and_written_file_matches(name, tmp_path):
    """A file of exactly the original modules' tensors loads (and nothing is left out); our file has those keys."""
    _, _, _, cfg, used = CASES[name]
    torch.manual_seed(0)
    state = {k: torch.randn(shape) for k, shape in FIXTURE[name].items() if k != "quantize.used"}
    if used is not None:
        state["quantize.used"] = torch.tensor(used)
    torch.save({"state_dict": state}, tmp_path / "orig.ckpt")
    loaded = VQAutoencoder.from_pretrained(
        tmp_path / "orig.ckpt", norm_num_groups=4, sample_size=cfg.sample_size
    )
    written = load_file(loaded.save_single_file(tmp_path / "ours.safetensors"))
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)
    n_used = None if used is None else len(used)
    assert loaded.config == dataclasses.replace(cfg, vq_embed_dim=cfg.embed_dim, num_used_codes=n_used)
