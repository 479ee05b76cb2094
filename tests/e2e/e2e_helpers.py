"""Helpers shared by the end-to-end tests (signed model copies pinned in private locks)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from secure_run import manifests


@dataclass(frozen=True)
class SignedModel:
    """A signed model folder pinned in its own lock file."""

    root: Path
    key: Path
    public_key: Path
    lock: Path
    name: str
    root_digest: str


def sign_and_pin(root: Path, tmp: Path, name: str, *, key: Path | None = None, pin: bool = True) -> SignedModel:
    """Sign ``root`` (fresh key unless given) and pin it in ``tmp/lock/models.lock.json``."""
    keydir = tmp / "keys"
    keydir.mkdir(exist_ok=True)
    if key is None:
        key = manifests.generate_key(keydir / f"{name}.pem").private
    pub = key.with_name(key.name.replace(".pem", ".pub.pem"))
    signed = manifests.sign_model(root, key)
    lockdir = tmp / "lock"
    lockdir.mkdir(exist_ok=True)
    lock = lockdir / "models.lock.json"
    result = manifests.verify_model(root, manifests.KeyTrust.from_file(pub))
    assert result.root_digest == signed.root_digest
    if pin:
        manifests.pin_model(lock, name, root_digest=result.root_digest, signer=result.signer,
                            public_key=os.path.relpath(pub, lockdir), path=os.path.relpath(root, lockdir),
                            policy="builtin:demo")
    return SignedModel(root, key, pub, lock, name, result.root_digest)
