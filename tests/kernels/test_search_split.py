"""The prefill span search in stripe splits (``search_design="split"``, TRITON_INTERPRET=1 on CPU):
anchors / spans bit-equal to the reference in both position modes, several splits per query (the
candidate merge), queries whose later splits hold no stripe, odd lengths, masks, 2 and 3 spans, no
window, equal to the previous single-program design, and exact score ties resolved as documented
(higher score first, then the nearer anchor), also across split boundaries."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest
import torch
from kernel_helpers import P_F6_NOWIN, P_F55, P_INT2, P_INT3_NOFWD, left_pad_mask, make_inputs

from secure_run.kernels import span_triton
from secure_run.kernels.params import SpanParams
from secure_run.kernels.reference import span_search_reference
from secure_run.kernels.span_triton import span_search_triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter suite")
UP = "upstream-fp32"


@pytest.fixture
def design(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Force one prefill search design (and split tunables) in the fixed table."""
    name, changes = request.param
    base = span_triton.config_for
    monkeypatch.setattr(span_triton, "config_for",
                        lambda *a, **kw: dataclasses.replace(base(*a, **kw), search_design=name, **changes))
    yield name


#: stripes in splits of 16 (one tile each), 4 queries per program
SPLIT = ("split", {"search_split_block": 16, "search_split_len": 16, "search_block_q": 4})
#: splits of 32 stripes = two tiles of 16 (per-lane running top-k across tiles), 1 query per program
SPLIT_Q1 = ("split", {"search_split_block": 16, "search_split_len": 32, "search_block_q": 1})
#: one split holding every stripe (tiles of 16), 8 queries per program
SPLIT_Q8_32 = ("split", {"search_split_block": 16, "search_split_len": 0, "search_block_q": 8})


def _assert_same(got: object, ref: object) -> None:
    for f in ("anchors", "qstart", "qend"):
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    fin = torch.isfinite(ref.values)  # type: ignore[attr-defined]
    assert torch.equal(torch.isfinite(got.values), fin)  # type: ignore[attr-defined]
    torch.testing.assert_close(got.values[fin], ref.values[fin].float(), rtol=1e-5, atol=1e-5)  # type: ignore[attr-defined]


@pytest.mark.parametrize("design", [SPLIT, SPLIT_Q1, SPLIT_Q8_32], indirect=True, ids=["split16-q4", "split32-q1", "one-split-q8"])
@pytest.mark.parametrize(
    ("params", "mode", "with_mask", "dtype"),
    [(P_F55, "exact", False, torch.float32), (P_F55, UP, True, torch.float32), (P_INT2, "exact", True, torch.float16),
     (P_INT3_NOFWD, UP, False, torch.float32), (P_F6_NOWIN, UP, True, torch.float16)],
    ids=["f0.55", "f0.55-fp32mode-mask", "int2-fp16-mask", "int3-nofwd-k2", "f0.6-nowindow-fp16"],
)
def test_split_search_chunk_equals_reference(design: str, params: SpanParams, mode: str, with_mask: bool,
                                            dtype: torch.dtype) -> None:
    """A 37-query chunk at the end of a 700-key cache: 24-40 stripes, i.e. 2-3 splits of 16."""
    p = params.with_mode(mode)  # type: ignore[arg-type]
    B, L, Lkv, start = 2, 37, 700, 650
    q1, _, k, _ = make_inputs(B, 4, 2, L, Lkv, 16, dtype, seed=31)
    k[:, :, start + L :] = float("nan")  # unfilled static-cache tail: never read
    mask = left_pad_mask(B, Lkv, 40) if with_mask else None
    pos = torch.arange(start, start + L)
    ref = span_search_reference(q1, k, pos, p, mask)
    got = span_search_triton(q1, k, pos, p, mask)
    _assert_same(got, ref)
    assert (ref.anchors[..., -1] >= 0).float().mean() > 0.9  # every slot really filled


@pytest.mark.parametrize("design", [SPLIT], indirect=True)
def test_split_search_from_position_zero(design: str) -> None:
    """Queries 0..80: the first ones have no stripe at all, later ones fill the first splits only."""
    p = P_F55.with_mode(UP)
    q1, _, k, _ = make_inputs(1, 4, 2, 81, 90, 16, torch.float32, seed=32)
    pos = torch.arange(81)
    _assert_same(span_search_triton(q1, k, pos, p), span_search_reference(q1, k, pos, p))


def test_split_equals_single_design(monkeypatch: pytest.MonkeyPatch) -> None:
    p = P_F55
    q1, _, k, _ = make_inputs(1, 8, 2, 29, 520, 16, torch.float32, seed=33)
    pos = torch.arange(491, 520)
    base = span_triton.config_for
    res = {}
    for name in ("single", "split"):
        monkeypatch.setattr(span_triton, "config_for",
                            lambda *a, name=name, **kw: dataclasses.replace(base(*a, **kw), search_design=name))
        res[name] = span_search_triton(q1, k, pos, p)
    for f in ("values", "anchors", "qstart", "qend"):
        assert torch.equal(getattr(res["split"], f), getattr(res["single"], f)), f


@pytest.mark.parametrize("design", [SPLIT, SPLIT_Q1, SPLIT_Q8_32], indirect=True,
                         ids=["split16", "split32", "one-split"])
def test_split_search_exact_ties_prefer_the_nearer_anchor(design: str) -> None:
    """Keys equal at many anchor positions give exactly equal scores: the kept slots are the best
    scores, an exact tie going to the nearer anchor (smaller stripe), whichever split it is in."""
    p = P_INT2  # F(i) = i * i, stripes from i = 3
    L, Lkv = 3, 800
    start = Lkv - L
    gen = torch.Generator().manual_seed(34)
    k = torch.randn(1, 1, Lkv, 16, generator=gen) * 0.01
    q1 = torch.randn(1, 2, L, 16, generator=gen)
    hot = torch.randn(16, generator=gen)
    for x in range(L):
        pos_x = start + x
        for i in (5, 9, 17, 21, 25, 26):  # splits of 16 stripes: i - 3 in 0..15 -> split 0, 16.. -> split 1
            k[0, 0, pos_x + 1 - i * i] = hot
    pos = torch.arange(start, start + L)
    got = span_search_triton(q1, k, pos, p)
    for x in range(L):
        for h in range(2):
            scores = {}
            for i in range(p.sw_index + 1, p.max_stripe_index(start + x + 1) + 1):
                a = start + x + 1 - i * i
                if 0 <= a <= start + x - p.window_len:
                    scores[i] = float(q1[0, h, x] @ k[0, 0, a])
            best = sorted(scores, key=lambda i: (-scores[i], i))[: p.num_spans]
            want = [start + x + 1 - i * i for i in best]
            assert got.anchors[0, h, x].tolist() == want, (x, h)
