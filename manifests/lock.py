"""Lock file of trusted models: name -> root digest + signer pin (anti-rollback, anti-substitution).

A signature proves *who* signed a folder, not *which version* is deployed: an older, validly
signed version can be swapped back. The lock pins, per model, the OMS root digest and the signer,
so a weight update needs a reviewed lock change. Schema (JSON, ``manifests/README.md``
"Lock file"):

.. code-block:: json

    {
      "schema": "secure-run/lock/v1",
      "models": {
        "demo-tiny": {
          "root_digest": "sha256:<64 hex>",
          "path": "../../model/demo/assets/demo-tiny",
          "signer": {"method": "key", "key_sha256": "<64 hex>", "public_key": "keys/demo.pub.pem"}
        }
      }
    }

``signer`` is one of ``{"method": "key", "key_sha256", "public_key"?}``,
``{"method": "certificate", "identity", "root", "root_sha256"}`` or
``{"method": "sigstore", "identity", "issuer", "trusted_root"?}``. Relative paths (``path``,
``public_key``, ``root``, ``trusted_root``) are relative to the folder holding the lock file.

    >>> lock = Lock.loads(b'{"schema": "secure-run/lock/v1", "models": {}}', base=Path("."))
    >>> entry = LockEntry("m", "sha256:" + "ab" * 32, SignerPin(method="key", key_sha256="cd" * 32))
    >>> lock.with_entry(entry).get("m").root_digest[:12]
    'sha256:ababa'
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from secure_run.errors import UsageError

from ._atomic import write_atomic
from ._io import InputFileProblem, read_input
from ._jsoncheck import JsonProblem, loads_strict
from .findings import Finding, VerificationFailed, verification_failed
from .trust import CertificateTrust, KeyTrust, SignerInfo, SigstoreTrust, Trust, pinned_sigstore_root

LOCK_SCHEMA = "secure-run/lock/v1"
#: Largest lock file read (a lock is a few hundred bytes per model).
MAX_LOCK_BYTES = 16 << 20
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_SIGNER_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # method: (required, optional)
    "key": (frozenset({"key_sha256"}), frozenset({"public_key"})),
    "certificate": (frozenset({"identity", "root", "root_sha256"}), frozenset()),
    "sigstore": (frozenset({"identity", "issuer"}), frozenset({"trusted_root"})),
}


def default_lock_path() -> Path:
    """The lock shipped in ``manifests/trusted/models.lock.json``."""
    return Path(str(resources.files("secure_run.manifests") / "trusted" / "models.lock.json"))


class LockFileError(UsageError):
    """The lock file itself is malformed (exit 2: a configuration problem, not a model refusal)."""


def _lock_error(source: str, message: str) -> LockFileError:
    return LockFileError(f"{source}: {message}", path=source, rule="LOCK-FILE", hint="see manifests/README.md, 'Lock file'")


@dataclass(frozen=True)
class SignerPin:
    """The pinned signer of a locked model (see the module docstring for the fields per method)."""

    method: Literal["key", "certificate", "sigstore"]
    key_sha256: str | None = None
    public_key: str | None = None
    identity: str | None = None
    root: str | None = None
    root_sha256: str | None = None
    issuer: str | None = None
    trusted_root: str | None = None

    def __post_init__(self) -> None:
        if self.method not in _SIGNER_FIELDS:
            raise _lock_error("signer", f"method {self.method!r} is not key, certificate or sigstore")
        required, optional = _SIGNER_FIELDS[self.method]
        present = {k for k, v in self.to_json().items() if k != "method"}
        if not required <= present or present - required - optional:
            raise _lock_error(
                "signer",
                f"a {self.method} signer needs {sorted(required)} (optional {sorted(optional)}), got {sorted(present)}",
            )
        for name in ("key_sha256", "root_sha256"):
            value = getattr(self, name)
            if value is not None and not _HEX64.match(value):
                raise _lock_error("signer", f"{name} must be 64 lowercase hex digits")

    def to_json(self) -> dict[str, str]:
        """JSON form without empty fields."""
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, doc: Any, source: str) -> SignerPin:
        """Parse the ``signer`` object of a lock entry."""
        if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
            raise _lock_error(source, "signer must be an object of strings")
        allowed = {"method", "key_sha256", "public_key", "identity", "root", "root_sha256", "issuer", "trusted_root"}
        if set(doc) - allowed:
            raise _lock_error(source, f"signer has unknown fields {sorted(set(doc) - allowed)}")
        if "method" not in doc:
            raise _lock_error(source, "signer has no 'method' (key, certificate or sigstore)")
        return cls(**doc)

    def mismatch(self, signer: SignerInfo) -> str | None:
        """Why ``signer`` (proven by verification) is not this pin, or None when it is."""
        if signer.method != self.method:
            return f"signed with method {signer.method}, the lock pins {self.method}"
        if self.method == "key" and signer.key_sha256 != self.key_sha256:
            return f"signing key sha256 {signer.key_sha256}, the lock pins {self.key_sha256}"
        if self.method == "certificate":
            if signer.identity != self.identity:
                return f"certificate identity {signer.identity!r}, the lock pins {self.identity!r}"
            if signer.root_sha256 != self.root_sha256:
                return f"certificate root sha256 {signer.root_sha256}, the lock pins {self.root_sha256}"
        if self.method == "sigstore" and (signer.identity, signer.issuer) != (self.identity, self.issuer):
            return f"keyless identity {signer.identity!r} / {signer.issuer!r}, the lock pins {self.identity!r} / {self.issuer!r}"
        return None

    def trust(self, base: Path) -> Trust:
        """Load the pinned trust material this pin names (paths relative to ``base``).

        Raises:
            LockFileError: material missing, or its fingerprint differs from the pin.
        """
        if self.method == "key":
            if self.public_key is None:
                raise _lock_error("signer", "a key signer needs 'public_key' to verify without --public-key")
            key = KeyTrust.from_file(base / self.public_key)
            if key.fingerprint != self.key_sha256:
                raise _lock_error(self.public_key, f"key sha256 is {key.fingerprint}, the lock pins {self.key_sha256}")
            return key
        if self.method == "certificate":
            assert self.root is not None and self.identity is not None
            cert = CertificateTrust.from_file(base / self.root, self.identity)
            if cert.roots_sha256 != self.root_sha256:
                raise _lock_error(self.root, f"root sha256 is {cert.roots_sha256}, the lock pins {self.root_sha256}")
            return cert
        assert self.identity is not None and self.issuer is not None
        tr = base / self.trusted_root if self.trusted_root else pinned_sigstore_root()
        return SigstoreTrust(self.identity, self.issuer, tr)


@dataclass(frozen=True)
class LockEntry:
    """One locked model.

    Attributes:
        name: model name (``[A-Za-z0-9][A-Za-z0-9._-]*``, <= 128 chars).
        root_digest: ``sha256:<hex>`` OMS root digest of the reviewed, signed version.
        signer: the pinned signer.
        path: optional folder of the model, relative to the lock file's folder (for ``ci-check``).
        note: optional free text (e.g. who reviewed it).
        policy: optional policy of the model for ``ci-check``: ``builtin:NAME`` or a policy file
            relative to the lock file's folder.
    """

    name: str
    root_digest: str
    signer: SignerPin
    path: str | None = None
    note: str | None = None
    policy: str | None = None

    def __post_init__(self) -> None:
        if not _MODEL_NAME.match(self.name):
            raise _lock_error(self.name, "model names are [A-Za-z0-9][A-Za-z0-9._-]*, at most 128 characters")
        if not self.root_digest.startswith("sha256:") or not _HEX64.match(self.root_digest[7:]):
            raise _lock_error(self.name, f"root_digest {self.root_digest!r} must be 'sha256:' + 64 lowercase hex")

    @property
    def digest_hex(self) -> str:
        """The root digest without the ``sha256:`` prefix."""
        return self.root_digest[7:]

    def to_json(self) -> dict[str, Any]:
        """JSON form (as stored under ``models.<name>``)."""
        doc: dict[str, Any] = {"root_digest": self.root_digest}
        if self.path is not None:
            doc["path"] = self.path
        doc["signer"] = self.signer.to_json()
        if self.note is not None:
            doc["note"] = self.note
        if self.policy is not None:
            doc["policy"] = self.policy
        return doc

    def check(self, root_digest_hex: str, signer: SignerInfo, source: str) -> None:
        """Refuse a verified folder that is not the pinned version or not from the pinned signer.

        Raises:
            VerificationFailed: ``LOCK-DIGEST`` or ``LOCK-SIGNER``.
        """
        if root_digest_hex != self.digest_hex:
            raise verification_failed(
                source,
                "LOCK-DIGEST",
                f"model {self.name!r} is signed with root digest sha256:{root_digest_hex}, the lock pins {self.root_digest}",
            )
        problem = self.signer.mismatch(signer)
        if problem:
            raise verification_failed(source, "LOCK-SIGNER", f"model {self.name!r}: {problem}")


@dataclass(frozen=True)
class Lock:
    """A parsed lock file.

    Attributes:
        entries: name -> entry.
        base: folder that relative paths in the lock are resolved against.
        source: where it was read from (for messages).
    """

    entries: Mapping[str, LockEntry] = field(default_factory=dict)
    base: Path = Path(".")
    source: str = "lock"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Lock:
        """Read and validate a lock file.

        Raises:
            LockFileError: unreadable or malformed.
        """
        p = Path(path)
        try:
            data = read_input(p, limit=MAX_LOCK_BYTES)
        except InputFileProblem as exc:
            raise _lock_error(str(p), f"cannot read the lock file: it {exc.message}") from None
        return cls.loads(data, base=p.parent, source=str(p))

    @classmethod
    def loads(cls, data: bytes, *, base: Path, source: str = "lock") -> Lock:
        """Parse lock-file bytes (see the module docstring for the schema)."""
        try:
            doc = loads_strict(data, allow_infinity=False)
        except JsonProblem as exc:
            raise _lock_error(source, exc.message) from None
        if not isinstance(doc, dict) or doc.get("schema") != LOCK_SCHEMA or not isinstance(doc.get("models"), dict):
            raise _lock_error(source, f"expected {{'schema': {LOCK_SCHEMA!r}, 'models': {{...}}}}")
        if set(doc) - {"schema", "models", "comment"}:
            raise _lock_error(source, f"unknown top-level fields {sorted(set(doc) - {'schema', 'models', 'comment'})}")
        entries: dict[str, LockEntry] = {}
        for name, item in doc["models"].items():
            if not isinstance(item, dict) or set(item) - {"root_digest", "path", "signer", "note", "policy"}:
                raise _lock_error(
                    source, f"models.{name} must be an object with root_digest, signer, path?, note?, policy?"
                )
            for key in ("root_digest", "path", "note", "policy"):
                if key in item and not isinstance(item[key], str):
                    raise _lock_error(source, f"models.{name}.{key} must be a string")
            if "root_digest" not in item or "signer" not in item:
                raise _lock_error(source, f"models.{name} needs root_digest and signer")
            signer = SignerPin.from_json(item["signer"], f"{source}: models.{name}.signer")
            entries[name] = LockEntry(
                name, item["root_digest"], signer, item.get("path"), item.get("note"), item.get("policy")
            )
        return cls(entries, base, source)

    def dumps(self) -> bytes:
        """Serialize (names sorted, 2-space indent, trailing newline)."""
        doc = {"schema": LOCK_SCHEMA, "models": {n: self.entries[n].to_json() for n in sorted(self.entries)}}
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary file in the same folder, then rename)."""
        write_atomic(path, self.dumps(), action="write the lock file")  # the one atomic writer (manifests/_atomic.py)

    def with_entry(self, entry: LockEntry) -> Lock:
        """A new lock with ``entry`` added or replaced."""
        return Lock({**self.entries, entry.name: entry}, self.base, self.source)

    def get(self, name: str) -> LockEntry | None:
        """The entry called ``name``, or None."""
        return self.entries.get(name)

    def model_path(self, entry: LockEntry) -> Path | None:
        """The entry's model folder resolved against the lock's folder (None if not recorded)."""
        return None if entry.path is None else self.base / entry.path

    def find(self, root: str | os.PathLike[str], subject_name: str) -> LockEntry | None:
        """The entry for a model folder: the one whose ``path`` is ``root``, else the one named
        like the signed subject name, else None."""
        target = Path(root).resolve()
        for entry in self.entries.values():
            p = self.model_path(entry)
            if p is not None and p.resolve() == target:
                return entry
        return self.entries.get(subject_name)


def pin_model(
    lock_path: str | os.PathLike[str],
    name: str,
    *,
    root_digest: str,
    signer: SignerInfo,
    public_key: str | None = None,
    root: str | None = None,
    trusted_root: str | None = None,
    path: str | None = None,
    note: str | None = None,
    policy: str | None = None,
) -> LockEntry:
    """Add or update the entry ``name`` in the lock file at ``lock_path`` (created if missing).

    Typical use, after a successful :func:`secure_run.manifests.verify_model` of a reviewed folder::

        pin_model(lock, "demo-tiny", root_digest=result.root_digest, signer=result.signer,
                  public_key="keys/demo.pub.pem", path="../../model/demo/assets/demo-tiny")

    Args:
        lock_path: the lock file.
        name: model name.
        root_digest: hex root digest (with or without ``sha256:``).
        signer: the verified signer (:attr:`VerificationResult.signer`).
        public_key: key method: PEM path relative to the lock folder (lets verify run from the lock alone).
        root: certificate method: roots PEM path relative to the lock folder (required).
        trusted_root: sigstore method: optional trusted_root.json path relative to the lock folder.
        path: optional model folder relative to the lock folder.
        note: optional free text.
        policy: optional ``builtin:NAME`` or policy file relative to the lock folder (``ci-check``).

    Returns:
        The entry written.
    """
    p = Path(lock_path)
    digest = root_digest if root_digest.startswith("sha256:") else "sha256:" + root_digest
    if signer.method == "key":
        pin = SignerPin("key", key_sha256=signer.key_sha256, public_key=public_key)
    elif signer.method == "certificate":
        pin = SignerPin("certificate", identity=signer.identity, root=root, root_sha256=signer.root_sha256)
    else:
        pin = SignerPin("sigstore", identity=signer.identity, issuer=signer.issuer, trusted_root=trusted_root)
    entry = LockEntry(name, digest, pin, path, note, policy)
    with _folder_lock(p):  # read-modify-write under one lock: concurrent adds never lose an entry
        lock = Lock.load(p) if p.exists() else Lock({}, p.parent, str(p))
        lock.with_entry(entry).save(p)
    return entry


@contextlib.contextmanager
def _folder_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the lock file's folder (the file itself is replaced by rename, so
    it cannot carry the lock), held for a whole read-modify-write of the lock file.

    Raises:
        LockFileError: the folder cannot be opened.
    """
    folder = lock_path.parent if str(lock_path.parent) else Path(".")
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _lock_error(str(lock_path), f"cannot open its folder to lock it: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_refusal(source: str, name: str, lock: Lock) -> VerificationFailed:
    """``LOCK-UNKNOWN``: the verified model has no entry in ``lock``."""
    known = ", ".join(sorted(lock.entries)) or "none"
    finding = Finding(source, "LOCK-UNKNOWN", f"model {name!r} is not in the lock {lock.source} (locked: {known})")
    return VerificationFailed(f"{finding.message} [LOCK-UNKNOWN]", [finding], path=source)
