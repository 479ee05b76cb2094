"""`secure-run ci-check`: every locked model, verified against its own pin, with its policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from secure_run import manifests
from secure_run.model.demo import demo_model_dir
from secure_run.runner.cli import cli


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def _ci(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["ci-check", "--json", *args], catch_exceptions=False)
    return result.exit_code, json.loads(result.output)


def _locked_copy(tmp_path: Path, name: str = "m1", *, policy: str | None = "builtin:demo") -> tuple[Path, Path]:
    root = tmp_path / name
    shutil.copytree(demo_model_dir(), root, ignore=shutil.ignore_patterns("model.sig"))
    keys = manifests.generate_key(tmp_path / f"{name}.pem")
    manifests.sign_model(root, keys.private)
    result = manifests.verify_model(root, manifests.KeyTrust.from_file(keys.public))
    lock = tmp_path / "models.lock.json"
    manifests.pin_model(lock, name, root_digest=result.root_digest, signer=result.signer,
                        public_key=keys.public.name, path=name, policy=policy)
    return root, lock


def test_the_shipped_lock_passes() -> None:
    code, doc = _ci()
    assert code == 0, doc
    demo = {m["name"]: m for m in doc["models"]}["superlinear-demo"]
    assert demo["status"] == "ok" and demo["policy_allowed"] is True
    assert demo["root_digest"] == manifests.Lock.load(manifests.default_lock_path()).entries[
        "superlinear-demo"].root_digest


def test_a_tampered_locked_model_fails(tmp_path: Path) -> None:
    root, lock = _locked_copy(tmp_path)
    (root / "NOTICE").write_text((root / "NOTICE").read_text() + "tampered\n")
    code, doc = _ci("--lock", str(lock))
    assert code == 1
    (m,) = doc["models"]
    assert m["status"] == "refused" and m["error"]["mismatched"] == ["NOTICE"]


def test_a_missing_folder_fails(tmp_path: Path) -> None:
    root, lock = _locked_copy(tmp_path)
    shutil.rmtree(root)
    code, doc = _ci("--lock", str(lock))
    assert code == 1
    assert doc["models"][0]["error"]["rule"] == "CI-MISSING"


def test_policy_denial_fails(tmp_path: Path) -> None:
    root, lock = _locked_copy(tmp_path)
    tpl = root / "chat_template.jinja"
    tpl.write_text(tpl.read_text() + "{# changed after review #}")
    keys = manifests.generate_key(tmp_path / "again.pem")
    manifests.sign_model(root, keys.private)
    result = manifests.verify_model(root, manifests.KeyTrust.from_file(keys.public))
    manifests.pin_model(lock, "m1", root_digest=result.root_digest, signer=result.signer,
                        public_key=keys.public.name, path="m1", policy="builtin:demo")
    code, doc = _ci("--lock", str(lock))
    assert code == 1
    (m,) = doc["models"]
    assert m["policy_allowed"] is False
    assert any(f["check"] == "G1" and f["result"] == "deny" for f in m["findings"])


def test_entries_without_a_path_fail_unless_allowed(tmp_path: Path) -> None:
    _root, lock = _locked_copy(tmp_path)
    doc = json.loads(lock.read_text())
    del doc["models"]["m1"]["path"]
    lock.write_text(json.dumps(doc))
    code, out = _ci("--lock", str(lock))
    assert code == 1 and out["models"][0]["status"] == "not_checked"
    code, out = _ci("--lock", str(lock), "--allow-unlocated")
    assert code == 0 and out["models"][0]["status"] == "not_checked"


def test_a_malformed_lock_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock.json"
    bad.write_text('{"schema": "nope"}')
    result = CliRunner().invoke(cli, ["ci-check", "--json", "--lock", str(bad)], catch_exceptions=False)
    assert result.exit_code == 2
    assert "schema" in json.loads(result.output)["error"]["message"]


def test_text_report(tmp_path: Path) -> None:
    root, lock = _locked_copy(tmp_path)
    (root / "README.md").write_text("changed")
    result = CliRunner().invoke(cli, ["ci-check", "--lock", str(lock)], catch_exceptions=False)
    assert result.exit_code == 1
    assert "REFUSED" in result.output and "m1" in result.output and "0/1 locked models pass" in result.output
