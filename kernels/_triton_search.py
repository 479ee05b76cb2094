"""Span search in Triton: score the power-law anchor stripes, keep the top-k, bound the spans.

One program serves one query and all R query heads of one KV head, so each gathered anchor key
row is loaded once and scored for the R heads with one ``tl.dot`` ([R, D] x [D, BS]). Stripes may
be split over several programs (decode: one query, thousands of stripes); each split then writes
its own top-K candidates, merged later by :func:`select_topk` inside the consumer kernels.

Grid: (Lq, B * Hkv, n_splits). Output (FINAL): values fp32, anchors / qstart / qend int64, each
[B, Hq, Lq, K]; (not FINAL): candidate values / anchors [B, Hq, Lq, n_splits, KP] (KP = next pow2 of K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import next_pow2, span_bounds


@triton.jit
def _search_kernel(
    Q1, K, POS, OFFS, NS, MASK, S0, CONSTS,
    OUT_V, OUT_A, OUT_QS, OUT_QE,
    n_stripes, Lq, Lkv, W, G, Hq, n_splits, split_len,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    K_VAL: tl.constexpr, KP: tl.constexpr, FINAL: tl.constexpr, HAS_NS: tl.constexpr,
    HAS_MASK: tl.constexpr, FWD: tl.constexpr, HAS_W: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, POS_ROWS: tl.constexpr,
):
    x = tl.program_id(0)
    bg = tl.program_id(1)
    sp = tl.program_id(2)
    b = (bg // G).to(tl.int64)
    g = (bg % G).to(tl.int64)
    if POS_ROWS:  # one position row per batch row: POS is [B, Lq]
        pos = tl.load(POS + b * Lq + x).to(tl.int64)
    else:  # POS is [Lq], shared by every batch row
        pos = tl.load(POS + x).to(tl.int64)
    rows = tl.arange(0, RP)
    rmask = rows < R
    heads = g * R + rows
    d = tl.arange(0, BD)
    dmask = d < D
    q = tl.load(Q1 + b * s_qb + heads[:, None] * s_qh + x * s_ql + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # running top-K as an unsorted set per row; padding columns (>= K_VAL) hold +inf (never replaced)
    kc = tl.arange(0, KP)
    kvalid = kc < K_VAL
    tv = tl.where(kvalid, float("-inf"), float("inf"))[None, :] + tl.full([RP, KP], 0.0, tl.float32)
    ta = tl.full([RP, KP], -1, tl.int64)
    lo_s = sp * split_len
    hi_s = tl.minimum(lo_s + split_len, n_stripes)
    if HAS_NS:
        hi_s = tl.minimum(hi_s, tl.load(NS + x))
    cols = tl.arange(0, BS)
    for i0 in range(lo_s, hi_s, BS):
        ii = i0 + cols
        f = tl.load(OFFS + ii, mask=ii < hi_s, other=1 << 40)
        a = pos + 1 - f
        ok = a >= 0
        if HAS_MASK:
            ok = ok & (tl.load(MASK + b * Lkv + a, mask=ok, other=0) != 0)
        kt = tl.load(K + b * s_kb + g * s_kh + a[:, None] * s_kl + d[None, :],
                     mask=ok[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)  # [RP, BS], no 1/sqrt(D)
        s = tl.where(ok[None, :], s, float("-inf"))
        for _ in tl.static_range(K_VAL):
            # best remaining stripe of the block replaces the worst kept one if strictly better
            mv, am = tl.max(s, axis=1, return_indices=True)
            ma = pos + 1 - tl.load(OFFS + i0 + am, mask=i0 + am < hi_s, other=0)
            mn, an = tl.min(tv, axis=1, return_indices=True)
            rep = (kc[None, :] == an[:, None]) & (mv > mn)[:, None]
            tv = tl.where(rep, mv[:, None], tv)
            ta = tl.where(rep, ma[:, None], ta)
            s = tl.where(cols[None, :] == am[:, None], float("-inf"), s)
    tv = tl.where(kvalid[None, :], tv, float("-inf"))
    ta = tl.where(tv > float("-inf"), ta, -1)
    if FINAL:
        # rank of each kept entry (value descending, column order on ties) = its output slot
        gt = (tv[:, None, :] > tv[:, :, None]) | ((tv[:, None, :] == tv[:, :, None]) & (kc[None, None, :] < kc[None, :, None]))
        rank = tl.sum(gt.to(tl.int32), axis=2)
        s0 = 0
        if HAS_MASK:
            s0 = tl.load(S0 + b)
        qs, qe = span_bounds(ta, pos, s0, Lkv, W, CONSTS, FWD, HAS_W)
        offs = ((b * Hq + heads) * Lq + x)[:, None] * K_VAL + rank
        om = rmask[:, None] & kvalid[None, :]
        tl.store(OUT_V + offs, tv, mask=om)
        tl.store(OUT_A + offs, ta, mask=om)
        tl.store(OUT_QS + offs, qs, mask=om)
        tl.store(OUT_QE + offs, qe, mask=om)
    else:
        offs = ((((b * Hq + heads) * Lq + x) * n_splits + sp) * KP)[:, None] + kc[None, :]
        tl.store(OUT_V + offs, tv, mask=rmask[:, None])
        tl.store(OUT_A + offs, ta, mask=rmask[:, None])


@triton.jit
def select_topk(CV, CA, base, j, NC: tl.constexpr, n_cand, K_VAL: tl.constexpr):
    """The j-th best (value, anchor) among n_cand split candidates at CV/CA + base (-inf, -1 if none)."""
    idx = tl.arange(0, NC)
    cm = idx < n_cand
    cv = tl.load(CV + base + idx, mask=cm, other=float("-inf"))
    ca = tl.load(CA + base + idx, mask=cm, other=-1)
    vj = float("-inf")
    aj = -1
    for jj in tl.static_range(K_VAL):
        mv, am = tl.max(cv, axis=0, return_indices=True)
        ma = tl.sum(tl.where(idx == am, ca, 0), axis=0)
        ma = tl.where(mv > float("-inf"), ma, -1)
        vj = tl.where(jj == j, mv, vj)
        aj = tl.where(jj == j, ma, aj)
        cv = tl.where(idx == am, float("-inf"), cv)
    return vj, aj


def launch_search(
    q1: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    offs: torch.Tensor,
    ns: torch.Tensor | None,
    mask: torch.Tensor | None,
    s0: torch.Tensor | None,
    consts: torch.Tensor,
    *,
    num_spans: int,
    window: int,
    forward: bool,
    n_splits: int,
    final: bool,
    split_len: int,
    block_s: int,
    upcast: bool,
    precision: str,
    num_warps: int,
    pos_rows: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Run the search. final (needs n_splits == 1): (values, anchors, qstart, qend) [B,Hq,Lq,K].

    Otherwise: candidate (values, anchors) [B,Hq,Lq,n_splits,KP] (merged by ``select_topk``).
    ``pos``: [Lq] shared by every batch row, or with ``pos_rows`` [B, Lq] contiguous (row b's own
    positions; ``ns`` must then be None).
    """
    B, Hq, Lq, D = q1.shape
    G, Lkv = k.shape[1], k.shape[2]
    R = Hq // G
    dev = q1.device
    assert not final or n_splits == 1
    assert not pos_rows or (ns is None and pos.numel() == B * Lq)
    if final:
        shape: tuple[int, ...] = (B, Hq, Lq, num_spans)
        outs = (torch.empty(shape, dtype=torch.float32, device=dev),
                *(torch.empty(shape, dtype=torch.int64, device=dev) for _ in range(3)))
    else:
        shape = (B, Hq, Lq, n_splits, next_pow2(num_spans))
        outs = (torch.empty(shape, dtype=torch.float32, device=dev), torch.empty(shape, dtype=torch.int64, device=dev))
    ov, oa = outs[0], outs[1]
    oqs, oqe = (outs[2], outs[3]) if final else (oa, oa)
    dummy_i = pos
    _search_kernel[(Lq, B * G, n_splits)](
        q1, k, pos, offs, ns if ns is not None else dummy_i, mask if mask is not None else dummy_i,
        s0 if s0 is not None else dummy_i, consts,
        ov, oa, oqs, oqe,
        offs.numel(), Lq, Lkv, window, G, Hq, n_splits, split_len,
        q1.stride(0), q1.stride(1), q1.stride(2), k.stride(0), k.stride(1), k.stride(2),
        R=R, RP=max(16, triton.next_power_of_2(R)), D=D, BD=max(16, triton.next_power_of_2(D)), BS=block_s,
        K_VAL=num_spans, KP=next_pow2(num_spans), FINAL=final, HAS_NS=ns is not None, HAS_MASK=mask is not None,
        FWD=forward, HAS_W=window > 0, UPCAST=upcast, PRECISION=precision, POS_ROWS=pos_rows,
        num_warps=num_warps,
    )
    return outs
