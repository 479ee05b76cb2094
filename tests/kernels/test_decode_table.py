"""The decode design table by cache length (``span_triton.config_for``; H200 sweep in bench/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch

from secure_run.kernels.span_triton import config_for


@pytest.mark.parametrize(("kv_len", "mode"), [(1 << 17, "split"), ((1 << 21) - 1, "split"), (1 << 21, "union"),
                                              (4 << 20, "union"), ((8 << 20) - 1, "union"), (8 << 20, "split"),
                                              (10 << 20, "split")])
def test_decode_design_by_length(kv_len: int, mode: str) -> None:
    """split below 2M keys and from 8M on (388 vs 444 us at 10M on an H200), union in between."""
    assert config_for(torch.device("cuda"), 128, torch.bfloat16, kv_len).decode_mode == mode


def test_cpu_interpreter_table_is_split() -> None:
    assert config_for(torch.device("cpu"), 128, torch.float32, 10 << 20).decode_mode == "split"
