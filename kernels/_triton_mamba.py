"""Triton Mamba-2: decode step (after ``in_proj``, before ``out_proj``; three launches), the
chunked SSD scan of prefill (three launches) and the prefill tail after the conv (scan + D skip +
gated group RMSNorm: ``ssd_prefill_triton``, three or four launches; see "prefill" below).

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

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import next_pow2

__all__ = ["SsdConfig", "causal_conv1d_triton", "mamba_decode_step_triton", "ssd_prefill_triton", "ssd_scan_triton"]


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
#   B. per (batch * head, block of P*N state elements): walk the chunks in order, replacing each S_c
#      by the state that ENTERS the chunk (from the initial state) and writing the final state
#      (thousands of programs, the next chunk's load issued before the current store);
#   C. per (batch, chunk, HPP heads of one group, row block): C.B once for the group's heads, then
#      per head y_l = sum_{s<=l} (C_l . B_s) exp(Acum_l - Acum_s) dt_s x_s + exp(Acum_l) C_l . S_in,
#      optionally + D x_l, times silu(z_l), and the group RMSNorm (FUSE_NORM).
# ``ssd_prefill_triton`` adds the norm launch (``_gated_norm_rows``) unless C fused it. With 16-bit
# inputs and ``SsdConfig.lowp`` the dots of A and C take 16-bit operands (fp32 accumulate).
# ``_ssd_state_pass_v1`` / ``_ssd_chunk_scan_v1``: B and C as first committed (``legacy=True``,
# the mixer's ``SECURE_RUN_SSD=v1``), kept so that the benchmark's baseline stays measurable.
# Padded steps past L have dt = 0 and x = B = C = 0: no decay and no input.


@triton.jit
def _ssd_chunk_state(x_ptr, dt_ptr, a_ptr, b_ptr, st_ptr, dec_ptr, L, NC, H,
                     sxb, sxl, sbb, sbl, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, LOWP: tl.constexpr = False):
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
                 mask=valid[:, None] & (offs_p[None, :] < P), other=0.0)
    bv = tl.load(b_ptr + b * sbb + pos[:, None] * sbl + g * N + offs_n[None, :],
                 mask=valid[:, None] & (offs_n[None, :] < N), other=0.0)
    if LOWP:  # operands in the input dtype (dt-weighted x rounded to it), fp32 accumulate
        s = tl.dot(tl.trans((xv.to(tl.float32) * w[:, None]).to(xv.dtype)), bv)
    else:
        xw = tl.trans(xv.to(tl.float32) * w[:, None])  # [P, Q]
        if IEEE:
            s = tl.dot(xw, bv.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(xw, bv.to(tl.float32))
    base = ((b * NC + c) * H + h) * P * N
    tl.store(st_ptr + base + offs_p[:, None] * N + offs_n[None, :], s,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))
    tl.store(dec_ptr + (b * NC + c) * H + h, last)


@triton.jit
def _ssd_state_pass(st_ptr, dec_ptr, init_ptr, final_ptr, NC, H, PN: tl.constexpr, HAS_INIT: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Grid (batch * head, P*N / BLOCK): each program walks the chunks over BLOCK state elements,
    loading chunk c + 1's own state before it stores chunk c's entering state (one load in flight)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_INIT:
        state = tl.load(init_ptr + bh * PN + offs, mask=m, other=0.0)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    step = H * PN  # from chunk c to chunk c + 1 of the same (batch, head)
    ptr = st_ptr + (b * NC * H + h) * PN + offs
    own = tl.load(ptr, mask=m, other=0.0)
    for c in range(NC):
        nxt = tl.load(ptr + step, mask=m & (c + 1 < NC), other=0.0)
        dec = tl.exp(tl.load(dec_ptr + (b * NC + c) * H + h))
        tl.store(ptr, state, mask=m)  # now: the state entering chunk c
        state = state * dec + own
        own = nxt
        ptr += step
    tl.store(final_ptr + bh * PN + offs, state, mask=m)


@triton.jit
def _ssd_state_pass_v1(st_ptr, dec_ptr, init_ptr, final_ptr, NC, H, P: tl.constexpr, N: tl.constexpr,
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
def _ssd_chunk_scan_v1(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, st_ptr, y_ptr, L, NC, H,
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


@triton.jit
def _ssd_chunk_scan(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, st_ptr, d_ptr, z_ptr, y_ptr, out_ptr, w_ptr, L, NC, H, eps,
                    sxb, sxl, sbb, sbl, scb, scl, szb, szl, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                    R: tl.constexpr, HPP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_N: tl.constexpr, IEEE: tl.constexpr, LOWP: tl.constexpr, HAS_D: tl.constexpr,
                    HAS_Z: tl.constexpr, FUSE_NORM: tl.constexpr):
    """Grid (batch * chunk, H / HPP, Q / BLOCK_L): HPP heads of one group per program, sharing C.B.

    y [B, L, H * P] fp32 gets ``scan + D x`` (HAS_D), times ``silu(z)`` (HAS_Z). FUSE_NORM (HPP = R,
    the norm group = the SSM group): after the heads, each row's RMS over the group's R * P values,
    times the norm weight, cast to ``out``'s dtype (y is re-read from memory this program wrote).
    """
    bc = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1).to(tl.int64) * HPP
    lb = tl.program_id(2)
    b = bc // NC
    c = bc % NC
    g = h0 // R
    offs_q = tl.arange(0, Q)  # source steps s of the chunk
    pos = c * Q + offs_q
    valid = pos < L
    offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)  # output rows l of this program
    pos_l = c * Q + offs_l
    valid_l = pos_l < L
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp = offs_p < P
    mn = offs_n < N
    cv = tl.load(c_ptr + b * scb + pos_l[:, None] * scl + g * N + offs_n[None, :],
                 mask=valid_l[:, None] & mn[None, :], other=0.0)
    bv = tl.load(b_ptr + b * sbb + pos[:, None] * sbl + g * N + offs_n[None, :], mask=valid[:, None] & mn[None, :],
                 other=0.0)
    if LOWP:
        cb = tl.dot(cv, tl.trans(bv))  # [BLOCK_L(l), Q(s)], input-dtype operands, fp32 accumulate
    elif IEEE:
        cb = tl.dot(cv.to(tl.float32), tl.trans(bv.to(tl.float32)), input_precision="ieee")
    else:
        cb = tl.dot(cv.to(tl.float32), tl.trans(bv.to(tl.float32)))
    causal = offs_l[:, None] >= offs_q[None, :]
    row_ptr = (b * L + pos_l[:, None]) * H * P + offs_p[None, :]  # into y [B, L, H * P]
    m_out = valid_l[:, None] & mp[None, :]
    ss = tl.zeros([BLOCK_L], dtype=tl.float32)
    for i in range(HPP):
        h = h0 + i
        av = tl.load(a_ptr + h)
        da = tl.load(dt_ptr + (b * L + pos) * H + h, mask=valid, other=0.0)
        dt = da
        da = da * av
        acum = tl.cumsum(da, axis=0)  # [Q]
        if BLOCK_L == Q:
            acum_l = acum
        else:
            acum_l = tl.sum(tl.where(offs_q[None, :] <= offs_l[:, None], da[None, :], 0.0), axis=1)  # [BLOCK_L]
        seg = tl.where(causal, acum_l[:, None] - acum[None, :], float("-inf"))
        mmat = cb * tl.exp(seg) * dt[None, :]
        xv = tl.load(x_ptr + b * sxb + pos[:, None] * sxl + h * P + offs_p[None, :],
                     mask=valid[:, None] & mp[None, :], other=0.0)
        base = ((b * NC + c) * H + h) * P * N
        s_in = tl.load(st_ptr + base + offs_p[:, None] * N + offs_n[None, :], mask=mp[:, None] & mn[None, :],
                       other=0.0)
        if LOWP:
            y = tl.dot(mmat.to(xv.dtype), xv)
            y += tl.dot(cv, tl.trans(s_in.to(cv.dtype))) * tl.exp(acum_l)[:, None]
        elif IEEE:
            y = tl.dot(mmat, xv.to(tl.float32), input_precision="ieee")
            y += tl.dot(cv.to(tl.float32), tl.trans(s_in), input_precision="ieee") * tl.exp(acum_l)[:, None]
        else:
            y = tl.dot(mmat, xv.to(tl.float32))
            y += tl.dot(cv.to(tl.float32), tl.trans(s_in)) * tl.exp(acum_l)[:, None]
        if HAS_D:
            x_l = tl.load(x_ptr + b * sxb + pos_l[:, None] * sxl + h * P + offs_p[None, :], mask=m_out,
                          other=0.0).to(tl.float32)
            y += tl.load(d_ptr + h) * x_l
        if HAS_Z:
            zv = tl.load(z_ptr + b * szb + pos_l[:, None] * szl + h * P + offs_p[None, :], mask=m_out,
                         other=0.0).to(tl.float32)
            y = y * (zv / (1.0 + tl.exp(-zv)))
        tl.store(y_ptr + row_ptr + h * P, y, mask=m_out)
        if FUSE_NORM:
            ss += tl.sum(tl.where(m_out, y * y, 0.0), axis=1)
    if FUSE_NORM:
        tl.debug_barrier()  # this program's y stores are visible to all of its threads
        rs = 1.0 / tl.sqrt(ss / (R * P) + eps)
        for i in range(HPP):
            h = h0 + i
            v = tl.load(y_ptr + row_ptr + h * P, mask=m_out, other=0.0)
            wv = tl.load(w_ptr + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
            tl.store(out_ptr + row_ptr + h * P, (wv[None, :] * (v * rs[:, None])).to(out_ptr.dtype.element_ty),
                     mask=m_out)


@triton.jit
def _gated_norm_rows(y_ptr, w_ptr, out_ptr, M, d_inner, eps, S: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """Grid (row blocks, groups): RMSNorm of y [M, d_inner] fp32 over each group of S, times w, cast."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    m = (offs_m[:, None] < M) & (offs[None, :] < S)
    ptrs = offs_m[:, None].to(tl.int64) * d_inner + g * S + offs[None, :]
    v = tl.load(y_ptr + ptrs, mask=m, other=0.0)
    rs = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / S + eps)
    w = tl.load(w_ptr + g * S + offs, mask=offs < S, other=0.0).to(tl.float32)
    tl.store(out_ptr + ptrs, (w[None, :] * (v * rs[:, None])).to(out_ptr.dtype.element_ty), mask=m)


@dataclass(frozen=True)
class SsdConfig:
    """Launch choices of the prefill scan (``bench/mamba.py`` sweeps them; the defaults are its pick).

    lowp: bf16/fp16 inputs feed the dots in their own dtype (fp32 accumulate; the decay-weighted
    terms and the entering state are rounded to that dtype first); fp32 inputs always use IEEE dots.
    state_block / state_warps: state elements per program of the chunk-to-chunk pass.
    scan_block_l: output rows per chunk-scan program; scan_heads: heads of one group per program
    (sharing C.B); fuse_norm: the gated RMSNorm inside the chunk scan (needs scan_heads = H/G);
    norm_rows: rows per program of the separate norm kernel.
    """

    lowp: bool = True
    state_block: int = 256
    state_warps: int = 4
    scan_block_l: int = 64
    scan_heads: int = 8
    scan_warps: int = 4
    scan_stages: int = 2
    fuse_norm: bool = False
    norm_rows: int = 8


SCAN_API = SsdConfig(lowp=False)  # ssd_scan_triton: tf32 dots for 16-bit inputs (fp32: IEEE), as before


def _check_views(x: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor) -> None:
    p, n = x.shape[-1], Bm.shape[-1]
    for name, t, inner in (("x", x, p), ("Bm", Bm, n), ("Cm", Cm, n)):
        if t.stride(-1) != 1 or t.stride(-2) != inner:
            raise ValueError(f"{name} must have unit stride on the last axis and packed heads/groups")


def _chunk_states(x: torch.Tensor, dtc: torch.Tensor, a: torch.Tensor, Bm: torch.Tensor, q: int,
                  lowp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch A: each chunk's own final state [B, c, H, P, N] and total log-decay [B, c, H] (fp32)."""
    b, length, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    nc = triton.cdiv(length, q)
    states = torch.empty(b, nc, h, p, n, device=x.device, dtype=torch.float32)
    decay = torch.empty(b, nc, h, device=x.device, dtype=torch.float32)
    bp, bn = max(16, next_pow2(p)), max(16, next_pow2(n))
    _ssd_chunk_state[(b * nc, h)](x, dtc, a, Bm, states, decay, length, nc, h, x.stride(0), x.stride(1),
                                  Bm.stride(0), Bm.stride(1), Q=q, P=p, N=n, R=h // g, BLOCK_P=bp, BLOCK_N=bn,
                                  IEEE=x.dtype == torch.float32, LOWP=lowp,
                                  num_warps=8 if q * bn >= 128 * 128 else 4)
    return states, decay


def _pass_states(states: torch.Tensor, decay: torch.Tensor, init: torch.Tensor | None, cfg: SsdConfig,
                 legacy: bool) -> torch.Tensor:
    """Launch B: replace each chunk's own state by the state entering it; return the final state."""
    b, nc, h, p, n = states.shape
    final = torch.empty(b, h, p, n, device=states.device, dtype=torch.float32)
    init_t = init.float().contiguous() if init is not None else final
    if legacy:
        bn = max(16, next_pow2(n))
        bps = min(max(16, next_pow2(p)), 16)
        _ssd_state_pass_v1[(b, h, triton.cdiv(p, bps))](states, decay, init_t, final, nc, h, P=p, N=n,
                                                        HAS_INIT=init is not None, BLOCK_P=bps, BLOCK_N=bn)
        return final
    block = min(cfg.state_block, next_pow2(p * n))
    _ssd_state_pass[(b * h, triton.cdiv(p * n, block))](states, decay, init_t, final, nc, h, PN=p * n,
                                                         HAS_INIT=init is not None, BLOCK=block,
                                                         num_warps=cfg.state_warps)
    return final


def _heads_per_program(r: int, want: int) -> int:
    k = max(1, min(want, r))
    while r % k:
        k -= 1
    return k


def _scan_chunks(x: torch.Tensor, dtc: torch.Tensor, a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                 states: torch.Tensor, q: int, cfg: SsdConfig, *, lowp: bool, D: torch.Tensor | None = None,
                 z: torch.Tensor | None = None,
                 norm: tuple[torch.Tensor, float, torch.dtype] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch C: y [B, L, H, P] fp32 (+ D x, times silu(z)); with ``norm`` (weight, eps, dtype) and
    cfg.fuse_norm also the normed output [B, L, H * P] (else the second result is y itself)."""
    b, length, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    r = h // g
    nc = triton.cdiv(length, q)
    hpp = _heads_per_program(r, cfg.scan_heads)
    fuse = norm is not None and cfg.fuse_norm and hpp == r
    block_l = min(q, cfg.scan_block_l)
    y = torch.empty(b, length, h, p, device=x.device, dtype=torch.float32)
    out = torch.empty(b, length, h * p, device=x.device, dtype=norm[2]) if fuse and norm is not None else y
    zz = z if z is not None else x
    _ssd_chunk_scan[(b * nc, h // hpp, q // block_l)](
        x, dtc, a, Bm, Cm, states, D if D is not None else a, zz, y, out, norm[0] if fuse and norm is not None else a,
        length, nc, h, float(norm[1]) if norm is not None else 0.0, x.stride(0), x.stride(1), Bm.stride(0),
        Bm.stride(1), Cm.stride(0), Cm.stride(1), zz.stride(0), zz.stride(1), Q=q, P=p, N=n, R=r, HPP=hpp,
        BLOCK_L=block_l, BLOCK_P=max(16, next_pow2(p)), BLOCK_N=max(16, next_pow2(n)),
        IEEE=x.dtype == torch.float32, LOWP=lowp, HAS_D=D is not None, HAS_Z=z is not None, FUSE_NORM=fuse,
        num_warps=cfg.scan_warps, num_stages=cfg.scan_stages)
    return y, out


def ssd_scan_triton(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
                    chunk_size: int, initial_state: torch.Tensor | None = None,
                    legacy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`secure_run.model.mamba2.ssd_chunked_scan` (same arguments and results).

    x [B, L, H, P] and Bm/Cm [B, L, G, N] may be strided views (unit stride on the last axis and
    heads/groups packed), dt [B, L, H]. ``chunk_size`` is rounded up to a power of two >= 16 (the
    chunk length only changes rounding, not the result). ``legacy``: the state pass and chunk scan
    as first committed (one program per head and 16 rows of P; one head per chunk-scan program),
    kept as the benchmark's baseline.
    """
    b, length, h, p = x.shape
    _check_views(x, Bm, Cm)
    q = max(16, next_pow2(chunk_size))
    dtc = dt.float().contiguous()
    a = A.float().contiguous()
    states, decay = _chunk_states(x, dtc, a, Bm, q, lowp=False)
    final = _pass_states(states, decay, initial_state, SCAN_API, legacy)
    if not legacy:
        return _scan_chunks(x, dtc, a, Bm, Cm, states, q, SCAN_API, lowp=False)[0], final
    return _scan_chunks_v1(x, dtc, a, Bm, Cm, states, q), final


def _scan_chunks_v1(x: torch.Tensor, dtc: torch.Tensor, a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                    states: torch.Tensor, q: int) -> torch.Tensor:
    """Launch C as first committed (one head per program, fp32 tiles): y [B, L, H, P] fp32."""
    b, length, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    nc = states.shape[1]
    bp, bn = max(16, next_pow2(p)), max(16, next_pow2(n))
    y = torch.empty(b, length, h, p, device=x.device, dtype=torch.float32)
    block_l = min(q, 64)
    _ssd_chunk_scan_v1[(b * nc, h, q // block_l)](x, dtc, a, Bm, Cm, states, y, length, nc, h, x.stride(0),
                                                  x.stride(1), Bm.stride(0), Bm.stride(1), Cm.stride(0),
                                                  Cm.stride(1), Q=q, P=p, N=n, R=h // g, BLOCK_L=block_l,
                                                  BLOCK_P=bp, BLOCK_N=bn, IEEE=x.dtype == torch.float32,
                                                  num_warps=8 if q * bn >= 128 * 128 else 4)
    return y


def ssd_prefill_triton(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                       D: torch.Tensor, z: torch.Tensor, norm_w: torch.Tensor, *, chunk_size: int,
                       initial_state: torch.Tensor | None, eps: float, group_size: int, out_dtype: torch.dtype,
                       cfg: SsdConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`~secure_run.kernels.model_reference.mamba_prefill_ssd_reference`:
    scan + ``D x``, gate ``silu(z)``, group RMSNorm times ``norm_w``, cast to ``out_dtype``.

    z [B, L, H * P] may be a strided view (unit last stride). Returns (out [B, L, H * P], final state).
    """
    cfg = cfg or SsdConfig()
    b, length, h, p = x.shape
    _check_views(x, Bm, Cm)
    if z.stride(-1) != 1:
        z = z.contiguous()
    q = max(16, next_pow2(chunk_size))
    lowp = cfg.lowp and x.dtype in (torch.float16, torch.bfloat16) and Bm.dtype == x.dtype
    dtc = dt.float().contiguous()
    a = A.float().contiguous()
    states, decay = _chunk_states(x, dtc, a, Bm, q, lowp)
    final = _pass_states(states, decay, initial_state, cfg, legacy=False)
    r = h // Bm.shape[2]
    norm_cfg = cfg if group_size == r * p else replace(cfg, fuse_norm=False)
    y, out = _scan_chunks(x, dtc, a, Bm, Cm, states, q, norm_cfg, lowp=lowp, D=D.float().contiguous(), z=z,
                          norm=(norm_w, eps, out_dtype))
    if out is not y:
        return out, final
    return _norm_rows(y.reshape(b, length, h * p), norm_w, eps, group_size, out_dtype, cfg.norm_rows), final


def _norm_rows(y: torch.Tensor, norm_w: torch.Tensor, eps: float, group_size: int, out_dtype: torch.dtype,
               block_m: int) -> torch.Tensor:
    """Group RMSNorm of the gated y [B, L, D] fp32, times norm_w, cast to ``out_dtype``."""
    d_inner = y.shape[-1]
    rows = y.numel() // d_inner
    v = torch.empty(y.shape, device=y.device, dtype=out_dtype)
    block_m = max(1, block_m)
    _gated_norm_rows[(triton.cdiv(rows, block_m), d_inner // group_size)](
        y, norm_w, v, rows, d_inner, float(eps), S=group_size, BLOCK_S=next_pow2(group_size), BLOCK_M=block_m)
    return v


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


CONV_BLOCKS = (64, 128, 4)  # (rows, channels, warps) per program of ``_conv_prefill`` (H200 sweep: bench/mamba.py)


def causal_conv1d_triton(xbc: torch.Tensor, conv_state: torch.Tensor | None, weight: torch.Tensor,
                         bias: torch.Tensor | None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Triton version of :func:`secure_run.kernels.model_reference.causal_conv1d_reference`.

    Reads xbc [B, L, C] in place (any row stride, unit channel stride): no transpose, no concat.
    """
    b, length, c = xbc.shape
    kw = weight.shape[1]
    if xbc.stride(-1) != 1:
        xbc = xbc.contiguous()
    out = torch.empty(b, length, c, device=xbc.device, dtype=xbc.dtype)
    state = conv_state.contiguous() if conv_state is not None else out
    block_l, block_c, warps = blocks or CONV_BLOCKS
    _conv_prefill[(b, triton.cdiv(length, block_l), triton.cdiv(c, block_c))](
        xbc, xbc.stride(0), xbc.stride(1), state, weight.contiguous(), bias if bias is not None else weight, out,
        length, c, KW=kw, HAS_STATE=conv_state is not None, HAS_BIAS=bias is not None, BLOCK_L=block_l,
        BLOCK_C=block_c, num_warps=warps)
    return out
