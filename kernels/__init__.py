"""Superlinear attention: pure-PyTorch reference and Triton kernels behind one dispatch.

    >>> import torch
    >>> from secure_run.kernels import SpanParams, superlinear_attention
    >>> p = SpanParams(sw_index=2, num_spans=2, backward_factor=2.0, forward_factor=1.0,
    ...                span_power=0.5, inv_search_power_int=2)
    >>> q1, q2 = torch.randn(2, 1, 4, 40, 16).unbind(0)
    >>> k, v = torch.randn(2, 1, 2, 64, 16).unbind(0)     # static cache, 64 slots allocated
    >>> out = superlinear_attention(q1, q2, k, v, torch.arange(40), p)   # CPU -> reference
    >>> out.shape
    torch.Size([1, 4, 40, 16])

Backends: ``"auto"`` (Triton for CUDA tensors, the reference otherwise), ``"reference"``,
``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``). The ``backend=`` keyword wins over the
environment variable ``SECURE_RUN_KERNEL_BACKEND``.

Modules: ``params`` (SpanParams), ``reference`` (pure PyTorch, spec/model.md section 3; also the
oracle of the tests), ``span_triton`` (Triton backend: tunables table, search / prefill / decode
entry points) over ``_triton_search`` (anchor scoring + top-k), ``_triton_prefill`` (sorted
(query, head, slot) pair tiles + merge/gate), ``_triton_decode`` (split-K or deduplicated union
decode, CUDA-graph safe), ``_schedule`` (stripe table and span extents shared by both backends),
``_checks`` (argument rules).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from secure_run.errors import KernelUnavailable, UsageError
from secure_run.kernels._checks import KernelInputError, check_positions, check_shapes
from secure_run.kernels.params import SpanParams
from secure_run.kernels.reference import superlinear_attention_reference

Backend = Literal["auto", "reference", "triton"]
_BACKENDS = ("auto", "reference", "triton")
BACKEND_ENV = "SECURE_RUN_KERNEL_BACKEND"

__all__ = [
    "BACKEND_ENV",
    "Backend",
    "KernelInputError",
    "SpanParams",
    "resolve_backend",
    "superlinear_attention",
    "superlinear_attention_reference",
]


def _triton_usable(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend that will run on ``device``: "reference" or "triton".

    Raises:
        UsageError: unknown backend name (rule ``kernels.backend``).
        KernelUnavailable: "triton" asked for where Triton cannot run.
    """
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in _BACKENDS:
        source = "backend=" if backend is not None else BACKEND_ENV
        raise UsageError(
            f"unknown kernel backend {choice!r} (from {source})",
            details=(f"expected one of {', '.join(_BACKENDS)}",),
            hint=f"use backend='auto' or unset {BACKEND_ENV}",
            path=source,
            rule="kernels.backend",
        )
    if choice == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "reference"
    if choice == "triton" and not _triton_usable(device):
        raise KernelUnavailable(
            f"the Triton backend cannot run on device {device}",
            details=("Triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU) and the triton package",),
            hint="use backend='auto' or 'reference', or move the tensors to a CUDA GPU",
            path="backend",
            rule="kernels.triton-unavailable",
        )
    return choice


def superlinear_attention(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_position: torch.Tensor,
    params: SpanParams,
    attention_mask: torch.Tensor | None = None,
    *,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Superlinear attention of a chunk of queries against a static KV cache.

    Args:
        q1: search queries [B, Hq, Lq, D].
        q2: attention queries [B, Hq, Lq, D].
        k: key cache [B, Hkv, Lkv, D] (Lkv = allocated length > max position; the unfilled
            tail is never read).
        v: value cache [B, Hkv, Lkv, D].
        cache_position: [Lq] absolute positions, contiguous (cache_position[0] + arange(Lq)).
        params: span hyper-parameters.
        attention_mask: [B, Lkv], 1 = valid key, or None.
        backend: "auto" | "reference" | "triton" (default: $SECURE_RUN_KERNEL_BACKEND or "auto").

    Returns:
        [B, Hq, Lq, D] in q2's dtype. ``Lq == 1`` takes the decode path.

    Raises:
        KernelInputError: a shape, dtype, device or position rule is broken (names the argument).
        KernelUnavailable: the Triton backend was requested where it cannot run.
    """
    check_shapes(q1, q2, k, v, cache_position, attention_mask)
    which = resolve_backend(q2.device, backend)
    capturing = q2.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and not (q2.is_cuda and q2.shape[2] == 1):
        check_positions(cache_position, k.shape[2])  # host sync: skipped for CUDA decode / graphs
    if which == "reference":
        return superlinear_attention_reference(q1, q2, k, v, cache_position, params, attention_mask)
    from secure_run.kernels.span_triton import superlinear_attention_triton

    return superlinear_attention_triton(q1, q2, k, v, cache_position, params, attention_mask)
