"""The decode design table by cache length (``span_triton.config_for``; H200 sweep in bench/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch

from secure_run.kernels.span_triton import config_for


@pytest.mark.parametrize("kv_len", [1 << 12, 1 << 17, 1 << 20, 4 << 20, 10 << 20])
def test_decode_design_by_length(kv_len: int) -> None:
    """The shared-piece design at every length on CUDA (H200: 113.0 vs 125.8 us split at 1M, 213.8 vs
    244.5 us pieces per row at 4M, ~350 vs 362.9 at 10M), 2048-key pieces, 1-warp small kernels."""
    cfg = config_for(torch.device("cuda"), 128, torch.bfloat16, kv_len)
    assert (cfg.decode_mode, cfg.decode_chunk, cfg.decode_small_warps) == ("shared", 2048, 1)


def test_cpu_interpreter_table_is_split() -> None:
    assert config_for(torch.device("cpu"), 128, torch.float32, 10 << 20).decode_mode == "split"
