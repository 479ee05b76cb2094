"""Signing with a key that never leaves a PKCS#11 token (HSM, smart card, SoftHSM2).

``secure-run sign DIR --pkcs11-uri URI`` signs with the EC private key named by an RFC 7512
URI, through ``python-pkcs11`` (optional dependency, extra ``pkcs11``)::

    pkcs11:token=ORG;object=model-signing?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin

Path attributes used to find the key: ``token`` (label), ``serial``, ``object`` (key label) and
``id`` (percent-encoded bytes); at least one of ``object``/``id``. Query attributes:
``module-path`` (the PKCS#11 library; default ``$SECURE_RUN_PKCS11_MODULE``), and the user PIN
from ``pin-value``, ``pin-source=file:PATH`` (read like every input file), or the ``pin``
callback (the CLI prompts on a terminal). The PIN is never printed: :attr:`Pkcs11Signer.source`
is the URI without its query.

Signing hashes the DSSE PAE on the host with the curve's hash (P-256/SHA-256, P-384/SHA-384,
P-521/SHA-512) and has the token sign the digest with plain ``CKM_ECDSA`` (SoftHSM2 2.6 lacks
``CKM_ECDSA_SHA256``); the raw ``r || s`` result becomes DER. The signature is then checked with
the token's public key before anything is written (see :func:`~secure_run.manifests.sign_model`),
so the bundle is exactly what a key-file signature would be and verifies with secure-run and with
``model_signing``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, unquote_to_bytes

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from secure_run.errors import EnvironmentProblem, UsageError

from ._io import InputFileProblem, read_input
from ._keys import Passphrase, curve_hash

if TYPE_CHECKING:
    import pkcs11

MODULE_ENV = "SECURE_RUN_PKCS11_MODULE"
_PATH_ATTRS = frozenset({"token", "serial", "object", "id", "manufacturer", "model", "type", "slot-id", "slot-description", "slot-manufacturer", "library-manufacturer", "library-description", "library-version"})
_QUERY_ATTRS = frozenset({"module-path", "module-name", "pin-value", "pin-source"})
_URI_HINT = "use pkcs11:token=LABEL;object=KEY-LABEL?module-path=/path/to/module.so&pin-source=file:PIN-FILE (RFC 7512)"


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI that select and unlock a signing key."""

    token: str | None
    serial: str | None
    object: str | None
    id: bytes | None
    module_path: str | None
    pin_value: str | None
    pin_source: str | None
    display: str


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse ``uri`` (path and query attributes, percent-decoded).

    Raises:
        UsageError: not a ``pkcs11:`` URI, an unknown or repeated attribute, or no key selector.
    """
    if not uri.startswith("pkcs11:"):
        raise UsageError(f"--pkcs11-uri must start with 'pkcs11:' (got {uri[:20]!r})", hint=_URI_HINT)
    path, _, query = uri[len("pkcs11:") :].partition("?")
    attrs: dict[str, str] = {}
    for part, allowed, sep in ((path, _PATH_ATTRS, ";"), (query, _QUERY_ATTRS, "&")):
        for item in filter(None, part.split(sep)):
            name, eq, value = item.partition("=")
            if not eq or name not in allowed or name in attrs:
                raise UsageError(f"PKCS#11 URI attribute {name!r} is unknown, repeated or has no value", hint=_URI_HINT)
            attrs[name] = value
    if "object" not in attrs and "id" not in attrs:
        raise UsageError("the PKCS#11 URI selects no key: give object=LABEL and/or id=%XX..", hint=_URI_HINT)
    if "pin-value" in attrs and "pin-source" in attrs:
        raise UsageError("the PKCS#11 URI has both pin-value and pin-source; give one", hint=_URI_HINT)

    def text(name: str) -> str | None:
        return unquote(attrs[name], errors="strict") if name in attrs else None

    return Pkcs11Uri(
        token=text("token"),
        serial=text("serial"),
        object=text("object"),
        id=unquote_to_bytes(attrs["id"]) if "id" in attrs else None,
        module_path=text("module-path"),
        pin_value=text("pin-value"),
        pin_source=text("pin-source"),
        display="pkcs11:" + path,
    )


def _pin(uri: Pkcs11Uri, pin: Passphrase | None) -> str:
    if uri.pin_value is not None:
        return uri.pin_value
    if uri.pin_source is not None:
        source = uri.pin_source.removeprefix("file:")
        try:
            return read_input(source, limit=4096).decode("utf-8").rstrip("\r\n")
        except (InputFileProblem, UnicodeDecodeError) as exc:
            why = exc.message if isinstance(exc, InputFileProblem) else "is not UTF-8"
            raise UsageError(f"PKCS#11 pin-source {source}: it {why}", path=source) from None
    if pin is None:
        raise UsageError("the PKCS#11 token needs a user PIN", hint="add pin-source=file:PIN-FILE to the URI, or run on a terminal to be prompted")
    return pin().decode("utf-8")


class Pkcs11Signer:
    """An open session on a token and the EC key pair the URI names (use as a context manager)."""

    def __init__(self, uri: str, pin: Passphrase | None = None) -> None:
        self.uri = parse_pkcs11_uri(uri)
        self._pin = pin
        self._session: Any = None
        self._private: Any = None
        self._public: ec.EllipticCurvePublicKey | None = None

    @property
    def source(self) -> str:
        """The URI without its query (no PIN), for messages."""
        return self.uri.display

    def __enter__(self) -> Pkcs11Signer:
        self.open()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        """Load the module, find the token, log in and find the key pair.

        Raises:
            EnvironmentProblem: python-pkcs11 or the module is missing, or the token fails.
            UsageError: no such token / key, several match, or the PIN is refused.
        """
        try:
            import pkcs11
            from pkcs11 import exceptions as px
        except ImportError:
            raise EnvironmentProblem(
                "PKCS#11 signing needs python-pkcs11", hint="pip install 'secure-run[pkcs11]' (python-pkcs11)"
            ) from None
        module = self.uri.module_path or os.environ.get(MODULE_ENV)
        if not module:
            raise UsageError(f"no PKCS#11 module: add module-path=... to the URI or set {MODULE_ENV}", hint=_URI_HINT)
        try:
            lib = pkcs11.lib(module)
        except (RuntimeError, OSError) as exc:
            raise EnvironmentProblem(f"cannot load the PKCS#11 module {module}: {exc}", path=module) from None
        try:
            token = lib.get_token(token_label=self.uri.token, token_serial=self.uri.serial.encode() if self.uri.serial else None)
            self._session = token.open(user_pin=_pin(self.uri, self._pin))
            self._private = self._find(pkcs11, pkcs11.ObjectClass.PRIVATE_KEY)
            public = self._find(pkcs11, pkcs11.ObjectClass.PUBLIC_KEY)
            self._public = _public_key(public, self.source)
        except (px.NoSuchToken, px.MultipleTokensReturned, px.NoSuchKey, px.MultipleObjectsReturned) as exc:
            self.close()
            what = type(exc).__name__
            raise UsageError(f"{self.source}: {what} (the URI must name exactly one token and one EC key pair)", hint=_URI_HINT) from None
        except (px.PinIncorrect, px.PinInvalid, px.PinLenRange, px.PinLocked, px.PinExpired) as exc:
            self.close()
            raise UsageError(f"{self.source}: the token refused the PIN ({type(exc).__name__})", hint="give the user PIN of that token") from None
        except px.PKCS11Error as exc:
            self.close()
            raise EnvironmentProblem(f"{self.source}: the token failed ({type(exc).__name__}: {exc})") from None

    def _find(self, pkcs11_mod: Any, object_class: pkcs11.ObjectClass) -> Any:
        return self._session.get_key(object_class=object_class, key_type=pkcs11_mod.KeyType.EC, label=self.uri.object, id=self.uri.id)

    def close(self) -> None:
        """Log out and close the session (idempotent)."""
        if self._session is not None:
            session, self._session = self._session, None
            try:
                session.close()
            except Exception:
                pass

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The token key pair's public key."""
        if self._public is None:
            raise UsageError("the PKCS#11 signer is not open")
        return self._public

    def sign(self, data: bytes) -> bytes:
        """Hash ``data`` with the curve's hash, have the token sign the digest (CKM_ECDSA), return DER."""
        from pkcs11 import Mechanism
        from pkcs11 import exceptions as px

        public = self.public_key()
        algorithm = curve_hash(public, self.source)
        digest = hashlib.new(algorithm.name, data).digest()
        try:
            raw = self._private.sign(digest, mechanism=Mechanism.ECDSA)
        except px.PKCS11Error as exc:
            raise EnvironmentProblem(f"{self.source}: the token could not sign ({type(exc).__name__}: {exc})") from None
        half = len(raw) // 2
        if len(raw) % 2 or half != (public.curve.key_size + 7) // 8:
            raise EnvironmentProblem(f"{self.source}: the token returned a {len(raw)}-byte ECDSA signature for {public.curve.name}")
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


def _public_key(public: Any, source: str) -> ec.EllipticCurvePublicKey:
    from pkcs11.util.ec import encode_ec_public_key

    try:
        key = serialization.load_der_public_key(encode_ec_public_key(public))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{source}: the token's public key cannot be read ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UsageError(f"{source}: the key is not an EC key")
    curve_hash(key, source)
    return key
