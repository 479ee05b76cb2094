"""`secure-run lock add`: verify, then pin; the pinned entry then drives verify/ci-check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from secure_run import manifests
from secure_run.model.demo import demo_model_dir
from secure_run.runner.cli import cli


def _signed(tmp_path: Path) -> tuple[Path, manifests.KeyFiles]:
    root = tmp_path / "models" / "reviewed"
    shutil.copytree(demo_model_dir(), root, ignore=shutil.ignore_patterns("model.sig"))
    keys = manifests.generate_key(tmp_path / "org.pem")
    manifests.sign_model(root, keys.private)
    return root, keys


def test_lock_add_then_verify_and_ci_check_from_the_lock_alone(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    root, keys = _signed(tmp_path)
    lock = tmp_path / "trust" / "models.lock.json"
    lock.parent.mkdir()
    r = CliRunner().invoke(cli, ["lock", "add", str(root), "--lock", str(lock), "--public-key", str(keys.public),
                                 "--policy", "builtin:demo", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    entry = json.loads(lock.read_text())["models"]["reviewed"]
    assert entry["path"] == "../models/reviewed" and entry["signer"]["public_key"] == "../org.pub.pem"
    assert entry["policy"] == "builtin:demo"
    assert CliRunner().invoke(cli, ["verify", str(root), "--lock", str(lock)]).exit_code == 0
    assert CliRunner().invoke(cli, ["ci-check", "--lock", str(lock)]).exit_code == 0


def test_lock_add_refuses_an_unverifiable_folder(tmp_path: Path) -> None:
    root, _keys = _signed(tmp_path)
    other = manifests.generate_key(tmp_path / "other.pem")
    lock = tmp_path / "models.lock.json"
    r = CliRunner().invoke(cli, ["lock", "add", str(root), "--lock", str(lock), "--public-key", str(other.public),
                                 "--json"])
    assert r.exit_code == 1
    assert json.loads(r.output)["error"]["kind"] == "verification"
    assert not lock.exists()


def test_lock_add_needs_a_lock_and_trust(tmp_path: Path) -> None:
    root, keys = _signed(tmp_path)
    r = CliRunner().invoke(cli, ["lock", "add", str(root), "--public-key", str(keys.public), "--json"])
    assert r.exit_code == 2 and "--lock" in json.loads(r.output)["error"]["message"]
    r = CliRunner().invoke(cli, ["lock", "add", str(root), "--lock", str(tmp_path / "l.json"), "--json"])
    assert r.exit_code == 2
