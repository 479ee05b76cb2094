"""GPU checks of the stripe-split prefill search (marker ``gpu``): at the K3 shape (a chunk at the
end of a 1M context, released shapes) in both position modes, fp16 and bf16, and with a left-padded
batch of two, the anchors / span bounds equal the reference on every row that is not a near tie
(performance.md section 5), and equal the previous single-program design's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_helpers import P_RELEASED, left_pad_mask, make_inputs, near_tie_rows

from secure_run.kernels import span_triton
from secure_run.kernels.params import SpanParams
from secure_run.kernels.reference import span_search_reference
from secure_run.kernels.span_triton import span_search_triton

pytestmark = pytest.mark.gpu
DEV = "cuda"
HQ, HKV, D = 32, 2, 128
P_REL32 = P_RELEASED.with_mode("upstream-fp32")


def _search(design: str, q1: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, p: SpanParams,
            mask: torch.Tensor | None, monkeypatch: pytest.MonkeyPatch) -> object:
    base = span_triton.config_for
    with monkeypatch.context() as mp:
        mp.setattr(span_triton, "config_for",
                   lambda *a, **kw: dataclasses.replace(base(*a, **kw), search_design=design))
        return span_search_triton(q1, k, pos, p, mask)


def _sorted(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, anchors.argsort(-1))


@pytest.mark.parametrize("params", [P_REL32, P_RELEASED], ids=["upstream-fp32", "exact"])
@pytest.mark.parametrize(("dtype", "masked"), [(torch.float16, False), (torch.bfloat16, True)])
def test_split_search_k3_shape_equals_reference(params: SpanParams, dtype: torch.dtype, masked: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    Lkv, Lq = 1 << 20, 1024
    B = 2 if masked else 1
    q1, _, k, _ = make_inputs(B, HQ, HKV, Lq, Lkv, D, dtype, DEV, seed=61)
    mask = left_pad_mask(B, Lkv, 5000, DEV) if masked else None
    pos = torch.arange(Lkv - Lq, Lkv, device=DEV)
    got = _search("split", q1, k, pos, params, mask, monkeypatch)
    old = _search("single", q1, k, pos, params, mask, monkeypatch)
    ref = span_search_reference(q1, k, pos, params, mask)
    ties = near_tie_rows(q1, k, pos, params, mask, rel=1e-4)
    assert ties.float().mean() < 0.01
    for other in (ref, old):
        same = (got.anchors.sort(-1).values == other.anchors.sort(-1).values).all(-1)  # type: ignore[attr-defined]
        assert (same | ties).all(), f"{int((~same & ~ties).sum())} rows pick other anchors"
        for f in ("qstart", "qend"):
            x = _sorted(getattr(got, f), got.anchors)  # type: ignore[attr-defined]
            y = _sorted(getattr(other, f), other.anchors)
            assert torch.equal(x[same], y[same]), f
    fin = torch.isfinite(old.values)  # type: ignore[attr-defined]
    keep = ~ties[..., None].expand_as(fin) & fin
    torch.testing.assert_close(got.values[keep], old.values[keep])  # type: ignore[attr-defined]
