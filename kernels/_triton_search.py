"""Span search in Triton: score the power-law anchor stripes, keep the top-k, bound the spans.

One program serves one query and all R query heads of one KV head, so each gathered anchor key
row is loaded once and scored for the R heads with one ``tl.dot`` ([R, D] x [D, BS]). Stripes may
be split over several programs (decode: one query, thousands of stripes); each split then writes
its own top-K candidates, merged later by :func:`select_topk` inside the consumer kernels.

Grid: (Lq, B * Hkv, n_splits). Output (FINAL): values fp32, anchors / qstart / qend int64, each
[B, Hq, Lq, K]; (not FINAL): candidate values / anchors [B, Hq, Lq, n_splits, KP] (KP = next pow2 of K).

Prefill alternative (``launch_search_split``, selectable, not the table's choice): the stripes of a
whole segment swept split by split, then ``_search_finalize_kernel`` merges the splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import grid_dependency, next_pow2, pdl_launch, span_bounds


@triton.jit
def _search_kernel(
    Q1, K, POS, OFFS, NS, MASK, S0, CONSTS,
    OUT_V, OUT_A, OUT_QS, OUT_QE,
    n_stripes, Lq, Lkv, W, G, Hq, n_splits, split_len,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    K_VAL: tl.constexpr, KP: tl.constexpr, FINAL: tl.constexpr, HAS_NS: tl.constexpr,
    HAS_MASK: tl.constexpr, FWD: tl.constexpr, HAS_W: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, POS_ROWS: tl.constexpr, PDL: tl.constexpr,
):
    grid_dependency(PDL)
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
    pdl: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Run the search. final (needs n_splits == 1): (values, anchors, qstart, qend) [B,Hq,Lq,K].

    Otherwise: candidate (values, anchors) [B,Hq,Lq,n_splits,KP] (merged by ``select_topk``).
    ``pos``: [Lq] shared by every batch row, or with ``pos_rows`` [B, Lq] contiguous (row b's own
    positions; ``ns`` must then be None). ``pdl``: launched as a programmatic dependent of the
    previous kernel (see ``grid_dependency``).
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
        FWD=forward, HAS_W=window > 0, UPCAST=upcast, PRECISION=precision, POS_ROWS=pos_rows, PDL=pdl,
        num_warps=num_warps, **pdl_launch(pdl),
    )
    return outs


# --- prefill, alternative design: stripe-split search + finalize (search_design="split") ----------
#
# Not the table's choice: on the H200 (bench/RESULTS.md "kernels", 2026-12-02) every setting of it
# measured slower than the single-program kernel above with 2 warps (K3: best 9.07 vs 8.70 ms; K4:
# 7.79 vs 6.75 ms). It is kept selectable and tested as the base for further work.
#
# Idea: the single-program search walks all ~1900 stripes of a query (at 1M) before the next query
# starts, so consecutive programs read anchor rows spread over the whole cache (~32 GB of 256-byte
# gathers per 32K chunk at 1M). Here the stripes are cut into splits and the grid runs split by
# split (the slowest grid axis): while one split is scored for every query of the chunk, the rows
# it touches (its offset range plus the chunk length, ~23 MB per KV head at 1M for 64 stripes) can
# stay in L2, and a row that query x reads at stripe i is read again by query x + F(i+1) - F(i) at
# stripe i + 1. Measured: one 64-stripe tile per split gained only 4% at the same tile and warps
# (11.48 vs 11.93 ms, K3), so the search is not bound by HBM traffic; the cost is in the top-k
# reductions and latency (2 warps instead of 4: -27%). Within a split, each (head, lane) keeps its
# own sorted best keys across tiles (elementwise updates, no reduction in the stripe loop); one
# split holding every stripe with 1 query per program is this design's best (9.07 ms, K3).
#
# Each (query, head, split) writes its best K_VAL keys; the finalize kernel merges the splits. A key
# is one int64 that orders like (score descending, stripe ascending): the score's fp32 bits mapped
# to an order-preserving int32, shifted left by 31, plus (2^31 - 1 - stripe). Keys are unique per
# (query, head), so the top-k needs neither argmax indices nor tie rules, and the kept set is
# exactly the top-k by (score, then the nearer anchor).

KEY_NONE: tl.constexpr = tl.constexpr(-(1 << 62) - 64)  # below every real key: no candidate
KEY_PAD: tl.constexpr = tl.constexpr((1 << 62) + 64)  # above every real key: padding columns


@triton.jit
def _score_key(s, stripe):
    """int64 keys of fp32 scores s at stripe indices (broadcastable): order = (s desc, stripe asc)."""
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 31) + (0x7FFFFFFF - stripe.to(tl.int64))


@triton.jit
def _key_value_stripe(key):
    """Inverse of :func:`_score_key`: (fp32 score, int64 stripe)."""
    ordered = key >> 31
    stripe = 0x7FFFFFFF - (key - (ordered << 31))
    o32 = ordered.to(tl.int32)
    bits = tl.where(o32 < 0, o32 ^ 0x7FFFFFFF, o32)
    return bits.to(tl.float32, bitcast=True), stripe


@triton.jit
def _lane_insert(key, k1, k2, k3, k4, K_VAL: tl.constexpr):
    """Insert ``key`` into each lane's sorted best keys k1 > k2 > k3 > k4 (the first K_VAL used)."""
    c1 = key > k1
    c2 = key > k2
    c3 = key > k3
    if K_VAL >= 4:
        k4 = tl.where(c3, k3, tl.where(key > k4, key, k4))
    if K_VAL >= 3:
        k3 = tl.where(c2, k2, tl.where(c3, key, k3))
    if K_VAL >= 2:
        k2 = tl.where(c1, k1, tl.where(c2, key, k2))
    k1 = tl.where(c1, key, k1)
    return k1, k2, k3, k4


@triton.jit
def _search_split_kernel(
    Q1, K, POS, OFFS, NS, MASK, CAND,
    n_stripes, Lq, Lkv, G, Hq, BH, split_len,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    BQ: tl.constexpr, K_VAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bg = tl.program_id(1)
    sp = tl.program_id(2)
    b = (bg // G).to(tl.int64)
    g = (bg % G).to(tl.int64)
    rows = tl.arange(0, RP)
    rmask = rows < R
    heads = g * R + rows
    d = tl.arange(0, BD)
    dmask = d < D
    cols = tl.arange(0, BS)
    lo_s = sp * split_len
    cbase = (sp * BH + b * Hq + heads).to(tl.int64) * Lq
    for xi in range(BQ):
        x = qb * BQ + xi
        xok = x < Lq
        xc = tl.minimum(x, Lq - 1)
        pos = tl.load(POS + xc).to(tl.int64)
        hi_s = tl.minimum(tl.minimum(lo_s + split_len, n_stripes), tl.load(NS + xc))
        live = xok & (lo_s < hi_s)  # this split holds stripes of this query
        q = tl.load(Q1 + b * s_qb + heads[:, None] * s_qh + xc * s_ql + d[None, :],
                    mask=rmask[:, None] & dmask[None, :] & live, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        # best K_VAL keys per (head, lane): sorted, updated elementwise (no reduction in the loop)
        k1 = tl.full([RP, BS], KEY_NONE, tl.int64)
        k2 = k1
        k3 = k1
        k4 = k1
        for i0 in range(lo_s, hi_s, BS):
            ii = i0 + cols
            inb = ii < hi_s
            f = tl.load(OFFS + ii, mask=inb, other=1 << 40)
            a = pos + 1 - f
            ok = (a >= 0) & inb & xok
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * Lkv + a, mask=ok, other=0) != 0)
            kt = tl.load(K + b * s_kb + g * s_kh + a[:, None] * s_kl + d[None, :],
                         mask=ok[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)  # [RP, BS], no 1/sqrt(D)
            key = tl.where(ok[None, :], _score_key(s, ii[None, :]), KEY_NONE)
            k1, k2, k3, k4 = _lane_insert(key, k1, k2, k3, k4, K_VAL)
        for j in tl.static_range(K_VAL):
            mk = tl.max(k1, axis=1)
            tl.store(CAND + (cbase + x) * K_VAL + j, mk, mask=rmask & live)
            top = k1 == mk[:, None]  # one lane (keys are distinct; KEY_NONE shifts harmlessly)
            k1 = tl.where(top, k2, k1)
            if K_VAL >= 3:
                k2 = tl.where(top, k3, k2)
            if K_VAL >= 4:
                k3 = tl.where(top, k4, k3)


@triton.jit
def _search_finalize_kernel(
    CAND, POS, OFFS, NS, S0, CONSTS, OUT_V, OUT_A, OUT_QS, OUT_QE,
    Lq, Lkv, W, Hq, BH, n_splits, split_len,
    K_VAL: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, NC: tl.constexpr,
    HAS_MASK: tl.constexpr, FWD: tl.constexpr, HAS_W: tl.constexpr,
):
    xb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    xs = xb * BM + tl.arange(0, BM)
    xm = xs < Lq
    pos = tl.load(POS + xs, mask=xm, other=0).to(tl.int64)
    ns = tl.load(NS + xs, mask=xm, other=0)
    kc = tl.arange(0, KP)
    kvalid = kc < K_VAL
    # running set: distinct sentinels below every key, padding columns above (never replaced)
    tk = tl.where(kvalid, KEY_NONE + kc.to(tl.int64), KEY_PAD)[None, :] + tl.zeros([BM, KP], tl.int64)
    cc = tl.arange(0, NC)
    PER: tl.constexpr = NC // K_VAL  # splits per step
    for sp0 in range(0, n_splits, PER):
        sp = sp0 + cc // K_VAL
        cm = (cc < PER * K_VAL) & (sp < n_splits)
        m2 = xm[:, None] & cm[None, :] & ((sp * split_len)[None, :] < ns[:, None])
        off = ((sp.to(tl.int64) * BH + bh) * Lq)[None, :] * K_VAL + xs[:, None] * K_VAL + (cc % K_VAL)[None, :]
        key = tl.load(CAND + off, mask=m2, other=KEY_NONE)
        for _ in tl.static_range(K_VAL):
            mk = tl.max(key, axis=1)
            mn = tl.min(tk, axis=1)
            rep = (tk == mn[:, None]) & (mk > mn)[:, None]
            tk = tl.where(rep, mk[:, None], tk)
            key = tl.where(key == mk[:, None], KEY_NONE, key)
    tk = tl.where(kvalid[None, :], tk, KEY_NONE - 64)
    # slot = rank of the key (keys are distinct)
    rank = tl.sum((tk[:, None, :] > tk[:, :, None]).to(tl.int32), axis=2)
    val, stripe = _key_value_stripe(tk)
    ok = (tk > KEY_NONE + 64) & (val > float("-inf"))
    anc = pos[:, None] + 1 - tl.load(OFFS + stripe, mask=ok, other=0)
    anc = tl.where(ok, anc, -1)
    val = tl.where(ok, val, float("-inf"))
    s0 = 0
    if HAS_MASK:
        s0 = tl.load(S0 + b)
    qs, qe = span_bounds(anc, pos[:, None], s0, Lkv, W, CONSTS, FWD, HAS_W)
    offs = ((bh * Lq + xs) * K_VAL)[:, None] + rank
    om = xm[:, None] & kvalid[None, :]
    tl.store(OUT_V + offs, val, mask=om)
    tl.store(OUT_A + offs, anc, mask=om)
    tl.store(OUT_QS + offs, qs, mask=om)
    tl.store(OUT_QE + offs, qe, mask=om)


def launch_search_split(
    q1: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    offs: torch.Tensor,
    ns: torch.Tensor,
    mask: torch.Tensor | None,
    s0: torch.Tensor | None,
    consts: torch.Tensor,
    *,
    num_spans: int,
    window: int,
    forward: bool,
    block_s: int,
    split_len: int,
    block_q: int,
    upcast: bool,
    precision: str,
    num_warps: int,
    num_stages: int,
    block_m: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill search in stripe splits: (values, anchors, qstart, qend) [B,Hq,Lq,K].

    ``split_len`` stripes per split (a multiple of the tile ``block_s``; 0: one split holding every
    stripe, i.e. one program walks all stripes of its queries), ``block_q`` queries per program.

    Same result as ``launch_search(..., final=True)`` (top-k by score, the nearer anchor first on
    an exact tie). ``pos`` [Lq] shared by the batch rows; ``ns`` [Lq] int32: stripes per query.
    Candidates: [n_splits, B * Hq, Lq, K] int64 keys (a split with no stripe of a query is not
    written for that query, nor read).
    """
    B, Hq, Lq, D = q1.shape
    G, Lkv = k.shape[1], k.shape[2]
    R = Hq // G
    dev = q1.device
    n_stripes = offs.numel()
    assert split_len % block_s == 0, "split_len: a multiple of block_s"
    split_len = split_len or max(block_s, triton.cdiv(n_stripes, block_s) * block_s)
    n_splits = max(1, triton.cdiv(n_stripes, split_len))
    shape = (B, Hq, Lq, num_spans)
    ov = torch.empty(shape, dtype=torch.float32, device=dev)
    oa, oqs, oqe = (torch.empty(shape, dtype=torch.int64, device=dev) for _ in range(3))
    if Lq == 0:
        return ov, oa, oqs, oqe
    cand = torch.empty(n_splits, B * Hq, Lq, num_spans, dtype=torch.int64, device=dev)
    m_arg = mask if mask is not None else pos
    _search_split_kernel[(triton.cdiv(Lq, block_q), B * G, n_splits)](
        q1, k, pos, offs, ns, m_arg, cand,
        n_stripes, Lq, Lkv, G, Hq, B * Hq, split_len,
        q1.stride(0), q1.stride(1), q1.stride(2), k.stride(0), k.stride(1), k.stride(2),
        R=R, RP=max(16, triton.next_power_of_2(R)), D=D, BD=max(16, triton.next_power_of_2(D)), BS=block_s,
        BQ=block_q, K_VAL=num_spans, HAS_MASK=mask is not None, UPCAST=upcast, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    KP = next_pow2(num_spans)
    _search_finalize_kernel[(triton.cdiv(Lq, block_m), B * Hq)](
        cand, pos, offs, ns, s0 if s0 is not None else pos, consts, ov, oa, oqs, oqe,
        Lq, Lkv, window, Hq, B * Hq, n_splits, split_len,
        K_VAL=num_spans, KP=KP, BM=block_m, NC=32, HAS_MASK=mask is not None, FWD=forward,
        HAS_W=window > 0, num_warps=4,
    )
    return ov, oa, oqs, oqe
