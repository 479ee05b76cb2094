"""Triton fused residual add + RMSNorm: ``h2 = h + out``; ``x = RMSNorm(h2) * w`` in one pass.

One program per row (the hidden width fits one block: 2688 -> 4096 lanes). This replaces the
residual add of one block and the pre-norm of the next (or the final norm), i.e. four elementwise
launches and two passes over the row, with one. Same rounding as
:func:`secure_run.kernels.model_reference.add_rmsnorm_reference`: the sum is rounded to h's dtype
first and the norm is computed from the rounded value in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from secure_run.kernels._triton_common import next_pow2

__all__ = ["add_rmsnorm_triton"]


@triton.jit
def _add_rmsnorm(h_ptr, o_ptr, w_ptr, h2_ptr, x_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    hv = tl.load(h_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    ov = tl.load(o_ptr + row * D + offs, mask=m, other=0.0).to(h2_ptr.dtype.element_ty).to(tl.float32)
    s = (hv + ov).to(h2_ptr.dtype.element_ty)
    tl.store(h2_ptr + row * D + offs, s, mask=m)
    sf = s.to(x_ptr.dtype.element_ty).to(tl.float32)
    rs = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * D + offs, (w * (sf * rs)).to(x_ptr.dtype.element_ty), mask=m)


def add_rmsnorm_triton(h: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h, out [..., D]; weight [D] -> (h + out in h's dtype, RMSNorm(h + out) * weight in weight's dtype)."""
    d = h.shape[-1]
    hc, oc = h.contiguous(), out.contiguous()
    h2 = torch.empty_like(hc)
    x = torch.empty(h.shape, device=h.device, dtype=weight.dtype)
    rows = hc.numel() // d
    block = next_pow2(d)
    _add_rmsnorm[(rows,)](hc, oc, weight, h2, x, d, float(eps), BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return h2, x
