"""Prefill / chunked prefill in Triton: sorted (query, head, slot) pair tiles on tensor cores.

Every (query x, head r of the KV head, slot j) is a *pair* with one contiguous key range: slots
j < k are the spans [qstart, qend], slot k is the sliding window [q - W + 1, q]. For one KV head,
all pairs of the chunk are sorted by (start key block, end key); runs of BP consecutive pairs
then cover almost the same keys (about 95% of the computed tile is useful at the released shapes,
on random data), so each tile is an ordinary flash-attention loop over [min start, max end]:
``tl.dot`` of the gathered query rows against shared K/V blocks, with a per-row range mask only on
the blocks at either end that some row does not fully cover (the run in between, from the largest
start to the smallest end, loads unmasked, through TMA where the layout allows it).
Each pair writes its normalised partial output and log-sum-exp; the merge kernel LSE-merges the
window into each span and applies the softmax gate (model.md 3.6-3.7).

Kernels: ``_pair_attn_kernel`` grid (n_tiles, B * Hkv); ``_merge_kernel`` grid (B * Hq, Lq / BM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import tma_descriptor

_LOG2E = 1.4426950408889634


@triton.jit
def _pair_block(
    acc, m_i, l_i, q, k0, lo, hi, t_hi, k_base, v_base, s_kl, s_vl, KD, VD, rk, rv, MASK_B, qk_scale, d, dmask,
    BN: tl.constexpr, RANGED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One BN-key block of a pair tile's online softmax (base-2 domain: m_i and the scores are in
    log2 units, ``qk_scale`` = sm_scale * log2(e)).

    RANGED: the block may hold keys outside some row's [lo, hi] or past ``t_hi`` (range mask and
    masked loads); otherwise every key of the block is inside every valid row's range and the loads
    are unmasked (TMA: through the K / V tensor descriptors, rows ``rk + k0`` / ``rv + k0``).
    """
    kk = k0 + tl.arange(0, BN)
    if RANGED:
        km = kk <= t_hi
        if EVEN_D:
            lm = km[:, None]
        else:
            lm = km[:, None] & dmask[None, :]
        kt = tl.load(k_base + kk[:, None] * s_kl + d[None, :], mask=lm, other=0.0)
        vt = tl.load(v_base + kk[:, None] * s_vl + d[None, :], mask=lm, other=0.0)
    elif TMA:
        kt = KD.load([(rk + k0).to(tl.int32), 0])
        vt = VD.load([(rv + k0).to(tl.int32), 0])
    elif EVEN_D:
        kt = tl.load(k_base + kk[:, None] * s_kl + d[None, :])
        vt = tl.load(v_base + kk[:, None] * s_vl + d[None, :])
    else:
        kt = tl.load(k_base + kk[:, None] * s_kl + d[None, :], mask=dmask[None, :], other=0.0)
        vt = tl.load(v_base + kk[:, None] * s_vl + d[None, :], mask=dmask[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
    if RANGED:
        s = tl.where((kk[None, :] >= lo[:, None]) & (kk[None, :] <= hi[:, None]), s, float("-inf"))
    if HAS_MASK:
        s = tl.where((tl.load(MASK_B + kk, mask=kk <= t_hi, other=0) != 0)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    if RANGED or HAS_MASK:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _pair_attn_kernel(
    Q, K, V, KD, VD, MASK, PAIR, LO, HI, O_PART, L_PART,
    n_pairs, Lq, Lkv, G, qk_scale,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    R: tl.constexpr, NSLOT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, PHASES: tl.constexpr, TMA: tl.constexpr,
):
    """One tile of BP sorted pairs over the keys [min lo, max hi] of its valid rows.

    PHASES: the blocks that lie inside every valid row's range (from max lo to min hi) run without
    range masks or load masks; only the blocks before and after them are masked. Rows that are not
    valid (padding, empty slots) get o = 0 and lse = -inf either way.
    """
    EVEN_D: tl.constexpr = D == BD
    tile = tl.program_id(0)
    bg = tl.program_id(1).to(tl.int64)
    b = bg // G
    g = bg % G
    rows = tile * BP + tl.arange(0, BP)
    rmask = rows < n_pairs
    meta = bg * n_pairs + rows
    pid = tl.load(PAIR + meta, mask=rmask, other=0).to(tl.int64)
    lo = tl.load(LO + meta, mask=rmask, other=1 << 40)
    hi = tl.load(HI + meta, mask=rmask, other=-1)
    valid = rmask & (hi >= lo) & (lo >= 0)
    t_lo = tl.min(tl.where(valid, lo, 1 << 40), axis=0)
    t_hi = tl.max(tl.where(valid, hi, -1), axis=0)
    r = pid // (Lq * NSLOT)
    x = (pid // NSLOT) % Lq
    d = tl.arange(0, BD)
    dmask = d < D
    q = tl.load(Q + b * s_qb + (g * R + r)[:, None] * s_qh + x[:, None] * s_ql + d[None, :],
                mask=valid[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BP], float("-inf"), tl.float32)
    l_i = tl.full([BP], 0.0, tl.float32)
    acc = tl.full([BP, BD], 0.0, tl.float32)
    k_base = K + b * s_kb + g * s_kh
    v_base = V + b * s_vb + g * s_vh
    mask_b = MASK + b * Lkv
    rk = b * (s_kb // s_kl) + g * (s_kh // s_kl)
    rv = b * (s_vb // s_vl) + g * (s_vh // s_vl)
    if PHASES:
        f_lo = tl.max(tl.where(valid, lo, -1), axis=0)
        f_hi = tl.min(tl.where(valid, hi, 1 << 40), axis=0)
        b0 = t_lo + (tl.maximum(f_lo - t_lo, 0) + BN - 1) // BN * BN  # first block inside every range
        c0 = b0 + tl.maximum(f_hi + 1 - b0, 0) // BN * BN  # first block after the inside run
    else:
        b0 = t_hi + 1
        c0 = t_hi + 1
    for k0 in range(t_lo, b0, BN):
        acc, m_i, l_i = _pair_block(acc, m_i, l_i, q, k0, lo, hi, t_hi, k_base, v_base, s_kl, s_vl, KD, VD, rk, rv,
                                    mask_b, qk_scale, d, dmask, BN, True, EVEN_D, TMA, HAS_MASK, UPCAST, PRECISION)
    for k0 in range(b0, c0, BN):
        acc, m_i, l_i = _pair_block(acc, m_i, l_i, q, k0, lo, hi, t_hi, k_base, v_base, s_kl, s_vl, KD, VD, rk, rv,
                                    mask_b, qk_scale, d, dmask, BN, False, EVEN_D, TMA, HAS_MASK, UPCAST, PRECISION)
    for k0 in range(c0, t_hi + 1, BN):
        acc, m_i, l_i = _pair_block(acc, m_i, l_i, q, k0, lo, hi, t_hi, k_base, v_base, s_kl, s_vl, KD, VD, rk, rv,
                                    mask_b, qk_scale, d, dmask, BN, True, EVEN_D, TMA, HAS_MASK, UPCAST, PRECISION)
    has = valid & (l_i > 0)
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    out_row = bg * (R * Lq * NSLOT) + pid
    tl.store(O_PART + out_row[:, None] * D + d[None, :], o, mask=rmask[:, None] & dmask[None, :])
    tl.store(L_PART + out_row, lse, mask=rmask)


@triton.jit
def _merge_kernel(
    O_PART, L_PART, VALS, ANCS, OUT,
    Lq, Hq, s_ob, s_oh, s_ol,
    R: tl.constexpr, K_VAL: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    G = Hq // R
    g = h // R
    r = h % R
    xs = tl.program_id(1) * BM + tl.arange(0, BM)
    xm = xs < Lq
    d = tl.arange(0, BD)
    dmask = d < D
    NSLOT: tl.constexpr = K_VAL + 1
    prow = (b * G + g) * (R * Lq * NSLOT) + (r * Lq + xs) * NSLOT  # pair row of slot 0
    lw = tl.load(L_PART + prow + K_VAL, mask=xm, other=float("-inf"))
    ow = tl.load(O_PART + (prow + K_VAL)[:, None] * D + d[None, :], mask=xm[:, None] & dmask[None, :], other=0.0)
    sbase = (bh * Lq + xs) * K_VAL
    # gate: softmax over the search values, empty slots -> -1e9
    gmax = tl.full([BM], float("-inf"), tl.float32)
    for j in tl.static_range(K_VAL):
        aj = tl.load(ANCS + sbase + j, mask=xm, other=-1)
        vj = tl.where(aj >= 0, tl.load(VALS + sbase + j, mask=xm, other=0.0), -1e9)
        gmax = tl.maximum(gmax, vj)
    gsum = tl.full([BM], 0.0, tl.float32)
    out = tl.full([BM, BD], 0.0, tl.float32)
    for j in tl.static_range(K_VAL):
        aj = tl.load(ANCS + sbase + j, mask=xm, other=-1)
        vj = tl.where(aj >= 0, tl.load(VALS + sbase + j, mask=xm, other=0.0), -1e9)
        gj = tl.exp(vj - gmax)
        gsum += gj
        ls = tl.load(L_PART + prow + j, mask=xm, other=float("-inf"))
        os_ = tl.load(O_PART + (prow + j)[:, None] * D + d[None, :], mask=xm[:, None] & dmask[None, :], other=0.0)
        mx = tl.maximum(lw, ls)
        mu = tl.where(mx == float("-inf"), 0.0, mx)
        ew = tl.exp(lw - mu)
        es = tl.exp(ls - mu)
        den = ew + es
        oj = (ew[:, None] * ow + es[:, None] * os_) / tl.where(den > 0, den, 1.0)[:, None]
        out += gj[:, None] * oj
    out = out / gsum[:, None]
    tl.store(OUT + b * s_ob + h * s_oh + xs[:, None] * s_ol + d[None, :], out.to(OUT.dtype.element_ty),
             mask=xm[:, None] & dmask[None, :])


def sort_pairs(
    qs: torch.Tensor, qe: torch.Tensor, pos: torch.Tensor, window: int, R: int, block_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs of one chunk sorted per (b, KV head) by (start key block, end key).

    Args:
        qs, qe: span bounds [B, Hq, Lq, K] (-1 = empty).
        pos: query positions [Lq].
        window: W (0: no window pairs are valid).
        R: query heads per KV head.
        block_n: key block size used for the start bucket.

    Returns:
        (pair ids int32, lo int64, hi int64), each [B, Hkv, R * Lq * (K + 1)], in sorted order; an
        empty pair has lo > hi and sorts last.
    """
    B, Hq, Lq, nk = qs.shape
    G = Hq // R
    if window > 0:
        wlo = (pos - window + 1).clamp(min=0)
        whi = pos
    else:
        wlo = pos + 1
        whi = pos
    lo = torch.cat([qs, wlo.view(1, 1, Lq, 1).expand(B, Hq, Lq, 1)], dim=-1).reshape(B, G, -1)
    hi = torch.cat([qe, whi.view(1, 1, Lq, 1).expand(B, Hq, Lq, 1)], dim=-1).reshape(B, G, -1)
    valid = (hi >= lo) & (lo >= 0)
    key = torch.where(valid, (lo // block_n) * (1 << 32) + hi, torch.iinfo(torch.int64).max)
    key, order = torch.sort(key, dim=-1, stable=True)
    lo = torch.gather(lo, -1, order)
    hi = torch.gather(hi, -1, order)
    empty = key == torch.iinfo(torch.int64).max
    lo = torch.where(empty, 1 << 40, lo)
    hi = torch.where(empty, -1, hi)
    return order.to(torch.int32), lo, hi


def launch_prefill_attention(
    q2: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor | None,
    values: torch.Tensor,
    anchors: torch.Tensor,
    qs: torch.Tensor,
    qe: torch.Tensor,
    out: torch.Tensor,
    *,
    window: int,
    block_p: int,
    block_n: int,
    block_m: int,
    upcast: bool,
    precision: str,
    num_warps: int,
    num_stages: int,
    phases: bool = True,
    tma: bool = False,
) -> None:
    """Span/window pair attention plus merge for one chunk; writes ``out`` [B, Hq, Lq, D].

    ``phases``: unmasked blocks where a tile's rows all cover the keys; ``tma``: those blocks load
    K / V through TMA descriptors where the layout allows it (see ``tma_descriptor``).
    """
    B, Hq, Lq, D = q2.shape
    G = k.shape[1]
    R = Hq // G
    nk = qs.shape[-1]
    nslot = nk + 1
    n_pairs = R * Lq * nslot
    pair, lo, hi = sort_pairs(qs, qe, pos, window, R, block_n)
    o_part = torch.empty(B, G, n_pairs, D, dtype=torch.float32, device=q2.device)
    l_part = torch.empty(B, G, n_pairs, dtype=torch.float32, device=q2.device)
    BD = max(16, triton.next_power_of_2(D))
    kd = tma_descriptor(k, block_n, BD) if tma and phases and not upcast else None
    vd = tma_descriptor(v, block_n, BD) if kd is not None else None
    use_tma = kd is not None and vd is not None
    _pair_attn_kernel[(triton.cdiv(n_pairs, block_p), B * G)](
        q2, k, v, kd if use_tma else k, vd if use_tma else v, mask if mask is not None else pos, pair, lo, hi,
        o_part, l_part, n_pairs, Lq, k.shape[2], G, _LOG2E / (D**0.5),
        q2.stride(0), q2.stride(1), q2.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        R=R, NSLOT=nslot, D=D, BD=BD, BP=block_p, BN=block_n, HAS_MASK=mask is not None, UPCAST=upcast,
        PRECISION=precision, PHASES=phases, TMA=use_tma, num_warps=num_warps, num_stages=num_stages,
    )
    _merge_kernel[(B * Hq, triton.cdiv(Lq, block_m))](
        o_part, l_part, values, anchors, out,
        Lq, Hq, out.stride(0), out.stride(1), out.stride(2),
        R=R, K_VAL=nk, D=D, BD=BD, BM=block_m, num_warps=4,
    )
