"""Signed in-toto statements secure-run writes besides model signatures.

Three kinds, all in-toto Statement v1 inside the same DSSE envelope and bundle as model
signatures (:mod:`secure_run.manifests._bundle`: ``pae``, ``build_bundle``, ``parse_bundle``), signed
with an EC key file (``secure-run keygen`` / ``secure-run audit keygen``):

* audit checkpoints (:data:`CHECKPOINT_TYPE`): the signed head of the hash-chained audit log;
* run attestations (:data:`RUN_TYPE`): one per run, subject = the released output's digest;
* import provenance (:data:`IMPORT_TYPE`): upstream snapshot -> kept / dropped / rewritten files.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from ._bundle import PAYLOAD_TYPE, STATEMENT_TYPE, build_bundle, pae, parse_bundle
from ._jsoncheck import JsonProblem, loads_strict
from ._keys import key_fingerprint, load_private_key, load_public_key, sign_ecdsa, verify_ecdsa
from .findings import verification_failed
from .trust import read_trust_file

CHECKPOINT_TYPE = "https://secure-run.dev/audit-checkpoint/v1"
RUN_TYPE = "https://secure-run.dev/run/v1"
IMPORT_TYPE = "https://secure-run.dev/import-provenance/v1"
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

