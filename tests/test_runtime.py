"""Dtype choices: ``auto`` follows the hardware (native bf16 or fp32), for inference and training alike."""

import pytest
import torch

from ldm_vae import runtime


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_the_hardware_runs_it_natively(monkeypatch, native):
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": native)
    assert runtime.resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    # Training: emulated bf16 autocast is several times slower than fp32 on AVX2-only CPUs.
    assert runtime.autocast_precision("auto") == ("bf16" if native else "no")


@pytest.mark.parametrize("name", ["no", "bf16", "fp16"])
def test_explicit_training_precision_is_kept(monkeypatch, name):
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": False)
    assert runtime.autocast_precision(name) == name


def test_explicit_dtypes_and_a_clear_error_for_unknown_names():
    assert runtime.resolve_dtype("fp16") == torch.float16
    assert runtime.resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        runtime.resolve_dtype("int8")
