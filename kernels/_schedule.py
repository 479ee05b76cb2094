"""Shared scheduling arithmetic: the stripe (anchor offset) table and span extents.

Both the PyTorch reference and the Triton launchers take these numbers from here, so the two
backends agree bit for bit on which keys a query may touch (spec/model.md sections 3.1, 3.3, 3.5).
The stripe offsets F(i) are evaluated on the host in float64 (as upstream's Python does) and
handed to the kernels as an int table, so the fp32 exp/log rounding of upstream's kernels (model.md
section 3.1) never arises here.

    >>> from secure_run.kernels.params import SpanParams
    >>> p = SpanParams(sw_index=3, num_spans=2, backward_factor=2.0, forward_factor=0.0,
    ...                span_power=0.5, inv_search_power_int=2)
    >>> stripe_offsets(p, 40).tolist()
    [16, 25, 36]
"""

from __future__ import annotations

import functools

import torch

from secure_run.kernels.params import SpanParams


@functools.lru_cache(maxsize=64)
def _stripe_offsets_cached(params: SpanParams, max_t: int) -> tuple[int, ...]:
    imax = params.max_stripe_index(max_t)
    return tuple(params.floor_power(i) for i in range(params.sw_index + 1, imax + 1))


def stripe_offsets(params: SpanParams, max_t: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """F(i) for the stripes i = sw_index+1 .. i_max(max_t), as an int64 tensor [S] (S may be 0).

    A query at position q has candidate anchors ``q + 1 - F(i)``; the table for ``max_t`` covers
    every query with ``q + 1 <= max_t`` (entries beyond a query's own i_max give negative anchors,
    which callers mark invalid).
    """
    offs = _stripe_offsets_cached(params, int(max_t))
    return torch.tensor(offs, dtype=torch.int64, device=device)


def span_extent(t: torch.Tensor, factor: float, power: float) -> torch.Tensor:
    """ceil(factor * t ** power) as int64, evaluated so that every backend gets the same integer.

    Upstream evaluates this in float32 (model.md section 3.5), where e.g. 32 ** 0.6 = 8 comes out
    as 7.9999995 or 8.0000005 depending on the pow implementation (torch's vectorised and scalar
    CPU paths differ), so the span length would depend on the chunk size. We evaluate in float64
    and snap values within 1e-9 (relative) of an integer onto it before the ceil: exact powers give
    exact lengths (2 * 32 ** 0.6 -> 16), and any two float64 pow implementations agree.

    Args:
        t: token counts (any integer shape), t >= 0.
        factor: backward_factor or forward_factor.
        power: span_power.
    """
    x = t.to(torch.float64).pow(power) * factor
    r = torch.round(x)
    snapped = (x - r).abs() <= 1e-9 * x.clamp(min=1.0)
    return torch.where(snapped, r, torch.ceil(x)).to(torch.int64)


def first_valid_key(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """s0 per batch row: index of the first valid key (argmax of the mask), 0 without a mask. [B] int64."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    return (attention_mask != 0).to(torch.int32).argmax(dim=1).to(torch.int64)
