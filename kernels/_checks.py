"""Boundary checks of the attention entry point: every refusal names the argument and the rule.

    >>> import torch
    >>> try:
    ...     check_shapes(torch.zeros(1, 4, 3, 16), torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 8, 16),
    ...                  torch.zeros(1, 2, 8, 16), torch.arange(3), None)
    ... except KernelInputError as err:
    ...     print(err.rule)
    kernels.shape
"""

from __future__ import annotations

import torch

from secure_run.errors import UsageError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class KernelInputError(UsageError):
    """An argument of :func:`secure_run.kernels.superlinear_attention` has the wrong shape/dtype/value."""

    kind = "kernel-input"


def _fail(message: str, *, arg: str, rule: str, got: str, expected: str, hint: str) -> KernelInputError:
    return KernelInputError(
        f"superlinear_attention: {arg}: {message}",
        details=(f"got {got}", f"expected {expected}"),
        hint=hint,
        path=arg,
        rule=rule,
    )


def check_shapes(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_position: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> None:
    """Shape, dtype and device rules that need no device synchronisation."""
    for name, x in (("q1", q1), ("q2", q2), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise _fail("must be 4-D", arg=name, rule="kernels.shape", got=f"shape {tuple(x.shape)}",
                        expected="[B, H, L, D]", hint="pass [batch, heads, length, head_dim] tensors")
        if x.dtype not in _FLOAT_DTYPES:
            raise _fail("unsupported dtype", arg=name, rule="kernels.dtype", got=str(x.dtype),
                        expected="float16, bfloat16, float32 or float64", hint="cast the tensor")
        if x.device != q2.device:
            raise _fail("on another device than q2", arg=name, rule="kernels.device", got=str(x.device),
                        expected=str(q2.device), hint="move all inputs to one device")
    if q1.shape != q2.shape:
        raise _fail("q1 and q2 shapes differ", arg="q1", rule="kernels.shape", got=f"{tuple(q1.shape)}",
                    expected=f"{tuple(q2.shape)} (the shape of q2)", hint="project both queries to [B, Hq, Lq, D]")
    if k.shape != v.shape:
        raise _fail("k and v shapes differ", arg="v", rule="kernels.shape", got=f"{tuple(v.shape)}",
                    expected=f"{tuple(k.shape)} (the shape of k)", hint="pass the K and V buffers of one cache")
    if len({q1.dtype, q2.dtype, k.dtype, v.dtype}) != 1:
        raise _fail("mixed dtypes", arg="k", rule="kernels.dtype",
                    got=f"q1 {q1.dtype}, q2 {q2.dtype}, k {k.dtype}, v {v.dtype}",
                    expected="one dtype for all four", hint="cast the cache or the queries to the model dtype")
    B, Hq, Lq, D = q2.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise _fail("batch or head_dim differs from q2", arg="k", rule="kernels.shape", got=f"{tuple(k.shape)}",
                    expected=f"[{B}, Hkv, Lkv, {D}]", hint="check the cache layout [B, Hkv, max_len, D]")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise _fail("query heads are not a multiple of KV heads", arg="k", rule="kernels.gqa",
                    got=f"Hq={Hq}, Hkv={Hkv}", expected="Hq % Hkv == 0", hint="check num_key_value_heads")
    per_row_positions(cache_position, B, Lq)
    if cache_position.dtype not in (torch.int64, torch.int32):
        raise _fail("must be an integer tensor", arg="cache_position", rule="kernels.cache_position",
                    got=str(cache_position.dtype), expected="int64 (or int32)", hint="use torch.arange(..., dtype=torch.long)")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, k.shape[2]):
        raise _fail("must be [B, Lkv]", arg="attention_mask", rule="kernels.mask",
                    got=f"shape {tuple(attention_mask.shape)}", expected=f"[{B}, {k.shape[2]}]",
                    hint="pass the key mask over the whole cache buffer (1 = valid)")


def per_row_positions(cache_position: torch.Tensor, batch: int, lq: int) -> bool:
    """The layout of ``cache_position``: False for [Lq] (shared by every batch row), True for
    [B, 1] (decode, Lq == 1: row b at its own position ``cache_position[b, 0]``).

    Raises:
        KernelInputError: any other shape (rule ``kernels.cache_position``).
    """
    shape = tuple(cache_position.shape)
    if cache_position.dim() == 1 and cache_position.numel() == lq:
        return False
    if cache_position.dim() == 2 and lq == 1 and shape == (batch, 1):
        return True
    if cache_position.dim() == 2:
        raise _fail("per-row positions are for decode only and must be [B, 1]", arg="cache_position",
                    rule="kernels.cache_position", got=f"shape {shape} for B={batch}, Lq={lq}",
                    expected=f"[{lq}] (shared)" + (f" or [{batch}, 1] (one per row)" if lq == 1 else ""),
                    hint="prefill rows at different positions one call per row; decode passes [B, 1]")
    raise _fail("must be 1-D with one position per query", arg="cache_position", rule="kernels.cache_position",
                got=f"shape {shape}", expected=f"[{lq}]" + (f" (or [{batch}, 1], one per row)" if lq == 1 else ""),
                hint="pass the absolute positions; per-row decode positions are [B, 1], not [B]")


def check_positions(cache_position: torch.Tensor, kv_len: int) -> None:
    """Value rules on cache_position (host sync): contiguous, >= 0, inside the cache buffer.

    Per-row decode positions [B, 1] are checked row by row (>= 0, inside the buffer)."""
    if cache_position.numel() == 0:
        return
    if cache_position.dim() == 2:
        for row in cache_position:
            check_positions(row, kv_len)
        return
    pos = cache_position.detach().to("cpu", torch.int64)
    first, last = int(pos[0]), int(pos[-1])
    if first < 0:
        raise _fail("negative position", arg="cache_position", rule="kernels.cache_position",
                    got=f"first position {first}", expected=">= 0", hint="positions are absolute token indices")
    if not torch.equal(pos, torch.arange(first, first + pos.numel())):
        raise _fail("positions are not contiguous", arg="cache_position", rule="kernels.cache_position",
                    got=f"{pos[:4].tolist()}... (not consecutive)", expected="cache_position[0] + arange(Lq)",
                    hint="prefill one contiguous chunk per call")
    if last >= kv_len:
        raise _fail("position beyond the cache buffer", arg="cache_position", rule="kernels.cache_position",
                    got=f"last position {last}, Lkv {kv_len}", expected=f"< {kv_len}",
                    hint="allocate the static cache for the whole sequence")
