"""MoE mixer (spec/model.md 2.4) and the relu^2 MLP used by experts, the shared expert and ``-`` layers.

Routing per token: ``s = sigmoid(x W_gate^T)`` (fp32); choose the top-k experts by
``s + e_score_correction_bias`` (the bias only picks, it never weighs); weights are the unbiased
``s`` of the chosen experts, renormalised (``norm_topk_prob``) and times ``routed_scaling_factor``.
Routed compute is grouped by expert: the (token, slot) assignments are sorted by expert id and each
expert that received tokens runs once on all of them (a loop over experts, never over tokens).

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d] (normed) -> [B, L, d]."""
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
