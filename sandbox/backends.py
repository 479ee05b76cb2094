"""Launch backends behind one interface, and the worker driver.

    >>> from secure_run.sandbox import SandboxPolicy, SelftestRequest, get_backend, run_worker
    >>> backend = get_backend("namespace")                     # or "docker"     # doctest: +SKIP
    >>> events = run_worker(backend, SandboxPolicy(memory_mib=2048),
    ...                     SelftestRequest(task="selftest", seed=1))        # doctest: +SKIP

:meth:`Backend.run` runs any argv inside the sandbox and returns a :class:`RunResult` (the tests
use it to probe each control from inside); :func:`run_worker` runs the worker with one request
and yields validated events, raising a clear error for a timeout, an OOM kill, a protocol
violation, or a failure the worker reports.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from secure_run.errors import ModelError, SandboxError, UsageError

from .errors import SandboxOOM, SandboxTimeout
from .policy import SandboxPolicy
from .protocol import (
    ErrorEvent,
    EventReader,
    EventValidator,
    GenerateRequest,
    LoadedEvent,
    ProtocolError,
    RunBounds,
    SelftestRequest,
    SessionEvent,
    StatsEvent,
    StreamLimits,
    TextEvent,
    TokenEvent,
    encode_request,
    terminal_safe,
)

__all__ = ["Backend", "Outcome", "RunResult", "SandboxRun", "WorkerFailure", "WorkerRefusal", "get_backend",
           "run_worker"]

STDOUT, STDERR = 1, 2

#: Rule ids a worker may report as its own; anything else (a host rule such as a signature or
#: policy refusal) is never shown as a rule id, only as a worker-reported detail.
WORKER_RULE_PREFIX = "sandbox.worker."


def _worker_details(ev: ErrorEvent) -> tuple[str, ...]:
    claimed = ev.rule or "(none)"
    own = claimed.startswith(WORKER_RULE_PREFIX)
    return (f"worker-reported code: {ev.code}",
            f"worker-reported rule: {claimed}" + ("" if own else " (not a worker rule; not trusted)"))


def _worker_rule(ev: ErrorEvent) -> str:
    if ev.rule is not None and ev.rule.startswith(WORKER_RULE_PREFIX):
        return ev.rule
    return f"{WORKER_RULE_PREFIX}{ev.code}"


class WorkerRefusal(ModelError):
    """The sandboxed worker refused the model files (exit 1); its text is shown as the worker's claim only.

    The rule id is always in the ``sandbox.worker.`` namespace and the kind is ``worker``: a worker
    cannot make its refusal look like a host verdict (a signature, digest or policy refusal).
    """

    kind = "worker"

    def __init__(self, ev: ErrorEvent) -> None:
        super().__init__(f"the sandboxed worker refused the model: {ev.message}", details=_worker_details(ev),
                         rule=_worker_rule(ev),
                         hint="the worker's own checks failed (e.g. a file changed after verification); verify again")


class WorkerFailure(SandboxError):
    """The sandboxed worker failed (bad request, unavailable device, internal error; exit 2)."""

    kind = "worker"

    def __init__(self, ev: ErrorEvent) -> None:
        hint = ("check the generation options" if ev.code == "bad_request"
                else "see the message; re-run with a GPU/CPU setting the host supports")
        super().__init__(f"the sandboxed worker failed: {ev.message}", details=_worker_details(ev),
                         rule=_worker_rule(ev), hint=hint)


@dataclass(frozen=True)
class Outcome:
    """How a sandboxed process ended."""

    exit_code: int | None
    timed_out: bool
    oom_killed: bool
    missing_controls: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RunResult:
    """Everything :meth:`Backend.run` observed (output capped; see the ``*_truncated`` flags)."""

    backend: str
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    oom_killed: bool
    duration_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    missing_controls: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        """Exited 0, not killed."""
        return self.exit_code == 0 and not self.timed_out and not self.oom_killed


class SandboxRun(ABC):
    """A started sandbox: read its output, then :meth:`finish` (always; it cleans up)."""

    def __init__(self, policy: SandboxPolicy) -> None:
        self.policy = policy
        self.started = time.monotonic()
        self.deadline = self.started + policy.wall_clock_s
        self.timed_out = False

    def remaining(self) -> float:
        """Seconds left before the wall-clock limit."""
        return self.deadline - time.monotonic()

    @abstractmethod
    def chunks(self) -> Iterator[tuple[int, bytes]]:
        """(STDOUT|STDERR, bytes) until both streams end; at the deadline the sandbox is killed."""

    @abstractmethod
    def kill(self) -> None:
        """Kill the whole sandbox now (idempotent)."""

    def write_stdin(self, data: bytes) -> None:
        """Write to the sandbox's stdin (only for a run started with ``keep_stdin_open``).

        Raises:
            SandboxError: rule ``sandbox.stdin`` when stdin is closed or the sandbox is gone.
        """
        raise SandboxError("this sandbox run does not take more input", rule="sandbox.stdin")

    def close_stdin(self) -> None:
        """End the sandbox's stdin (idempotent; a persistent worker then exits).

        Runs started without ``keep_stdin_open`` have it closed already: nothing to do.
        """
        return None

    @abstractmethod
    def finish(self) -> Outcome:
        """Wait for the end (killing at the deadline), collect the outcome, remove everything."""

    def __enter__(self) -> SandboxRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.finish()


class Backend(ABC):
    """A way to launch a sandbox that enforces a :class:`SandboxPolicy`."""

    name: str = "?"

    @abstractmethod
    def python_argv(self) -> list[str]:
        """How to start the sandbox's Python (``[interpreter, flags...]``)."""

    @abstractmethod
    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"",
              keep_stdin_open: bool = False) -> SandboxRun:
        """Start ``argv`` in a new sandbox; ``stdin`` is written to it and then closed, unless
        ``keep_stdin_open`` (a persistent worker: more is sent with :meth:`SandboxRun.write_stdin`)."""

    def worker_argv(self) -> list[str]:
        """The worker's command line inside the sandbox."""
        return [*self.python_argv(), "-m", "secure_run.sandbox.worker"]

    def run(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"",
            max_output: int = 1 << 20) -> RunResult:
        """Run ``argv`` to completion (or the wall-clock limit) and capture its output."""
        out, err = bytearray(), bytearray()
        trunc = {STDOUT: False, STDERR: False}
        sandbox = self.start(argv, policy, stdin=stdin)
        try:
            for stream, data in sandbox.chunks():
                buf = out if stream == STDOUT else err
                room = max_output - len(buf)
                if len(data) > room:
                    trunc[stream] = True
                buf.extend(data[: max(room, 0)])
        except BaseException:
            sandbox.kill()
            sandbox.finish()
            raise
        outcome = sandbox.finish()
        return RunResult(backend=self.name, exit_code=outcome.exit_code, stdout=bytes(out), stderr=bytes(err),
                         timed_out=outcome.timed_out, oom_killed=outcome.oom_killed,
                         duration_s=time.monotonic() - sandbox.started, stdout_truncated=trunc[STDOUT],
                         stderr_truncated=trunc[STDERR], missing_controls=outcome.missing_controls)


def get_backend(name: Literal["docker", "namespace"], **options: Any) -> Backend:
    """The backend called ``name`` (docker: ``build=`` allows building a missing image)."""
    if name == "docker":
        from ._internal.docker_backend import DockerBackend

        return DockerBackend(**options)
    if name == "namespace":
        from ._internal.namespace_backend import NamespaceBackend

        return NamespaceBackend(**options)
    raise UsageError(f"unknown sandbox backend {name!r}", rule="sandbox.backend", hint="use docker or namespace")


def _tail(data: bytes, limit: int = 2000) -> str:
    return terminal_safe(data[-limit:].decode("utf-8", "replace")).strip()


def _raise_worker_error(ev: ErrorEvent) -> None:
    """Map the worker's error event to a worker error: it cannot borrow a host rule id or error kind."""
    if ev.code == "model_refused":
        raise WorkerRefusal(ev)
    raise WorkerFailure(ev)


def run_worker(backend: Backend, policy: SandboxPolicy, request: SelftestRequest | GenerateRequest,
               limits: StreamLimits | None = None,
               bounds: RunBounds | None = None) -> Iterator[TokenEvent | TextEvent | StatsEvent]:
    """Run the worker with ``request``; yield its validated token, text and stats events.

    Every event passes :class:`EventReader` (each line) and :class:`EventValidator` (the sequence,
    against ``bounds``, by default derived from ``request`` and the policy's uid): the host counts
    the tokens and bounds the text; the worker's numbers are only believed when they agree.

    Raises:
        ProtocolError: the worker broke the protocol or its bounds (the sandbox is killed at once).
        WorkerRefusal / WorkerFailure: the worker reported an error (rule ``sandbox.worker.<code>``).
        SandboxTimeout / SandboxOOM: the wall-clock or memory limit ended the run.
        SandboxError: the worker exited non-zero without reporting why (stderr tail attached).
    """
    reader = EventReader(limits)
    validator = EventValidator(bounds or RunBounds.for_request(request, uid=policy.uid))
    stderr = bytearray()
    error: ErrorEvent | None = None
    stats = False
    sandbox = backend.start(backend.worker_argv(), policy, stdin=encode_request(request))
    try:
        for stream, data in sandbox.chunks():
            if stream == STDERR:
                stderr.extend(data)
                del stderr[:-65536]
                continue
            for ev in reader.feed(data):
                if error is not None or stats:
                    raise ProtocolError("worker wrote events after its final event", what="after_final")
                if isinstance(ev, (LoadedEvent, SessionEvent)) or ev.request is not None:
                    raise ProtocolError(f"a one-shot worker sent a {ev.type} event of a persistent worker",
                                        what="unexpected_event")
                if isinstance(ev, ErrorEvent):
                    error = ev
                    continue
                validator.check(ev)
                stats = isinstance(ev, StatsEvent)
                yield ev
        reader.close()
    except BaseException:
        sandbox.kill()
        sandbox.finish()
        raise
    outcome = sandbox.finish()
    if outcome.timed_out:
        raise SandboxTimeout(policy.wall_clock_s)
    if outcome.oom_killed:
        raise SandboxOOM(policy.memory_mib)
    if error is not None:
        _raise_worker_error(error)
    if outcome.exit_code != 0 or not stats:
        raise SandboxError(
            f"the worker exited with status {outcome.exit_code} without a final stats event",
            details=(f"stderr: {_tail(bytes(stderr))}",) if stderr else (),
            rule="sandbox.worker.failed",
            hint="see the worker's stderr above",
        )
