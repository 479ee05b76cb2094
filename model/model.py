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
from secure_run.model.cache import HybridCache, SlotPool
from secure_run.model.config import ModelConfig
from secure_run.model.mamba2 import Mamba2Mixer
from secure_run.model.moe import MoE, Relu2MLP
from secure_run.model.norms import RMSNorm

__all__ = ["BatchDecoder", "Block", "DecodeGraph", "HybridLM", "decode_buckets"]

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
        result: torch.Tensor = h + self.mix(x, cache, positions)
        return result

    def mix(self, x: torch.Tensor, cache: HybridCache, positions: torch.Tensor) -> torch.Tensor:
        """The mixer alone on the normed input x [B, L, d] -> [B, L, d] (no residual)."""
        out: torch.Tensor
        if self.kind == "mamba":
            out = self.mixer(x, cache.mamba(self.index))
        elif self.kind == "attention":
            out = self.mixer(x, cache.kv(self.index), positions)
        else:
            out = self.mixer(x)
        return out


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

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse token ids outside [0, vocab_size) (one host sync: call once per request, not per step)."""
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise UsageError(f"token ids must be in [0, {self.config.vocab_size})", rule="model.input",
                             hint="tokenize with the model's own tokenizer")

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, *,
                logits_to_keep: int = 0, check_ids: bool = True) -> torch.Tensor:
        """Run ``input_ids`` [B, L] at the positions after ``cache.filled`` and advance the cache.

        Args:
            input_ids: [B, L] token ids (int64), all < vocab_size.
            cache: the sequence's cache; a temporary one is used when None (stateless call).
            logits_to_keep: 0 for logits at every position, n for the last n only.
            check_ids: check the id range here (a host sync); pass False only for ids already
                checked on the host (``generate`` checks the prompt once, sampled ids are in range).

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
        if check_ids:
            self.check_ids(input_ids)
        positions = cache.positions_for(length, input_ids.device)  # [L] absolute
        logits = self.step(input_ids, cache, positions, logits_to_keep=logits_to_keep)
        cache.filled += length
        return logits

    def step(self, input_ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor, *,
             logits_to_keep: int = 0) -> torch.Tensor:
        """The forward body without checks or host synchronisation; does not advance ``cache.filled``.

        On CUDA the residual add of each block and the next pre-norm run as one fused kernel
        (:func:`secure_run.kernels.add_rmsnorm`), and the MoE / Mamba decode take their
        device paths; elsewhere the blocks run as written (eager reference).
        """
        h = self.backbone.embeddings(input_ids)  # [B, L, d]
        layers = self.backbone.layers
        if h.is_cuda:
            from secure_run.kernels import add_rmsnorm

            x = layers[0].norm(h)
            for i, block in enumerate(layers):
                nxt = layers[i + 1].norm if i + 1 < len(layers) else self.backbone.norm_f
                h, x = add_rmsnorm(h, block.mix(x, cache, positions), nxt.weight, nxt.eps)
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
        else:
            for block in layers:
                h = block(h, cache, positions)
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
            x = self.backbone.norm_f(h)
        from secure_run.kernels import decode_linear  # the Triton GEMV in decode on CUDA, else F.linear

        return decode_linear(x, self.lm_head.weight).float()  # [B, L', V]


class DecodeGraph:
    """One decode step of ``model`` on ``cache`` captured as a CUDA graph and replayed every token.

    The graph is bound to the cache's buffers (one graph per cache, so per batch size); its inputs
    are the static ``ids`` [B, 1] and ``positions`` [1] device tensors, filled before each replay
    without a host sync. The first call runs the step eagerly (compiling the Triton kernels) and
    then captures; later calls replay. Equal to the eager step (tests/model/test_graph_decode.py).
    """

    def __init__(self, model: HybridLM, cache: HybridCache) -> None:
        if model.device.type != "cuda":
            raise UsageError("CUDA graphs need the model on a CUDA device", rule="model.graph",
                             hint="use the eager forward on CPU")
        self.model, self.cache = model, cache
        dev = model.device
        self.ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor | int) -> torch.Tensor:
        """Run one token per sequence (``token_ids`` [B, 1] on the device, or an int for batch 1).

        Returns the logits [B, 1, V] (fp32) in a static buffer, valid until the next call; advances
        ``cache.filled`` by one.
        """
        cache = self.cache
        cache.check_room(1)  # refuses a full cache (host-side check only)
        if isinstance(token_ids, int):
            self.ids.fill_(token_ids)
        else:
            self.ids.copy_(token_ids)
        self.positions.fill_(cache.filled)
        if self.graph is None:
            out = self.model.step(self.ids, cache, self.positions)  # eager warm-up, also the real step
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.model.step(self.ids, cache, self.positions)
            self.graph = graph
        else:
            self.graph.replay()
            assert self.logits is not None
            out = self.logits
        cache.filled += 1
        return out


def decode_buckets(rows: int) -> tuple[int, ...]:
    """The batch sizes a :class:`BatchDecoder` over ``rows`` rows runs at: powers of two, then ``rows``.

        >>> decode_buckets(16), decode_buckets(6)
        ((1, 2, 4, 8, 16), (1, 2, 4, 6))
    """
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    out.append(rows)
    return tuple(out)


class BatchDecoder:
    """One decode step for every active row of a :class:`~secure_run.model.cache.SlotPool`, each
    row at its own position (continuous batching).

    A step runs rows ``0:n`` where ``n`` is the smallest bucket (:func:`decode_buckets`) covering
    the highest active row; rows in that range that are not decoding get token 0 at position 0
    (free rows: their contents are garbage anyway). Token ids and positions go to the device in
    one copy; the model sees positions ``[n, 1]`` (per row). On CUDA with Superlinear attention
    each bucket's step is captured once as a CUDA graph (first use: an eager step that compiles the
    kernels, then the capture) and replayed for every later step and every later request; the
    graphs are dropped only when the pool's storage grows. Elsewhere the step runs eagerly.
    Equal to decoding each sequence alone (tests/model/test_batched_decode.py).
    """

    def __init__(self, model: HybridLM, pool: SlotPool, *, graphs: bool | None = None) -> None:
        self.model, self.pool = model, pool
        dev = model.device
        self.graphs = (dev.type == "cuda" and model.config.superlinear) if graphs is None else graphs
        if self.graphs and dev.type != "cuda":
            raise UsageError("CUDA graphs need the model on a CUDA device", rule="model.graph",
                             hint="use the eager step on CPU")
        self.buckets = decode_buckets(pool.rows)
        self._inputs = torch.zeros(2, pool.rows, dtype=torch.long, device=dev)  # [ids; positions], static
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._generation = pool.generation
        self._mempool: object | None = None
        #: how many graphs were captured (a request must not pay a capture once its bucket exists)
        self.captures = 0

    def bucket_for(self, rows: int) -> int:
        """The batch size that covers rows ``0:rows``."""
        return next(b for b in self.buckets if b >= rows)

    @torch.inference_mode()
    def step(self, tokens: dict[int, int]) -> torch.Tensor:
        """Feed ``tokens[row]`` to each listed row at its own position; advance those rows by one.

        Returns:
            logits [n, V] (fp32): row ``r``'s at index ``r``; a static buffer on CUDA, valid until
            the next step.

        Raises:
            UsageError: a row that is not active, or a row whose next position is past the pool.
        """
        pool = self.pool
        if not tokens:
            raise UsageError("a decode step needs at least one row", rule="model.batch")
        for r in tokens:
            if r not in pool.active:
                raise UsageError(f"row {r} is not active in the pool", rule="model.batch")
        pool.ensure_len(max(pool.lengths[r] for r in tokens) + 1)
        if pool.generation != self._generation:  # the storage was reallocated: graphs point at the old one
            self._graphs.clear()
            self._mempool = None  # the old graphs' private pool is gone with them: capture into a new one
            self._generation = pool.generation
        n = self.bucket_for(max(tokens) + 1)
        host = [[0] * pool.rows, [0] * pool.rows]
        for r, t in tokens.items():
            host[0][r], host[1][r] = t, pool.lengths[r]
        # a fresh (pageable) host tensor each step: the copy never races a later step's writes
        self._inputs.copy_(torch.tensor(host, dtype=torch.long), non_blocking=True)
        ids = self._inputs[0, :n].unsqueeze(1)  # [n, 1]
        positions = self._inputs[1, :n].unsqueeze(1)  # [n, 1] each row's own position
        view = pool.cache.rows(0, n)
        if not self.graphs:
            out = self.model.step(ids, view, positions)[:, 0]  # [n, V]
        elif n in self._graphs:
            graph, logits = self._graphs[n]
            graph.replay()
            out = logits
        else:
            out = self.model.step(ids, view, positions)[:, 0]  # eager warm-up (compiles), also the real step
            torch.cuda.synchronize()
            if self._mempool is None:
                self._mempool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                logits = self.model.step(ids, view, positions)[:, 0]
            self._graphs[n] = (graph, logits)
            self.captures += 1
        for r in tokens:
            pool.lengths[r] += 1
        return out
