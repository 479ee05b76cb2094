"""RMSNorm (block and final norms) and the gated grouped RMSNorm of the Mamba-2 mixer.

Axis legend: ``...`` any leading axes, ``D`` the normalised width, ``G`` groups, ``S`` group size.

    >>> import torch
    >>> norm = RMSNorm(8, eps=1e-5)
    >>> y = norm(torch.ones(2, 3, 8))
    >>> tuple(y.shape), round(float(y.detach()[0, 0, 0]), 4)
    ((2, 3, 8), 1.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedRMSNorm", "RMSNorm"]


class RMSNorm(nn.Module):
    """``y = w * x * rsqrt(mean(x^2) + eps)``, computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., D]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2 output norm, "norm after gate": ``v = y * silu(z)``, RMSNorm per group of ``S``, times w.

    Computed in fp32; the result is cast to the input dtype before the weight multiply (as upstream).
    """

    def __init__(self, dim: int, group_size: int, eps: float, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"dim {dim} is not a multiple of group_size {group_size}")
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # y, z: [..., D]
        v = y.float() * F.silu(z.float())
        lead = v.shape[:-1]
        vg = v.reshape(*lead, -1, self.group_size)  # [..., G, S]
        vg = vg * torch.rsqrt(vg.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * vg.reshape(*lead, -1).to(y.dtype)
