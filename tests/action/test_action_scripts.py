"""The GitHub Action's scripts (scripts/action/run.sh + gate.py) on a local git repository with a
base branch and a pull-request branch, run as the action runs them (GITHUB_STEP_SUMMARY set, the
base commit given, secure-run from this checkout's venv).

Must show: a tampered shard fails (exit 1, ``::error file=<the shard>``); a PR that adds its own
key and re-signs fails; a clean update passes. Plus: trust-only PRs are checked with the base's
trust, a protected trust source, and a lock that trusts files outside the trust directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from secure_run import manifests
from secure_run.model.demo import demo_model_dir

REPO = Path(__file__).resolve().parents[2]
RUN_SH = REPO / "scripts" / "action" / "run.sh"
SHARD = "models/demo/model-00001-of-00002.safetensors"
LOCK = ".secure-run/models.lock.json"


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


def sign_and_pin(repo: Path, key: Path, pub_rel: str, *, policy: str | None = "builtin:demo") -> str:
    """Sign models/demo with ``key`` and pin it in the lock (key path relative to the lock)."""
    model = repo / "models" / "demo"
    manifests.sign_model(model, key)
    result = manifests.verify_model(model, manifests.KeyTrust.from_file(repo / ".secure-run" / pub_rel))
    lock = repo / LOCK
    if lock.exists():
        lock.unlink()
    manifests.pin_model(lock, "demo", root_digest=result.root_digest, signer=result.signer,
                        public_key=pub_rel, path="../models/demo", policy=policy)
    return result.root_digest


@dataclass
class Repo:
    path: Path
    base: str
    org_key: Path


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """main: the demo model signed by the org key, pinned in .secure-run/models.lock.json."""
    path = tmp_path / "model-repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    shutil.copytree(demo_model_dir(), path / "models" / "demo", ignore=shutil.ignore_patterns("model.sig"))
    keys = manifests.generate_key(tmp_path / "org.pem")  # the private key is NOT in the repository
    (path / ".secure-run" / "keys").mkdir(parents=True)
    shutil.copy(keys.public, path / ".secure-run" / "keys" / "org.pub.pem")
    (path / ".github").mkdir()
    (path / ".github" / "CODEOWNERS").write_text("/.secure-run/ @org/model-security\n")
    sign_and_pin(path, keys.private, "keys/org.pub.pem")
    base = commit_all(path, "base: demo model, org trust")
    git(path, "checkout", "-q", "-b", "pr")
    return Repo(path, base, keys.private)


def run_action(repo: Repo, tmp_path: Path, **env: str) -> tuple[int, str, str, Path]:
    """scripts/action/run.sh as action.yml runs it; returns (exit, stdout, stderr, summary file)."""
    summary = tmp_path / "step-summary.md"
    full = {**os.environ, "SR_LOCK": LOCK, "SR_TRUST_DIR": ".secure-run", "SR_BASE": repo.base,
            "SR_REPORT_DIR": str(tmp_path / "report"), "GITHUB_STEP_SUMMARY": str(summary),
            "GITHUB_WORKSPACE": str(repo.path), "SECURE_RUN": str(Path(sys.executable).with_name("secure-run")),
            "SR_PYTHON": sys.executable, "XDG_STATE_HOME": str(tmp_path / "state"), **env}
    proc = subprocess.run(["bash", str(RUN_SH)], cwd=repo.path, env=full, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr, summary


def annotations(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("::error")]


def test_a_clean_update_passes(repo: Repo, tmp_path: Path) -> None:
    # the new (reviewed) version, signed by the org key, prepared outside the repository
    new = tmp_path / "new-version"
    shutil.copytree(repo.path / "models" / "demo", new)
    data = bytearray((new / SHARD.split("/")[-1]).read_bytes())
    data[-1] ^= 0x01
    (new / SHARD.split("/")[-1]).write_bytes(bytes(data))
    manifests.sign_model(new, repo.org_key)
    result = manifests.verify_model(new, manifests.KeyTrust.from_file(repo.path / ".secure-run/keys/org.pub.pem"))
    # pull request 1 (trust, merged): the base pins the new version
    git(repo.path, "checkout", "-q", "main")
    lock = repo.path / LOCK
    lock.unlink()
    manifests.pin_model(lock, "demo", root_digest=result.root_digest, signer=result.signer,
                        public_key="keys/org.pub.pem", path="../models/demo", policy="builtin:demo")
    repo.base = commit_all(repo.path, "trust: pin the new version")
    # pull request 2 (this one): the matching weights only
    git(repo.path, "checkout", "-q", "-b", "weights")
    shutil.rmtree(repo.path / "models" / "demo")
    shutil.copytree(new, repo.path / "models" / "demo")
    commit_all(repo.path, "weights: new version, signed by the org key")
    code, out, err, summary = run_action(repo, tmp_path)
    assert code == 0, out + err
    assert annotations(out) == []
    table = summary.read_text()
    assert "| demo | ✅ ok |" in table and "1/1 locked models pass" in table
    junit = ET.parse(tmp_path / "report" / "secure-run-junit.xml").getroot()
    assert junit.get("tests") == "1" and junit.get("failures") == "0"


def test_a_tampered_shard_fails_with_an_annotation_on_the_file(repo: Repo, tmp_path: Path) -> None:
    shard = repo.path / SHARD
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    commit_all(repo.path, "pr: tampered shard")
    code, out, err, summary = run_action(repo, tmp_path)
    assert code == 1, out + err
    errors = annotations(out)
    assert any(line.startswith(f"::error file={SHARD},") and "DIGEST-MISMATCH" in line for line in errors), errors
    assert "| demo | ❌ refused |" in summary.read_text()
    report = json.loads((tmp_path / "report" / "secure-run-report.json").read_text())
    assert report["ok"] is False and report["error"]["rule"] == "CI-FAILED"
    junit = ET.parse(tmp_path / "report" / "secure-run-junit.xml").getroot()
    failure = junit.find("./testsuite/testcase/failure")
    assert failure is not None and SHARD in (failure.text or "")


def test_a_pr_that_adds_its_own_key_and_resigns_fails(repo: Repo, tmp_path: Path) -> None:
    shard = repo.path / SHARD
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    attacker = manifests.generate_key(tmp_path / "attacker.pem")
    shutil.copy(attacker.public, repo.path / ".secure-run" / "keys" / "attacker.pub.pem")
    sign_and_pin(repo.path, attacker.private, "keys/attacker.pub.pem")
    commit_all(repo.path, "pr: new weights, my own key, re-signed, re-pinned")
    code, out, err, _summary = run_action(repo, tmp_path)
    assert code == 1, out + err
    errors = annotations(out)
    assert any(line.startswith("::error file=.secure-run/keys/attacker.pub.pem,") for line in errors), errors
    assert any(line.startswith(f"::error file={LOCK},") and "TRUST-AND-WEIGHTS" in line for line in errors)
    assert "together [TRUST-AND-WEIGHTS]" in err
    assert not (tmp_path / "report" / "secure-run-report.json").exists()  # refused before any verification


def test_resigning_with_another_key_without_touching_trust_fails(repo: Repo, tmp_path: Path) -> None:
    attacker = manifests.generate_key(tmp_path / "attacker.pem")
    manifests.sign_model(repo.path / "models" / "demo", attacker.private)
    commit_all(repo.path, "pr: re-signed with another key")
    code, out, err, _ = run_action(repo, tmp_path)
    assert code == 1, out + err
    assert any("models/demo" in line for line in annotations(out)), out


def test_a_trust_only_pr_is_checked_with_the_base_trust(repo: Repo, tmp_path: Path) -> None:
    # the PR swaps the pinned key for its own; without weights it is not refused, but the check
    # still runs with the BASE key (the current, org-signed weights pass) and warns.
    attacker = manifests.generate_key(tmp_path / "attacker.pem")
    shutil.copy(attacker.public, repo.path / ".secure-run" / "keys" / "org.pub.pem")
    commit_all(repo.path, "pr: replace the org key")
    code, out, err, _ = run_action(repo, tmp_path)
    assert code == 0, out + err
    assert "::warning" in out and "base branch's trust" in out
    assert (repo.path / ".secure-run/keys/org.pub.pem").read_bytes() == git(
        repo.path, "show", f"{repo.base}:.secure-run/keys/org.pub.pem").encode()


def test_without_a_base_the_commit_trust_is_used_and_the_lock_must_stay_inside(repo: Repo, tmp_path: Path) -> None:
    code, out, err, _ = run_action(repo, tmp_path, SR_BASE="")  # push / schedule
    assert code == 0, out + err
    lock = json.loads((repo.path / LOCK).read_text())
    lock["models"]["demo"]["signer"]["public_key"] = "../outside.pub.pem"
    (repo.path / LOCK).write_text(json.dumps(lock))
    code, out, err, _ = run_action(repo, tmp_path, SR_BASE="")
    assert code == 2 and "outside the trust directory" in err


def test_a_protected_trust_source(repo: Repo, tmp_path: Path) -> None:
    protected = tmp_path / "protected-trust"
    shutil.copytree(repo.path / ".secure-run", protected)
    attacker = manifests.generate_key(tmp_path / "attacker.pem")
    shutil.copy(attacker.public, repo.path / ".secure-run" / "keys" / "attacker.pub.pem")
    sign_and_pin(repo.path, attacker.private, "keys/attacker.pub.pem")
    commit_all(repo.path, "pr: own key and re-sign (no weight change)")
    code, out, err, _ = run_action(repo, tmp_path, SR_BASE="", SR_TRUST_SOURCE=str(protected))
    assert code == 1, out + err  # the protected lock pins the org key; the attacker's signature fails
    assert "LOCK-SIGNER" in out or "SIG-" in out, out


def test_action_yml_runs_the_tested_scripts_with_pipefail() -> None:
    import yaml

    action = yaml.safe_load((REPO / "action.yml").read_text())
    assert action["runs"]["using"] == "composite" and action["inputs"]["lock"]["required"] is True
    steps = action["runs"]["steps"]
    runs = [s["run"] for s in steps if "run" in s]
    assert len(runs) == len(steps) == 2
    for step in steps:
        assert step["shell"] == "bash" and step["run"].startswith("set -euo pipefail\n")
        assert "${{" not in step["run"]  # inputs reach the scripts through env only (no injection)
    assert "scripts/action/install.sh" in runs[0] and "scripts/action/run.sh" in runs[1]
    for script in ("run.sh", "install.sh"):
        assert "set -euo pipefail" in (REPO / "scripts/action" / script).read_text()
    for workflow in (REPO / ".github/workflows/verify-weights.yml", REPO / "scripts/action/model-repo-workflow.yml"):
        text = workflow.read_text()
        for line in text.splitlines():
            if "uses: actions/" in line:
                ref = line.split("@", 1)[1].split()[0]
                assert len(ref) == 40 and all(c in "0123456789abcdef" for c in ref), line
        assert "schedule:" in text and "pull_request:" in text and "push:" in text and "lfs: true" in text


def test_weights_outside_every_locked_folder_are_refused(repo: Repo, tmp_path: Path) -> None:
    sneaky = repo.path / "models" / "other" / "model.safetensors"
    sneaky.parent.mkdir(parents=True)
    shutil.copy(repo.path / SHARD, sneaky)
    commit_all(repo.path, "pr: an unlocked model")
    code, out, err = run_action(repo, tmp_path)[:3]
    assert code == 1 and "[UNLOCKED-WEIGHTS]" in err
    assert any(line.startswith("::error file=models/other/model.safetensors,") for line in annotations(out))
    code, out, err = run_action(repo, tmp_path, SR_BASE="")[:3]  # push / schedule: every tracked file
    assert code == 1 and "[UNLOCKED-WEIGHTS]" in err
