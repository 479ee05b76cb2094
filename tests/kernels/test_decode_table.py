"""The decode design table by cache length (``span_triton.config_for``; H200 sweep in bench/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch

from secure_run.kernels.span_triton import config_for


@pytest.mark.parametrize("kv_len", [1 << 12, 1 << 17, 1 << 20, 4 << 20, 10 << 20])
def test_decode_design_by_length(kv_len: int) -> None:
    """The shared-piece design at every length on CUDA (H200: 111.0 vs 125.7 us split at 1M, 212.3 vs
    243.4 us pieces per row at 4M, 345.2 vs 362.6 at 10M), 2048-key pieces, 1-warp small kernels,
    programmatic dependent launch; the merge loads every slot's parts at once, with 2 warps (2026-12-04:
    111.6 / 213.0 / 347.9 vs 112.0 / 215.1 / 350.8 us slot by slot with 1 warp)."""
    cfg = config_for(torch.device("cuda"), 128, torch.bfloat16, kv_len)
    assert (cfg.decode_mode, cfg.decode_chunk, cfg.decode_small_warps, cfg.decode_pdl) == ("shared", 2048, 1, True)
    assert (cfg.decode_merge_all, cfg.decode_merge_warps) == (True, 2)


def test_cpu_interpreter_table_is_split() -> None:
    assert config_for(torch.device("cpu"), 128, torch.float32, 10 << 20).decode_mode == "split"
