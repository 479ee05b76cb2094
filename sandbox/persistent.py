"""The host side of a persistent worker: one sandbox, the model loaded once, many requests.

    >>> w = PersistentWorker.start(backend, policy, LoadRequest(task="load", request="load", files=pins))  # doctest: +SKIP
    >>> for ev in w.turn(TurnRequest(task="turn", request="r1", prompt="hi")):  # doctest: +SKIP
    ...     print(ev)
    >>> w.close()                                                          # doctest: +SKIP

The sandbox's stdin stays open; each request is one JSON line and every event the worker writes
carries the request id. A reader thread feeds the worker's stdout through :class:`EventReader`
(line, size and schema limits for the whole life of the sandbox) into a queue; each request's
events are then checked by a fresh :class:`EventValidator` (token order and count, text per token,
stats against the host's count, uid) and must carry that request's id. Several requests may be in
flight at once (the worker batches concurrent turns): the reader thread routes each event to the
queue of its request, and an event for a request that is not in flight ends the session. Each request has its own
deadline (the host sends ``cancel`` at the deadline and kills the sandbox when the worker does not
stop); the sandbox keeps its own wall clock (``policy.wall_clock_s``, the session's length), so it is
bounded even when the host dies. A worker that dies, breaks the protocol or times out ends the
whole session with a clear error, and the sandbox is removed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import NoReturn, Protocol

from secure_run.errors import SandboxError, UsageError

from .backends import STDERR, Backend, Outcome, SandboxRun, _raise_worker_error, _tail
from .errors import SandboxOOM, SandboxTimeout
from .policy import SandboxPolicy
from .protocol import (
    AnyEvent,
    CancelRequest,
    ErrorEvent,
    EventReader,
    EventValidator,
    LoadedEvent,
    LoadRequest,
    ProtocolError,
    RunBounds,
    SessionEvent,
    SessionRequest,
    StatsEvent,
    StreamLimits,
    TextEvent,
    TokenEvent,
    TurnRequest,
    encode_request,
)

__all__ = ["SESSION_LIMITS", "CancelFlag", "PersistentWorker"]

#: Caps on everything one persistent worker may write over its life (many requests).
SESSION_LIMITS = StreamLimits(max_line_bytes=64 * 1024, max_lines=50_000_000, max_total_bytes=8 * 1024**3)
#: seconds the worker gets to stop after ``cancel`` before the sandbox is killed
CANCEL_GRACE_S = 10.0


class CancelFlag(Protocol):
    """Anything with ``is_set()`` (a :class:`threading.Event`, or several combined)."""

    def is_set(self) -> bool:
        """True once the turn should stop."""
        ...


@dataclass(frozen=True)
class _End:
    """The worker's stdout ended (``error`` set when the reader stopped on a protocol violation)."""

    error: BaseException | None = None


class PersistentWorker:
    """A running persistent worker; use :meth:`start`. Thread-safe: each thread may run its own
    request (distinct request ids); the events are routed by request id."""

    def __init__(self, backend: Backend, policy: SandboxPolicy, sandbox: SandboxRun, limits: StreamLimits,
                 *, expect: str | None = None) -> None:
        self.backend = backend
        self.policy = policy
        self._sandbox = sandbox
        self._reader = EventReader(limits)
        self._routes: dict[str, queue.Queue[AnyEvent | _End]] = {}  # request id -> its events
        self._routes_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ended: _End | None = None
        if expect is not None:  # the request already written (load): route its events from the start
            self._open(expect)
        self._stderr = bytearray()
        self._closed = False
        self._dead: SandboxError | None = None
        self.loaded: LoadedEvent | None = None
        self._thread = threading.Thread(target=self._pump, name="secure-run-worker-reader", daemon=True)
        self._thread.start()

    # --- start ------------------------------------------------------------------------------

    @classmethod
    def start(cls, backend: Backend, policy: SandboxPolicy, load: LoadRequest, *,
              limits: StreamLimits | None = None, load_timeout_s: float = 600.0) -> PersistentWorker:
        """Start the sandbox, send ``load`` and wait for :class:`LoadedEvent` (the model verified and loaded).

        Raises:
            WorkerRefusal: the worker refused the model files (a pin did not match, ...).
            WorkerFailure / SandboxError / SandboxTimeout / SandboxOOM: the load failed.
        """
        sandbox = backend.start(backend.worker_argv(), policy, stdin=encode_request(load), keep_stdin_open=True)
        worker = cls(backend, policy, sandbox, limits or SESSION_LIMITS, expect=load.request)
        try:
            ev = worker._next(time.monotonic() + load_timeout_s, load.request, timeout_s=load_timeout_s)
            assert ev is not None  # no poll: an event or an exception
            if isinstance(ev, ErrorEvent):
                worker._stop()
                _raise_worker_error(ev)
            if not isinstance(ev, LoadedEvent):
                raise ProtocolError(f"worker answered the load request with a {ev.type} event", what="unexpected_event")
            if policy.uid is not None and ev.uid != policy.uid:
                raise ProtocolError(f"worker reports uid {ev.uid}, but the sandbox runs as {policy.uid}",
                                    what="stats_implausible")
            worker.loaded = ev
        except BaseException:
            worker._stop()
            raise
        finally:
            worker._close(load.request)
        return worker

    # --- requests ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the worker ended (closed, died, or was killed)."""
        return not self._closed and self._dead is None

    def turn(self, req: TurnRequest, *, cancel: CancelFlag | None = None,
             timeout_s: float = 600.0) -> Generator[TokenEvent | TextEvent | StatsEvent, None, None]:
        """Run one turn; yield its validated events, the last one :class:`StatsEvent`.

        ``cancel`` (when set) or the deadline sends ``cancel`` to the worker, which ends the turn
        with stats whose ``detail.finish_reason`` is ``cancelled``. Closing the iterator early
        cancels too. A worker error for this request raises :class:`WorkerFailure` (the worker
        lives on); anything else ends the session.
        """
        assert self.loaded is not None
        self._open(req.request)
        try:
            self._send(req)
        except BaseException:
            self._close(req.request)
            raise
        bounds = RunBounds(max_tokens=req.max_new_tokens, vocab_size=self.loaded.vocab_size,
                           expected_uid=self.policy.uid)
        validator = EventValidator(bounds)
        deadline = time.monotonic() + timeout_s
        cancelled_at: float | None = None
        done = False
        try:
            while True:
                if cancelled_at is None and ((cancel is not None and cancel.is_set()) or time.monotonic() > deadline):
                    self._send(CancelRequest(task="cancel", request=req.request))
                    cancelled_at = time.monotonic()
                limit = cancelled_at + CANCEL_GRACE_S if cancelled_at is not None else deadline + CANCEL_GRACE_S
                ev = self._next(limit, req.request, poll=0.05 if cancelled_at is None else None, timeout_s=timeout_s)
                if ev is None:
                    continue
                if isinstance(ev, ErrorEvent):
                    done = True
                    _raise_worker_error(ev)
                if not isinstance(ev, (TokenEvent, TextEvent, StatsEvent)):
                    raise ProtocolError(f"worker sent a {ev.type} event during a turn", what="unexpected_event")
                validator.check(ev)
                if isinstance(ev, StatsEvent):
                    done = True
                yield ev
                if done:
                    return
        except GeneratorExit:
            if not done and self.alive:  # the consumer stopped early: stop the turn, drain its events
                self._drain(req.request)
            raise
        except ProtocolError as err:
            self._fail(err)
        finally:
            self._close(req.request)

    def session(self, req: SessionRequest, *, timeout_s: float = 60.0) -> SessionEvent:
        """Fork, roll back or drop a conversation; returns the worker's answer."""
        self._open(req.request)
        try:
            self._send(req)
            ev = self._next(time.monotonic() + timeout_s, req.request, timeout_s=timeout_s)
        finally:
            self._close(req.request)
        if isinstance(ev, ErrorEvent):
            _raise_worker_error(ev)
        if not isinstance(ev, SessionEvent):
            kind = "no" if ev is None else f"a {ev.type}"
            self._fail(ProtocolError(f"worker answered a session request with {kind} event", what="unexpected_event"))
        assert isinstance(ev, SessionEvent)
        return ev

    def close(self) -> None:
        """End stdin (the worker exits), wait briefly, then kill and remove the sandbox. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sandbox.close_stdin()
        self._thread.join(timeout=5.0)
        self._stop()

    # --- internals --------------------------------------------------------------------------

    def _open(self, request: str) -> None:
        """Route the events of ``request`` to a fresh queue (refuses an id already in flight)."""
        with self._routes_lock:
            if request in self._routes:
                raise UsageError(f"request id {request!r} is already in flight in this worker",
                                 rule="sandbox.worker.duplicate_request", hint="give every request its own id")
            q: queue.Queue[AnyEvent | _End] = queue.Queue()
            if self._ended is not None:
                q.put(self._ended)
            self._routes[request] = q

    def _close(self, request: str) -> None:
        with self._routes_lock:
            self._routes.pop(request, None)

    def _send(self, req: TurnRequest | CancelRequest | SessionRequest) -> None:
        if not self.alive:
            raise self._dead or SandboxError("the persistent worker was closed", rule="sandbox.worker.closed",
                                             hint="open a new session")
        try:
            with self._send_lock:  # one whole line at a time
                self._sandbox.write_stdin(encode_request(req))
        except SandboxError:
            self._died(None)

    def _drain(self, request: str) -> None:
        try:
            self._send(CancelRequest(task="cancel", request=request))
            limit = time.monotonic() + CANCEL_GRACE_S
            while True:
                ev = self._next(limit, request)
                if isinstance(ev, (StatsEvent, ErrorEvent)):
                    return
        except SandboxError:
            pass

    def _next(self, limit: float, request: str, *, poll: float | None = None,
              timeout_s: float | None = None) -> AnyEvent | None:
        """The next event of ``request`` (``None`` after ``poll`` seconds without one).

        Raises:
            SandboxTimeout: nothing by ``limit`` (the sandbox is killed).
            ProtocolError: an event for a request not in flight, or a protocol violation.
            SandboxError: the worker ended (exit status, OOM or wall clock named).
        """
        left = limit - time.monotonic()
        with self._routes_lock:
            events = self._routes[request]
        try:
            item = events.get(timeout=max(0.0, min(left, poll) if poll is not None else left))
        except queue.Empty:
            if poll is not None and time.monotonic() < limit:
                return None
            self._stop()
            self._dead = SandboxTimeout(timeout_s if timeout_s is not None else round(left, 3))
            raise self._dead from None
        if isinstance(item, _End):
            self._died(item.error)
        assert not isinstance(item, _End)
        return item

    def _fail(self, err: SandboxError) -> NoReturn:
        """End the session for ``err`` (the sandbox is killed and removed) and raise it."""
        self._stop()
        if self._dead is None:
            self._dead = err
        raise err

    def _died(self, error: BaseException | None) -> None:
        """The worker's output ended: collect how, clean up, raise."""
        outcome = self._stop()
        if isinstance(error, ProtocolError):
            self._dead = error
            raise error
        if outcome is not None and outcome.timed_out:
            self._dead = SandboxTimeout(self.policy.wall_clock_s)
        elif outcome is not None and outcome.oom_killed:
            self._dead = SandboxOOM(self.policy.memory_mib)
        else:
            code = None if outcome is None else outcome.exit_code
            self._dead = SandboxError(
                f"the persistent worker ended unexpectedly (exit status {code}); the session is over",
                details=(f"stderr: {_tail(bytes(self._stderr))}",) if self._stderr else (),
                rule="sandbox.worker.died",
                hint="open a new session; if it happens again, check memory limits and the worker's stderr")
        raise self._dead

    def _stop(self) -> Outcome | None:
        """Kill and remove the sandbox (idempotent); returns its outcome when known."""
        sandbox = self._sandbox
        sandbox.kill()
        self._thread.join(timeout=10.0)
        try:
            return sandbox.finish()
        except SandboxError as err:
            self._dead = err
            return None

    def _pump(self) -> None:
        """Reader thread: worker stdout -> validated events (per line) -> queue."""
        error: BaseException | None = None
        try:
            for stream, data in self._sandbox.chunks():
                if stream == STDERR:
                    self._stderr.extend(data)
                    del self._stderr[:-65536]
                    continue
                for ev in self._reader.feed(data):
                    self._route(ev)
            self._reader.close()
        except ProtocolError as err:
            error = err
            self._sandbox.kill()
        except (OSError, ValueError) as err:  # the stream was closed under us (kill)
            error = None if self._closed else SandboxError(f"lost the worker's output: {err}",
                                                           rule="sandbox.worker.died")
        finally:
            end = _End(error)
            with self._routes_lock:
                self._ended = end
                for q in self._routes.values():
                    q.put(end)

    def _route(self, ev: AnyEvent) -> None:
        """Put ``ev`` on its request's queue; an event for no request in flight is a protocol violation."""
        with self._routes_lock:
            q = self._routes.get(ev.request) if ev.request is not None else None
            if q is None:
                in_flight = ", ".join(sorted(self._routes)) or "none"
                raise ProtocolError(f"worker sent an event for request {ev.request!r}, which is not in flight "
                                    f"(in flight: {in_flight[:200]})", what="wrong_request")
            q.put(ev)

