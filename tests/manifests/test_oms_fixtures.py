"""The upstream OMS fixtures (fixtures/oms/README.md) with secure-run's verifier.

Expected outcomes follow the fixtures README, except where secure-run is deliberately stricter than
the reference verifier; each such difference is asserted explicitly:

* the fixture "models" are extension-less test files (``signme-1``...), which the model-folder
  allowlist refuses (``INV-KIND``); the cryptographic checks are exercised with
  ``InventoryRules(extra_data_names=...)`` naming exactly those files (library only, not a CLI flag);
* a signer-chosen ignore entry (``ignore-me``) is not honoured: the file must be absent (``SET-EXTRA``);
* single-file models (resource name ``"."``) are refused (``OMS-NAME``): directory models only;
* the deprecated v0.2 format is refused (``OMS-PREDICATE-TYPE``): OMS v1.0 section 11.2 makes it optional;
* certificates must carry a SAN identity or be pinned by fingerprint (``sha256:...``); the CN is
  never an identity.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from mf_helpers import FIXTURES

from secure_run.errors import UsageError
from secure_run.manifests import (
    CertificateTrust,
    FindingsError,
    InventoryRules,
    KeyTrust,
    SigstoreTrust,
    VerificationFailed,
    pinned_sigstore_root,
    verify_model,
)

MT = FIXTURES / "model-transparency"
SPEC = FIXTURES / "model-signing-spec"
KEY = MT / "keys" / "certificate" / "signing-key-pub.pem"
ROOT = MT / "keys" / "certificate" / "ca-cert.pem"
INTERMEDIATE = MT / "keys" / "certificate" / "int-ca-cert.pem"
LEAF_SHA256 = "da3662b630eb0f585c33f114a076b8da2ceda0f275cb578e6d1d9cab84c04d3b"
LEAF_ID = "sha256:" + LEAF_SHA256
DATA = InventoryRules(extra_data_names=frozenset({"signme-1", "signme-2", "ignore-me"}))
IBM = ("stefanb@us.ibm.com", "https://sigstore.verify.ibm.com/oauth2")


def test_fixture_bytes_are_intact() -> None:
    for line in (FIXTURES / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((FIXTURES / name.lstrip("*")).read_bytes()).hexdigest() == digest, name


def copy_model(name: str, tmp_path: Path, *, keep_ignore_me: bool = False, folder: Path = MT) -> Path:
    dest = tmp_path / name
    shutil.copytree(folder / name, dest)
    if not keep_ignore_me:
        (dest / "ignore-me").unlink(missing_ok=True)
    return dest


def fails(model: Path, trust: object, **kw: object) -> VerificationFailed | FindingsError:
    with pytest.raises((VerificationFailed, FindingsError)) as err:
        verify_model(model, trust, rules=DATA, **kw)  # type: ignore[arg-type]
    return err.value


def test_key_hint_of_the_certtool_file() -> None:
    assert KeyTrust.from_file(KEY).fingerprint == "e8450dec4eb99dae995da9af1bc2cc9f76ed669ee2e744f57abba763df3e3f8e"


def test_s1_key_v1_1_0(tmp_path: Path) -> None:
    model = copy_model("v1.1.0-elliptic-key", tmp_path)
    result = verify_model(model, KeyTrust.from_file(KEY), rules=DATA)
    assert result.root_digest == "92745110b1ab4368471cbe31664e10174e954b113a3df333db860317b2c6dec4"
    assert [f.name for f in result.files] == ["signme-1", "signme-2"]


def test_s1_with_signer_ignored_file_present_is_refused(tmp_path: Path) -> None:
    model = copy_model("v1.1.0-elliptic-key", tmp_path, keep_ignore_me=True)
    err = fails(model, KeyTrust.from_file(KEY))
    assert err.rule == "SET-EXTRA" and "honours only its fixed ignore list" in err.details[0]


def test_fixture_folders_refused_as_model_folders_by_default() -> None:
    with pytest.raises(FindingsError) as err:
        verify_model(MT / "v1.1.0-elliptic-key", KeyTrust.from_file(KEY))
    assert {(f.path, f.rule) for f in err.value.findings} == {
        ("ignore-me", "INV-KIND"),
        ("signme-1", "INV-KIND"),
        ("signme-2", "INV-KIND"),
    }


def test_s2_legacy_raw_bytes_key(tmp_path: Path) -> None:
    model = copy_model("v1.0.1-elliptic-key", tmp_path)
    assert verify_model(model, KeyTrust.from_file(KEY), rules=DATA).signer.method == "key"


def test_sn1_legacy_without_ignore_paths_and_extra_file(tmp_path: Path) -> None:
    model = copy_model("v1.0.1-elliptic-key", tmp_path, keep_ignore_me=True)
    err = fails(model, KeyTrust.from_file(KEY))
    assert err.rule == "SET-EXTRA" and err.to_json()["extra"] == ["ignore-me"]


def test_legacy_raw_bytes_must_be_the_pinned_key(tmp_path: Path) -> None:
    from mf_helpers import new_key, write_key

    model = copy_model("v1.0.1-elliptic-key", tmp_path)
    _, other = write_key(tmp_path / "other.pem", new_key())
    assert fails(model, KeyTrust.from_file(other)).rule == "SIG-KEY-HINT"


@pytest.mark.parametrize("name", ["v1.0.0-elliptic-key", "v0.3.1-elliptic-key"])
def test_s3_s4_single_file_models_refused(tmp_path: Path, name: str) -> None:
    model = copy_model(name, tmp_path)
    assert fails(model, KeyTrust.from_file(KEY)).rule == "OMS-NAME"


@pytest.mark.parametrize("name", ["v1.1.0-certificate", "v1.0.1-certificate", "v1.0.0-certificate", "v0.3.1-certificate"])
def test_s5_s8_certificate(tmp_path: Path, name: str) -> None:
    model = copy_model(name, tmp_path)
    result = verify_model(model, CertificateTrust.from_file(ROOT, LEAF_ID), rules=DATA)
    assert result.root_digest == "61d4849d9d90076d6215f4d525f13d6574af8e3f67aef3e6f36fc40a14fdd226"
    assert result.signer.leaf_sha256 == LEAF_SHA256


def test_s5_cn_is_not_an_identity(tmp_path: Path) -> None:
    model = copy_model("v1.1.0-certificate", tmp_path)
    assert fails(model, CertificateTrust.from_file(ROOT, "intermediate-ca")).rule == "CERT-IDENTITY"


def test_s9_legacy_v0_2_refused(tmp_path: Path) -> None:
    model = copy_model("v0.2.0-certificate", tmp_path)
    err = fails(model, CertificateTrust.from_file(ROOT, LEAF_ID))
    assert err.rule == "OMS-PREDICATE-TYPE" and "deprecated v0.2" in err.message


def test_sn2_intermediate_as_anchor(tmp_path: Path) -> None:
    model = copy_model("v1.1.0-certificate", tmp_path)
    err = fails(model, CertificateTrust.from_file(INTERMEDIATE, LEAF_ID))
    assert err.rule == "CERT-CHAIN" and "not a self-signed root" in err.message


def test_sn3_no_root_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        CertificateTrust(b"", LEAF_ID)


def spec_model(tmp_path: Path) -> Path:
    return copy_model("model", tmp_path, folder=SPEC)


def test_s10_spec_key_vector(tmp_path: Path) -> None:
    sig = SPEC / "test-vectors" / "v1.0" / "valid" / "key.bundle.json"
    result = verify_model(spec_model(tmp_path), KeyTrust.from_file(KEY), signature=sig, rules=DATA)
    assert result.subject_name == "model"


def test_s11_spec_certificate_vector(tmp_path: Path) -> None:
    sig = SPEC / "test-vectors" / "v1.0" / "valid" / "certificate.bundle.json"
    verify_model(spec_model(tmp_path), CertificateTrust.from_file(ROOT, LEAF_ID), signature=sig, rules=DATA)


SIGSTORE_BUNDLE = SPEC / "test-vectors" / "v1.0" / "valid" / "sigstore.bundle.json"


def test_pinned_trusted_root_is_the_documented_copy() -> None:
    pinned = pinned_sigstore_root()
    assert hashlib.sha256(pinned.read_bytes()).hexdigest() == "6494e21ea73fa7ee769f85f57d5a3e6a08725eae1e38c755fc3517c9e6bc0b66"


def test_s12_keyless_offline(tmp_path: Path) -> None:
    model = copy_model("v1.1.0-certificate", tmp_path)
    (model / "model.sig").unlink()
    result = verify_model(model, SigstoreTrust(*IBM), signature=SIGSTORE_BUNDLE, rules=DATA)
    assert result.signer.to_json() == {"method": "sigstore", "identity": IBM[0], "issuer": IBM[1]}
    assert result.root_digest == "61d4849d9d90076d6215f4d525f13d6574af8e3f67aef3e6f36fc40a14fdd226"


@pytest.mark.parametrize(
    ("identity", "issuer"),
    [("someone@example.com", IBM[1]), (IBM[0], "https://accounts.google.com")],
)
def test_s12_wrong_identity_or_issuer(tmp_path: Path, identity: str, issuer: str) -> None:
    model = copy_model("v1.1.0-certificate", tmp_path)
    (model / "model.sig").unlink()
    err = fails(model, SigstoreTrust(identity, issuer), signature=SIGSTORE_BUNDLE)
    assert err.rule == "SIGSTORE"


def test_s12_keyless_tampered_file(tmp_path: Path) -> None:
    model = copy_model("v1.1.0-certificate", tmp_path)
    (model / "model.sig").unlink()
    (model / "signme-2").write_bytes(b"signme-X")
    assert fails(model, SigstoreTrust(*IBM), signature=SIGSTORE_BUNDLE).rule == "DIGEST-MISMATCH"


def test_s12_keyless_against_the_staging_root_fails(tmp_path: Path) -> None:
    import sigstore

    staging = Path(sigstore.__file__).parent / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstage.dev" / "trusted_root.json"
    model = copy_model("v1.1.0-certificate", tmp_path)
    (model / "model.sig").unlink()
    trust = SigstoreTrust(*IBM, trusted_root=staging)
    assert fails(model, trust, signature=SIGSTORE_BUNDLE).rule == "SIGSTORE"


@pytest.mark.parametrize(
    ("vector", "trust_kind", "rule"),
    [
        ("invalid/empty.bundle.json", "key", "OMS-JSON"),  # SN4
        ("invalid/missing-envelope.bundle.json", "key", "OMS-BUNDLE"),  # SN5
        ("invalid/missing-verification-material.bundle.json", "key", "OMS-BUNDLE"),  # SN6
        ("invalid-payload/wrong-predicate.bundle.json", "key", "SIG-INVALID"),  # SN7
        ("invalid/missing-tlog-entries.bundle.json", "sigstore", "SIGSTORE"),  # SN8
    ],
)
def test_sn4_sn8_invalid_vectors(tmp_path: Path, vector: str, trust_kind: str, rule: str) -> None:
    trust = KeyTrust.from_file(KEY) if trust_kind == "key" else SigstoreTrust(*IBM)
    err = fails(spec_model(tmp_path), trust, signature=SPEC / "test-vectors" / "v1.0" / vector)
    assert err.rule == rule


def test_key_bundle_with_certificate_trust_is_a_method_mismatch(tmp_path: Path) -> None:
    model = copy_model("v1.1.0-elliptic-key", tmp_path)
    assert fails(model, CertificateTrust.from_file(ROOT, LEAF_ID)).rule == "OMS-METHOD"
