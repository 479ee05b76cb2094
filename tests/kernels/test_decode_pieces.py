"""The "piece" decode design under the CPU interpreter: its work list (each KV head's span rows cut
at a global grid of piece boundaries, in piece order) and its results against the reference; and
the "shared" design (each piece read once for up to 16 of the rows covering it) against the
reference, including pieces covered by more rows than one group."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from kernel_helpers import P_INT2, P_INT3_NOFWD, SMALL, TOL, left_pad_mask, make_inputs, row_rel_err

from secure_run.kernels import span_triton
from secure_run.kernels._triton_decode import _decode_piece_plan_kernel
from secure_run.kernels.reference import span_search_reference, superlinear_attention_reference
from secure_run.kernels.span_triton import superlinear_attention_triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter suite")


def _plan(qs: torch.Tensor, qe: torch.Tensor, piece: int, nch: int, by_piece: bool) -> tuple[list[int], int, torch.Tensor]:
    """Run the plan kernel on one KV head's rows; (items as p * 65536 + row, count, part lse)."""
    rk = qs.numel()
    cap = rk * nch
    items = torch.full((cap,), -7, dtype=torch.int64)
    count = torch.full((1,), -7, dtype=torch.int64)
    lse = torch.full((rk * nch,), 5.0)
    rkp = 1 << max(0, (rk - 1).bit_length())
    nchp = 1 << max(0, (nch - 1).bit_length())
    eb = min(64, rkp * nchp)
    _decode_piece_plan_kernel[(1, rkp * nchp // eb)](
        qs, qe, items, count, lse, cap, RK=rk, RKP=rkp, NCH=nch, NCHP=nchp, PIECE=piece, EB=eb, BY_PIECE=by_piece,
    )
    n = int(count[0])
    assert (items[n:] == -7).all(), "nothing is written past the item count"
    return items[:n].tolist(), n, lse.view(rk, nch)


def _expected(qs: list[int], qe: list[int], piece: int, by_piece: bool) -> list[int]:
    pairs = [(p, r) for r, (a, b) in enumerate(zip(qs, qe, strict=True)) if a >= 0 and b >= a
             for p in range(a // piece, b // piece + 1)]
    pairs.sort(key=(lambda t: t) if by_piece else (lambda t: (t[1], t[0])))
    return [p * 65536 + r for p, r in pairs]


@pytest.mark.parametrize("by_piece", [True, False], ids=["piece-order", "row-order"])
def test_plan_lists_every_row_piece_once_in_order(by_piece: bool) -> None:
    # rows: overlapping, one inside another, touching at a boundary, a one-key span, no anchor (-1),
    # and a span ending exactly on a piece boundary
    qs = [0, 10, 31, 32, -1, 95, 40, 63, 64]
    qe = [40, 20, 32, 95, -1, 95, 100, 63, 64]
    piece, nch = 32, 4
    t_qs, t_qe = torch.tensor(qs), torch.tensor(qe)
    items, n, lse = _plan(t_qs, t_qe, piece, nch, by_piece)
    assert items == _expected(qs, qe, piece, by_piece)
    # parts past each row's last piece are empty (-inf) for the merge; the others are left for the
    # attention programs (the poison 5.0 stays)
    for r, (a, b) in enumerate(zip(qs, qe, strict=True)):
        used = b // piece - a // piece + 1 if a >= 0 else 0
        assert (lse[r, used:] == float("-inf")).all() and (lse[r, :used] == 5.0).all(), r


def test_plan_fills_the_capacity_of_full_length_rows() -> None:
    # every row spans the most pieces a row can meet: the list is exactly full
    piece, nch = 16, 3
    qs = torch.tensor([15, 31, 47, 63, 79, 95])
    qe = qs + 2 * piece - 30 + 28  # 30 keys from the last key of a piece: meets 3 pieces
    items, n, _ = _plan(qs, qe, piece, nch, True)
    assert n == 6 * 3 == qs.numel() * nch
    assert items == _expected(qs.tolist(), qe.tolist(), piece, True)


def _use_pieces(monkeypatch: pytest.MonkeyPatch, mode: str, chunk: int, lane_max: bool = True,
                small_warps: int = 4) -> None:
    base = span_triton.config_for
    monkeypatch.setattr(span_triton, "config_for", lambda *a, **kw: dataclasses.replace(
        base(*a, **kw), decode_mode=mode, decode_chunk=chunk, decode_lane_max=lane_max,
        decode_small_warps=small_warps))


@pytest.mark.parametrize(("mode", "chunk", "lane_max", "small_warps"),
                         [("piece", 32, True, 4), ("piece", 16, False, 4), ("piece-rows", 32, True, 4),
                          ("shared", 32, True, 4), ("shared", 16, True, 4), ("shared", 32, True, 1),
                          ("shared", 64, True, 4), ("shared", 48, True, 4)])
def test_piece_decode_equals_reference(mode: str, chunk: int, lane_max: bool, small_warps: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _use_pieces(monkeypatch, mode, chunk, lane_max, small_warps)
    # 8 query heads on one KV head: 24 spans of ~45 keys in 200 keys share most of their keys
    q1, q2, k, v = make_inputs(1, 8, 1, 1, 200, 16, torch.float32, seed=17)
    pos = torch.tensor([199])
    s = span_search_reference(q1, k, pos, P_INT2)
    met = torch.where(s.anchors >= 0, s.qend // chunk - s.qstart // chunk + 1, 0)
    assert (met >= (3 if chunk <= 32 else 2)).any()  # rows that meet several pieces
    out = torch.full((1, 8, 1, 16), float("nan"))
    superlinear_attention_triton(q1, q2, k, v, pos, P_INT2, out=out)
    assert row_rel_err(out, superlinear_attention_reference(q1, q2, k, v, pos, P_INT2)).max() <= 1e-4


@pytest.mark.parametrize(("name", "with_mask"), [("int2", False), ("int2", True), ("f0.6-nowindow", True)])
def test_shared_tma_loads_equal_pointer_loads_on_a_poisoned_cache(name: str, with_mask: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # the shared stream with whole key blocks through TMA descriptors and each piece's last block
    # through masked loads: the unwritten cache slots past the position (NaN / inf) are never read,
    # also where spans end at the position itself (no window)
    from kernel_helpers import spy_tma_descriptors

    from secure_run.kernels import _triton_decode

    made = spy_tma_descriptors(monkeypatch, _triton_decode)
    base = span_triton.config_for
    q1, q2, k, v = make_inputs(2, 8, 2, 1, 400, 16, torch.float16, seed=37)
    pos = torch.tensor([330])
    k[:, :, 331:] = float("nan")
    v[:, :, 331:] = float("inf")
    mask = left_pad_mask(2, 400, 13) if with_mask else None
    params = SMALL[name]
    if params.window_len == 0:  # the premise: some span ends at the position, next to the poison
        assert int(span_search_reference(q1, k, pos, params, mask).qend.max()) == 330
    outs = []
    for tma in (False, True):
        monkeypatch.setattr(span_triton, "config_for", lambda *a, tma=tma, **kw: dataclasses.replace(
            base(*a, **kw), decode_mode="shared", decode_chunk=64, decode_block_n=16, decode_union_tma=tma))
        out = torch.full((2, 8, 1, 16), float("nan"), dtype=torch.float16)
        superlinear_attention_triton(q1, q2, k, v, pos, params, mask, out=out)
        assert not out.isnan().any()
        outs.append(out)
    assert made == [True, True], "K and V descriptors made once, for the TMA call"
    ref = superlinear_attention_reference(q1, q2, k, v, pos, params, mask)
    assert row_rel_err(outs[1], ref).max() <= TOL[torch.float16]
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("mode", ["piece", "shared"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_piece_decode_with_mask_and_batch(name: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_pieces(monkeypatch, mode, 16)
    params = SMALL[name]
    q1, q2, k, v = make_inputs(2, 4, 2, 1, 70, 32, torch.float32, seed=14)
    mask = left_pad_mask(2, 70, 6)
    for p in sorted({max(params.window_len - 1, 0), 68}):
        pos = torch.tensor([p])
        out = torch.full((2, 4, 1, 32), float("nan"))
        superlinear_attention_triton(q1, q2, k, v, pos, params, mask, out=out)
        ref = superlinear_attention_reference(q1, q2, k, v, pos, params, mask)
        assert row_rel_err(out, ref).max() <= 1e-4, f"position {p}"


@pytest.mark.parametrize("mode", ["piece", "shared"])
def test_piece_decode_rows_at_own_positions(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_pieces(monkeypatch, mode, 32)
    q1, q2, k, v = make_inputs(3, 4, 2, 1, 400, 16, torch.float32, seed=41)
    pos = torch.tensor([[60], [250], [399]])
    out = torch.full(q2.shape, float("nan"))
    superlinear_attention_triton(q1, q2, k, v, pos, P_INT3_NOFWD, out=out)
    for r in range(3):
        ref = superlinear_attention_reference(q1[r:r + 1], q2[r:r + 1], k[r:r + 1], v[r:r + 1], pos[r],
                                              P_INT3_NOFWD)
        assert row_rel_err(out[r:r + 1], ref).max() <= 1e-4, f"row {r}"


@pytest.mark.parametrize("mode", ["piece", "shared"])
def test_piece_decode_more_rows_than_a_byte(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 96 query heads on one KV head x 3 slots = 288 span rows: more than 8 bits of row index (and,
    # for "shared", pieces covered by more rows than one group of 16)
    _use_pieces(monkeypatch, mode, 32)
    q1, q2, k, v = make_inputs(1, 96, 1, 1, 200, 16, torch.float32, seed=19)
    pos = torch.tensor([199])
    assert 96 * P_INT2.num_spans > 256
    out = torch.full((1, 96, 1, 16), float("nan"))
    superlinear_attention_triton(q1, q2, k, v, pos, P_INT2, out=out)
    assert row_rel_err(out, superlinear_attention_reference(q1, q2, k, v, pos, P_INT2)).max() <= 1e-4


def test_unknown_decode_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # a misspelt design must not silently run the split stream (a sweep would report it under the typo)
    _use_pieces(monkeypatch, "pieces", 32)
    q1, q2, k, v = make_inputs(1, 4, 2, 1, 70, 16, torch.float32, seed=3)
    with pytest.raises(ValueError, match="decode mode 'pieces': expected one of split, union, piece, piece-rows, shared"):
        superlinear_attention_triton(q1, q2, k, v, torch.tensor([68]), P_INT2)


@pytest.mark.parametrize("mode", ["split", "piece", "shared"])
@pytest.mark.parametrize("name", ["int2", "f0.6-nowindow"])
def test_merge_of_all_slots_at_once_equals_slot_by_slot(mode: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the merge kernel with every slot's parts loaded as one block (decode_merge_all) against the
    # reference and against the slot-by-slot merge, with a mask, a batch, empty slots (the piece
    # design leaves their parts unwritten: the scratch is poisoned with NaN here) and, without a
    # window, rows whose window parts are all empty
    from secure_run.kernels import _triton_decode

    empty = torch.empty

    def poisoned(*a: object, **kw: object) -> torch.Tensor:
        t = empty(*a, **kw)  # type: ignore[call-overload]
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(_triton_decode.torch, "empty", poisoned)
    params = SMALL[name]
    q1, q2, k, v = make_inputs(2, 8, 2, 1, 300, 16, torch.float32, seed=43)
    mask = left_pad_mask(2, 300, 9)
    pos = torch.tensor([260])
    base = span_triton.config_for
    outs = []
    for merge_all in (False, True):
        monkeypatch.setattr(span_triton, "config_for", lambda *a, m=merge_all, **kw: dataclasses.replace(
            base(*a, **kw), decode_mode=mode, decode_chunk=32, decode_merge_all=m, decode_merge_warps=2))
        out = torch.full((2, 8, 1, 16), float("nan"))
        superlinear_attention_triton(q1, q2, k, v, pos, params, mask, out=out)
        outs.append(out)
    ref = superlinear_attention_reference(q1, q2, k, v, pos, params, mask)
    assert row_rel_err(outs[1], ref).max() <= 1e-4
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
