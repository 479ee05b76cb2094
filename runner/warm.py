"""A warm, verified session: the gate once, one persistent sandbox, the weights loaded once.

    >>> from secure_run.runner.warm import CompletionRequest, SamplingParams, WarmSession  # doctest: +SKIP
    >>> warm = WarmSession.open(GenerateOptions())          # the demo, Docker sandbox
    >>> req = CompletionRequest(request_id="r1", messages=({"role": "user", "content": "hi"},), prompt=None,
    ...                         sampling=warm.generation_defaults, client="cli", session_id="chat")
    >>> for ev in warm.complete(req, threading.Event()):
    ...     print(ev)
    >>> warm.close()

:meth:`WarmSession.open` runs the same gate as ``generate`` (:func:`~secure_run.runner.pipeline.prepare`:
verify, architecture, policy, audit log writable), then starts one sandbox with a persistent worker
that verifies every pinned file and loads the model once. Each :meth:`WarmSession.complete` then
applies, per request: the input guardrail and the policy limits (prompt size, prompt tokens,
max tokens, the timeout), the output guardrail on the stream, stop strings (host side), and
writes exactly one audit record carrying the request id, the client and the token counts.
Conversations (``session_id``) keep their cache in the worker: a chat turn prefills only what the
session does not hold yet; :meth:`fork` and :meth:`rollback` manage them.

Completions run concurrently: each thread's request goes to the worker at once and the worker
batches the turns in flight (continuous batching); session management (fork / rollback) and
close are serialized on one lock, the counters on another.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeAlias

from secure_run.errors import SandboxError, SecureRunError, UsageError
from secure_run.runner.pipeline import (
    LOAD_ALLOWANCE_S,
    Final,
    GenerateOptions,
    Interrupted,
    Text,
    prepare,
    worker_device,
)

if TYPE_CHECKING:
    from secure_run.manifests import ProgressSink
    from secure_run.policies import GuardrailEvent
    from secure_run.runner.pipeline import Session
    from secure_run.sandbox.persistent import PersistentWorker

__all__ = ["CompletionRequest", "Event", "SamplingParams", "WarmSession", "SESSION_WALL_CLOCK_S"]

#: the sandbox's own wall clock for a warm session (it is killed then even if the host is gone)
SESSION_WALL_CLOCK_S = 24 * 3600.0
#: most tokens one conversation may hold in the worker, beyond the policy's prompt + reply limits
_CONTEXT_CAP = 1 << 20

Event: TypeAlias = Text | Final
_ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion (``seed`` None: a fresh random seed, recorded in the audit)."""

    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    max_tokens: int
    stop: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when they are fine)."""
        out = []
        if not (0.0 <= self.temperature <= 100.0):
            out.append(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            out.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.top_k <= 1 << 20):
            out.append(f"top_k must be in 0..{1 << 20}, got {self.top_k}")
        if self.seed is not None and not (0 <= self.seed <= 2**63 - 1):
            out.append(f"seed must be in 0..2**63-1, got {self.seed}")
        if self.max_tokens < 1:
            out.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            out.append("stop: at most 16 non-empty strings of at most 256 characters")
        return out


@dataclass(frozen=True)
class CompletionRequest:
    """One completion: a chat (``messages``) or a plain prompt, never both."""

    request_id: str
    messages: tuple[Mapping[str, str], ...] | None
    prompt: str | None
    sampling: SamplingParams
    client: str
    session_id: str | None = None


class _Flag(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class _AnyOf:
    """Set when any of ``flags`` is set."""

    flags: tuple[_Flag, ...]

    def is_set(self) -> bool:
        return any(f.is_set() for f in self.flags)


@dataclass
class _Counters:
    requests_total: int = 0
    requests_refused_total: int = 0
    requests_cancelled_total: int = 0
    tokens_total: int = 0
    prompt_tokens_total: int = 0
    prefilled_tokens_total: int = 0
    reused_tokens_total: int = 0
    worker_loads_total: int = 0
    sessions: dict[str, int] = field(default_factory=dict)  # session id -> completed turns


class WarmSession:
    """A verified model held by one persistent sandboxed worker. Use :meth:`open`."""

    def __init__(self, session: Session, worker: PersistentWorker) -> None:
        self._session = session
        self._worker = worker
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()  # the counters (completions update them from many threads)
        self._closed = False
        self._counters = _Counters(worker_loads_total=worker.loaded.loads if worker.loaded else 0)
        self._forks = 0
        v = session.verification
        self.model_id: str = v.lock_name or session.model_dir.name
        self.generation_defaults: SamplingParams = _defaults(session)
        self.audit_path = str(session.audit.path)

    # --- open / close -----------------------------------------------------------------------

    @classmethod
    def open(cls, options: GenerateOptions, *, progress: ProgressSink | None = None,
             confirm_license: Callable[[str], bool] | None = None, max_sessions: int = 16) -> WarmSession:
        """The gate once (verify, architecture, policy), then one persistent sandbox, weights loaded once.

        ``max_sessions``: conversations the worker keeps (least recently used dropped beyond it; a
        dropped one is re-prefilled in full on its next turn).

        Raises:
            SecureRunError: any refusal (exit 1) or usage/environment problem (exit 2), audited.
        """
        from secure_run.sandbox.persistent import PersistentWorker
        from secure_run.sandbox.protocol import LoadRequest

        session = prepare(options, progress=progress, confirm_license=confirm_license)
        try:
            limits = session.policy.limits()
            wall = options.session_wall_clock_s or SESSION_WALL_CLOCK_S
            load = LoadRequest.model_validate({
                "task": "load", "request": "load", "device": "cuda" if options.gpu else "cpu", "dtype": options.dtype,
                "max_context": min(_CONTEXT_CAP, max(16, 4 * (limits.max_input_tokens + limits.max_new_tokens))),
                "max_sessions": max_sessions,
                "files": session.sealed_pins()}, strict=False)
            with session.handoff() as handoff:  # the worker has received the sealed copies once it has loaded
                policy = session.handoff_policy(handoff).with_overrides(wall_clock_s=wall)
                worker = PersistentWorker.start(session.backend, policy, load, load_timeout_s=LOAD_ALLOWANCE_S * 5)
            session.release_sealed()  # loaded: the worker's weights are its own now; free the copies
        except SecureRunError as err:
            session._audit_refusal(err, ())
            session.close()
            raise
        except BaseException:
            session.close()
            raise
        warm = cls(session, worker)
        assert worker.loaded is not None
        session.audit.append(session.record("started", run_stats={"backend": session.backend.name, "mode": "warm",
                                                                   "worker_loads": worker.loaded.loads,
                                                                   "load_seconds": round(worker.loaded.load_seconds, 4)}))
        return warm

    def close(self) -> None:
        """Stop the sandbox and close the verified folder; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._worker.close()
            finally:
                self._session.close()

    def __enter__(self) -> WarmSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def notices(self) -> list[str]:
        """Policy warnings to show the operator."""
        notices: list[str] = self._session.notices
        return notices

    @property
    def session(self) -> Session:
        """The gate's result (verification, policy, decision)."""
        return self._session

    # --- completions ------------------------------------------------------------------------

    def complete(self, req: CompletionRequest, cancel: threading.Event) -> Iterator[Event]:
        """Run one completion; yields released :class:`Text` and finally :class:`Final`.

        ``Final.stats`` holds ``prompt_tokens``, ``completion_tokens`` and ``finish_reason``
        (``stop``, ``length``, ``blocked`` or ``cancelled``). Refusals raise
        :class:`~secure_run.errors.SecureRunError` subclasses (rule ids), each audited once.
        """
        yield from self._complete(req, cancel)

    def _complete(self, req: CompletionRequest, cancel: threading.Event) -> Iterator[Event]:
        from secure_run.sandbox.protocol import StatsEvent, TextEvent, TokenEvent, TurnRequest, WorkerStats

        s = self._session
        received = time.monotonic()
        with self._count_lock:
            self._counters.requests_total += 1
        events: list[GuardrailEvent] = []
        seed = req.sampling.seed if req.sampling.seed is not None else secrets.randbelow(2**63)
        params = {"temperature": req.sampling.temperature, "top_p": req.sampling.top_p, "top_k": req.sampling.top_k,
                  "seed": seed, "max_tokens": req.sampling.max_tokens, "stop": list(req.sampling.stop)}
        base = {"request_id": req.request_id, "client": req.client, "session_id": req.session_id,
                "backend": s.backend.name, "mode": "warm"}
        prompt_tokens: int | None = None
        prompt_text: str | None = None
        released_text: list[str] = []

        def refuse(err: SecureRunError, event: str = "refused") -> None:
            with self._count_lock:
                self._counters.requests_refused_total += 1
            s.audit.append(s.record(
                event, run_id=req.request_id, parameters=params, guardrail_events=events,
                prompt=prompt_text, output="".join(released_text) if prompt_text is not None else None,
                run_stats={**base, "prompt_tokens": prompt_tokens, "completion_tokens": 0, "refused": err.to_json()}))

        try:
            self._check_open()
            turn_input = self._checked_input(req, events)
            limits = s.policy.limits()
            if turn_input.messages is not None:
                prompt_text = s.tokenizer.render_chat(list(turn_input.messages), enable_thinking=s.enable_thinking)
                prompt_chars = sum(len(m["content"]) for m in turn_input.messages)
            else:
                prompt_text = turn_input.prompt or ""
                prompt_chars = len(prompt_text)
            prompt_tokens = len(s.tokenizer.encode(prompt_text))
            limits.check(prompt_chars=prompt_chars, prompt_tokens=prompt_tokens, max_new_tokens=req.sampling.max_tokens)
            turn = TurnRequest.model_validate({
                "task": "turn", "request": req.request_id, "session": req.session_id,
                "messages": turn_input.messages, "prompt": turn_input.prompt,
                "rendered": prompt_text if turn_input.messages is not None else None,
                "max_new_tokens": req.sampling.max_tokens, "temperature": float(req.sampling.temperature),
                "top_k": req.sampling.top_k, "top_p": float(req.sampling.top_p), "seed": seed}, strict=False)
        except Interrupted as err:
            refuse(err, "interrupted")
            raise
        except SecureRunError as err:
            refuse(err)
            raise
        except ValueError as err:  # pydantic: a field the worker protocol refuses
            usage = UsageError(f"invalid request: {err}"[:500], rule="warm.request",
                               hint="check the request's fields")
            refuse(usage)
            raise usage from None

        guard_out = s.policy.output_guard()
        deadline = limits.deadline()
        stop_now = threading.Event()
        stops = _StopStrings(req.sampling.stop)
        started = time.monotonic()
        first_token: float | None = None
        first_text: float | None = None
        tokens = 0
        worker_stats: dict[str, object] = {}
        reported: WorkerStats | None = None
        finish: str | None = None
        stream = self._worker.turn(turn, cancel=_AnyOf((cancel, stop_now)),
                                   timeout_s=limits.timeout_s + LOAD_ALLOWANCE_S)
        audited = False

        def finished(reason: str | None, *, client_gone: bool = False) -> dict[str, object]:
            """Write the request's one ``finished`` record; returns its statistics."""
            nonlocal audited
            audited = True
            events.extend(guard_out.events)
            detail = worker_stats.get("detail")
            detail = detail if isinstance(detail, dict) else {}
            if reason is None:
                reason = "cancelled" if cancel.is_set() else str(detail.get("finish_reason", "length"))
                if reason not in ("stop", "length", "cancelled"):
                    reason = "length"
            with self._count_lock:
                if reason == "cancelled":
                    self._counters.requests_cancelled_total += 1
                self._count(req, tokens, detail)
            stats: dict[str, object] = {
                **base,
                "prompt_tokens": worker_stats.get("prompt_tokens", prompt_tokens),
                "host_prompt_tokens": prompt_tokens,
                "completion_tokens": tokens,
                "generated_tokens": tokens,
                "finish_reason": reason,
                "client_gone": client_gone,
                "prefilled_tokens": detail.get("prefilled_tokens"),
                "reused_tokens": detail.get("reused_tokens"),
                "worker_loads": detail.get("loads"),
                "session_turns": detail.get("session_turns"),
                "seconds": round(time.monotonic() - started, 4),
                # both from the moment the request was received (host checks included)
                "first_token_seconds": None if first_token is None else round(first_token, 4),
                "first_text_seconds": None if first_text is None else round(first_text, 4),
                "worker_first_token_seconds": worker_stats.get("first_token_seconds"),
                "tokens_per_second": worker_stats.get("tokens_per_second"),
                "output_blocked": reason == "blocked",
            }
            host_measured = {"source": "host", "generated_tokens": tokens, "prompt_tokens": prompt_tokens,
                             "seconds": stats["seconds"], "first_token_seconds": stats["first_token_seconds"],
                             "first_text_seconds": stats["first_text_seconds"], "finish_reason": reason,
                             "output_blocked": reason == "blocked"}
            s.audit.append(s.record("finished", run_id=req.request_id, parameters=params, run_stats=stats,
                                    guardrail_events=events, prompt=prompt_text, output="".join(released_text),
                                    host_measured=host_measured,
                                    worker_reported=reported.as_record() if reported is not None else None,
                                    worker_device=worker_device(worker_stats)))
            return stats

        try:
            try:
                for ev in stream:
                    if isinstance(ev, TokenEvent):
                        tokens += 1
                        if first_token is None:
                            first_token = time.monotonic() - received
                    elif isinstance(ev, TextEvent) and finish is None:
                        # stop strings first (on the worker's text, so the worker is stopped at once),
                        # then the output guardrail on what comes before the stop
                        cut, hit = stops.feed(ev.text)
                        released = guard_out.feed(cut) if cut else ""
                        if guard_out.blocked:
                            finish = "blocked"
                            stop_now.set()
                        if released:
                            if first_text is None:
                                first_text = time.monotonic() - received
                            released_text.append(released)
                            yield Text(released)
                        if hit and finish is None:
                            finish = "stop"
                            stop_now.set()
                    elif isinstance(ev, StatsEvent):
                        worker_stats = ev.model_dump(exclude={"type", "request"})
                        reported = WorkerStats.from_event(ev, host_counted_tokens=tokens)
                    if finish is None:
                        deadline.check()
            except Interrupted as err:
                stream.close()  # cancels the turn in the worker
                events.extend(guard_out.events)
                audited = True
                refuse(err, "interrupted")
                raise
            except SecureRunError as err:
                stream.close()
                events.extend(guard_out.events)
                audited = True
                refuse(err)
                raise
            finally:
                stream.close()
            if finish in (None, "stop"):
                cut, hit = stops.feed("", final=True)
                tail = (guard_out.feed(cut) if cut else "") + guard_out.finish()
                if guard_out.blocked:
                    finish = "blocked"
                elif hit:
                    finish = "stop"
                if tail:
                    if first_text is None:
                        first_text = time.monotonic() - received
                    released_text.append(tail)
                    yield Text(tail)
            stats = finished(finish)
        except GeneratorExit:  # the consumer went away (client disconnect): the turn was cancelled
            stream.close()
            if not audited:
                finished("cancelled", client_gone=True)
            raise
        yield Final(stats=stats, blocked=finish == "blocked", audit_path=str(s.audit.path))

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the warm session is closed", rule="warm.closed", hint="open a new session")
        if not self._worker.alive:
            raise SandboxError("the warm session's worker has ended", rule="sandbox.worker.died",
                               hint="open a new session")

    def _checked_input(self, req: CompletionRequest, events: list[GuardrailEvent]) -> _Input:
        """The request's input after validation and the input guardrail (user text may be redacted)."""
        problems = req.sampling.problems()
        if (req.messages is None) == (req.prompt is None):
            problems.append("give exactly one of messages and prompt")
        if req.session_id is not None and req.messages is None:
            problems.append("session_id continues a chat: give messages, not prompt")
        if req.session_id is not None and not _ID_OK(req.session_id):
            problems.append("session_id: 1-128 characters of A-Z a-z 0-9 . _ : - (starting with a letter or digit)")
        if not _ID_OK(req.request_id):
            problems.append("request_id: 1-128 characters of A-Z a-z 0-9 . _ : - (starting with a letter or digit)")
        for i, m in enumerate(req.messages or ()):
            if set(m) != {"role", "content"} or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                problems.append(f"messages[{i}]: needs exactly role (system/user/assistant) and content (text)")
        if problems:
            raise UsageError("invalid completion request", details=tuple(problems), rule="warm.request",
                             hint="fix the request's fields")
        guard_in = self._session.policy.input_guard()
        if req.messages is not None:
            checked = []
            for m in req.messages:
                content = m["content"]
                if m["role"] == "user":
                    verdict = guard_in.enforce(content)
                    events.extend(verdict.events)
                    content = verdict.text
                checked.append({"role": m["role"], "content": content})
            return _Input(messages=tuple(checked), prompt=None)
        verdict = guard_in.enforce(req.prompt or "")
        events.extend(verdict.events)
        return _Input(messages=None, prompt=verdict.text)

    def _count(self, req: CompletionRequest, tokens: int, detail: Mapping[str, object]) -> None:
        c = self._counters
        c.tokens_total += tokens
        for key, attr in (("prefilled_tokens", "prefilled_tokens_total"), ("reused_tokens", "reused_tokens_total")):
            v = detail.get(key)
            if isinstance(v, int):
                setattr(c, attr, getattr(c, attr) + v)
        v = detail.get("prefilled_tokens")
        r = detail.get("reused_tokens")
        if isinstance(v, int) and isinstance(r, int):
            c.prompt_tokens_total += v + r
        loads = detail.get("loads")
        if isinstance(loads, int):
            c.worker_loads_total = loads
        turns = detail.get("session_turns")
        if req.session_id is not None and isinstance(turns, int):
            c.sessions[req.session_id] = turns

    # --- sessions ---------------------------------------------------------------------------

    def fork(self, session_id: str, *, at_turn: int | None = None) -> str:
        """A new conversation holding ``session_id``'s first ``at_turn`` turns (default: all); its id."""
        from secure_run.sandbox.protocol import SessionRequest

        with self._lock:
            self._check_open()
            turns = self._known(session_id, at_turn)
            self._forks += 1
            target = f"{session_id[:100]}.fork{self._forks}"
            ev = self._worker.session(SessionRequest(task="session", request=f"fork-{self._forks}", op="fork",
                                                     session=session_id, target=target, turn=at_turn))
            with self._count_lock:
                self._counters.sessions[target] = ev.turns if at_turn is None else min(at_turn, turns)
            return target

    def rollback(self, session_id: str, turn: int) -> None:
        """Keep only the first ``turn`` turns of ``session_id``."""
        from secure_run.sandbox.protocol import SessionRequest

        with self._lock:
            self._check_open()
            self._known(session_id, turn)
            ev = self._worker.session(SessionRequest(task="session", request=f"rollback-{secrets.token_hex(4)}",
                                                     op="rollback", session=session_id, turn=turn))
            with self._count_lock:
                self._counters.sessions[session_id] = ev.turns

    def _known(self, session_id: str, turn: int | None) -> int:
        with self._count_lock:
            turns = self._counters.sessions.get(session_id)
        if turns is None:
            raise UsageError(f"no conversation {session_id!r} in this warm session", rule="warm.session-unknown",
                             hint="start it with a completion that has this session_id")
        if turn is not None and not 0 <= turn <= turns:
            raise UsageError(f"conversation {session_id!r} has {turns} turns; turn {turn} does not exist",
                             rule="warm.session-turn", hint=f"use a turn between 0 and {turns}")
        return turns

    def sessions(self) -> Mapping[str, int]:
        """Conversation id -> completed turns (as the worker last reported)."""
        with self._count_lock:
            return dict(self._counters.sessions)

    # --- metrics ----------------------------------------------------------------------------

    def metrics(self) -> Mapping[str, float]:
        """Counters for ``/metrics`` (``worker_loads_total`` stays 1 for a healthy session)."""
        c = self._counters
        return {
            "worker_loads_total": float(c.worker_loads_total),
            "requests_total": float(c.requests_total),
            "requests_refused_total": float(c.requests_refused_total),
            "requests_cancelled_total": float(c.requests_cancelled_total),
            "tokens_total": float(c.tokens_total),
            "prompt_tokens_total": float(c.prompt_tokens_total),
            "prefilled_tokens_total": float(c.prefilled_tokens_total),
            "reused_tokens_total": float(c.reused_tokens_total),
            "sessions": float(len(c.sessions)),
            "worker_alive": 1.0 if (not self._closed and self._worker.alive) else 0.0,
        }


@dataclass(frozen=True)
class _Input:
    messages: tuple[dict[str, str], ...] | None
    prompt: str | None


def _ID_OK(value: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", value) is not None


class _StopStrings:
    """Cuts the released text at the first stop string; holds back what could be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf = ""
        self.done = False

    def feed(self, text: str, *, final: bool = False) -> tuple[str, bool]:
        """(text safe to release now, whether a stop string was hit)."""
        if self.done:
            return "", True
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.done = self.buf[:cut], "", True
            return out, True
        if final or not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        keep = min(self.hold, len(self.buf))
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, False


def _defaults(session: Session) -> SamplingParams:
    """Sampling defaults from the verified ``generation_config.json`` (capped by the policy).

    The values are read by :func:`~secure_run.runner.pipeline.model_sampling` (shared with one-shot
    ``generate``); an API client that sets none samples at temperature 1.0 when the model sets none.
    """
    from secure_run.runner.pipeline import model_sampling

    g = session.tokenizer.generation_defaults
    model = model_sampling(g)
    limits = session.policy.limits()
    max_new = g.get("max_new_tokens", session.max_new_tokens)
    return SamplingParams(
        temperature=float(model.get("temperature", 1.0)),
        top_p=float(model.get("top_p", 1.0)),
        top_k=int(model.get("top_k", 0)),
        seed=None,
        max_tokens=min(int(max_new) if isinstance(max_new, int) and max_new > 0 else 64, limits.max_new_tokens),
    )
