"""Triton Mamba-2: decode step (after ``in_proj``, before ``out_proj``; three launches) and the
chunked SSD scan of prefill (three launches, at the end of this file).

1. ``_conv_step``: every conv channel once (grid over channel blocks): shift the conv state, add
   the new input, depthwise conv + bias, SiLU (rounded to the model dtype as ``F.conv1d`` + SiLU in
   that dtype). Each channel is owned by one program, so the in-place state update has no race.
2. ``_ssm_step``: grid (batch, head, P block): ``dt = softplus(dt_raw + dt_bias)`` clamped,
   ``S = exp(dt A) S + dt x B^T`` (fp32, in place), ``y = S C + D x``, gate ``y * silu(z)``.
3. ``_gated_norm``: grid (batch, group): RMSNorm over each group, times the norm weight, cast to
   the model dtype (the input of ``out_proj``).

Shapes follow :func:`secure_run.kernels.model_reference.mamba_decode_step_reference`. Grids depend
on shapes only (CUDA-graph safe); loads are converted to fp32 right after ``tl.load``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import next_pow2

__all__ = ["causal_conv1d_triton", "mamba_decode_step_triton", "ssd_scan_triton"]


@triton.jit
def _conv_step(proj_ptr, state_ptr, w_ptr, b_ptr, act_ptr, C, proj_stride, col0,
               KW: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < KW
    st_ptrs = state_ptr + b * C * KW + offs_c[:, None].to(tl.int64) * KW + offs_k[None, :]
    # window = [state[1..K-1], new]: load state shifted by one, the last column is the new input
    shifted = tl.load(st_ptrs + 1, mask=mc[:, None] & (offs_k[None, :] < KW - 1), other=0.0)
    new = tl.load(proj_ptr + b * proj_stride + col0 + offs_c, mask=mc, other=0.0)
    window = tl.where(offs_k[None, :] == KW - 1, new[:, None].to(shifted.dtype), shifted)
    w = tl.load(w_ptr + offs_c[:, None].to(tl.int64) * KW + offs_k[None, :], mask=mc[:, None] & mk[None, :],
                other=0.0).to(tl.float32)
    acc = tl.sum(window.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)
    tl.debug_barrier()  # every thread has read the old state before anyone overwrites it
    tl.store(st_ptrs, window, mask=mc[:, None] & mk[None, :])
    r = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
    silu = r / (1.0 + tl.exp(-r))
    tl.store(act_ptr + b * C + offs_c, silu.to(act_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _ssm_step(act_ptr, proj_ptr, state_ptr, dt_bias_ptr, a_log_ptr, d_ptr, y_ptr, C, proj_stride, H, d_inner,
              dt_min, dt_max, P: tl.constexpr, N: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = offs_p < P
    offs_n = tl.arange(0, BLOCK_N)
    mn = offs_n < N
    g = h // R
    x = tl.load(act_ptr + b * C + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
    bv = tl.load(act_ptr + b * C + d_inner + g * N + offs_n, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(act_ptr + b * C + d_inner + G * N + g * N + offs_n, mask=mn, other=0.0).to(tl.float32)
    raw = tl.load(proj_ptr + b * proj_stride + d_inner + C + h).to(tl.float32) + tl.load(dt_bias_ptr + h)
    ex = tl.exp(tl.minimum(raw, 20.0))
    sp = tl.where(ex < 1e-4, ex * (1.0 - 0.5 * ex), tl.log(1.0 + ex))  # log1p(exp(raw))
    dt = tl.where(raw > 20.0, raw, sp)  # softplus with torch's threshold 20
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    a = -tl.exp(tl.load(a_log_ptr + h))
    da = tl.exp(dt * a)
    s_ptrs = state_ptr + ((b * H + h) * P + offs_p[:, None]) * N + offs_n[None, :]
    m2 = mp[:, None] & mn[None, :]
    s = tl.load(s_ptrs, mask=m2, other=0.0)
    s = s * da + (x * dt)[:, None] * bv[None, :]
    tl.store(s_ptrs, s, mask=m2)
    y = tl.sum(s * cv[None, :], axis=1) + tl.load(d_ptr + h) * x
    z = tl.load(proj_ptr + b * proj_stride + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
    y = y * (z / (1.0 + tl.exp(-z)))
    tl.store(y_ptr + b * d_inner + h * P + offs_p, y, mask=mp)


@triton.jit
def _gated_norm(y_ptr, w_ptr, out_ptr, d_inner, eps, S: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    m = offs < S
    v = tl.load(y_ptr + b * d_inner + g * S + offs, mask=m, other=0.0)
    rs = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / S + eps)
    w = tl.load(w_ptr + g * S + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * d_inner + g * S + offs, (w * (v * rs)).to(out_ptr.dtype.element_ty), mask=m)


def mamba_decode_step_triton(
    proj: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_w: torch.Tensor,
    conv_b: torch.Tensor | None, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
    norm_w: torch.Tensor, *, n_heads: int, head_dim: int, n_groups: int, state_size: int,
    dt_min: float, dt_max: float, eps: float,
) -> torch.Tensor:
    """Triton version of :func:`~secure_run.kernels.model_reference.mamba_decode_step_reference`."""
    b = proj.shape[0]
    h, p, g, n = n_heads, head_dim, n_groups, state_size
    d_inner = h * p
    c, kw = conv_state.shape[1], conv_state.shape[2]
    if not (conv_state.is_contiguous() and ssm_state.is_contiguous() and ssm_state.dtype == torch.float32):
        raise ValueError("conv_state must be contiguous and ssm_state contiguous fp32")
    if proj.stride(-1) != 1:
        proj = proj.contiguous()
    act = torch.empty(b, c, device=proj.device, dtype=proj.dtype)
    block_c = 128
    _conv_step[(b, triton.cdiv(c, block_c))](
        proj, conv_state, conv_w.reshape(c, kw).contiguous(), conv_b if conv_b is not None else conv_w, act, c,
        proj.stride(0), d_inner, KW=kw, BLOCK_K=next_pow2(kw), HAS_BIAS=conv_b is not None, BLOCK_C=block_c)
    y = torch.empty(b, d_inner, device=proj.device, dtype=torch.float32)
    block_p = min(16, next_pow2(p))
    _ssm_step[(b, h, triton.cdiv(p, block_p))](
        act, proj, ssm_state, dt_bias.float().contiguous(), A_log.float().contiguous(), D.float().contiguous(), y, c,
        proj.stride(0), h, d_inner, float(dt_min), float(min(dt_max, 3.0e38)), P=p, N=n, R=h // g, G=g,
        BLOCK_P=block_p, BLOCK_N=next_pow2(n))
    out = torch.empty(b, d_inner, device=proj.device, dtype=proj.dtype)
    s = d_inner // g
    _gated_norm[(b, g)](y, norm_w, out, d_inner, float(eps), S=s, BLOCK_S=next_pow2(s))
    return out


# --- prefill: chunked SSD scan ---------------------------------------------------------------------
#
# Same math as secure_run.model.mamba2.ssd_chunked_scan (fp32 accumulation), three launches:
#   A. per (batch, chunk, head): the chunk's own state  S_c = sum_s exp(Acum_last - Acum_s) dt_s x_s B_s^T
#      and its total log-decay;
#   B. per (batch, head, P block): walk the chunks in order, replacing each S_c by the state that
#      ENTERS the chunk (from the initial state) and writing the final state;
#   C. per (batch, chunk, head): y_l = sum_{s<=l} (C_l . B_s) exp(Acum_l - Acum_s) dt_s x_s
#      + exp(Acum_l) C_l . S_in.
# Padded steps past L have dt = 0 and x = B = C = 0: no decay and no input.


@triton.jit
def _ssd_chunk_state(x_ptr, dt_ptr, a_ptr, b_ptr, st_ptr, dec_ptr, L, NC, H,
                     sxb, sxl, sbb, sbl, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    bc = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = bc // NC
    c = bc % NC
    g = h // R
    offs_q = tl.arange(0, Q)
    pos = c * Q + offs_q
    valid = pos < L
    dt = tl.load(dt_ptr + (b * L + pos) * H + h, mask=valid, other=0.0)
    acum = tl.cumsum(dt * tl.load(a_ptr + h), axis=0)
    last = tl.sum(dt * tl.load(a_ptr + h), axis=0)
    w = tl.exp(last - acum) * dt  # [Q]
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    xv = tl.load(x_ptr + b * sxb + pos[:, None] * sxl + h * P + offs_p[None, :],
                 mask=valid[:, None] & (offs_p[None, :] < P), other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + b * sbb + pos[:, None] * sbl + g * N + offs_n[None, :],
                 mask=valid[:, None] & (offs_n[None, :] < N), other=0.0).to(tl.float32)
    xw = tl.trans(xv * w[:, None])  # [P, Q]
    if IEEE:
        s = tl.dot(xw, bv, input_precision="ieee")
    else:
        s = tl.dot(xw, bv)
    base = ((b * NC + c) * H + h) * P * N
    tl.store(st_ptr + base + offs_p[:, None] * N + offs_n[None, :], s,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))
    tl.store(dec_ptr + (b * NC + c) * H + h, last)


@triton.jit
def _ssd_state_pass(st_ptr, dec_ptr, init_ptr, final_ptr, NC, H, P: tl.constexpr, N: tl.constexpr,
                    HAS_INIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    m = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    tile = offs_p[:, None] * N + offs_n[None, :]
    if HAS_INIT:
        state = tl.load(init_ptr + (b * H + h) * P * N + tile, mask=m, other=0.0)
    else:
        state = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for c in range(NC):
        base = ((b * NC + c) * H + h) * P * N
        own = tl.load(st_ptr + base + tile, mask=m, other=0.0)
        tl.store(st_ptr + base + tile, state, mask=m)  # now: the state entering chunk c
        state = state * tl.exp(tl.load(dec_ptr + (b * NC + c) * H + h)) + own
    tl.store(final_ptr + (b * H + h) * P * N + tile, state, mask=m)


@triton.jit
def _ssd_chunk_scan(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, st_ptr, y_ptr, L, NC, H,
                    sxb, sxl, sbb, sbl, scb, scl, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                    R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                    IEEE: tl.constexpr):
    bc = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    lb = tl.program_id(2)
    b = bc // NC
    c = bc % NC
    g = h // R
    offs_q = tl.arange(0, Q)  # source steps s of the chunk
    pos = c * Q + offs_q
    valid = pos < L
    offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)  # output rows l of this program
    pos_l = c * Q + offs_l
    valid_l = pos_l < L
    av = tl.load(a_ptr + h)
    dt = tl.load(dt_ptr + (b * L + pos) * H + h, mask=valid, other=0.0)
    acum = tl.cumsum(dt * av, axis=0)  # [Q]
    acum_l = tl.sum(tl.where(offs_q[None, :] <= offs_l[:, None], (dt * av)[None, :], 0.0), axis=1)  # [BLOCK_L]
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp = offs_p < P
    mn = offs_n < N
    cv = tl.load(c_ptr + b * scb + pos_l[:, None] * scl + g * N + offs_n[None, :],
                 mask=valid_l[:, None] & mn[None, :], other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + b * sbb + pos[:, None] * sbl + g * N + offs_n[None, :], mask=valid[:, None] & mn[None, :],
                 other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + b * sxb + pos[:, None] * sxl + h * P + offs_p[None, :], mask=valid[:, None] & mp[None, :],
                 other=0.0).to(tl.float32)
    base = ((b * NC + c) * H + h) * P * N
    s_in = tl.load(st_ptr + base + offs_p[:, None] * N + offs_n[None, :], mask=mp[:, None] & mn[None, :], other=0.0)
    if IEEE:
        cb = tl.dot(cv, tl.trans(bv), input_precision="ieee")  # [BLOCK_L(l), Q(s)]
    else:
        cb = tl.dot(cv, tl.trans(bv))
    causal = offs_l[:, None] >= offs_q[None, :]
    seg = tl.where(causal, acum_l[:, None] - acum[None, :], float("-inf"))
    mmat = cb * tl.exp(seg) * dt[None, :]
    if IEEE:
        y = tl.dot(mmat, xv, input_precision="ieee")
        y += tl.dot(cv, tl.trans(s_in), input_precision="ieee") * tl.exp(acum_l)[:, None]
    else:
        y = tl.dot(mmat, xv)
        y += tl.dot(cv, tl.trans(s_in)) * tl.exp(acum_l)[:, None]
    tl.store(y_ptr + ((b * L + pos_l[:, None]) * H + h) * P + offs_p[None, :], y,
             mask=valid_l[:, None] & mp[None, :])


def ssd_scan_triton(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
                    chunk_size: int, initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`secure_run.model.mamba2.ssd_chunked_scan` (same arguments and results).

    x [B, L, H, P] and Bm/Cm [B, L, G, N] may be strided views (unit stride on the last axis and
    heads/groups packed), dt [B, L, H]. ``chunk_size`` is rounded up to a power of two >= 16 (the
    chunk length only changes rounding, not the result).
    """
    b, length, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    q = max(16, next_pow2(chunk_size))
    for name, t, inner in (("x", x, p), ("Bm", Bm, n), ("Cm", Cm, n)):
        if t.stride(-1) != 1 or t.stride(-2) != inner:
            raise ValueError(f"{name} must have unit stride on the last axis and packed heads/groups")
    nc = triton.cdiv(length, q)
    dev = x.device
    dtc = dt.float().contiguous()
    a = A.float().contiguous()
    states = torch.empty(b, nc, h, p, n, device=dev, dtype=torch.float32)
    decay = torch.empty(b, nc, h, device=dev, dtype=torch.float32)
    ieee = x.dtype == torch.float32
    bp, bn = max(16, next_pow2(p)), max(16, next_pow2(n))
    warps = 8 if q * bn >= 128 * 128 else 4
    _ssd_chunk_state[(b * nc, h)](x, dtc, a, Bm, states, decay, length, nc, h, x.stride(0), x.stride(1),
                                  Bm.stride(0), Bm.stride(1), Q=q, P=p, N=n, R=h // g, BLOCK_P=bp, BLOCK_N=bn,
                                  IEEE=ieee, num_warps=warps)
    final = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    init = initial_state.float().contiguous() if initial_state is not None else final
    bps = min(bp, 16)
    _ssd_state_pass[(b, h, triton.cdiv(p, bps))](states, decay, init, final, nc, h, P=p, N=n,
                                                 HAS_INIT=initial_state is not None, BLOCK_P=bps, BLOCK_N=bn)
    y = torch.empty(b, length, h, p, device=dev, dtype=torch.float32)
    block_l = min(q, 64)
    _ssd_chunk_scan[(b * nc, h, q // block_l)](x, dtc, a, Bm, Cm, states, y, length, nc, h, x.stride(0), x.stride(1),
                                               Bm.stride(0), Bm.stride(1), Cm.stride(0), Cm.stride(1), Q=q, P=p, N=n,
                                               R=h // g, BLOCK_L=block_l, BLOCK_P=bp, BLOCK_N=bn, IEEE=ieee,
                                               num_warps=warps)
    return y, final


# --- prefill: causal depthwise conv + SiLU ---------------------------------------------------------


@triton.jit
def _conv_prefill(x_ptr, sxb, sxl, state_ptr, w_ptr, b_ptr, out_ptr, L, C, KW: tl.constexpr,
                  HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ml = offs_l < L
    mc = offs_c < C
    acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(KW):
        src = offs_l - (KW - 1) + j  # input position read by tap j (negative: from the cached tail)
        inside = src >= 0
        xv = tl.load(x_ptr + b * sxb + tl.where(inside, src, 0)[:, None].to(tl.int64) * sxl + offs_c[None, :],
                     mask=(ml & inside)[:, None] & mc[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            sv = tl.load(state_ptr + b * C * KW + offs_c[None, :].to(tl.int64) * KW + tl.where(inside, 0, KW + src)[:, None],
                         mask=(ml & ~inside)[:, None] & mc[None, :], other=0.0).to(tl.float32)
            xv = tl.where(inside[:, None], xv, sv)
        wj = tl.load(w_ptr + offs_c * KW + j, mask=mc, other=0.0).to(tl.float32)
        acc += xv * wj[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)[None, :]
    r = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    silu = r / (1.0 + tl.exp(-r))
    tl.store(out_ptr + (b * L + offs_l[:, None]) * C + offs_c[None, :], silu.to(out_ptr.dtype.element_ty),
             mask=ml[:, None] & mc[None, :])


def causal_conv1d_triton(xbc: torch.Tensor, conv_state: torch.Tensor | None, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """Triton version of :func:`secure_run.kernels.model_reference.causal_conv1d_reference`.

    Reads xbc [B, L, C] in place (any row stride, unit channel stride): no transpose, no concat.
    """
    b, length, c = xbc.shape
    kw = weight.shape[1]
    if xbc.stride(-1) != 1:
        xbc = xbc.contiguous()
    out = torch.empty(b, length, c, device=xbc.device, dtype=xbc.dtype)
    state = conv_state.contiguous() if conv_state is not None else out
    block_l, block_c = 32, 128
    _conv_prefill[(b, triton.cdiv(length, block_l), triton.cdiv(c, block_c))](
        xbc, xbc.stride(0), xbc.stride(1), state, weight.contiguous(), bias if bias is not None else weight, out,
        length, c, KW=kw, HAS_STATE=conv_state is not None, HAS_BIAS=bias is not None, BLOCK_L=block_l,
        BLOCK_C=block_c)
    return out
