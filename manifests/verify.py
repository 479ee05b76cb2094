"""Verify a model folder against its OMS v1.0 signature, pinned trust and (optionally) the lock.

    >>> import pathlib, tempfile
    >>> from secure_run.manifests.signing import generate_key, sign_model
    >>> from secure_run.manifests.trust import KeyTrust
    >>> tmp = pathlib.Path(tempfile.mkdtemp()); keys = generate_key(tmp / "k.pem")
    >>> model = tmp / "m"; model.mkdir(); _ = (model / "config.json").write_text("{}")
    >>> _ = sign_model(model, keys.private)
    >>> result = verify_model(model, KeyTrust.from_file(keys.public))
    >>> [f.name for f in result.files], result.signer.method
    (['config.json'], 'key')

The checklist (stricter than the reference implementation, spec/signing.md section 3); each
step is labelled in :func:`verify_model`:

1. inventory the folder without following links; refuse every unsafe or unknown file (all
   findings together);
2. read and parse the bundle (media type, one DSSE signature, payload type);
3. verify the signature with the pinned trust (key + hint / certificate chain + identity /
   Sigstore keyless against the pinned trusted root);
4. parse the statement (predicate type, files + sha256 profile, canonical unique names, root
   digest recomputed in document order);
5. compare with the lock (root digest and signer), when a lock is given;
6. exact set equality between signed names and the folder (only the signature file and top-level
   ``.gitattributes`` / ``.gitignore`` may be unsigned; signer-chosen ignore paths are not
   honoured);
7. hash every signed file in parallel (same inode as inventoried) and compare.

The folder is opened once as a directory descriptor (``O_DIRECTORY | O_NOFOLLOW``) before the
inventory; every file is hashed relative to it without following links, and the result carries it
as :attr:`VerificationResult.folder` (a :class:`~secure_run.manifests.folder.VerifiedFolder`): the
only way the rest of the program reads the folder (digest + full identity per file, identity
re-checked around every read, small files hashed again).

Nothing in the folder is written, moved or deleted.
"""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from secure_run.errors import UsageError

from ._bundle import IGNORE_PATHS, Bundle, Statement, parse_bundle, parse_statement
from ._keys import key_fingerprint, load_public_key, same_key, verify_ecdsa
from ._names import sort_key
from ._sigstore import verify_keyless
from ._x509 import fingerprint, load_roots, verify_chain
from .findings import Finding, VerificationFailed, verification_failed
from .folder import FolderError, PinnedFile, VerifiedFolder
from .hashing import FileIdentity, ProgressSink, hash_files
from .inventory import DEFAULT_RULES, Inventory, InventoryRules, take_inventory
from .lock import Lock, LockEntry, lock_refusal
from .sealed import SealedFolder, check_memory
from .tensors import SafetensorsHeader
from .trust import CertificateTrust, KeyTrust, SignerInfo, SigstoreTrust, Trust, read_trust_file


@dataclass(frozen=True)
class VerifiedFile:
    """A signed file whose content matched: name, size, digest, and the identity that was hashed."""

    name: str
    size: int
    sha256: str
    identity: FileIdentity


@dataclass(frozen=True)
class VerificationResult:
    """What verification proved.

    Attributes:
        root: the model folder.
        signature: the signature file used.
        subject_name: the signed subject name (folder name at signing time).
        root_digest: hex OMS root digest.
        signer: who signed (as proven).
        files: verified files in manifest order, with their :class:`FileIdentity`.
        headers: validated safetensors headers by relative name (the loader may reuse them).
        total_bytes: bytes hashed.
        hash_seconds: wall time of the hashing step.
        lock_name: the lock entry that matched, if a lock was used.
        folder: the open verified folder (directory descriptor + digest and identity of every
            file); everything after the gate reads through it. Close it (or the result) when done.
    """

    root: Path
    signature: Path
    subject_name: str
    root_digest: str
    signer: SignerInfo
    files: tuple[VerifiedFile, ...]
    headers: Mapping[str, SafetensorsHeader] = field(default_factory=dict)
    total_bytes: int = 0
    hash_seconds: float = 0.0
    lock_name: str | None = None
    folder: VerifiedFolder | None = None
    #: with ``verify_model(..., seal=True)``: the sealed copies whose bytes were hashed (what a worker gets)
    sealed: SealedFolder | None = None

    @property
    def verified(self) -> VerifiedFolder:
        """The open :class:`VerifiedFolder` (always set by :func:`verify_model`)."""
        if self.folder is None:
            raise ValueError("this result carries no verified folder")
        return self.folder

    def read_bytes(self, name: str) -> bytes:
        """A small verified file's bytes, proved equal to the verified digest (see :class:`VerifiedFolder`)."""
        return self.verified.read_bytes(name)

    def digests(self) -> dict[str, str]:
        """Relative name -> verified sha256 of every file."""
        return {f.name: f.sha256 for f in self.files}

    def close(self) -> None:
        """Close the verified folder's directory descriptor and release the sealed copies."""
        if self.folder is not None:
            self.folder.close()
        if self.sealed is not None:
            self.sealed.close()

    def __enter__(self) -> VerificationResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def identities(self) -> dict[str, FileIdentity]:
        """Relative name -> identity of every verified file (for the worker's re-check)."""
        return {f.name: f.identity for f in self.files}

    def recheck(self) -> None:
        """Re-check every verified file through the folder descriptor (no link followed).

        Raises:
            FolderError: ``folder.changed`` / ``folder.open`` when a file is not the verified version.
        """
        self.verified.recheck()

    def to_json(self) -> dict[str, Any]:
        """The ``model``/``signer``/``files``/``lock`` part of ``secure-run verify --json``."""
        seconds = self.hash_seconds
        return {
            "model": {"path": str(self.root), "subject_name": self.subject_name, "root_digest": "sha256:" + self.root_digest},
            "signature": str(self.signature),
            "signer": self.signer.to_json(),
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
            "bytes": self.total_bytes,
            "hash_seconds": round(seconds, 3),
            "throughput_gbps": round(self.total_bytes / seconds / 1e9, 3) if seconds > 0 else None,
            "lock": None if self.lock_name is None else {"name": self.lock_name, "root_digest": "sha256:" + self.root_digest},
        }


def read_signature(path: Path, label: str) -> bytes:
    """Read the signature file without following a link (missing -> ``SIG-MISSING``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise verification_failed(label, "SIG-MISSING", f"no signature file {label}; the model is unsigned") from None
    except OSError as exc:
        if os.path.islink(path):
            raise verification_failed(label, "OMS-JSON", "the signature file is a symbolic link") from None
        raise UsageError(f"{label}: cannot read the signature ({exc.strerror})", path=label) from None
    with io.FileIO(fd, "rb", closefd=True) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise verification_failed(label, "OMS-JSON", "the signature is not a regular file")
        return f.read((64 << 20) + 1)


def _verify_key(bundle: Bundle, trust: KeyTrust) -> SignerInfo:
    pinned = key_fingerprint(trust.key)
    if bundle.key_hint is not None and bundle.key_hint != pinned:
        raise verification_failed(
            bundle.source,
            "SIG-KEY-HINT",
            f"the bundle was made with key sha256:{bundle.key_hint}, the pinned key is sha256:{pinned}",
        )
    if bundle.key_raw is not None:
        try:
            embedded = load_public_key(bundle.key_raw, bundle.source)
        except UsageError:
            embedded = None
        if embedded is None or not same_key(embedded, trust.key):
            raise verification_failed(bundle.source, "SIG-KEY-HINT", "the bundle's publicKey.rawBytes is not the pinned key")
    verify_ecdsa(trust.key, bundle.signature, bundle.pae(), bundle.source)
    return SignerInfo("key", key_sha256=pinned)


def _verify_certificate(bundle: Bundle, trust: CertificateTrust) -> SignerInfo:
    roots = load_roots(trust.roots_pem, trust.source)
    leaf = verify_chain(bundle.chain, roots, trust.identity, bundle.source)
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):  # pragma: no cover - verify_chain refuses these
        raise verification_failed(bundle.source, "SIG-KEY-TYPE", "the signing certificate's key is not an EC key")
    verify_ecdsa(key, bundle.signature, bundle.pae(), bundle.source)
    return SignerInfo(
        "certificate",
        key_sha256=key_fingerprint(key),
        identity=trust.identity,
        root_sha256=trust.roots_sha256,
        leaf_sha256=fingerprint(leaf),
    )


def verify_signature(bundle: Bundle, trust: Trust) -> tuple[bytes, SignerInfo]:
    """Step 3: verify the bundle's signature with the pinned trust; return (payload, signer).

    Raises:
        VerificationFailed: ``OMS-METHOD``, ``SIG-*``, ``CERT-*`` or ``SIGSTORE``.
    """
    if bundle.method != trust.method:
        raise verification_failed(
            bundle.source, "OMS-METHOD", f"the folder was signed with the {bundle.method} method, verification asked for {trust.method}"
        )
    if isinstance(trust, KeyTrust):
        return bundle.payload, _verify_key(bundle, trust)
    if isinstance(trust, CertificateTrust):
        return bundle.payload, _verify_certificate(bundle, trust)
    keyless = verify_keyless(bundle.raw, trust.trusted_root, trust.identity, trust.issuer, bundle.source)
    if keyless.payload != bundle.payload:  # sigstore verified exactly the envelope we parsed
        raise verification_failed(bundle.source, "SIGSTORE", "the verified payload differs from the parsed envelope")
    return keyless.payload, SignerInfo("sigstore", identity=trust.identity, issuer=trust.issuer)


def _set_equality(inv: Inventory, statement: Statement, sig_name: str | None) -> None:
    signed = {r.name for r in statement.resources}
    unsigned_ok = {f.name for f in inv.files if f.ignorable}
    present = {f.name for f in inv.files if f.name != sig_name}
    extra = sorted(present - signed - unsigned_ok, key=sort_key)
    missing = sorted(signed - present, key=sort_key)
    if not extra and not missing:
        return
    honoured = set(IGNORE_PATHS)
    findings: list[Finding] = []
    for name in extra:
        why = "not covered by the signature"
        if name in statement.ignore_paths and name not in honoured:
            why += " (the signer's ignore_paths lists it, but secure-run honours only its fixed ignore list)"
        findings.append(Finding(name, "SET-EXTRA", why))
    findings.extend(Finding(name, "SET-MISSING", "signed but missing from the folder") for name in missing)
    parts = [f"{len(extra)} unsigned file(s)" if extra else "", f"{len(missing)} missing file(s)" if missing else ""]
    raise VerificationFailed(
        "folder does not match the signed manifest: " + ", ".join(p for p in parts if p),
        findings,
        path=str(inv.root),
        extra={"extra": extra, "missing": missing, "mismatched": []},
    )


def _compare_digests(inv: Inventory, statement: Statement, workers: int | None, progress: ProgressSink | None,
                     dirfd: int, seal: bool) -> tuple[list[VerifiedFile], float, SealedFolder | None]:
    names = [r.name for r in statement.resources]
    expected = {n: e.identity for n in names if (e := inv.file(n)) is not None}
    if seal:
        check_memory(sum(i.size for i in expected.values()))
    start = time.perf_counter()
    digests = hash_files(inv.root, names, expected=expected, workers=workers, progress=progress, dirfd=dirfd, seal=seal)
    seconds = time.perf_counter() - start
    sealed = SealedFolder.from_digests(digests.values(), root=inv.root) if seal else None
    mismatched = [r.name for r in statement.resources if digests[r.name].sha256 != r.digest]
    if mismatched:
        if sealed is not None:
            sealed.close()
        findings = [
            Finding(r.name, "DIGEST-MISMATCH", f"sha256 {digests[r.name].sha256}, signed {r.digest}")
            for r in statement.resources
            if r.name in mismatched
        ]
        raise VerificationFailed(
            f"{len(mismatched)} file(s) differ from the signed content",
            findings,
            path=str(inv.root),
            extra={"extra": [], "missing": [], "mismatched": mismatched},
        )
    files = [VerifiedFile(n, digests[n].identity.size, digests[n].sha256, digests[n].identity) for n in names]
    return files, seconds, sealed


def _sig_name(root: Path, sig_path: Path) -> str | None:
    try:
        rel = sig_path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return rel.as_posix()


def verify_model(
    root: str | os.PathLike[str],
    trust: Trust | None = None,
    *,
    signature: str | os.PathLike[str] | None = None,
    lock: Lock | LockEntry | None = None,
    rules: InventoryRules = DEFAULT_RULES,
    workers: int | None = None,
    progress: ProgressSink | None = None,
    seal: bool = False,
) -> VerificationResult:
    """Verify ``root`` (see the module docstring for the checklist).

    Args:
        root: the model folder.
        trust: pinned trust material. May be None when ``lock`` provides it (the entry's signer
            pin names the public key / root / trusted root).
        signature: the bundle (default ``root/model.sig``).
        lock: a :class:`Lock` (the entry is found by path, then by signed subject name -- which
            proves only that the folder is *one of* the locked models) or the one
            :class:`LockEntry` the caller expects (then ``trust`` is required, e.g.
            ``entry.signer.trust(lock.base)``); the verified root digest and signer must equal the pin.
        rules: inventory rules (tests only).
        workers: hashing threads (default min(files, usable CPUs)).
        progress: optional hashing progress sink.
        seal: read every file once into a sealed memory copy and hash the copy
            (:mod:`~secure_run.manifests.sealed`); the result's ``sealed`` folder is what a sandboxed
            worker is handed (the runner's gate; ``secure-run verify`` alone does not seal).

    Returns:
        :class:`VerificationResult`.

    Raises:
        FindingsError: the inventory refused the folder (exit 1).
        VerificationFailed: signature, manifest, lock or digest check failed (exit 1).
        UsageError: unreadable trust material or bad arguments (exit 2).
    """
    # 0. the folder, opened once: what is inventoried and hashed is what is handed on.
    try:
        opened = VerifiedFolder.open(root, ())
    except FolderError:
        opened = None  # the inventory names the problem (INV-ROOT: missing, a link, not a folder)
    try:
        return _verify_open(root, opened, trust, signature=signature, lock=lock, rules=rules, workers=workers,
                            progress=progress, seal=seal)
    except BaseException:
        if opened is not None:
            opened.close()
        raise


def _verify_open(
    root: str | os.PathLike[str],
    opened: VerifiedFolder | None,
    trust: Trust | None,
    *,
    signature: str | os.PathLike[str] | None,
    lock: Lock | LockEntry | None,
    rules: InventoryRules,
    workers: int | None,
    progress: ProgressSink | None,
    seal: bool,
) -> VerificationResult:
    # 1. inventory: every file, no links followed, all findings at once.
    inv = take_inventory(root, rules)
    inv.raise_for_findings()
    base = inv.root
    if opened is None:  # pragma: no cover - the inventory refuses what cannot be opened
        raise verification_failed(str(base), "FILE-CHANGED", "the model folder cannot be opened")
    _same_folder(opened, str(base))

    # 2. the bundle.
    sig_path = Path(signature) if signature is not None else base / "model.sig"
    sig_label = sig_path.name if signature is None else str(sig_path)
    bundle = parse_bundle(read_signature(sig_path, sig_label), sig_label)

    entry: LockEntry | None = lock if isinstance(lock, LockEntry) else None
    if trust is None:
        if lock is None:
            raise UsageError(
                "no trust given: pass --public-key, --cert-root + --identity, --sigstore, or --lock",
                hint="verification needs pinned trust material",
            )
        if not isinstance(lock, Lock):
            raise UsageError("pass the whole Lock (its folder resolves the pinned files) or explicit trust with a LockEntry")
        # The unverified subject name only selects the pin; the entry is looked up again from the
        # verified statement in step 5 (same payload bytes, so the same entry).
        entry = lock.find(base, _unverified_subject(bundle))
        if entry is None:
            raise lock_refusal(str(base), _unverified_subject(bundle), lock)
        trust = entry.signer.trust(lock.base)

    # 3. signature with the pinned trust.
    payload, signer = verify_signature(bundle, trust)

    # 4. the statement (only now trusted).
    statement = parse_statement(payload, sig_label)

    # 5. lock: same version (root digest) and same signer as pinned.
    if isinstance(lock, Lock):
        entry = lock.find(base, statement.subject_name)
        if entry is None:
            raise lock_refusal(str(base), statement.subject_name, lock)
    if entry is not None:
        entry.check(statement.root_digest, signer, str(base))

    # 6. exact set equality.
    _set_equality(inv, statement, _sig_name(base, sig_path))

    # 7. hash and compare (relative to the descriptor); the path must still name that folder.
    files, seconds, sealed = _compare_digests(inv, statement, workers, progress, opened.dirfd, seal)
    try:
        _same_folder(opened, str(base))
    except BaseException:
        if sealed is not None:
            sealed.close()
        raise
    folder = opened.with_pins((PinnedFile(f.name, f.sha256, f.identity) for f in files), root=base)
    return VerificationResult(
        root=base,
        signature=sig_path,
        subject_name=statement.subject_name,
        root_digest=statement.root_digest,
        signer=signer,
        files=tuple(files),
        headers={f.name: inv.headers[f.name] for f in files if f.name in inv.headers},
        total_bytes=sum(f.size for f in files),
        hash_seconds=seconds,
        lock_name=entry.name if entry is not None else None,
        folder=folder,
        sealed=sealed,
    )


def _same_folder(opened: VerifiedFolder, label: str) -> None:
    try:
        opened.check_root_path()
    except FolderError:
        raise verification_failed(label, "FILE-CHANGED", "the model folder was replaced while it was verified") from None


def _unverified_subject(bundle: Bundle) -> str:
    try:
        return parse_statement(bundle.payload, bundle.source).subject_name
    except VerificationFailed:
        return ""


def load_trust(
    *,
    public_key: str | None = None,
    cert_root: str | None = None,
    identity: str | None = None,
    sigstore: bool = False,
    issuer: str | None = None,
    trusted_root: str | None = None,
) -> Trust | None:
    """Build the trust object from CLI-style options (exactly one method, or None).

    Raises:
        UsageError: conflicting or incomplete options.
    """
    chosen = [name for name, on in (("--public-key", public_key), ("--cert-root", cert_root), ("--sigstore", sigstore)) if on]
    if len(chosen) > 1:
        raise UsageError(f"choose one of --public-key, --cert-root, --sigstore (got {', '.join(chosen)})")
    if trusted_root and not sigstore:
        raise UsageError("--trusted-root only applies with --sigstore")
    if issuer and not sigstore:
        raise UsageError("--issuer only applies with --sigstore")
    if identity and not (cert_root or sigstore):
        raise UsageError("--identity needs --cert-root or --sigstore")
    if public_key:
        return KeyTrust.from_file(public_key)
    if cert_root:
        if not identity:
            raise UsageError("--cert-root needs --identity", hint="pin the signer: --identity EMAIL|URI|sha256:LEAF-FINGERPRINT")
        return CertificateTrust(read_trust_file(cert_root, "root certificate"), identity, cert_root)
    if sigstore:
        if not identity or not issuer:
            raise UsageError("--sigstore needs --identity and --issuer")
        if trusted_root:
            read_trust_file(trusted_root, "Sigstore trusted root", limit=16 << 20)
            return SigstoreTrust(identity, issuer, Path(trusted_root))
        return SigstoreTrust(identity, issuer)
    return None
