"""Conversations held by the persistent worker: one cache per session, a snapshot per turn.

A session's cache holds exactly the token stream the model has seen: each turn's new messages
(rendered by the chat template), the reply as generated, and the template's closing of that reply
(e.g. ``<|im_end|>\\n``). At the end of every turn a :class:`Point` is kept: the messages the
session holds so far (the reply as the worker sent it), the position count, and a copy of the Mamba
states (K/V below the position count are never overwritten, so they are not copied).

A new turn finds the latest point whose messages are a prefix of the request's messages, goes back
to it, and prefills only what the template renders after those messages. Rollback keeps the first
``n`` points; fork copies a session's cache up to a point into a new session.

Runs inside the sandbox (imports torch); the host never imports this module.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from secure_run.errors import UsageError

if TYPE_CHECKING:
    from secure_run.model.cache import CacheSnapshot, HybridCache
    from secure_run.model.model import HybridLM

__all__ = ["Conversation", "Conversations", "Point", "check_context"]

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Point:
    """The state of a session at the end of a turn (``messages`` is empty for the start)."""

    messages: tuple[Message, ...]
    snap: CacheSnapshot
    #: the chat template's output for ``messages`` (no generation prompt); "" for the start
    rendered: str = ""


@dataclass
class Conversation:
    """One session: its live cache and the points it can go back to (``points[0]`` is the start)."""

    cache: HybridCache
    points: list[Point] = field(default_factory=list)

    @property
    def turns(self) -> int:
        """Completed turns (points after the start)."""
        return len(self.points) - 1

    def match(self, messages: Sequence[Message]) -> int:
        """Index of the latest point whose messages are a strict prefix of ``messages``."""
        best = 0
        for i, p in enumerate(self.points):
            n = len(p.messages)
            if n < len(messages) and tuple(messages[:n]) == p.messages:
                best = i
        return best

    def go_back(self, index: int) -> Point:
        """Keep points ``0..index`` and put the live cache at ``points[index]``."""
        del self.points[index + 1:]
        point = self.points[index]
        self.cache.restore(point.snap)
        return point

    def ensure_room(self, model: HybridLM, need: int, max_context: int) -> None:
        """Grow the cache (copying what it holds) so that ``need`` positions fit.

        Raises:
            UsageError: rule ``sandbox.worker.context_full`` when ``need`` exceeds ``max_context``.
        """
        check_context(need, max_context)
        if need <= self.cache.max_len:
            return
        bigger = model.new_cache(1, min(max_context, max(need, 2 * self.cache.max_len)))
        self.cache.copy_prefix_to(bigger, self.cache.snapshot())
        self.cache = bigger


def check_context(need: int, max_context: int) -> None:
    """Refuse a turn that needs more than ``max_context`` positions.

    Raises:
        UsageError: rule ``sandbox.worker.context_full``.
    """
    if need > max_context:
        raise UsageError(f"the conversation needs {need} tokens; the worker keeps at most {max_context}",
                         rule="sandbox.worker.context_full",
                         hint="start a new session, roll this one back, or ask for fewer new tokens")


class Conversations:
    """The sessions of one worker, least recently used dropped beyond ``max_sessions``."""

    def __init__(self, model: HybridLM, *, max_sessions: int, max_context: int) -> None:
        self.model = model
        self.max_sessions = max_sessions
        self.max_context = max_context
        self._by_id: OrderedDict[str, Conversation] = OrderedDict()

    def __contains__(self, session: str) -> bool:
        return session in self._by_id

    def new(self, initial_len: int) -> Conversation:
        """A fresh conversation with an empty cache of ``initial_len`` positions (not registered)."""
        cache = self.model.new_cache(1, max(16, min(initial_len, self.max_context)))
        return Conversation(cache=cache, points=[Point(messages=(), snap=cache.snapshot())])

    def get(self, session: str) -> Conversation:
        """The session ``session`` (marked as recently used).

        Raises:
            UsageError: rule ``sandbox.worker.no_session``.
        """
        conv = self._by_id.get(session)
        if conv is None:
            raise UsageError(f"no session {session!r} in the worker", rule="sandbox.worker.no_session",
                             hint="start the conversation with a turn first (sessions may have been dropped)")
        self._by_id.move_to_end(session)
        return conv

    def put(self, session: str, conv: Conversation) -> None:
        """Register ``conv`` as ``session`` (dropping the least recently used beyond the limit)."""
        self._by_id[session] = conv
        self._by_id.move_to_end(session)
        while len(self._by_id) > self.max_sessions:
            self._by_id.popitem(last=False)

    def drop(self, session: str) -> None:
        """Forget ``session`` (no error if unknown)."""
        self._by_id.pop(session, None)

    def fork(self, session: str, target: str, turn: int | None) -> Conversation:
        """Copy ``session`` up to ``turn`` (default: all its turns) into ``target``."""
        src = self.get(session)
        index = src.turns if turn is None else turn
        if not 0 <= index <= src.turns:
            raise UsageError(f"session {session!r} has {src.turns} turns; cannot fork at turn {index}",
                             rule="sandbox.worker.bad_turn")
        point = src.points[index]
        dst = Conversation(cache=self.model.new_cache(1, max(src.cache.max_len, 16)),
                           points=list(src.points[:index + 1]))  # snapshots are never mutated: shared
        src.cache.copy_prefix_to(dst.cache, point.snap)
        self.put(target, dst)
        return dst

    def rollback(self, session: str, turn: int) -> Conversation:
        """Keep the first ``turn`` turns of ``session``."""
        conv = self.get(session)
        if not 0 <= turn <= conv.turns:
            raise UsageError(f"session {session!r} has {conv.turns} turns; cannot roll back to turn {turn}",
                             rule="sandbox.worker.bad_turn")
        conv.go_back(turn)
        return conv


def as_messages(messages: Sequence[Mapping[str, str]]) -> tuple[Message, ...]:
    """(role, content) pairs."""
    return tuple((m["role"], m["content"]) for m in messages)
