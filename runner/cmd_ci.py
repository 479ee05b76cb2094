"""``secure-run ci-check``: verify every locked model offline and evaluate its policy.

    $ secure-run ci-check [--lock FILE] [--json | --format text|json|github|junit]
                          [--junit-xml FILE] [--json-out FILE] [--summary FILE]

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
from secure_run.runner.output import SCHEMA_VERSION, emit_json
from secure_run.runner.progress import hashing_progress

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
                      on_refusal=record_digest,
                      progress=hashing_progress(False, f"verifying {entry.name}")) as gate:
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
@click.option("--format", "fmt", type=click.Choice(["text", "json", "github", "junit"]), default=None,
              help="Report on stdout: text (default), json (= --json), github (::error annotations on the "
                   "offending files + job summary), junit (JUnit XML).")
@click.option("--junit-xml", "junit_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the JUnit XML report to FILE.")
@click.option("--json-out", "json_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the JSON report to FILE.")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Append the markdown summary table to FILE (default with --format github: $GITHUB_STEP_SUMMARY).")
@json_option
def ci_check_cmd(lock_path: str | None, allow_unlocated: bool, fmt: str | None, junit_path: str | None,
                 json_path: str | None, summary_path: str | None, as_json: bool) -> None:
    """Verify every model in the lock (offline) and evaluate its policy."""
    import json
    import os
    from pathlib import Path

    from secure_run.manifests import Lock, default_lock_path
    from secure_run.runner.ci_report import github_annotations, junit_xml, summary_markdown

    if as_json and fmt not in (None, "json"):
        raise UsageError(f"--json and --format {fmt} exclude each other", rule="CLI-USAGE",
                         hint="use --format json (or --json) alone; write other reports with --junit-xml/--summary")
    fmt = "json" if as_json else (fmt or "text")
    if fmt == "json":
        click.get_current_context().meta["secure_run.json"] = True
    lock = Lock.load(lock_path or default_lock_path())
    if not lock.entries:
        raise UsageError(f"{lock.source} has no models", rule="CI-EMPTY",
                         hint="pin a reviewed model with `secure-run lock add DIR --lock FILE --public-key PUB.pem`")
    reports = [check_entry(lock, lock.entries[name]) for name in sorted(lock.entries)]
    failed = [r for r in reports if r.status == "refused" or (r.status == "not_checked" and not allow_unlocated)]
    doc: dict[str, Any] = {"ok": not failed, "command": "ci-check", "lock": lock.source,
                           "models": [r.to_json() for r in reports]}
    if failed:
        names = ", ".join(r.name for r in failed)
        doc["error"] = Refusal(f"{len(failed)} of {len(reports)} locked models failed: {names}", rule="CI-FAILED",
                               path=lock.source, details=[f"{r.name}: {r.status}" for r in failed],
                               hint="see each model's error; fix the folder or update the lock after review"
                               ).to_json()
    if json_path:
        Path(json_path).write_text(json.dumps({"schema_version": SCHEMA_VERSION, **doc}, indent=2) + "\n",
                                   encoding="utf-8")
    if junit_path:
        Path(junit_path).write_text(junit_xml(doc), encoding="utf-8")
    summary_target = summary_path or (os.environ.get("GITHUB_STEP_SUMMARY") if fmt == "github" else None)
    if summary_target:
        with open(summary_target, "a", encoding="utf-8") as fh:
            fh.write(summary_markdown(doc))
    if fmt == "json":
        emit_json(doc)
    elif fmt == "junit":
        click.echo(junit_xml(doc), nl=False)
    elif fmt == "github":
        for line in github_annotations(doc, root=os.environ.get("GITHUB_WORKSPACE", ".")):
            click.echo(line)
        _text_report(reports, failed)
    else:
        _text_report(reports, failed)
    if failed:
        click.get_current_context().exit(1)


def _text_report(reports: list[EntryReport], failed: list[EntryReport]) -> None:
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
