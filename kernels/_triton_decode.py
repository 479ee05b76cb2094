"""Decode (one query per sequence) in Triton: split-K over spans and window, LSE merge, gate.

Fixed shapes for CUDA-graph capture: every grid is sized from the *allocated* cache length, never
from the current position, and nothing is read back to the host.

1. search (``_triton_search``) with the stripe table split over programs -> top-4 candidates per
   split;
2. ``_decode_attn_kernel``, one launch with two roles:
   - span programs (b, h, slot j, chunk c): merge the candidates to the j-th anchor, bound its
     span, and stream chunk c (``CHUNK`` keys) of it with an fp32 online softmax -> (o, lse);
   - window programs (b, KV head, chunk c): the R query heads of one KV head share every window
     K/V block through one ``tl.dot`` ([R, D] x [D, BN]) -> (o, lse) per head;
3. ``_decode_merge_kernel`` (b, h): LSE-merge the window parts with each slot's span parts, then
   the softmax gate over the search values.

The "piece" design replaces step 2's span programs: ``_decode_piece_plan_kernel`` lists each KV
head's (row, piece) items in piece order, and ``_decode_piece_kernel`` streams one item per
program (same per-row loop as the split stream), so the reads of keys that several heads' spans
share happen at the same time. The "union" design (``_decode_union_kernel``) scores every key once
for all the rows of its KV head.

The "shared" design (the table's choice on CUDA) keeps the global piece grid but reads each piece
once: ``_decode_shared_kernel`` runs one program per (KV head, span row, piece index of that row);
of the rows covering a piece, the program of every 16th (by row index) scores the piece's keys for
itself and the next 15 covering rows with ``tl.dot`` tiles, each row masked to its own span, and
writes their parts for the split merge. No plan kernel, no work list, a fixed grid.

Streams measured on the H200 and dropped (bench/RESULTS.md, 2026-12-03; ``config_for`` lists them):
small equal blocks of each KV head's span union handed out by the hardware, one wave of equal
shares of the union, a per-lane register loop for pieces one row meets, and each step scored as
sub-blocks with their own softmax. Optional in the shared kernel: a register cap (``maxnreg``) and
TMA loads of whole K / V blocks (``tma``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import grid_dependency, pdl_launch, span_bounds, tma_descriptor
from secure_run.kernels._triton_search import select_topk

#: the decode designs ``launch_decode`` runs (a sweep variant with any other name is refused)
DECODE_MODES = ("split", "union", "piece", "piece-rows", "shared")


@triton.jit
def _kv_block(k_base, v_base, m_row, k0, hi, cols, d, dmask, s_kl, s_vl, HAS_MASK: tl.constexpr):
    """Keys k0 + cols (those <= hi and, with HAS_MASK, unmasked in ``m_row``): (key mask, K, V)."""
    kk = k0 + cols
    km = kk <= hi
    if HAS_MASK:
        km = km & (tl.load(m_row + kk, mask=km, other=0) != 0)
    kt = tl.load(k_base + kk[:, None] * s_kl + d[None, :], mask=km[:, None] & dmask[None, :], other=0.0)
    vt = tl.load(v_base + kk[:, None] * s_vl + d[None, :], mask=km[:, None] & dmask[None, :], other=0.0)
    return km, kt, vt


@triton.jit
def _stream_keys(q, k_base, v_base, m_row, lo, hi, s_kl, s_vl, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                 HAS_MASK: tl.constexpr, LANE_MAX: tl.constexpr):
    """(o, lse) of one query row ``q`` (fp32, scaled) over keys [lo, hi]: fp32 online softmax.

    ``LANE_MAX``: the running max is kept per key lane too, so the loop has no cross-warp step at
    all (the lanes are rescaled to the common max once at the end)."""
    d = tl.arange(0, BD)
    dmask = d < D
    # running max is a scalar; sums stay per key lane ([BN] and [BN, BD]) and are reduced once at
    # the end, so each step needs one cross-warp reduction (the max) instead of three
    m_i = tl.full([], float("-inf"), tl.float32)
    m2 = tl.full([BN], float("-inf"), tl.float32)
    l2 = tl.full([BN], 0.0, tl.float32)
    acc2 = tl.full([BN, BD], 0.0, tl.float32)
    cols = tl.arange(0, BN)
    for k0 in range(lo, hi + 1, BN):
        km, kt, vt = _kv_block(k_base, v_base, m_row, k0, hi, cols, d, dmask, s_kl, s_vl, HAS_MASK)
        s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(km, s, float("-inf"))
        if LANE_MAX:
            m2_new = tl.maximum(m2, s)
            m2_use = tl.where(m2_new == float("-inf"), 0.0, m2_new)
            alpha2 = tl.exp(m2 - m2_use)
            p = tl.exp(s - m2_use)
            l2 = l2 * alpha2 + p
            acc2 = acc2 * alpha2[:, None] + p[:, None] * vt.to(tl.float32)
            m2 = m2_new
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use)
            l2 = l2 * alpha + p
            acc2 = acc2 * alpha + p[:, None] * vt.to(tl.float32)
            m_i = m_new
    if LANE_MAX:  # bring every lane to the common max
        m_i = tl.max(m2, axis=0)
        scale = tl.exp(m2 - tl.where(m_i == float("-inf"), 0.0, m_i))
        l2 = l2 * scale
        acc2 = acc2 * scale[:, None]
    l_i = tl.sum(l2, axis=0)
    acc = tl.sum(acc2, axis=0)
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    return o, lse


@triton.jit
def _rows_step(q, kt, vt, km, k0, base, cols, rlo, rhi, m_i, l_i, acc, sm_scale, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """One key block (keys k0 + cols, ``km`` the loaded ones) of ``_stream_rows``' online softmax."""
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    sc = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * sm_scale
    kr = (k0 - base).to(tl.int32) + cols
    inside = (kr[None, :] >= rlo[:, None]) & (kr[None, :] <= rhi[:, None]) & km[None, :]
    sc = tl.where(inside, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    pr = tl.exp(sc - m_use[:, None])
    l_i = l_i * alpha + tl.sum(pr, axis=1)
    acc = acc * alpha[:, None] + tl.dot(pr.to(vt.dtype), vt, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _stream_rows(q, k_base, v_base, m_row, lo, hi, base, rlo, rhi, sm_scale, s_kl, s_vl, M: tl.constexpr,
                 D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, KD=None, VD=None, rk=0, TMA: tl.constexpr = False):
    """(o, lse) of M query rows ``q`` over keys [lo, hi], each key block read once for all rows
    (``tl.dot``); row i sees only keys base + [rlo[i], rhi[i]] (int32 bounds relative to ``base``:
    cheap [M, BN] compares in the hot loop). fp32 online softmax per row.

    ``TMA``: the whole BN-key blocks inside [lo, hi] load through the K / V tensor descriptors ``KD``
    / ``VD`` (rows ``rk`` + key), the last, partial block through masked loads (keys past ``hi`` may
    be unwritten cache slots)."""
    d = tl.arange(0, BD)
    dmask = d < D
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.full([M], 0.0, tl.float32)
    acc = tl.full([M, BD], 0.0, tl.float32)
    cols = tl.arange(0, BN)
    if TMA:
        full_end = lo + tl.maximum(hi - lo + 1, 0) // BN * BN
        for k0 in range(lo, full_end, BN):
            kt = KD.load([(rk + k0).to(tl.int32), 0])
            vt = VD.load([(rk + k0).to(tl.int32), 0])
            km = cols >= 0
            if HAS_MASK:
                km = tl.load(m_row + k0 + cols) != 0
            m_i, l_i, acc = _rows_step(q, kt, vt, km, k0, base, cols, rlo, rhi, m_i, l_i, acc, sm_scale, UPCAST,
                                       PRECISION)
        if full_end <= hi:
            km, kt, vt = _kv_block(k_base, v_base, m_row, full_end, hi, cols, d, dmask, s_kl, s_vl, HAS_MASK)
            m_i, l_i, acc = _rows_step(q, kt, vt, km, full_end, base, cols, rlo, rhi, m_i, l_i, acc, sm_scale,
                                       UPCAST, PRECISION)
    else:
        for k0 in range(lo, hi + 1, BN):
            km, kt, vt = _kv_block(k_base, v_base, m_row, k0, hi, cols, d, dmask, s_kl, s_vl, HAS_MASK)
            m_i, l_i, acc = _rows_step(q, kt, vt, km, k0, base, cols, rlo, rhi, m_i, l_i, acc, sm_scale, UPCAST,
                                       PRECISION)
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    return o, lse, has


@triton.jit
def _decode_span_part(
    pid, pos, POS, Q2, K, V, MASK, S0, CONSTS, CV, CA, O_SPAN, L_SPAN,
    Lkv, W, Hq, n_cand, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, K_VAL: tl.constexpr, NC: tl.constexpr,
    NCH: tl.constexpr, CHUNK: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr, FWD: tl.constexpr,
    HAS_W: tl.constexpr, LANE_MAX: tl.constexpr, POS_ROWS: tl.constexpr,
):
    """Chunk c of the span of slot j of head h: fp32 online softmax over at most CHUNK keys."""
    d = tl.arange(0, BD)
    dmask = d < D
    c = pid % NCH
    rest = pid // NCH
    j = rest % K_VAL
    bh = (rest // K_VAL).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    g = h // R
    if POS_ROWS:
        pos = tl.load(POS + b).to(tl.int64)
    s0 = 0
    if HAS_MASK:
        s0 = tl.load(S0 + b)
    _, a = select_topk(CV, CA, bh * n_cand, j, NC, n_cand, K_VAL)
    qs, qe = span_bounds(a, pos, s0, Lkv, W, CONSTS, FWD, HAS_W)
    lo = tl.maximum(qs, 0) + c * CHUNK
    hi = tl.minimum(qe, lo + CHUNK - 1)
    hi = tl.where(a >= 0, hi, -1)
    q = tl.load(Q2 + b * s_qb + h * s_qh + d, mask=dmask, other=0.0).to(tl.float32) * sm_scale
    o, lse = _stream_keys(q, K + b * s_kb + g * s_kh, V + b * s_vb + g * s_vh, MASK + b * Lkv, lo, hi, s_kl, s_vl,
                          D, BD, BN, HAS_MASK, LANE_MAX)
    row = (bh * K_VAL + j) * NCH + c
    tl.store(O_SPAN + row * D + d, o, mask=dmask)
    tl.store(L_SPAN + row, lse)


@triton.jit
def _decode_window_part(
    wid, pos, POS, Q2, K, V, MASK, O_WIN, L_WIN,
    Lkv, W, G, Hq, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, NWCH: tl.constexpr,
    WCHUNK: tl.constexpr, BNW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, POS_ROWS: tl.constexpr,
):
    """Window chunk c for the R query heads of one KV head: shared K/V blocks via tl.dot."""
    d = tl.arange(0, BD)
    dmask = d < D
    c = wid % NWCH
    bg = (wid // NWCH).to(tl.int64)
    b = bg // G
    g = bg % G
    if POS_ROWS:
        pos = tl.load(POS + b).to(tl.int64)
    rows = tl.arange(0, RP)
    rmask = rows < R
    heads = g * R + rows
    q = tl.load(Q2 + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lo = tl.maximum(pos - W + 1, 0) + c * WCHUNK
    hi = tl.minimum(pos, lo + WCHUNK - 1)
    if not HAS_W:
        hi = lo - 1
    # every head sees every key of the chunk: row bounds [0, WCHUNK] relative to lo
    o, lse, _ = _stream_rows(q, K + b * s_kb + g * s_kh, V + b * s_vb + g * s_vh, MASK + b * Lkv, lo, hi, lo,
                             tl.full([RP], 0, tl.int32), tl.full([RP], WCHUNK, tl.int32), sm_scale, s_kl, s_vl,
                             RP, D, BD, BNW, HAS_MASK, UPCAST, PRECISION)
    row = (b * Hq + heads) * NWCH + c
    tl.store(O_WIN + row[:, None] * D + d[None, :], o, mask=rmask[:, None] & dmask[None, :])
    tl.store(L_WIN + row, lse, mask=rmask)


@triton.jit
def _decode_finalize_kernel(
    CV, CA, POS, S0, CONSTS, VALS, ANCS, QS, QE,
    n_cand, Lkv, W, Hq,
    NC: tl.constexpr, K_VAL: tl.constexpr, KP: tl.constexpr, HAS_MASK: tl.constexpr, FWD: tl.constexpr,
    HAS_W: tl.constexpr, POS_ROWS: tl.constexpr, PDL: tl.constexpr,
):
    """Per (b, h): merge the split candidates into the sorted top-K and bound their spans."""
    grid_dependency(PDL)
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hq
    if POS_ROWS:
        pos = tl.load(POS + b).to(tl.int64)
    else:
        pos = tl.load(POS).to(tl.int64)
    idx = tl.arange(0, NC)
    cm = idx < n_cand
    cv = tl.load(CV + bh * n_cand + idx, mask=cm, other=float("-inf"))
    ca = tl.load(CA + bh * n_cand + idx, mask=cm, other=-1)
    kc = tl.arange(0, KP)
    sv = tl.full([KP], float("-inf"), tl.float32)
    sa = tl.full([KP], -1, tl.int64)
    for jj in tl.static_range(K_VAL):
        mv, am = tl.max(cv, axis=0, return_indices=True)
        ma = tl.sum(tl.where(idx == am, ca, 0), axis=0)
        ma = tl.where(mv > float("-inf"), ma, -1)
        sv = tl.where(kc == jj, mv, sv)
        sa = tl.where(kc == jj, ma, sa)
        cv = tl.where(idx == am, float("-inf"), cv)
    s0 = 0
    if HAS_MASK:
        s0 = tl.load(S0 + b)
    qs, qe = span_bounds(sa, pos, s0, Lkv, W, CONSTS, FWD, HAS_W)
    km = kc < K_VAL
    tl.store(VALS + bh * K_VAL + kc, sv, mask=km)
    tl.store(ANCS + bh * K_VAL + kc, sa, mask=km)
    tl.store(QS + bh * K_VAL + kc, qs, mask=km)
    tl.store(QE + bh * K_VAL + kc, qe, mask=km)


@triton.jit
def _decode_union_part(
    p, Q2, K, V, MASK, QS, QE, PO, PL, PLAN,
    Lkv, G, Hq, MAXP, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, RK: tl.constexpr, RKP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    K_VAL: tl.constexpr, CH: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Piece ``p`` of the union of the R*K spans of one KV head (each key read once).

    Every program re-derives the same plan from the K*R span bounds: sort by start, merge
    overlapping/touching spans into disjoint segments, cut each segment into CH-key pieces. The
    piece's keys are scored for all R*K (head, slot) rows at once (``tl.dot``), each row masked to
    its own span, and each row's partial (o, lse) is written for the merge.
    """
    d = tl.arange(0, BD)
    dmask = d < D
    piece = p % MAXP
    bg = (p // MAXP).to(tl.int64)
    b = bg // G
    g = bg % G
    r = tl.arange(0, RKP)
    rm = r < RK
    h = g * R + r // K_VAL
    j = r % K_VAL
    qs = tl.load(QS + (b * Hq + h) * K_VAL + j, mask=rm, other=-1)
    qe = tl.load(QE + (b * Hq + h) * K_VAL + j, mask=rm, other=-1)
    ok = rm & (qs >= 0) & (qe >= qs)
    # --- plan: disjoint segments of the union, in key order
    SH: tl.constexpr = 1 << 26
    BIG: tl.constexpr = 1 << 62
    ks = tl.sort(tl.where(ok, qs * SH + qe, BIG))
    sv = ks < BIG
    ss = ks // SH
    se = ks % SH
    prev = tl.max(tl.where((r[None, :] < r[:, None]) & sv[None, :], se[None, :], -2), axis=1)
    new = sv & (ss > prev + 1)
    seg = tl.sum(tl.where(r[None, :] <= r[:, None], new[None, :].to(tl.int32), 0), axis=1) - 1
    nseg = tl.sum(new.to(tl.int32), axis=0)
    in_seg = (seg[None, :] == r[:, None]) & sv[None, :]  # [segment, sorted span]
    seg_lo = tl.min(tl.where(in_seg, ss[None, :], BIG), axis=1)
    seg_hi = tl.max(tl.where(in_seg, se[None, :], -1), axis=1)
    npc = tl.where(r < nseg, (seg_hi - seg_lo + CH) // CH, 0)
    pend = tl.sum(tl.where(r[None, :] <= r[:, None], npc[None, :], 0), axis=1)  # inclusive prefix
    total = tl.sum(npc, axis=0)
    first = piece == 0  # one program per KV head publishes the plan for the merge kernel
    tl.store(PLAN + (bg * 3 + 0) * RKP + r, seg_lo, mask=first)
    tl.store(PLAN + (bg * 3 + 1) * RKP + r, tl.where(r < nseg, seg_hi, BIG), mask=first)
    tl.store(PLAN + (bg * 3 + 2) * RKP + r, pend - npc, mask=first)
    if piece < total:
        sig = tl.sum((pend <= piece).to(tl.int32), axis=0)
        at = r == sig
        lo = tl.sum(tl.where(at, seg_lo, 0), axis=0) + (piece - tl.sum(tl.where(at, pend - npc, 0), axis=0)) * CH
        hi = tl.minimum(tl.sum(tl.where(at, seg_hi, 0), axis=0), lo + CH - 1)
        q = tl.load(Q2 + b * s_qb + h[:, None] * s_qh + d[None, :], mask=rm[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        # row bounds relative to the piece
        rlo = tl.where(ok, tl.minimum(tl.maximum(qs - lo, 0), CH), CH).to(tl.int32)
        rhi = tl.where(ok, tl.minimum(tl.maximum(qe - lo, -1), CH - 1), -1).to(tl.int32)
        o, lse, has = _stream_rows(q, K + b * s_kb + g * s_kh, V + b * s_vb + g * s_vh, MASK + b * Lkv, lo, hi, lo,
                                   rlo, rhi, sm_scale, s_kl, s_vl, RKP, D, BD, BN, HAS_MASK, UPCAST, PRECISION)
        row = (bg * MAXP + piece) * RK + r
        tl.store(PL + row, lse, mask=rm)
        tl.store(PO + row[:, None] * D + d[None, :], o, mask=(rm & has)[:, None] & dmask[None, :])


@triton.jit
def _decode_union_kernel(
    Q2, K, V, POS, MASK, QS, QE, PO, PL, PLAN, O_WIN, L_WIN,
    Lkv, W, G, Hq, MAXP, n_union_progs, sm_scale,
    s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, RP: tl.constexpr, RK: tl.constexpr, RKP: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, K_VAL: tl.constexpr, CH: tl.constexpr, BN: tl.constexpr, NWCH: tl.constexpr,
    WCHUNK: tl.constexpr, BNW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, POS_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_union_progs:
        _decode_union_part(pid, Q2, K, V, MASK, QS, QE, PO, PL, PLAN,
                           Lkv, G, Hq, MAXP, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                           R, RK, RKP, D, BD, K_VAL, CH, BN, HAS_MASK, UPCAST, PRECISION)
    else:
        pos = tl.load(POS).to(tl.int64)  # with POS_ROWS: replaced by the row's own in the part
        _decode_window_part(pid - n_union_progs, pos, POS, Q2, K, V, MASK, O_WIN, L_WIN,
                            Lkv, W, G, Hq, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                            R, RP, D, BD, NWCH, WCHUNK, BNW, HAS_MASK, HAS_W, UPCAST, PRECISION, POS_ROWS)


@triton.jit
def _decode_union_merge_kernel(
    VALS, ANCS, QS, QE, PO, PL, PLAN, O_WIN, L_WIN, OUT,
    Hq, G, MAXP, s_ob, s_oh,
    R: tl.constexpr, RK: tl.constexpr, RKP: tl.constexpr, K_VAL: tl.constexpr, KP: tl.constexpr,
    NWCH: tl.constexpr, NWCHP: tl.constexpr, PB: tl.constexpr, CH: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr,
):
    """Per (b, h): LSE-merge the window parts with the pieces covering each slot's span, then gate.

    A span lies inside one segment of the plan, so its pieces are the consecutive indices
    [start piece of its segment + (qs - segment start) // CH, ... + (qe - segment start) // CH].
    """
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    bg = b * G + h // R
    rr = h % R
    d = tl.arange(0, BD)
    dmask = d < D
    sr = tl.arange(0, RKP)
    seg_lo = tl.load(PLAN + (bg * 3 + 0) * RKP + sr)
    seg_hi = tl.load(PLAN + (bg * 3 + 1) * RKP + sr)
    pstart = tl.load(PLAN + (bg * 3 + 2) * RKP + sr)
    wc = tl.arange(0, NWCHP)
    wm = wc < NWCH
    lw = tl.load(L_WIN + bh * NWCH + wc, mask=wm, other=float("-inf"))
    ow = tl.load(O_WIN + (bh * NWCH + wc)[:, None] * D + d[None, :], mask=wm[:, None] & dmask[None, :], other=0.0)
    mw = tl.max(lw, axis=0)
    mw_use = tl.where(mw == float("-inf"), 0.0, mw)
    ew = tl.exp(lw - mw_use)
    lw_sum = tl.sum(ew, axis=0)
    accw = tl.sum(ew[:, None] * ow, axis=0)
    kc = tl.arange(0, KP)
    km = kc < K_VAL
    anc = tl.load(ANCS + bh * K_VAL + kc, mask=km, other=-1)
    gv = tl.where(anc >= 0, tl.load(VALS + bh * K_VAL + kc, mask=km, other=0.0), -1e9)
    gv = tl.where(km, gv, float("-inf"))
    gmax = tl.max(gv, axis=0)
    gsum = tl.sum(tl.exp(gv - gmax), axis=0)
    out = tl.full([BD], 0.0, tl.float32)
    pc = tl.arange(0, PB)
    for j in tl.static_range(K_VAL):
        gj = tl.sum(tl.where(kc == j, tl.exp(gv - gmax), 0.0), axis=0) / gsum
        qs = tl.load(QS + bh * K_VAL + j)
        qe = tl.load(QE + bh * K_VAL + j)
        sig = tl.sum((seg_hi < qs).to(tl.int32), axis=0)
        at = sr == sig
        lo_s = tl.sum(tl.where(at, seg_lo, 0), axis=0)
        ps = tl.sum(tl.where(at, pstart, 0), axis=0)
        p_first = ps + (qs - lo_s) // CH
        p_last = tl.where((qs >= 0) & (qe >= qs), ps + (qe - lo_s) // CH, p_first - 1)
        m_i = mw
        l_i = lw_sum
        acc = accw
        row = rr * K_VAL + j
        for p0 in range(p_first, p_last + 1, PB):
            pp = p0 + pc
            lp = tl.load(PL + (bg * MAXP + pp) * RK + row, mask=pp <= p_last, other=float("-inf"))
            hp = lp > float("-inf")
            op = tl.load(PO + ((bg * MAXP + pp) * RK + row)[:, None] * D + d[None, :], mask=hp[:, None] & dmask[None, :],
                         other=0.0)
            m_new = tl.maximum(m_i, tl.max(lp, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            old_use = tl.where(m_i == float("-inf"), 0.0, m_i)
            alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(old_use - m_use))
            e = tl.exp(lp - m_use)
            l_i = l_i * alpha + tl.sum(e, axis=0)
            acc = acc * alpha + tl.sum(e[:, None] * op, axis=0)
            m_i = m_new
        out += gj * (acc / tl.where(l_i > 0, l_i, 1.0))
    tl.store(OUT + b * s_ob + h * s_oh + d, out.to(OUT.dtype.element_ty), mask=dmask)


@triton.jit
def _row_pieces(QS, QE, base, rows, RK: tl.constexpr, PIECE: tl.constexpr):
    """(first piece, number of pieces) of span rows ``rows`` (0, 0 for a row past RK or with no span)."""
    rm = rows < RK
    qs = tl.load(QS + base + rows, mask=rm, other=-1)
    qe = tl.load(QE + base + rows, mask=rm, other=-1)
    ok = rm & (qs >= 0) & (qe >= qs)
    first = tl.where(ok, qs // PIECE, 0)
    return first, tl.where(ok, qe // PIECE - first + 1, 0)


@triton.jit
def _decode_piece_plan_kernel(
    QS, QE, ITEMS, COUNT, L_SPAN, CAP,
    RK: tl.constexpr, RKP: tl.constexpr, NCH: tl.constexpr, NCHP: tl.constexpr, PIECE: tl.constexpr,
    EB: tl.constexpr, BY_PIECE: tl.constexpr,
):
    """Work list of one KV head (program (b*G + g, item block)): its RK span rows (bounds from the
    finalize kernel; row r = local head * K + slot) cut at PIECE-key boundaries.

    Row r covers pieces [qs // PIECE, qe // PIECE]; its item i (piece p = first + i) goes to rank
    (items of earlier pieces) + (earlier rows on p) with ``BY_PIECE``, else (items of earlier rows)
    + i. In piece order the rows that share keys are adjacent in the work list, so the programs
    reading those keys run together and the second read can come from L2. An item is stored as
    p * 65536 + r. Parts past a row's last piece get lse = -inf for the merge. Block 0 also stores the
    item count.
    """
    bg = tl.program_id(0).to(tl.int64)
    eb = tl.program_id(1)
    r = tl.arange(0, RKP)
    first, npc = _row_pieces(QS, QE, bg * RK, r, RK, PIECE)
    if eb == 0:
        tl.store(COUNT + bg, tl.sum(npc, axis=0))
    e = eb * EB + tl.arange(0, EB)
    er = e // NCHP
    ei = e % NCHP
    erm = er < RK
    fe, ne = _row_pieces(QS, QE, bg * RK, er, RK, PIECE)
    pe = fe + ei
    if BY_PIECE:
        before = tl.minimum(tl.maximum(pe[:, None] - first[None, :], 0), npc[None, :])
        same = (r[None, :] < er[:, None]) & (first[None, :] <= pe[:, None]) & (pe[:, None] < first[None, :] + npc[None, :])
        rank = tl.sum(before, axis=1) + tl.sum(same.to(tl.int64), axis=1)
    else:
        rank = tl.sum(tl.where(r[None, :] < er[:, None], npc[None, :], 0), axis=1) + ei
    tl.store(ITEMS + bg * CAP + rank, pe * 65536 + er, mask=ei < ne)
    tl.store(L_SPAN + (bg * RK + er) * NCH + ei, float("-inf"), mask=erm & (ei >= ne) & (ei < NCH))


@triton.jit
def _decode_piece_part(
    t, Q2, K, V, MASK, QS, QE, ITEMS, COUNT, O_SPAN, L_SPAN,
    Lkv, G, Hq, CAP, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, K_VAL: tl.constexpr,
    NCH: tl.constexpr, PIECE: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr, LANE_MAX: tl.constexpr,
):
    """Item t of the work list: one span row over the keys of one piece -> its part (o, lse)."""
    bg = (t // CAP).to(tl.int64)
    i = t % CAP
    if i < tl.load(COUNT + bg):
        d = tl.arange(0, BD)
        dmask = d < D
        b = bg // G
        g = bg % G
        it = tl.load(ITEMS + bg * CAP + i)
        p = it // 65536
        er = it % 65536  # local row: head * K + slot
        j = er % K_VAL
        bh = b * Hq + g * R + er // K_VAL
        qs = tl.load(QS + bh * K_VAL + j)
        qe = tl.load(QE + bh * K_VAL + j)
        lo = tl.maximum(qs, p * PIECE)
        hi = tl.minimum(qe, p * PIECE + PIECE - 1)
        q = tl.load(Q2 + b * s_qb + (bh % Hq) * s_qh + d, mask=dmask, other=0.0).to(tl.float32) * sm_scale
        o, lse = _stream_keys(q, K + b * s_kb + g * s_kh, V + b * s_vb + g * s_vh, MASK + b * Lkv, lo, hi, s_kl,
                              s_vl, D, BD, BN, HAS_MASK, LANE_MAX)
        row = (bh * K_VAL + j) * NCH + (p - qs // PIECE)
        tl.store(O_SPAN + row * D + d, o, mask=dmask)
        tl.store(L_SPAN + row, lse)


@triton.jit
def _decode_piece_kernel(
    Q2, K, V, POS, MASK, QS, QE, ITEMS, COUNT, O_SPAN, L_SPAN, O_WIN, L_WIN,
    Lkv, W, G, Hq, CAP, n_piece_progs, sm_scale,
    s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, K_VAL: tl.constexpr,
    NCH: tl.constexpr, NWCH: tl.constexpr, PIECE: tl.constexpr, WCHUNK: tl.constexpr,
    BN: tl.constexpr, BNW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, LANE_MAX: tl.constexpr, POS_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_piece_progs:
        _decode_piece_part(pid, Q2, K, V, MASK, QS, QE, ITEMS, COUNT, O_SPAN, L_SPAN,
                           Lkv, G, Hq, CAP, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                           R, D, BD, K_VAL, NCH, PIECE, BN, HAS_MASK, LANE_MAX)
    else:
        pos = tl.load(POS).to(tl.int64)  # with POS_ROWS: replaced by the row's own in the part
        _decode_window_part(pid - n_piece_progs, pos, POS, Q2, K, V, MASK, O_WIN, L_WIN,
                            Lkv, W, G, Hq, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                            R, RP, D, BD, NWCH, WCHUNK, BNW, HAS_MASK, HAS_W, UPCAST, PRECISION, POS_ROWS)


@triton.jit
def _kv_head_rows(QS, QE, bg, R: tl.constexpr, RP: tl.constexpr, KP: tl.constexpr, K_VAL: tl.constexpr):
    """Span bounds of the R * K_VAL rows of KV head ``bg`` (from the finalize kernel) as flat
    [RP * KP] vectors, row h * KP + slot j; -1 for padding rows and slots."""
    f = tl.arange(0, RP * KP)
    fm = (f // KP < R) & (f % KP < K_VAL)
    at = (bg * R + f // KP) * K_VAL + f % KP
    return tl.load(QS + at, mask=fm, other=-1), tl.load(QE + at, mask=fm, other=-1)


@triton.jit
def _decode_shared_part(
    t, Q2, K, V, KD, VD, MASK, QS, QE, O_SPAN, L_SPAN,
    Lkv, G, Hq, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, RP: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    K_VAL: tl.constexpr, NCH: tl.constexpr, PIECE: tl.constexpr, GR: tl.constexpr, BN: tl.constexpr,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """Program t = (KV head, span row er, its piece index ei): each piece's keys are read once.

    Row er (span bounds from the finalize kernel) meets pieces [first, first + n) of the global PIECE-key grid.
    The rows that cover piece p = first + ei are ranked by row index; the program of the row whose
    rank is a multiple of GR scores the piece's keys for that rank and the next GR - 1 (one
    ``tl.dot`` per key block, each row masked to its own span) and writes each of those rows'
    parts. Every other program of a used piece has nothing to do; a program past its row's last
    piece marks the part empty (lse = -inf).
    """
    RK: tl.constexpr = R * K_VAL
    ei = t % NCH
    rest = t // NCH
    er = rest % RK
    bg = (rest // RK).to(tl.int64)
    b = bg // G
    g = bg % G
    qs_f, qe_f = _kv_head_rows(QS, QE, bg, R, RP, KP, K_VAL)
    f = tl.arange(0, RP * KP)  # flat row h * KP + j; orders like the row index h * K_VAL + j
    ok = (qs_f >= 0) & (qe_f >= qs_f)
    first = tl.where(ok, qs_f // PIECE, 0)
    npc = tl.where(ok, qe_f // PIECE - first + 1, 0)
    mine = f == (er // K_VAL) * KP + er % K_VAL
    my_first = tl.sum(tl.where(mine, first, 0), axis=0)
    my_n = tl.sum(tl.where(mine, npc, 0), axis=0)
    gi = tl.arange(0, GR)
    if ei >= my_n:
        tl.store(L_SPAN + (bg * RK + er) * NCH + ei, float("-inf"))
    else:
        p = my_first + ei
        cover = (first <= p) & (p < first + npc)
        # rank of each covering row among the covering rows (exclusive prefix count)
        rank = tl.sum(((f[None, :] < f[:, None]) & cover[None, :]).to(tl.int32), axis=1)
        my_rank = tl.sum(tl.where(mine, rank, 0), axis=0)
        if my_rank % GR == 0:
            hit = cover[None, :] & (rank[None, :] == my_rank + gi[:, None])  # [group slot, flat row]
            gm = tl.sum(hit.to(tl.int32), axis=1) > 0
            gf = tl.sum(tl.where(hit, f[None, :], 0), axis=1)  # the group's rows (0 for an empty slot)
            qs = tl.sum(tl.where(hit, qs_f[None, :], 0), axis=1)
            qe = tl.sum(tl.where(hit, qe_f[None, :], 0), axis=1)
            gfirst = tl.sum(tl.where(hit, first[None, :], 0), axis=1)
            hl = gf // KP  # local head
            base = p * PIECE
            # row bounds relative to the piece, as int32 (cheap [rows, BN] compares in the hot loop)
            rlo = tl.where(gm, tl.maximum(qs - base, 0), PIECE).to(tl.int32)
            rhi = tl.where(gm, tl.minimum(qe - base, PIECE - 1), -1).to(tl.int32)
            lo = base + tl.min(rlo, axis=0)
            hi = base + tl.max(rhi, axis=0)
            d = tl.arange(0, BD)
            dmask = d < D
            q = tl.load(Q2 + b * s_qb + (g * R + hl)[:, None] * s_qh + d[None, :],
                        mask=gm[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            o, lse, _ = _stream_rows(q, K + b * s_kb + g * s_kh, V + b * s_vb + g * s_vh, MASK + b * Lkv, lo, hi,
                                     base, rlo, rhi, sm_scale, s_kl, s_vl, GR, D, BD, BN, HAS_MASK, UPCAST,
                                     PRECISION, KD, VD, (b * s_kb + g * s_kh) // s_kl, TMA)
            part = (bg * RK + hl * K_VAL + gf % KP) * NCH + (p - gfirst)
            tl.store(L_SPAN + part, lse, mask=gm)
            tl.store(O_SPAN + part[:, None] * D + d[None, :], o, mask=gm[:, None] & dmask[None, :])


@triton.jit
def _decode_shared_kernel(
    Q2, K, V, KD, VD, POS, MASK, QS, QE, O_SPAN, L_SPAN, O_WIN, L_WIN,
    Lkv, W, G, Hq, n_shared_progs, sm_scale,
    s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, RP: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    K_VAL: tl.constexpr, NCH: tl.constexpr, NWCH: tl.constexpr, PIECE: tl.constexpr, GR: tl.constexpr,
    WCHUNK: tl.constexpr, BN: tl.constexpr, BNW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, POS_ROWS: tl.constexpr, PDL: tl.constexpr,
    TRACE, DO_TRACE: tl.constexpr, TMA: tl.constexpr,
):
    grid_dependency(PDL)
    pid = tl.program_id(0)
    if DO_TRACE:
        _, t0 = _trace_now()
    if pid < n_shared_progs:
        _decode_shared_part(pid, Q2, K, V, KD, VD, MASK, QS, QE, O_SPAN, L_SPAN,
                            Lkv, G, Hq, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                            R, RP, KP, D, BD, K_VAL, NCH, PIECE, GR, BN, HAS_MASK, UPCAST, PRECISION, TMA)
    else:
        pos = tl.load(POS).to(tl.int64)  # with POS_ROWS: replaced by the row's own in the part
        _decode_window_part(pid - n_shared_progs, pos, POS, Q2, K, V, MASK, O_WIN, L_WIN,
                            Lkv, W, G, Hq, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                            R, RP, D, BD, NWCH, WCHUNK, BNW, HAS_MASK, HAS_W, UPCAST, PRECISION, POS_ROWS)
    if DO_TRACE:
        _trace_store(TRACE, pid, t0)


@triton.jit
def _trace_now():
    """(SM id, global nanosecond timer) of the calling program (GPU only: inline PTX)."""
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    return sm, t


@triton.jit
def _trace_store(TRACE, pid, t0):
    """Program ``pid``'s record in a trace buffer [programs, 3] (int64): SM id, start and end (ns)."""
    sm, t1 = _trace_now()
    tl.store(TRACE + pid * 3 + 0, sm.to(tl.int64))
    tl.store(TRACE + pid * 3 + 1, t0)
    tl.store(TRACE + pid * 3 + 2, t1)


@triton.jit
def _decode_attn_kernel(
    Q2, K, V, POS, MASK, S0, CONSTS, CV, CA, O_SPAN, L_SPAN, O_WIN, L_WIN,
    Lkv, W, G, Hq, n_cand, n_span_progs, sm_scale,
    s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, K_VAL: tl.constexpr,
    NC: tl.constexpr, NCH: tl.constexpr, NWCH: tl.constexpr, CHUNK: tl.constexpr, WCHUNK: tl.constexpr,
    BN: tl.constexpr, BNW: tl.constexpr, HAS_MASK: tl.constexpr, FWD: tl.constexpr, HAS_W: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, LANE_MAX: tl.constexpr, POS_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    pos = tl.load(POS).to(tl.int64)  # the shared position (with POS_ROWS: row 0's, replaced per row)
    if pid < n_span_progs:
        _decode_span_part(pid, pos, POS, Q2, K, V, MASK, S0, CONSTS, CV, CA, O_SPAN, L_SPAN,
                          Lkv, W, Hq, n_cand, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                          R, D, BD, K_VAL, NC, NCH, CHUNK, BN, HAS_MASK, FWD, HAS_W, LANE_MAX, POS_ROWS)
    else:
        _decode_window_part(pid - n_span_progs, pos, POS, Q2, K, V, MASK, O_WIN, L_WIN,
                            Lkv, W, G, Hq, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                            R, RP, D, BD, NWCH, WCHUNK, BNW, HAS_MASK, HAS_W, UPCAST, PRECISION, POS_ROWS)


@triton.jit
def _all_slot_parts(L_SPAN, O_SPAN, bh, sc, sm, kc, d, dmask, K_VAL: tl.constexpr, NCH: tl.constexpr, D: tl.constexpr):
    """Every slot's span parts of row ``bh`` in one load each: lse [KP, NCHP] and o [KP, NCHP, BD]
    (-inf / 0 for padding slots and parts)."""
    at = (bh * K_VAL + kc[:, None]) * NCH + sc[None, :]
    pm = (kc < K_VAL)[:, None] & sm[None, :]
    ls = tl.load(L_SPAN + at, mask=pm, other=float("-inf"))
    os_ = tl.load(O_SPAN + at[:, :, None] * D + d[None, None, :], mask=pm[:, :, None] & dmask[None, None, :],
                  other=0.0)
    return ls, os_


@triton.jit
def _merge_all_slots(ls, os_, lw, ow, gate):
    """sum_j gate_j * (slot j's span parts ``ls`` / ``os_`` LSE-merged with the window parts ``lw`` /
    ``ow``), every slot at once. Padding slots have gate 0; parts with lse = -inf may hold anything
    and are masked out."""
    mx = tl.maximum(tl.max(lw, axis=0), tl.max(ls, axis=1))  # [KP]
    mu = tl.where(mx == float("-inf"), 0.0, mx)
    ew = tl.exp(lw[None, :] - mu[:, None])  # [KP, NWCHP]
    es = tl.exp(ls - mu[:, None])  # [KP, NCHP]
    den = tl.sum(ew, axis=1) + tl.sum(es, axis=1)
    num = tl.sum(ew[:, :, None] * ow[None, :, :], axis=1) + tl.sum(
        tl.where((ls > float("-inf"))[:, :, None], es[:, :, None] * os_, 0.0), axis=1)  # [KP, BD]
    return tl.sum(gate[:, None] * (num / tl.where(den > 0, den, 1.0)[:, None]), axis=0)


@triton.jit
def _decode_merge_kernel(
    CV, CA, O_SPAN, L_SPAN, O_WIN, L_WIN, OUT,
    n_cand, s_ob, s_oh, Hq,
    K_VAL: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr, NCH: tl.constexpr, NWCH: tl.constexpr,
    NCHP: tl.constexpr, NWCHP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr,
    ALL_PARTS: tl.constexpr,
):
    """LSE merge of (b, h)'s window parts with each slot's span parts, then the search-value gate.

    ``ALL_PARTS``: every slot's parts are loaded as one [KP, NCHP(, BD)] block before any arithmetic,
    so all the part loads are in flight at once after the stream ends (otherwise slot by slot)."""
    grid_dependency(PDL)
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    d = tl.arange(0, BD)
    dmask = d < D
    # window parts -> (m_w, weighted sum, normaliser), kept unnormalised for the slot merges
    wc = tl.arange(0, NWCHP)
    wm = wc < NWCH
    lw = tl.load(L_WIN + bh * NWCH + wc, mask=wm, other=float("-inf"))
    ow = tl.load(O_WIN + (bh * NWCH + wc)[:, None] * D + d[None, :], mask=wm[:, None] & dmask[None, :], other=0.0)
    sc = tl.arange(0, NCHP)
    sm = sc < NCH
    kc = tl.arange(0, KP)
    if ALL_PARTS:  # issued before any arithmetic: every part load in flight at once
        ls_all, os_all = _all_slot_parts(L_SPAN, O_SPAN, bh, sc, sm, kc, d, dmask, K_VAL, NCH, D)
    # the gate: softmax over the top-K search values (-1e9 for an empty slot), one pass over the
    # candidates (no part load depends on it; slot by slot, each slot's loads still wait for the
    # previous slot's arithmetic, which is what ALL_PARTS removes)
    idx = tl.arange(0, NC)
    cm = idx < n_cand
    cv = tl.load(CV + bh * n_cand + idx, mask=cm, other=float("-inf"))
    ca = tl.load(CA + bh * n_cand + idx, mask=cm, other=-1)
    gate = tl.full([KP], float("-inf"), tl.float32)
    for jj in tl.static_range(K_VAL):
        mv, am = tl.max(cv, axis=0, return_indices=True)
        ma = tl.sum(tl.where(idx == am, ca, 0), axis=0)
        gate = tl.where(kc == jj, tl.where((mv > float("-inf")) & (ma >= 0), mv, -1e9), gate)
        cv = tl.where(idx == am, float("-inf"), cv)
    gate = tl.exp(gate - tl.max(gate, axis=0))
    gsum = tl.sum(gate, axis=0)
    if ALL_PARTS:
        out = _merge_all_slots(ls_all, os_all, lw, ow, gate)
    else:
        out = tl.full([BD], 0.0, tl.float32)
        for jj in tl.static_range(K_VAL):
            ls = tl.load(L_SPAN + (bh * K_VAL + jj) * NCH + sc, mask=sm, other=float("-inf"))
            # parts with lse = -inf may hold anything (the piece design leaves them unwritten)
            os_ = tl.load(O_SPAN + ((bh * K_VAL + jj) * NCH + sc)[:, None] * D + d[None, :],
                          mask=sm[:, None] & dmask[None, :], other=0.0)
            mx = tl.maximum(tl.max(lw, axis=0), tl.max(ls, axis=0))
            mu = tl.where(mx == float("-inf"), 0.0, mx)
            ew = tl.exp(lw - mu)
            es = tl.exp(ls - mu)
            den = tl.sum(ew, axis=0) + tl.sum(es, axis=0)
            num = tl.sum(ew[:, None] * ow, axis=0) + tl.sum(tl.where((ls > float("-inf"))[:, None], es[:, None] * os_, 0.0), axis=0)
            gj = tl.sum(tl.where(kc == jj, gate, 0.0), axis=0)
            out += gj * (num / tl.where(den > 0, den, 1.0))
    out = out / gsum
    tl.store(OUT + b * s_ob + h * s_oh + d, out.to(OUT.dtype.element_ty), mask=dmask)


def _finalize(
    cv: torch.Tensor, ca: torch.Tensor, pos: torch.Tensor, s0: torch.Tensor | None, consts: torch.Tensor, Lkv: int,
    window: int, forward: bool, has_mask: bool, pos_rows: bool, shape: tuple[int, int, int], NC: int,
    num_warps: int, pdl: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The search candidates merged into each (b, h)'s sorted top-K: (values, anchors, qstart, qend)."""
    B, Hq, K_VAL = shape
    vals = torch.empty(shape, dtype=torch.float32, device=cv.device)
    ancs, qs, qe = (torch.empty(shape, dtype=torch.int64, device=cv.device) for _ in range(3))
    _decode_finalize_kernel[(B * Hq,)](
        cv, ca, pos, s0 if s0 is not None else pos, consts, vals, ancs, qs, qe, cv.shape[3] * cv.shape[4], Lkv,
        window, Hq, NC=NC, K_VAL=K_VAL, KP=triton.next_power_of_2(K_VAL), HAS_MASK=has_mask, FWD=forward,
        HAS_W=window > 0, POS_ROWS=pos_rows, PDL=pdl, num_warps=num_warps, **pdl_launch(pdl),
    )
    return vals, ancs, qs, qe


def launch_decode(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    offs: torch.Tensor,
    mask: torch.Tensor | None,
    s0: torch.Tensor | None,
    consts: torch.Tensor,
    out: torch.Tensor,
    *,
    num_spans: int,
    window: int,
    forward: bool,
    max_span: int,
    mode: str,
    split_len: int,
    block_s: int,
    chunk: int,
    wchunk: int,
    block_n: int,
    block_nw: int,
    upcast: bool,
    precision: str,
    num_warps: int,
    union_warps: int,
    union_stages: int = 3,
    num_stages: int = 3,
    lane_max: bool = False,
    pos_rows: bool = False,
    small_warps: int = 4,
    pdl: bool = False,
    trace: torch.Tensor | None = None,
    maxnreg: int = 0,
    tma: bool = False,
    merge_all: bool = False,
    merge_warps: int = 0,
) -> None:
    """One decode step for queries [B, Hq, 1, D] against the full cache; writes ``out``.

    ``pos``: [1], the position of every row; with ``pos_rows``, [B] contiguous, row b's own
    position (each row's search, window and span bounds follow it; one launch set for the batch).

    ``mode``: "union" (spans of the R query heads of a KV head deduplicated, each key read once),
    "split" (every (head, slot) span streamed on its own in ``chunk``-key chunks from its start), or
    "piece" (the split stream cut at a global grid of ``chunk``-key pieces, its work list ordered by
    piece, so the heads that share keys read them together and the repeats come from L2;
    "piece-rows": the same work list in row order, kept to measure what the piece order gains), or
    "shared" (the global-grid pieces of each KV head's spans, each read once for up to 16 of the
    rows covering it). ``small_warps``: the warps of the finalize and merge kernels. ``pdl``: the
    search, finalize, shared and merge kernels are launched as programmatic dependents (Hopper):
    each lets the next one launch at its start and waits for the previous one before touching
    memory, so launch latency overlaps the previous kernel's tail.
    ``lane_max`` and ``num_stages``: the split stream's running max per key lane, and its
    software-pipelining depth; ``union_warps`` and ``union_stages``: those of the union and shared
    kernels; ``maxnreg`` (when nonzero): the shared kernel's register cap (more programs per SM);
    ``tma``: the shared kernel loads whole K / V blocks through TMA descriptors where the layout
    allows it (``_triton_common.tma_descriptor``; the last block of each piece by masked loads).
    ``merge_all``: the merge kernel of every design but "union" loads every slot's span parts at
    once (one [slots, parts, D] block) instead of slot by slot; ``merge_warps`` (when nonzero): its warps in place of
    ``small_warps``.
    ``trace`` ("shared"; CUDA only, for bench/kernels.py): an int64 buffer
    [programs, 3] that each program of the streaming kernel fills with its SM id and its start and
    end on the global nanosecond timer.
    """
    from secure_run.kernels._triton_search import launch_search

    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r}: expected one of {', '.join(DECODE_MODES)}")

    B, Hq, _, D = q2.shape
    G, Lkv = k.shape[1], k.shape[2]
    R = Hq // G
    assert pos.numel() == (B if pos_rows else 1), "decode positions: [1] shared, or [B] with pos_rows"
    n_stripes = offs.numel()
    n_splits = max(1, triton.cdiv(n_stripes, split_len))
    cv, ca = launch_search(
        q1, k, pos, offs, None, mask, s0, consts, num_spans=num_spans, window=window, forward=forward,
        n_splits=n_splits, final=False, split_len=split_len, block_s=block_s, upcast=upcast,
        precision=precision, num_warps=4, pos_rows=pos_rows, pdl=pdl,
    )
    n_cand = cv.shape[3] * cv.shape[4]
    nwch = max(1, triton.cdiv(window, wchunk))
    dev = q2.device
    o_win = torch.empty(B * Hq * nwch, D, dtype=torch.float32, device=dev)
    l_win = torch.empty(B * Hq * nwch, dtype=torch.float32, device=dev)
    BD = max(16, triton.next_power_of_2(D))
    NC = max(16, triton.next_power_of_2(n_cand))

    def spans() -> tuple[torch.Tensor, ...]:
        """(values, anchors, qstart, qend) [B, Hq, K]: the split candidates merged."""
        return _finalize(cv, ca, pos, s0, consts, Lkv, window, forward, mask is not None, pos_rows, (B, Hq, num_spans),
                         NC, small_warps, pdl)

    RP = max(16, triton.next_power_of_2(R))
    dummy = pos
    m_arg = mask if mask is not None else dummy
    strides = (q2.stride(0), q2.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    if mode == "union":
        KP = triton.next_power_of_2(num_spans)
        vals, ancs, qs, qe = spans()
        RK = R * num_spans
        RKP = max(16, triton.next_power_of_2(RK))
        maxp = triton.cdiv(RK * max_span, chunk) + RK
        po = torch.empty(B * G * maxp * RK, D, dtype=torch.float32, device=dev)
        pl = torch.empty(B * G * maxp * RK, dtype=torch.float32, device=dev)
        plan = torch.empty(B * G * 3 * RKP, dtype=torch.int64, device=dev)
        n_union = B * G * maxp
        _decode_union_kernel[(n_union + B * G * nwch,)](
            q2, k, v, pos, m_arg, qs, qe, po, pl, plan, o_win, l_win,
            Lkv, window, G, Hq, maxp, n_union, 1.0 / (D**0.5), *strides,
            R=R, RP=RP, RK=RK, RKP=RKP, D=D, BD=BD, K_VAL=num_spans, CH=chunk,
            BN=block_n, NWCH=nwch, WCHUNK=wchunk, BNW=block_nw, HAS_MASK=mask is not None, HAS_W=window > 0,
            UPCAST=upcast, PRECISION=precision, POS_ROWS=pos_rows, num_warps=union_warps, num_stages=union_stages,
        )
        _decode_union_merge_kernel[(B * Hq,)](
            vals, ancs, qs, qe, po, pl, plan, o_win, l_win, out, Hq, G, maxp, out.stride(0), out.stride(1),
            R=R, RK=RK, RKP=RKP, K_VAL=num_spans, KP=KP, NWCH=nwch, NWCHP=max(2, triton.next_power_of_2(nwch)),
            PB=max(2, min(16, triton.next_power_of_2(triton.cdiv(max_span, chunk) + 1))), CH=chunk, D=D, BD=BD,
            num_warps=4,
        )
        return
    if mode == "shared":
        nch = max(1, triton.cdiv(max_span, chunk)) + 1  # a span meets at most this many pieces
        o_span = torch.empty(B * Hq * num_spans * nch, D, dtype=torch.float32, device=dev)
        l_span = torch.empty(B * Hq * num_spans * nch, dtype=torch.float32, device=dev)
        n_shared = B * G * R * num_spans * nch
        _, _, qs, qe = spans()
        kd = tma_descriptor(k, block_n, BD) if tma and not upcast else None
        vd = tma_descriptor(v, block_n, BD) if kd is not None else None
        use_tma = kd is not None and vd is not None and k.stride() == v.stride()
        _decode_shared_kernel[(n_shared + B * G * nwch,)](
            q2, k, v, kd if use_tma else k, vd if use_tma else v, pos, m_arg, qs, qe, o_span, l_span, o_win, l_win,
            Lkv, window, G, Hq, n_shared, 1.0 / (D**0.5), *strides,
            R=R, RP=RP, KP=triton.next_power_of_2(num_spans), D=D, BD=BD, K_VAL=num_spans, NCH=nch, NWCH=nwch,
            PIECE=chunk, GR=16, WCHUNK=wchunk, BN=block_n, BNW=block_nw, HAS_MASK=mask is not None,
            HAS_W=window > 0, UPCAST=upcast, PRECISION=precision, POS_ROWS=pos_rows, PDL=pdl,
            TRACE=trace if trace is not None else pos, DO_TRACE=trace is not None, TMA=use_tma,
            num_warps=union_warps, num_stages=union_stages, **pdl_launch(pdl), **({"maxnreg": maxnreg} if maxnreg else {}),
        )
    elif mode in ("piece", "piece-rows"):
        nch = max(1, triton.cdiv(max_span, chunk)) + 1  # a span meets at most this many pieces
        o_span = torch.empty(B * Hq * num_spans * nch, D, dtype=torch.float32, device=dev)
        l_span = torch.empty(B * Hq * num_spans * nch, dtype=torch.float32, device=dev)
        RK = R * num_spans
        assert RK <= 65536, "piece work items pack the local row in 16 bits"
        cap = RK * nch
        _, _, qs, qe = spans()
        items = torch.empty(B * G * cap, dtype=torch.int64, device=dev)
        count = torch.empty(B * G, dtype=torch.int64, device=dev)
        RKP = triton.next_power_of_2(RK)
        nchp = triton.next_power_of_2(nch)
        eb = min(64, RKP * nchp)
        _decode_piece_plan_kernel[(B * G, RKP * nchp // eb)](
            qs, qe, items, count, l_span, cap,
            RK=RK, RKP=RKP, NCH=nch, NCHP=nchp, PIECE=chunk, EB=eb, BY_PIECE=mode == "piece", num_warps=4,
        )
        n_piece_progs = B * G * cap
        _decode_piece_kernel[(n_piece_progs + B * G * nwch,)](
            q2, k, v, pos, m_arg, qs, qe, items, count, o_span, l_span, o_win, l_win,
            Lkv, window, G, Hq, cap, n_piece_progs, 1.0 / (D**0.5), *strides,
            R=R, RP=RP, D=D, BD=BD, K_VAL=num_spans, NCH=nch, NWCH=nwch, PIECE=chunk, WCHUNK=wchunk,
            BN=block_n, BNW=block_nw, HAS_MASK=mask is not None, HAS_W=window > 0, UPCAST=upcast,
            PRECISION=precision, LANE_MAX=lane_max, POS_ROWS=pos_rows, num_warps=num_warps, num_stages=num_stages,
        )
    else:
        nch = max(1, triton.cdiv(max_span, chunk))
        o_span = torch.empty(B * Hq * num_spans * nch, D, dtype=torch.float32, device=dev)
        l_span = torch.empty(B * Hq * num_spans * nch, dtype=torch.float32, device=dev)
        n_span_progs = B * Hq * num_spans * nch
        _decode_attn_kernel[(n_span_progs + B * G * nwch,)](
            q2, k, v, pos, m_arg, s0 if s0 is not None else dummy, consts, cv, ca,
            o_span, l_span, o_win, l_win,
            Lkv, window, G, Hq, n_cand, n_span_progs, 1.0 / (D**0.5), *strides,
            R=R, RP=RP, D=D, BD=BD, K_VAL=num_spans, NC=NC, NCH=nch, NWCH=nwch,
            CHUNK=chunk, WCHUNK=wchunk, BN=block_n, BNW=block_nw, HAS_MASK=mask is not None, FWD=forward,
            HAS_W=window > 0, UPCAST=upcast, PRECISION=precision, LANE_MAX=lane_max, POS_ROWS=pos_rows,
            num_warps=num_warps, num_stages=num_stages,
        )
    _decode_merge_kernel[(B * Hq,)](
        cv, ca, o_span, l_span, o_win, l_win, out,
        n_cand, out.stride(0), out.stride(1), Hq,
        K_VAL=num_spans, KP=triton.next_power_of_2(num_spans), NC=NC, NCH=nch, NWCH=nwch,
        NCHP=max(2, triton.next_power_of_2(nch)),
        NWCHP=max(2, triton.next_power_of_2(nwch)), D=D, BD=BD, PDL=pdl, ALL_PARTS=merge_all,
        num_warps=merge_warps or small_warps, **pdl_launch(pdl),
    )
