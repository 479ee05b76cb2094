"""Prefill pair tiles, CPU interpreter: the unmasked inside run of each tile (``pair_phases``) and
its TMA loads (``pair_tma``) give the masked loop's output, on a poisoned static cache, with and
without a padding mask; and the rules under which a K / V layout gets a TMA descriptor."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from kernel_helpers import TOL, left_pad_mask, make_inputs, row_rel_err, spy_tma_descriptors

from secure_run.kernels import SpanParams, _triton_prefill, span_triton
from secure_run.kernels.reference import span_search_reference, superlinear_attention_reference
from secure_run.kernels.span_triton import superlinear_attention_triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter suite")

#: W = 64 and spans of ~70-100 keys at positions ~300: tiles share whole 16-key blocks
P_WIDE = SpanParams(sw_index=9, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.55,
                    search_power=0.55)


def _inside_run_blocks(q1: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                       bp: int, bn: int) -> int:
    """Blocks the kernel runs unmasked: per tile of ``bp`` sorted pairs, whole ``bn``-key blocks from
    the largest start to the smallest end of its valid rows (the test's premise, not the result)."""
    s = span_search_reference(q1, k, pos, P_WIDE, mask)
    R = q1.shape[1] // k.shape[1]
    _, lo, hi = _triton_prefill.sort_pairs(s.qstart, s.qend, pos, P_WIDE.window_len, R, bn)
    total = 0
    for t in range(0, lo.shape[-1], bp):
        tlo, thi = lo[..., t:t + bp], hi[..., t:t + bp]
        ok = (thi >= tlo) & (tlo >= 0)
        for row_ok, row_lo, row_hi in zip(ok.flatten(0, 1), tlo.flatten(0, 1), thi.flatten(0, 1), strict=True):
            if not row_ok.any():
                continue
            first, f_lo, f_hi = int(row_lo[row_ok].min()), int(row_lo[row_ok].max()), int(row_hi[row_ok].min())
            b0 = first + -(-max(f_lo - first, 0) // bn) * bn
            total += max(f_hi + 1 - b0, 0) // bn
    return total


@pytest.mark.parametrize(("dtype", "with_mask"), [(torch.float16, False), (torch.float16, True), (torch.float32, True)])
def test_inside_run_and_tma_equal_the_masked_loop(dtype: torch.dtype, with_mask: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    B, L, start, Lmax, D = 2, 40, 260, 320, 16
    q1, q2, k, v = make_inputs(B, 4, 2, L, Lmax, D, dtype, seed=31)
    k[:, :, start + L:] = float("nan")  # unfilled static-cache tail, never read
    v[:, :, start + L:] = float("inf")
    mask = left_pad_mask(B, Lmax, 7) if with_mask else None
    pos = torch.arange(start, start + L)
    base = span_triton.config_for(k.device, D, dtype, Lmax)
    assert _inside_run_blocks(q1, k, pos, mask, base.pair_block_p, base.pair_block_n) > 50

    made = spy_tma_descriptors(monkeypatch, _triton_prefill)
    outs = {}
    for phases, tma in [(False, False), (True, False), (True, True)]:
        cfg = dataclasses.replace(base, pair_phases=phases, pair_tma=tma)
        monkeypatch.setattr(span_triton, "config_for", lambda *a, cfg=cfg, **kw: cfg)
        out = torch.full((B, 4, L, D), float("nan"), dtype=dtype)
        superlinear_attention_triton(q1, q2, k, v, pos, P_WIDE, mask, out=out)
        assert not out.isnan().any()
        outs[(phases, tma)] = out
    ref = superlinear_attention_reference(q1, q2, k, v, pos, P_WIDE, mask)
    for key, out in outs.items():
        assert row_rel_err(out, ref).max() <= TOL[dtype], key
        torch.testing.assert_close(out, outs[(False, False)], rtol=2e-3 if dtype == torch.float16 else 1e-5,
                                   atol=1e-3 if dtype == torch.float16 else 1e-6)
    # 16-bit K / V of this layout load through TMA; fp32 falls back to pointer loads
    assert made == ([True, True] if dtype == torch.float16 else [False])


def test_tma_descriptor_only_for_layouts_it_can_address() -> None:
    k = torch.zeros(2, 3, 40, 16, dtype=torch.float16)
    d = _triton_prefill.tma_descriptor(k, 16, 16)
    assert d is not None and list(d.shape) == [2 * 3 * 40, 16]
    sliced = torch.zeros(2, 3, 64, 16, dtype=torch.bfloat16)[:, :, :40]  # a static cache's first 40 keys
    d = _triton_prefill.tma_descriptor(sliced, 16, 16)
    assert d is not None and list(d.shape) == [(1 * 3 * 64 + 2 * 64) + 40, 16]
    assert _triton_prefill.tma_descriptor(k.float(), 16, 16) is None  # 32-bit elements
    assert _triton_prefill.tma_descriptor(k, 16, 32) is None  # D does not fill the block
    heads_inner = torch.zeros(2, 40, 3, 16, dtype=torch.float16).transpose(1, 2)  # [B, L, H, D] storage
    assert _triton_prefill.tma_descriptor(heads_inner, 16, 16) is None  # head stride < key stride
    odd = torch.zeros(2 * 3 * 40 * 12, dtype=torch.float16).view(2, 3, 40, 12)[..., :8]  # 24-byte rows
    assert _triton_prefill.tma_descriptor(odd, 16, 8) is None
