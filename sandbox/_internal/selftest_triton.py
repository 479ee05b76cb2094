"""A tiny Triton kernel (vector add) the selftest compiles and runs inside the sandbox.

Imported only when a selftest request asks for Triton, so images without Triton never load it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + y, mask=mask)


def triton_add_check(device: str, n: int = 4099) -> float:
    """Run the kernel on ``n`` elements and return the max abs error against torch."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen).to(device)
    y = torch.randn(n, generator=gen).to(device)
    out = torch.empty_like(x)
    block = 1024
    _add_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    return float((out - (x + y)).abs().max().item())
