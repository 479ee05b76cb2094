"""Static inference cache of the hybrid model (spec/model.md section 4).

One object per sequence batch, allocated once for ``max_len`` tokens:

* attention layer i: ``K``, ``V`` [B, Hkv, max_len, D] in the model dtype, written at the absolute
  positions of each call (``index_copy_``); the unfilled tail is never read;
* Mamba layer i: ``conv`` [B, C, K] (the last K pre-conv inputs, model dtype) and ``ssm``
  [B, H, P, N] (fp32);
* ``filled``: how many positions have been processed (the next call must start there, because the
  Mamba states cannot be rewound).

:class:`SlotPool` is the continuous-batching cache: one :class:`HybridCache` of ``rows`` rows in
which each active sequence owns a row and keeps its own length, so one decode step serves every
row at its own position (:class:`~secure_run.model.model.BatchDecoder`).

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

__all__ = ["CacheSnapshot", "HybridCache", "KVState", "MambaState", "SlotPool"]


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
        """Store k_new, v_new [B, Hkv, Lq, D] at absolute ``positions``: [Lq] shared by every row, or
        [B, Lq] per row (each row written at its own positions; no host sync, graph-safe)."""
        if positions.dim() == 1:
            self.k.index_copy_(2, positions, k_new.to(self.k.dtype))
            self.v.index_copy_(2, positions, v_new.to(self.v.dtype))
            return
        b, h, length, d = k_new.shape
        index = positions[:, None, :, None].expand(b, h, length, d)  # [B, Hkv, Lq, D]
        self.k.scatter_(2, index, k_new.to(self.k.dtype))
        self.v.scatter_(2, index, v_new.to(self.v.dtype))


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

    @classmethod
    def _over(cls, mamba: dict[int, MambaState], kv: dict[int, KVState], batch_size: int, max_len: int,
              filled: int) -> HybridCache:
        """A cache object over existing state tensors (views into another cache; nothing allocated)."""
        view = cls.__new__(cls)
        view.batch_size, view.max_len, view.filled = batch_size, max_len, filled
        view._mamba, view._kv = mamba, kv
        return view

    def rows(self, start: int, stop: int, *, filled: int = 0) -> HybridCache:
        """A cache over rows ``start:stop`` of this one, sharing its storage (``filled`` as given)."""
        if not 0 <= start < stop <= self.batch_size:
            raise UsageError(f"rows {start}:{stop} are outside a cache of {self.batch_size}", rule="cache.rows")
        return HybridCache._over(
            {i: MambaState(conv=s.conv[start:stop], ssm=s.ssm[start:stop]) for i, s in self._mamba.items()},
            {i: KVState(k=kv.k[start:stop], v=kv.v[start:stop]) for i, kv in self._kv.items()},
            stop - start, self.max_len, filled)

    def copy_to(self, other: HybridCache, start: int = 0) -> None:
        """Make ``other`` (same batch size) hold this cache's state: K/V of positions ``start:filled``
        (positions below ``start`` are taken to be equal already) and every Mamba state."""
        n = self.filled
        if n > other.max_len or not 0 <= start <= n or other.batch_size != self.batch_size:
            raise UsageError(f"cannot copy positions {start}:{n} of a batch-{self.batch_size} cache into a "
                             f"batch-{other.batch_size} cache of {other.max_len}", rule="cache.copy")
        for i, kv in self._kv.items():
            other._kv[i].k[:, :, start:n].copy_(kv.k[:, :, start:n])
            other._kv[i].v[:, :, start:n].copy_(kv.v[:, :, start:n])
        for i, s in self._mamba.items():
            other._mamba[i].conv.copy_(s.conv)
            other._mamba[i].ssm.copy_(s.ssm)
        other.filled = n

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
        self.check_room(length)
        return torch.arange(self.filled, self.filled + length, device=device, dtype=torch.long)

    def check_room(self, length: int) -> None:
        """Refuse a call of ``length`` more tokens past ``max_len`` (host-side, no device work)."""
        if self.filled + length > self.max_len:
            raise UsageError(
                f"cache holds {self.max_len} positions; {self.filled} used, {length} more requested",
                rule="cache.full", hint="allocate the cache with a larger max_len",
            )

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


class SlotPool:
    """A cache of ``rows`` sequences for continuous batching: each active sequence owns one row.

    Row ``r`` holds ``lengths[r]`` positions (host ints; the decode step turns them into a device
    tensor). Rows are handed out lowest first, so the active rows stay near the front and a decode
    step over rows ``0:n`` covers them. A row that is not active may be overwritten by a decode
    step (its contents are garbage until :meth:`load` or a prefill through :meth:`row`).

        >>> import torch
        >>> from secure_run.model.config import parse_config_json
        >>> cfg = parse_config_json('''{"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32,
        ...   "num_hidden_layers": 2, "hybrid_override_pattern": "M*", "num_attention_heads": 4,
        ...   "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 8,
        ...   "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4, "n_routed_experts": 4,
        ...   "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        ...   "moe_shared_expert_intermediate_size": 16, "torch_dtype": "float32"}''')
        >>> pool = SlotPool(cfg, rows=4, max_len=32)
        >>> a, b = pool.acquire(), pool.acquire()
        >>> pool.release(a); pool.acquire(), sorted(pool.active)
        (0, [0, 1])
    """

    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, max_len_limit: int | None = None) -> None:
        self.config, self.device, self.dtype = cfg, device, dtype
        #: rows never grow past this many positions (None: no limit)
        self.max_len_limit = max_len_limit
        self.cache = HybridCache(cfg, rows, max_len, device=device, dtype=dtype)
        self.lengths = [0] * rows
        self.active: set[int] = set()
        #: bumped whenever the storage is reallocated (decode graphs bound to the old one are dropped)
        self.generation = 0

    @property
    def rows(self) -> int:
        """How many sequences the pool holds at most."""
        return self.cache.batch_size

    @property
    def max_len(self) -> int:
        """Positions per row."""
        return self.cache.max_len

    def acquire(self) -> int:
        """The lowest free row, now active with length 0 and zeroed Mamba states (a fresh sequence).

        Raises:
            UsageError: rule ``cache.pool_full`` when every row is taken.
        """
        for r in range(self.rows):
            if r not in self.active:
                self.active.add(r)
                self.lengths[r] = 0
                for i in self.config.layers_of("mamba"):
                    st = self.cache.mamba(i)
                    st.conv[r].zero_()
                    st.ssm[r].zero_()
                return r
        raise UsageError(f"all {self.rows} rows of the pool are in use", rule="cache.pool_full",
                         hint="wait for a sequence to finish, or allocate more rows")

    def release(self, row: int) -> None:
        """Free ``row`` (its contents become garbage)."""
        self.active.discard(row)
        self.lengths[row] = 0

    def row(self, row: int) -> HybridCache:
        """A batch-1 cache over ``row`` (sharing storage) whose ``filled`` is the row's length; after
        running the model on it, call :meth:`sync` to take its new length back."""
        return self.cache.rows(row, row + 1, filled=self.lengths[row])

    def sync(self, row: int, view: HybridCache) -> None:
        """Take the length of a :meth:`row` view back after it was advanced."""
        self.lengths[row] = view.filled

    def load(self, row: int, src: HybridCache) -> None:
        """Copy the batch-1 cache ``src`` (its ``filled`` positions and Mamba states) into ``row``."""
        self.ensure_len(src.filled)
        view = self.row(row)
        src.copy_to(view)
        self.sync(row, view)

    def store(self, row: int, dst: HybridCache, start: int = 0) -> None:
        """Copy ``row`` into the batch-1 cache ``dst`` (K/V from position ``start`` on, Mamba states)."""
        self.row(row).copy_to(dst, start)

    def ensure_len(self, need: int) -> None:
        """Grow every row to at least ``need`` positions (doubling up to ``max_len_limit``; rows keep
        their contents).

        Raises:
            UsageError: rule ``cache.full`` when ``need`` is past ``max_len_limit``.
        """
        if need <= self.max_len:
            return
        limit = self.max_len_limit
        if limit is not None and need > limit:
            raise UsageError(f"a pool row holds at most {limit} positions; {need} requested", rule="cache.full",
                             hint="allocate the pool with a larger limit")
        new_len = max(need, 2 * self.max_len) if limit is None else min(limit, max(need, 2 * self.max_len))
        with torch.inference_mode(False), torch.no_grad():  # normal tensors even when called from a step
            bigger = HybridCache(self.config, self.rows, new_len, device=self.device, dtype=self.dtype)
            self.cache.filled = max(self.lengths, default=0)
            self.cache.copy_to(bigger)
        self.cache = bigger
        self.generation += 1
