"""Signed in-toto statements secure-run writes besides model signatures.

Three kinds, all in-toto Statement v1 inside the same DSSE envelope and bundle as model
signatures (:mod:`secure_run.manifests._bundle`: ``pae``, ``build_bundle``, ``parse_bundle``), signed
with an EC key file (``secure-run keygen`` / ``secure-run audit keygen``):

* audit checkpoints (:data:`CHECKPOINT_TYPE`): the signed head of the hash-chained audit log;
* run attestations (:data:`RUN_TYPE`): one per run, subject = the released output's digest;
* import provenance (SLSA Provenance v1, :data:`SLSA_PROVENANCE_TYPE`): upstream snapshot ->
  kept / dropped / rewritten files, written unsigned into the folder as :data:`PROVENANCE_FILE` and
  covered by the folder's own signature once it is signed.

    >>> import pathlib, tempfile
    >>> from secure_run.manifests import generate_key
    >>> keys = generate_key(pathlib.Path(tempfile.mkdtemp()) / "audit.pem")
    >>> st = statement([("out", "ab" * 32)], RUN_TYPE, {"x": 1})
    >>> bundle = sign_statement(st, keys.private)
    >>> verify_statement(bundle, keys.public, "att.json", RUN_TYPE)["predicate"]
    {'x': 1}

A generic DSSE verifier checks these envelopes with PAE + ECDSA alone (no secure-run code).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec

from secure_run.errors import UsageError

from ._bundle import PAYLOAD_TYPE, STATEMENT_TYPE, build_bundle, pae, parse_bundle
from ._jsoncheck import JsonProblem, loads_strict
from ._keys import key_fingerprint, load_private_key, load_public_key, sign_ecdsa, verify_ecdsa
from .findings import verification_failed
from .trust import read_trust_file

if TYPE_CHECKING:
    from .importer import ImportReport

CHECKPOINT_TYPE = "https://secure-run.dev/audit-checkpoint/v1"
RUN_TYPE = "https://secure-run.dev/run/v1"
#: the provenance statement ``import --source-repo`` writes into the folder (covered by the signature)
PROVENANCE_FILE = "provenance.intoto.json"

_HEX64 = frozenset("0123456789abcdef")


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def statement(subjects: Sequence[tuple[str, str]], predicate_type: str, predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1 with sha256 subjects ``(name, hex digest)``."""
    for name, digest in subjects:
        if not _is_hex64(digest):
            raise ValueError(f"subject {name!r}: {digest!r} is not a lowercase hex sha256")
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest}} for name, digest in subjects],
        "predicateType": predicate_type,
        "predicate": dict(predicate),
    }


def _private_key(private_key: str | os.PathLike[str] | ec.EllipticCurvePrivateKey) -> ec.EllipticCurvePrivateKey:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key
    return load_private_key(read_trust_file(private_key, "private key"), str(private_key))


def _public_key(public_key: str | os.PathLike[str] | ec.EllipticCurvePublicKey) -> ec.EllipticCurvePublicKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key
    return load_public_key(read_trust_file(public_key, "public key"), str(public_key))


def sign_statement(doc: Mapping[str, Any], private_key: str | os.PathLike[str] | ec.EllipticCurvePrivateKey) -> bytes:
    """Sign a statement: DSSE envelope (PAE + ECDSA) in a key-method bundle, as ``model.sig`` is.

    Raises:
        UsageError: unreadable or unsupported key.
    """
    key = _private_key(private_key)
    payload = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
    sig = sign_ecdsa(key, pae(PAYLOAD_TYPE, payload), "audit key")
    return build_bundle(payload, sig, key_hint=key_fingerprint(key.public_key()))


def verify_statement(
    data: bytes,
    public_key: str | os.PathLike[str] | ec.EllipticCurvePublicKey,
    source: str,
    predicate_type: str,
) -> dict[str, Any]:
    """Verify a bundle from :func:`sign_statement` and return its statement.

    Steps: 1. parse the bundle (``OMS-*`` rules) -> 2. key method, hint = the pinned key ->
    3. ECDSA over the PAE (``SIG-INVALID``) -> 4. payload is a Statement v1 of ``predicate_type``
    with sha256 subjects (``OMS-STATEMENT``, ``OMS-PREDICATE-TYPE``); a bundle of another key: ``SIG-KEY-HINT``.

    Raises:
        VerificationFailed: any step fails.
        UsageError: unreadable public key.
    """
    key = _public_key(public_key)
    bundle = parse_bundle(data, source)  # 1.
    if bundle.method != "key":  # 2.
        raise verification_failed(source, "SIG-KEY-HINT", f"signed with method {bundle.method}, expected the audit key")
    fingerprint = key_fingerprint(key)
    if bundle.key_hint is not None and bundle.key_hint != fingerprint:
        raise verification_failed(
            source, "SIG-KEY-HINT", f"signed by key sha256 {bundle.key_hint}, the pinned audit key is {fingerprint}"
        )
    verify_ecdsa(key, bundle.signature, bundle.pae(), source)  # 3.
    try:  # 4.
        doc = loads_strict(bundle.payload, allow_infinity=False)
    except JsonProblem as exc:
        raise verification_failed(source, "OMS-STATEMENT", f"the payload is not JSON: {exc.message}") from None
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
        raise verification_failed(source, "OMS-STATEMENT", f"the payload is not an in-toto Statement v1 ({STATEMENT_TYPE})")
    if doc.get("predicateType") != predicate_type:
        raise verification_failed(
            source, "OMS-PREDICATE-TYPE", f"predicateType is {doc.get('predicateType')!r}, expected {predicate_type!r}"
        )
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or not subjects or not all(
        isinstance(s, dict) and isinstance(s.get("digest"), dict) and _is_hex64(s["digest"].get("sha256")) for s in subjects
    ):
        raise verification_failed(source, "OMS-STATEMENT", "subject must list {name, digest: {sha256}} entries")
    if not isinstance(doc.get("predicate"), dict):
        raise verification_failed(source, "OMS-STATEMENT", "predicate must be an object")
    return doc


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()



# --- provenance of an import (issue 14.4) -------------------------------------------------------

#: SLSA Provenance v1: the predicate of ``provenance.intoto.json``
SLSA_PROVENANCE_TYPE = "https://slsa.dev/provenance/v1"
IMPORT_BUILD_TYPE = "https://secure-run.dev/import/v1"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?\Z")
_REVISION = re.compile(r"[0-9a-f]{40}\Z|[0-9a-f]{64}\Z")


def check_source(source_repo: str | None, source_revision: str | None) -> None:
    """Check ``--source-repo ID --source-revision SHA`` (both or neither).

    Raises:
        UsageError: ``IMP-SOURCE``: only one given, a malformed repository id, or a revision that is
            not a full lowercase commit hash (a branch or tag name moves; it pins nothing).
    """
    if source_repo is None and source_revision is None:
        return
    if source_repo is None or source_revision is None:
        raise UsageError("--source-repo and --source-revision go together", rule="IMP-SOURCE",
                         hint="pass both: the upstream repository id and the commit it was downloaded at")
    if not _REPO_ID.match(source_repo) or ".." in source_repo:
        raise UsageError(f"--source-repo {source_repo!r} is not a repository id like org/name", rule="IMP-SOURCE")
    if not _REVISION.match(source_revision):
        raise UsageError(
            f"--source-revision {source_revision!r} is not a full commit hash (40 or 64 lowercase hex)",
            rule="IMP-SOURCE",
            hint="pin the exact commit you downloaded (e.g. the snapshot folder name in the Hugging Face cache), "
            "not a branch or tag",
        )


def import_provenance(report: ImportReport, source_repo: str, source_revision: str, *, dereference: bool = False,
                      finished: str | None = None) -> dict[str, Any]:
    """The in-toto Statement (SLSA Provenance v1 predicate) of one import.

    Subjects: every resulting file with its sha256. ``resolvedDependencies``: the upstream
    repository at its commit, then every upstream file that was kept with its upstream sha256.
    ``internalParameters``: what the import did: ``kept`` unchanged, ``rewritten`` (upstream and
    resulting sha256, remote-code pointers removed) and ``dropped`` (name, rule, reason).
    """
    from datetime import UTC, datetime

    from secure_run import __version__

    rewritten: dict[str, list[str]] = {s.file: [] for s in report.stripped}
    for s in report.stripped:
        rewritten[s.file].append(s.pointer)
    deps: list[dict[str, Any]] = [{"uri": f"https://huggingface.co/{source_repo}", "digest": {"gitCommit": source_revision}}]
    deps += [{"name": k.name, "digest": {"sha256": k.source_sha256}} for k in report.kept]
    predicate = {
        "buildDefinition": {
            "buildType": IMPORT_BUILD_TYPE,
            "externalParameters": {"source": {"repository": source_repo, "revision": source_revision},
                                   "dereference": dereference},
            "internalParameters": {
                "kept": [k.name for k in report.kept if not k.modified],
                "rewritten": [
                    {"name": k.name, "upstream_sha256": k.source_sha256, "sha256": k.sha256,
                     "removed_pointers": rewritten.get(k.name, [])}
                    for k in report.kept if k.modified
                ],
                "dropped": [{"name": d.name, "rule": d.rule, "reason": d.reason} for d in report.dropped],
                "notes": list(report.notes),
            },
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {"id": f"https://secure-run.dev/import@{__version__}"},
            "metadata": {"finishedOn": finished or datetime.now(UTC).isoformat(timespec="seconds")},
        },
    }
    return statement([(k.name, k.sha256) for k in report.kept], SLSA_PROVENANCE_TYPE, predicate)


def provenance_source(data: bytes) -> tuple[str, str]:
    """(repository id, revision) that an import provenance statement names.

    Raises:
        ValueError: not strict JSON, or not a secure-run import provenance statement.
    """
    try:
        doc = loads_strict(data, allow_infinity=False)
        source = doc["predicate"]["buildDefinition"]["externalParameters"]["source"]
        repo, revision = source["repository"], source["revision"]
    except JsonProblem as exc:
        raise ValueError(f"not strict JSON ({exc.message})") from None
    except (KeyError, TypeError):
        raise ValueError("not a secure-run import provenance statement") from None
    if not isinstance(repo, str) or not isinstance(revision, str):
        raise ValueError("its source repository / revision are not strings")
    return repo, revision


def read_provenance(root: Path) -> dict[str, Any] | None:
    """A summary of ``root/provenance.intoto.json`` for ``inspect`` (as claimed: not verified here;
    ``verify`` covers it through the folder's signature). None when absent."""
    path = root / PROVENANCE_FILE
    if not os.path.lexists(path):
        return None
    try:
        with open(path, "rb", opener=lambda p, fl: os.open(p, fl | os.O_NOFOLLOW)) as fh:
            doc = loads_strict(fh.read(64 << 20), allow_infinity=False)
    except (OSError, JsonProblem) as exc:
        return {"file": PROVENANCE_FILE, "error": f"unreadable: {exc}"}
    try:
        build = doc["predicate"]["buildDefinition"]
        source = build["externalParameters"]["source"]
        internal = build["internalParameters"]
        return {
            "file": PROVENANCE_FILE,
            "predicate_type": doc["predicateType"],
            "source_repository": source["repository"],
            "source_revision": source["revision"],
            "files": len(doc["subject"]),
            "kept": len(internal["kept"]),
            "rewritten": [r["name"] for r in internal["rewritten"]],
            "dropped": [d["name"] for d in internal["dropped"]],
        }
    except (KeyError, TypeError):
        return {"file": PROVENANCE_FILE, "error": "not a secure-run import provenance statement"}
