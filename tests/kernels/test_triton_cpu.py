"""Triton kernels under the CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) against
the PyTorch reference: span search bit for bit, prefill / chunked prefill / decode within the
per-dtype tolerance, on odd lengths, GQA, masks, and a poisoned static-cache tail and output."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from kernel_helpers import (
    P_F6_NOWIN,
    P_F55,
    P_INT2,
    P_INT3_NOFWD,
    SMALL,
    TOL,
    left_pad_mask,
    make_inputs,
    row_rel_err,
)

from secure_run.errors import KernelUnavailable
from secure_run.kernels import SpanParams, superlinear_attention
from secure_run.kernels._schedule import span_extent
from secure_run.kernels._triton_common import span_bounds, span_consts
from secure_run.kernels.reference import span_search_reference, superlinear_attention_reference
from secure_run.kernels.span_triton import span_search_triton, superlinear_attention_triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter suite")


@pytest.mark.parametrize(
    ("name", "with_mask", "dtype"),
    [("int2", False, torch.float32), ("int2", True, torch.float16), ("int3-nofwd", False, torch.float32),
     ("f0.55", True, torch.float32), ("f0.6-nowindow", False, torch.bfloat16)],
)
def test_search_equals_reference(name: str, with_mask: bool, dtype: torch.dtype) -> None:
    params = SMALL[name]
    B, L, Lkv = 2, 37, 45
    q1, _, k, _ = make_inputs(B, 4, 2, L, Lkv, 16, dtype, seed=11)
    mask = left_pad_mask(B, Lkv, 4) if with_mask else None
    pos = torch.arange(L)
    ref = span_search_reference(q1, k, pos, params, mask)
    got = span_search_triton(q1, k, pos, params, mask)
    assert torch.equal(got.anchors, ref.anchors)
    assert torch.equal(got.qstart, ref.qstart)
    assert torch.equal(got.qend, ref.qend)
    fin = torch.isfinite(ref.values)
    assert torch.equal(torch.isfinite(got.values), fin)
    torch.testing.assert_close(got.values[fin], ref.values[fin].float(), rtol=1e-5, atol=1e-5)
    assert (ref.anchors[..., 0] >= 0).float().mean() > 0.5  # anchors really exercised


@pytest.mark.parametrize(
    ("name", "dtype", "with_mask"),
    [("int2", torch.float32, False), ("int2", torch.float16, True), ("int3-nofwd", torch.float32, True),
     ("f0.55", torch.float32, False), ("f0.55", torch.bfloat16, False), ("f0.6-nowindow", torch.float16, False)],
)
def test_prefill_equals_reference(name: str, dtype: torch.dtype, with_mask: bool) -> None:
    params = SMALL[name]
    B, L, Lkv = 2, 45, 53  # L mod 16 != 0: the trailing rows upstream gets wrong
    q1, q2, k, v = make_inputs(B, 4, 2, L, Lkv, 32, dtype, seed=12)
    mask = left_pad_mask(B, Lkv, 5) if with_mask else None
    pos = torch.arange(L)
    out = torch.full((B, 4, L, 32), float("nan"), dtype=dtype)
    superlinear_attention_triton(q1, q2, k, v, pos, params, mask, out=out)
    ref = superlinear_attention_reference(q1, q2, k, v, pos, params, mask)
    assert not out.isnan().any()
    err = row_rel_err(out, ref)
    assert err.max() <= TOL[dtype], f"max row rel err {err.max():.2e}"


def test_chunked_prefill_and_decode_match_one_shot_with_poisoned_tail() -> None:
    params = P_INT2
    L, Lkv = 40, 64
    q1, q2, k, v = make_inputs(1, 4, 2, L, Lkv, 16, torch.float32, seed=13)
    k[:, :, L:] = float("nan")  # unfilled static-cache tail
    v[:, :, L:] = float("inf")
    pos = torch.arange(L)
    one = superlinear_attention_triton(q1, q2, k, v, pos, params)
    assert torch.isfinite(one).all()
    parts = [superlinear_attention_triton(q1[:, :, a:b], q2[:, :, a:b], k, v, pos[a:b], params)
             for a, b in [(0, 7), (7, 30), (30, 40)]]
    torch.testing.assert_close(torch.cat(parts, 2), one, rtol=1e-5, atol=1e-6)
    step = superlinear_attention_triton(q1[:, :, -1:], q2[:, :, -1:], k, v, pos[-1:], params)
    torch.testing.assert_close(step, one[:, :, -1:], rtol=1e-5, atol=1e-6)


def _use_decode_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    import dataclasses

    from secure_run.kernels import span_triton

    base = span_triton.config_for
    # split-lanes: the split stream with a running max per key lane (the GPU default), split: one max
    monkeypatch.setattr(span_triton, "config_for", lambda *a, **kw: dataclasses.replace(
        base(*a, **kw), decode_mode=mode.split("-")[0], decode_lane_max=mode.endswith("-lanes")))


@pytest.fixture(params=["union", "split", "split-lanes"])
def decode_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a decode test with each decode design (deduplicated union pieces / per-span split-K with
    one running max or one per key lane)."""
    _use_decode_mode(monkeypatch, str(request.param))
    return str(request.param)


_DECODE_CASES = [(n, m, "union") for n in SMALL for m in (False, True)] + [
    ("int2", True, "split"), ("f0.55", False, "split"), ("int3-nofwd", False, "split"), ("f0.6-nowindow", False, "split"),
    ("int2", True, "split-lanes"), ("f0.6-nowindow", False, "split-lanes")]


@pytest.mark.parametrize(("name", "with_mask", "mode"), _DECODE_CASES)
def test_decode_equals_reference(name: str, with_mask: bool, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_decode_mode(monkeypatch, mode)
    params = SMALL[name]
    B, Lkv = (2 if with_mask else 1), 70
    q1, q2, k, v = make_inputs(B, 4, 2, 1, Lkv, 32, torch.float32, seed=14)
    mask = left_pad_mask(B, Lkv, 6) if with_mask else None
    W = params.window_len
    # window-only position, and one with anchors (the mid position only without a mask: shorter suite)
    for p in sorted({max(W - 1, 0), Lkv - 2} | (set() if with_mask else {41})):
        pos = torch.tensor([p])
        out = torch.full((B, 4, 1, 32), float("nan"))
        superlinear_attention_triton(q1, q2, k, v, pos, params, mask, out=out)
        ref = superlinear_attention_reference(q1, q2, k, v, pos, params, mask)
        err = row_rel_err(out, ref)
        assert err.max() <= 1e-4, f"position {p}: {err.max():.2e}"


def test_decode_union_merges_overlapping_spans_of_many_heads(decode_mode: str) -> None:
    # 8 query heads on one KV head, 3 slots: 24 spans of ~45 keys in a 200-key context overlap
    # heavily, so the union plan merges them into few segments cut into several 32-key pieces
    q1, q2, k, v = make_inputs(1, 8, 1, 1, 200, 16, torch.float32, seed=17)
    pos = torch.tensor([199])
    out = torch.full((1, 8, 1, 16), float("nan"))
    superlinear_attention_triton(q1, q2, k, v, pos, P_INT2, out=out)
    ref = superlinear_attention_reference(q1, q2, k, v, pos, P_INT2)
    s = span_search_reference(q1, k, pos, P_INT2)
    assert ((s.qend - s.qstart + 1) > 32).any()  # spans longer than one piece
    assert row_rel_err(out, ref).max() <= 1e-4


def test_decode_fp16_and_bf16() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        q1, q2, k, v = make_inputs(1, 4, 2, 1, 90, 32, dtype, seed=15)
        pos = torch.tensor([80])
        out = superlinear_attention_triton(q1, q2, k, v, pos, P_F55)
        ref = superlinear_attention_reference(q1, q2, k, v, pos, P_F55)
        assert row_rel_err(out, ref).max() <= TOL[dtype]


def test_dispatch_runs_triton_backend_on_cpu_under_interpreter() -> None:
    q1, q2, k, v = make_inputs(1, 2, 1, 20, 24, 16, torch.float32, seed=16)
    pos = torch.arange(20)
    a = superlinear_attention(q1, q2, k, v, pos, P_INT3_NOFWD, backend="triton")
    b = superlinear_attention(q1, q2, k, v, pos, P_INT3_NOFWD, backend="reference")
    assert row_rel_err(a, b).max() <= 1e-4


def test_unsupported_arguments_name_the_rule() -> None:
    p5 = SpanParams(sw_index=1, num_spans=5, backward_factor=2.0, forward_factor=0.0, span_power=0.5,
                    inv_search_power_int=2)
    q1, q2, k, v = make_inputs(1, 2, 1, 4, 8, 16, torch.float32)
    with pytest.raises(KernelUnavailable, match="do not support") as ei:
        superlinear_attention_triton(q1, q2, k, v, torch.arange(4), p5)
    assert ei.value.rule == "kernels.triton-unsupported" and "num_spans=5" in ei.value.details[0]
    with pytest.raises(KernelUnavailable):
        superlinear_attention_triton(q1.double(), q2.double(), k.double(), v.double(), torch.arange(4), P_INT2)


@triton.jit
def _extent_probe(POS, CONSTS, QS, QE, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    pos = tl.load(POS + i, mask=m, other=0)
    a = pos // 2
    qs, qe = span_bounds(a, pos, 0, 1 << 40, 0, CONSTS, True, False)
    tl.store(QS + i, qs, mask=m)
    tl.store(QE + i, qe, mask=m)


def probe_extents(params: SpanParams, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(backward, forward) extents as the kernels compute them, for token counts t (>= 1000)."""
    pos = (t - 1).contiguous()
    qs = torch.empty_like(pos)
    qe = torch.empty_like(pos)
    _extent_probe[(triton.cdiv(pos.numel(), 1024),)](pos, span_consts(params, pos.device), qs, qe, pos.numel(),
                                                      BLOCK=1024)
    a = pos // 2
    return a - qs, qe - a


def extent_cases(device: str | torch.device = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([torch.randint(1000, 5_000_000, (3000,), generator=gen), torch.arange(1000, 3000),
                   torch.tensor([32**2 * 100, 4096, 1 << 20, 1 << 22, 10**6, 4 * 10**6])])
    return t.to(device)


@pytest.mark.parametrize("params", [P_F55, P_INT2, P_F6_NOWIN], ids=["f0.55", "int2", "f0.6"])
def test_kernel_span_extents_equal_host_rule(params: SpanParams) -> None:
    t = extent_cases()
    lb, lf = probe_extents(params, t)
    assert torch.equal(lb, span_extent(t, params.backward_factor, params.span_power))
    assert torch.equal(lf, span_extent(t, params.forward_factor, params.span_power))


def test_params_fixtures_cover_modes() -> None:
    assert P_INT2.integer_mode and not P_F55.integer_mode and P_F6_NOWIN.window_len == 0


@pytest.mark.parametrize("segment", [16, 7])
def test_multi_segment_prefill_equals_reference(segment: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill chunk longer than ``prefill_segment`` runs segment by segment (search + attention
    per segment, all reading the full cache): a small segment exercises the seams and a short last
    segment, and must give the one-segment result."""
    import dataclasses

    from secure_run.kernels import span_triton

    params = P_F55.with_mode("upstream-fp32")
    B, L, Lkv, start = 2, 45, 60, 6  # 45 queries at positions 6..50: segments of 16 -> 16+16+13
    q1, q2, k, v = make_inputs(B, 4, 2, L, Lkv, 16, torch.float32, seed=18)
    k[:, :, start + L :] = float("nan")
    mask = left_pad_mask(B, Lkv, 4)
    pos = torch.arange(start, start + L)
    whole = superlinear_attention_triton(q1, q2, k, v, pos, params, mask)
    base = span_triton.config_for
    calls: list[int] = []
    real_search = span_triton._prefill_search

    def counting_search(q1_, *a: object, **kw: object) -> tuple[torch.Tensor, ...]:
        calls.append(q1_.shape[2])
        return real_search(q1_, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(span_triton, "config_for",
                        lambda *a, **kw: dataclasses.replace(base(*a, **kw), prefill_segment=segment))
    monkeypatch.setattr(span_triton, "_prefill_search", counting_search)
    out = torch.full((B, 4, L, 16), float("nan"))
    superlinear_attention_triton(q1, q2, k, v, pos, params, mask, out=out)
    assert calls == [segment] * (L // segment) + ([L % segment] if L % segment else [])
    assert not out.isnan().any()
    ref = superlinear_attention_reference(q1, q2, k, v, pos, params, mask)
    assert row_rel_err(out, ref).max() <= 1e-4
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
