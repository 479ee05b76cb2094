"""Pinned trust material (what a signature must verify against) and the signer it proves.

Three kinds, one per OMS signing method:

* :class:`KeyTrust` -- a pinned EC public key (``--public-key``);
* :class:`CertificateTrust` -- pinned root certificate(s) plus a pinned signer identity
  (``--cert-root`` + ``--identity``);
* :class:`SigstoreTrust` -- a Sigstore identity + OIDC issuer, checked against a pinned
  ``trusted_root.json`` (``--sigstore --identity --issuer [--trusted-root]``; default: the
  production root pinned in ``manifests/trusted/sigstore/``).

    >>> trust = SigstoreTrust(identity="someone@example.com", issuer="https://accounts.example.com")
    >>> trust.method, trust.trusted_root.name
    ('sigstore', 'trusted_root.json')
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ec

from secure_run.errors import UsageError

from ._io import InputFileProblem, read_input
from ._keys import key_fingerprint, load_public_key
from ._x509 import load_roots
from .findings import shown


def pinned_sigstore_root() -> Path:
    """Path of the production ``trusted_root.json`` shipped in ``manifests/trusted/sigstore/``."""
    return Path(str(resources.files("secure_run.manifests") / "trusted" / "sigstore" / "trusted_root.json"))


def read_trust_file(path: str | os.PathLike[str], what: str, limit: int = 4 << 20) -> bytes:
    """Read a small trust file (key, root, trusted root) or raise a usage error naming it."""
    p = Path(path)
    try:
        return read_input(p, limit=limit)
    except InputFileProblem as exc:
        raise UsageError(f"cannot read {what} {shown(str(p))}: it {exc.message}", path=str(p), hint=f"pass an existing {what} file") from None


@dataclass(frozen=True)
class KeyTrust:
    """A pinned EC public key.

    Attributes:
        key: the public key.
        source: where it came from (for messages).
    """

    key: ec.EllipticCurvePublicKey
    source: str = "public key"
    method: Literal["key"] = field(default="key", init=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyTrust:
        """Load from a PEM file (text before the PEM block is ignored)."""
        return cls(load_public_key(read_trust_file(path, "public key"), str(path)), str(path))

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the re-serialized PEM SubjectPublicKeyInfo (= the OMS key hint)."""
        return key_fingerprint(self.key)


@dataclass(frozen=True)
class CertificateTrust:
    """Pinned root certificate(s) and the identity the signing certificate must carry.

    Attributes:
        roots_pem: PEM bytes of the trust anchor(s).
        identity: see :func:`secure_run.manifests._x509.identity_problem` for the accepted forms.
        source: where the roots came from.
    """

    roots_pem: bytes
    identity: str
    source: str = "root certificate"
    method: Literal["certificate"] = field(default="certificate", init=False)

    def __post_init__(self) -> None:
        if not self.identity:
            raise UsageError("--identity is required with --cert-root", hint="pin the signer: --identity EMAIL|URI|sha256:LEAF")
        load_roots(self.roots_pem, self.source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], identity: str) -> CertificateTrust:
        """Load the roots from a PEM file."""
        return cls(read_trust_file(path, "root certificate"), identity, str(path))

    @property
    def roots_sha256(self) -> str:
        """Hex SHA-256 of the roots PEM file as pinned (recorded in the lock)."""
        return hashlib.sha256(self.roots_pem).hexdigest()


@dataclass(frozen=True)
class SigstoreTrust:
    """A Sigstore keyless identity, verified offline against a pinned trusted root.

    Attributes:
        identity: certificate SAN (email, workflow URI, ...).
        issuer: OIDC issuer URL.
        trusted_root: ``trusted_root.json`` (default: :func:`pinned_sigstore_root`).
    """

    identity: str
    issuer: str
    trusted_root: Path = field(default_factory=pinned_sigstore_root)
    method: Literal["sigstore"] = field(default="sigstore", init=False)

    def __post_init__(self) -> None:
        if not self.identity or not self.issuer:
            raise UsageError("--sigstore needs both --identity and --issuer", hint="e.g. --identity you@example.com --issuer https://accounts.google.com")


Trust = KeyTrust | CertificateTrust | SigstoreTrust


@dataclass(frozen=True)
class SignerInfo:
    """Who signed, as proven by verification (compared with the lock's signer pin).

    Attributes:
        method: ``key``, ``certificate`` or ``sigstore``.
        key_sha256: key method: fingerprint of the verifying key.
        identity: certificate / sigstore: the pinned identity that matched.
        issuer: sigstore: the OIDC issuer.
        root_sha256: certificate: SHA-256 of the pinned roots PEM.
        leaf_sha256: certificate: SHA-256 of the signing certificate (DER).
    """

    method: Literal["key", "certificate", "sigstore"]
    key_sha256: str | None = None
    identity: str | None = None
    issuer: str | None = None
    root_sha256: str | None = None
    leaf_sha256: str | None = None

    def to_json(self) -> dict[str, str]:
        """JSON form without empty fields."""
        return {k: v for k, v in self.__dict__.items() if v is not None}
