"""The audit log (check G7): one JSON line per decision / run, appended safely.

Each record holds: timestamp, host, event, decision (allowed, mode, findings), policy hash, model root
digest, licence fingerprint, operator, declared use, run statistics and guardrail events. The file
is append-only (O_APPEND, one write per record under flock, fsync), private (0600) and never written
through a symlink. Default location: ``$XDG_STATE_HOME/secure-run/audit.jsonl``.

    >>> import tempfile, pathlib
    >>> log = AuditLog(pathlib.Path(tempfile.mkdtemp()) / "audit.jsonl")
    >>> log.append({"event": "example"})
    >>> log.read()[0]["event"]
    'example'
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from ._state import append_json_line, read_json_lines
from .errors import StateFileError
from .findings import Decision
from .guardrails import GuardrailEvent

AUDIT_SCHEMA = 1


class AuditLog:
    """An append-only JSON-lines audit file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: Mapping[str, object]) -> None:
        """Append one record.

        Raises:
            StateFileError: symlink, foreign owner, group/other permissions, or a failed write.
        """
        append_json_line(self.path, dict(record))

    def check_writable(self) -> None:
        """Raise unless a record could be appended now (the file is created if missing, nothing written).

        Raises:
            StateFileError: the folder cannot be created, or the file cannot be opened for appending
                safely (symlink, foreign owner, group/other permissions).
        """
        from ._state import _check_open_file, _open_nofollow

        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StateFileError(f"cannot create {self.path.parent}: {err.strerror}", path=str(self.path),
                                 rule="state.open") from None
        with _open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT) as fd:
            _check_open_file(fd, self.path)

    def read(self) -> list[dict[str, object]]:
        """Every record, oldest first."""
        return read_json_lines(self.path)


def audit_record(
    decision: Decision,
    *,
    event: str = "decision",
    run_stats: Mapping[str, object] | None = None,
    guardrail_events: Iterable[GuardrailEvent] = (),
    now: datetime | None = None,
) -> dict[str, object]:
    """Build the audit record for a decision (and, after a run, its statistics and rail events)."""
    license_info = decision.license or {}
    return {
        "schema": AUDIT_SCHEMA,
        "ts": (now or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        "event": event,
        "allowed": decision.allowed,
        "mode": decision.mode,
        "stage": decision.stage,
        "policy_name": decision.policy_name,
        "policy_sha256": decision.policy_sha256,
        "model_dir": decision.model_dir,
        "model_root_digest": decision.model_root_digest,
        "license_id": license_info.get("license_id"),
        "license_fingerprint": license_info.get("fingerprint"),
        "operator": decision.operator,
        "host": socket.gethostname(),
        "declared_use": decision.declared_use,
        "findings": [f.to_json() for f in decision.findings],
        "run_stats": dict(run_stats) if run_stats is not None else None,
        "guardrail_events": [e.to_json() for e in guardrail_events],
    }
