"""``secure-run ci-check``: verify every locked model offline and evaluate its policy.

    $ secure-run ci-check [--lock FILE] [--json]

For each entry of the lock (default: the shipped ``manifests/trusted/models.lock.json``): the
model folder recorded in the entry's ``path`` is verified against the entry's own pinned signer
and root digest (not merely "some locked model"), its tensor table is compared with the vendored
architecture, and, when the entry names a ``policy``, the licence/guardrail policy is evaluated at
stage ``check``. Exit 0 when every entry passes, 1 when any entry is refused or its folder is
missing, 2 for a malformed lock. Entries without a ``path`` cannot be checked here: they are listed
as ``not_checked`` and make the run fail unless ``--allow-unlocated`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from secure_run.errors import Refusal, SecureRunError, UsageError
from secure_run.runner.options import json_option
from secure_run.runner.output import emit_json

if TYPE_CHECKING:
    from secure_run.manifests import Lock, LockEntry, VerificationResult


@dataclass
class EntryReport:
    """Outcome for one locked model."""

    name: str
    status: str  # "ok" | "refused" | "not_checked"
    path: str | None = None
    root_digest: str | None = None
    policy: str | None = None
    policy_allowed: bool | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "status": self.status, "path": self.path, "root_digest": self.root_digest,
            "policy": self.policy, "policy_allowed": self.policy_allowed, "findings": self.findings,
            "error": self.error,
        }


def check_entry(lock: Lock, entry: LockEntry) -> EntryReport:
    """Verify one lock entry (signature, digests, lock pin, tensor table, policy)."""
    from secure_run.policies import load_policy
    from secure_run.runner.gate import run_gate

    folder = lock.model_path(entry)
    report = EntryReport(entry.name, "not_checked", policy=entry.policy,
                         path=None if folder is None else str(folder))
    if folder is None:
        return report
    try:
        if not folder.is_dir():
            raise Refusal(f"model folder of lock entry {entry.name!r} is missing: {folder}", path=str(folder),
                          rule="CI-MISSING", hint="restore the folder or remove the entry from the lock")
        policy = None
        if entry.policy is not None:
            ref = entry.policy if entry.policy.startswith("builtin:") else str(lock.base / entry.policy)
            policy = load_policy(ref)

        def record_digest(_err: BaseException, verification: VerificationResult | None) -> None:
            if verification is not None:  # verified, then refused by the architecture or the policy
                report.root_digest = f"sha256:{verification.root_digest}"

        # the one gate: verify against the entry's own pin -> architecture -> policy (stage check)
        with run_gate(folder, entry.signer.trust(lock.base), lock=entry, policy=policy, stage="check",
                      on_refusal=record_digest) as gate:
            report.root_digest = f"sha256:{gate.verification.root_digest}"
            decision = gate.decision
            if decision is not None:
                report.policy_allowed = decision.allowed
                report.findings = [f.to_json() for f in decision.findings if f.result in ("deny", "warn")]
                decision.raise_if_denied()
        report.status = "ok"
    except SecureRunError as err:
        if not isinstance(err, Refusal) and err.exit_code != 1:
            raise
        report.status = "refused"
        report.error = err.to_json()
    return report


@click.command("ci-check")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Lock file (default: the shipped manifests/trusted/models.lock.json).")
@click.option("--allow-unlocated", is_flag=True, help="Do not fail on lock entries without a recorded path.")
@json_option
def ci_check_cmd(lock_path: str | None, allow_unlocated: bool, as_json: bool) -> None:
    """Verify every model in the lock (offline) and evaluate its policy."""
    from secure_run.manifests import Lock, default_lock_path

    lock = Lock.load(lock_path or default_lock_path())
    if not lock.entries:
        raise UsageError(f"{lock.source} has no models", hint="pin a model with pin_model() or sign + verify first")
    reports = [check_entry(lock, lock.entries[name]) for name in sorted(lock.entries)]
    failed = [r for r in reports if r.status == "refused" or (r.status == "not_checked" and not allow_unlocated)]
    if as_json:
        emit_json({"ok": not failed, "command": "ci-check", "lock": lock.source,
                   "models": [r.to_json() for r in reports]})
    else:
        for r in reports:
            mark = {"ok": "ok", "refused": "REFUSED", "not_checked": "NOT CHECKED"}[r.status]
            click.echo(f"{mark:<12} {r.name}  {r.root_digest or ''}")
            if r.policy:
                click.echo(f"             policy {r.policy}: {'allowed' if r.policy_allowed else 'denied'}"
                           if r.policy_allowed is not None else f"             policy {r.policy}: not evaluated")
            if r.error:
                for line in SecureRunErrorText(r.error).lines():
                    click.echo(f"             {line}")
            elif r.status == "not_checked":
                click.echo("             no path recorded in the lock entry; nothing to verify here")
        click.echo(f"{len(reports) - len(failed)}/{len(reports)} locked models pass")
    if failed:
        click.get_current_context().exit(1)


@dataclass(frozen=True)
class SecureRunErrorText:
    """Readable lines of an error's JSON form (for the text report)."""

    doc: dict[str, Any]

    def lines(self) -> list[str]:
        out = [f"{self.doc.get('rule') or self.doc.get('kind')}: {self.doc.get('message')}"]
        out.extend(f"- {d}" for d in self.doc.get("details") or [])
        if self.doc.get("hint"):
            out.append(f"fix: {self.doc['hint']}")
        return out


def register(group: click.Group) -> None:
    """Add ``ci-check`` to the CLI."""
    group.add_command(ci_check_cmd)
