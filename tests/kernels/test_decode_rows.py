"""Batched decode with one position per row (``cache_position`` [B, 1], Lq == 1), under the CPU
interpreter: one launch set for rows at very different positions (window-only, few stripes, many
stripes) equals the reference run row by row, for every decode design, fp32 and fp16; the row's
result is bit-identical to a batch-1 call of that row; the shared-position path is unchanged; other
position shapes are refused with the ``kernels.cache_position`` rule.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from kernel_helpers import P_INT2, P_INT3_NOFWD, TOL, left_pad_mask, make_inputs, row_rel_err

from secure_run.kernels import KernelInputError, SpanParams, superlinear_attention
from secure_run.kernels.reference import span_search_reference, superlinear_attention_reference
from secure_run.kernels.span_triton import superlinear_attention_triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter suite")

#: row 0 sees only its window (no anchor), rows 1 and 2 search ~24 and ~63 stripes
POSITIONS = (5, 300, 2000)
LKV = 2048


def _use_decode_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    from secure_run.kernels import span_triton

    base = span_triton.config_for
    monkeypatch.setattr(span_triton, "config_for", lambda *a, **kw: dataclasses.replace(
        base(*a, **kw), decode_mode=mode.split("-")[0], decode_lane_max=mode.endswith("-lanes")))


def _inputs(dtype: torch.dtype, seed: int, hq: int = 2, hkv: int = 1, d: int = 16) -> tuple[torch.Tensor, ...]:
    return make_inputs(len(POSITIONS), hq, hkv, 1, LKV, d, dtype, seed=seed)


def _per_row_reference(q1: torch.Tensor, q2: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                       params: SpanParams, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([superlinear_attention_reference(
        q1[r:r + 1], q2[r:r + 1], k[r:r + 1], v[r:r + 1], pos[r], params,
        None if mask is None else mask[r:r + 1]) for r in range(q2.shape[0])])


@pytest.mark.parametrize(
    ("mode", "dtype"),
    [("split", torch.float32), ("split-lanes", torch.float32), ("union", torch.float32),
     ("split-lanes", torch.float16), ("union", torch.float16), ("piece-lanes", torch.float16), ("shared", torch.float32), ("shared", torch.float16)],
    ids=["split-fp32", "split-lanes-fp32", "union-fp32", "split-lanes-fp16", "union-fp16", "piece-lanes-fp16",
         "shared-fp32", "shared-fp16"],
)
def test_rows_at_own_positions_equal_reference_row_by_row(mode: str, dtype: torch.dtype,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _use_decode_mode(monkeypatch, mode)
    q1, q2, k, v = _inputs(dtype, seed=41)
    pos = torch.tensor(POSITIONS)[:, None]  # [B, 1]
    # the rows really differ: no anchor / few / many, and spans of different lengths
    s = [span_search_reference(q1[r:r + 1], k[r:r + 1], pos[r], P_INT2) for r in range(3)]
    assert (s[0].anchors < 0).all() and (s[1].anchors[..., 0] >= 0).all() and (s[2].anchors[..., 0] >= 0).all()
    assert (s[2].qend - s[2].qstart).max() > (s[1].qend - s[1].qstart).max()
    out = torch.full(q2.shape, float("nan"), dtype=dtype)
    superlinear_attention_triton(q1, q2, k, v, pos, P_INT2, out=out)
    assert not out.isnan().any()
    err = row_rel_err(out, _per_row_reference(q1, q2, k, v, pos, P_INT2, None))
    assert err.max() <= TOL[dtype], f"max row rel err {err.max():.2e}"
    # each row bit-identical to that row decoded alone (the batch-1, shared-position kernels)
    for r in range(3):
        alone = superlinear_attention_triton(q1[r:r + 1], q2[r:r + 1], k[r:r + 1], v[r:r + 1], pos[r], P_INT2)
        assert torch.equal(out[r:r + 1], alone), f"row {r} differs from its batch-1 call"


@pytest.mark.parametrize("mode", ["split", "union", "piece", "shared"])
def test_rows_with_mask_and_no_forward_spans(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_decode_mode(monkeypatch, mode)
    q1, q2, k, v = _inputs(torch.float32, seed=43)
    mask = left_pad_mask(3, LKV, 40)  # row 1 starts late (its own s0), row 0 has a hole
    mask[2, :300] = 0  # row 2 too, later still
    pos = torch.tensor(POSITIONS)[:, None]
    out = torch.full(q2.shape, float("nan"))
    superlinear_attention_triton(q1, q2, k, v, pos, P_INT3_NOFWD, mask, out=out)
    err = row_rel_err(out, _per_row_reference(q1, q2, k, v, pos, P_INT3_NOFWD, mask))
    assert err.max() <= 1e-4, f"max row rel err {err.max():.2e}"


@pytest.mark.parametrize("mode", ["split", "union"])
def test_shared_position_path_unchanged(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_decode_mode(monkeypatch, mode)
    q1, q2, k, v = _inputs(torch.float32, seed=44)
    shared = superlinear_attention_triton(q1, q2, k, v, torch.tensor([300]), P_INT2)  # [1]: every row at 300
    ref = superlinear_attention_reference(q1, q2, k, v, torch.tensor([300]), P_INT2)
    assert row_rel_err(shared, ref).max() <= 1e-4
    rows = superlinear_attention_triton(q1, q2, k, v, torch.full((3, 1), 300), P_INT2)
    assert torch.equal(rows, shared)
    one = superlinear_attention_triton(q1[:1], q2[:1], k[:1], v[:1], torch.tensor([[300]]), P_INT2)
    assert torch.equal(one, shared[:1])  # [1, 1] with one row: the shared-position kernels


def test_public_entry_point_takes_rows_on_both_backends() -> None:
    q1, q2, k, v = make_inputs(3, 2, 1, 1, 400, 16, torch.float32, seed=45)
    pos = torch.tensor([[3], [150], [399]])
    ref = superlinear_attention(q1, q2, k, v, pos, P_INT2, backend="reference")
    tri = superlinear_attention(q1, q2, k, v, pos, P_INT2, backend="triton")
    want = _per_row_reference(q1, q2, k, v, pos, P_INT2, None)
    assert torch.equal(ref, want)
    assert row_rel_err(tri, want).max() <= 1e-4


@pytest.mark.parametrize(
    ("lq", "pos", "expect"),
    [(1, torch.tensor([3, 150, 399]), "must be 1-D"),  # [B]: ambiguous with [Lq], refused
     (1, torch.tensor([[3], [150]]), "per-row positions"),  # wrong row count
     (2, torch.tensor([[3, 4], [150, 151], [398, 399]]), "decode only"),  # per-row prefill
     (1, torch.tensor([[[3]], [[150]], [[399]]]), "must be 1-D")],
    ids=["B", "rows!=B", "Lq>1", "3-D"],
)
def test_other_position_shapes_are_refused(lq: int, pos: torch.Tensor, expect: str) -> None:
    q1, q2, k, v = make_inputs(3, 2, 1, lq, 400, 16, torch.float32, seed=46)
    for call in (lambda: superlinear_attention(q1, q2, k, v, pos, P_INT2, backend="reference"),
                 lambda: superlinear_attention_triton(q1, q2, k, v, pos, P_INT2)):
        with pytest.raises(KernelInputError, match=expect) as ei:
            call()
        assert ei.value.rule == "kernels.cache_position"


def test_rows_value_rules_checked_per_row() -> None:
    q1, q2, k, v = make_inputs(2, 2, 1, 1, 64, 16, torch.float32, seed=47)
    for bad, expect in ((torch.tensor([[3], [64]]), "beyond the cache"), (torch.tensor([[-1], [3]]), "negative")):
        with pytest.raises(KernelInputError, match=expect):
            superlinear_attention(q1, q2, k, v, bad, P_INT2, backend="reference")
