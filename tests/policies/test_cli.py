"""``secure-run policy ...`` through click's CliRunner: exit codes, text and --json."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from policies_support import PolicyFactory, oml_license_text, upstream_superlinear_files, write_files

from secure_run.runner.cli import cli


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def test_check_allowed_exit_0(make_policy: PolicyFactory, model_dir: Path) -> None:
    make_policy()
    code, out = run("policy", "check", str(model_dir), "--policy", str(model_dir.parent / "policy0/policy.yaml"), "--use", "research")
    assert code == 0, out
    assert out.splitlines()[-1] == "decision: ALLOWED (0 warning(s))"
    assert "INFO  S1  not evaluated at stage 'check'" in out


def test_check_denied_exit_1_json(make_policy: PolicyFactory, model_dir: Path) -> None:
    make_policy()
    (model_dir / "moe.py").write_text("x = 1\n")
    code, out = run("policy", "check", str(model_dir), "--policy", str(model_dir.parent / "policy0/policy.yaml"), "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False and doc["decision"]["allowed"] is False
    s4 = next(f for f in doc["decision"]["findings"] if f["check"] == "S4")
    assert s4["result"] == "deny" and s4["floor"] is True and s4["evidence"]["files"] == ["moe.py"]


def test_check_bad_policy_exit_2(tmp_path: Path, model_dir: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: secure-run/v1alpha1\nkind: RunPolicy\nmetadata: {name: x}\nspec: {mode: enforce, extra: 1}\n")
    code, out = run("policy", "check", str(model_dir), "--policy", str(bad), "--json")
    assert code == 2
    err = json.loads(out)["error"]
    assert err["kind"] == "policy-file" and "spec.extra: unknown field" in "\n".join(err["details"])


def test_check_builtin_policy_on_upstream_snapshot(tmp_path: Path, state: Path) -> None:
    folder = write_files(tmp_path / "snap", upstream_superlinear_files())
    code, out = run("policy", "check", str(folder), "--policy", "builtin:superlinear-exp-v0.1", "--use", "research")
    assert code == 1
    assert "DENY  S4  code or pickle-capable files present" in out
    assert "[non-waivable floor]" in out
    assert out.splitlines()[-1].startswith("decision: DENIED")


def test_fingerprint(tmp_path: Path) -> None:
    lic = tmp_path / "LICENSE"
    lic.write_text(oml_license_text())
    code, out = run("policy", "fingerprint", str(lic), "--json")
    assert code == 0
    doc = json.loads(out)["license"]
    assert doc["kind"] == "structural" and doc["license_id"] == "LicenseRef-NVIDIA-OML-2025-10-24"
    code, out = run("policy", "fingerprint", str(lic))
    assert f"fingerprint  {doc['fingerprint']}  (normalised-v1)" in out


def test_accept_license_flow(make_policy: PolicyFactory, model_dir: Path, state: Path) -> None:
    policy = make_policy({"spec": {"acceptance": {"required": True, "acknowledgements": ["export_compliance"]}}})
    path = model_dir.parent / "policy0/policy.yaml"
    code, out = run("policy", "check", str(model_dir), "--policy", str(path), "--use", "research", "--operator", "alice")
    assert code == 1 and "DENY  L1  operator 'alice' has not accepted Apache-2.0" in out
    code, out = run("policy", "accept-license", "Apache-2.0", str(model_dir), "--policy", str(path), "--operator", "alice",
                    "--yes")
    assert code == 2 and "requires acknowledging ['export_compliance']" in out
    code, out = run("policy", "accept-license", "Apache-2.0", str(model_dir), "--policy", str(path), "--operator", "alice",
                    "--acknowledge", "export_compliance", "--json")
    assert code == 0, out
    assert json.loads(out)["acceptance"]["policy_sha256"] == policy.sha256
    code, out = run("policy", "check", str(model_dir), "--policy", str(path), "--use", "research", "--operator", "alice")
    assert code == 0, out
