"""Helpers shared by the runner tests: a scripted worker's events."""

from __future__ import annotations

from typing import Any

from secure_run.sandbox.protocol import StatsEvent, TextEvent, TokenEvent


def worker_tokens(pieces: list[str]) -> list[Any]:
    """A scripted worker's token + text events, one pair per piece."""
    out: list[Any] = []
    for i, p in enumerate(pieces):
        out.append(TokenEvent(type="token", index=i, token_id=10 + i))
        out.append(TextEvent(type="text", text=p))
    return out


def worker_stats(n: int) -> StatsEvent:
    """A scripted worker's final stats for ``n`` generated tokens."""
    return StatsEvent(type="stats", prompt_tokens=5, generated_tokens=n, seconds=0.5, tokens_per_second=2 * n,
                      device="cpu")
