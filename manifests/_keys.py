"""EC keys: loading PEM files, the OMS key hint, and ECDSA sign/verify with the curve's hash."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_run.errors import UsageError

from ._io import InputFileProblem, read_input
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


#: Supplies the passphrase of an encrypted key; called only when the key is encrypted.
Passphrase = Callable[[], bytes]

PASSPHRASE_HINT = "pass --key-passphrase-env VAR or --key-passphrase-file FILE, or run on a terminal to be prompted"


def load_private_key(data: bytes, source: str, passphrase: Passphrase | None = None) -> ec.EllipticCurvePrivateKey:
    """Load a PEM EC private key (PKCS#8, encrypted PKCS#8, or SEC1).

    Args:
        data: the PEM file.
        source: name for messages.
        passphrase: called once for an encrypted key (never for a plain one).

    Raises:
        UsageError: unreadable, non-EC key, encrypted without a passphrase, or a wrong passphrase.
    """
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data
    if encrypted and passphrase is None:
        raise UsageError(f"{source}: the private key is encrypted and no passphrase was given", path=source, hint=PASSPHRASE_HINT)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase() if encrypted and passphrase else None)
    except TypeError:
        raise UsageError(f"{source}: the private key is encrypted and no passphrase was given", path=source, hint=PASSPHRASE_HINT) from None
    except ValueError as exc:
        if encrypted:
            raise UsageError(f"{source}: cannot decrypt the private key (wrong passphrase?)", path=source, hint=PASSPHRASE_HINT) from None
        raise UsageError(f"{source}: not a usable PEM private key ({exc})", path=source) from None
    except UnsupportedAlgorithm as exc:
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


def passphrase_from(
    *, env: str | None = None, file: str | None = None, prompt: Callable[[], str] | None = None
) -> Passphrase | None:
    """Where a key passphrase comes from: an environment variable, a file, or a prompt (in that order).

    The value is read only when it is needed (the returned callable is called for an encrypted key
    only). A file's one trailing newline is dropped.

    Args:
        env: name of an environment variable holding the passphrase.
        file: a file holding it (read like every input file: regular, no link, <= 4 KiB).
        prompt: asks the user (the CLI passes one only when stdin is a terminal).

    Raises:
        UsageError: both ``env`` and ``file``; (when called) the variable is unset or empty, or the
            file is unreadable or empty.
    """
    if env and file:
        raise UsageError("give one of --key-passphrase-env and --key-passphrase-file")
    if env:
        name = env

        def from_env() -> bytes:
            value = os.environ.get(name, "")
            if not value:
                raise UsageError(f"environment variable {name} is not set or empty", hint="export the key passphrase in it")
            return value.encode("utf-8")

        return from_env
    if file:
        path = file

        def from_file() -> bytes:
            try:
                data = read_input(path, limit=4096)
            except InputFileProblem as exc:
                raise UsageError(f"passphrase file {path}: it {exc.message}", path=path) from None
            data = data[:-1] if data.endswith(b"\n") else data
            data = data[:-1] if data.endswith(b"\r") else data
            if not data:
                raise UsageError(f"passphrase file {path} is empty", path=path)
            return data

        return from_file
    if prompt is not None:
        ask = prompt
        return lambda: ask().encode("utf-8")
    return None
