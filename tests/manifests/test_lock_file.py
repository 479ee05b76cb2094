"""Lock file: schema, pinning, and refusal of a validly signed but different version or signer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mf_helpers import FIXTURES, make_ca, new_key, write_key

from secure_run.errors import UsageError
from secure_run.manifests import (
    CertificateTrust,
    InventoryRules,
    KeyTrust,
    Lock,
    LockEntry,
    SignerPin,
    SigstoreTrust,
    VerificationFailed,
    default_lock_path,
    pin_model,
    sign_model,
    verify_model,
)
from secure_run.manifests.lock import LockFileError


def test_shipped_lock_is_valid() -> None:
    lock = Lock.load(default_lock_path())
    for entry in lock.entries.values():  # whatever is pinned must name loadable trust material
        entry.signer.trust(lock.base)


def pin(tmp_path: Path, model: Path, keys: tuple[Path, Path], name: str = "tiny") -> Path:
    lock_path = tmp_path / "trusted" / "models.lock.json"
    lock_path.parent.mkdir(exist_ok=True)
    shutil.copy(keys[1], lock_path.parent / "signer.pub.pem")
    result = verify_model(model, KeyTrust.from_file(keys[1]))
    pin_model(lock_path, name, root_digest=result.root_digest, signer=result.signer, public_key="signer.pub.pem", path="../" + model.name)
    return lock_path


def test_pin_and_verify(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    lock_path = pin(tmp_path, signed, keys)
    doc = json.loads(lock_path.read_text())
    assert doc["schema"] == "secure-run/lock/v1"
    entry = doc["models"]["tiny"]
    assert entry["root_digest"].startswith("sha256:") and entry["signer"]["method"] == "key"
    lock = Lock.load(lock_path)
    result = verify_model(signed, KeyTrust.from_file(keys[1]), lock=lock)
    assert result.lock_name == "tiny"
    # the lock alone is enough: its signer pin names the public key
    assert verify_model(signed, None, lock=lock).lock_name == "tiny"
    # a single entry can be passed with explicit trust (its pinned files need the lock's folder)
    entry = lock.get("tiny")
    assert entry is not None
    assert verify_model(signed, KeyTrust.from_file(keys[1]), lock=entry).lock_name == "tiny"
    with pytest.raises(UsageError):
        verify_model(signed, None, lock=entry)


def test_older_signed_version_is_refused(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    old = tmp_path / "old-copy"
    shutil.copytree(signed, old)  # version 1, validly signed
    (signed / "README.md").write_text("# version 2\n")
    sign_model(signed, keys[0])  # version 2, validly signed, pinned
    lock_path = pin(tmp_path, signed, keys)
    # swap version 1 back in place of version 2
    shutil.rmtree(signed)
    old.rename(signed)
    verify_model(signed, KeyTrust.from_file(keys[1]))  # the signature alone is fine...
    with pytest.raises(VerificationFailed) as err:
        verify_model(signed, KeyTrust.from_file(keys[1]), lock=Lock.load(lock_path))
    assert err.value.rule == "LOCK-DIGEST" and err.value.exit_code == 1
    assert "the lock pins sha256:" in err.value.message


def test_other_signer_with_same_content_is_refused(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    lock_path = pin(tmp_path, signed, keys)
    other_priv, other_pub = write_key(tmp_path / "other.pem", new_key())
    sign_model(signed, other_priv)  # same files, same root digest, another key
    with pytest.raises(VerificationFailed) as err:
        verify_model(signed, KeyTrust.from_file(other_pub), lock=Lock.load(lock_path))
    assert err.value.rule == "LOCK-SIGNER"


def test_model_not_in_lock(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    lock_path = tmp_path / "empty.lock.json"
    lock_path.write_text('{"schema": "secure-run/lock/v1", "models": {}}')
    with pytest.raises(VerificationFailed) as err:
        verify_model(signed, KeyTrust.from_file(keys[1]), lock=Lock.load(lock_path))
    assert err.value.rule == "LOCK-UNKNOWN" and "tiny-model" in err.value.message


def test_entry_found_by_signed_subject_name(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    lock_path = tmp_path / "by-name.lock.json"
    result = verify_model(signed, KeyTrust.from_file(keys[1]))
    pin_model(lock_path, "tiny-model", root_digest="sha256:" + result.root_digest, signer=result.signer)
    assert verify_model(signed, KeyTrust.from_file(keys[1]), lock=Lock.load(lock_path)).lock_name == "tiny-model"
    with pytest.raises(LockFileError) as err:  # no public_key in the pin: the lock alone is not enough
        verify_model(signed, None, lock=Lock.load(lock_path))
    assert err.value.rule == "LOCK-FILE" and err.value.exit_code == 2


def test_pinned_key_file_swapped(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    lock_path = pin(tmp_path, signed, keys)
    _, other = write_key(tmp_path / "x.pem", new_key())
    shutil.copy(other, lock_path.parent / "signer.pub.pem")
    with pytest.raises(LockFileError) as err:
        verify_model(signed, None, lock=Lock.load(lock_path))
    assert "the lock pins" in err.value.message


def test_certificate_pin(model: Path, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "trusted" / "roots")
    sign_model(model, ca.leaf_key, certificate=ca.leaf, chain=ca.chain)
    result = verify_model(model, CertificateTrust.from_file(ca.root, "signer@example.com"))
    lock_path = tmp_path / "trusted" / "models.lock.json"
    pin_model(lock_path, "tiny", root_digest=result.root_digest, signer=result.signer, root="roots/root.pem", path="../tiny-model")
    assert verify_model(model, None, lock=Lock.load(lock_path)).lock_name == "tiny"
    with pytest.raises(VerificationFailed) as err:
        verify_model(model, CertificateTrust.from_file(ca.root, "sha256:" + ca.leaf_sha256), lock=Lock.load(lock_path))
    assert err.value.rule == "LOCK-SIGNER"


def test_sigstore_pin(tmp_path: Path) -> None:
    model = tmp_path / "v1.1.0-sigstore"
    shutil.copytree(FIXTURES / "model-transparency" / "v1.1.0-certificate", model)
    (model / "ignore-me").unlink()
    shutil.copy(FIXTURES / "model-signing-spec" / "test-vectors" / "v1.0" / "valid" / "sigstore.bundle.json", model / "model.sig")
    rules = InventoryRules(extra_data_names=frozenset({"signme-1", "signme-2"}))
    trust = SigstoreTrust("stefanb@us.ibm.com", "https://sigstore.verify.ibm.com/oauth2")
    result = verify_model(model, trust, rules=rules)
    lock_path = tmp_path / "models.lock.json"
    pin_model(lock_path, "ibm-fixture", root_digest=result.root_digest, signer=result.signer, path="v1.1.0-sigstore")
    assert verify_model(model, None, lock=Lock.load(lock_path), rules=rules).lock_name == "ibm-fixture"
    wrong = SigstoreTrust("stefanb@us.ibm.com", "https://sigstore.verify.ibm.com/oauth2")
    lock = Lock.load(lock_path)
    entry = lock.get("ibm-fixture")
    assert entry is not None
    bad = LockEntry(entry.name, entry.root_digest, SignerPin("sigstore", identity="x@example.com", issuer=wrong.issuer), entry.path)
    with pytest.raises(VerificationFailed) as err:
        verify_model(model, wrong, lock=lock.with_entry(bad), rules=rules)
    assert err.value.rule == "LOCK-SIGNER"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[]", "expected"),
        ('{"schema": "other", "models": {}}', "expected"),
        ('{"schema": "secure-run/lock/v1", "models": {}, "x": 1}', "unknown top-level"),
        ('{"schema": "secure-run/lock/v1", "models": {"m": {"root_digest": "abc", "signer": {"method": "key", "key_sha256": "' + "a" * 64 + '"}}}}', "root_digest"),
        ('{"schema": "secure-run/lock/v1", "models": {"m": {"root_digest": "sha256:' + "a" * 64 + '", "signer": {"method": "key"}}}}', "needs"),
        ('{"schema": "secure-run/lock/v1", "models": {"m": {"root_digest": "sha256:' + "a" * 64 + '", "signer": {"method": "gpg"}}}}', "method"),
        ('{"schema": "secure-run/lock/v1", "models": {"../m": {"root_digest": "sha256:' + "a" * 64 + '", "signer": {"method": "key", "key_sha256": "' + "a" * 64 + '"}}}}', "model names"),
        ('{"schema": "secure-run/lock/v1", "models": {"m": {"root_digest": "sha256:' + "a" * 64 + '"}}}', "needs root_digest and signer"),
        ('{"schema": "secure-run/lock/v1", "schema": "secure-run/lock/v1", "models": {}}', "duplicate"),
        ('{"schema": "secure-run/lock/v1", "models": {"m": {"root_digest": "sha256:' + "a" * 64 + '", "signer": {"method": "key", "key_sha256": "' + "a" * 64 + '", "extra": "x"}}}}', "unknown fields"),
    ],
)
def test_malformed_lock_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.lock.json"
    path.write_text(text)
    with pytest.raises(LockFileError) as err:
        Lock.load(path)
    assert err.value.rule == "LOCK-FILE" and fragment in err.value.message


def test_round_trip_and_update(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    pin = SignerPin("key", key_sha256="b" * 64, public_key="k.pem")
    lock = Lock({}, tmp_path, str(path)).with_entry(LockEntry("a", "sha256:" + "1" * 64, pin)).with_entry(LockEntry("b", "sha256:" + "2" * 64, pin, "m", "reviewed"))
    lock.save(path)
    again = Lock.load(path)
    assert again.entries == lock.entries and again.dumps() == lock.dumps()
    updated = again.with_entry(LockEntry("a", "sha256:" + "3" * 64, pin))
    assert updated.get("a").root_digest.endswith("3" * 64) and again.get("a").root_digest.endswith("1" * 64)  # type: ignore[union-attr]
