"""Defaults that depend on the GPU, with CUDA faked: optim.implementation=auto picks
DeepSpeed's FusedAdam only where it can run (built at install time, or a CUDA toolkit to build
it), otherwise torch's AdamW with one line; the MFU peak follows the device's name."""

from __future__ import annotations

import pytest
import torch

from launcher.train import engine
from launcher.train.main import peak_flops


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_without_cuda_is_torch():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    assert engine.use_torch_adam("auto")


@pytest.mark.parametrize(
    ("built", "cuda_home", "torch_adam"),
    [(1, None, False), (False, "/usr/local/cuda", False), (False, None, True)],
)
def test_auto_on_cuda_falls_back_when_fused_adam_cannot_run(
    cuda, monkeypatch, capsys, built, cuda_home, torch_adam
):
    monkeypatch.setattr(engine, "installed_ops", {"fused_adam": built})
    monkeypatch.setattr(engine, "CUDA_HOME", cuda_home)
    assert engine.use_torch_adam("auto") is torch_adam
    said = "FusedAdam is not built and no CUDA toolkit can build it" in capsys.readouterr().out
    assert said is torch_adam


def test_explicit_choice_is_kept(cuda, monkeypatch):
    monkeypatch.setattr(engine, "installed_ops", {"fused_adam": False})
    monkeypatch.setattr(engine, "CUDA_HOME", None)
    assert engine.use_torch_adam("torch")
    assert not engine.use_torch_adam("deepspeed")


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", 312e12),
    ],
)
def test_mfu_peak_follows_the_device(cuda, monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert peak_flops(0.0) == peak
    assert peak_flops(123e12) == 123e12  # log.peak_flops_per_rank wins
