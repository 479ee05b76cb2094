"""Run attestations (issue 14.3): one signed in-toto Statement per run, tied to the audit chain.

The statement's subject is the released output's sha256; its predicate restates what the run's
audit record says (model root digest, signer, policy, code digest, sandbox image, GPU, parameters,
timestamps) and where that record sits in the chain (``seq`` and the sha256 of its exact line). It
is signed with the host audit key as a DSSE envelope, by the same code as model signatures
(:mod:`secure_run.manifests.provenance`). :func:`verify_attestation` checks the signature, the
whole chain, and that the attested record is in the log, byte for byte, with the same claims.

    $ secure-run attest --out run.intoto.json             # the latest run in the audit log
    $ secure-run audit verify --attestation run.intoto.json --public-key audit-key.pub.pem
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_run.errors import UsageError

from .audit import AuditTampered, ChainReport, verify_log

#: audit events that end a run and can be attested
RUN_EVENTS = ("run", "finished")


def _find_record(report: ChainReport, seq: int | None) -> int:
    if seq is not None:
        if seq not in report.records_by_seq:
            raise UsageError(f"the audit log has no record with seq {seq}", hint="see `secure-run audit show`")
        return seq
    for candidate in sorted(report.records_by_seq, reverse=True):
        rec = report.records_by_seq[candidate]
        if rec.get("event") in RUN_EVENTS and rec.get("output_sha256"):
            return candidate
    raise UsageError("the audit log holds no finished run with an output digest to attest",
                     hint="run `secure-run generate` first, or pass --seq N")


def _started_ts(report: ChainReport, record: Mapping[str, object]) -> object:
    run_id = record.get("run_id")
    if not run_id:
        return None
    for rec in report.records_by_seq.values():
        if rec.get("run_id") == run_id and rec.get("event") == "started":
            return rec.get("ts")
    return None


def run_predicate(report: ChainReport, seq: int) -> dict[str, Any]:
    """The attestation predicate for the record at ``seq``, as the log states it."""
    record = report.records_by_seq[seq]
    file, _lineno, digest = report.positions[seq]
    return {
        "model": {"root_digest": record.get("model_root_digest"), "dir": record.get("model_dir")},
        "signer": record.get("signer"),
        "policy": {"name": record.get("policy_name"), "sha256": record.get("policy_sha256")},
        "code": record.get("code"),
        "sandbox": record.get("sandbox"),
        "gpu": record.get("gpu"),
        "parameters": record.get("parameters"),
        "operator": record.get("operator"),
        "prompt_sha256": record.get("prompt_sha256"),
        "timestamps": {"started": _started_ts(report, record), "finished": record.get("ts")},
        "audit": {"log": file.name, "seq": seq, "record_sha256": digest, "prev": record.get("prev")},
    }


def build_attestation(log_path: Path, *, seq: int | None = None) -> dict[str, Any]:
    """The (unsigned) in-toto statement for one run of the log (default: the latest finished run).

    Raises:
        AuditTampered: the log does not verify (nothing is attested from a broken chain).
        UsageError: no such record, or it has no output digest.
    """
    from secure_run.manifests.provenance import RUN_TYPE, statement

    report = verify_log(log_path)
    chosen = _find_record(report, seq)
    output = report.records_by_seq[chosen].get("output_sha256")
    if not isinstance(output, str):
        raise UsageError(f"audit record seq {chosen} has no output digest: only finished runs can be attested",
                         hint="pick a run record with --seq (see `secure-run audit show`)")
    return statement([("output", output)], RUN_TYPE, run_predicate(report, chosen))


def attest_run(log_path: Path, key: Path, out: Path, *, seq: int | None = None) -> dict[str, Any]:
    """Build, sign (host audit key) and write the attestation of one run; returns the statement.

    Raises:
        AuditTampered, UsageError: see :func:`build_attestation`; UsageError also for an existing ``out``.
    """
    from secure_run.manifests.provenance import sign_statement

    doc = build_attestation(log_path, seq=seq)
    bundle = sign_statement(doc, key)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise UsageError(f"{out} already exists; refusing to overwrite it", path=str(out)) from None
    except OSError as err:
        raise UsageError(f"cannot write {out}: {err.strerror}", path=str(out)) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(bundle)
    return doc


def verify_attestation(attestation: Path, log_path: Path, public_key: Path) -> tuple[dict[str, Any], ChainReport]:
    """Check one attestation against the audit log.

    Checklist: 1. the DSSE signature verifies with the audit key and the payload is a run
    statement -> 2. the whole log verifies (chain, checkpoints, signed head) -> 3. the attested
    ``seq`` is in the log -> 4. that record's line has the attested sha256 -> 5. the subject and every
    predicate field equal what the record says.

    Raises:
        AuditTampered: ``ATTEST-SIGNATURE``, ``ATTEST-RECORD``, ``ATTEST-MISMATCH`` or a chain rule.
        UsageError: unreadable attestation or key.
    """
    from secure_run.manifests.findings import VerificationFailed
    from secure_run.manifests.provenance import RUN_TYPE, verify_statement

    try:
        data = attestation.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {attestation}: {err.strerror}", path=str(attestation)) from None
    try:  # 1.
        doc = verify_statement(data, public_key, str(attestation), RUN_TYPE)
    except VerificationFailed as err:
        raise AuditTampered(attestation, None, "ATTEST-SIGNATURE", f"the attestation does not verify: {err.message}") from None
    report = verify_log(log_path, public_key)  # 2.
    audit = doc["predicate"].get("audit")
    seq = audit.get("seq") if isinstance(audit, dict) else None
    if not isinstance(seq, int) or seq not in report.records_by_seq:  # 3.
        end = report.head.seq if report.head else -1
        raise AuditTampered(
            attestation, None, "ATTEST-RECORD",
            f"the attested run is audit record seq {seq}, but the log ends at seq {end}: the log was truncated "
            "or this is another log",
        )
    file, lineno, digest = report.positions[seq]
    if audit.get("record_sha256") != digest:  # 4.
        raise AuditTampered(
            file, lineno, "ATTEST-RECORD",
            f"the attestation names record seq {seq} with sha256 {str(audit.get('record_sha256'))[:16]}..., "
            f"the log's line has {digest[:16]}...: the record or the attestation was changed",
        )
    expected = run_predicate(report, seq)  # 5.
    diffs = sorted(k for k in expected.keys() | doc["predicate"].keys() if expected.get(k) != doc["predicate"].get(k))
    subject = doc["subject"][0]["digest"]["sha256"]
    if subject != report.records_by_seq[seq].get("output_sha256"):
        diffs.insert(0, "subject (output sha256)")
    if diffs:
        raise AuditTampered(
            attestation, None, "ATTEST-MISMATCH",
            f"the attestation's {', '.join(diffs)} differ from audit record seq {seq} ({file.name}:{lineno})",
        )
    return doc, report


def attestation_summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A short view of a verified attestation (for ``audit verify --attestation``)."""
    pred = doc["predicate"]
    return {"output_sha256": doc["subject"][0]["digest"]["sha256"], "audit": pred.get("audit"),
            "model": pred.get("model"), "code": (pred.get("code") or {}).get("digest"),
            "signer": pred.get("signer")}


__all__ = ["attest_run", "attestation_summary", "build_attestation", "run_predicate", "verify_attestation"]
