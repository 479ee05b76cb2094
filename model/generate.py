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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from secure_run.errors import UsageError
from secure_run.model.cache import HybridCache
from secure_run.model.model import HybridLM

__all__ = ["GenerationConfig", "generate", "sample_next"]


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
        prefill_chunk: prompt tokens per prefill call (bounds activation memory).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] | None = None
    prefill_chunk: int = 2048

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
        if self.prefill_chunk < 1:
            problems.append(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if problems:
            raise UsageError("invalid generation settings", details=tuple(problems), rule="generate.config")


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
    device = model.device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # [1, P]
    if cache is None:
        cache = model.new_cache(1, ids.shape[1] + cfg.max_new_tokens)
    elif cache.filled != 0:
        raise UsageError("generate() needs an empty cache", rule="generate.cache")
    gen = torch.Generator().manual_seed(cfg.seed)
    # prefill in chunks; only the last position's logits are needed
    logits = None
    for start in range(0, ids.shape[1], cfg.prefill_chunk):
        logits = model(ids[:, start:start + cfg.prefill_chunk], cache, logits_to_keep=1)  # [1, 1, V]
    assert logits is not None
    for step in range(cfg.max_new_tokens):
        nxt = sample_next(logits[0, -1], cfg, gen)
        yield nxt
        if nxt in stops or step == cfg.max_new_tokens - 1:
            return
        logits = model(torch.tensor([[nxt]], dtype=torch.long, device=device), cache)  # [1, 1, V]
