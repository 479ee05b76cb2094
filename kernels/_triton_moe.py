"""Triton MoE kernels: router (logits + sigmoid top-k) and routed + shared relu^2 experts.

Decode (few tokens): grouped expert GEMV for all experts of all tokens: ``_up_gemv`` (one program
per (assignment, F block): ``relu(W_up[e] x)^2``; the shared expert is one more assignment per
token), then either ``_down_gemv`` (one program per (token, d block): the weighted sum over the
token's k experts of ``W_down[e] h`` plus the shared expert's ``W_down h``) or, the default,
``_down_gemv_slots`` (one program per (token, d block, slot), fp32 partials) + ``_down_finalize``
(the slots summed in a fixed order).

Prefill (many tokens): grouped GEMM over the (token, slot) assignments sorted by expert
(``_align``: counts, block-padded offsets and the sorted assignment list are built on the device,
no host sync), ``_up_gemm`` (tiles of BLOCK_M assignments of one expert x BLOCK_N of F, relu^2)
and ``_down_gemm`` (tiles x BLOCK_N of d: each assignment's output stored and summed per token,
weighted, by ``_sum_slots``; or, optionally, atomically added into an fp32 per-token output).
The shared expert runs as a plain dense matmul (cuBLAS) there.

Every launch has a fixed grid that depends only on shapes, so the decode path can be captured
in a CUDA graph. Loads are converted to fp32 right after ``tl.load`` (the interpreter's bf16
arithmetic is wrong, see ``_triton_common``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import interpreting, next_pow2

__all__ = ["moe_experts_triton", "moe_route_triton"]


# --- router --------------------------------------------------------------------------------------


@triton.jit
def _router_logits(x_ptr, w_ptr, out_ptr, d, E, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    eb = tl.program_id(1)
    offs_e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    me = offs_e < E
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < d
        xv = tl.load(x_ptr + t * d + offs_d, mask=md, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + offs_e[:, None].to(tl.int64) * d + offs_d[None, :], mask=me[:, None] & md[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(wv * xv[None, :], axis=1)
    tl.store(out_ptr + t * E + offs_e, acc, mask=me)


@triton.jit
def _topk_row(logit_ptr, bias_ptr, ids_ptr, w_ptr, t, E, scale, K: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_K: tl.constexpr, NORMALISE: tl.constexpr, VOLATILE: tl.constexpr):
    """Sigmoid + biased top-k of token t's fp32 logits row (lowest index among ties), weights stored."""
    offs_e = tl.arange(0, BLOCK_E)
    me = offs_e < E
    logits = tl.load(logit_ptr + t * E + offs_e, mask=me, other=0.0, volatile=VOLATILE)
    scores = 1.0 / (1.0 + tl.exp(-logits))
    choice = tl.where(me, scores + tl.load(bias_ptr + offs_e, mask=me, other=0.0), float("-inf"))
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    wts = tl.zeros([BLOCK_K], dtype=tl.float32)
    for s in tl.static_range(K):
        best = tl.max(choice, axis=0)
        idx = tl.min(tl.where(choice == best, offs_e, BLOCK_E), axis=0)
        sc = tl.sum(tl.where(offs_e == idx, scores, 0.0), axis=0)
        ids = tl.where(offs_k == s, idx.to(tl.int64), ids)
        wts = tl.where(offs_k == s, sc, wts)
        choice = tl.where(offs_e == idx, float("-inf"), choice)
    if NORMALISE:
        wts = wts / (tl.sum(wts, axis=0) + 1e-20)
    mk = offs_k < K
    tl.store(ids_ptr + t * K + offs_k, ids, mask=mk)
    tl.store(w_ptr + t * K + offs_k, wts * scale, mask=mk)


@triton.jit
def _router_topk(logit_ptr, bias_ptr, ids_ptr, w_ptr, E, scale, K: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_K: tl.constexpr, NORMALISE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    _topk_row(logit_ptr, bias_ptr, ids_ptr, w_ptr, t, E, scale, K, BLOCK_E, BLOCK_K, NORMALISE, False)


@triton.jit
def _router_fused(x_ptr, gw_ptr, logit_ptr, bias_ptr, ids_ptr, w_ptr, count_ptr, T, d, E, scale,
                  K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, E_POW2: tl.constexpr,
                  BLOCK_K: tl.constexpr, NORMALISE: tl.constexpr):
    """Logits and top-k in one launch: each program writes the logits of BLOCK_E experts for every
    token, then takes a ticket from a counter; the program that takes the last ticket (all logits
    written) runs the top-k of every token and puts the counter back to 0 for the next launch.
    Only the ticket is atomic: the values are summed in a fixed order (deterministic)."""
    pid = tl.program_id(0)
    offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    me = offs_e < E
    for t in range(T):
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < d
            xv = tl.load(x_ptr + t * d + offs_d, mask=md, other=0.0).to(tl.float32)
            wv = tl.load(gw_ptr + offs_e[:, None].to(tl.int64) * d + offs_d[None, :],
                         mask=me[:, None] & md[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
        tl.store(logit_ptr + t * E + offs_e, acc, mask=me)
    tl.debug_barrier()  # every thread's logits stored before the ticket (released by the atomic)
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        for t in range(T):  # volatile loads: the other programs' logits, not a stale L1 line
            _topk_row(logit_ptr, bias_ptr, ids_ptr, w_ptr, t, E, scale, K, E_POW2, BLOCK_K, NORMALISE, True)
        tl.store(count_ptr, 0)


_ROUTER_GEMV_MAX_TOKENS = 16
#: Decode router launches: experts per logits program, its warps, its input step, and the top-k
#: program's warps; ``fused``: logits and top-k in one launch (``_router_fused``). Both kernels are
#: latency-bound. H200, graphed, 4 rotating gate matrices (bench/model.py --tune-gemv, 2026-12-02):
#: batch 1 7.11 us with 1024-wide steps / 4 top-k warps, 5.46 us with this table (4 tokens: 7.36 ->
#: 5.66); the one-launch fused form 6.6-10.2 us (its last program's serial top-k and the ticket cost
#: more than the second launch; at 4 tokens 7.3-19.2 us), so it stays off.
_ROUTER: dict[str, int] = {"logit_block_e": 2, "logit_warps": 4, "logit_block_d": 4096, "topk_warps": 1,
                           "fused": 0}
_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}


def _ticket_counter(device: torch.device) -> torch.Tensor | None:
    """The fused router's int32 counter for this device and stream (0 between launches); None while a
    CUDA graph is being captured and none exists yet (allocating there would tie it to the graph)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _COUNTERS[key] = torch.zeros(1, device=device, dtype=torch.int32)
    return _COUNTERS[key]


def moe_route_triton(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor, top_k: int, normalise: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d], gate_w [E, d], bias [E] fp32 -> (ids [T, k] int64, weights [T, k] fp32)."""
    t, d = x.shape
    e = gate_w.shape[0]
    x, gate_w = x.contiguous(), gate_w.contiguous()
    if t > _ROUTER_GEMV_MAX_TOKENS:  # prefill: one fp32 GEMM (same products as the reference)
        logits = torch.nn.functional.linear(x.float(), gate_w.float()).contiguous()
    else:  # decode: _ROUTER["logit_block_e"] experts per program (64 programs for 128 experts)
        logits = torch.empty(t, e, device=x.device, dtype=torch.float32)
        be, bd = _ROUTER["logit_block_e"], _ROUTER["logit_block_d"]
        counter = _ticket_counter(x.device) if _ROUTER["fused"] else None
        if counter is not None:
            ids = torch.empty(t, top_k, device=x.device, dtype=torch.int64)
            w = torch.empty(t, top_k, device=x.device, dtype=torch.float32)
            _router_fused[(triton.cdiv(e, be),)](x, gate_w, logits, bias.float().contiguous(), ids, w, counter, t, d,
                                                 e, float(scale), K=top_k, BLOCK_E=be, BLOCK_D=bd,
                                                 E_POW2=next_pow2(e), BLOCK_K=next_pow2(top_k),
                                                 NORMALISE=bool(normalise), num_warps=_ROUTER["logit_warps"])
            return ids, w
        _router_logits[(t, triton.cdiv(e, be))](x, gate_w, logits, d, e, BLOCK_E=be, BLOCK_D=bd,
                                                 num_warps=_ROUTER["logit_warps"])
    ids = torch.empty(t, top_k, device=x.device, dtype=torch.int64)
    w = torch.empty(t, top_k, device=x.device, dtype=torch.float32)
    _router_topk[(t,)](logits, bias.float().contiguous(), ids, w, e, float(scale), K=top_k,
                       BLOCK_E=next_pow2(e), BLOCK_K=next_pow2(top_k), NORMALISE=bool(normalise),
                       num_warps=_ROUTER["topk_warps"])
    return ids, w


# --- decode: grouped expert GEMV -----------------------------------------------------------------


@triton.jit
def _up_gemv(x_ptr, ids_ptr, up_ptr, h_ptr, sup_ptr, sh_ptr, d, F, FS, T,
             K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
             ACC2D: tl.constexpr, UNROLL: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)  # assignment t*K + s, then T shared ones
    fb = tl.program_id(1)
    offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    if a < T * K:
        t = a // K
        e = tl.load(ids_ptr + a)
        wbase = up_ptr + e * F * d
        width = F
        hbase = h_ptr + a * F
    else:
        t = a - T * K
        wbase = sup_ptr
        width = FS
        hbase = sh_ptr + t * FS
    if fb * BLOCK_F < width:
        mf = offs_f < width
        wrow = wbase + offs_f[:, None].to(tl.int64) * d
        if ACC2D:  # per-lane partial sums, one reduction at the end (no cross-warp step in the loop)
            acc2 = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
            for d0 in tl.range(0, d, BLOCK_D, loop_unroll_factor=UNROLL):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                md = offs_d < d
                xv = tl.load(x_ptr + t * d + offs_d, mask=md, other=0.0).to(tl.float32)
                wv = tl.load(wrow + offs_d[None, :], mask=mf[:, None] & md[None, :], other=0.0,
                             eviction_policy="evict_first").to(tl.float32)
                acc2 += wv * xv[None, :]
            acc = tl.sum(acc2, axis=1)
        else:
            acc = tl.zeros([BLOCK_F], dtype=tl.float32)
            for d0 in tl.range(0, d, BLOCK_D, loop_unroll_factor=UNROLL):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                md = offs_d < d
                xv = tl.load(x_ptr + t * d + offs_d, mask=md, other=0.0).to(tl.float32)
                wv = tl.load(wrow + offs_d[None, :], mask=mf[:, None] & md[None, :], other=0.0,
                             eviction_policy="evict_first").to(tl.float32)
                acc += tl.sum(wv * xv[None, :], axis=1)
        r = tl.maximum(acc.to(h_ptr.dtype.element_ty).to(tl.float32), 0.0)  # round as nn.Linear does
        tl.store(hbase + offs_f, (r * r).to(h_ptr.dtype.element_ty), mask=mf)


@triton.jit
def _row_block_dot(w_row, h_row, c0, c1, offs_d, md, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
                   ACC2D: tl.constexpr, UNROLL: tl.constexpr):
    """sum over columns [c0, c1) of W[rows, c] * h[c] for the BLOCK_D rows ``offs_d`` (fp32 [BLOCK_D])."""
    if ACC2D:
        acc2 = tl.zeros([BLOCK_D, BLOCK_F], dtype=tl.float32)
        for f0 in tl.range(c0, c1, BLOCK_F, loop_unroll_factor=UNROLL):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mf = offs_f < c1
            hv = tl.load(h_row + offs_f, mask=mf, other=0.0).to(tl.float32)
            wv = tl.load(w_row + offs_f[None, :], mask=md[:, None] & mf[None, :], other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            acc2 += wv * hv[None, :]
        acc = tl.sum(acc2, axis=1)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for f0 in tl.range(c0, c1, BLOCK_F, loop_unroll_factor=UNROLL):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mf = offs_f < c1
            hv = tl.load(h_row + offs_f, mask=mf, other=0.0).to(tl.float32)
            wv = tl.load(w_row + offs_f[None, :], mask=md[:, None] & mf[None, :], other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            acc += tl.sum(wv * hv[None, :], axis=1)
    return acc


@triton.jit
def _down_gemv(h_ptr, ids_ptr, w_ptr, down_ptr, sh_ptr, sdown_ptr, out_ptr, d, F, FS,
               K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
               ACC2D: tl.constexpr, UNROLL: tl.constexpr):
    """One program per (token, d block): all k experts and the shared expert in sequence."""
    t = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < d
    routed = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(K):
        e = tl.load(ids_ptr + t * K + s)
        ws = tl.load(w_ptr + t * K + s)
        part = _row_block_dot(down_ptr + e * d * F + offs_d[:, None].to(tl.int64) * F, h_ptr + (t * K + s) * F,
                              0, F, offs_d, md, BLOCK_D, BLOCK_F, ACC2D, UNROLL)
        routed += part.to(out_ptr.dtype.element_ty).to(tl.float32) * ws  # expert output in model dtype
    res = routed.to(out_ptr.dtype.element_ty)
    if HAS_SHARED:
        sacc = _row_block_dot(sdown_ptr + offs_d[:, None].to(tl.int64) * FS, sh_ptr + t * FS, 0, FS, offs_d, md,
                              BLOCK_D, BLOCK_F, ACC2D, UNROLL)
        res = (res.to(tl.float32) + sacc.to(out_ptr.dtype.element_ty).to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * d + offs_d, res, mask=md)


@triton.jit
def _down_gemv_slots(h_ptr, ids_ptr, w_ptr, down_ptr, sh_ptr, sdown_ptr, part_ptr, d, F, FS, FSP,
                     K: tl.constexpr, NSLOT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
                     ACC2D: tl.constexpr, UNROLL: tl.constexpr):
    """One program per (token, d block, slot): slot s < K is routed expert s (its output rounded to the
    model dtype, times its weight); slot K + p is columns [p*FSP, (p+1)*FSP) of the shared expert.
    Writes the fp32 partial [T, NSLOT, d]; ``_down_finalize`` sums the slots in a fixed order."""
    t = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1)
    s = tl.program_id(2)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < d
    if s < K:
        e = tl.load(ids_ptr + t * K + s)
        ws = tl.load(w_ptr + t * K + s)
        part = _row_block_dot(down_ptr + e * d * F + offs_d[:, None].to(tl.int64) * F, h_ptr + (t * K + s) * F,
                              0, F, offs_d, md, BLOCK_D, BLOCK_F, ACC2D, UNROLL)
        val = part.to(h_ptr.dtype.element_ty).to(tl.float32) * ws
    else:
        c0 = (s - K) * FSP
        c1 = tl.minimum(c0 + FSP, FS)
        val = _row_block_dot(sdown_ptr + offs_d[:, None].to(tl.int64) * FS, sh_ptr + t * FS, c0, c1, offs_d, md,
                             BLOCK_D, BLOCK_F, ACC2D, UNROLL)
    tl.store(part_ptr + (t * NSLOT + s) * d + offs_d, val, mask=md)


@triton.jit
def _down_finalize(part_ptr, out_ptr, d, K: tl.constexpr, NSLOT: tl.constexpr, BLOCK: tl.constexpr):
    """out = round(round(sum of the routed slots) + round(sum of the shared slots)), slots in order."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < d
    routed = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(K):
        routed += tl.load(part_ptr + (t * NSLOT + s) * d + offs, mask=m, other=0.0)
    res = routed.to(out_ptr.dtype.element_ty)
    if NSLOT > K:
        shared = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(K, NSLOT):
            shared += tl.load(part_ptr + (t * NSLOT + s) * d + offs, mask=m, other=0.0)
        res = (res.to(tl.float32) + shared.to(out_ptr.dtype.element_ty).to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * d + offs, res, mask=m)


# Launch shapes: the decode GEMVs are bandwidth-bound (a token reads 6 routed experts + the shared
# one, 160 MB per MoE layer at the released shapes), so what matters is enough bytes in flight on
# all 132 SMs. ``down_mode``: "rows" = one program per (token, d block) walking all experts in
# sequence (672 programs at batch 1: too few loads in flight); "slots" = one program per (token,
# d block, slot), the shared expert cut into pieces of about F columns, fp32 partials summed in a
# fixed order by a tiny second kernel (deterministic; no atomics). ``acc2d``: per-lane partial sums
# reduced once per row block instead of a cross-warp reduction per step. Chosen on an H200 by
# bench/model.py --tune-only (bench/RESULTS.md, "model" section): one MoE layer at batch 1 under a
# CUDA graph, 67.5 us with up 8x512 / down "rows" 4x512, 56.6 us with up 4x1024 / down "slots".
_GEMV: dict[str, int | str | bool] = {
    "up_block_f": 4, "up_block_d": 1024, "up_warps": 4, "up_acc2d": False, "up_unroll": 1, "up_stages": 3,
    "down_mode": "slots", "down_block_d": 4, "down_block_f": 512, "down_warps": 4, "down_acc2d": False,
    "down_unroll": 1, "down_stages": 3, "fin_block": 512,
}
_GEMV_MAX_ASSIGNMENTS = 64  # above this many (token, slot) pairs the grouped GEMM is used


def _stages(n: int) -> dict[str, int]:
    """num_stages launch option (the interpreter takes none)."""
    return {} if interpreting() else {"num_stages": n}


def _moe_decode(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                shared_up: torch.Tensor | None, shared_down: torch.Tensor | None) -> torch.Tensor:
    t, d = x.shape
    k = ids.shape[1]
    f = up.shape[1]
    has_shared = shared_up is not None and shared_down is not None
    fs = shared_up.shape[0] if shared_up is not None else 1
    h = torch.empty(t * k, f, device=x.device, dtype=x.dtype)
    sh = torch.empty(t, fs, device=x.device, dtype=x.dtype)
    sup = shared_up if shared_up is not None else up
    sdown = shared_down if shared_down is not None else down
    c = _GEMV
    n_assign = t * k + (t if has_shared else 0)
    grid_up = (n_assign, triton.cdiv(max(f, fs if has_shared else 1), int(c["up_block_f"])))
    _up_gemv[grid_up](x, ids, up, h, sup, sh, d, f, fs, t, K=k, HAS_SHARED=has_shared,
                      BLOCK_F=int(c["up_block_f"]), BLOCK_D=int(c["up_block_d"]), ACC2D=bool(c["up_acc2d"]),
                      UNROLL=int(c["up_unroll"]), num_warps=int(c["up_warps"]), **_stages(int(c["up_stages"])))
    out = torch.empty(t, d, device=x.device, dtype=x.dtype)
    bd, bf = int(c["down_block_d"]), int(c["down_block_f"])
    kw = {"BLOCK_D": bd, "BLOCK_F": bf, "ACC2D": bool(c["down_acc2d"]), "UNROLL": int(c["down_unroll"]),
          "num_warps": int(c["down_warps"]), **_stages(int(c["down_stages"]))}
    if c["down_mode"] == "slots":
        nsh = triton.cdiv(fs, f) if has_shared else 0  # shared pieces of about F columns
        fsp = triton.cdiv(fs, nsh) if nsh else 1
        nslot = k + nsh
        part = torch.empty(t, nslot, d, device=x.device, dtype=torch.float32)
        _down_gemv_slots[(t, triton.cdiv(d, bd), nslot)](h, ids, w, down, sh, sdown, part, d, f, fs, fsp, K=k,
                                                          NSLOT=nslot, **kw)
        fb = int(c["fin_block"])
        _down_finalize[(t, triton.cdiv(d, fb))](part, out, d, K=k, NSLOT=nslot, BLOCK=fb, num_warps=4)
        return out
    _down_gemv[(t, triton.cdiv(d, bd))](h, ids, w, down, sh, sdown, out, d, f, fs, K=k, HAS_SHARED=has_shared, **kw)
    return out


# --- prefill: grouped GEMM over assignments sorted by expert -------------------------------------


def _align(ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sort assignments by expert and pad each expert's run to a multiple of ``block_m`` (on the device).

    Returns (rows [n_blocks * block_m] assignment index or -1 for padding, expert of each block
    [n_blocks] (-1 for unused blocks), n_blocks). ``n_blocks`` is an upper bound that depends only
    on the shapes, so no host synchronisation is needed.
    """
    flat = ids.reshape(-1)
    n = flat.numel()
    dev = flat.device
    counts = torch.zeros(n_experts, device=dev, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded  # [E] first padded row of each expert
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    sorted_e = flat[order]
    first_sorted = torch.cumsum(counts, 0) - counts  # [E] first sorted index of each expert
    rank = torch.arange(n, device=dev) - first_sorted[sorted_e]  # rank inside its expert
    n_blocks = triton.cdiv(n, block_m) + min(n_experts, n)
    rows = torch.full((n_blocks * block_m,), -1, device=dev, dtype=torch.int64)
    rows[starts[sorted_e] + rank] = order
    block_start = torch.arange(n_blocks, device=dev) * block_m
    e_of_block = torch.searchsorted(ends, block_start, right=True)  # expert whose padded run holds the block
    e_of_block = torch.where(e_of_block < n_experts, e_of_block, torch.full_like(e_of_block, -1))
    return rows, e_of_block, n_blocks


@triton.jit
def _up_gemm(x_ptr, rows_ptr, eblk_ptr, up_ptr, h_ptr, d, F, K: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_FAST: tl.constexpr):
    if N_FAST:  # the column blocks of one row block run together: its A rows are re-read from L2
        mb = tl.program_id(1).to(tl.int64)
        nb = tl.program_id(0)
    else:
        mb = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
    e = tl.load(eblk_ptr + mb)
    if e >= 0:
        rows = tl.load(rows_ptr + mb * BLOCK_M + tl.arange(0, BLOCK_M))  # assignment ids (-1 = pad)
        valid = rows >= 0
        tok = tl.where(valid, rows // K, 0)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < F
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < d
            a = tl.load(x_ptr + tok[:, None] * d + offs_k[None, :], mask=valid[:, None] & mk[None, :], other=0.0)
            b = tl.load(up_ptr + e * F * d + offs_n[None, :].to(tl.int64) * d + offs_k[:, None],
                        mask=mn[None, :] & mk[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        r = tl.maximum(acc.to(h_ptr.dtype.element_ty).to(tl.float32), 0.0)
        tl.store(h_ptr + tl.where(valid, rows, 0)[:, None] * F + offs_n[None, :], (r * r).to(h_ptr.dtype.element_ty),
                 mask=valid[:, None] & mn[None, :])


@triton.jit
def _down_gemm(h_ptr, rows_ptr, eblk_ptr, w_ptr, down_ptr, out_ptr, d, F, K: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_FAST: tl.constexpr,
               SCATTER: tl.constexpr):
    """``SCATTER``: store each assignment's expert output (model dtype) in its own row of out
    [T*K, d] for ``_sum_slots``; else add weight * output atomically into the fp32 out [T, d]."""
    if N_FAST:
        mb = tl.program_id(1).to(tl.int64)
        nb = tl.program_id(0)
    else:
        mb = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
    e = tl.load(eblk_ptr + mb)
    if e >= 0:
        rows = tl.load(rows_ptr + mb * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows >= 0
        safe = tl.where(valid, rows, 0)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < d
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < F
            a = tl.load(h_ptr + safe[:, None] * F + offs_k[None, :], mask=valid[:, None] & mk[None, :], other=0.0)
            b = tl.load(down_ptr + e * d * F + offs_n[None, :].to(tl.int64) * F + offs_k[:, None],
                        mask=mn[None, :] & mk[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if SCATTER:
            tl.store(out_ptr + safe[:, None] * d + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=valid[:, None] & mn[None, :])
        else:
            wt = tl.load(w_ptr + safe, mask=valid, other=0.0)
            val = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * wt[:, None]
            tl.atomic_add(out_ptr + (safe // K)[:, None] * d + offs_n[None, :], val,
                          mask=valid[:, None] & mn[None, :])


@triton.jit
def _sum_slots(y_ptr, w_ptr, out_ptr, d, K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = round(sum_s w[t, s] * y[t*K + s]) with the products and the sum in fp32, s in order."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < d
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(K):
        acc += tl.load(y_ptr + (t * K + s) * d + offs, mask=m, other=0.0).to(tl.float32) * tl.load(w_ptr + t * K + s)
    tl.store(out_ptr + t * d + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


#: Grouped GEMM launch table. ``n_fast``: column blocks vary fastest in the grid (a row block's
#: gathered A rows stay in L2 across its column blocks); ``scatter``: the down GEMM stores each
#: assignment's output and a second kernel sums a token's k slots (no fp32 atomics, deterministic).
#: H200, 32K tokens x 6 experts (bench/model.py --tune-only): 12.8 ms with 64x128x64 / 4 warps, row
#: blocks fastest and atomics; 8.4 ms with this table.
_GEMM: dict[str, int | bool] = {"block_m": 128, "block_n": 128, "block_k": 64, "warps": 8, "stages": 3,
                                "n_fast": True, "scatter": True}


def _moe_prefill(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 shared_up: torch.Tensor | None, shared_down: torch.Tensor | None) -> torch.Tensor:
    t, d = x.shape
    k = ids.shape[1]
    e, f, _ = up.shape
    c = dict(_GEMM)
    if interpreting():
        c.update(block_m=16, block_n=32, block_k=32)
    bm = int(c["block_m"])
    rows, e_of_block, n_blocks = _align(ids, e, bm)
    ieee = x.dtype == torch.float32
    x = x.contiguous()
    h = torch.empty(t * k, f, device=x.device, dtype=x.dtype)
    bn, bk, n_fast, scatter = int(c["block_n"]), int(c["block_k"]), bool(c["n_fast"]), bool(c["scatter"])
    kw: dict[str, int] = {"num_warps": int(c["warps"]), **_stages(int(c["stages"]))}

    def grid(n_cols: int) -> tuple[int, int]:
        return (n_cols, n_blocks) if n_fast else (n_blocks, n_cols)

    _up_gemm[grid(triton.cdiv(f, bn))](x, rows, e_of_block, up, h, d, f, K=k, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn,
                                        BLOCK_K=bk, N_FAST=n_fast, **kw)
    wf = w.reshape(-1).float().contiguous()
    if scatter:
        y = torch.empty(t * k, d, device=x.device, dtype=x.dtype)
        _down_gemm[grid(triton.cdiv(d, bn))](h, rows, e_of_block, wf, down, y, d, f, K=k, IEEE=ieee, BLOCK_M=bm,
                                              BLOCK_N=bn, BLOCK_K=bk, N_FAST=n_fast, SCATTER=True, **kw)
        result = torch.empty(t, d, device=x.device, dtype=x.dtype)
        _sum_slots[(t, triton.cdiv(d, 1024))](y, wf, result, d, K=k, BLOCK=1024, num_warps=4)
    else:
        routed = torch.zeros(t, d, device=x.device, dtype=torch.float32)
        _down_gemm[grid(triton.cdiv(d, bn))](h, rows, e_of_block, wf, down, routed, d, f, K=k, IEEE=ieee, BLOCK_M=bm,
                                              BLOCK_N=bn, BLOCK_K=bk, N_FAST=n_fast, SCATTER=False, **kw)
        result = routed.to(x.dtype)
    if shared_up is not None and shared_down is not None:
        hs = torch.relu(torch.nn.functional.linear(x, shared_up)).square()
        result = result + torch.nn.functional.linear(hs, shared_down)
    return result


def moe_experts_triton(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                       shared_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None) -> torch.Tensor:
    """Routed (+ shared) relu^2 experts: x [T, d], ids/w [T, k], up [E, F, d], down [E, d, F] -> [T, d].

    GEMV kernels when there are at most 64 (token, slot) assignments (decode), else the grouped
    GEMM. Both have shape-only grids (CUDA-graph safe).
    """
    x, ids, w = x.contiguous(), ids.contiguous(), w.float().contiguous()
    if up.stride(-1) != 1 or down.stride(-1) != 1 or not up.is_contiguous() or not down.is_contiguous():
        raise ValueError("stacked expert weights must be contiguous")
    if ids.numel() <= _GEMV_MAX_ASSIGNMENTS:
        return _moe_decode(x, ids, w, up, down, shared_up, shared_down)
    return _moe_prefill(x, ids, w, up, down, shared_up, shared_down)
