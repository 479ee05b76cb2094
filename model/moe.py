"""MoE mixer (spec/model.md 2.4) and the relu^2 MLP used by experts, the shared expert and ``-`` layers.

Routing per token: ``s = sigmoid(x W_gate^T)`` (fp32); choose the top-k experts by
``s + e_score_correction_bias`` (the bias only picks, it never weighs); weights are the unbiased
``s`` of the chosen experts, renormalised (``norm_topk_prob``) and times ``routed_scaling_factor``.
Two execution paths with the same math:

* **eager loop** (CPU default): the (token, slot) assignments are sorted by expert id and each
  expert that received tokens runs once on all of them (a loop over experts, one host sync for
  the counts);
* **device path** (CUDA, or ``sync_free=True``): routing and expert selection stay on the device
  (:func:`secure_run.kernels.moe_route` / :func:`secure_run.kernels.moe_experts`: fused Triton
  router + grouped GEMV/GEMM on CUDA, the gather reference elsewhere), no host sync, so the step
  can be captured in a CUDA graph.

The device path reads the experts as stacked tensors ``up`` [E, F, d] / ``down`` [E, d, F]:
:meth:`MoE.stacked_experts` packs the per-expert weights into them once (each expert's
``weight`` then becomes a view of its slice, so memory is not doubled and the checkpoint names
are unchanged), and packs again if the parameters were replaced (e.g. by ``load_state_dict(assign=True)``).

Axis legend: ``T`` tokens (batch and sequence flattened), ``d`` hidden, ``E`` routed experts,
``k`` experts per token, ``F`` expert width.

    >>> import torch
    >>> mlp = Relu2MLP(4, 8)
    >>> tuple(mlp(torch.zeros(3, 4)).shape)
    (3, 4)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secure_run.model.config import ModelConfig

__all__ = ["MoE", "Relu2MLP", "TopkRouter"]


class Relu2MLP(nn.Module):
    """``down(relu(up(x))^2)``, no gate, no bias."""

    def __init__(self, d: int, f: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d, f, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(f, d, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., d]
        out: torch.Tensor = self.down_proj(torch.relu(self.up_proj(x)).square())
        return out


class TopkRouter(nn.Module):
    """Sigmoid router with a selection-only correction bias (kept in fp32)."""

    def __init__(self, cfg: ModelConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.top_k, self.normalise, self.scale = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size, device=device, dtype=dtype))
        self.e_score_correction_bias: torch.Tensor
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(cfg.n_routed_experts, device=device, dtype=torch.float32)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, d] -> (expert ids [T, k] int64, weights [T, k] fp32)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [T, E]
        choice = scores + self.e_score_correction_bias.float()  # selection only
        idx = torch.topk(choice, self.top_k, dim=-1).indices  # [T, k]
        w = scores.gather(1, idx)  # unbiased scores of the chosen experts
        if self.normalise:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.scale


class MoE(nn.Module):
    """Routed relu^2 experts plus one always-on shared expert; names match ``mixer.*`` of the checkpoint."""

    def __init__(self, cfg: ModelConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate = TopkRouter(cfg, device=device, dtype=dtype)
        self.experts = nn.ModuleList(
            Relu2MLP(cfg.hidden_size, cfg.moe_intermediate_size, device=device, dtype=dtype)
            for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = Relu2MLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size, device=device,
                                       dtype=dtype)
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def _packed_ok(self) -> bool:
        if self._stacked is None:
            return False
        up, down = self._stacked
        for e in (0, len(self.experts) - 1):
            ex = self.experts[e]
            if ex.up_proj.weight.data_ptr() != up[e].data_ptr() or ex.down_proj.weight.data_ptr() != down[e].data_ptr():
                return False
        w = self.experts[0].up_proj.weight
        return up.dtype == w.dtype and up.device == w.device

    @torch.inference_mode(False)
    @torch.no_grad()
    def stacked_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [E, F, d], down [E, d, F]) aliasing the experts' weights; packs them on first use."""
        if self._packed_ok():
            assert self._stacked is not None
            return self._stacked
        w0, d0 = self.experts[0].up_proj.weight, self.experts[0].down_proj.weight
        n = len(self.experts)
        up = torch.empty((n, *w0.shape), dtype=w0.dtype, device=w0.device)
        down = torch.empty((n, *d0.shape), dtype=d0.dtype, device=d0.device)
        for e, ex in enumerate(self.experts):  # one expert at a time: the old tensors are freed as we go
            up[e].copy_(ex.up_proj.weight)
            ex.up_proj.weight = nn.Parameter(up[e], requires_grad=False)
            down[e].copy_(ex.down_proj.weight)
            ex.down_proj.weight = nn.Parameter(down[e], requires_grad=False)
        self._stacked = (up, down)
        return self._stacked

    def forward(self, x: torch.Tensor, *, sync_free: bool | None = None) -> torch.Tensor:
        """x: [B, L, d] (normed) -> [B, L, d].

        ``sync_free``: take the device path (default: on CUDA); False forces the eager loop.
        """
        if sync_free is None:
            sync_free = x.is_cuda
        if sync_free:
            return self._forward_device(x)
        return self._forward_loop(x)

    def _forward_device(self, x: torch.Tensor) -> torch.Tensor:
        from secure_run.kernels import moe_experts, moe_route

        shape = x.shape
        xt = x.reshape(-1, shape[-1])  # [T, d]
        g = self.gate
        ids, w = moe_route(xt, g.weight, g.e_score_correction_bias, g.top_k, g.normalise, g.scale)
        up, down = self.stacked_experts()
        sh = self.shared_experts
        out = moe_experts(xt, ids, w, up, down, sh.up_proj.weight, sh.down_proj.weight)
        return out.reshape(shape)

    def _forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xt = x.reshape(-1, shape[-1])  # [T, d]
        idx, w = self.gate(xt)  # [T, k], [T, k]
        k = idx.shape[1]
        flat_expert = idx.reshape(-1)  # [T*k] expert of each (token, slot) assignment
        order = torch.argsort(flat_expert, stable=True)  # assignments grouped by expert
        token_of = order // k  # [T*k] token of each sorted assignment
        weight_of = w.reshape(-1)[order]  # [T*k]
        counts = torch.bincount(flat_expert, minlength=len(self.experts)).tolist()  # one host sync
        routed = torch.zeros(xt.shape, dtype=torch.float32, device=x.device)  # [T, d] accumulated in fp32
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            tok = token_of[start:start + count]
            out = self.experts[e](xt[tok])  # [count, d]
            routed.index_add_(0, tok, out.float() * weight_of[start:start + count, None])
            start += count
        shared: torch.Tensor = self.shared_experts(xt)
        return (routed.to(x.dtype) + shared).reshape(shape)
