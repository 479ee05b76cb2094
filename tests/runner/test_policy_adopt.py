"""``secure-run policy init`` / ``policy pin`` and the S8 expiry notice."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from secure_run.errors import UsageError
from secure_run.model.demo import demo_model_dir
from secure_run.policies import RunFacts, evaluate, load_policy
from secure_run.policies.adopt import apply_pins, init_policy, plan_pins
from secure_run.policies.errors import PolicyFileError
from secure_run.policies.policy import default_policy_path
from secure_run.runner.cli import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(*args, "--json")
    return code, json.loads(out)


def _upstream_model(tmp_path: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("upstream_snapshot_adopt", REPO / "tests/e2e/upstream_snapshot.py")
    assert spec is not None and spec.loader is not None
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    build_upstream_like_snapshot = helper.build_upstream_like_snapshot
    snap = tmp_path / "snapshot"
    build_upstream_like_snapshot(snap)
    dest = tmp_path / "model"
    # as the README does: the template's artifact.source requires the import provenance (S10)
    code, _, err = run("import", str(snap), str(dest), "--source-repo", "concavity-ai/superlinear-exp-v0.1",
                       "--source-revision", "06ea7933166a63d3bd13b808d6f8d8aead7ed25c")
    assert code == 0, err
    return dest


def test_the_copied_template_alone_cannot_find_its_blocklist(tmp_path: Path) -> None:
    """The bug: a plain copy of the template fails on its relative blocklist (P9)."""
    plain = tmp_path / "org.policy.yaml"
    shutil.copy(default_policy_path("superlinear-exp-v0.1"), plain)
    with pytest.raises(PolicyFileError) as err:
        load_policy(plain)
    assert err.value.rule == "P9" and "rails-blocklist.txt" in err.value.message
    assert "secure-run policy init --from builtin:NAME DIR" in (err.value.hint or "")


@pytest.mark.parametrize("name", ["demo", "superlinear-exp-v0.1"])
def test_init_writes_a_self_contained_policy(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "org-policy"
    code, doc = run_json("policy", "init", "--from", f"builtin:{name}", str(dest))
    assert code == 0 and doc["command"] == "policy init"
    assert sorted(p.name for p in dest.iterdir()) == ["policy.yaml", "rails-blocklist.txt"]
    # moved elsewhere, the folder still loads (nothing points back into the package)
    moved = tmp_path / "elsewhere"
    shutil.move(dest, moved)
    policy = load_policy(moved / "policy.yaml")
    assert policy.input_patterns is not None and policy.name == load_policy(f"builtin:{name}").name
    assert policy.document.metadata.expires == date.fromisoformat(doc["expires"])
    # comments of the template are kept
    template = default_policy_path(name).read_text()
    if template.startswith("#"):
        assert (moved / "policy.yaml").read_text().splitlines()[0] == template.splitlines()[0]


def test_init_expiry_default_and_explicit(tmp_path: Path) -> None:
    result = init_policy("builtin:demo", tmp_path / "a", today=date(2026, 12, 2))
    assert result.expires == date(2027, 12, 2)
    code, doc = run_json("policy", "init", "--from", "builtin:demo", str(tmp_path / "b"), "--expires", "2027-06-30")
    assert code == 0 and doc["expires"] == "2027-06-30"
    assert load_policy(tmp_path / "b" / "policy.yaml").document.metadata.expires == date(2027, 6, 30)
    with pytest.raises(UsageError) as err:
        init_policy("builtin:demo", tmp_path / "c", expires=date(2026, 12, 1), today=date(2026, 12, 2))
    assert err.value.rule == "POLICY-INIT"


def test_init_refuses_a_non_empty_folder_and_unknown_templates(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "policy.yaml").write_text("mine\n")
    code, doc = run_json("policy", "init", "--from", "builtin:demo", str(tmp_path / "full"))
    assert code == 2 and doc["error"]["rule"] == "POLICY-INIT"
    assert (tmp_path / "full" / "policy.yaml").read_text() == "mine\n"
    code, doc = run_json("policy", "init", "--from", "superlinear.yaml", str(tmp_path / "x"))
    assert code == 2 and "builtin:" in doc["error"]["hint"]


def test_shipped_template_does_not_expire_within_the_notice_period() -> None:
    """The template's expires (was 2026-12-31, 29 days after this session) is outside 30 days."""
    for name in ("demo", "superlinear-exp-v0.1"):
        expires = load_policy(f"builtin:{name}").document.metadata.expires
        assert expires is None or expires - date(2026, 12, 2) > timedelta(days=30), (name, expires)


def test_expiry_warns_30_days_before(tmp_path: Path) -> None:
    init_policy("builtin:demo", tmp_path / "p", expires=date(2027, 1, 31), today=date(2026, 12, 2))
    policy = load_policy(tmp_path / "p" / "policy.yaml")
    model = demo_model_dir()

    def s8(now: datetime) -> tuple[str, str]:
        decision = evaluate(policy, RunFacts(model_dir=model), stage="check", now=now)
        f = next(f for f in decision.findings if f.check == "S8")
        return f.result, f.message

    assert s8(datetime(2026, 12, 31, tzinfo=UTC))[0] == "pass"
    result, message = s8(datetime(2027, 1, 1, tzinfo=UTC))
    assert result == "warn" and "in 30 day(s)" in message
    assert s8(datetime(2027, 2, 1, tzinfo=UTC))[0] == "deny"


def test_pin_shows_the_diff_then_writes_on_yes(tmp_path: Path) -> None:
    model = _upstream_model(tmp_path)
    run("policy", "init", "--from", "builtin:superlinear-exp-v0.1", str(tmp_path / "org"))
    policy_file = tmp_path / "org" / "policy.yaml"
    before = policy_file.read_text()
    code, out, _ = run("policy", "check", str(model), "--policy", str(policy_file))
    assert code == 1 and "not pinned yet" in out
    code, out, _ = run("policy", "pin", str(model), "--policy", str(policy_file))
    assert code == 0 and "NOT written" in out and "-        LICENSE: null" in out
    assert policy_file.read_text() == before  # nothing written without --yes
    code, doc = run_json("policy", "pin", str(model), "--policy", str(policy_file), "--yes")
    assert code == 0 and doc["written"] is True
    fields = {c["field"] for c in doc["changes"]}
    assert {"spec.artifact.files.pinned.LICENSE", "spec.guardrails.pinned_integrity.chat_template.jinja",
            "spec.licenses.fingerprints.LicenseRef-NVIDIA-OML-2025-10-24"} <= fields
    assert len(doc["changes"]) == 9 and doc["unresolved"] == []
    assert len(doc["notes"]) == 1 and "structure only" in doc["notes"][0]
    after = policy_file.read_text()
    assert ": null" not in after and after.splitlines()[:10] == before.splitlines()[:10]  # comments kept
    code, out, _ = run("policy", "check", str(model), "--policy", str(policy_file), "--use", "research")
    assert code == 0, out
    code, out, _ = run("policy", "pin", str(model), "--policy", str(policy_file))
    assert code == 0 and "every pin already matches" in out


def test_pin_updates_a_changed_file_and_never_pins_a_near_licence(tmp_path: Path) -> None:
    model = _upstream_model(tmp_path)
    run("policy", "init", "--from", "builtin:superlinear-exp-v0.1", str(tmp_path / "org"))
    policy_file = tmp_path / "org" / "policy.yaml"
    run("policy", "pin", str(model), "--policy", str(policy_file), "--yes")
    tpl = model / "chat_template.jinja"
    tpl.write_text(tpl.read_text() + "{# changed #}")
    plan = plan_pins(load_policy(policy_file), model)
    assert [(c.key, c.old is not None) for c in plan.changes] == [("chat_template.jinja", True)]
    _old, new = apply_pins(policy_file, plan)
    assert load_policy(policy_file).spec.guardrails.pinned_integrity["chat_template.jinja"] != \
        plan.changes[0].new  # apply_pins writes nothing
    assert plan.changes[0].new in new
    # a licence with a reference text and one clause changed is a near match: reported, never pinned
    demo = tmp_path / "demo"
    shutil.copytree(demo_model_dir(), demo)
    lic = demo / "LICENSE"
    text = lic.read_text()
    assert "a perpetual," in text
    lic.write_text(text.replace("a perpetual,", "a revocable,", 1))
    run("policy", "init", "--from", "builtin:demo", str(tmp_path / "demo-policy"))
    code, doc = run_json("policy", "pin", str(demo), "--policy", str(tmp_path / "demo-policy/policy.yaml"))
    assert code == 0
    assert not any(c["field"].startswith("spec.licenses.fingerprints") for c in doc["changes"])
    assert len(doc["unresolved"]) == 1 and "near" in doc["unresolved"][0] and "never pinned" in doc["unresolved"][0]


def test_pin_refuses_builtin_and_missing_files(tmp_path: Path) -> None:
    code, doc = run_json("policy", "pin", str(tmp_path), "--policy", "builtin:superlinear-exp-v0.1")
    assert code == 2 and "policy init" in doc["error"]["hint"]
    run("policy", "init", "--from", "builtin:superlinear-exp-v0.1", str(tmp_path / "org"))
    (tmp_path / "empty").mkdir()
    code, doc = run_json("policy", "pin", str(tmp_path / "empty"), "--policy", str(tmp_path / "org/policy.yaml"))
    assert code == 2 and doc["error"]["rule"] == "POLICY-PIN"


def test_lock_unknown_hint_names_the_lock_add_command(tmp_path: Path) -> None:
    """generate/verify against a lock without the model: the hint is a command, not a Python function."""
    model = tmp_path / "m"
    shutil.copytree(demo_model_dir(), model, ignore=shutil.ignore_patterns("model.sig"))
    run("keygen", "--out", str(tmp_path / "k.pem"))
    run("sign", str(model), "--key", str(tmp_path / "k.pem"))
    code, doc = run_json("verify", str(model), "--public-key", str(tmp_path / "k.pub.pem"), "--lock",
                         str(REPO / "manifests/trusted/models.lock.json"))
    assert code == 1
    hints = json.dumps(doc["error"])
    assert "secure-run lock add" in hints and "pin_model" not in hints
