"""EC keys: loading PEM files, the OMS key hint, and ECDSA sign/verify with the curve's hash."""

from __future__ import annotations

import hashlib
import re

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_run.errors import UsageError

from .findings import verification_failed

_PUBLIC_PEM = re.compile(rb"-----BEGIN PUBLIC KEY-----\r?\n.*?-----END PUBLIC KEY-----", re.DOTALL)

#: Curve name -> hash used by OMS / model_signing (P-256 -> SHA-256, P-384 -> SHA-384, P-521 -> SHA-512).
_CURVE_HASH: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


def curve_hash(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey, source: str) -> hashes.HashAlgorithm:
    """The hash OMS pairs with ``key``'s curve.

    Raises:
        VerificationFailed: ``SIG-KEY-TYPE`` for any other curve.
    """
    algo = _CURVE_HASH.get(key.curve.name)
    if algo is None:
        raise verification_failed(source, "SIG-KEY-TYPE", f"EC curve {key.curve.name} is not P-256/P-384/P-521")
    return algo()


def load_public_key(data: bytes, source: str) -> ec.EllipticCurvePublicKey:
    """Load exactly one ``PUBLIC KEY`` PEM block (text before it, as certtool writes, is skipped).

    Raises:
        UsageError: the file holds no / several PEM public keys, or a non-EC key.
    """
    blocks = _PUBLIC_PEM.findall(data)
    if len(blocks) != 1:
        raise UsageError(
            f"{source}: expected exactly one '-----BEGIN PUBLIC KEY-----' block, found {len(blocks)}",
            path=source,
            hint="pass the signer's public key in PEM (SubjectPublicKeyInfo) form, e.g. KEY.pub.pem from `secure-run keygen`",
        )
    try:
        key = serialization.load_pem_public_key(blocks[0])
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"{source}: not a usable PEM public key ({exc})", path=source) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UsageError(f"{source}: only EC (P-256/P-384/P-521) public keys are supported", path=source)
    return key


def public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """Re-serialized PEM SubjectPublicKeyInfo (the canonical text the hint is computed over)."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """OMS ``publicKey.hint`` and the lock's ``key_sha256``: hex SHA-256 of :func:`public_pem`."""
    return hashlib.sha256(public_pem(key)).hexdigest()


def same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    """Whether two EC public keys are the same key."""
    return a.curve.name == b.curve.name and a.public_numbers() == b.public_numbers()


def load_private_key(data: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM EC private key (PKCS#8 or SEC1).

    Raises:
        UsageError: unreadable, encrypted or non-EC key.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"{source}: encrypted private keys are not supported", path=source) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"{source}: not a usable PEM private key ({exc})", path=source) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{source}: only EC (P-256/P-384/P-521) private keys are supported", path=source)
    curve_hash(key, source)
    return key


def sign_ecdsa(key: ec.EllipticCurvePrivateKey, data: bytes, source: str) -> bytes:
    """DER-encoded ECDSA signature of ``data`` with the curve's hash."""
    return key.sign(data, ec.ECDSA(curve_hash(key, source)))


def verify_ecdsa(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, source: str) -> None:
    """Verify a DER ECDSA signature with the curve's hash.

    Raises:
        VerificationFailed: ``SIG-INVALID``.
    """
    try:
        key.verify(signature, data, ec.ECDSA(curve_hash(key, source)))
    except InvalidSignature:
        raise verification_failed(source, "SIG-INVALID", "the DSSE signature does not verify with the pinned key") from None
