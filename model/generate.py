"""Token generation: chunked prefill, then one decode step per token, streamed as an iterator.

Sampling is greedy when ``temperature == 0``; otherwise logits / temperature, then top-k, then
top-p (nucleus), then a draw from a seeded :class:`torch.Generator` on the CPU (so a seed gives the
same tokens on any device for the same logits). Generation stops at a stop id (which is yielded)
or after ``max_new_tokens``.

    >>> import torch
    >>> logits = torch.tensor([0.0, 3.0, 1.0])
    >>> sample_next(logits, GenerationConfig(temperature=0.0), torch.Generator())
    1
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from secure_run.errors import UsageError
from secure_run.model.cache import HybridCache
from secure_run.model.config import ModelConfig
from secure_run.model.model import DecodeGraph, HybridLM

__all__ = ["GenerationConfig", "activation_bytes_per_token", "choose_prefill_chunk", "generate", "sample_next",
           "sample_rows"]

MIN_PREFILL_CHUNK = 256
MAX_PREFILL_CHUNK = 65536
_SAFETY = 2.0  # headroom over the estimate (allocator fragmentation, transient copies)
_MEMORY_SHARE = 0.8  # of the free memory a prefill chunk may take


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate.

    Attributes:
        max_new_tokens: upper bound on generated tokens (>= 1).
        temperature: 0 for greedy, else > 0.
        top_k: keep the k most likely tokens (0 = off).
        top_p: keep the smallest set whose probability reaches p (1.0 = off).
        seed: seed of the sampling generator.
        stop_ids: ids that end generation (None = the tokenizer's stop ids, given by the caller).
        prefill_chunk: prompt tokens per prefill call (bounds activation memory); None = chosen
            from the free memory of the model's device (:func:`choose_prefill_chunk`).
        cuda_graph: on CUDA, replay the decode step as a CUDA graph (eager otherwise).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] | None = None
    prefill_chunk: int | None = None
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not (1 <= self.max_new_tokens <= 1 << 24):
            problems.append(f"max_new_tokens must be in 1..{1 << 24}, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            problems.append(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            problems.append(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if problems:
            raise UsageError("invalid generation settings", details=tuple(problems), rule="generate.config")


def activation_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes per prompt token of one prefill call (largest layer, live at once).

    Counts the biggest transient tensors of each mixer kind (they do not overlap in time; the
    residual stream and the last layer's output do): Mamba in_proj output + the chunked SSD scan's
    fp32 decay/product tensors (``chunk_size x heads`` per token, three of them live) + its fp32
    outputs; MoE gathered inputs, hidden and fp32 outputs; attention queries and output.
    """
    es = torch.finfo(dtype).bits // 8
    d = cfg.hidden_size
    stream = 4 * d * es  # residual, normed input, mixer output, next residual
    mamba = (cfg.mamba_in_proj_dim * es + 3 * 4 * cfg.chunk_size * cfg.mamba_num_heads
             + 4 * 4 * cfg.mamba_d_inner + 2 * cfg.mamba_conv_dim * es)
    k = cfg.num_experts_per_tok
    moe = k * cfg.moe_intermediate_size * es + 4 * d + cfg.moe_shared_expert_intermediate_size * es * 2 + 8 * k * 3
    attn = 4 * cfg.num_attention_heads * cfg.head_dim * es + 4 * cfg.num_attention_heads * 16
    return int(stream + max(mamba, moe, attn))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX hosts
        return 8 << 30


def choose_prefill_chunk(model: HybridLM, prompt_len: int, *, free_bytes: int | None = None) -> int:
    """Prompt tokens per prefill call: the largest power of two whose activations fit in
    ``_MEMORY_SHARE`` of the free memory (after the cache is allocated) with ``_SAFETY`` headroom,
    within [MIN_PREFILL_CHUNK, MAX_PREFILL_CHUNK], and never longer than the prompt.
    """
    free = _free_bytes(model.device) if free_bytes is None else free_bytes
    per_token = activation_bytes_per_token(model.config, model.dtype) * _SAFETY
    fit = int(free * _MEMORY_SHARE / per_token)
    chunk = MIN_PREFILL_CHUNK
    while chunk * 2 <= min(fit, MAX_PREFILL_CHUNK):
        chunk *= 2
    return max(1, min(chunk, prompt_len))


def check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int) -> None:
    """Host-side id check of a prompt (once per request; the decode steps never check again)."""
    bad = [i for i in prompt_ids if not (0 <= int(i) < vocab_size)]
    if bad:
        raise UsageError(f"token ids must be in [0, {vocab_size}); got {bad[0]}", rule="model.input",
                         hint="tokenize with the model's own tokenizer")


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator) -> int:
    """Pick the next token from fp32 ``logits`` [V]."""
    if cfg.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.detach().float().cpu() / cfg.temperature  # [V]
    if 0 < cfg.top_k < scores.numel():
        kth = torch.topk(scores, cfg.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop = before >= cfg.top_p  # the most likely token is always kept
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def sample_rows(logits: torch.Tensor, rows: Sequence[int], cfgs: Sequence[GenerationConfig],
                gens: Sequence[torch.Generator]) -> list[int]:
    """The next token of each of ``rows`` of ``logits`` [n, V] (fp32), row i sampled with ``cfgs[i]``
    and ``gens[i]``: the greedy rows in one argmax and one transfer, the others as :func:`sample_next`
    on one host copy of their logits (so the same tokens as sampling each row alone)."""
    out = [0] * len(rows)
    greedy = [i for i, c in enumerate(cfgs) if c.temperature == 0.0]
    if greedy:
        idx = torch.tensor([rows[i] for i in greedy], dtype=torch.long, device=logits.device)
        for i, t in zip(greedy, torch.argmax(logits.index_select(0, idx), dim=-1).tolist(), strict=True):
            out[i] = int(t)
    sampled = [i for i, c in enumerate(cfgs) if c.temperature != 0.0]
    if sampled:
        idx = torch.tensor([rows[i] for i in sampled], dtype=torch.long, device=logits.device)
        host = logits.index_select(0, idx).float().cpu()
        for j, i in enumerate(sampled):
            out[i] = sample_next(host[j], cfgs[i], gens[i])
    return out


def generate(model: HybridLM, prompt_ids: Sequence[int], cfg: GenerationConfig, *,
             stop_ids: frozenset[int] = frozenset(), cache: HybridCache | None = None) -> Iterator[int]:
    """Stream generated token ids for one prompt (batch 1).

    Args:
        model: the loaded model.
        prompt_ids: the prompt, at least one token.
        cfg: generation settings; ``cfg.stop_ids`` overrides ``stop_ids`` when set.
        stop_ids: ids that end generation (the stop id itself is yielded last).
        cache: a fresh cache to use (default: one sized prompt + max_new_tokens).

    Yields:
        token ids, one per decode step.
    """
    if len(prompt_ids) == 0:
        raise UsageError("the prompt is empty", rule="generate.prompt", hint="give at least one token")
    stops = cfg.stop_ids if cfg.stop_ids is not None else stop_ids
    check_prompt_ids(prompt_ids, model.config.vocab_size)  # once, on the host
    device = model.device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # [1, P]
    if cache is None:
        cache = model.new_cache(1, ids.shape[1] + cfg.max_new_tokens)
    elif cache.filled != 0:
        raise UsageError("generate() needs an empty cache", rule="generate.cache")
    gen = torch.Generator().manual_seed(cfg.seed)
    chunk = cfg.prefill_chunk or choose_prefill_chunk(model, ids.shape[1])
    # prefill in chunks; only the last position's logits are needed
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start:start + chunk], cache, logits_to_keep=1, check_ids=False)  # [1, 1, V]
    assert logits is not None
    graph = DecodeGraph(model, cache) if use_graph(model, cfg) else None
    for step in range(cfg.max_new_tokens):
        nxt = sample_next(logits[0, -1], cfg, gen)
        yield nxt
        if nxt in stops or step == cfg.max_new_tokens - 1:
            return
        if graph is not None:
            logits = graph(nxt)  # [1, 1, V], replayed CUDA graph
        else:
            logits = model(torch.tensor([[nxt]], dtype=torch.long, device=device), cache, check_ids=False)


def use_graph(model: HybridLM, cfg: GenerationConfig) -> bool:
    """CUDA-graph decode: on CUDA, when asked, for Superlinear attention (the dense NemotronH
    attention of the parity path slices the cache at a host-read position, so it stays eager)."""
    return cfg.cuda_graph and model.device.type == "cuda" and model.config.superlinear
