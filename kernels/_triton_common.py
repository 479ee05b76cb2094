"""Triton helpers shared by the search, prefill and decode kernels, and per-device constants.

Rules every kernel here follows (spec/environment.md section 3):
* plain pointer arithmetic (no block pointers / tensor descriptors), int64 offsets;
* every load is masked, so the unfilled tail of a static cache is never read;
* under the CPU interpreter bf16 arithmetic is wrong, so launchers set ``UPCAST`` there and the
  kernels convert right after ``tl.load``;
* span extents follow :func:`secure_run.kernels._schedule.span_extent` in the position mode of the
  parameters (float64 snap rule, or upstream's fp32 formula), with the constants loaded from a
  float64 tensor (a Python float argument would arrive as fp32).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch), Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:  # pragma: no cover - every Triton the runner supports has it
    HAS_PDL = False

from secure_run.kernels._schedule import stripe_offsets
from secure_run.kernels.params import SpanParams, fp32

NEG_INF = float("-inf")


def interpreting() -> bool:
    """True when kernels run under the Triton CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=32)
def _consts_cached(params: SpanParams, device: str) -> torch.Tensor:
    vals = [params.backward_factor, params.forward_factor, params.span_power, 0.0]
    if params.upstream_fp32:
        vals = [fp32(params.backward_factor), fp32(params.forward_factor), fp32(params.span_power), 1.0]
    return torch.tensor(vals, dtype=torch.float64, device=device)


def span_consts(params: SpanParams, device: torch.device) -> torch.Tensor:
    """[backward_factor, forward_factor, span_power, fp32 flag] as a float64 device tensor (cached).

    In ``upstream-fp32`` mode the three constants are rounded to float32 and the flag is 1.
    """
    return _consts_cached(params, str(device))


@functools.lru_cache(maxsize=32)
def _offsets_cached(params: SpanParams, max_t: int, device: str) -> torch.Tensor:
    return stripe_offsets(params, max_t).to(device=device, dtype=torch.int64)


def device_offsets(params: SpanParams, max_t: int, device: torch.device) -> torch.Tensor:
    """Stripe offset table F(i) on ``device`` (cached per params, length and device)."""
    return _offsets_cached(params, int(max_t), str(device))


@functools.lru_cache(maxsize=16)
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch is available for kernels on ``device`` (Hopper or later)."""
    return HAS_PDL and device.type == "cuda" and not interpreting() and _capability_major(device) >= 9


def pdl_launch(pdl: bool) -> dict[str, bool]:
    """Launch options of a kernel that calls :func:`grid_dependency` (programmatic dependent
    launch, Hopper and later; nothing under the interpreter or when ``pdl`` is off)."""
    assert not pdl or HAS_PDL, "programmatic dependent launch needs Triton >= 3.4"
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def grid_dependency(PDL: tl.constexpr):
    """First statement of a kernel launched with :func:`pdl_launch`: let the next kernel of the
    stream launch now (its programs wait in their own ``grid_dependency`` until this grid has
    finished), then wait for the previous kernel to finish and its writes to be visible. Called
    before any global memory access, so every read-after-write and write-after-read order of the
    stream holds as with an ordinary launch; only the launch latency and the programs' start-up
    overlap the previous kernel's tail."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not silently drop to tf32 (the fp32 tolerance is 1e-4)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def span_bounds(a, pos, s0, Lkv, W, CONSTS, FWD: tl.constexpr, HAS_W: tl.constexpr):
    """(qstart, qend) of the spans around anchors ``a`` (any shape; -1, -1 where a < 0): model.md 3.5.

    The extents ceil(factor * t ** span_power), t = pos + 1 - s0, follow ``_schedule.span_extent``
    (kept inline: nested jit calls are slow under the interpreter): the float64 snap rule, or with
    the fp32 flag CONSTS[3] set, upstream's ceil(fl32(fl32(factor) * fl32(t ** fl32(power)))).
    """
    t = tl.maximum(pos + 1 - s0, 0).to(tl.float64)
    power = tl.load(CONSTS + 2)
    up32 = tl.load(CONSTS + 3) != 0.0
    tp = tl.where(t > 0, tl.exp(power * tl.log(tl.maximum(t, 1.0))), 0.0)
    tp32 = tp.to(tl.float32)
    xb = tp * tl.load(CONSTS + 0)
    rb = tl.floor(xb + 0.5)
    lb = tl.where(tl.abs(xb - rb) <= 1e-9 * tl.maximum(xb, 1.0), rb, tl.ceil(xb)).to(tl.int64)
    lb = tl.where(up32, tl.ceil(tp32 * tl.load(CONSTS + 0).to(tl.float32)).to(tl.int64), lb)
    qs = tl.maximum(tl.maximum(a - lb, s0), 0)
    if FWD:
        xf = tp * tl.load(CONSTS + 1)
        rf = tl.floor(xf + 0.5)
        lf = tl.where(tl.abs(xf - rf) <= 1e-9 * tl.maximum(xf, 1.0), rf, tl.ceil(xf)).to(tl.int64)
        lf = tl.where(up32, tl.ceil(tp32 * tl.load(CONSTS + 1).to(tl.float32)).to(tl.int64), lf)
        qe = tl.minimum(tl.minimum(a + lf, pos), Lkv - 1)
        if HAS_W:
            qe = tl.minimum(qe, tl.maximum(pos - W + 1, 0) - 1)
    else:
        qe = a
    qs = tl.where(a < 0, -1, qs)
    qe = tl.where(a < 0, -1, qe)
    return qs, qe


def tma_descriptor(x: torch.Tensor, block_n: int, block_d: int) -> object | None:
    """A TMA descriptor over ``x`` [B, H, L, D] seen as one [rows, D] matrix (row of (b, h, key) =
    b * s_b / s_l + h * s_h / s_l + key), or None where that view or TMA does not apply: D must fill
    the block, 16-bit elements, rows 16-byte aligned, batch and head strides whole rows."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, L, D = x.shape
    s_b, s_h, s_l, s_d = x.stride()
    if (D != block_d or x.element_size() != 2 or s_d != 1 or (s_l * 2) % 16 or x.data_ptr() % 16
            or s_b % s_l or s_h % s_l):
        return None
    rows = ((B - 1) * s_b + (H - 1) * s_h) // s_l + L
    if rows >= 1 << 31:
        return None
    return TensorDescriptor(x, shape=[rows, D], strides=[s_l, 1], block_shape=[block_n, block_d])
