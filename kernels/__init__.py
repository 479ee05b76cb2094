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

Model kernels (same backend rule): :func:`moe_route` (sigmoid router top-k), :func:`moe_experts`
(grouped expert GEMV for decode, grouped GEMM for prefill), :func:`mamba_decode_step` (conv + SSM
update + gated norm), :func:`add_rmsnorm` (residual add + RMSNorm); Triton in ``_triton_moe``,
``_triton_mamba``, ``_triton_norm``, references in ``model_reference``. :func:`decode_linear` /
:func:`decode_linears` (the dense projections of a one-token decode step: Triton GEMV in
``_triton_gemv`` on CUDA, ``F.linear`` otherwise; ``SECURE_RUN_GEMV=torch`` forces ``F.linear``).
None of them synchronises with the host, so a decode step built from them can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from secure_run.errors import KernelUnavailable, UsageError
from secure_run.kernels._checks import KernelInputError, check_positions, check_shapes
from secure_run.kernels.model_reference import (
    add_rmsnorm_reference,
    causal_conv1d_reference,
    mamba_decode_step_reference,
    mamba_prefill_ssd_reference,
    moe_experts_reference,
    moe_route_reference,
)
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
    "add_rmsnorm",
    "causal_conv1d",
    "decode_linear",
    "decode_linears",
    "env_choice",
    "mamba_decode_step",
    "mamba_prefill_ssd",
    "moe_experts",
    "moe_route",
    "resolve_backend",
    "ssd_scan",
    "superlinear_attention",
    "superlinear_attention_reference",
]


def _triton_usable(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def env_choice(name: str, allowed: tuple[str, ...], default: str) -> str:
    """The value of the switch ``name`` (``default`` when unset), one of ``allowed``.

    Raises:
        UsageError: any other value (rule ``kernels.env-choice``), so a mistyped switch is not
            silently read as the default.
    """
    value = os.environ.get(name, default)
    if value not in allowed:
        raise UsageError(
            f"{name}={value!r} is not a known setting",
            details=(f"expected one of {', '.join(allowed)} (default {default})",),
            hint=f"set {name} to one of those, or unset it",
            path=name,
            rule="kernels.env-choice",
        )
    return value


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
    positions_checked: bool = False,
) -> torch.Tensor:
    """Superlinear attention of a chunk of queries against a static KV cache.

    Args:
        q1: search queries [B, Hq, Lq, D].
        q2: attention queries [B, Hq, Lq, D].
        k: key cache [B, Hkv, Lkv, D] (Lkv = allocated length > max position; the unfilled
            tail is never read).
        v: value cache [B, Hkv, Lkv, D].
        cache_position: [Lq] absolute positions, contiguous (cache_position[0] + arange(Lq)),
            shared by every batch row; or, for decode (Lq == 1) only, [B, 1]: row b at its own
            position (one kernel launch set for the batch; equal to a call per row).
        params: span hyper-parameters.
        attention_mask: [B, Lkv], 1 = valid key, or None.
        backend: "auto" | "reference" | "triton" (default: $SECURE_RUN_KERNEL_BACKEND or "auto").
        positions_checked: the caller built ``cache_position`` from host-side counters that are
            already bounds-checked (the model: ``HybridCache.positions_for``), so the value check
            and its host sync are skipped. The kernels read keys up to each position without a
            bound of their own: never pass True for positions that come from a caller's input.

    Returns:
        [B, Hq, Lq, D] in q2's dtype. ``Lq == 1`` takes the decode path.

    Raises:
        KernelInputError: a shape, dtype, device or position rule is broken (names the argument).
        KernelUnavailable: the Triton backend was requested where it cannot run.
    """
    check_shapes(q1, q2, k, v, cache_position, attention_mask)
    which = resolve_backend(q2.device, backend)
    capturing = q2.is_cuda and torch.cuda.is_current_stream_capturing()
    if not positions_checked and not capturing and not (q2.is_cuda and q2.shape[2] == 1):
        check_positions(cache_position, k.shape[2])  # host sync: skipped for CUDA decode / graphs
    if which == "reference":
        if cache_position.dim() == 2:  # per-row decode positions [B, 1]: the reference row by row
            return torch.cat([superlinear_attention_reference(
                q1[r:r + 1], q2[r:r + 1], k[r:r + 1], v[r:r + 1], cache_position[r], params,
                None if attention_mask is None else attention_mask[r:r + 1]) for r in range(q2.shape[0])])
        return superlinear_attention_reference(q1, q2, k, v, cache_position, params, attention_mask)
    from secure_run.kernels.span_triton import superlinear_attention_triton

    return superlinear_attention_triton(q1, q2, k, v, cache_position, params, attention_mask)


def moe_route(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor, top_k: int, normalise: bool,
              scale: float, *, backend: Backend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid top-k router: x [T, d] -> (expert ids [T, k] int64, weights [T, k] fp32).

    See :func:`~secure_run.kernels.model_reference.moe_route_reference` for the math.
    """
    if resolve_backend(x.device, backend) == "reference":
        return moe_route_reference(x, gate_w, bias, top_k, normalise, scale)
    from secure_run.kernels._triton_moe import moe_route_triton

    return moe_route_triton(x, gate_w, bias, top_k, normalise, scale)


def moe_experts(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                shared_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None, *,
                backend: Backend | None = None) -> torch.Tensor:
    """Routed relu^2 experts (stacked weights up [E, F, d], down [E, d, F]) plus the shared expert: [T, d]."""
    if resolve_backend(x.device, backend) == "reference":
        return moe_experts_reference(x, ids, w, up, down, shared_up, shared_down)
    from secure_run.kernels._triton_moe import moe_experts_triton

    return moe_experts_triton(x, ids, w, up, down, shared_up, shared_down)


def mamba_decode_step(proj: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_w: torch.Tensor,
                      conv_b: torch.Tensor | None, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
                      norm_w: torch.Tensor, *, n_heads: int, head_dim: int, n_groups: int, state_size: int,
                      dt_min: float, dt_max: float, eps: float, backend: Backend | None = None) -> torch.Tensor:
    """One Mamba-2 decode step between ``in_proj`` and ``out_proj`` (updates both states in place)."""
    kw = {"n_heads": n_heads, "head_dim": head_dim, "n_groups": n_groups, "state_size": state_size,
          "dt_min": dt_min, "dt_max": dt_max, "eps": eps}
    if resolve_backend(proj.device, backend) == "reference":
        return mamba_decode_step_reference(proj, conv_state, ssm_state, conv_w, conv_b, dt_bias, A_log, D, norm_w,
                                           **kw)
    from secure_run.kernels._triton_mamba import mamba_decode_step_triton

    return mamba_decode_step_triton(proj, conv_state, ssm_state, conv_w, conv_b, dt_bias, A_log, D, norm_w, **kw)


def add_rmsnorm(h: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, eps: float, *,
                backend: Backend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + out, RMSNorm(h + out) * weight): the residual add of one block and the pre-norm of the next."""
    if resolve_backend(h.device, backend) == "reference":
        return add_rmsnorm_reference(h, out, weight, eps)
    from secure_run.kernels._triton_norm import add_rmsnorm_triton

    return add_rmsnorm_triton(h, out, weight, eps)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
             chunk_size: int, initial_state: torch.Tensor | None = None,
             backend: Backend | None = None, legacy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 chunked SSD scan (prefill): (y [B, L, H, P] fp32, final state [B, H, P, N] fp32).

    The reference is :func:`secure_run.model.mamba2.ssd_chunked_scan`. ``legacy`` (Triton only):
    the first committed state pass and chunk scan (the benchmark's baseline).
    """
    if resolve_backend(x.device, backend) == "reference":
        from secure_run.model.mamba2 import ssd_chunked_scan

        return ssd_chunked_scan(x, dt, A, Bm, Cm, chunk_size=chunk_size, initial_state=initial_state)
    from secure_run.kernels._triton_mamba import ssd_scan_triton

    return ssd_scan_triton(x, dt, A, Bm, Cm, chunk_size=chunk_size, initial_state=initial_state, legacy=legacy)


def mamba_prefill_ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                      D: torch.Tensor, z: torch.Tensor, norm_w: torch.Tensor, *, chunk_size: int,
                      initial_state: torch.Tensor | None, eps: float, group_size: int, out_dtype: torch.dtype,
                      backend: Backend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 prefill from the conv output to the ``out_proj`` input: SSD scan + D skip + gated group
    RMSNorm -> (out [B, L, H * P] in ``out_dtype``, final state [B, H, P, N] fp32).

    See :func:`~secure_run.kernels.model_reference.mamba_prefill_ssd_reference` for the math.
    """
    if resolve_backend(x.device, backend) == "reference":
        return mamba_prefill_ssd_reference(x, dt, A, Bm, Cm, D, z, norm_w, chunk_size=chunk_size,
                                           initial_state=initial_state, eps=eps, group_size=group_size,
                                           out_dtype=out_dtype)
    from secure_run.kernels._triton_mamba import ssd_prefill_triton

    return ssd_prefill_triton(x, dt, A, Bm, Cm, D, z, norm_w, chunk_size=chunk_size, initial_state=initial_state,
                              eps=eps, group_size=group_size, out_dtype=out_dtype)


def causal_conv1d(xbc: torch.Tensor, conv_state: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor | None, *, backend: Backend | None = None) -> torch.Tensor:
    """Causal depthwise conv + SiLU of a prefill chunk xbc [B, L, C] after ``conv_state`` [B, C, K] -> [B, L, C]."""
    if resolve_backend(xbc.device, backend) == "reference":
        return causal_conv1d_reference(xbc, conv_state, weight, bias)
    from secure_run.kernels._triton_mamba import causal_conv1d_triton

    return causal_conv1d_triton(xbc, conv_state, weight, bias)


GEMV_ENV = "SECURE_RUN_GEMV"


def _gemv_applies(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> bool:
    """The Triton GEMV runs on CUDA (not under autograd) for at most ``DISPATCH_MAX_ROWS`` rows (one:
    single-sequence decode) of one float dtype, unless ``SECURE_RUN_GEMV=torch``."""
    w0 = weights[0]
    if not x.is_cuda or x.numel() == 0:
        return False  # before any Triton import: the CPU worker image has no triton at all
    if w0.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.dtype != w0.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    if env_choice(GEMV_ENV, ("triton", "torch"), "triton") == "torch" or not _triton_usable(x.device):
        return False
    from secure_run.kernels._triton_gemv import DISPATCH_MAX_ROWS

    return x.numel() // x.shape[-1] <= DISPATCH_MAX_ROWS


def decode_linears(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``F.linear(x, w)`` for each of up to four weights [N_i, K] sharing the input x [..., K].

    On CUDA with one row (single-sequence decode) one Triton GEMV launch computes all of them
    (:mod:`secure_run.kernels._triton_gemv`); prefill, batched decode (cuBLAS measured as fast there)
    and CPU use ``F.linear``.
    """
    if not _gemv_applies(x, weights):
        return tuple(torch.nn.functional.linear(x, w) for w in weights)
    from secure_run.kernels._triton_gemv import gemv_triton

    lead = x.shape[:-1]
    outs = gemv_triton(x.reshape(-1, x.shape[-1]), list(weights))
    return tuple(o.reshape(*lead, o.shape[-1]) for o in outs)


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) through the decode GEMV where it applies (:func:`decode_linears`)."""
    return decode_linears(x, (weight,))[0]
