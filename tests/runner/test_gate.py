"""The one gate (runner/gate.py) behind generate, verify --policy and ci-check (issue 10 item 6)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from secure_run import manifests
from secure_run.errors import ModelError
from secure_run.model.demo import demo_model_dir
from secure_run.policies import load_policy
from secure_run.runner.cli import cli
from secure_run.runner.gate import GateResult, run_gate


def _signed_copy(tmp_path: Path, *, wrong_architecture: bool) -> tuple[Path, Path]:
    root = tmp_path / "model"
    shutil.copytree(demo_model_dir(), root, ignore=shutil.ignore_patterns("model.sig"))
    if wrong_architecture:  # a validly signed folder whose tensors do not fit its config
        cfg = json.loads((root / "config.json").read_text())
        cfg["vocab_size"] += 8
        (root / "config.json").write_text(json.dumps(cfg, indent=2))
    keys = manifests.generate_key(tmp_path / "k.pem")
    manifests.sign_model(root, keys.private)
    return root, keys.public


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def test_verify_policy_checks_the_architecture(tmp_path: Path) -> None:
    """Issue 10 item 18: ``verify --policy`` assembled its own gate and skipped the architecture."""
    root, pub = _signed_copy(tmp_path, wrong_architecture=True)
    plain = CliRunner().invoke(cli, ["verify", str(root), "--public-key", str(pub), "--json"])
    assert plain.exit_code == 0, plain.output  # the signature is valid: plain verify passes
    r = CliRunner().invoke(cli, ["verify", str(root), "--public-key", str(pub), "--policy", "builtin:demo", "--json"])
    assert r.exit_code == 1, r.output
    err = json.loads(r.output.splitlines()[-1])["error"]
    assert err["rule"] == "loader.shape" and "backbone.embeddings.weight" in json.dumps(err["details"])


def test_ci_check_reports_the_digest_of_a_folder_the_architecture_refuses(tmp_path: Path) -> None:
    root, pub = _signed_copy(tmp_path, wrong_architecture=True)
    result = manifests.verify_model(root, manifests.KeyTrust.from_file(pub))
    result.close()
    lock = tmp_path / "lock" / "models.lock.json"
    lock.parent.mkdir()
    manifests.pin_model(lock, "m", root_digest=result.root_digest, signer=result.signer,
                        public_key=os.path.relpath(pub, lock.parent), path=os.path.relpath(root, lock.parent),
                        policy="builtin:demo")
    r = CliRunner().invoke(cli, ["ci-check", "--lock", str(lock), "--json"])
    assert r.exit_code == 1, r.output
    model = json.loads(r.output)["models"][0]
    assert model["status"] == "refused" and model["error"]["rule"].startswith("loader.")
    assert model["root_digest"] == f"sha256:{result.root_digest}"


def test_run_gate_returns_a_typed_result_and_closes_on_refusal(tmp_path: Path) -> None:
    root, pub = _signed_copy(tmp_path, wrong_architecture=False)
    trust = manifests.KeyTrust.from_file(pub)
    with run_gate(root, trust, lock=None, policy=load_policy("builtin:demo"), stage="check") as gate:
        assert isinstance(gate, GateResult) and gate.decision is not None and gate.decision.allowed
        assert gate.config.model_type == "superlinear-exp"
        assert gate.facts.verified_digests == gate.verification.digests()
        folder = gate.folder
        assert not folder.closed
    assert folder.closed
    bad, bad_pub = _signed_copy(tmp_path / "bad", wrong_architecture=True)
    seen: list[object] = []
    with pytest.raises(ModelError):
        run_gate(bad, manifests.KeyTrust.from_file(bad_pub), lock=None, policy=None,
                 on_refusal=lambda err, v: seen.append(v))
    verification = seen[0]
    assert isinstance(verification, manifests.VerificationResult) and verification.verified.closed
