"""Shared scheduling arithmetic: the stripe (anchor offset) table and span extents.

Both the PyTorch reference and the Triton launchers take these numbers from here, so the two
backends agree bit for bit on which keys a query may touch (spec/model.md sections 3.1, 3.3, 3.5).
The stripe offsets F(i) are evaluated on the host (:meth:`SpanParams.floor_power`, in the
position mode of the parameters) and handed to the kernels as an int table, so every backend and
device reads the same integers: exact float64 in ``exact`` mode, upstream's correctly rounded fp32
formula in ``upstream-fp32`` mode (model.md sections 3.1 and 3.5).

    >>> from secure_run.kernels.params import PositionMode, SpanParams, fp32
    >>> p = SpanParams(sw_index=3, num_spans=2, backward_factor=2.0, forward_factor=0.0,
    ...                span_power=0.5, inv_search_power_int=2)
    >>> stripe_offsets(p, 40).tolist()
    [16, 25, 36]
"""

from __future__ import annotations

import functools

import torch

from secure_run.kernels.params import PositionMode, SpanParams, fp32


@functools.lru_cache(maxsize=64)
def _stripe_offsets_cached(params: SpanParams, max_t: int) -> tuple[int, ...]:
    imax = params.max_stripe_index(max_t)
    offs = (params.floor_power(i) for i in range(params.sw_index + 1, imax + 1))
    # an offset <= W would put the anchor inside the window: impossible in exact arithmetic, and
    # dropped in upstream-fp32 mode as upstream's decode does (model.md section 3.10)
    return tuple(f for f in offs if f > params.window_len)


def stripe_offsets(params: SpanParams, max_t: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """F(i) for the stripes i = sw_index+1 .. i_max(max_t), as an int64 tensor [S] (S may be 0).

    A query at position q has candidate anchors ``q + 1 - F(i)``; the table for ``max_t`` covers
    every query with ``q + 1 <= max_t`` (entries beyond a query's own i_max give negative anchors,
    which callers mark invalid).
    """
    offs = _stripe_offsets_cached(params, int(max_t))
    return torch.tensor(offs, dtype=torch.int64, device=device)


def span_extent(t: torch.Tensor, factor: float, power: float, mode: PositionMode = "exact") -> torch.Tensor:
    """ceil(factor * t ** power) as int64, evaluated so that every backend gets the same integer.

    ``exact`` mode: upstream evaluates this in float32 (model.md section 3.5), where e.g.
    32 ** 0.6 = 8 comes out as 7.9999995 or 8.0000005 depending on the pow implementation (torch's
    vectorised and scalar CPU paths differ), so the span length would depend on the chunk size. We
    evaluate in float64 and snap values within 1e-9 (relative) of an integer onto it before the
    ceil: exact powers give exact lengths (2 * 32 ** 0.6 -> 16), and any two float64 pow
    implementations agree.

    ``upstream-fp32`` mode: upstream's formula ceil(fl32(fl32(factor) * fl32(t ** fl32(power)))),
    with the power evaluated in float64 and rounded once to float32 (the correctly rounded fp32
    power; the kernels compute the same, see ``_triton_common.span_bounds``).

    Args:
        t: token counts (any integer shape), t >= 0.
        factor: backward_factor or forward_factor.
        power: span_power.
        mode: the position mode.
    """
    if mode == "upstream-fp32":
        t64 = t.to(torch.float64)
        tp = torch.exp(fp32(power) * torch.log(t64.clamp(min=1.0)))
        tp32 = torch.where(t64 > 0, tp, 0.0).to(torch.float32)
        return torch.ceil(tp32 * torch.tensor(fp32(factor), dtype=torch.float32)).to(torch.int64)
    x = t.to(torch.float64).pow(power) * factor
    r = torch.round(x)
    snapped = (x - r).abs() <= 1e-9 * x.clamp(min=1.0)
    return torch.where(snapped, r, torch.ceil(x)).to(torch.int64)


def first_valid_key(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """s0 per batch row: index of the first valid key (argmax of the mask), 0 without a mask. [B] int64."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    return (attention_mask != 0).to(torch.int32).argmax(dim=1).to(torch.int64)
