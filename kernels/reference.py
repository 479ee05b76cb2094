"""Pure-PyTorch reference of Superlinear attention (spec/model.md section 3, exactly).

This is the CPU path of :func:`secure_run.kernels.superlinear_attention` and the oracle the
Triton kernels are tested against. It is memory-sane: queries are processed in blocks, and only
the candidate anchor keys, the window keys and the span keys of those queries are gathered (no
``[Lq, Lkv]`` logits), with the span keys streamed in chunks through an online softmax. Every query
row is computed independently, so ``cache_position`` may be any set of absolute positions (tests
use that to check a subset of rows of a long prefill). The stripe offsets and span extents follow
``params.position_mode`` (``exact`` or ``upstream-fp32``, see :mod:`secure_run.kernels.params`).

    >>> import torch
    >>> from secure_run.kernels.params import SpanParams
    >>> p = SpanParams(sw_index=2, num_spans=2, backward_factor=2.0, forward_factor=1.0,
    ...                span_power=0.5, inv_search_power_int=2)
    >>> q1, q2 = torch.randn(2, 1, 4, 40, 16).unbind(0)
    >>> k, v = torch.randn(2, 1, 2, 48, 16).unbind(0)
    >>> superlinear_attention_reference(q1, q2, k, v, torch.arange(40), p).shape
    torch.Size([1, 4, 40, 16])

Axis legend: B batch, Hq query heads, G = Hkv KV heads, R = Hq // Hkv heads per KV head, n queries
of the current block, S stripes (candidate anchors), k slots (num_spans), C span-chunk keys,
W window length, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from secure_run.kernels._schedule import first_valid_key, span_extent, stripe_offsets
from secure_run.kernels.params import SpanParams

#: soft cap on the number of gathered elements per query block (keeps CPU memory bounded)
_GATHER_BUDGET = 1 << 23
#: span keys processed per online-softmax step
_SPAN_CHUNK = 256
_NEG_GATE = -1e9


def _safe_max(m: torch.Tensor) -> torch.Tensor:
    """m with -inf replaced by 0, so exp(x - m) stays NaN-free for empty rows."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def _search_block(
    q1b: torch.Tensor,  # [B, G, R, n, D] compute dtype
    k: torch.Tensor,  # [B, G, Lkv, D]
    pb: torch.Tensor,  # [n] positions
    offs: torch.Tensor,  # [S] stripe offsets F(i)
    mask: torch.Tensor | None,  # [B, Lkv] bool
    params: SpanParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k anchors per query: (values [B,Hq,n,k], anchors [B,Hq,n,k] int64, -1 where none)."""
    B, G, R, n, _ = q1b.shape
    Lkv = k.shape[2]
    W = params.window_len
    nk = params.num_spans
    S = offs.numel()
    val = torch.full((B, G * R, n, nk), -math.inf, dtype=q1b.dtype, device=q1b.device)
    anc = torch.full((B, G * R, n, nk), -1, dtype=torch.int64, device=q1b.device)
    if S == 0:
        return val, anc
    A = pb[:, None] + 1 - offs[None, :]  # [n, S]
    ok = (A >= 0) & (A < Lkv) & (A <= pb[:, None] - W)  # anchors lie strictly before the window
    Ac = A.clamp(0, Lkv - 1)
    okb = ok[None].expand(B, n, S)
    if mask is not None:
        okb = okb & mask[:, Ac]
    Kg = k[:, :, Ac].to(q1b.dtype)  # [B, G, n, S, D]
    score = torch.einsum("bgrnd,bgnsd->bgrns", q1b, Kg).reshape(B, G * R, n, S)  # no 1/sqrt(D)
    score = score.masked_fill(~okb[:, None], -math.inf)
    kt = min(nk, S)
    top_v, top_i = score.topk(kt, dim=-1)  # [B, Hq, n, kt]
    top_a = A[None, None].expand(B, G * R, n, S).gather(-1, top_i)
    val[..., :kt] = top_v
    anc[..., :kt] = torch.where(torch.isinf(top_v), torch.full_like(top_a, -1), top_a)
    return val, anc


def _span_bounds(
    anc: torch.Tensor,  # [B, Hq, n, k]
    pb: torch.Tensor,  # [n]
    s0: torch.Tensor,  # [B]
    Lkv: int,
    params: SpanParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(qstart, qend) per slot, -1 for invalid slots (model.md section 3.5; extents in the position mode)."""
    W = params.window_len
    t = (pb[None, :] + 1 - s0[:, None]).clamp(min=0)  # [B, n]
    lb = span_extent(t, params.backward_factor, params.span_power, params.position_mode)[:, None, :, None]
    qs = torch.maximum(anc - lb, s0[:, None, None, None]).clamp(min=0)
    if params.forward_factor > 0:
        lf = span_extent(t, params.forward_factor, params.span_power, params.position_mode)[:, None, :, None]
        qe = torch.minimum(anc + lf, pb[None, None, :, None]).clamp(max=Lkv - 1)
        if W > 0:
            sw_start = (pb - W + 1).clamp(min=0)
            qe = torch.minimum(qe, sw_start[None, None, :, None] - 1)
    else:
        qe = anc
    bad = anc < 0
    return torch.where(bad, -1, qs), torch.where(bad, -1, qe)


def _window_block(
    q2b: torch.Tensor,  # [B, G, R, n, D] compute dtype, already scaled by 1/sqrt(D)
    k: torch.Tensor,
    v: torch.Tensor,
    pb: torch.Tensor,
    mask: torch.Tensor | None,
    W: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised window attention: (max [B,Hq,n], sum [B,Hq,n], acc [B,Hq,n,D])."""
    B, G, R, n, D = q2b.shape
    Lkv = k.shape[2]
    if W == 0:
        z = torch.zeros(B, G * R, n, dtype=q2b.dtype, device=q2b.device)
        return z - math.inf, z, torch.zeros(B, G * R, n, D, dtype=q2b.dtype, device=q2b.device)
    sw_start = (pb - W + 1).clamp(min=0)
    widx = sw_start[:, None] + torch.arange(W, device=pb.device)[None, :]  # [n, W]
    ok = (widx <= pb.clamp(max=Lkv - 1)[:, None])[None].expand(B, n, W)
    wc = widx.clamp(max=Lkv - 1)
    if mask is not None:
        ok = ok & mask[:, wc]
    logits = torch.einsum("bgrnd,bgnwd->bgrnw", q2b, k[:, :, wc].to(q2b.dtype))
    logits = logits.masked_fill(~ok[:, None, None], -math.inf)
    m = logits.amax(-1)
    p = torch.exp(logits - _safe_max(m)[..., None])
    vg = v[:, :, wc].to(q2b.dtype).masked_fill(~ok[:, None, :, :, None], 0.0)  # unread keys stay inert
    acc = torch.einsum("bgrnw,bgnwd->bgrnd", p, vg)
    return m.reshape(B, G * R, n), p.sum(-1).reshape(B, G * R, n), acc.reshape(B, G * R, n, D)


def _spans_block(
    q2h: torch.Tensor,  # [B, Hq, n, D] compute dtype, scaled
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,  # [B, Hq, n, k] first key of each span
    hi: torch.Tensor,  # [B, Hq, n, k] last key (hi < lo: empty)
    mask: torch.Tensor | None,
    R: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised per-slot span attention, streamed: (max, sum [B,Hq,n,k], acc [B,Hq,n,k,D])."""
    B, Hq, n, D = q2h.shape
    nk = lo.shape[-1]
    Lkv = k.shape[2]
    m = torch.full((B, Hq, n, nk), -math.inf, dtype=q2h.dtype, device=q2h.device)
    ssum = torch.zeros_like(m)
    acc = torch.zeros(B, Hq, n, nk, D, dtype=q2h.dtype, device=q2h.device)
    longest = int((hi - lo + 1).clamp(min=0).max().item()) if lo.numel() else 0
    if longest == 0:
        return m, ssum, acc
    C = min(_SPAN_CHUNK, longest)
    b_ix = torch.arange(B, device=k.device).view(B, 1, 1, 1, 1)
    g_ix = (torch.arange(Hq, device=k.device) // R).view(1, Hq, 1, 1, 1)
    step = torch.arange(C, device=k.device)
    for c0 in range(0, longest, C):
        idx = lo[..., None] + c0 + step  # [B, Hq, n, k, C]
        ok = idx <= hi[..., None]
        ic = idx.clamp(0, Lkv - 1)
        if mask is not None:
            ok = ok & mask[b_ix, ic]
        Kg = k[b_ix, g_ix, ic].to(q2h.dtype)  # [B, Hq, n, k, C, D]
        logits = torch.einsum("bhnd,bhnjcd->bhnjc", q2h, Kg).masked_fill(~ok, -math.inf)
        m_new = torch.maximum(m, logits.amax(-1))
        m_use = _safe_max(m_new)
        alpha = torch.exp(m - m_use)
        p = torch.exp(logits - m_use[..., None])
        ssum = ssum * alpha + p.sum(-1)
        vg = v[b_ix, g_ix, ic].to(q2h.dtype).masked_fill(~ok[..., None], 0.0)
        acc = acc * alpha[..., None] + torch.einsum("bhnjc,bhnjcd->bhnjd", p, vg)
        m = m_new
    return m, ssum, acc


def _block_size(per_query: int, device: torch.device) -> int:
    budget = _GATHER_BUDGET * (16 if device.type == "cuda" else 1)  # GPU oracle runs: bigger blocks
    return max(1, budget // max(per_query, 1))


@dataclass(frozen=True)
class SpanSearch:
    """Result of the span search, each [B, Hq, Lq, k] (slot j sorted by value, descending).

    Attributes:
        values: search scores Q1 . K[anchor] (compute dtype), -inf for an empty slot.
        anchors: anchor positions (int64), -1 for an empty slot.
        qstart: first key of the span (int64), -1 for an empty slot.
        qend: last key of the span (int64), -1 for an empty slot.
    """

    values: torch.Tensor
    anchors: torch.Tensor
    qstart: torch.Tensor
    qend: torch.Tensor


def span_search_reference(
    q1: torch.Tensor,
    k: torch.Tensor,
    cache_position: torch.Tensor,
    params: SpanParams,
    attention_mask: torch.Tensor | None = None,
) -> SpanSearch:
    """Span search (model.md sections 3.3-3.5): top-k anchors and their span bounds.

    Args:
        q1: search queries [B, Hq, Lq, D].
        k: keys [B, Hkv, Lkv, D].
        cache_position: absolute query positions [Lq].
        params: span hyper-parameters.
        attention_mask: [B, Lkv] (nonzero = valid) or None.
    """
    B, Hq, Lq, D = q1.shape
    G, Lkv = k.shape[1], k.shape[2]
    R = Hq // G
    cd = torch.float64 if q1.dtype == torch.float64 else torch.float32
    dev = q1.device
    pos = cache_position.to(device=dev, dtype=torch.int64)
    mask = None if attention_mask is None else attention_mask.to(dev) != 0
    s0 = first_valid_key(mask, B, dev)
    nk = params.num_spans
    parts: list[tuple[torch.Tensor, ...]] = []
    if Lq:
        offs = stripe_offsets(params, int(pos.max().item()) + 1, dev)
        nb = _block_size(B * (G * offs.numel() * (D + R) + 1), dev)
        for a in range(0, Lq, nb):
            pb = pos[a : a + nb]
            q1b = q1[:, :, a : a + nb].to(cd).reshape(B, G, R, pb.numel(), D)
            val, anc = _search_block(q1b, k, pb, offs, mask, params)
            qs, qe = _span_bounds(anc, pb, s0, Lkv, params)
            parts.append((val, anc, qs, qe))
    if not parts:
        e = torch.empty(B, Hq, 0, nk, dtype=torch.int64, device=dev)
        return SpanSearch(e.to(cd), e, e, e)
    val, anc, qs, qe = (torch.cat(x, dim=2) for x in zip(*parts))
    return SpanSearch(val, anc, qs, qe)


def span_attention_reference(
    q2: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_position: torch.Tensor,
    search: SpanSearch,
    params: SpanParams,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-slot attention over (span U window) and the softmax gate (model.md 3.6-3.7).

    Args:
        q2: attention queries [B, Hq, Lq, D].
        k: keys [B, Hkv, Lkv, D].
        v: values [B, Hkv, Lkv, D].
        cache_position: absolute query positions [Lq].
        search: the span search result for these queries.
        params: span hyper-parameters (window length).
        attention_mask: [B, Lkv] (nonzero = valid) or None.

    Returns:
        [B, Hq, Lq, D] in q2's dtype.
    """
    B, Hq, Lq, D = q2.shape
    G, Lkv = k.shape[1], k.shape[2]
    R = Hq // G
    cd = torch.float64 if q2.dtype == torch.float64 else torch.float32
    dev = q2.device
    out = torch.empty(B, Hq, Lq, D, dtype=q2.dtype, device=dev)
    pos = cache_position.to(device=dev, dtype=torch.int64)
    mask = None if attention_mask is None else attention_mask.to(dev) != 0
    W = params.window_len
    nk = params.num_spans
    scale = 1.0 / math.sqrt(D)
    nb = _block_size(B * (D + 1) * (2 * G * W + 2 * Hq * nk * _SPAN_CHUNK), dev)
    for a in range(0, Lq, nb):
        b = min(Lq, a + nb)
        n = b - a
        pb = pos[a:b]
        q2b = q2[:, :, a:b].to(cd).reshape(B, G, R, n, D) * scale
        qs, qe = search.qstart[:, :, a:b], search.qend[:, :, a:b]
        anc, val = search.anchors[:, :, a:b], search.values[:, :, a:b].to(cd)
        # attention over span U window, as an LSE merge of the two disjoint parts
        m_w, l_w, o_w = _window_block(q2b, k, v, pb, mask, W)
        lo = qs.clamp(min=0)
        hi = torch.where(qe >= 0, qe.clamp(max=Lkv - 1), lo - 1)
        m_s, l_s, o_s = _spans_block(q2b.reshape(B, Hq, n, D), k, v, lo, hi, mask, R)
        m_use = _safe_max(torch.maximum(m_w[..., None], m_s))
        a_w = torch.exp(m_w[..., None] - m_use)
        a_s = torch.exp(m_s - m_use)
        den = a_w * l_w[..., None] + a_s * l_s
        num = a_w[..., None] * o_w[:, :, :, None, :] + a_s[..., None] * o_s
        o_j = torch.where(den[..., None] > 0, num / den.clamp(min=torch.finfo(cd).tiny)[..., None], 0.0)
        # softmax gate over the raw search scores (empty slots -> -1e9: uniform if all empty)
        gate = torch.softmax(torch.where(anc < 0, torch.full_like(val, _NEG_GATE), val), dim=-1)
        out[:, :, a:b] = (gate[..., None] * o_j).sum(-2).to(q2.dtype)
    return out


def superlinear_attention_reference(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_position: torch.Tensor,
    params: SpanParams,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Superlinear attention, straight from spec/model.md section 3.10, computed block by block.

    Args:
        q1: search queries [B, Hq, Lq, D].
        q2: attention queries [B, Hq, Lq, D].
        k: keys [B, Hkv, Lkv, D] (a static cache: nothing after a query's position is read).
        v: values [B, Hkv, Lkv, D].
        cache_position: absolute position of each query [Lq] (int).
        params: the span hyper-parameters.
        attention_mask: [B, Lkv], nonzero = valid key, or None.

    Returns:
        [B, Hq, Lq, D] in q2's dtype. Arithmetic is float32 (float64 for float64 inputs).
    """
    search = span_search_reference(q1, k, cache_position, params, attention_mask)
    return span_attention_reference(q2, k, v, cache_position, search, params, attention_mask)
