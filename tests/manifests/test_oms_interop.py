"""Interop both ways with the reference implementation, model_signing 1.1.1 (its CLI, via subprocess).

The reference runs with HOME and XDG_CACHE_HOME inside tmp_path, so it writes nothing elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mf_helpers import CA, make_ca

from secure_run.manifests import CertificateTrust, KeyTrust, sign_model, verify_model

pytestmark = pytest.mark.interop

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


def reference(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    return subprocess.run([str(MODEL_SIGNING), *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_ours_key_verifies_with_reference(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    r = reference(tmp_path, "verify", "key", "--signature", str(signed / "model.sig"), "--public_key", str(keys[1]), str(signed))
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr
    # and the reference also refuses what we tampered (sanity: the check above can fail)
    (signed / "README.md").write_text("# tampered\n")
    r = reference(tmp_path, "verify", "key", "--signature", str(signed / "model.sig"), "--public_key", str(keys[1]), str(signed))
    assert r.returncode == 1 and "Hash mismatch" in r.stdout + r.stderr


def test_ours_certificate_verifies_with_reference(model: Path, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    sign_model(model, ca.leaf_key, certificate=ca.leaf, chain=ca.chain)
    r = reference(tmp_path, "verify", "certificate", "--signature", str(model / "model.sig"), "--certificate_chain", str(ca.root), str(model))
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr


def test_reference_key_verifies_with_ours(model: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    r = reference(tmp_path, "sign", "key", "--private_key", str(keys[0]), "--signature", str(model / "model.sig"), str(model))
    assert r.returncode == 0, r.stdout + r.stderr
    result = verify_model(model, KeyTrust.from_file(keys[1]))
    assert len(result.files) == 12 and result.signer.method == "key"


def test_reference_certificate_verifies_with_ours(model: Path, tmp_path: Path) -> None:
    ca: CA = make_ca(tmp_path / "ca")
    r = reference(
        tmp_path, "sign", "certificate", "--private_key", str(ca.leaf_key), "--signing_certificate", str(ca.leaf),
        "--certificate_chain", str(ca.chain), "--signature", str(model / "model.sig"), str(model),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    result = verify_model(model, CertificateTrust.from_file(ca.root, "signer@example.com"))
    assert result.signer.leaf_sha256 == ca.leaf_sha256
