"""Licence acceptance records (checks L1, L2), kept locally like a gated repository's consent.

A record binds: licence id, the normalised fingerprint of the exact text accepted, the hashes of
documents it incorporates (e.g. the Trustworthy AI terms; ``unpinned`` when not captured), the
policy hash, the operator and the acknowledgements given. Change any of them (a new LICENSE text,
an edited policy, another operator) and generation is refused again until a new acceptance.
Records are appended to a JSON-lines file (default ``$XDG_STATE_HOME/secure-run/licenses.jsonl``)
with the same safety rules as the audit log.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from secure_run.errors import PolicyViolation, UsageError

from . import _files
from ._base import LicenseId, Name, Sha256, Strict
from ._state import TornTail, append_json_line, read_json_lines, read_lines
from .errors import StateFileError
from .licenses import LicenseEntry, LicenseMatch, classify_license
from .policy import Policy
from .schema import Acknowledgement


class AcceptanceRecord(Strict):
    """One acceptance of one licence text under one policy by one operator."""

    license_id: LicenseId
    license_fingerprint: Sha256
    incorporated: tuple[Name, ...]
    policy_sha256: Sha256
    policy_name: Name
    operator: Name
    acknowledgements: tuple[Acknowledgement, ...]
    accepted_at: Name

    def binds(self, *, license_id: str, fingerprint: str, incorporated: Sequence[str], policy_sha256: str, operator: str) -> bool:
        """True when this record covers exactly these values."""
        return (
            self.license_id == license_id
            and self.license_fingerprint == fingerprint
            and tuple(incorporated) == self.incorporated
            and self.policy_sha256 == policy_sha256
            and self.operator == operator
        )


def incorporated_ids(entry: LicenseEntry | None) -> tuple[str, ...]:
    """``name=sha256`` (or ``name=unpinned``) for every document the licence incorporates."""
    if entry is None:
        return ()
    return tuple(f"{doc.name}={doc.sha256 or 'unpinned'}" for doc in entry.incorporated)


class AcceptanceStore:
    """The local acceptance file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[AcceptanceRecord]:
        """Every record, oldest first.

        Raises:
            StateFileError: unsafe file or a malformed record.
        """
        out = []
        for i, raw in enumerate(read_json_lines(self.path), start=1):
            try:
                out.append(AcceptanceRecord.model_validate_json(json.dumps(raw)))
            except ValidationError as err:
                raise StateFileError(
                    f"{self.path}: record {i} is malformed ({err.error_count()} problem(s))",
                    path=str(self.path),
                    rule="state.format",
                ) from None
        return out

    def torn_tail(self) -> TornTail | None:
        """A torn last line (an interrupted append) that :meth:`records` skips; :meth:`add` cuts it off.

        Raises:
            StateFileError: unsafe file.
        """
        return read_lines(self.path).torn

    def find(
        self, *, license_id: str, fingerprint: str, incorporated: Sequence[str], policy_sha256: str, operator: str
    ) -> AcceptanceRecord | None:
        """The latest record binding exactly these values, or None."""
        for record in reversed(self.records()):
            if record.binds(
                license_id=license_id,
                fingerprint=fingerprint,
                incorporated=incorporated,
                policy_sha256=policy_sha256,
                operator=operator,
            ):
                return record
        return None

    def add(self, record: AcceptanceRecord) -> None:
        """Append a record (O_APPEND, fsync, 0600, symlinks refused)."""
        append_json_line(self.path, record.model_dump(mode="json"))


def classify_model_license(policy: Policy, model_dir: Path) -> tuple[LicenseMatch | None, str | None]:
    """Classify ``model_dir/LICENSE`` with the policy's catalogue; (match, problem)."""
    lic = policy.spec.licenses
    try:
        data = _files.read_bytes(model_dir, "LICENSE")
    except _files.UnsafeFile as err:
        return None, f"LICENSE: {err.reason}"
    match = classify_license(data, lic.entries(), extra_fingerprints=lic.fingerprints, threshold=lic.similarity_threshold)
    return match, None


def accept_license(
    policy: Policy,
    model_dir: Path,
    *,
    license_id: str,
    operator: str,
    acknowledgements: Sequence[str],
    store: AcceptanceStore,
    now: datetime | None = None,
) -> AcceptanceRecord:
    """Record that ``operator`` accepts the LICENSE in ``model_dir`` under ``policy``.

    Only an exactly identified (pinned fingerprint), allowed licence can be accepted, and the
    operator must give every acknowledgement the policy lists.

    Raises:
        PolicyViolation: the licence is not identified exactly, not allowed, or not ``license_id``.
        UsageError: acknowledgements missing or unknown.
    """
    match, problem = classify_model_license(policy, model_dir)
    if match is None:
        raise PolicyViolation(f"cannot accept: {problem}", path=str(model_dir / "LICENSE"), rule="L1")
    if match.kind != "exact" or match.license_id is None:
        raise PolicyViolation(
            f"cannot accept: LICENSE is not exactly identified (classification: {match.kind}"
            + (f", looks like {match.license_id}" if match.license_id else "")
            + ")",
            details=[f"fingerprint {match.fingerprint}", *match.differences],
            path=str(model_dir / "LICENSE"),
            rule="L1",
            hint="review the text, then pin its fingerprint in the policy's licenses.fingerprints",
        )
    lic = policy.spec.licenses
    if match.license_id != license_id:
        raise PolicyViolation(
            f"LICENSE is {match.license_id}, not {license_id}",
            path=str(model_dir / "LICENSE"),
            rule="L1",
            hint=f"accept the licence the model ships: {match.license_id}",
        )
    if match.license_id not in lic.allowed or match.license_id in lic.denied:
        raise PolicyViolation(f"{match.license_id} is not allowed by policy {policy.name}", rule="A1")
    required = set(policy.spec.acceptance.acknowledgements)
    given = set(acknowledgements)
    known = set(Acknowledgement.__args__)  # type: ignore[attr-defined]
    unknown = sorted(given - known)
    if unknown:
        raise UsageError(f"unknown acknowledgements {unknown}", hint=f"choose from {sorted(known)}", rule="L2")
    missing = sorted(required - given)
    if missing:
        raise UsageError(
            f"policy {policy.name} requires acknowledging {missing}",
            hint="pass --acknowledge for each item after reading the licence terms",
            rule="L2",
        )
    record = AcceptanceRecord(
        license_id=match.license_id,
        license_fingerprint=match.fingerprint,
        incorporated=incorporated_ids(lic.entry(match.license_id)),
        policy_sha256=policy.sha256,
        policy_name=policy.name,
        operator=operator,
        acknowledgements=tuple(sorted(given)),  # type: ignore[arg-type]
        accepted_at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
    )
    store.add(record)
    return record
