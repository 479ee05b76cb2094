"""Helpers shared by the sandbox tests (imported by name: tests/sandbox is on sys.path)."""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any

from secure_run.sandbox import SandboxPolicy
from secure_run.sandbox.backends import Backend, RunResult
from secure_run.sandbox.probes import INSIDE_PROBE

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


class Listener:
    """A TCP listener on the host's 127.0.0.1 that records every accepted connection."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


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
