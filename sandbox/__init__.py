"""Sandbox policy and launch backends (docker, namespace) plus the in-sandbox worker.

    >>> from secure_run.sandbox import SandboxPolicy, SelftestRequest, get_backend, run_worker
    >>> policy = SandboxPolicy(memory_mib=2048, pids_limit=128, wall_clock_s=120)
    >>> policy.network, policy.capabilities
    ('none', 'none')
    >>> backend = get_backend("docker", build=True)          # or get_backend("namespace")  # doctest: +SKIP
    >>> for event in run_worker(backend, policy, SelftestRequest(task="selftest", seed=1)):  # doctest: +SKIP
    ...     print(event.type)

Public surface:

* :class:`SandboxPolicy` (``policy``): the one object both backends enforce.
* :func:`get_backend`, :class:`Backend`, :class:`RunResult` (``backends``): ``backend.run(argv,
  policy)`` runs anything inside the sandbox; :func:`run_worker` runs the worker with one request
  and yields validated events (each line by :class:`EventReader`, the stream by
  :class:`EventValidator` against :class:`RunBounds`); worker errors are :class:`WorkerRefusal` /
  :class:`WorkerFailure`; :func:`stop_all` stops every sandbox of the process (signal handlers).
* the worker protocol (``protocol``): :class:`SelftestRequest`, :class:`GenerateRequest`, the
  events, :class:`EventReader` and :class:`ProtocolError`.
* errors (``errors``): :class:`EngineUnavailable`, :class:`ImageMissing`, :class:`GpuUnavailable`,
  :class:`SandboxTimeout`, :class:`SandboxOOM` (all ``SandboxError``, exit code 2).

Importing this package is cheap (no torch, no Docker SDK); backends load what they need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends import Backend, RunResult, WorkerFailure, WorkerRefusal, get_backend, run_worker, stop_all
    from .errors import EngineUnavailable, GpuUnavailable, ImageMissing, SandboxOOM, SandboxTimeout
    from .policy import MODEL_MOUNT, SandboxPolicy, policy_from_mapping
    from .protocol import (
        ErrorEvent,
        EventReader,
        EventValidator,
        GenerateRequest,
        ProtocolError,
        RunBounds,
        SelftestRequest,
        StatsEvent,
        TextEvent,
        TokenEvent,
        WorkerStats,
    )

__all__ = [
    "MODEL_MOUNT",
    "Backend",
    "EngineUnavailable",
    "ErrorEvent",
    "EventReader",
    "EventValidator",
    "GenerateRequest",
    "GpuUnavailable",
    "ImageMissing",
    "ProtocolError",
    "RunBounds",
    "RunResult",
    "SandboxOOM",
    "SandboxPolicy",
    "SandboxTimeout",
    "SelftestRequest",
    "StatsEvent",
    "TextEvent",
    "TokenEvent",
    "WorkerFailure",
    "WorkerRefusal",
    "WorkerStats",
    "get_backend",
    "policy_from_mapping",
    "run_worker",
    "stop_all",
]

_WHERE = {
    "Backend": "backends", "RunResult": "backends", "get_backend": "backends", "run_worker": "backends",
    "WorkerFailure": "backends", "WorkerRefusal": "backends", "stop_all": "backends",
    "EngineUnavailable": "errors", "GpuUnavailable": "errors", "ImageMissing": "errors", "SandboxOOM": "errors",
    "SandboxTimeout": "errors",
    "MODEL_MOUNT": "policy", "SandboxPolicy": "policy", "policy_from_mapping": "policy",
    "ErrorEvent": "protocol", "EventReader": "protocol", "GenerateRequest": "protocol", "ProtocolError": "protocol",
    "SelftestRequest": "protocol", "StatsEvent": "protocol", "TextEvent": "protocol", "TokenEvent": "protocol",
    "EventValidator": "protocol", "RunBounds": "protocol", "WorkerStats": "protocol",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"secure_run.sandbox.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'secure_run.sandbox' has no attribute {name!r}")
