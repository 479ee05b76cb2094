"""``secure-run audit ...`` and ``secure-run attest``: check, read and attest the audit log.

    $ secure-run audit keygen                              # the host audit key (signs heads, attestations)
    $ secure-run audit verify [--log FILE] [--public-key PUB] [--attestation FILE] [--json]
    $ secure-run audit show [--log FILE] [--since 7d] [--model NAME] [--decision refused] [--json]
    $ secure-run audit checkpoint [--log FILE] [--key KEY]  # sign the head now
    $ secure-run audit code                                # version + digest of the installed code
    $ secure-run attest [--log FILE] [--seq N] [--key KEY] --out run.intoto.json

Exit codes: 0 the log (and attestation) verify, 1 tampering found (first broken link with its
file and line), 2 usage or environment error.
"""

from __future__ import annotations

from pathlib import Path

import click

from secure_run.runner.options import json_option
from secure_run.runner.output import emit_json

_log_option = click.option("--log", "log", type=click.Path(dir_okay=False), metavar="FILE",
                           help="Audit log (default: $XDG_STATE_HOME/secure-run/audit.jsonl).")


def _log_path(log: str | None) -> Path:
    from secure_run.policies._state import resolve_state_path

    return Path(log) if log else resolve_state_path(None, "audit.jsonl")


def _default_public_key() -> Path | None:
    from secure_run.manifests.signing import public_path_for
    from secure_run.policies.audit import default_audit_key

    pub = public_path_for(default_audit_key())
    return pub if pub.is_file() else None


def _key_path(key: str | None) -> Path:
    from secure_run.errors import UsageError
    from secure_run.policies.audit import default_audit_key

    path = Path(key) if key else default_audit_key()
    if not path.is_file():
        raise UsageError(f"no audit key at {path}", path=str(path), hint="run `secure-run audit keygen` or pass --key")
    return path


def _safe(text: object) -> str:
    from secure_run.sandbox.protocol import terminal_safe

    return terminal_safe(str(text)).replace("\n", " ").replace("\t", " ")


@click.group("audit")
def audit_group() -> None:
    """Verify, read and sign the hash-chained audit log."""


@audit_group.command("keygen")
@click.option("--out", "out", type=click.Path(dir_okay=False), metavar="KEY.pem",
              help="Private key path (default: $XDG_STATE_HOME/secure-run/audit-key.pem).")
@json_option
def keygen_cmd(out: str | None, as_json: bool) -> None:
    """Create the host audit key (EC P-256): it signs log heads and run attestations."""
    from secure_run.manifests import generate_key
    from secure_run.policies.audit import default_audit_key

    path = Path(out) if out else default_audit_key()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = generate_key(path)
    if as_json:
        emit_json({"ok": True, "private": str(keys.private), "public": str(keys.public), "key_sha256": keys.fingerprint})
        return
    click.echo(f"audit key {keys.private} (public: {keys.public}, sha256 {keys.fingerprint})")


@audit_group.command("verify")
@_log_option
@click.option("--public-key", "public_key", type=click.Path(dir_okay=False), metavar="PUB.pem",
              help="Audit public key (default: audit-key.pub.pem in the state folder, if present).")
@click.option("--attestation", "attestation", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also check one run attestation against the log.")
@json_option
def verify_cmd(log: str | None, public_key: str | None, attestation: str | None, as_json: bool) -> None:
    """Check the whole chain, its signed checkpoints and head; exit 1 at the first broken link."""
    from secure_run.errors import UsageError
    from secure_run.policies.attest import attestation_summary, verify_attestation
    from secure_run.policies.audit import verify_log

    path = _log_path(log)
    pub = Path(public_key) if public_key else _default_public_key()
    summary = None
    if attestation is not None:
        if pub is None:
            raise UsageError("--attestation needs the audit public key", hint="pass --public-key audit-key.pub.pem")
        doc, report = verify_attestation(Path(attestation), path, pub)
        summary = attestation_summary(doc)
    else:
        report = verify_log(path, pub)
    if as_json:
        emit_json({**report.to_json(), "command": "audit verify", "public_key": str(pub) if pub else None,
                   "attestation": summary})
        return
    head = report.head
    click.echo(f"audit log OK: {report.records} chained record(s) in {len(report.files)} file(s)"
               + (f", head seq {head.seq} sha256 {head.sha256}" if head else ""))
    if report.legacy:
        click.echo(f"  note: {report.legacy} unchained record(s) written before the chain began (schema 1)")
    if pub is None:
        click.echo(f"  note: {report.unverified_checkpoints} checkpoint(s) and the signed head NOT checked "
                   "(no --public-key): an edit of the newest records or a truncation would go unnoticed")
    else:
        signed = report.signed_head
        click.echo(f"  {report.checkpoints} signed checkpoint(s) verified"
                   + (f"; signed head seq {signed.seq} present" if signed else "; no signed head file"))
    if report.torn is not None:
        click.echo(f"  note: torn last line of {report.torn.length} byte(s) ignored (an interrupted append)")
    if summary is not None:
        click.echo(f"attestation OK: output sha256 {summary['output_sha256']} = audit record seq "
                   f"{summary['audit']['seq']}")


@audit_group.command("show")
@_log_option
@click.option("--since", "since", metavar="WHEN", help="ISO date/time, or a duration back from now: 30m, 12h, 7d.")
@click.option("--model", "model", metavar="TEXT", help="Folder name or root digest contains TEXT.")
@click.option("--decision", "decision", type=click.Choice(["allowed", "refused"]), help="Only this decision.")
@click.option("--all", "show_all", is_flag=True, help="Include checkpoint records.")
@json_option
def show_cmd(log: str | None, since: str | None, model: str | None, decision: str | None, show_all: bool,
             as_json: bool) -> None:
    """A table of the records: time, operator, model, decision, tokens, blocked."""
    from secure_run.policies.audit import AuditLog, parse_since, select_rows

    path = _log_path(log)
    rows = select_rows(AuditLog(path).records(), since=parse_since(since) if since else None, model=model,
                       decision=decision, include_checkpoints=show_all)
    if as_json:
        emit_json({"ok": True, "command": "audit show", "log": str(path), "rows": [r.to_json() for r in rows]})
        return
    header = ("seq", "time", "operator", "model", "event", "decision", "tokens", "blocked")
    table = [header] + [
        tuple(_safe("-" if v is None else v) for v in (r.seq, r.time, r.operator, r.model, r.event, r.decision,
                                                        r.tokens, r.blocked))
        for r in rows
    ]
    widths = [min(40, max(len(row[i]) for row in table)) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell[:40].ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    click.echo(f"{len(rows)} record(s)")


@audit_group.command("checkpoint")
@_log_option
@click.option("--key", "key", type=click.Path(dir_okay=False), metavar="KEY.pem", help="Audit key (default: the host key).")
@json_option
def checkpoint_cmd(log: str | None, key: str | None, as_json: bool) -> None:
    """Sign the current head of the log now (also written to <log>.head.json)."""
    from secure_run.policies.audit import AuditLog

    head = AuditLog(_log_path(log), key=_key_path(key)).checkpoint()
    if as_json:
        emit_json({"ok": True, "command": "audit checkpoint", "head": head.to_json()})
        return
    click.echo(f"signed head seq {head.seq} sha256 {head.sha256}")


@audit_group.command("code")
@json_option
def code_cmd(as_json: bool) -> None:
    """The secure-run version and the sha256 of its installed model, kernels and worker code."""
    from secure_run.policies.audit import code_identity

    ident = code_identity()
    if as_json:
        emit_json({"ok": True, "command": "audit code", **ident})
        return
    click.echo(f"secure-run {ident['version']} code {ident['digest']}")
    packages = ident["packages"]
    assert isinstance(packages, dict)
    for name, digest in sorted(packages.items()):
        click.echo(f"  {name:<8} sha256:{digest}")


@click.command("attest")
@_log_option
@click.option("--seq", "seq", type=int, metavar="N", help="The run's audit record (default: the latest finished run).")
@click.option("--key", "key", type=click.Path(dir_okay=False), metavar="KEY.pem", help="Audit key (default: the host key).")
@click.option("--out", "out", type=click.Path(dir_okay=False), metavar="FILE", required=True,
              help="Where to write the signed attestation (DSSE bundle).")
@json_option
def attest_cmd(log: str | None, seq: int | None, key: str | None, out: str, as_json: bool) -> None:
    """Write a signed in-toto attestation of one run (subject: its output digest)."""
    from secure_run.policies.attest import attest_run

    doc = attest_run(_log_path(log), _key_path(key), Path(out), seq=seq)
    audit = doc["predicate"]["audit"]
    if as_json:
        emit_json({"ok": True, "command": "attest", "out": out, "statement": doc})
        return
    click.echo(f"attested run seq {audit['seq']} (output sha256 {doc['subject'][0]['digest']['sha256']}) -> {out}")


def register(group: click.Group) -> None:
    """Add the ``audit`` group and the ``attest`` command to the CLI."""
    group.add_command(audit_group)
    group.add_command(attest_cmd)
