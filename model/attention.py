"""Attention layers of the ``*`` blocks: Superlinear (``superlinear-exp``) and plain causal GQA (``nemotron_h``).

Both project ``x`` to queries [B, Hq, L, D] and keys/values [B, Hkv, L, D] (no bias, no RoPE: the
model uses no positional encoding), write K/V into the static cache at the absolute
``positions``, attend, and project back with ``o_proj``.

* :class:`SuperlinearAttention` has two queries: Q1 (``q_search_proj``, the search/routing query)
  and Q2 (``q_proj``, the attention query). Prefill, chunked prefill and decode are all ONE call to
  :func:`secure_run.kernels.superlinear_attention` with the full cache buffers (spec/model.md 3.9).
* :class:`CausalAttention` is NemotronH's dense causal GQA (used for the parity test against
  transformers, and equal to Superlinear attention whenever the window covers the sequence).

Positions are either ``[L]`` (every row of the batch at the same absolute positions: prefill and
single-sequence decode) or ``[B, L]`` (each row at its own positions: the batched decode of a
:class:`~secure_run.model.cache.SlotPool`, ``L == 1``). Per-row decode positions ``[B, 1]`` are one
attention call (the span kernels take one position per row for ``Lq == 1``); only ``[B, L]`` with
``L > 1`` would run the attention core row by row on batch-1 views of the cache.

Axis legend: ``B`` batch, ``L`` new tokens, ``S`` cached positions read, ``Hq``/``Hkv`` query / KV
heads, ``D`` head dim, ``d`` hidden.

    >>> import torch
    >>> q = torch.randn(1, 4, 3, 8); k = torch.randn(1, 2, 3, 8); v = torch.randn(1, 2, 3, 8)
    >>> tuple(causal_gqa(q, k, v, torch.arange(3)).shape)
    (1, 4, 3, 8)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from secure_run.errors import KernelUnavailable
from secure_run.model.cache import KVState
from secure_run.model.config import ModelConfig

__all__ = ["CausalAttention", "SuperlinearAttention", "causal_gqa"]


def causal_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Dense causal GQA: q [B, Hq, L, D] at absolute ``positions`` [L] (or [B, L] per row); k, v
    [B, Hkv, S, D] at 0..S-1.

    Query l sees keys ``0..positions[l]``. Softmax in fp32; returns [B, Hq, L, D] in q's dtype.
    """
    s = k.shape[2]
    keys = torch.arange(s, device=q.device)
    if positions.dim() == 1:
        allowed = keys[None, :] <= positions[:, None]  # [L, S]
    else:
        allowed = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, L, S]
    r = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)  # [B, Hq, S, D]
    logits = torch.matmul(q.float(), kr.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, Hq, L, S]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(probs, vr.float()).to(q.dtype)


class _Projections(nn.Module):
    """q/k/v/o projections shared by both attention kinds (checkpoint names ``mixer.*_proj``)."""

    def __init__(self, cfg: ModelConfig, *, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        kw: dict[str, Any] = {"bias": False, "device": device, "dtype": dtype}
        self.n_q, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_q * self.head_dim, **kw)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, **kw)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, **kw)
        self.o_proj = nn.Linear(self.n_q * self.head_dim, cfg.hidden_size, **kw)

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:  # [B, L, n*D] -> [B, n, L, D]
        b, length, _ = t.shape
        return t.view(b, length, n, self.head_dim).transpose(1, 2)

    @staticmethod
    def _proj(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
        """The bias-free projections ``layers`` of x [B, L, in]: in decode on CUDA one Triton GEMV launch
        for all of them (:func:`secure_run.kernels.decode_linears`), else ``F.linear`` each."""
        from secure_run.kernels import decode_linears

        return decode_linears(x, tuple(layer.weight for layer in layers))

    def _out(self, o: torch.Tensor) -> torch.Tensor:  # [B, Hq, L, D] -> [B, L, d]
        b, _, length, _ = o.shape
        return self._proj(o.transpose(1, 2).reshape(b, length, self.n_q * self.head_dim), self.o_proj)[0]


class CausalAttention(_Projections):
    """NemotronH attention: dense causal GQA over the cache (no positional encoding)."""

    def forward(self, x: torch.Tensor, kv: KVState, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d] (normed), positions: [L] or [B, L] absolute -> [B, L, d]."""
        q = self._heads(self.q_proj(x), self.n_q)  # [B, Hq, L, D]
        kv.write(self._heads(self.k_proj(x), self.n_kv), self._heads(self.v_proj(x), self.n_kv), positions)
        end = int(positions.max()) + 1  # host sync: this dense path is never graph-captured
        o = causal_gqa(q, kv.k[:, :, :end], kv.v[:, :, :end], positions)
        return self._out(o)


def _kernel() -> Callable[..., torch.Tensor]:
    try:
        from secure_run.kernels import superlinear_attention
    except ImportError as err:  # pragma: no cover - depends on the kernels package being present
        raise KernelUnavailable(
            "secure_run.kernels.superlinear_attention is not available",
            details=(str(err),),
            hint="install secure-run completely (the kernels package provides the attention core)",
            rule="kernel.missing",
        ) from err
    fn: Callable[..., torch.Tensor] = superlinear_attention
    return fn


class SuperlinearAttention(_Projections):
    """Superlinear attention layer: Q1 (``q_search_proj``) searches spans, Q2 (``q_proj``) attends."""

    def __init__(self, cfg: ModelConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(cfg, device=device, dtype=dtype)
        self.q_search_proj = nn.Linear(cfg.hidden_size, self.n_q * self.head_dim, bias=False,
                                       device=device, dtype=dtype)
        self.params = cfg.span_params()

    def forward(self, x: torch.Tensor, kv: KVState, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d] (normed), positions: [L] absolute, contiguous (or [B, L] per row) -> [B, L, d]."""
        qs, qa, k, v = self._proj(x, self.q_search_proj, self.q_proj, self.k_proj, self.v_proj)  # one launch in decode
        q1 = self._heads(qs, self.n_q)  # [B, Hq, L, D] search query
        q2 = self._heads(qa, self.n_q)  # [B, Hq, L, D] attention query
        kv.write(self._heads(k, self.n_kv), self._heads(v, self.n_kv), positions)
        kernel = _kernel()
        if positions.dim() == 1 or positions.shape[1] == 1:
            # one call for prefill, chunked prefill and decode (positions [B, 1] in a batched decode:
            # each row at its own position, one launch set): K/V are the full static buffers
            # positions come from the cache's host-side counters (``positions_for``, the decode
            # graphs, the slot pool), checked against the buffer there: no per-layer host sync
            o = kernel(q1, q2, kv.k, kv.v, positions, self.params, attention_mask=None,
                       positions_checked=True)  # [B, Hq, L, D]
        else:  # several new tokens per row at per-row positions: one call per row on batch-1 views
            o = torch.cat([kernel(q1[r:r + 1], q2[r:r + 1], kv.k[r:r + 1], kv.v[r:r + 1], positions[r],
                                  self.params, attention_mask=None, positions_checked=True)
                           for r in range(x.shape[0])])
        return self._out(o.to(x.dtype))
