"""`secure-run verify --policy`: the licence/guardrail policy evaluated for a verified folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from secure_run import manifests
from secure_run.model.demo import demo_model_dir
from secure_run.runner.cli import cli


@pytest.fixture
def signed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    root = tmp_path / "model"
    shutil.copytree(demo_model_dir(), root, ignore=shutil.ignore_patterns("model.sig"))
    keys = manifests.generate_key(tmp_path / "k.pem")
    manifests.sign_model(root, keys.private)
    return root, keys.public


def test_allowed_policy_is_reported(signed: tuple[Path, Path]) -> None:
    root, pub = signed
    r = CliRunner().invoke(cli, ["verify", str(root), "--public-key", str(pub), "--policy", "builtin:demo", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["ok"] is True and doc["policy"]["allowed"] is True


def test_denied_policy_exits_1_after_a_valid_signature(signed: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = signed
    (root / "NOTICE").write_text("no attribution here\n")
    keys = manifests.generate_key(tmp_path / "k2.pem")
    manifests.sign_model(root, keys.private)  # validly signed, but the policy's NOTICE rules fail
    r = CliRunner().invoke(cli, ["verify", str(root), "--public-key", str(keys.public), "--policy", "builtin:demo",
                                 "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert doc["ok"] is False and doc["policy"]["allowed"] is False
    denied = {f["check"] for f in doc["policy"]["findings"] if f["result"] == "deny"}
    assert "A2" in denied
    text = CliRunner().invoke(cli, ["verify", str(root), "--public-key", str(keys.public), "--policy",
                                    "builtin:demo"])
    assert text.exit_code == 1 and "A2" in text.output


def test_verify_without_a_policy_does_not_load_the_policy_stack(signed: tuple[Path, Path]) -> None:
    """V1 (issue 12): `verify` alone starts without importing policies/pydantic (~120 ms of a 2-core run)."""
    import subprocess
    import sys

    model, pub = signed
    code = ("import sys\nfrom secure_run.runner.cli import cli\n"
            f"try:\n    cli(['verify', {str(model)!r}, '--public-key', {str(pub)!r}, '--json'], standalone_mode=False)\n"
            "finally:\n    print('POLICIES', 'secure_run.policies' in sys.modules, 'pydantic' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert '"ok":true' in out.replace(" ", "") and "POLICIES False False" in out
