"""The audit log (check G7): one hash-chained JSON line per decision / run, appended safely.

Each record holds: timestamp, host, event, decision (allowed, mode, findings), policy hash, model root
digest, licence fingerprint, operator, declared use, run statistics (host-measured apart from
worker-reported), guardrail events and, when the caller knows them, the verified signer, the code
that ran (version + digest), the sandbox (backend, image digest), the GPU and the sha256 of the
rendered prompt and the released output.

**Chain.** Every record carries ``seq`` (0, 1, 2, ... across rotations) and ``prev``: the hex sha256
of the previous record's exact line bytes, ``\\n`` included (:data:`GENESIS` for the first). With
a host audit key (EC P-256 PEM, ``secure-run audit keygen``) the head is signed every
``checkpoint_every`` records: a ``checkpoint`` record in the chain holds a DSSE-signed in-toto
statement of (seq, sha256) of the head, and the same bundle is written to ``<log>.head.json`` so
that truncating the log before the last signed head is detected. Past ``max_bytes`` the file is
renamed ``<log>.<seq of its last record, 12 digits>`` and the chain continues in a new file whose
first record's ``prev`` is the hash of the old file's last record.

**Appends** are all-or-nothing (one write of one full line under ``flock`` + ``fsync``, rolled back
on failure: :mod:`secure_run.policies._state`); the file is private (0600) and never written
through a symlink. Default location: ``$XDG_STATE_HOME/secure-run/audit.jsonl``.

    >>> import tempfile, pathlib
    >>> log = AuditLog(pathlib.Path(tempfile.mkdtemp()) / "audit.jsonl")
    >>> log.append({"event": "example"}).seq
    0
    >>> log.read()[0]["event"], verify_log(log.path).records
    ('example', 1)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from secure_run.errors import EnvironmentProblem, Refusal, UsageError

from ._state import (
    Appender,
    Tail,
    TornTail,
    _read_tail,
    check_writable,
    dump_line,
    locked_append,
    parse_line,
    read_lines,
    state_dir,
)
from .errors import StateFileError
from .findings import Decision
from .guardrails import GuardrailEvent

AUDIT_SCHEMA = 2
#: ``prev`` of the very first record of a log
GENESIS = "0" * 64
#: rotate the current file once an append would take it past this size
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: the smallest rotation size accepted (tests rotate every few records)
MIN_ROTATE_BYTES = 1024
#: with a host audit key, sign the head after every this many records
DEFAULT_CHECKPOINT_EVERY = 64
#: the host audit key's default file (``secure-run audit keygen``)
AUDIT_KEY_NAME = "audit-key.pem"
_CHAIN_FIELDS = ("seq", "prev")
_ROTATED = re.compile(r"\.\d{12}")


def line_sha256(line: bytes) -> str:
    """The chain hash of one stored line (its exact bytes, ``\\n`` included)."""
    return hashlib.sha256(line).hexdigest()


def default_audit_key() -> Path:
    """``$XDG_STATE_HOME/secure-run/audit-key.pem`` (its public half: ``audit-key.pub.pem``)."""
    return state_dir() / AUDIT_KEY_NAME


class AuditTampered(Refusal):
    """``audit verify`` found the log, a signed head or an attestation not as written (exit 1)."""

    kind = "audit"

    def __init__(self, file: Path, line: int | None, rule: str, message: str, *, hint: str | None = None) -> None:
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {message} [{rule}]", path=str(file), rule=rule, hint=hint)
        self.file = file
        self.line = line

    def to_json(self) -> dict[str, object]:
        """The error's JSON form plus the line number."""
        return {**super().to_json(), "line": self.line}


@dataclass(frozen=True)
class ChainPosition:
    """Where a record sits in the chain: its file, ``seq`` and the sha256 of its line."""

    file: str
    seq: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        """Plain-data form (attestations, ``--json``)."""
        return {"file": self.file, "seq": self.seq, "sha256": self.sha256}


def _chain_of(line: bytes | None) -> tuple[int, str]:
    """(next seq, prev) after ``line``; a record without a chain (schema 1) restarts seq at 0."""
    if line is None:
        return 0, GENESIS
    from secure_run.manifests._jsoncheck import JsonProblem, loads_strict  # the one strict JSON loader

    try:
        doc = loads_strict(line)
    except JsonProblem:
        doc = None
    seq = doc.get("seq") if isinstance(doc, dict) else None
    if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
        return seq + 1, line_sha256(line)
    return 0, line_sha256(line)


class AuditLog:
    """An append-only, hash-chained JSON-lines audit file.

    Args:
        path: the current log file.
        key: host audit key (EC PEM private key) that signs the head; None: no signed heads.
        checkpoint_every: sign the head after every N records (with ``key``).
        max_bytes: rotate past this size.
    """

    def __init__(
        self,
        path: Path,
        *,
        key: Path | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if checkpoint_every < 1 or max_bytes < MIN_ROTATE_BYTES:
            raise UsageError(f"checkpoint_every must be >= 1 and max_bytes >= {MIN_ROTATE_BYTES}")
        self.path = path
        self.key = key
        self.checkpoint_every = checkpoint_every
        self.max_bytes = max_bytes

    @classmethod
    def for_host(cls, path: Path) -> AuditLog:
        """The log at ``path``, signed with the host audit key when :func:`default_audit_key` exists."""
        key = default_audit_key()
        return cls(path, key=key if key.is_file() else None)

    @property
    def head_path(self) -> Path:
        """``<log>.head.json``: the latest signed head (a DSSE bundle)."""
        return self.path.with_name(self.path.name + ".head.json")

    def files(self) -> list[Path]:
        """Rotated files oldest first, then the current file (if it exists).

        A rotated name that is a second link to the current file or to a later rotated file (left
        by a crash in the middle of a rotation) is skipped: each file is read once.
        """
        rotated = sorted(
            (p for p in self.path.parent.glob(self.path.name + ".*") if _ROTATED.fullmatch(p.name[len(self.path.name):])),
            key=lambda p: p.name,
        )
        current = [self.path] if os.path.lexists(self.path) else []
        seen: set[tuple[int, int]] = set()
        out: list[Path] = []
        for p in reversed([*rotated, *current]):
            st = os.lstat(p)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                out.append(p)
        return out[::-1]

    def check_writable(self) -> None:
        """Check up front that a record can be appended (before any sandbox starts).

        Raises:
            StateFileError: naming the path and why (symlink, mode, owner, permissions, no space).
        """
        check_writable(self.path)
        if self.key is not None and not os.access(self.key, os.R_OK):
            raise StateFileError(
                f"the audit key {self.key} cannot be read", path=str(self.key), rule="state.key",
                hint="fix its permissions or run `secure-run audit keygen`",
            )

    def _previous_tail(self, tail: Tail) -> bytes | None:
        if tail.last_line is not None:
            return tail.last_line
        rotated = [p for p in self.files() if p != self.path]
        if not rotated:
            return None
        fd = os.open(rotated[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return _read_tail(fd, os.fstat(fd).st_size).last_line
        finally:
            os.close(fd)

    def append(self, record: Mapping[str, object]) -> ChainPosition:
        """Append one record to the chain (and a signed checkpoint when one is due).

        Raises:
            StateFileError: symlink, foreign owner, group/other permissions, or a failed write (the
                file is then unchanged).
            UsageError: the record sets the chain fields itself.
        """
        clash = [k for k in (*_CHAIN_FIELDS, "torn_tail_cut") if k in record]
        if clash:
            raise UsageError(f"audit record fields {clash} are set by the log, not by the caller")
        with locked_append(self.path) as out:
            pos = self._append_locked(out, dict(record))
            if self.key is not None and (pos.seq + 1) % self.checkpoint_every == 0:
                self._checkpoint_locked(out, pos)
        return pos

    def checkpoint(self) -> ChainPosition:
        """Sign the current head now (needs ``key``); returns the head that was signed.

        Raises:
            UsageError: no key, or the log is empty.
        """
        if self.key is None:
            raise UsageError("signing the head needs the host audit key", hint="pass --key or run `secure-run audit keygen`")
        with locked_append(self.path) as out:
            last = self._previous_tail(out.tail)
            if last is None:
                raise UsageError(f"{self.path} is empty: nothing to sign", path=str(self.path))
            seq, prev = _chain_of(last)
            head = ChainPosition(out.path.name, seq - 1, prev)
            self._checkpoint_locked(out, head)
        return head

    def _append_locked(self, out: Appender, record: dict[str, object]) -> ChainPosition:
        seq, prev = _chain_of(self._previous_tail(out.tail))
        record["seq"], record["prev"] = seq, prev
        if out.tail.torn is not None:
            record["torn_tail_cut"] = out.tail.torn.to_json()
        line = dump_line(record)
        if out.tail.size > 0 and out.tail.size + len(line) > self.max_bytes:
            out.rotate(self.path.with_name(f"{self.path.name}.{seq - 1:012d}"))
        out.write(line)
        return ChainPosition(self.path.name, seq, line_sha256(line))

    def _checkpoint_locked(self, out: Appender, head: ChainPosition) -> None:
        from secure_run.manifests.provenance import CHECKPOINT_TYPE, sign_statement, statement

        assert self.key is not None
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        doc = statement([(f"{self.path.name}#{head.seq}", head.sha256)], CHECKPOINT_TYPE,
                        {"log": self.path.name, "seq": head.seq, "sha256": head.sha256, "signed_at": now})
        bundle = sign_statement(doc, self.key)
        self._append_locked(out, {"schema": AUDIT_SCHEMA, "ts": now, "event": "checkpoint",
                                  "head": {"seq": head.seq, "sha256": head.sha256}, "bundle": json.loads(bundle)})
        _write_private_atomic(self.head_path, bundle)

    def read(self) -> list[dict[str, object]]:
        """Every complete record of the current file, oldest first (a torn last line is skipped)."""
        return [parse_line(self.path, i, raw) for i, raw in enumerate(read_lines(self.path).lines, start=1)]

    def records(self) -> list[dict[str, object]]:
        """Every complete record of every file (rotated ones first), oldest first (read-only: a
        copy of someone else's log may be read)."""
        out: list[dict[str, object]] = []
        for path in self.files():
            out.extend(parse_line(path, i, raw) for i, raw in enumerate(read_lines(path, private=False).lines, start=1))
        return out


def _write_private_atomic(path: Path, data: bytes) -> None:
    """The signed head, private (0600), through the one atomic writer of secure-run."""
    from secure_run.manifests._atomic import write_atomic

    try:
        write_atomic(path, data, mode=0o600, action="write the signed head")
    except EnvironmentProblem as err:
        raise StateFileError(err.message, path=str(path), rule="state.write", hint=err.hint) from None


# --- verification ------------------------------------------------------------------------------


@dataclass
class ChainReport:
    """What ``audit verify`` checked.

    Attributes:
        files: the files read, oldest first.
        records: chained records checked.
        legacy: unchained (schema 1) records before the chain began.
        head: the last record's position (None for an empty log).
        checkpoints: signed checkpoints verified with the public key.
        unverified_checkpoints: checkpoints seen without a public key to check them.
        signed_head: the head from ``<log>.head.json`` that the log was checked against.
        torn: a torn last line (ignored, not part of the chain).
        positions: seq -> (file, line number, line sha256), for attestation checks.
    """

    files: list[str] = field(default_factory=list)
    records: int = 0
    legacy: int = 0
    head: ChainPosition | None = None
    checkpoints: int = 0
    unverified_checkpoints: int = 0
    signed_head: ChainPosition | None = None
    torn: TornTail | None = None
    positions: dict[int, tuple[Path, int, str]] = field(default_factory=dict)
    records_by_seq: dict[int, dict[str, object]] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """Plain-data form for ``--json``."""
        return {
            "ok": True,
            "files": self.files,
            "records": self.records,
            "legacy_records": self.legacy,
            "head": self.head.to_json() if self.head else None,
            "checkpoints_verified": self.checkpoints,
            "checkpoints_unverified": self.unverified_checkpoints,
            "signed_head": self.signed_head.to_json() if self.signed_head else None,
            "torn_tail": self.torn.to_json() if self.torn else None,
        }


def _check_checkpoint(path: Path, lineno: int, doc: Mapping[str, object], seq: int, prev: str, public_key: Path) -> None:
    from secure_run.manifests.findings import VerificationFailed
    from secure_run.manifests.provenance import CHECKPOINT_TYPE, verify_statement

    head, bundle = doc.get("head"), doc.get("bundle")
    if not isinstance(head, dict) or not isinstance(bundle, dict):
        raise AuditTampered(path, lineno, "AUDIT-CHECKPOINT", "checkpoint record without head and bundle")
    try:
        st = verify_statement(json.dumps(bundle).encode(), public_key, f"{path}:{lineno}", CHECKPOINT_TYPE)
    except VerificationFailed as err:
        raise AuditTampered(path, lineno, "AUDIT-CHECKPOINT", f"the signed head does not verify: {err.message}") from None
    pred = st["predicate"]
    signed = (pred.get("seq"), pred.get("sha256"))
    if signed != (seq - 1, prev) or (head.get("seq"), head.get("sha256")) != signed:
        raise AuditTampered(
            path, lineno, "AUDIT-CHECKPOINT",
            f"the signed head is seq {signed[0]} sha256 {str(signed[1])[:16]}..., but the chain before this line "
            f"ends at seq {seq - 1} sha256 {prev[:16]}...: records before it were rewritten",
        )


def verify_log(path: Path, public_key: Path | None = None) -> ChainReport:
    """Check the whole chain (rotated files too), its signed checkpoints and the signed head file.

    Checklist per line: 1. a JSON object -> 2. chain fields present -> 3. ``seq`` is the next one
    (else a record was deleted, inserted or reordered) -> 4. ``prev`` is the sha256 of the previous
    line (else that line was edited) -> 5. a checkpoint's signature and head match the chain. Then
    6. the log reaches the head in ``<log>.head.json`` with the same hash (else it was truncated).
    Signatures are checked only with ``public_key``.

    Raises:
        AuditTampered: the first broken link, with its file and line number (exit 1).
        UsageError: no log at ``path``.
    """
    log = AuditLog(path)
    files = log.files()
    if not files:
        raise UsageError(f"no audit log at {path}", path=str(path), hint="pass --log FILE")
    report = ChainReport(files=[str(p) for p in files])
    expected_seq, expected_prev = 0, GENESIS
    chained = False
    previous_line: bytes | None = None
    for index, file in enumerate(files):
        read = read_lines(file, private=False)
        if read.torn is not None:
            if file != files[-1]:
                raise AuditTampered(file, len(read.lines) + 1, "AUDIT-TORN", "a rotated file ends in a torn line")
            report.torn = read.torn
        for lineno, raw in enumerate(read.lines, start=1):
            try:  # 1.
                doc = parse_line(file, lineno, raw)
            except StateFileError:
                raise AuditTampered(file, lineno, "AUDIT-FORMAT", "not a JSON object") from None
            seq, prev = doc.get("seq"), doc.get("prev")
            if not chained and index == 0 and "seq" not in doc and "prev" not in doc:
                report.legacy += 1  # schema 1, written before the chain existed
                previous_line = raw
                continue
            if not chained:
                chained = True
                expected_prev = line_sha256(previous_line) if previous_line is not None else GENESIS
                if isinstance(seq, int) and seq > 0 and index == 0 and report.legacy == 0:
                    raise AuditTampered(
                        file, lineno, "AUDIT-START",
                        f"the chain starts at seq {seq}, not 0: records 0..{seq - 1} are missing "
                        "(deleted, or rotated files removed)",
                        hint="keep rotated files (<log>.NNNNNNNNNNNN) next to the log",
                    )
            if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str):  # 2.
                raise AuditTampered(file, lineno, "AUDIT-UNCHAINED", "record without seq/prev chain fields")
            if seq != expected_seq:  # 3.
                what = (f"record(s) {expected_seq}..{seq - 1} are missing here (deleted or moved)" if seq > expected_seq
                        else "this record belongs earlier (reordered, duplicated or inserted)")
                raise AuditTampered(file, lineno, "AUDIT-SEQ", f"seq {seq}, expected {expected_seq}: {what}")
            if prev != expected_prev:  # 4.
                where = (f"line {lineno - 1}" if lineno > 1 else
                         (f"the last line of {files[index - 1].name}" if index else "the genesis value"))
                raise AuditTampered(
                    file, lineno, "AUDIT-LINK",
                    f"prev {prev[:16]}... is not the sha256 of {where} ({expected_prev[:16]}...): "
                    f"{where} was edited or replaced",
                )
            if doc.get("event") == "checkpoint":  # 5.
                if public_key is None:
                    report.unverified_checkpoints += 1
                else:
                    _check_checkpoint(file, lineno, doc, seq, prev, public_key)
                    report.checkpoints += 1
            digest = line_sha256(raw)
            report.positions[seq] = (file, lineno, digest)
            report.records_by_seq[seq] = doc
            report.records += 1
            report.head = ChainPosition(file.name, seq, digest)
            expected_seq, expected_prev = seq + 1, digest
            previous_line = raw
    _check_head_file(log, report, public_key)  # 6.
    return report


def _check_head_file(log: AuditLog, report: ChainReport, public_key: Path | None) -> None:
    from secure_run.manifests.findings import VerificationFailed
    from secure_run.manifests.provenance import CHECKPOINT_TYPE, verify_statement

    head_file = log.head_path
    if public_key is None or not head_file.is_file():
        return
    try:
        st = verify_statement(head_file.read_bytes(), public_key, str(head_file), CHECKPOINT_TYPE)
    except VerificationFailed as err:
        raise AuditTampered(head_file, None, "AUDIT-HEAD", f"the signed head does not verify: {err.message}") from None
    seq, digest = st["predicate"].get("seq"), st["predicate"].get("sha256")
    if not isinstance(seq, int) or not isinstance(digest, str):
        raise AuditTampered(head_file, None, "AUDIT-HEAD", "the signed head has no seq/sha256")
    report.signed_head = ChainPosition(str(st["predicate"].get("log")), seq, digest)
    last = report.head.seq if report.head else -1
    if seq > last:
        end = f"ends at seq {last}" if report.head else "is empty"
        file = Path(report.files[-1])
        raise AuditTampered(
            file, report.positions[last][1] if report.head else None, "AUDIT-TRUNCATED",
            f"the log {end}, but the last signed head ({head_file.name}) is seq {seq}: "
            f"{seq - last} record(s) were cut off",
        )
    file, lineno, actual = report.positions[seq]
    if actual != digest:
        raise AuditTampered(
            file, lineno, "AUDIT-HEAD",
            f"seq {seq} has sha256 {actual[:16]}..., the signed head ({head_file.name}) says {digest[:16]}...: "
            "the log was rewritten",
        )


# --- record contents ---------------------------------------------------------------------------


def content_sha256(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes (rendered prompt, released output)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


#: the installed packages whose code a run depends on: the vendored model, the kernels, the worker
CODE_PACKAGES = ("model", "kernels", "sandbox")


def _package_digest(root: Path) -> str:
    h = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    for p in files:
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


@functools.cache
def code_identity() -> dict[str, object]:
    """The secure-run version and a digest of its installed code.

    ``packages.<name>`` is the sha256 over the sorted ``relative path \\0 sha256(file) \\n`` lines
    of that package's files (``__pycache__`` left out); ``digest`` is the sha256 over the sorted
    ``name=digest`` lines of the packages.
    """
    import importlib.util

    from secure_run import __version__

    packages: dict[str, str] = {}
    for name in CODE_PACKAGES:
        spec = importlib.util.find_spec(f"secure_run.{name}")  # located, not imported (no torch)
        if spec is None or not spec.submodule_search_locations:
            raise StateFileError(f"the installed package secure_run.{name} cannot be found", rule="state.code")
        packages[name] = _package_digest(Path(list(spec.submodule_search_locations)[0]))
    total = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(packages.items())).encode()).hexdigest()
    return {"version": __version__, "digest": "sha256:" + total, "packages": packages}


def audit_record(
    decision: Decision,
    *,
    event: str = "decision",
    run_stats: Mapping[str, object] | None = None,
    guardrail_events: Iterable[GuardrailEvent] = (),
    now: datetime | None = None,
    signer: Mapping[str, object] | None = None,
    code: Mapping[str, object] | None = None,
    sandbox_backend: str | None = None,
    image_digest: str | None = None,
    gpu: Mapping[str, object] | None = None,
    prompt: str | None = None,
    output: str | None = None,
    store_text: bool = False,
    parameters: Mapping[str, object] | None = None,
    host_measured: Mapping[str, object] | None = None,
    worker_reported: Mapping[str, object] | None = None,
    run_id: str | None = None,
) -> dict[str, object]:
    """Build the audit record for a decision (and, after a run, its statistics and rail events).

    Args:
        decision: the policy decision.
        event: ``decision``, ``started``, ``finished``, ``run``, ``refused``, ``interrupted``...
        run_stats: legacy combined statistics (kept for existing callers).
        guardrail_events: input/output rail events.
        now: timestamp (tests).
        signer: the signer identity that verified (``SignerInfo.to_json()``).
        code: :func:`code_identity` (version + digest of the installed code).
        sandbox_backend: ``docker`` / ``namespace``.
        image_digest: Docker image content digest (``sha256:...``).
        gpu: ``{"name": ..., "driver": ...}`` when ``--gpu``.
        prompt: the rendered prompt; only its sha256 is recorded unless ``store_text``.
        output: the released output text; only its sha256 unless ``store_text``.
        store_text: the policy asks for the texts themselves to be kept.
        parameters: generation parameters (max_new_tokens, temperature, seed...).
        host_measured: figures the host measured itself (tokens counted, seconds).
        worker_reported: figures the sandboxed worker reported (untrusted; kept apart).
        run_id: an id linking a run's ``started`` and ``finished`` records.
    """
    license_info = decision.license or {}
    record: dict[str, object] = {
        "schema": AUDIT_SCHEMA,
        "ts": (now or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        "event": event,
        "run_id": run_id,
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
        "signer": dict(signer) if signer is not None else None,
        "code": dict(code) if code is not None else None,
        "sandbox": {"backend": sandbox_backend, "image_digest": image_digest} if sandbox_backend else None,
        "gpu": dict(gpu) if gpu is not None else None,
        "parameters": dict(parameters) if parameters is not None else None,
        "prompt_sha256": content_sha256(prompt) if prompt is not None else None,
        "output_sha256": content_sha256(output) if output is not None else None,
        "host_measured": dict(host_measured) if host_measured is not None else None,
        "worker_reported": dict(worker_reported) if worker_reported is not None else None,
    }
    if store_text:
        record["prompt_text"] = prompt
        record["output_text"] = output
    return record


# --- reading for people ------------------------------------------------------------------------


def record_decision(record: Mapping[str, object]) -> str:
    """``allowed`` or ``refused`` (a refused run, or a decision that denied)."""
    return "refused" if record.get("event") in ("refused", "interrupted") or record.get("allowed") is False else "allowed"


def _tokens(record: Mapping[str, object]) -> object:
    for key in ("host_measured", "run_stats"):
        stats = record.get(key)
        if isinstance(stats, dict) and "generated_tokens" in stats:
            return stats["generated_tokens"]
    return None


def _blocked(record: Mapping[str, object]) -> object:
    for key in ("host_measured", "run_stats"):
        stats = record.get(key)
        if isinstance(stats, dict) and "output_blocked" in stats:
            return stats["output_blocked"]
    return None


@dataclass(frozen=True)
class AuditRow:
    """One line of ``audit show``."""

    seq: object
    time: str
    operator: str
    model: str
    event: str
    decision: str
    tokens: object
    blocked: object

    def to_json(self) -> dict[str, object]:
        """Plain-data form."""
        return dict(self.__dict__)


def parse_since(value: str) -> datetime:
    """``--since``: an ISO date/time (UTC when no zone) or a duration back from now (``30m``, ``12h``, ``7d``).

    Raises:
        UsageError: anything else.
    """
    m = re.fullmatch(r"(\d{1,6})([smhd])", value)
    if m:
        from datetime import timedelta

        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--since {value!r} is not an ISO date/time or a duration like 12h / 7d", rule="audit.since") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def select_rows(
    records: Sequence[Mapping[str, object]],
    *,
    since: datetime | None = None,
    model: str | None = None,
    decision: str | None = None,
    include_checkpoints: bool = False,
) -> list[AuditRow]:
    """The rows of ``audit show``, filtered: ``since`` (inclusive), ``model`` (a substring of the
    folder or the root digest), ``decision`` (``allowed`` / ``refused``)."""
    rows: list[AuditRow] = []
    for rec in records:
        event = str(rec.get("event"))
        if event == "checkpoint" and not include_checkpoints:
            continue
        ts = str(rec.get("ts", ""))
        if since is not None:
            try:
                when = datetime.fromisoformat(ts)
            except ValueError:
                continue
            if (when if when.tzinfo else when.replace(tzinfo=UTC)) < since:
                continue
        folder = str(rec.get("model_dir") or "")
        digest = str(rec.get("model_root_digest") or "")
        if model is not None and model not in folder and model not in digest:
            continue
        verdict = "-" if event == "checkpoint" else record_decision(rec)
        if decision is not None and verdict != decision:
            continue
        rows.append(AuditRow(rec.get("seq"), ts, str(rec.get("operator") or "-"), Path(folder).name or "-", event,
                             verdict, _tokens(rec), _blocked(rec)))
    return rows
