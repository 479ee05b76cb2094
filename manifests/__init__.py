"""Model-folder inventory, strict safetensors checks, hashing, OMS v1.0 signed manifests, lock file.

    >>> import pathlib, tempfile
    >>> from secure_run import manifests
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> keys = manifests.generate_key(tmp / "org.pem")
    >>> model = tmp / "tiny"; model.mkdir(); _ = (model / "config.json").write_text('{"model_type": "demo"}')
    >>> signed = manifests.sign_model(model, keys.private)
    >>> result = manifests.verify_model(model, manifests.KeyTrust.from_file(keys.public))
    >>> result.root_digest == signed.root_digest, [f.name for f in result.files]
    (True, ['config.json'])

Public API (everything else is internal):

* ``take_inventory(root, rules=DEFAULT_RULES) -> Inventory`` -- walk without following links,
  classify and sniff every file, collect all :class:`Finding` s (``inventory.raise_for_findings()``).
* ``read_safetensors_header(path, name=None) -> SafetensorsHeader`` and
  ``parse_safetensors_header(fileobj, file_size, name) -> SafetensorsHeader`` -- the strict H1-H14
  check. **The model loader calls one of these before reading any tensor** and reads each tensor
  from ``header.tensors[name].start`` for ``.nbytes`` bytes (``TensorInfo``: ``name, dtype, shape,
  begin, end, start, nbytes, numel``). ``check_shard_index(index, headers)`` cross-checks
  ``model.safetensors.index.json`` (parse it with ``parse_shard_index(name, data)``).
* ``hash_files(root, names, expected=..., workers=..., progress=...) -> {name: FileDigest}`` and
  ``root_digest(digests)``; :class:`FileIdentity` (dev, ino, size, mtime_ns, ctime_ns) with
  ``.check(path)`` for the worker's before/after-load re-check.
* ``generate_key(out, passphrase=) -> KeyFiles``; ``sign_model(root, private_key, passphrase=,
  signer=, certificate=, chain=, signature=) -> SignResult`` (``passphrase`` is a callable asked
  only for an encrypted key; ``signer`` is e.g. a ``secure_run.manifests.pkcs11.Pkcs11Signer``).
* :class:`VerifiedFolder` (``VerificationResult.folder``): the open verified root (directory
  descriptor) with every file's sha256 + identity; ``read_bytes(name)`` re-checks identity and
  digest, ``open_fd(name)`` opens below the root without following links. The only way code after
  the gate reads a model folder.
* ``verify_model(root, trust, signature=, lock=) -> VerificationResult`` with trust one of
  :class:`KeyTrust`, :class:`CertificateTrust`, :class:`SigstoreTrust` (or None when the lock's
  signer pin supplies it). ``VerificationResult.files`` carry each file's :class:`FileIdentity`;
  ``VerificationResult.recheck()`` re-stats them all; ``.headers`` are the validated tensor tables.
* :class:`Lock` / :class:`LockEntry` / :class:`SignerPin`, ``default_lock_path()``,
  ``pin_model(lock_path, name, root_digest=, signer=, public_key=, path=)`` to add/update an entry,
  ``SignerPin.trust(base)`` to load the pinned trust of a locked model.
* ``inspect_model(root) -> InspectReport``; ``import_snapshot(src, dest) -> ImportReport``.

Errors: :class:`FindingsError` (a :class:`~secure_run.errors.ManifestError`, exit 1) for refused
content, :class:`VerificationFailed` (a :class:`~secure_run.errors.VerificationError`, exit 1) for
signature/manifest/lock/digest failures; both carry ``findings`` with stable rule ids
(:data:`RULES`). Bad arguments or unreadable trust files raise
:class:`~secure_run.errors.UsageError` (exit 2); a write that fails (disk full) raises
:class:`~secure_run.errors.EnvironmentProblem` (exit 2). JSON schemas and decisions: ``manifests/README.md``.

This package never imports torch; ``sigstore`` is imported only for keyless verification.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .findings import RULES, Finding, FindingsError, VerificationFailed
    from .folder import FolderError, PinnedFile, UnverifiedFolder, VerifiedFolder
    from .hashing import FileDigest, FileIdentity, ProgressSink, hash_files, root_digest
    from .importer import ImportReport, import_snapshot
    from .inspection import InspectReport, inspect_model
    from .inventory import DEFAULT_RULES, FileKind, Inventory, InventoryFile, InventoryRules, take_inventory
    from .lock import Lock, LockEntry, SignerPin, default_lock_path, pin_model
    from .signing import KeyFiles, SignResult, generate_key, sign_model
    from .tensors import (
        SafetensorsHeader,
        ShardIndex,
        TensorInfo,
        check_shard_index,
        parse_safetensors_header,
        parse_shard_index,
        read_safetensors_header,
    )
    from .trust import CertificateTrust, KeyTrust, SignerInfo, SigstoreTrust, Trust, pinned_sigstore_root
    from .verify import VerificationResult, VerifiedFile, load_trust, verify_model

__all__ = [
    "DEFAULT_RULES",
    "RULES",
    "CertificateTrust",
    "FileDigest",
    "FileIdentity",
    "FileKind",
    "Finding",
    "FindingsError",
    "FolderError",
    "ImportReport",
    "InspectReport",
    "Inventory",
    "InventoryFile",
    "InventoryRules",
    "KeyFiles",
    "KeyTrust",
    "Lock",
    "LockEntry",
    "PinnedFile",
    "ProgressSink",
    "SafetensorsHeader",
    "ShardIndex",
    "SignResult",
    "SignerInfo",
    "SignerPin",
    "SigstoreTrust",
    "TensorInfo",
    "Trust",
    "VerificationFailed",
    "VerificationResult",
    "UnverifiedFolder",
    "VerifiedFile",
    "VerifiedFolder",
    "check_shard_index",
    "default_lock_path",
    "generate_key",
    "hash_files",
    "import_snapshot",
    "inspect_model",
    "load_trust",
    "parse_safetensors_header",
    "parse_shard_index",
    "pin_model",
    "pinned_sigstore_root",
    "read_safetensors_header",
    "root_digest",
    "sign_model",
    "take_inventory",
    "verify_model",
]

# Imported on first use, so that the model loader (which needs only ``tensors`` and ``findings``)
# does not pull in the signing stack (cryptography, sigstore) inside the sandbox.
_WHERE = {
    "CertificateTrust": "trust",
    "DEFAULT_RULES": "inventory",
    "FileDigest": "hashing",
    "FileIdentity": "hashing",
    "FileKind": "inventory",
    "Finding": "findings",
    "FindingsError": "findings",
    "FolderError": "folder",
    "PinnedFile": "folder",
    "UnverifiedFolder": "folder",
    "VerifiedFolder": "folder",
    "ImportReport": "importer",
    "InspectReport": "inspection",
    "Inventory": "inventory",
    "InventoryFile": "inventory",
    "InventoryRules": "inventory",
    "KeyFiles": "signing",
    "KeyTrust": "trust",
    "Lock": "lock",
    "LockEntry": "lock",
    "ProgressSink": "hashing",
    "RULES": "findings",
    "SafetensorsHeader": "tensors",
    "ShardIndex": "tensors",
    "SignResult": "signing",
    "SignerInfo": "trust",
    "SignerPin": "lock",
    "SigstoreTrust": "trust",
    "TensorInfo": "tensors",
    "Trust": "trust",
    "VerificationFailed": "findings",
    "VerificationResult": "verify",
    "VerifiedFile": "verify",
    "check_shard_index": "tensors",
    "default_lock_path": "lock",
    "generate_key": "signing",
    "hash_files": "hashing",
    "import_snapshot": "importer",
    "inspect_model": "inspection",
    "load_trust": "verify",
    "parse_safetensors_header": "tensors",
    "parse_shard_index": "tensors",
    "pin_model": "lock",
    "pinned_sigstore_root": "trust",
    "read_safetensors_header": "tensors",
    "root_digest": "hashing",
    "sign_model": "signing",
    "take_inventory": "inventory",
    "verify_model": "verify",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(f"secure_run.manifests.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'secure_run.manifests' has no attribute {name!r}")

