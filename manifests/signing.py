"""Key generation and signing (OMS v1.0 interop profile, key and certificate methods).

    >>> import pathlib, tempfile
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> keys = generate_key(tmp / "org.pem")
    >>> keys.public.name, oct(keys.private.stat().st_mode & 0o777)
    ('org.pub.pem', '0o600')
    >>> model = tmp / "model"; model.mkdir(); _ = (model / "config.json").write_text("{}")
    >>> signed = sign_model(model, keys.private)
    >>> signed.signature.name, signed.files
    ('model.sig', 1)

Signing refuses a folder the verifier would refuse (same inventory), writes the signature
atomically, and never signs the signature file or the git attribute files (see
:data:`~secure_run.manifests.inventory.IGNORABLE`). Keyless (Sigstore) signing is not offered: it
needs Fulcio/Rekor and the project runs offline.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_run.errors import EnvironmentProblem, UsageError

from ._atomic import write_atomic
from ._bundle import PAYLOAD_TYPE, Resource, build_bundle, build_statement, pae
from ._io import storage_error
from ._keys import (
    Passphrase,
    curve_hash,
    key_fingerprint,
    load_private_key,
    public_pem,
    same_key,
    sign_ecdsa,
    verify_ecdsa,
)
from ._names import sort_key
from ._x509 import CERT_ERRORS, parse_problem
from .findings import VerificationFailed
from .hashing import ProgressSink, hash_files, root_digest
from .inventory import DEFAULT_RULES, InventoryRules, take_inventory
from .trust import SignerInfo, read_trust_file


@dataclass(frozen=True)
class KeyFiles:
    """Paths written by :func:`generate_key` and the public key's fingerprint."""

    private: Path
    public: Path
    fingerprint: str


def public_path_for(private: Path) -> Path:
    """``KEY.pem`` -> ``KEY.pub.pem`` (any other name gets ``.pub.pem`` appended)."""
    if private.name.endswith(".pem"):
        return private.with_name(private.name[: -len(".pem")] + ".pub.pem")
    return private.with_name(private.name + ".pub.pem")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise storage_error(exc, "write the key file", path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, mode)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise storage_error(exc, "write the key file", path) from None


def generate_key(out: str | os.PathLike[str], *, passphrase: bytes | None = None) -> KeyFiles:
    """Create an EC P-256 key pair: ``out`` (PKCS#8 PEM, mode 0600) and its ``.pub.pem`` (0644).

    Args:
        out: the private key file to create.
        passphrase: encrypt the private key (PKCS#8, PBES2 with AES-256-CBC, as ``cryptography``'s
            best available encryption writes it); None writes it unencrypted.

    Raises:
        UsageError: either file already exists (keys are never overwritten), or an empty passphrase.
    """
    private = Path(out)
    public = public_path_for(private)
    for p in (private, public):
        if os.path.lexists(p):
            raise UsageError(f"{p} already exists; refusing to overwrite a key", path=str(p), hint="choose another --out path")
    if not private.parent.is_dir():
        raise UsageError(f"folder {private.parent} does not exist", path=str(private.parent))
    if passphrase is not None and not passphrase:
        raise UsageError("the key passphrase is empty", hint="choose a non-empty passphrase")
    key = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    _write_new(private, pem, 0o600)
    _write_new(public, public_pem(key.public_key()), 0o644)
    return KeyFiles(private, public, key_fingerprint(key.public_key()))


@dataclass(frozen=True)
class SignResult:
    """What :func:`sign_model` wrote."""

    signature: Path
    subject_name: str
    root_digest: str
    files: int
    total_bytes: int
    signer: SignerInfo

    def to_json(self) -> dict[str, object]:
        """JSON form for ``secure-run sign --json``."""
        return {
            "signature": str(self.signature),
            "subject_name": self.subject_name,
            "root_digest": "sha256:" + self.root_digest,
            "files": self.files,
            "bytes": self.total_bytes,
            "signer": self.signer.to_json(),
        }


def _signature_path(root: Path, signature: str | os.PathLike[str] | None) -> Path:
    if signature is None:
        return root / "model.sig"
    sig = Path(signature)
    parent = sig.parent.resolve()
    inside = parent == root.resolve() or root.resolve() in parent.parents
    if inside and not (parent == root.resolve() and sig.name == "model.sig"):
        raise UsageError(
            f"{sig}: a signature inside the model folder must be DIR/model.sig",
            path=str(sig),
            hint="write the signature to DIR/model.sig or outside the model folder",
        )
    return sig


def _load_certs(path: str | os.PathLike[str], what: str) -> list[x509.Certificate]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            certs = x509.load_pem_x509_certificates(read_trust_file(path, what))
            for cert in certs:
                parse_problem(cert)
    except CERT_ERRORS as exc:
        raise UsageError(f"{path}: not a usable PEM {what} ({exc})", path=str(path), hint=f"pass the {what} in PEM form") from None
    return certs


def _load_chain(certificate: str | os.PathLike[str], chain: str | os.PathLike[str] | None, key: ec.EllipticCurvePublicKey) -> tuple[bytes, ...]:
    leaf_certs = _load_certs(certificate, "signing certificate")
    rest = _load_certs(chain, "certificate chain") if chain else []
    if len(leaf_certs) != 1:
        raise UsageError(f"{certificate}: expected exactly one certificate, found {len(leaf_certs)}", path=str(certificate))
    leaf_key = leaf_certs[0].public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or not same_key(leaf_key, key):
        raise UsageError(f"{certificate}: the certificate is not for the signing key", path=str(certificate), hint="pass the leaf certificate issued for --key")
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in [*leaf_certs, *rest])


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, data, action="write the signature")  # the one atomic writer (manifests/_atomic.py)


class Signer(Protocol):
    """Something that holds an EC private key and signs with it (a key file, a PKCS#11 token).

    ``sign`` returns a DER ECDSA signature over ``data`` with the curve's hash (OMS pairing:
    P-256/SHA-256, P-384/SHA-384, P-521/SHA-512).
    """

    @property
    def source(self) -> str:
        """Where the key is (a file name, a PKCS#11 URI without its PIN), for messages."""

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half (its fingerprint is the bundle's key hint)."""

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA signature of ``data``."""


@dataclass(frozen=True)
class KeyFileSigner:
    """A PEM private key file (optionally encrypted PKCS#8) loaded into memory."""

    key: ec.EllipticCurvePrivateKey
    source: str

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], passphrase: Passphrase | None = None) -> KeyFileSigner:
        """Load ``path``; ``passphrase`` is asked for only when the key is encrypted."""
        return cls(load_private_key(read_trust_file(path, "private key"), str(path), passphrase), str(path))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half."""
        return self.key.public_key()

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA signature with the curve's hash."""
        return sign_ecdsa(self.key, data, self.source)


def sign_model(
    root: str | os.PathLike[str],
    private_key: str | os.PathLike[str] | None = None,
    *,
    passphrase: Passphrase | None = None,
    signer: Signer | None = None,
    certificate: str | os.PathLike[str] | None = None,
    chain: str | os.PathLike[str] | None = None,
    signature: str | os.PathLike[str] | None = None,
    rules: InventoryRules = DEFAULT_RULES,
    workers: int | None = None,
    progress: ProgressSink | None = None,
) -> SignResult:
    """Sign a model folder with an EC key (key method) or key + certificate (certificate method).

    Steps: 1. inventory (refuses exactly what verify refuses) -> 2. hash every signable file ->
    3. statement (resources in path-component order, root digest) -> 4. DSSE signature over the
    PAE -> 5. bundle written atomically to ``signature`` (default ``root/model.sig``).

    Args:
        root: the model folder.
        private_key: PEM EC private key (P-256/P-384/P-521), plain or encrypted PKCS#8.
        passphrase: called (once) for the passphrase of an encrypted ``private_key``.
        signer: sign with this instead of a key file (e.g. :class:`~secure_run.manifests.pkcs11.Pkcs11Signer`).
        certificate: leaf certificate PEM for the certificate method.
        chain: intermediate certificate(s) PEM (do not include the root).
        signature: output path (``root/model.sig`` or a path outside the folder).
        rules: inventory rules (tests only).
        workers: hashing threads.
        progress: optional progress sink.

    Raises:
        FindingsError: the folder is refused by the inventory.
        UsageError: bad key / certificate / signature path.
    """
    inv = take_inventory(root, rules)
    inv.raise_for_findings()
    base = inv.root
    sig_path = _signature_path(base, signature)
    if chain and not certificate:
        raise UsageError("--chain needs --cert", hint="pass the leaf certificate with --cert")
    if (private_key is None) == (signer is None):
        raise UsageError("sign needs exactly one of a key file (--key) and a token key (--pkcs11-uri)")
    active: Signer = signer if signer is not None else KeyFileSigner.from_file(private_key or "", passphrase)
    public = active.public_key()
    curve_hash(public, active.source)  # refuse other curves before hashing gigabytes
    chain_der = _load_chain(certificate, chain, public) if certificate else ()

    signable = sorted((f for f in inv.files if not f.ignorable), key=lambda f: sort_key(f.name))
    if not signable:
        raise UsageError(f"{base}: nothing to sign (the folder has no files)", path=str(base), rule="OMS-EMPTY")
    digests = hash_files(base, [f.name for f in signable], expected={f.name: f.identity for f in signable}, workers=workers, progress=progress)
    resources = [Resource(f.name, digests[f.name].sha256) for f in signable]
    subject = base.resolve().name
    payload = build_statement(subject, resources)

    to_sign = pae(PAYLOAD_TYPE, payload)
    sig = active.sign(to_sign)
    try:
        verify_ecdsa(public, sig, to_sign, active.source)  # a token that signs wrongly is caught here
    except VerificationFailed:
        raise EnvironmentProblem(
            f"{active.source}: the signer returned a signature that does not verify with its own public key; nothing was written",
            hint="check the token / key (wrong key object, or a mechanism the token does not implement correctly)",
        ) from None
    fingerprint = key_fingerprint(public)
    if chain_der:
        bundle = build_bundle(payload, sig, chain_der=chain_der)
        info = SignerInfo("certificate", key_sha256=fingerprint)
    else:
        bundle = build_bundle(payload, sig, key_hint=fingerprint)
        info = SignerInfo("key", key_sha256=fingerprint)
    _write_atomic(sig_path, bundle)
    return SignResult(
        sig_path,
        subject,
        root_digest(r.digest for r in resources),
        len(resources),
        sum(f.size for f in signable),
        info,
    )
