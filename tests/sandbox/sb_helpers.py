"""Helpers shared by the sandbox tests (imported by name: tests/sandbox is on sys.path)."""

from __future__ import annotations

import json
import os
from typing import Any

from secure_run.sandbox import SandboxPolicy
from secure_run.sandbox.backends import Backend, RunResult
from secure_run.sandbox.probes import INSIDE_PROBE
from secure_run.sandbox.probes import HostListener as Listener  # noqa: F401  (the tests' host listener)

#: the package's inside probe (``sandbox selftest`` runs the same script)
PROBE = INSIDE_PROBE


def required(cap: str) -> bool:
    """Whether CI requires the capability (SECURE_RUN_REQUIRE)."""
    return cap in {c.strip() for c in os.environ.get("SECURE_RUN_REQUIRE", "").split(",")}


def py(backend: Backend, policy: SandboxPolicy, code: str, *args: str, stdin: bytes = b"") -> RunResult:
    """Run Python ``code`` inside the sandbox."""
    return backend.run([*backend.python_argv(), "-c", code, *args], policy, stdin=stdin)


def probe(backend: Backend, policy: SandboxPolicy, port: int) -> dict[str, Any]:
    """Run the inside probe (secure_run.sandbox.probes.INSIDE_PROBE) in the sandbox and return its report."""
    res = py(backend, policy, PROBE, str(port))
    assert res.exit_code == 0, res.stderr.decode(errors="replace")[-3000:]
    report: dict[str, Any] = json.loads(res.stdout.decode().splitlines()[-1])
    return report


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker`` (to prove nothing outlived a sandbox)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found
