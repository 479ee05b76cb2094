"""Static inference cache of the hybrid model (spec/model.md section 4).

One object per sequence batch, allocated once for ``max_len`` tokens:

* attention layer i: ``K``, ``V`` [B, Hkv, max_len, D] in the model dtype, written at the absolute
  positions of each call (``index_copy_``); the unfilled tail is never read;
* Mamba layer i: ``conv`` [B, C, K] (the last K pre-conv inputs, model dtype) and ``ssm``
  [B, H, P, N] (fp32);
* ``filled``: how many positions have been processed (the next call must start there, because the
  Mamba states cannot be rewound).

    >>> import torch
    >>> from secure_run.model.config import parse_config_json
    >>> cfg = parse_config_json('''{"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32,
    ...   "num_hidden_layers": 2, "hybrid_override_pattern": "M*", "num_attention_heads": 4,
    ...   "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 8,
    ...   "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4, "n_routed_experts": 4,
    ...   "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    ...   "moe_shared_expert_intermediate_size": 16, "torch_dtype": "float32"}''')
    >>> cache = HybridCache(cfg, batch_size=1, max_len=16)
    >>> tuple(cache.kv(1).k.shape), tuple(cache.mamba(0).ssm.shape), cache.filled
    ((1, 2, 16, 8), (1, 4, 8, 8), 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secure_run.errors import UsageError
from secure_run.model.config import ModelConfig

__all__ = ["CacheSnapshot", "HybridCache", "KVState", "MambaState"]


@dataclass
class MambaState:
    """Conv tail [B, C, K] (model dtype) and SSM state [B, H, P, N] (fp32) of one Mamba layer."""

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclass
class KVState:
    """Static K and V buffers [B, Hkv, max_len, D] of one attention layer."""

    k: torch.Tensor
    v: torch.Tensor

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Store k_new, v_new [B, Hkv, Lq, D] at absolute ``positions`` [Lq]."""
        self.k.index_copy_(2, positions, k_new.to(self.k.dtype))
        self.v.index_copy_(2, positions, v_new.to(self.v.dtype))


class HybridCache:
    """All per-layer caches of one batch of sequences, allocated for ``max_len`` positions."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if batch_size < 1 or max_len < 1:
            raise UsageError(f"cache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}",
                             rule="cache.size")
        self.batch_size, self.max_len, self.filled = batch_size, max_len, 0
        self._mamba: dict[int, MambaState] = {}
        self._kv: dict[int, KVState] = {}
        for i in cfg.layers_of("mamba"):
            self._mamba[i] = MambaState(
                conv=torch.zeros(batch_size, cfg.mamba_conv_dim, cfg.conv_kernel, device=device, dtype=dtype),
                ssm=torch.zeros(batch_size, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size,
                                device=device, dtype=torch.float32),
            )
        for i in cfg.attention_layers:
            shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
            self._kv[i] = KVState(k=torch.zeros(shape, device=device, dtype=dtype),
                                  v=torch.zeros(shape, device=device, dtype=dtype))

    def mamba(self, layer: int) -> MambaState:
        """Conv / SSM state of Mamba layer ``layer``."""
        return self._mamba[layer]

    def kv(self, layer: int) -> KVState:
        """K / V buffers of attention layer ``layer``."""
        return self._kv[layer]

    def reset(self) -> None:
        """Forget everything (zero the states; K/V tails are never read, but zero them too)."""
        for s in self._mamba.values():
            s.conv.zero_()
            s.ssm.zero_()
        for kv in self._kv.values():
            kv.k.zero_()
            kv.v.zero_()
        self.filled = 0

    def positions_for(self, length: int, device: torch.device) -> torch.Tensor:
        """The absolute positions [length] of the next call; refuses to run past ``max_len``."""
        if self.filled + length > self.max_len:
            raise UsageError(
                f"cache holds {self.max_len} positions; {self.filled} used, {length} more requested",
                rule="cache.full", hint="allocate the cache with a larger max_len",
            )
        return torch.arange(self.filled, self.filled + length, device=device, dtype=torch.long)

    # --- per-conversation snapshots (the persistent worker's sessions, rollback and fork) -----------

    def snapshot(self) -> CacheSnapshot:
        """The state after ``filled`` positions: a copy of every Mamba state (K/V below ``filled`` are
        never overwritten by later calls, so they are shared with the live cache, not copied)."""
        return CacheSnapshot(filled=self.filled,
                             mamba={i: MambaState(conv=s.conv.clone(), ssm=s.ssm.clone()) for i, s in self._mamba.items()})

    def restore(self, snap: CacheSnapshot) -> None:
        """Go back to ``snap`` (taken from this cache, at or below the current ``filled``)."""
        if snap.filled > self.filled:
            raise UsageError(f"snapshot at {snap.filled} is ahead of the cache ({self.filled})", rule="cache.restore")
        for i, s in self._mamba.items():
            s.conv.copy_(snap.mamba[i].conv)
            s.ssm.copy_(snap.mamba[i].ssm)
        self.filled = snap.filled

    def copy_prefix_to(self, other: HybridCache, snap: CacheSnapshot) -> None:
        """Make ``other`` hold the state of ``snap`` (K/V of its first ``snap.filled`` positions copied)."""
        if snap.filled > min(self.filled, other.max_len):
            raise UsageError(f"cannot copy {snap.filled} positions", rule="cache.copy")
        n = snap.filled
        for i, kv in self._kv.items():
            other._kv[i].k[:, :, :n].copy_(kv.k[:, :, :n])
            other._kv[i].v[:, :, :n].copy_(kv.v[:, :, :n])
        for i, s in other._mamba.items():
            s.conv.copy_(snap.mamba[i].conv)
            s.ssm.copy_(snap.mamba[i].ssm)
        other.filled = n


@dataclass
class CacheSnapshot:
    """What :meth:`HybridCache.snapshot` keeps: the position count and copies of the Mamba states."""

    filled: int
    mamba: dict[int, MambaState]
