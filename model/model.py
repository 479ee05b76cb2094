"""The hybrid language model: embeddings -> N pre-norm blocks (Mamba-2 / MoE / attention / MLP) -> norm -> LM head.

Module names equal the checkpoint names (``backbone.embeddings``, ``backbone.layers.{i}.norm``,
``backbone.layers.{i}.mixer.*``, ``backbone.norm_f``, ``lm_head``), except the attention
projections, which the loader maps through :class:`~secure_run.model.checkpoint.AttentionNameMap`.
Every forward call runs against a :class:`~secure_run.model.cache.HybridCache` at the positions that
follow what the cache already holds, so prefill, chunked prefill and decode are the same call.

Axis legend: ``B`` batch, ``L`` new tokens, ``d`` hidden, ``V`` vocabulary.

    >>> import torch
    >>> from secure_run.model.config import parse_config_json
    >>> cfg = parse_config_json('''{"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32,
    ...   "num_hidden_layers": 3, "hybrid_override_pattern": "M*E", "num_attention_heads": 4,
    ...   "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 8,
    ...   "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4, "chunk_size": 4, "n_routed_experts": 4,
    ...   "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    ...   "moe_shared_expert_intermediate_size": 16, "torch_dtype": "float32"}''')
    >>> model = HybridLM(cfg)
    >>> cache = model.new_cache(batch_size=1, max_len=10)
    >>> tuple(model(torch.tensor([[1, 2, 3]]), cache).shape), cache.filled
    ((1, 3, 64), 3)
"""

from __future__ import annotations

import torch
from torch import nn

from secure_run.errors import UsageError
from secure_run.model.attention import CausalAttention, SuperlinearAttention
from secure_run.model.cache import HybridCache
from secure_run.model.config import ModelConfig
from secure_run.model.mamba2 import Mamba2Mixer
from secure_run.model.moe import MoE, Relu2MLP
from secure_run.model.norms import RMSNorm

__all__ = ["Block", "HybridLM"]

Device = torch.device | str | None


class Block(nn.Module):
    """``h + mixer(norm(h))`` for one layer (single residual, pre-norm)."""

    def __init__(self, cfg: ModelConfig, index: int, *, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.index, self.kind = index, cfg.layer_types[index]
        self.norm = RMSNorm(cfg.hidden_size, cfg.eps, device=device, dtype=dtype)
        mixer: nn.Module
        if self.kind == "mamba":
            mixer = Mamba2Mixer(cfg, device=device, dtype=dtype)
        elif self.kind == "moe":
            mixer = MoE(cfg, device=device, dtype=dtype)
        elif self.kind == "mlp":
            mixer = Relu2MLP(cfg.hidden_size, cfg.intermediate_size, device=device, dtype=dtype)
        elif cfg.superlinear:
            mixer = SuperlinearAttention(cfg, device=device, dtype=dtype)
        else:
            mixer = CausalAttention(cfg, device=device, dtype=dtype)
        self.mixer = mixer

    def forward(self, h: torch.Tensor, cache: HybridCache, positions: torch.Tensor) -> torch.Tensor:
        """h: [B, L, d] residual stream (model dtype) -> [B, L, d]."""
        x = self.norm(h.to(self.norm.weight.dtype))
        if self.kind == "mamba":
            out = self.mixer(x, cache.mamba(self.index))
        elif self.kind == "attention":
            out = self.mixer(x, cache.kv(self.index), positions)
        else:
            out = self.mixer(x)
        result: torch.Tensor = h + out
        return result


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, *, device: Device, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, device=device, dtype=dtype) for i in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.eps, device=device, dtype=dtype)


class HybridLM(nn.Module):
    """Superlinear-Exp / NemotronH causal LM. Logits are returned in fp32."""

    def __init__(self, cfg: ModelConfig, *, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = _Backbone(cfg, device=device, dtype=dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The model (activation) dtype: that of the embeddings."""
        return self.backbone.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.backbone.embeddings.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> HybridCache:
        """Allocate a zeroed static cache for ``max_len`` positions on the model's device and dtype."""
        return HybridCache(self.config, batch_size, max_len, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, *,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Run ``input_ids`` [B, L] at the positions after ``cache.filled`` and advance the cache.

        Args:
            input_ids: [B, L] token ids (int64), all < vocab_size.
            cache: the sequence's cache; a temporary one is used when None (stateless call).
            logits_to_keep: 0 for logits at every position, n for the last n only.

        Returns:
            logits [B, L or n, V] in fp32.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise UsageError(f"input_ids must be [batch, length>0], got {tuple(input_ids.shape)}", rule="model.input")
        b, length = input_ids.shape
        if cache is None:
            cache = self.new_cache(b, length)
        if cache.batch_size != b:
            raise UsageError(f"cache is for batch {cache.batch_size}, input has batch {b}", rule="model.input")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise UsageError(f"token ids must be in [0, {self.config.vocab_size})", rule="model.input")
        positions = cache.positions_for(length, input_ids.device)  # [L] absolute
        h = self.backbone.embeddings(input_ids)  # [B, L, d]
        for block in self.backbone.layers:
            h = block(h, cache, positions)
        cache.filled += length
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits: torch.Tensor = self.lm_head(self.backbone.norm_f(h))
        return logits.float()  # [B, L', V]
