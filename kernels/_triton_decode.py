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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import span_bounds
from secure_run.kernels._triton_search import select_topk


@triton.jit
def _decode_attn_kernel(
    Q2, K, V, POS, MASK, S0, CONSTS, CV, CA, O_SPAN, L_SPAN, O_WIN, L_WIN,
    Lkv, W, G, Hq, n_cand, n_span_progs, sm_scale,
    s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, K_VAL: tl.constexpr,
    NC: tl.constexpr, NCH: tl.constexpr, NWCH: tl.constexpr, CHUNK: tl.constexpr, WCHUNK: tl.constexpr,
    BN: tl.constexpr, BNW: tl.constexpr, HAS_MASK: tl.constexpr, FWD: tl.constexpr, HAS_W: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pos = tl.load(POS).to(tl.int64)
    d = tl.arange(0, BD)
    dmask = d < D
    if pid < n_span_progs:
        c = pid % NCH
        rest = pid // NCH
        j = rest % K_VAL
        bh = (rest // K_VAL).to(tl.int64)
        b = bh // Hq
        h = bh % Hq
        g = h // R
        s0 = 0
        if HAS_MASK:
            s0 = tl.load(S0 + b)
        _, a = select_topk(CV, CA, bh * n_cand, j, NC, n_cand, K_VAL)
        qs, qe = span_bounds(a, pos, s0, Lkv, W, CONSTS, FWD, HAS_W)
        lo = tl.maximum(qs, 0) + c * CHUNK
        hi = tl.minimum(qe, lo + CHUNK - 1)
        hi = tl.where(a >= 0, hi, -1)
        q = tl.load(Q2 + b * s_qb + h * s_qh + d, mask=dmask, other=0.0).to(tl.float32) * sm_scale
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.full([BD], 0.0, tl.float32)
        cols = tl.arange(0, BN)
        k_base = K + b * s_kb + g * s_kh
        v_base = V + b * s_vb + g * s_vh
        for k0 in range(lo, hi + 1, BN):
            kk = k0 + cols
            km = kk <= hi
            if HAS_MASK:
                km = km & (tl.load(MASK + b * Lkv + kk, mask=km, other=0) != 0)
            kt = tl.load(k_base + kk[:, None] * s_kl + d[None, :], mask=km[:, None] & dmask[None, :], other=0.0)
            s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)
            s = tl.where(km, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            vt = tl.load(v_base + kk[:, None] * s_vl + d[None, :], mask=km[:, None] & dmask[None, :], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
            m_i = m_new
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        row = (bh * K_VAL + j) * NCH + c
        tl.store(O_SPAN + row * D + d, o, mask=dmask)
        tl.store(L_SPAN + row, lse)
    else:
        wid = pid - n_span_progs
        c = wid % NWCH
        bg = (wid // NWCH).to(tl.int64)
        b = bg // G
        g = bg % G
        rows = tl.arange(0, RP)
        rmask = rows < R
        heads = g * R + rows
        q = tl.load(Q2 + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lo = tl.maximum(pos - W + 1, 0) + c * WCHUNK
        hi = tl.minimum(pos, lo + WCHUNK - 1)
        if not HAS_W:
            hi = lo - 1
        m_w = tl.full([RP], float("-inf"), tl.float32)
        l_w = tl.full([RP], 0.0, tl.float32)
        acc_w = tl.full([RP, BD], 0.0, tl.float32)
        cols_w = tl.arange(0, BNW)
        k_base = K + b * s_kb + g * s_kh
        v_base = V + b * s_vb + g * s_vh
        for k0 in range(lo, hi + 1, BNW):
            kk = k0 + cols_w
            km = kk <= hi
            if HAS_MASK:
                km = km & (tl.load(MASK + b * Lkv + kk, mask=km, other=0) != 0)
            kt = tl.load(k_base + kk[:, None] * s_kl + d[None, :], mask=km[:, None] & dmask[None, :], other=0.0)
            vt = tl.load(v_base + kk[:, None] * s_vl + d[None, :], mask=km[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * sm_scale
            s = tl.where(km[None, :], s, float("-inf"))
            m_new = tl.maximum(m_w, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_w - m_use)
            p = tl.exp(s - m_use[:, None])
            l_w = l_w * alpha + tl.sum(p, axis=1)
            acc_w = acc_w * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_w = m_new
        has = l_w > 0
        o = acc_w / tl.where(has, l_w, 1.0)[:, None]
        lse = tl.where(has, m_w + tl.log(tl.where(has, l_w, 1.0)), float("-inf"))
        row = (b * Hq + heads) * NWCH + c
        tl.store(O_WIN + row[:, None] * D + d[None, :], o, mask=rmask[:, None] & dmask[None, :])
        tl.store(L_WIN + row, lse, mask=rmask)


@triton.jit
def _decode_merge_kernel(
    CV, CA, O_SPAN, L_SPAN, O_WIN, L_WIN, OUT,
    n_cand, s_ob, s_oh, Hq,
    K_VAL: tl.constexpr, NC: tl.constexpr, NCH: tl.constexpr, NWCH: tl.constexpr, NCHP: tl.constexpr,
    NWCHP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
):
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
    gmax = float("-inf")
    for jj in tl.static_range(K_VAL):
        vj, aj = select_topk(CV, CA, bh * n_cand, jj, NC, n_cand, K_VAL)
        gmax = tl.maximum(gmax, tl.where(aj >= 0, vj, -1e9))
    gsum = 0.0
    out = tl.full([BD], 0.0, tl.float32)
    for jj in tl.static_range(K_VAL):
        vj, aj = select_topk(CV, CA, bh * n_cand, jj, NC, n_cand, K_VAL)
        gj = tl.exp(tl.where(aj >= 0, vj, -1e9) - gmax)
        gsum += gj
        ls = tl.load(L_SPAN + (bh * K_VAL + jj) * NCH + sc, mask=sm, other=float("-inf"))
        os_ = tl.load(O_SPAN + ((bh * K_VAL + jj) * NCH + sc)[:, None] * D + d[None, :],
                      mask=sm[:, None] & dmask[None, :], other=0.0)
        mx = tl.maximum(tl.max(lw, axis=0), tl.max(ls, axis=0))
        mu = tl.where(mx == float("-inf"), 0.0, mx)
        ew = tl.exp(lw - mu)
        es = tl.exp(ls - mu)
        den = tl.sum(ew, axis=0) + tl.sum(es, axis=0)
        num = tl.sum(ew[:, None] * ow, axis=0) + tl.sum(es[:, None] * os_, axis=0)
        out += gj * (num / tl.where(den > 0, den, 1.0))
    out = out / gsum
    tl.store(OUT + b * s_ob + h * s_oh + d, out.to(OUT.dtype.element_ty), mask=dmask)


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
    split_len: int,
    block_s: int,
    chunk: int,
    wchunk: int,
    block_n: int,
    block_nw: int,
    upcast: bool,
    precision: str,
    num_warps: int,
) -> None:
    """One decode step for queries [B, Hq, 1, D] against the full cache; writes ``out``."""
    from secure_run.kernels._triton_search import launch_search

    B, Hq, _, D = q2.shape
    G, Lkv = k.shape[1], k.shape[2]
    R = Hq // G
    n_stripes = offs.numel()
    n_splits = max(1, triton.cdiv(n_stripes, split_len))
    cv, ca = launch_search(
        q1, k, pos, offs, None, mask, s0, consts, num_spans=num_spans, window=window, forward=forward,
        n_splits=n_splits, final=False, split_len=split_len, block_s=block_s, upcast=upcast,
        precision=precision, num_warps=4,
    )
    n_cand = cv.shape[3] * cv.shape[4]
    nch = max(1, triton.cdiv(max_span, chunk))
    nwch = max(1, triton.cdiv(window, wchunk))
    dev = q2.device
    o_span = torch.empty(B * Hq * num_spans * nch, D, dtype=torch.float32, device=dev)
    l_span = torch.empty(B * Hq * num_spans * nch, dtype=torch.float32, device=dev)
    o_win = torch.empty(B * Hq * nwch, D, dtype=torch.float32, device=dev)
    l_win = torch.empty(B * Hq * nwch, dtype=torch.float32, device=dev)
    n_span_progs = B * Hq * num_spans * nch
    BD = max(16, triton.next_power_of_2(D))
    NC = max(16, triton.next_power_of_2(n_cand))
    dummy = pos
    _decode_attn_kernel[(n_span_progs + B * G * nwch,)](
        q2, k, v, pos, mask if mask is not None else dummy, s0 if s0 is not None else dummy, consts, cv, ca,
        o_span, l_span, o_win, l_win,
        Lkv, window, G, Hq, n_cand, n_span_progs, 1.0 / (D**0.5),
        q2.stride(0), q2.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        R=R, RP=max(16, triton.next_power_of_2(R)), D=D, BD=BD, K_VAL=num_spans, NC=NC, NCH=nch, NWCH=nwch,
        CHUNK=chunk, WCHUNK=wchunk, BN=block_n, BNW=block_nw, HAS_MASK=mask is not None, FWD=forward,
        HAS_W=window > 0, UPCAST=upcast, PRECISION=precision, num_warps=num_warps,
    )
    _decode_merge_kernel[(B * Hq,)](
        cv, ca, o_span, l_span, o_win, l_win, out,
        n_cand, out.stride(0), out.stride(1), Hq,
        K_VAL=num_spans, NC=NC, NCH=nch, NWCH=nwch, NCHP=max(2, triton.next_power_of_2(nch)),
        NWCHP=max(2, triton.next_power_of_2(nwch)), D=D, BD=BD, num_warps=4,
    )
