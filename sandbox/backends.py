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
    GenerateRequest,
    ProtocolError,
    SelftestRequest,
    StatsEvent,
    StreamLimits,
    TextEvent,
    TokenEvent,
    encode_request,
    terminal_safe,
)

__all__ = ["Backend", "Outcome", "RunResult", "SandboxRun", "get_backend", "run_worker"]

STDOUT, STDERR = 1, 2


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
    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"") -> SandboxRun:
        """Start ``argv`` in a new sandbox; ``stdin`` is written to it and then closed."""

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
    message = f"worker: {ev.message}"
    rule = ev.rule or f"sandbox.worker.{ev.code}"
    if ev.code == "model_refused":
        raise ModelError(message, rule=rule, hint="the model files did not pass the worker's checks; verify again")
    if ev.code == "bad_request":
        raise UsageError(message, rule=rule, hint="check the generation options")
    raise SandboxError(message, rule=rule, hint="see the message; re-run with a GPU/CPU setting the host supports")


def run_worker(backend: Backend, policy: SandboxPolicy, request: SelftestRequest | GenerateRequest,
               limits: StreamLimits | None = None) -> Iterator[TokenEvent | TextEvent | StatsEvent]:
    """Run the worker with ``request``; yield its validated token, text and stats events.

    Raises:
        ProtocolError: the worker broke the protocol (the sandbox is killed at once).
        SandboxTimeout / SandboxOOM: the wall-clock or memory limit ended the run.
        ModelError / UsageError / SandboxError: the worker reported an error event.
        SandboxError: the worker exited non-zero without reporting why (stderr tail attached).
    """
    reader = EventReader(limits)
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
                if isinstance(ev, ErrorEvent):
                    error = ev
                    continue
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
