"""Hyper-parameters of Superlinear attention and the power-law helpers (spec/model.md section 3.1).

    >>> p = SpanParams(sw_index=65, num_spans=3, backward_factor=3.0, forward_factor=1.0,
    ...                span_power=0.55, search_power=0.55)
    >>> p.window_len
    2032
    >>> SpanParams(sw_index=3, num_spans=2, backward_factor=2.0, forward_factor=0.0,
    ...            span_power=0.5, inv_search_power_int=2).window_len
    15
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    (integer mode, n in 2..6, p = 1/n) is set.
    """

    sw_index: int
    num_spans: int
    backward_factor: float
    forward_factor: float
    span_power: float
    search_power: float | None = None
    inv_search_power_int: int | None = None

    def __post_init__(self) -> None:
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

    def floor_power(self, i: int) -> int:
        """F(i): i**n in integer mode, floor(i ** (1/p)) in float mode (float64, as upstream's Python)."""
        if self.inv_search_power_int is not None:
            return int(i) ** self.inv_search_power_int
        return int(float(i) ** self.inv_p)

    @property
    def window_len(self) -> int:
        """W = F(sw_index + 1) - 1 (0 when sw_index == 0)."""
        if self.sw_index == 0:
            return 0
        return self.floor_power(self.sw_index + 1) - 1

    def max_stripe_index(self, t: int) -> int:
        """Largest i with F(i) <= t (0 when t < 1)."""
        if t < 1:
            return 0
        if self.inv_search_power_int is not None:
            return floor_nth_root(int(t), self.inv_search_power_int)
        assert self.search_power is not None
        i = int(math.floor(float(t) ** self.search_power)) + 2
        while i > 0 and self.floor_power(i) > t:
            i -= 1
        while self.floor_power(i + 1) <= t:
            i += 1
        return i
