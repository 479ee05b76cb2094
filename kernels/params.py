"""Hyper-parameters of Superlinear attention and the power-law helpers (spec/model.md section 3.1).

    >>> p = SpanParams(sw_index=65, num_spans=3, backward_factor=3.0, forward_factor=1.0,
    ...                span_power=0.55, search_power=0.55)
    >>> p.window_len
    2032
    >>> SpanParams(sw_index=3, num_spans=2, backward_factor=2.0, forward_factor=0.0,
    ...            span_power=0.5, inv_search_power_int=2).window_len
    15
    >>> p.floor_power(2998), p.with_mode("upstream-fp32").floor_power(2998)
    (2096582, 2096583)

Position modes (spec/model.md section 3.5): ``"exact"`` evaluates the stripe offsets F(i) and the
span extents in exact arithmetic; ``"upstream-fp32"`` reproduces upstream's float32 formulas, which
the released weights were trained and evaluated with:

* F(i) = floor(fl32(fl32(i) ** fl32(1/p))) in float power mode (integer mode, and float mode with
  1/p an integer in 2..6, are exact integer powers in upstream too);
* extent = ceil(fl32(fl32(factor) * fl32(fl32(t) ** fl32(span_power)))).

Each fp32 power is the correctly rounded float32 value (float64 evaluation rounded once to float32),
so the CPU reference, the Triton interpreter and a GPU all get the same integers. These are
upstream's formulas as its decode path and its PyTorch reference write them (``fp32 ** x``): at 2M
context F differs from the exact value for 1,018 of 2,933 stripes, as measured on the H200. Two
limits, both from upstream evaluating its formulas with inexact fp32 functions: (1) a GPU's fp32
``pow`` is within an ulp of ours, so an F or extent whose fp32 value sits within an ulp of an
integer may round the other way there (tests/kernels/test_triton_gpu.py counts them); (2)
upstream's Triton prefill search evaluates F and the backward extent as ``exp(x * log(i))`` with the
GPU's approximate exp, which is less accurate than ``pow`` (e.g. 2 * sqrt(t) one too large at
perfect squares t in integer mode) and is not reproduced bit for bit. The window length
W = F_exact(sw+1) - 1 is computed in float64 by upstream (``window_len_from_sw_index``) and so is
the same in both modes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace
from typing import Literal

#: "exact": exact arithmetic; "upstream-fp32": upstream's float32 position arithmetic (module doc)
PositionMode = Literal["exact", "upstream-fp32"]
POSITION_MODES: tuple[str, ...] = ("exact", "upstream-fp32")


def fp32(x: float) -> float:
    """x rounded to the nearest float32 (as a Python float)."""
    out: float = struct.unpack("f", struct.pack("f", x))[0]
    return out


def fp32_power(base: float, exponent: float) -> float:
    """Correctly rounded float32 ``fl32(base) ** fl32(exponent)`` (float64 evaluation, one rounding)."""
    return fp32(fp32(float(base)) ** fp32(float(exponent)))


def fp32_extent(t: int, factor: float, power: float) -> int:
    """Upstream's span extent ceil(fl32(fl32(factor) * fl32(t ** fl32(power)))) (0 for t <= 0).

    The power is evaluated as exp(fl32(power) * log(t)) in float64 and rounded once to float32, the
    same operations as the tensor rule (``_schedule.span_extent``) and the Triton kernels.
    """
    if t <= 0:
        return 0
    return math.ceil(fp32(fp32(factor) * fp32(math.exp(fp32(power) * math.log(float(t))))))


def floor_nth_root(v: int, n: int) -> int:
    """Exact integer floor(v ** (1/n)) for v >= 0, n >= 1."""
    if v < 0 or n < 1:
        raise ValueError(f"floor_nth_root needs v >= 0 and n >= 1, got v={v}, n={n}")
    if v < 2 or n == 1:
        return v
    r = int(round(v ** (1.0 / n)))
    while r > 0 and r**n > v:
        r -= 1
    while (r + 1) ** n <= v:
        r += 1
    return r


@dataclass(frozen=True)
class SpanParams:
    """Superlinear attention hyper-parameters (config keys ``span_attention_*``).

    Exactly one of ``search_power`` (float mode, 0 < p < 1) and ``inv_search_power_int``
    (integer mode, n in 2..6, p = 1/n) is set. ``position_mode`` selects the arithmetic of the
    stripe offsets and span extents (module doc); the default is exact.
    """

    sw_index: int
    num_spans: int
    backward_factor: float
    forward_factor: float
    span_power: float
    search_power: float | None = None
    inv_search_power_int: int | None = None
    position_mode: PositionMode = "exact"

    def __post_init__(self) -> None:
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        if (self.search_power is None) == (self.inv_search_power_int is None):
            raise ValueError("exactly one of search_power and inv_search_power_int must be set")
        if self.inv_search_power_int is not None and self.inv_search_power_int not in range(2, 7):
            raise ValueError(f"inv_search_power_int must be in 2..6, got {self.inv_search_power_int}")
        if self.search_power is not None and not (0.0 < self.search_power < 1.0):
            raise ValueError(f"search_power must be in (0, 1), got {self.search_power}")
        if self.sw_index < 0:
            raise ValueError(f"sw_index must be >= 0, got {self.sw_index}")
        if self.num_spans < 1:
            raise ValueError(f"num_spans must be >= 1, got {self.num_spans}")
        if self.backward_factor < 0 or self.forward_factor < 0:
            raise ValueError("backward_factor and forward_factor must be >= 0")
        if not (0.0 < self.span_power <= 1.0):
            raise ValueError(f"span_power must be in (0, 1], got {self.span_power}")

    @property
    def integer_mode(self) -> bool:
        return self.inv_search_power_int is not None

    @property
    def inv_p(self) -> float:
        """1/p: n in integer mode, 1/search_power in float mode."""
        if self.inv_search_power_int is not None:
            return float(self.inv_search_power_int)
        assert self.search_power is not None
        return 1.0 / self.search_power

    @property
    def triton_inv_n(self) -> int:
        """n when p = 1/n exactly with n in 2..6 (exact integer path), else 0 (float path)."""
        if self.inv_search_power_int is not None:
            return self.inv_search_power_int
        inv = self.inv_p
        n = round(inv)
        return n if abs(inv - n) < 1e-12 and 2 <= n <= 6 else 0

    @property
    def upstream_fp32(self) -> bool:
        """True in the ``upstream-fp32`` position mode."""
        return self.position_mode == "upstream-fp32"

    def with_mode(self, mode: PositionMode) -> SpanParams:
        """The same hyper-parameters in another position mode."""
        return replace(self, position_mode=mode)

    def exact_floor_power(self, i: int) -> int:
        """Exact F(i): i**n in integer mode, floor(i ** (1/p)) in float mode (float64, as upstream's Python)."""
        n = self.triton_inv_n
        if n:
            power: int = int(i) ** n
            return power
        return int(float(i) ** self.inv_p)

    def floor_power(self, i: int) -> int:
        """F(i) of the stripe schedule in this position mode (module doc)."""
        if self.upstream_fp32 and not self.triton_inv_n:
            return math.floor(fp32_power(float(i), self.inv_p))
        return self.exact_floor_power(i)

    def span_extent(self, t: int, factor: float) -> int:
        """ceil(factor * t ** span_power) in this position mode, for one token count ``t``.

        Exact mode: float64 with values within 1e-9 (relative) of an integer snapped onto it (the
        tensor rule of ``_schedule.span_extent``); upstream-fp32: :func:`fp32_extent`.
        """
        if self.upstream_fp32:
            return fp32_extent(t, factor, self.span_power)
        if t <= 0:
            return 0
        x = factor * float(t) ** self.span_power
        r = round(x)
        return int(r) if abs(x - r) <= 1e-9 * max(x, 1.0) else math.ceil(x)

    @property
    def window_len(self) -> int:
        """W = F(sw_index + 1) - 1 with the exact F in both modes (0 when sw_index == 0)."""
        if self.sw_index == 0:
            return 0
        return self.exact_floor_power(self.sw_index + 1) - 1

    def max_stripe_index(self, t: int) -> int:
        """Largest i with F(i) <= t in this position mode (0 when t < 1)."""
        if t < 1:
            return 0
        if self.triton_inv_n:
            return floor_nth_root(int(t), self.triton_inv_n)
        assert self.search_power is not None
        i = int(math.floor(float(t) ** self.search_power)) + 2
        while i > 0 and self.floor_power(i) > t:
            i -= 1
        while self.floor_power(i + 1) <= t:
            i += 1
        return i
