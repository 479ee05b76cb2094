"""Triton GEMV for the dense decode projections: ``y_i = x W_i^T`` for up to four weights sharing x.

Decode reads every weight matrix once per token with one or a few activation rows, so these
products are bandwidth-bound GEMVs (Mamba ``in_proj`` / ``out_proj``, the attention projections,
``lm_head``). One launch covers up to four weights of the same input width (the attention layer's
``q_search`` / ``q`` / ``k`` / ``v``): the programs are numbered over the row blocks of all of them,
each program finds its weight by comparing its id with the segment starts.

* ``M == 1`` (single-sequence decode): one program per ``BLOCK_N`` output rows walks the whole
  input width in ``BLOCK_K`` steps, fp32 products reduced per step (a fixed order: deterministic,
  no atomics, no split-K; small ``BLOCK_N`` gives enough programs where N is the hidden size).
* ``2 <= M <= 16`` (batched decode): x padded to 16 rows, one ``tl.dot`` per ``BLOCK_K`` step with
  fp32 accumulation (``ieee`` for fp32 inputs). Measured no faster than cuBLAS on an H200, so the
  model's dispatch sends only one-row products here (``DISPATCH_MAX_ROWS``).

The result is rounded to the weight dtype like ``nn.Linear``. Loads are converted to fp32 right after
``tl.load`` (the interpreter's bf16 arithmetic is wrong, see ``_triton_common``).

Axis legend: ``M`` activation rows (tokens), ``K`` input width, ``N`` output rows of a weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import interpreting

__all__ = ["DISPATCH_MAX_ROWS", "GEMV_MAX_ROWS", "gemv_triton"]

#: most activation rows the GEMV path takes (more: F.linear, a GEMM)
GEMV_MAX_ROWS = 16
_MAX_SEG = 4


@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "nb1", "nb2", "nb3"])
def _gemv(x_ptr, w0, w1, w2, w3, o0, o1, o2, o3, n0, n1, n2, n3, nb1, nb2, nb3, M, K,
          NSEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          IEEE: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid
    w_ptr = w0
    o_ptr = o0
    n = n0
    if NSEG > 1:
        if pid >= nb1:
            blk = pid - nb1
            w_ptr = w1
            o_ptr = o1
            n = n1
    if NSEG > 2:
        if pid >= nb2:
            blk = pid - nb2
            w_ptr = w2
            o_ptr = o2
            n = n2
    if NSEG > 3:
        if pid >= nb3:
            blk = pid - nb3
            w_ptr = w3
            o_ptr = o3
            n = n3
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < n
    if BLOCK_M == 1:
        wrow = w_ptr + offs_n[:, None].to(tl.int64) * K
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            xv = tl.load(x_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
            wv = tl.load(wrow + offs_k[None, :], mask=mn[:, None] & mk[None, :], other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
        tl.store(o_ptr + offs_n, acc.to(o_ptr.dtype.element_ty), mask=mn)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        mm = offs_m < M
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            xv = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=mm[:, None] & mk[None, :],
                         other=0.0)
            wv = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], mask=mn[None, :] & mk[:, None],
                         other=0.0, eviction_policy="evict_first")  # [BLOCK_K, BLOCK_N] = W^T tile
            if IEEE:
                acc2 = tl.dot(xv, wv, acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(xv, wv, acc2)
        tl.store(o_ptr + offs_m[:, None].to(tl.int64) * n + offs_n[None, :], acc2.to(o_ptr.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])


#: Launch shapes, chosen on an H200 by ``bench/model.py --tune-gemv`` (bench/RESULTS.md, "model"):
#: "m1" for one activation row, "mdot" for 2..16 rows. The ``m1_small_n`` entry is used when the
#: launch has fewer than ``_SMALL_N_ROWS`` output rows in all (the hidden-size outputs: ``out_proj``,
#: ``o_proj``). Graphed, 4 rotating weight sets, 2026-12-02: in_proj 16.8 us (3.30 TB/s; cuBLAS 17.1),
#: out_proj 8.7 us (2.54 TB/s; cuBLAS 11.7), q_search+q+k+v in one launch 15.3 us (3.05 TB/s; four
#: cuBLAS calls 35.1), lm_head 164.5 us (4.28 TB/s; cuBLAS 171.9). 4 output rows per program were
#: 10-37% slower, 1 row 10-20% slower.
_GEMV_TABLE: dict[str, dict[str, int]] = {
    "m1": {"block_n": 2, "block_k": 1024, "warps": 4, "stages": 3},
    "m1_small_n": {"block_n": 2, "block_k": 2048, "warps": 8, "stages": 3},
    "mdot": {"block_n": 32, "block_k": 128, "warps": 4, "stages": 4},
}
#: Most rows :func:`secure_run.kernels.decode_linears` sends here. The 2..16-row ``tl.dot`` path
#: measured no faster than cuBLAS (in_proj 17.2 vs 17.5 us at 4 rows, out_proj 12.9 vs 11.7), so
#: batched decode keeps F.linear; the path stays tested and selectable.
DISPATCH_MAX_ROWS = 1
_SMALL_N_ROWS = 4096


def _config(m: int, n_total: int) -> dict[str, int]:
    if m > 1:
        c = dict(_GEMV_TABLE["mdot"])
    else:
        c = dict(_GEMV_TABLE["m1_small_n" if n_total < _SMALL_N_ROWS else "m1"])
    if interpreting():  # small tiles keep the CPU interpreter fast; same code path
        c.update(block_k=min(c["block_k"], 64), block_n=16 if m > 1 else min(c["block_n"], 4))
    return c


def gemv_triton(x: torch.Tensor, weights: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """x [M, K] (M <= 16) and up to four weights [N_i, K] (one dtype, as nn.Linear stores them)
    -> [x W_i^T] each [M, N_i] in the weights' dtype, in one launch."""
    if not 1 <= len(weights) <= _MAX_SEG:
        raise ValueError(f"gemv_triton takes 1..{_MAX_SEG} weights, got {len(weights)}")
    m, k = x.shape
    if not 1 <= m <= GEMV_MAX_ROWS:
        raise ValueError(f"gemv_triton takes 1..{GEMV_MAX_ROWS} rows, got {m}")
    dtype = weights[0].dtype
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k or w.dtype != dtype or w.device != x.device:
            raise ValueError("every weight must be [N, K] with x's K, one dtype, on x's device")
    x = x.to(dtype).contiguous()
    ws = [w.contiguous() for w in weights]
    ns = [w.shape[0] for w in ws]
    outs = [torch.empty(m, n, device=x.device, dtype=dtype) for n in ns]
    c = _config(m, sum(ns))
    bn = c["block_n"]
    starts = [0]
    for n in ns:
        starts.append(starts[-1] + triton.cdiv(n, bn))
    nseg = len(ws)
    pad_w = ws + [ws[0]] * (_MAX_SEG - nseg)
    pad_o = outs + [outs[0]] * (_MAX_SEG - nseg)
    pad_n = ns + [0] * (_MAX_SEG - nseg)
    seg_starts = starts[1:nseg] + [starts[-1]] * (_MAX_SEG - nseg)  # nb1..nb3 (unused ones: the end)
    kw = {} if interpreting() else {"num_stages": c["stages"]}
    _gemv[(starts[-1],)](x, *pad_w, *pad_o, *pad_n, *seg_starts, m, k, NSEG=nseg, BLOCK_M=1 if m == 1 else 16,
                         BLOCK_N=bn, BLOCK_K=c["block_k"], IEEE=dtype == torch.float32, num_warps=c["warps"], **kw)
    return outs
