"""Run-time guardrails: input filter, streaming output filter, limits, and the model-rail hook.

The output filter works on a token *stream*: ``feed(piece)`` returns the text that is safe to show
now, ``finish()`` returns the rest. It holds back the last ``W - 1`` normalised characters (``W`` =
the longest match any pattern can produce), so a blocked phrase split across tokens is still
caught. Guarantees (tested):

* with ``action: refuse`` nothing at or after the start of the first match is ever released, and
  the guard reports ``blocked`` so the runner can stop generating;
* with ``action: redact`` each match is replaced by ``[redacted]``;
* with ``action: flag`` the text is released unchanged and an event is recorded;
* in every case each match yields one :class:`GuardrailEvent` for the audit log.

    >>> from secure_run.policies.guardrails import PatternSet, StreamGuard
    >>> guard = StreamGuard(PatternSet.build([("literal", "pipe bomb")], action="refuse"))
    >>> guard.feed("How to build a pi") + guard.feed("pe bo") + guard.feed("mb") + guard.finish()
    'How to build a '
    >>> guard.blocked, guard.events[0].rule
    (True, 'literal:pipe bomb')
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from secure_run.errors import PolicyViolation

from ._patterns import (
    MAX_PATTERNS,
    CompiledPattern,
    PatternError,
    compile_literal,
    compile_regex,
    normalise_for_match,
)

Action = Literal["refuse", "redact", "flag"]
Stage = Literal["input", "output"]

#: replacement text for a redacted match
REDACTION = "[redacted]"


@dataclass(frozen=True)
class GuardrailEvent:
    """One guardrail decision during a run (goes to the audit log).

    Attributes:
        stage: ``input`` (prompt) or ``output`` (completion stream).
        action: what was done: ``refuse``, ``redact``, ``flag``, or ``limit`` for a limit hit.
        rule: the pattern label (``literal:...`` / ``regex:...``) or limit name.
        offset: position of the match in normalised characters from the start of the text.
    """

    stage: Stage
    action: str
    rule: str
    offset: int

    def to_json(self) -> dict[str, object]:
        """Plain-data form for JSON output and the audit log."""
        return {"stage": self.stage, "action": self.action, "rule": self.rule, "offset": self.offset}


@dataclass(frozen=True)
class PatternSet:
    """The compiled patterns of one filter, with the filter's action."""

    patterns: tuple[CompiledPattern, ...]
    action: Action

    @classmethod
    def build(cls, specs: Iterable[tuple[str, str]], *, action: Action) -> PatternSet:
        """Compile ``(kind, value)`` pairs (kind ``literal`` or ``regex``).

        Raises:
            PatternError: for the first pattern outside the safe subset, or an empty/oversized set.
        """
        compiled: list[CompiledPattern] = []
        for kind, value in specs:
            if kind == "literal":
                compiled.append(compile_literal(value))
            elif kind == "regex":
                compiled.append(compile_regex(value))
            else:
                raise PatternError(f"unknown pattern kind {kind!r} (expected 'literal' or 'regex')")
        if not compiled:
            raise PatternError("a keyword filter needs at least one pattern")
        if len(compiled) > MAX_PATTERNS:
            raise PatternError(f"{len(compiled)} patterns; the limit is {MAX_PATTERNS}")
        return cls(tuple(compiled), action)

    @property
    def max_width(self) -> int:
        """Longest match any pattern can produce (normalised characters)."""
        return max(p.max_width for p in self.patterns)

    def earliest(self, text: str, pos: int) -> tuple[int, int, str] | None:
        """Leftmost match in ``text`` at or after ``pos`` (ties: the longest): (start, end, label)."""
        best: tuple[int, int, str] | None = None
        for pattern in self.patterns:
            m = pattern.regex.search(text, pos)
            if m is None:
                continue
            if best is None or m.start() < best[0] or (m.start() == best[0] and m.end() > best[1]):
                best = (m.start(), m.end(), pattern.label)
        return best

    def overlap_end(self, text: str, start: int, end: int) -> int:
        """Extend ``end`` while some match that starts inside ``[start, end)`` reaches further."""
        changed = True
        while changed:
            changed = False
            for pattern in self.patterns:
                for pos in range(start + 1, end):
                    m = pattern.regex.match(text, pos)
                    if m is not None and m.end() > end:
                        end = m.end()
                        changed = True
        return end


@dataclass
class StreamGuard:
    """Filter one completion as it streams (see the module docstring for the guarantees).

    Args:
        patterns: the compiled filter, or ``None`` for a pass-through (filter disabled with a
            compensating guardrail named by the policy).
        stage: ``output`` for completions; :class:`InputGuard` uses ``input``.
    """

    patterns: PatternSet | None
    stage: Stage = "output"
    #: one event per match (read by the runner for the audit record)
    events: list[GuardrailEvent] = field(default_factory=list, init=False)
    #: True once a ``refuse`` filter matched: stop generating, nothing more is released
    blocked: bool = field(default=False, init=False)
    _pending: str = field(default="", init=False, repr=False)
    _ctx: str = field(default="", init=False, repr=False)
    _released_norm: int = field(default=0, init=False, repr=False)
    _flagged: set[tuple[int, str]] = field(default_factory=set, init=False, repr=False)
    _finished: bool = field(default=False, init=False, repr=False)

    def feed(self, piece: str) -> str:
        """Add one streamed piece; return the text that can be released now (maybe empty)."""
        if self._finished:
            raise RuntimeError("StreamGuard.feed() after finish()")
        if self.patterns is None:
            return piece
        if self.blocked:
            return ""
        self._pending += piece
        return self._process(final=False)

    def finish(self) -> str:
        """End of the completion: return whatever is still held back (filtered)."""
        if self._finished:
            raise RuntimeError("StreamGuard.finish() called twice")
        self._finished = True
        if self.patterns is None or self.blocked:
            return ""
        return self._process(final=True)

    def _event(self, action: str, rule: str, norm_offset: int) -> None:
        self.events.append(GuardrailEvent(self.stage, action, rule, self._released_norm + norm_offset))

    def _process(self, *, final: bool) -> str:
        assert self.patterns is not None
        patterns = self.patterns
        pending = self._pending
        norm, index = normalise_for_match(pending)
        n = len(norm)
        base = len(self._ctx)
        text = self._ctx + norm

        def orig(i: int) -> int:
            return index[i] if i < n else len(pending)

        hold = n if final else max(0, n - (patterns.max_width - 1))
        out: list[str] = []
        cur = 0  # normalised chars before `cur` are handled (released or redacted)
        scan = 0  # flag mode: where the next search starts
        while True:
            found = patterns.earliest(text, base + max(cur, scan))
            if found is None:
                break
            s, e, label = found[0] - base, found[1] - base, found[2]
            if not final and e >= n:
                # touches the end of what we have: it may still grow or change; keep it held back
                hold = min(hold, s)
                break
            if patterns.action == "refuse":
                self._event("refuse", label, s)
                self.blocked = True
                out.append(pending[orig(cur) : orig(min(s, hold))])
                self._pending = ""
                return "".join(out)
            if patterns.action == "flag":
                key = (self._released_norm + s, label)
                if key not in self._flagged:
                    self._flagged.add(key)
                    self._event("flag", label, s)
                scan = e
                continue
            # redact: act only on matches that start in the releasable part
            if s >= hold:
                break
            e = patterns.overlap_end(text, base + s, base + e) - base
            if not final and e >= n:
                hold = min(hold, s)
                break
            self._event("redact", label, s)
            out.append(pending[orig(cur) : orig(s)])
            out.append(REDACTION)
            cur = e
        limit = max(cur, hold)
        out.append(pending[orig(cur) : orig(limit)])
        if limit > 0:
            self._ctx = norm[limit - 1]
        self._pending = pending[orig(limit) :]
        self._released_norm += limit
        self._flagged = {k for k in self._flagged if k[0] >= self._released_norm}
        return "".join(out)


@dataclass(frozen=True)
class Limits:
    """Token, size and time limits the runner enforces (values from the policy, check G4).

    Attributes:
        max_new_tokens: most tokens one completion may generate.
        max_input_tokens: most prompt tokens (after the chat template).
        max_prompt_chars: most prompt characters, checked before tokenising.
        timeout_s: wall-clock limit of one generation, in seconds.
    """

    max_new_tokens: int
    max_input_tokens: int
    max_prompt_chars: int
    timeout_s: float

    def problems(
        self, *, prompt_chars: int | None = None, prompt_tokens: int | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        """Every limit the given request would break, as readable lines (empty list: all fine)."""
        out: list[str] = []
        if prompt_chars is not None and prompt_chars > self.max_prompt_chars:
            out.append(f"prompt is {prompt_chars} characters; limit max_prompt_chars={self.max_prompt_chars}")
        if prompt_tokens is not None and prompt_tokens > self.max_input_tokens:
            out.append(f"prompt is {prompt_tokens} tokens; limit max_input_tokens={self.max_input_tokens}")
        if max_new_tokens is not None and max_new_tokens > self.max_new_tokens:
            out.append(f"{max_new_tokens} new tokens requested; limit max_new_tokens={self.max_new_tokens}")
        return out

    def check(
        self, *, prompt_chars: int | None = None, prompt_tokens: int | None = None, max_new_tokens: int | None = None
    ) -> None:
        """Raise :class:`PolicyViolation` (rule G4) if the request breaks a limit."""
        found = self.problems(prompt_chars=prompt_chars, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens)
        if found:
            raise PolicyViolation(
                "the request exceeds the policy limits (G4)",
                details=found,
                rule="G4",
                hint="shorten the prompt or lower --max-new-tokens, or raise spec.guardrails.limits in the policy",
            )

    def deadline(self, start: float | None = None) -> Deadline:
        """A deadline ``timeout_s`` after ``start`` (default: now, monotonic clock)."""
        begin = time.monotonic() if start is None else start
        return Deadline(begin + self.timeout_s, self.timeout_s)


@dataclass(frozen=True)
class Deadline:
    """Wall-clock limit of one generation (monotonic clock)."""

    at: float
    timeout_s: float

    def remaining(self) -> float:
        """Seconds left (negative once expired)."""
        return self.at - time.monotonic()

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.remaining() <= 0

    def check(self) -> None:
        """Raise :class:`PolicyViolation` (rule G4) once the deadline has passed."""
        if self.expired():
            raise PolicyViolation(
                f"generation ran past the policy timeout of {self.timeout_s:g} s (G4)",
                rule="G4",
                hint="raise spec.guardrails.limits.timeout_s or ask for fewer tokens",
            )


@dataclass(frozen=True)
class InputVerdict:
    """Result of the input filter on one prompt.

    Attributes:
        allowed: False when the prompt must not be sent to the model.
        text: the prompt to use (redacted when the filter's action is ``redact``).
        events: what the filter found.
        reasons: readable lines for a refusal.
    """

    allowed: bool
    text: str
    events: tuple[GuardrailEvent, ...]
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class InputGuard:
    """The prompt-side filter: character limit first, then the policy's patterns."""

    patterns: PatternSet | None
    limits: Limits

    def check(self, prompt: str) -> InputVerdict:
        """Filter ``prompt``; never raises for a refused prompt (see :meth:`enforce`)."""
        too_long = self.limits.problems(prompt_chars=len(prompt))
        if too_long:
            event = GuardrailEvent("input", "limit", "max_prompt_chars", self.limits.max_prompt_chars)
            return InputVerdict(False, "", (event,), tuple(too_long))
        guard = StreamGuard(self.patterns, stage="input")
        text = guard.feed(prompt) + guard.finish()
        events = tuple(guard.events)
        if guard.blocked:
            return InputVerdict(False, "", events, tuple(f"prompt matches blocked pattern {e.rule}" for e in events))
        return InputVerdict(True, text, events)

    def enforce(self, prompt: str) -> InputVerdict:
        """Like :meth:`check`, but raise :class:`PolicyViolation` (rule G3/G4) on refusal."""
        verdict = self.check(prompt)
        if not verdict.allowed:
            limit = any(e.action == "limit" for e in verdict.events)
            raise PolicyViolation(
                "the prompt was refused by the input guardrail",
                details=verdict.reasons,
                rule="G4" if limit else "G3",
                hint="shorten the prompt" if limit else "rephrase the prompt; the policy's input_filter blocks it",
            )
        return verdict


@dataclass(frozen=True)
class RailVerdict:
    """What a model-based rail says about one text."""

    allowed: bool
    categories: tuple[str, ...] = ()


@runtime_checkable
class ModelRail(Protocol):
    """Hook for model-based rails (guard models such as Llama Guard or a NeMo Guardrails config).

    Not implemented yet: a policy filter with ``engine: classifier`` or ``engine: nemoguardrails``
    is only satisfied when the runner reports a rail of that engine as available (facts), which
    today it never does, so such a policy is denied by G3.
    """

    name: str

    def check_input(self, prompt: str) -> RailVerdict:
        """Classify a prompt."""
        ...

    def check_output(self, text: str) -> RailVerdict:
        """Classify a (partial) completion."""
        ...
