"""Keyless (Sigstore) verification, offline, against a pinned ``trusted_root.json``.

``sigstore`` is imported lazily (it is heavy and only this path needs it). Verification is
``Verifier(trusted_root=TrustedRoot.from_file(pinned)).verify_dsse(bundle, Identity(...))``:
no TUF refresh, no cache reads or writes, no network. Everything it needs (Fulcio certificate
with SCT, Rekor inclusion proof + checkpoint and/or SET, RFC 3161 timestamps) is in the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm

from secure_run.errors import UsageError

from ._io import InputFileProblem, read_input
from .findings import verification_failed


@dataclass(frozen=True)
class KeylessResult:
    """What the Sigstore verifier vouched for."""

    payload_type: str
    payload: bytes
    identity: str
    issuer: str


def verify_keyless(bundle_bytes: bytes, trusted_root: Path, identity: str, issuer: str, source: str) -> KeylessResult:
    """Verify a keyless DSSE bundle; return its payload (the caller parses the statement).

    Raises:
        UsageError: the trusted root cannot be read.
        VerificationFailed: rule ``SIGSTORE`` with sigstore-python's reason.
    """
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify import Verifier, policy
    from sigstore_models.trustroot import v1 as trustroot_v1

    try:
        # read like every input file (regular file, no link, size cap), then parse the bytes
        root = TrustedRoot(trustroot_v1.TrustedRoot.from_json(read_input(trusted_root, limit=16 << 20)))
    except InputFileProblem as exc:
        raise UsageError(f"{trusted_root.name}: cannot read the Sigstore trusted root: it {exc.message}", path=str(trusted_root)) from None
    except Exception as exc:  # sigstore raises several types for an unreadable root
        raise UsageError(
            f"{trusted_root.name}: cannot load the Sigstore trusted root ({exc})", path=str(trusted_root)
        ) from None
    try:
        bundle = Bundle.from_json(bundle_bytes)
    except Exception as exc:
        raise verification_failed(source, "SIGSTORE", f"not a valid Sigstore bundle: {exc}") from None
    verifier = Verifier(trusted_root=root)
    try:
        payload_type, payload = verifier.verify_dsse(bundle, policy.Identity(identity=identity, issuer=issuer))
    except SigstoreError as exc:
        raise verification_failed(source, "SIGSTORE", f"keyless verification failed: {exc}") from None
    except (ValueError, TypeError, KeyError, UnsupportedAlgorithm) as exc:
        # e.g. a leaf key of an unknown algorithm / curve, or a malformed certificate extension
        raise verification_failed(source, "SIGSTORE", f"keyless verification failed: {exc}") from None
    return KeylessResult(payload_type, payload, identity, issuer)
