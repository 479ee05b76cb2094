"""OMS v1.0 layers: Sigstore bundle -> DSSE envelope -> in-toto Statement -> predicate.

Parsing is strict and happens once, at the boundary, into frozen objects; every refusal names the
rule (``OMS-*``). Reader tolerance (spec/signing.md section 2.3): ``keyid`` absent/empty/null or
any string (ignored); ``tlogEntries`` absent or ``[]`` for key/certificate bundles;
``publicKey.rawBytes`` (pre-1.1 bundles) or ``hint``; unknown fields inside resource entries.
Not tolerated: the deprecated ``Digests/v0.1`` predicate, shard serialization, hashes other than
SHA-256, ``allow_symlinks: true``, more than one signature or subject.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from ._jsoncheck import JsonProblem, loads_strict
from ._names import name_problem
from .findings import Finding, VerificationFailed
from .hashing import root_digest

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
ACCEPTED_MEDIA_TYPES = frozenset({BUNDLE_MEDIA_TYPE, "application/vnd.dev.sigstore.bundle+json;version=0.3"})
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
LEGACY_PREDICATE_TYPE = "https://model_signing/Digests/v0.1"
#: The fixed ignore list secure-run writes and the only signed ignores it honours.
IGNORE_PATHS = (".git", ".gitattributes", ".github", ".gitignore", "model.sig")
#: Limits on untrusted bundle content.
MAX_BUNDLE_BYTES = 64 << 20
MAX_RESOURCES = 1_000_000
MAX_CHAIN = 8

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")

Method = Literal["key", "certificate", "sigstore"]


def _bad(source: str, rule: str, message: str) -> VerificationFailed:
    return VerificationFailed(f"{source}: {message} [{rule}]", [Finding(source, rule, message)], path=source)


def _b64(source: str, value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise _bad(source, "OMS-BUNDLE", f"{what} must be a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(source, "OMS-BUNDLE", f"{what} is not valid standard base64") from None


@dataclass(frozen=True)
class Bundle:
    """A parsed OMS bundle (signature not yet verified).

    Attributes:
        source: where it was read from (for messages).
        raw: the bundle bytes (sigstore bundles are handed to sigstore-python as is).
        method: ``key``, ``certificate`` or ``sigstore`` (from ``verificationMaterial``).
        key_hint: ``publicKey.hint`` if present.
        key_raw: ``publicKey.rawBytes`` decoded (PEM text in old bundles) if present.
        chain: DER certificates of ``x509CertificateChain`` (leaf first).
        payload: DSSE payload bytes.
        payload_type: DSSE payloadType.
        signature: DSSE signature bytes (DER ECDSA for key/certificate).
    """

    source: str
    raw: bytes
    method: Method
    key_hint: str | None
    key_raw: bytes | None
    chain: tuple[bytes, ...]
    payload: bytes
    payload_type: str
    signature: bytes

    def pae(self) -> bytes:
        """The DSSE v1 pre-authentication encoding that the signature covers."""
        return pae(self.payload_type, self.payload)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 PAE: ``DSSEv1 <len(type)> <type> <len(body)> <body>``."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _material(source: str, vm: Any) -> tuple[Method, str | None, bytes | None, tuple[bytes, ...]]:
    if not isinstance(vm, dict):
        raise _bad(source, "OMS-BUNDLE", "verificationMaterial is missing")
    kinds = [k for k in ("publicKey", "x509CertificateChain", "certificate") if k in vm]
    if len(kinds) != 1:
        raise _bad(source, "OMS-BUNDLE", f"verificationMaterial must hold exactly one of publicKey, x509CertificateChain, certificate (found {kinds})")
    tlog = vm.get("tlogEntries", [])
    if not isinstance(tlog, list):
        raise _bad(source, "OMS-BUNDLE", "verificationMaterial.tlogEntries must be a list")
    kind = kinds[0]
    if kind == "publicKey":
        pk = vm["publicKey"]
        if not isinstance(pk, dict):
            raise _bad(source, "OMS-BUNDLE", "publicKey must be an object")
        hint = pk.get("hint")
        if hint is not None and (not isinstance(hint, str) or not _HEX64.match(hint)):
            raise _bad(source, "OMS-BUNDLE", f"publicKey.hint {hint!r} is not a lowercase hex SHA-256")
        raw = _b64(source, pk["rawBytes"], "publicKey.rawBytes") if "rawBytes" in pk else None
        return "key", hint, raw, ()
    if kind == "x509CertificateChain":
        certs = vm["x509CertificateChain"].get("certificates") if isinstance(vm["x509CertificateChain"], dict) else None
        if not isinstance(certs, list) or not 1 <= len(certs) <= MAX_CHAIN:
            raise _bad(source, "OMS-BUNDLE", f"x509CertificateChain.certificates must list 1..{MAX_CHAIN} certificates")
        chain = tuple(
            _b64(source, c.get("rawBytes") if isinstance(c, dict) else None, f"certificates[{i}].rawBytes")
            for i, c in enumerate(certs)
        )
        return "certificate", None, None, chain
    return "sigstore", None, None, ()


def parse_bundle(data: bytes, source: str) -> Bundle:
    """Parse an OMS v1.0 bundle strictly (structure only, no cryptography).

    Args:
        data: the signature file bytes.
        source: name for messages (e.g. ``model.sig``).

    Raises:
        VerificationFailed: ``OMS-JSON``, ``OMS-MEDIATYPE``, ``OMS-BUNDLE``, ``OMS-SIGNATURES``
            or ``OMS-PAYLOADTYPE``.
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise _bad(source, "OMS-JSON", f"signature file is {len(data)} bytes (limit {MAX_BUNDLE_BYTES})")
    try:
        doc = loads_strict(data, allow_infinity=False)
    except JsonProblem as exc:
        raise _bad(source, "OMS-JSON", f"not a JSON bundle: {exc.message}") from None
    if not isinstance(doc, dict):
        raise _bad(source, "OMS-JSON", "the bundle is not a JSON object")
    media = doc.get("mediaType")
    if not isinstance(media, str) or media not in ACCEPTED_MEDIA_TYPES:
        got = repr(media)[:80] if isinstance(media, str | None) else f"a JSON {type(media).__name__}"
        raise _bad(source, "OMS-MEDIATYPE", f"mediaType is {got}, expected {BUNDLE_MEDIA_TYPE!r}")
    method, hint, raw_key, chain = _material(source, doc.get("verificationMaterial"))
    if "messageSignature" in doc:
        raise _bad(source, "OMS-BUNDLE", "messageSignature bundles are not OMS model signatures")
    env = doc.get("dsseEnvelope")
    if not isinstance(env, dict):
        raise _bad(source, "OMS-BUNDLE", "dsseEnvelope is missing")
    payload = _b64(source, env.get("payload"), "dsseEnvelope.payload")
    payload_type = env.get("payloadType")
    if payload_type != PAYLOAD_TYPE:
        raise _bad(source, "OMS-PAYLOADTYPE", f"payloadType is {payload_type!r}, expected {PAYLOAD_TYPE!r}")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        count = len(sigs) if isinstance(sigs, list) else "no"
        raise _bad(source, "OMS-SIGNATURES", f"the envelope has {count} signatures, expected exactly 1")
    keyid = sigs[0].get("keyid")
    if keyid is not None and not isinstance(keyid, str):
        raise _bad(source, "OMS-SIGNATURES", "signatures[0].keyid must be a string, empty or absent")
    signature = _b64(source, sigs[0].get("sig"), "signatures[0].sig")
    _refuse_legacy(source, payload)
    return Bundle(source, data, method, hint, raw_key, chain, payload, payload_type, signature)


def _refuse_legacy(source: str, payload: bytes) -> None:
    """Name the deprecated v0.2 format up front (its PAE bug would otherwise read as a bad signature).

    Only a refusal is derived from the unverified payload, never trust.
    """
    try:
        doc = loads_strict(payload, allow_infinity=False)  # bounded: deep nesting is a JsonProblem
    except JsonProblem:
        return  # parse_statement names the problem once the signature is verified
    if isinstance(doc, dict) and doc.get("predicateType") == LEGACY_PREDICATE_TYPE:
        raise _bad(
            source,
            "OMS-PREDICATE-TYPE",
            f"predicateType {LEGACY_PREDICATE_TYPE!r} is the deprecated v0.2 format (OMS v1.0 section 11.2: "
            "verifiers MAY, secure-run does not accept it); re-sign with a current signer",
        )


@dataclass(frozen=True)
class Resource:
    """One signed file: canonical relative name and lowercase hex SHA-256."""

    name: str
    digest: str


@dataclass(frozen=True)
class Statement:
    """The verified content of an OMS v1.0 statement (files / sha256 profile).

    Attributes:
        subject_name: the subject name (basename of the model folder when it was signed).
        root_digest: the subject's SHA-256 (consistent with ``resources``, checked).
        resources: signed files in document order.
        ignore_paths: the signer's ignore list, as written (secure-run honours only
            :data:`IGNORE_PATHS`).
    """

    subject_name: str
    root_digest: str
    resources: tuple[Resource, ...]
    ignore_paths: tuple[str, ...]


def _subject(source: str, doc: dict[str, Any]) -> tuple[str, str]:
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise _bad(source, "OMS-STATEMENT", "the statement must have exactly one subject")
    name, digest = subjects[0].get("name"), subjects[0].get("digest")
    if not isinstance(name, str) or not isinstance(digest, dict) or set(digest) != {"sha256"}:
        raise _bad(source, "OMS-STATEMENT", "subject must be {name, digest: {sha256}}")
    if not isinstance(digest["sha256"], str) or not _HEX64.match(digest["sha256"]):
        raise _bad(source, "OMS-STATEMENT", "subject digest is not a lowercase hex SHA-256")
    return name, digest["sha256"]


def _serialization(source: str, ser: Any) -> tuple[str, ...]:
    if not isinstance(ser, dict):
        raise _bad(source, "OMS-STATEMENT", "predicate.serialization must be an object")
    unknown = set(ser) - {"method", "hash_type", "allow_symlinks", "ignore_paths"}
    if unknown:
        raise _bad(source, "OMS-PROFILE", f"serialization has unsupported fields {sorted(unknown)}")
    if ser.get("method") != "files":
        raise _bad(source, "OMS-PROFILE", f"serialization.method is {ser.get('method')!r}, expected 'files'")
    if ser.get("hash_type") != "sha256":
        raise _bad(source, "OMS-PROFILE", f"serialization.hash_type is {ser.get('hash_type')!r}, expected 'sha256'")
    if ser.get("allow_symlinks") is not False:
        raise _bad(source, "OMS-PROFILE", f"serialization.allow_symlinks is {ser.get('allow_symlinks')!r}, expected false")
    ignores = ser.get("ignore_paths", [])
    if not isinstance(ignores, list) or not all(isinstance(p, str) for p in ignores):
        raise _bad(source, "OMS-STATEMENT", "serialization.ignore_paths must be a list of strings")
    return tuple(ignores)


def _resources(source: str, items: Any) -> tuple[Resource, ...]:
    if not isinstance(items, list):
        raise _bad(source, "OMS-STATEMENT", "predicate.resources must be a list")
    if not items:
        raise _bad(source, "OMS-EMPTY", "the manifest lists no resources")
    if len(items) > MAX_RESOURCES:
        raise _bad(source, "OMS-STATEMENT", f"the manifest lists {len(items)} resources (limit {MAX_RESOURCES})")
    out: list[Resource] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad(source, "OMS-STATEMENT", f"resources[{i}] is not an object")
        name, algo, digest = item.get("name"), item.get("algorithm"), item.get("digest")
        if not isinstance(name, str):
            raise _bad(source, "OMS-STATEMENT", f"resources[{i}].name is not a string")
        problem = name_problem(name)
        if problem:
            raise _bad(source, "OMS-NAME", f"resources[{i}].name {name!r}: {problem}")
        if algo != "sha256":
            raise _bad(source, "OMS-PROFILE", f"resources[{i}].algorithm is {algo!r}, expected 'sha256'")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise _bad(source, "OMS-STATEMENT", f"resources[{i}].digest is not a lowercase hex SHA-256")
        if name in seen:
            raise _bad(source, "OMS-DUPLICATE", f"resource {name!r} is listed more than once")
        seen.add(name)
        out.append(Resource(name, digest))
    return tuple(out)


def parse_statement(payload: bytes, source: str) -> Statement:
    """Parse and check a (signature-verified) DSSE payload as an OMS v1.0 statement.

    Checks ``_type``, ``predicateType``, one subject, the interop profile, canonical and unique
    resource names, and recomputes the root digest in document order (never re-sorted).

    Raises:
        VerificationFailed: an ``OMS-*`` rule.
    """
    try:
        doc = loads_strict(payload, allow_infinity=False)
    except JsonProblem as exc:
        raise _bad(source, "OMS-STATEMENT", f"the payload is not JSON: {exc.message}") from None
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
        got = doc.get("_type") if isinstance(doc, dict) else type(doc).__name__
        raise _bad(source, "OMS-STATEMENT", f"_type is {got!r}, expected {STATEMENT_TYPE!r}")
    ptype = doc.get("predicateType")
    if ptype == LEGACY_PREDICATE_TYPE:
        raise _bad(
            source,
            "OMS-PREDICATE-TYPE",
            f"predicateType {ptype!r} is the deprecated v0.2 format (OMS v1.0 section 11.2: verifiers MAY, "
            "secure-run does not accept it); re-sign with a current signer",
        )
    if ptype != PREDICATE_TYPE:
        raise _bad(source, "OMS-PREDICATE-TYPE", f"predicateType is {ptype!r}, expected {PREDICATE_TYPE!r}")
    subject_name, subject_digest = _subject(source, doc)
    pred = doc.get("predicate")
    if not isinstance(pred, dict) or set(pred) != {"serialization", "resources"}:
        keys = sorted(pred) if isinstance(pred, dict) else type(pred).__name__
        raise _bad(source, "OMS-STATEMENT", f"predicate has {keys}, expected exactly serialization and resources")
    ignores = _serialization(source, pred["serialization"])
    resources = _resources(source, pred["resources"])
    computed = root_digest(r.digest for r in resources)
    if computed != subject_digest:
        raise _bad(source, "OMS-ROOT-DIGEST", f"subject digest {subject_digest} != root of the resources {computed}")
    return Statement(subject_name, subject_digest, resources, ignores)


def build_statement(subject_name: str, resources: list[Resource]) -> bytes:
    """The statement secure-run signs (interop profile of spec/signing.md section 2)."""
    doc = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": root_digest(r.digest for r in resources)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": list(IGNORE_PATHS),
            },
            "resources": [{"name": r.name, "algorithm": "sha256", "digest": r.digest} for r in resources],
        },
    }
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")


def build_bundle(payload: bytes, signature: bytes, *, key_hint: str | None = None, chain_der: tuple[bytes, ...] = ()) -> bytes:
    """Serialize a key-method (``key_hint``) or certificate-method (``chain_der``) bundle."""
    vm: dict[str, Any]
    if chain_der:
        vm = {"x509CertificateChain": {"certificates": [{"rawBytes": base64.b64encode(c).decode()} for c in chain_der]}}
    else:
        vm = {"publicKey": {"hint": key_hint}}
    vm["tlogEntries"] = []
    doc = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": vm,
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}],
        },
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")
