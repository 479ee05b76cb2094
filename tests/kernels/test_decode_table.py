"""The decode design table by cache length (``span_triton.config_for``; H200 sweep in bench/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch

from secure_run.kernels.span_triton import config_for


@pytest.mark.parametrize(("kv_len", "mode"), [(1 << 17, "split"), ((1 << 21) - 1, "split"), (1 << 21, "piece"),
                                              (4 << 20, "piece"), (10 << 20, "piece")])
def test_decode_design_by_length(kv_len: int, mode: str) -> None:
    """split below 2M keys (126 vs 136 us at 1M on an H200), pieces from 2M on (251 vs 289 us union at
    4M, 373 vs 390 us split at 10M)."""
    cfg = config_for(torch.device("cuda"), 128, torch.bfloat16, kv_len)
    assert cfg.decode_mode == mode and cfg.decode_chunk == 1024


def test_cpu_interpreter_table_is_split() -> None:
    assert config_for(torch.device("cpu"), 128, torch.float32, 10 << 20).decode_mode == "split"
