"""Certificate method: chain validation to a pinned root, key usage, and the pinned identity.

Validation uses ``cryptography.x509.verification`` (no pyOpenSSL, no OS/certifi roots):

* the chain must lead from the bundle's leaf through the bundle's intermediates to one of the
  pinned roots (no partial-chain trust: an intermediate given as ``--cert-root`` is not a root);
* CA certificates follow the WebPKI CA profile (basicConstraints CA, keyCertSign, ...);
* the leaf must carry KU digitalSignature (``CERT-KU``) **and** EKU codeSigning (``CERT-EKU``);
  the reference accepts either one. Other leaf extensions are tolerated, including
  ``CA:TRUE`` (the upstream model-transparency fixture leaf has it);
* every certificate must be valid *now* (``CERT-EXPIRED``); there is no trusted timestamp for
  key/certificate bundles, so the reference's "valid at notBefore" rule is not followed;
* the identity must match (``CERT-IDENTITY``), see :func:`identity_problem`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import warnings

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID

from secure_run.errors import UsageError

from .findings import verification_failed


def load_roots(data: bytes, source: str) -> list[x509.Certificate]:
    """Load the pinned root certificate(s) from a PEM file.

    Raises:
        UsageError: no certificate in the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            roots = x509.load_pem_x509_certificates(data)
        for root in roots:
            parse_problem(root)
    except CERT_ERRORS as exc:
        raise UsageError(f"{source}: no usable PEM certificate could be read ({exc})", path=source) from None
    if not roots:
        raise UsageError(f"{source}: no PEM certificate found", path=source)
    return roots


#: What ``cryptography`` raises for a certificate it cannot decode or use.
CERT_ERRORS: tuple[type[Exception], ...] = (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


_CHAIN_ERRORS: tuple[type[Exception], ...] = (xv.VerificationError, *CERT_ERRORS)
_SELF_SIGNED_ERRORS: tuple[type[Exception], ...] = (TypeError, InvalidSignature, *CERT_ERRORS)


def parse_problem(cert: x509.Certificate) -> None:
    """Decode every lazily parsed part of ``cert`` once, so that later use cannot raise.

    ``cryptography`` parses names, extensions and the public key on first access; a duplicate
    extension, a malformed KeyUsage or an unknown key algorithm / curve then raises
    ``ValueError`` or ``UnsupportedAlgorithm`` deep inside the checks.

    Raises:
        One of :data:`CERT_ERRORS`: the certificate is not usable.
    """
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    _ = cert.not_valid_before_utc, cert.not_valid_after_utc
    for ext in cert.extensions:
        _ = ext.value
    cert.public_key()


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the DER certificate."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except _SELF_SIGNED_ERRORS:
        return False
    return True


def _leaf_usage(leaf: x509.Certificate, source: str) -> None:
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        has_ds = ku.digital_signature
    except x509.ExtensionNotFound:
        has_ds = False
    if not has_ds:
        raise verification_failed(source, "CERT-KU", "the signing certificate lacks key usage digitalSignature")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        has_cs = ExtendedKeyUsageOID.CODE_SIGNING in eku
    except x509.ExtensionNotFound:
        has_cs = False
    if not has_cs:
        raise verification_failed(source, "CERT-EKU", "the signing certificate lacks extended key usage codeSigning")


def _validity(certs: list[x509.Certificate], now: dt.datetime, source: str) -> None:
    for i, cert in enumerate(certs):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            which = "signing certificate" if i == 0 else f"chain certificate {i} ({cert.subject.rfc4514_string()})"
            raise verification_failed(
                source,
                "CERT-EXPIRED",
                f"the {which} is valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} .. "
                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not now ({now:%Y-%m-%dT%H:%M:%SZ})",
            )


def _ku_validator(policy: xv.Policy, cert: x509.Certificate, ext: x509.KeyUsage) -> None:
    if not ext.digital_signature:
        raise ValueError("leaf lacks digitalSignature")


def _eku_validator(policy: xv.Policy, cert: x509.Certificate, ext: x509.ExtendedKeyUsage) -> None:
    if ExtendedKeyUsageOID.CODE_SIGNING not in ext:
        raise ValueError("leaf lacks codeSigning")


def _sans(leaf: x509.Certificate) -> list[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    values: list[str] = []
    for kind in (x509.RFC822Name, x509.UniformResourceIdentifier, x509.DNSName):
        values.extend(str(v) for v in san.get_values_for_type(kind))
    return values


def identity_problem(leaf: x509.Certificate, identity: str) -> str | None:
    """Check the pinned identity against the leaf; return a reason on mismatch.

    Accepted forms of ``identity``:

    * ``sha256:<hex>`` pins the leaf certificate itself (SHA-256 of its DER), for leaves without a
      usable SAN such as the model-transparency fixtures;
    * ``email:<addr>``, ``uri:<uri>``, ``dns:<name>`` must equal a SAN entry of that type;
    * any other string must equal one SAN entry (email, URI or DNS) exactly.

    The subject CN is never used as an identity.
    """
    if identity.startswith("sha256:"):
        got = fingerprint(leaf)
        return None if got == identity[7:].lower() else f"leaf fingerprint is sha256:{got}"
    kinds: dict[str, type[x509.RFC822Name] | type[x509.UniformResourceIdentifier] | type[x509.DNSName]] = {
        "email:": x509.RFC822Name,
        "uri:": x509.UniformResourceIdentifier,
        "dns:": x509.DNSName,
    }
    sans = _sans(leaf)
    for prefix, kind in kinds.items():
        if identity.startswith(prefix):
            try:
                typed = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(kind)
            except x509.ExtensionNotFound:
                typed = []
            return None if identity[len(prefix):] in [str(v) for v in typed] else f"SAN entries are {sans or 'none'}"
    return None if identity in sans else f"SAN entries are {sans or 'none'}"


def verify_chain(
    chain_der: tuple[bytes, ...],
    roots: list[x509.Certificate],
    identity: str,
    source: str,
    *,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Validate the bundle's chain and identity; return the leaf certificate.

    Args:
        chain_der: DER certificates from the bundle, leaf first.
        roots: pinned trust anchors.
        identity: pinned identity (see :func:`identity_problem`).
        source: signature file name for messages.
        now: validation time (default: the current time).

    Raises:
        VerificationFailed: ``CERT-PARSE``, ``CERT-EXPIRED``, ``CERT-KU``, ``CERT-EKU``,
            ``CERT-CHAIN`` or ``CERT-IDENTITY``.
    """
    try:
        with warnings.catch_warnings():
            # e.g. the upstream fixture leaf's non-positive serial number (a deprecation warning)
            warnings.simplefilter("ignore")
            certs = [x509.load_der_x509_certificate(c) for c in chain_der]
        for cert in certs:
            parse_problem(cert)
    except CERT_ERRORS as exc:
        raise verification_failed(source, "CERT-PARSE", f"bad certificate in the bundle: {exc}") from None
    for anchor in roots:
        if not _self_signed(anchor):
            raise verification_failed(
                source,
                "CERT-CHAIN",
                f"pinned anchor {anchor.subject.rfc4514_string()!r} is not a self-signed root (partial chains are not trusted)",
            )
    leaf, intermediates = certs[0], certs[1:]
    if not isinstance(leaf.public_key(), ec.EllipticCurvePublicKey):
        raise verification_failed(source, "SIG-KEY-TYPE", "the signing certificate's key is not an EC key")
    when = now or dt.datetime.now(dt.UTC)
    _validity(certs, when, source)
    _leaf_usage(leaf, source)
    ee_policy = (
        xv.ExtensionPolicy.permit_all()
        .require_present(x509.KeyUsage, xv.Criticality.AGNOSTIC, _ku_validator)
        .require_present(x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, _eku_validator)
    )
    verifier = (
        xv.PolicyBuilder()
        .store(xv.Store(roots))
        .time(when)
        .max_chain_depth(len(intermediates) + 1)
        .extension_policies(ca_policy=xv.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except _CHAIN_ERRORS as exc:
        raise verification_failed(
            source, "CERT-CHAIN", f"the certificate chain does not lead to a pinned root: {exc}"
        ) from None
    problem = identity_problem(leaf, identity)
    if problem:
        raise verification_failed(source, "CERT-IDENTITY", f"signer is not {identity!r}: {problem}")
    return leaf
