"""Programmatic dependent launch of the decode chain (search, finalize, shared, merge): on in the
CUDA table, never requested where it cannot run (CPU, the interpreter, before Hopper, a Triton
without grid dependency control). Its effect on results is covered on the GPU: graph replay equal
to eager and every decode against the reference (test_triton_gpu.py, test_decode_long_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from secure_run.kernels import _triton_common
from secure_run.kernels._triton_common import pdl_launch, pdl_supported
from secure_run.kernels.span_triton import config_for


def test_cuda_table_launches_the_decode_chain_as_dependents() -> None:
    assert config_for(torch.device("cuda"), 128, torch.bfloat16, 1 << 20).decode_pdl
    assert not config_for(torch.device("cpu"), 128, torch.float32, 1 << 20).decode_pdl


def test_not_supported_off_cuda_or_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not pdl_supported(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_triton_common, "_capability_major", lambda device: 9)
    assert not pdl_supported(torch.device("cuda"))


def test_needs_hopper_and_grid_dependency_control(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_triton_common, "_capability_major", lambda device: 8)
    assert not pdl_supported(torch.device("cuda"))
    monkeypatch.setattr(_triton_common, "_capability_major", lambda device: 9)
    assert pdl_supported(torch.device("cuda")) == _triton_common.HAS_PDL
    monkeypatch.setattr(_triton_common, "HAS_PDL", False)
    assert not pdl_supported(torch.device("cuda"))


def test_launch_options() -> None:
    assert pdl_launch(False) == {}
    assert pdl_launch(True) == {"launch_pdl": True}


def test_launch_refused_without_grid_dependency_control(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_triton_common, "HAS_PDL", False)
    with pytest.raises(AssertionError, match="Triton >= 3.4"):
        pdl_launch(True)
