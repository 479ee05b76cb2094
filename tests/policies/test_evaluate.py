"""Every check passing and failing, the modes, and the non-waivable floor."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from policies_support import APACHE, CHATML, DELETE, PolicyFactory, good_facts, result, results

from secure_run.errors import PolicyViolation
from secure_run.policies import FLOOR_CHECKS, GuardrailFacts, SandboxFacts, SignatureFacts, evaluate

ALL_CHECKS = {f"S{i}" for i in range(1, 11)} | {f"A{i}" for i in range(1, 6)} | {"L1", "L2"} | {f"G{i}" for i in range(1, 8)}


def test_everything_in_order_is_allowed(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy()
    decision = evaluate(policy, good_facts(model_dir))
    assert decision.allowed, decision.render_text()
    assert {f.check for f in decision.findings} == ALL_CHECKS
    assert {f.result for f in decision.findings} <= {"pass", "info"}
    assert decision.policy_sha256 == policy.sha256
    assert decision.license is not None and decision.license["license_id"] == "Apache-2.0"
    assert decision.banner == "tiny-model, Apache-2.0."
    assert decision.model_root_digest == "ab" * 32
    decision.raise_if_denied()
    json.dumps(decision.to_json())


def deny(make_policy: PolicyFactory, model_dir: Path, check: str, patch: dict | None = None, **facts: object) -> str:
    decision = evaluate(make_policy(patch), good_facts(model_dir, **facts))
    assert not decision.allowed
    found = results(decision, check)
    assert [r for r, _ in found] == ["deny"], decision.render_text()
    others = [f.check for f in decision.denials() if f.check != check]
    assert others == [], decision.render_text()
    return found[0][1]


# --- S: artifact and sandbox -------------------------------------------------------------------


def test_s1_unsigned_model(make_policy: PolicyFactory, model_dir: Path) -> None:
    sig = SignatureFacts(verified=False, digests_matched=True, lock_matched=True)
    decision = evaluate(make_policy(), good_facts(model_dir, signature=sig))
    assert result(decision, "S1") == "deny" and result(decision, "S2") == "deny"


def test_s1_missing_signature_fact_denies_at_run_stage(make_policy: PolicyFactory, model_dir: Path) -> None:
    decision = evaluate(make_policy(), good_facts(model_dir, signature=None))
    assert [result(decision, c) for c in ("S1", "S2", "S3")] == ["deny"] * 3
    check = evaluate(make_policy(), good_facts(model_dir, signature=None), stage="check")
    assert [result(check, c) for c in ("S1", "S2", "S3")] == ["info"] * 3


def test_s2_signer_must_be_named(make_policy: PolicyFactory, model_dir: Path) -> None:
    msg = deny(make_policy, model_dir, "S2", {"spec": {"signatures": {"signers": ["org-release-key"]}}})
    assert msg == "signer 'demo-key' is not one of the policy's signers"
    ok = evaluate(make_policy({"spec": {"signatures": {"signers": ["demo-key"]}}}), good_facts(model_dir))
    assert result(ok, "S2") == "pass"


@pytest.mark.parametrize(
    ("sig", "text"),
    [
        (SignatureFacts(verified=True, signer="demo-key", digests_matched=False, lock_matched=True), "file digests"),
        (SignatureFacts(verified=True, signer="demo-key", digests_matched=True, lock_matched=False), "lock entry"),
    ],
)
def test_s3_digest_and_lock_failures(make_policy: PolicyFactory, model_dir: Path, sig: SignatureFacts, text: str) -> None:
    assert text in deny(make_policy, model_dir, "S3", signature=sig)


def test_s3_root_digest_pin(make_policy: PolicyFactory, model_dir: Path) -> None:
    msg = deny(make_policy, model_dir, "S3", {"spec": {"artifact": {"root_digest": "cd" * 32}}})
    assert msg == f"root digest {'ab' * 32} != policy pin {'cd' * 32}"


def test_s3_no_lock_is_a_warning(make_policy: PolicyFactory, model_dir: Path) -> None:
    sig = SignatureFacts(verified=True, signer="k", digests_matched=True, root_digest="ab" * 32, lock_matched=None)
    decision = evaluate(make_policy(), good_facts(model_dir, signature=sig))
    assert result(decision, "S3") == "warn" and decision.allowed


@pytest.mark.parametrize(
    "name", ["modeling_x.py", "__pycache__/modeling_x.cpython-311.pyc", "sub/weights.bin", "x.pkl", "lib.so"]
)
def test_s4_code_and_pickle_files_in_the_folder(make_policy: PolicyFactory, model_dir: Path, name: str) -> None:
    path = model_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    assert name in deny(make_policy, model_dir, "S4")


def test_s4_code_files_reported_by_the_inventory(make_policy: PolicyFactory, model_dir: Path) -> None:
    assert "renamed.safetensors" in deny(make_policy, model_dir, "S4", code_files=("renamed.safetensors",))


def test_s5_network_enabled(make_policy: PolicyFactory, model_dir: Path) -> None:
    sb = SandboxFacts(enabled=True, backend="docker", network_enabled=True)
    assert deny(make_policy, model_dir, "S5", sandbox=sb) == "the sandbox has network access"


def test_s6_unsandboxed_or_writable(make_policy: PolicyFactory, model_dir: Path) -> None:
    sb = SandboxFacts(enabled=False, network_enabled=False, read_only_model=False)
    assert deny(make_policy, model_dir, "S6", sandbox=sb) == "the run is not sandboxed; the model folder is mounted writable"


def test_s7_pinned_file_changed(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy()
    (model_dir / "NOTICE").write_text("tampered\nLicensed under the Apache License, Version 2.0.\n")
    decision = evaluate(policy, good_facts(model_dir))
    assert result(decision, "S7") == "deny"
    assert "NOTICE: sha256" in results(decision, "S7")[0][1]


def test_s7_unpinned_value_names_the_hash_to_pin(make_policy: PolicyFactory, model_dir: Path) -> None:
    msg = deny(make_policy, model_dir, "S7", {"spec": {"artifact": {"files": {"pinned": {"README.md": None}}}}})
    assert "README.md: not pinned yet (review it, then pin sha256" in msg


def test_s8_expired_policy(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy({"metadata": {"expires": "2026-01-31"}})
    decision = evaluate(policy, good_facts(model_dir), now=datetime(2026, 2, 1, tzinfo=UTC))
    assert result(decision, "S8") == "deny"
    # the last valid day warns (30-day notice); a day before the notice period passes
    assert result(evaluate(policy, good_facts(model_dir), now=datetime(2026, 1, 31, tzinfo=UTC)), "S8") == "warn"
    assert result(evaluate(policy, good_facts(model_dir), now=datetime(2026, 1, 1, tzinfo=UTC)), "S8") == "warn"
    assert result(evaluate(policy, good_facts(model_dir), now=datetime(2025, 12, 31, tzinfo=UTC)), "S8") == "pass"


def test_s9_unlisted_file_and_symlink(make_policy: PolicyFactory, model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "notes.txt").write_text("x")
    (model_dir / "weights.gguf").write_text("x")
    (model_dir / "link.json").symlink_to(tmp_path / "elsewhere.json")
    msg = deny(make_policy, model_dir, "S9")
    assert msg == "links / special files: link.json (symlink); denied by files.deny: weights.gguf; not in files.allow: notes.txt"


# --- A: licence and notices ----------------------------------------------------------------------


def test_a1_missing_license(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy()
    (model_dir / "LICENSE").unlink()
    decision = evaluate(policy, good_facts(model_dir))
    assert results(decision, "A1") == [("deny", "licence file problem: LICENSE: missing")]


def test_a1_changed_clause_is_denied(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy({"spec": {"artifact": {"files": {"pinned": {"LICENSE": None}}}}})
    (model_dir / "LICENSE").write_text(APACHE.replace("grants to You a perpetual,", "grants to You a revocable,", 1))
    decision = evaluate(policy, good_facts(model_dir))
    (res, msg), = results(decision, "A1")
    assert res == "deny"
    assert "resembles Apache-2.0 but its text differs from every reviewed copy (fingerprint mismatch)" in msg
    assert "'perpetual,' -> 'revocable,'" in msg
    # the changed text can never be accepted either
    assert result(decision, "L1") == "pass"  # acceptance not required by this policy


def test_a1_licence_symlink_is_refused(make_policy: PolicyFactory, model_dir: Path, tmp_path: Path) -> None:
    policy = make_policy({"spec": {"artifact": {"files": {"pinned": {"LICENSE": None}}}}})
    (tmp_path / "real").write_text(APACHE)
    (model_dir / "LICENSE").unlink()
    (model_dir / "LICENSE").symlink_to(tmp_path / "real")
    decision = evaluate(policy, good_facts(model_dir))
    assert results(decision, "A1")[0][0] == "deny"
    assert "without following links" in results(decision, "A1")[0][1]


def test_a1_wrong_but_allowed_licence(make_policy: PolicyFactory, model_dir: Path) -> None:
    mit = (Path(__file__).resolve().parents[2] / "policies/data/licenses/texts/MIT.txt").read_text()
    policy = make_policy({"spec": {"artifact": {"files": {"pinned": {"LICENSE": None}}}}})
    (model_dir / "LICENSE").write_text(mit)
    decision = evaluate(policy, good_facts(model_dir))
    assert results(decision, "A1")[0] == ("deny", "LICENSE is MIT; the policy expects Apache-2.0")


def test_a2_notice_without_attribution(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy({"spec": {"artifact": {"files": {"pinned": {"NOTICE": None}}}}})
    (model_dir / "NOTICE").write_text("tiny-model\nCopyright 2026\n")
    decision = evaluate(policy, good_facts(model_dir))
    assert results(decision, "A2") == [("deny", "NOTICE lacks 'Licensed under the Apache License, Version 2.0.'")]


def test_a2_normalised_match_tolerates_layout(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy({"spec": {"artifact": {"files": {"pinned": {"NOTICE": None}}}}})
    (model_dir / "NOTICE").write_text("LICENSED under the Apache\n  License,   Version 2.0.\n")
    assert result(evaluate(policy, good_facts(model_dir)), "A2") == "pass"


def test_a2_missing_required_file(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy({"spec": {"notices": {"required_files": ["LICENSE", "NOTICE", "USE_POLICY.md"]}}})
    assert "required file USE_POLICY.md: missing" in results(evaluate(policy, good_facts(model_dir)), "A2")[0][1]


def test_a3_card_mismatch(make_policy: PolicyFactory, model_dir: Path) -> None:
    msg = deny(make_policy, model_dir, "A3", {"spec": {"artifact": {"card": {"license": "other", "license_name": "x"}}}})
    assert msg == ("model card front matter disagrees with the policy: license: card has 'apache-2.0', policy "
                   "expects 'other'; license_name: card has None, policy expects 'x'")


def test_a3_card_without_front_matter_or_duplicate_keys(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy()
    (model_dir / "README.md").write_text("# no front matter\n")
    assert "has no YAML front matter" in results(evaluate(policy, good_facts(model_dir)), "A3")[0][1]
    (model_dir / "README.md").write_text("---\nlicense: apache-2.0\nlicense: other\n---\n")
    assert "duplicate key 'license'" in results(evaluate(policy, good_facts(model_dir)), "A3")[0][1]


def test_a4_banner_must_carry_attribution(make_policy: PolicyFactory, model_dir: Path) -> None:
    decision = evaluate(make_policy(), good_facts(model_dir))
    assert result(decision, "A4") == "pass"
    off = evaluate(make_policy({"spec": {"notices": {"display": {"when": "never"}}}}), good_facts(model_dir))
    assert result(off, "A4") == "info" and off.banner is None


def test_a5_patent_notice(make_policy: PolicyFactory, model_dir: Path) -> None:
    notice = {"file": "README.md", "text": "Patent applications have been filed."}
    decision = evaluate(make_policy({"spec": {"notices": {"patent_notice": notice}}}), good_facts(model_dir))
    assert results(decision, "A5") == [("warn", "README.md lacks the expected patent notice 'Patent applications have been filed.'")]
    with (model_dir / "README.md").open("a") as fh:
        fh.write("\nPatent applications have been\nfiled.\n")
    decision = evaluate(make_policy({"spec": {"notices": {"patent_notice": notice}}}), good_facts(model_dir))
    assert result(decision, "A5") == "info" and decision.patent_notice == ("Patent applications have been filed.",)


# --- G: guardrails -----------------------------------------------------------------------------------


def test_g1_modified_chat_template(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy()
    (model_dir / "chat_template.jinja").write_text(CHATML.replace("{{ message['content'] }}", "{{ message['content'] | replace('system', '') }}"))
    decision = evaluate(policy, good_facts(model_dir))
    (res, msg), = results(decision, "G1")
    assert res == "deny" and msg.startswith("guardrail integrity broken: chat_template.jinja: sha256")


def test_g1_forbidden_override(make_policy: PolicyFactory, model_dir: Path) -> None:
    gf = GuardrailFacts(overrides=frozenset({"adapters"}))
    assert "forbidden run-time overrides in effect: ['adapters']" in deny(make_policy, model_dir, "G1", guardrails=gf)


def test_g2_abliterated_lineage(make_policy: PolicyFactory, model_dir: Path) -> None:
    (model_dir / "README.md").write_text("---\nlicense: apache-2.0\ntags: [demo, Abliterated]\nbase_model: x/y-uncensored\n---\n")
    decision = evaluate(make_policy(), good_facts(model_dir))
    assert results(decision, "G2") == [("deny", "model lineage suggests removed safety training: abliterated, x/y-uncensored")]


def test_g3_model_rail_engine_must_be_available(make_policy: PolicyFactory, model_dir: Path) -> None:
    flt = {"engine": "classifier", "model_dir": "/opt/guard", "model_sha256": "1" * 64}
    # replace the keyword filter whole: its blocklist keys must not leak into the classifier filter
    policy = make_policy({"spec": {"guardrails": {"output_filter": {"blocklist": DELETE, "blocklist_sha256": DELETE} | flt}}})
    msg = results(evaluate(policy, good_facts(model_dir)), "G3")[0]
    assert msg == ("deny", "output_filter uses engine 'classifier', which is not available on this host")
    ok = evaluate(policy, good_facts(model_dir, guardrails=GuardrailFacts(available_rails=frozenset({"classifier"}))))
    assert result(ok, "G3") == "pass"


def test_g4_over_long_prompt_and_too_many_tokens(make_policy: PolicyFactory, model_dir: Path) -> None:
    assert deny(make_policy, model_dir, "G4", prompt_tokens=1025) == "prompt is 1025 tokens; limit max_input_tokens=1024"
    assert deny(make_policy, model_dir, "G4", prompt="x" * 4001) == "prompt is 4001 characters; limit max_prompt_chars=4000"
    assert deny(make_policy, model_dir, "G4", max_new_tokens=257) == "257 new tokens requested; limit max_new_tokens=256"


@pytest.mark.parametrize("use", ["illegal_surveillance", "Illegal Surveillance", "harassment-or-deception", "unlawful_use"])
def test_g5_declared_prohibited_use(make_policy: PolicyFactory, model_dir: Path, use: str) -> None:
    assert "is prohibited" in deny(make_policy, model_dir, "G5", declared_use=use)


def test_g5_use_outside_allowed_list_and_missing(make_policy: PolicyFactory, model_dir: Path) -> None:
    assert "is not one of the allowed uses" in deny(make_policy, model_dir, "G5", declared_use="marketing")
    assert deny(make_policy, model_dir, "G5", declared_use=None) == "a declared use is required and none was given"


def test_g5_production_on_research_only_model_warns(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy({"spec": {"artifact": {"research_only": True}}})
    decision = evaluate(policy, good_facts(model_dir, declared_use="production"))
    assert result(decision, "G5") == "warn" and decision.allowed


def test_g6_guardrail_off_without_compensation_in_every_mode(make_policy: PolicyFactory, model_dir: Path) -> None:
    gf = GuardrailFacts(disabled=frozenset({"output_filter"}))
    for mode in ("enforce", "warn", "audit"):
        decision = evaluate(make_policy({"spec": {"mode": mode}}), good_facts(model_dir, guardrails=gf))
        (g6,) = [f for f in decision.findings if f.check == "G6"]
        assert (g6.result, g6.floor, decision.allowed) == ("deny", True, False), mode


def test_g6_compensating_guardrail_must_be_active(make_policy: PolicyFactory, model_dir: Path) -> None:
    comp = {"name": "llama-guard-3", "approver": "security@example.org"}
    policy = make_policy({"spec": {"guardrails": {"allow_disable": True, "compensating_guardrail": comp}}})
    off = GuardrailFacts(disabled=frozenset({"output_filter"}))
    decision = evaluate(policy, good_facts(model_dir, guardrails=off))
    assert "compensating guardrail 'llama-guard-3' is not active" in results(decision, "G6")[0][1]
    active = GuardrailFacts(disabled=frozenset({"output_filter"}), available_rails=frozenset({"llama-guard-3"}))
    decision = evaluate(policy, good_facts(model_dir, guardrails=active))
    assert result(decision, "G6") == "pass" and decision.allowed


def test_g7_audit_log_symlink(make_policy: PolicyFactory, model_dir: Path, state: Path) -> None:
    (state / "audit.jsonl").symlink_to(state / "elsewhere")
    assert deny(make_policy, model_dir, "G7") == f"audit log {state / 'audit.jsonl'} is a symlink"


# --- modes and the floor -------------------------------------------------------------------------------


def test_warn_mode_downgrades_waivable_denials(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy({"spec": {"mode": "warn"}})
    decision = evaluate(policy, good_facts(model_dir, declared_use="illegal_surveillance", prompt_tokens=5000))
    assert decision.allowed
    g5 = next(f for f in decision.findings if f.check == "G5")
    assert (g5.result, g5.downgraded) == ("warn", True)
    assert "[downgraded by mode warn]" in decision.render_text()
    assert {f.check for f in decision.visible_findings()} == ALL_CHECKS


def test_audit_mode_hides_findings_from_the_operator(make_policy: PolicyFactory, model_dir: Path) -> None:
    policy = make_policy({"spec": {"mode": "audit"}})
    decision = evaluate(policy, good_facts(model_dir, declared_use="illegal_surveillance"))
    assert decision.allowed and decision.visible_findings() == []
    assert "G5" not in decision.render_text()
    assert any(f.check == "G5" and f.result == "warn" for f in decision.findings)  # still in the audit record


@pytest.mark.parametrize("mode", ["enforce", "warn", "audit"])
def test_floor_denies_in_every_mode(make_policy: PolicyFactory, model_dir: Path, mode: str) -> None:
    (model_dir / "__pycache__").mkdir()
    (model_dir / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\xa7\r\r\n")
    sig = SignatureFacts(verified=False, digests_matched=False, lock_matched=False)
    sb = SandboxFacts(enabled=True, network_enabled=True)
    gf = GuardrailFacts(disabled=frozenset({"input_filter"}))
    policy = make_policy({"spec": {"mode": mode}})
    decision = evaluate(policy, good_facts(model_dir, signature=sig, sandbox=sb, guardrails=gf))
    assert not decision.allowed
    denied = {f.check for f in decision.denials()}
    assert {"S1", "S3", "S4", "S5", "G6"} <= denied
    assert denied <= FLOOR_CHECKS
    with pytest.raises(PolicyViolation) as info:
        decision.raise_if_denied()
    assert info.value.exit_code == 1


def test_enforce_mode_denies_waivable(make_policy: PolicyFactory, model_dir: Path) -> None:
    decision = evaluate(make_policy(), good_facts(model_dir, declared_use="illegal_surveillance"))
    with pytest.raises(PolicyViolation) as info:
        decision.raise_if_denied()
    assert info.value.rule == "G5"
    assert "G5: declared use 'illegal_surveillance' is prohibited" in info.value.details[0]


def test_not_a_folder(make_policy: PolicyFactory, tmp_path: Path) -> None:
    decision = evaluate(make_policy(), good_facts(tmp_path / "nope"))
    assert [f.check for f in decision.denials()] == ["S4"]


def test_evaluation_never_writes_to_the_model_folder(make_policy: PolicyFactory, model_dir: Path) -> None:
    before = sorted((p.name, p.stat().st_mtime_ns) for p in model_dir.iterdir())
    evaluate(make_policy(), good_facts(model_dir))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model_dir.iterdir()) == before
    assert not os.access(model_dir / "LICENSE", os.X_OK)


REV = "0123456789abcdef0123456789abcdef01234567"
SOURCE = {"spec": {"artifact": {"source": {"hf_repo": "org/model", "revision": REV}}}}


def _provenance(model_dir: Path, repo: str, revision: str) -> None:
    doc = {"_type": "https://in-toto.io/Statement/v1",
           "predicate": {"buildDefinition": {"externalParameters": {"source": {"repository": repo, "revision": revision}}}}}
    (model_dir / "provenance.intoto.json").write_text(json.dumps(doc))


def test_s10_source_in_the_policy_requires_the_signed_provenance(make_policy: PolicyFactory, model_dir: Path) -> None:
    message = deny(make_policy, model_dir, "S10", SOURCE)
    assert "provenance.intoto.json is missing" in message and f"org/model@{REV}" in message


def test_s10_provenance_naming_another_revision_is_denied(make_policy: PolicyFactory, model_dir: Path) -> None:
    _provenance(model_dir, "org/model", "f" * 40)
    message = deny(make_policy, model_dir, "S10", SOURCE)
    assert f"imported from org/model@{'f' * 40}" in message and f"requires org/model@{REV}" in message


def test_s10_provenance_naming_the_policy_source_passes(make_policy: PolicyFactory, model_dir: Path) -> None:
    _provenance(model_dir, "org/model", REV)
    decision = evaluate(make_policy(SOURCE), good_facts(model_dir))
    assert result(decision, "S10") == "pass" and decision.allowed, decision.render_text()


def test_s10_malformed_provenance_is_denied(make_policy: PolicyFactory, model_dir: Path) -> None:
    (model_dir / "provenance.intoto.json").write_text('{"predicate": {}, "predicate": {}}')
    assert "not strict JSON" in deny(make_policy, model_dir, "S10", SOURCE)


def test_s10_without_a_source_is_info(make_policy: PolicyFactory, model_dir: Path) -> None:
    assert result(evaluate(make_policy(), good_facts(model_dir)), "S10") == "info"
