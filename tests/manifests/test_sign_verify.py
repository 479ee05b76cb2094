"""Key and certificate methods: sign -> verify, every tamper / signer / statement negative, and
"verify never modifies anything"."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from mf_helpers import CA, make_ca, new_key, read_bundle, resign, snapshot, st_bytes, write_key

from secure_run.errors import UsageError
from secure_run.manifests import (
    CertificateTrust,
    FindingsError,
    KeyTrust,
    VerificationFailed,
    generate_key,
    sign_model,
    verify_model,
)


def refusal(model: Path, trust: Any, **kw: Any) -> tuple[str, Any]:
    with pytest.raises((VerificationFailed, FindingsError)) as err:
        verify_model(model, trust, **kw)
    return err.value.rule or "", err.value


def test_sign_and_verify(signed: Path, keys: tuple[Path, Path]) -> None:
    result = verify_model(signed, KeyTrust.from_file(keys[1]))
    names = [f.name for f in result.files]
    assert names == sorted(names, key=lambda n: tuple(n.split("/")))
    assert "model.sig" not in names and len(names) == 12
    assert result.signer.method == "key" and result.signer.key_sha256 == KeyTrust.from_file(keys[1]).fingerprint
    assert result.subject_name == "tiny-model"
    for f in result.files:
        st = os.stat(signed / f.name)
        assert (f.identity.ino, f.identity.size, f.identity.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert set(result.headers) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    result.recheck()
    doc = result.to_json()
    assert doc["model"]["root_digest"] == "sha256:" + result.root_digest and len(doc["files"]) == 12


def test_bundle_is_the_interop_profile(signed: Path, keys: tuple[Path, Path]) -> None:
    bundle, statement = read_bundle(signed / "model.sig")
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["verificationMaterial"] == {"publicKey": {"hint": KeyTrust.from_file(keys[1]).fingerprint}, "tlogEntries": []}
    assert bundle["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"
    assert bundle["dsseEnvelope"]["signatures"][0]["keyid"] == ""
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    assert statement["predicate"]["serialization"] == {
        "method": "files",
        "hash_type": "sha256",
        "allow_symlinks": False,
        "ignore_paths": [".git", ".gitattributes", ".github", ".gitignore", "model.sig"],
    }
    assert set(statement["predicate"]) == {"serialization", "resources"}


def test_moving_the_folder_keeps_it_valid_and_editing_changes_the_digest(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.copytree(signed, moved)
    first = verify_model(moved, KeyTrust.from_file(keys[1]))
    assert first.subject_name == "tiny-model"
    (moved / "README.md").write_text("# edited\n")
    second = sign_model(moved, keys[0])
    assert second.root_digest != first.root_digest and second.subject_name == "renamed"


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP521R1()])
def test_other_curves(model: Path, tmp_path: Path, curve: ec.EllipticCurve) -> None:
    priv, pub = write_key(tmp_path / "k.pem", new_key(curve))
    sign_model(model, priv)
    assert verify_model(model, KeyTrust.from_file(pub)).signer.method == "key"


def test_secp256k1_key_refused(model: Path, tmp_path: Path) -> None:
    priv, _ = write_key(tmp_path / "k.pem", new_key(ec.SECP256K1()))
    with pytest.raises(VerificationFailed) as err:
        sign_model(model, priv)
    assert err.value.rule == "SIG-KEY-TYPE"


# -- tampering with the folder -------------------------------------------------------------


def test_tampered_byte_in_shard(signed: Path, keys: tuple[Path, Path]) -> None:
    shard = signed / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    rule, err = refusal(signed, KeyTrust.from_file(keys[1]))
    assert rule == "DIGEST-MISMATCH" and err.to_json()["mismatched"] == ["model-00002-of-00002.safetensors"]


def test_truncated_shard(signed: Path, keys: tuple[Path, Path]) -> None:
    shard = signed / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    rule, err = refusal(signed, KeyTrust.from_file(keys[1]))
    assert rule == "ST-H13" and err.findings[0].path == "model-00001-of-00002.safetensors"


def test_extra_missing_renamed(signed: Path, keys: tuple[Path, Path]) -> None:
    trust = KeyTrust.from_file(keys[1])
    (signed / "extra.txt").write_text("hello\n")
    rule, err = refusal(signed, trust)
    assert rule == "SET-EXTRA" and err.to_json()["extra"] == ["extra.txt"]
    (signed / "extra.txt").unlink()
    (signed / "NOTICE").rename(signed / "NOTICE.md")
    rule, err = refusal(signed, trust)
    doc = err.to_json()
    assert (doc["extra"], doc["missing"]) == (["NOTICE.md"], ["NOTICE"])
    (signed / "NOTICE.md").unlink()
    rule, err = refusal(signed, trust)
    assert rule == "SET-MISSING" and err.to_json()["missing"] == ["NOTICE"]


@pytest.mark.parametrize(
    ("setup", "rule"),
    [
        (lambda d: (d / "evil.pyc").write_bytes(b"\xa7\x0d\x0d\x0a" + bytes(12)), "INV-PYC"),
        (lambda d: ((d / "__pycache__").mkdir(), (d / "__pycache__" / "m.pyc").write_bytes(b"x")), "INV-PYCACHE"),
        (lambda d: (d / "modeling.py").write_text("import os\n"), "INV-CODE"),
        (lambda d: (d / "model-00001-of-00002.safetensors").write_bytes(b"\x80\x04\x95" + bytes(30) + b"."), "ST-H2"),
        (lambda d: os.symlink("LICENSE", d / "LICENSE.md"), "INV-SYMLINK"),
        (lambda d: os.symlink("/etc/passwd", d / "passwd.txt"), "INV-SYMLINK"),
        (lambda d: os.chmod(d / "config.json", 0o755), "INV-EXEC"),
        (lambda d: ((d / "sub" / ".git").mkdir(parents=True), (d / "sub" / ".git" / "config").write_text("x")), "INV-GIT"),
        (lambda d: ((d / ".git").mkdir(), (d / ".git" / "evil.py").write_text("x")), "INV-GIT"),
    ],
)
def test_unsafe_additions_after_signing(signed: Path, keys: tuple[Path, Path], setup: Any, rule: str) -> None:
    setup(signed)
    got, _ = refusal(signed, KeyTrust.from_file(keys[1]))
    assert got == rule


def test_gitattributes_may_stay_unsigned(signed: Path, keys: tuple[Path, Path]) -> None:
    (signed / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    verify_model(signed, KeyTrust.from_file(keys[1]))


# -- signer ------------------------------------------------------------------------------------


def test_wrong_key(signed: Path, tmp_path: Path) -> None:
    _, other = write_key(tmp_path / "other.pem", new_key())
    rule, err = refusal(signed, KeyTrust.from_file(other))
    assert rule == "SIG-KEY-HINT" and "pinned key" in err.message


def test_wrong_key_without_hint(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    resign(signed / "model.sig", keys[0], bundle_mutate=lambda b: b["verificationMaterial"].update(publicKey={}))
    verify_model(signed, KeyTrust.from_file(keys[1]))  # hint is optional ...
    _, other = write_key(tmp_path / "other.pem", new_key())
    rule, _ = refusal(signed, KeyTrust.from_file(other))
    assert rule == "SIG-INVALID"  # ... but the signature still has to verify with the pinned key


def test_hint_mismatch(signed: Path, keys: tuple[Path, Path]) -> None:
    resign(signed / "model.sig", keys[0], bundle_mutate=lambda b: b["verificationMaterial"]["publicKey"].update(hint="0" * 64))
    rule, _ = refusal(signed, KeyTrust.from_file(keys[1]))
    assert rule == "SIG-KEY-HINT"


def test_payload_changed_without_resigning(signed: Path, keys: tuple[Path, Path]) -> None:
    bundle, statement = read_bundle(signed / "model.sig")
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (signed / "model.sig").write_text(json.dumps(bundle))
    rule, _ = refusal(signed, KeyTrust.from_file(keys[1]))
    assert rule == "SIG-INVALID"


def _resources(s: dict[str, Any]) -> list[dict[str, Any]]:
    return s["predicate"]["resources"]  # type: ignore[no-any-return]


STATEMENT_CASES: list[tuple[str, Any, dict[str, Any], str]] = [
    ("wrong payloadType", None, {"payload_type": "application/json"}, "OMS-PAYLOADTYPE"),
    ("wrong predicateType", lambda s: s.update(predicateType="https://example.com/wrong/v1"), {}, "OMS-PREDICATE-TYPE"),
    ("legacy predicateType", lambda s: s.update(predicateType="https://model_signing/Digests/v0.1"), {}, "OMS-PREDICATE-TYPE"),
    ("wrong _type", lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"), {}, "OMS-STATEMENT"),
    ("two subjects", lambda s: s["subject"].append(s["subject"][0]), {}, "OMS-STATEMENT"),
    ("dot-dot name", lambda s: _resources(s)[0].update(name="../secret"), {"fix_root": True}, "OMS-NAME"),
    ("absolute name", lambda s: _resources(s)[0].update(name="/etc/passwd"), {"fix_root": True}, "OMS-NAME"),
    ("dot-slash name", lambda s: _resources(s)[0].update(name="./config.json"), {"fix_root": True}, "OMS-NAME"),
    ("double slash", lambda s: _resources(s)[0].update(name="a//b"), {"fix_root": True}, "OMS-NAME"),
    ("single-file dot", lambda s: _resources(s)[0].update(name="."), {"fix_root": True}, "OMS-NAME"),
    ("duplicate names", lambda s: _resources(s).append(dict(_resources(s)[0])), {"fix_root": True}, "OMS-DUPLICATE"),
    ("root digest mismatch", lambda s: s["subject"][0]["digest"].update(sha256="1" * 64), {}, "OMS-ROOT-DIGEST"),
    ("reordered resources", lambda s: _resources(s).reverse(), {}, "OMS-ROOT-DIGEST"),
    ("empty resources", lambda s: _resources(s).clear(), {"fix_root": True}, "OMS-EMPTY"),
    ("shards method", lambda s: s["predicate"]["serialization"].update(method="shards"), {}, "OMS-PROFILE"),
    ("blake2b", lambda s: s["predicate"]["serialization"].update(hash_type="blake2b"), {}, "OMS-PROFILE"),
    ("allow_symlinks", lambda s: s["predicate"]["serialization"].update(allow_symlinks=True), {}, "OMS-PROFILE"),
    ("resource algorithm", lambda s: _resources(s)[0].update(algorithm="sha256-sharded-1000"), {}, "OMS-PROFILE"),
    ("uppercase digest", lambda s: _resources(s)[0].update(digest=_resources(s)[0]["digest"].upper()), {}, "OMS-STATEMENT"),
    ("extra predicate key", lambda s: s["predicate"].update(tensors={}), {}, "OMS-STATEMENT"),
]


@pytest.mark.parametrize(("label", "mutate", "kw", "rule"), STATEMENT_CASES, ids=[c[0] for c in STATEMENT_CASES])
def test_validly_signed_bad_statements(signed: Path, keys: tuple[Path, Path], label: str, mutate: Any, kw: dict[str, Any], rule: str) -> None:
    resign(signed / "model.sig", keys[0], mutate, **kw)
    got, err = refusal(signed, KeyTrust.from_file(keys[1]))
    assert got == rule, err.diagnostics()


BUNDLE_CASES: list[tuple[str, Any, str]] = [
    ("wrong mediaType", lambda b: b.update(mediaType="application/vnd.dev.sigstore.bundle.v0.1+json"), "OMS-MEDIATYPE"),
    ("two signatures", lambda b: b["dsseEnvelope"]["signatures"].append(b["dsseEnvelope"]["signatures"][0]), "OMS-SIGNATURES"),
    ("no signatures", lambda b: b["dsseEnvelope"].update(signatures=[]), "OMS-SIGNATURES"),
    ("no envelope", lambda b: b.pop("dsseEnvelope"), "OMS-BUNDLE"),
    ("two materials", lambda b: b["verificationMaterial"].update(certificate={"rawBytes": "AA=="}), "OMS-BUNDLE"),
    ("bad base64", lambda b: b["dsseEnvelope"].update(payload="!!notbase64"), "OMS-BUNDLE"),
    ("message signature", lambda b: b.update(messageSignature={}), "OMS-BUNDLE"),
]


@pytest.mark.parametrize(("label", "mutate", "rule"), BUNDLE_CASES, ids=[c[0] for c in BUNDLE_CASES])
def test_bad_bundles(signed: Path, keys: tuple[Path, Path], label: str, mutate: Any, rule: str) -> None:
    bundle = json.loads((signed / "model.sig").read_text())
    mutate(bundle)
    (signed / "model.sig").write_text(json.dumps(bundle))
    got, _ = refusal(signed, KeyTrust.from_file(keys[1]))
    assert got == rule


def test_keyid_tolerance(signed: Path, keys: tuple[Path, Path]) -> None:
    for keyid in (None, "some-key"):
        bundle = json.loads((signed / "model.sig").read_text())
        sig = bundle["dsseEnvelope"]["signatures"][0]
        if keyid is None:
            sig.pop("keyid")
        else:
            sig["keyid"] = keyid
        bundle["verificationMaterial"].pop("tlogEntries", None)
        (signed / "model.sig").write_text(json.dumps(bundle))
        verify_model(signed, KeyTrust.from_file(keys[1]))


def test_signer_chosen_ignore_paths_not_honoured(signed: Path, keys: tuple[Path, Path]) -> None:
    resign(signed / "model.sig", keys[0], lambda s: s["predicate"]["serialization"]["ignore_paths"].append("payload.txt"))
    verify_model(signed, KeyTrust.from_file(keys[1]))  # the extra ignore entry matches nothing: inert
    (signed / "payload.txt").write_text("unsigned\n")
    rule, err = refusal(signed, KeyTrust.from_file(keys[1]))
    assert rule == "SET-EXTRA" and "honours only its fixed ignore list" in err.details[0]


def test_missing_or_linked_signature(model: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    rule, err = refusal(model, KeyTrust.from_file(keys[1]))
    assert rule == "SIG-MISSING" and err.exit_code == 1
    sign_model(model, keys[0], signature=tmp_path / "outside.sig")
    os.symlink(tmp_path / "outside.sig", model / "model.sig")
    rule, _ = refusal(model, KeyTrust.from_file(keys[1]))
    assert rule == "INV-SYMLINK"
    (model / "model.sig").unlink()
    verify_model(model, KeyTrust.from_file(keys[1]), signature=tmp_path / "outside.sig")


def test_sign_refuses_what_verify_refuses(model: Path, keys: tuple[Path, Path]) -> None:
    (model / "run.py").write_text("import os\n")
    with pytest.raises(FindingsError) as err:
        sign_model(model, keys[0])
    assert err.value.rule == "INV-CODE"
    assert not (model / "model.sig").exists()


def test_sign_signature_inside_folder_must_be_model_sig(model: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError):
        sign_model(model, keys[0], signature=model / "other.sig")


def test_keygen(tmp_path: Path) -> None:
    keys = generate_key(tmp_path / "org.pem")
    assert (keys.private.stat().st_mode & 0o777, keys.public.stat().st_mode & 0o777) == (0o600, 0o644)
    assert keys.fingerprint == KeyTrust.from_file(keys.public).fingerprint
    with pytest.raises(UsageError) as err:
        generate_key(tmp_path / "org.pem")
    assert "already exists" in err.value.message and err.value.exit_code == 2


def test_public_key_file_problems(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pem = keys[1].read_bytes()
    (tmp_path / "two.pem").write_bytes(pem + pem)
    (tmp_path / "none.pem").write_bytes(b"not a key\n")
    for name, fragment in (("two.pem", "found 2"), ("none.pem", "found 0"), ("missing.pem", "cannot read")):
        with pytest.raises(UsageError) as err:
            KeyTrust.from_file(tmp_path / name)
        assert fragment in err.value.message and err.value.exit_code == 2


# -- certificate method ----------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return make_ca(tmp_path / "ca")


def cert_signed(model: Path, ca: CA) -> Path:
    sign_model(model, ca.leaf_key, certificate=ca.leaf, chain=ca.chain)
    return model


def test_certificate_method(model: Path, ca: CA) -> None:
    cert_signed(model, ca)
    bundle, _ = read_bundle(model / "model.sig")
    assert len(bundle["verificationMaterial"]["x509CertificateChain"]["certificates"]) == 2
    for identity in ("signer@example.com", "email:signer@example.com", "sha256:" + ca.leaf_sha256):
        result = verify_model(model, CertificateTrust.from_file(ca.root, identity))
        assert result.signer.method == "certificate" and result.signer.leaf_sha256 == ca.leaf_sha256


@pytest.mark.parametrize(
    ("ca_kw", "identity", "rule"),
    [
        ({"not_before": dt.datetime(2020, 1, 1, tzinfo=dt.UTC), "not_after": dt.datetime(2021, 1, 1, tzinfo=dt.UTC)}, "signer@example.com", "CERT-EXPIRED"),
        ({"not_before": dt.datetime.now(dt.UTC) + dt.timedelta(days=1)}, "signer@example.com", "CERT-EXPIRED"),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "signer@example.com", "CERT-EKU"),
        ({"digital_signature": False}, "signer@example.com", "CERT-KU"),
        ({}, "someone-else@example.com", "CERT-IDENTITY"),
        ({}, "uri:signer@example.com", "CERT-IDENTITY"),
        ({}, "sha256:" + "0" * 64, "CERT-IDENTITY"),
        ({"san": "other@example.com"}, "signer@example.com", "CERT-IDENTITY"),
    ],
)
def test_certificate_negatives(model: Path, tmp_path: Path, ca_kw: dict[str, Any], identity: str, rule: str) -> None:
    ca = make_ca(tmp_path / "ca", **ca_kw)
    cert_signed(model, ca)
    got, err = refusal(model, CertificateTrust.from_file(ca.root, identity))
    assert got == rule, err.diagnostics()


def test_untrusted_root_and_partial_chain(model: Path, ca: CA, tmp_path: Path) -> None:
    cert_signed(model, ca)
    other = make_ca(tmp_path / "other", prefix="other-")
    got, _ = refusal(model, CertificateTrust.from_file(other.root, "signer@example.com"))
    assert got == "CERT-CHAIN"
    got, _ = refusal(model, CertificateTrust.from_file(ca.chain, "signer@example.com"))  # intermediate as anchor
    assert got == "CERT-CHAIN"


def test_method_mismatch(signed: Path, ca: CA) -> None:
    got, _ = refusal(signed, CertificateTrust.from_file(ca.root, "signer@example.com"))
    assert got == "OMS-METHOD"


def test_certificate_for_another_key_is_refused_at_signing(model: Path, ca: CA, keys: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError) as err:
        sign_model(model, keys[0], certificate=ca.leaf, chain=ca.chain)
    assert "not for the signing key" in err.value.message


def test_cert_identity_required() -> None:
    with pytest.raises(UsageError):
        CertificateTrust(b"", "")


# -- verify never modifies the folder --------------------------------------------------------


def test_verify_modifies_nothing(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    trust = KeyTrust.from_file(keys[1])
    before = snapshot(signed)
    verify_model(signed, trust)
    assert snapshot(signed) == before
    # failing verifications leave everything in place too (extra .pyc, tampered shard)
    (signed / "evil.pyc").write_bytes(b"\xa7\x0d\x0d\x0a" + bytes(12))
    shard = signed / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = snapshot(signed)
    refusal(signed, trust)
    (signed / "evil.pyc").rename(tmp_path / "evil.pyc")
    middle = snapshot(signed)
    refusal(signed, trust)
    assert snapshot(signed) == middle
    assert {k: v for k, v in before.items() if k != "evil.pyc"} == middle


def test_extra_safetensors_shard_checked(signed: Path, keys: tuple[Path, Path]) -> None:
    (signed / "model-00003-of-00002.safetensors").write_bytes(st_bytes({"x": ("F32", [1])}))
    got, _ = refusal(signed, KeyTrust.from_file(keys[1]))
    assert got == "IDX-SHARD-UNREFERENCED"
