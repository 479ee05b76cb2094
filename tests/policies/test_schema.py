"""Policy schema: strict fields, every cross-field rule (P1-P11), floor waivers refused, the hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from policies_support import DELETE, PolicyFactory

from secure_run.policies import PolicyFileError, load_policy
from secure_run.policies.policy import parse_policy, policy_sha256


def refused(make_policy: PolicyFactory, patch: dict[str, Any]) -> PolicyFileError:
    with pytest.raises(PolicyFileError) as info:
        make_policy(patch)
    assert info.value.exit_code == 2
    return info.value


def test_base_policy_loads(make_policy: PolicyFactory) -> None:
    policy = make_policy()
    assert policy.mode == "enforce"
    assert policy.input_patterns is not None and len(policy.input_patterns.patterns) == 3
    assert policy.limits().max_new_tokens == 256


def test_unknown_field_is_refused(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"guardrails": {"allow_disabel": True}}})
    assert err.rule == "policy.schema"
    assert "spec.guardrails.allow_disabel: unknown field" in err.message


def test_unknown_top_level_field_is_refused(make_policy: PolicyFactory) -> None:
    assert "bypass: unknown field" in refused(make_policy, {"bypass": True}).message


def test_strict_types_no_coercion(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"guardrails": {"limits": {"max_new_tokens": "256"}}}})
    assert "spec.guardrails.limits.max_new_tokens" in err.message


def test_mode_must_be_known(make_policy: PolicyFactory) -> None:
    assert "spec.mode" in refused(make_policy, {"spec": {"mode": "permissive"}}).message


def test_revision_must_be_a_commit(make_policy: PolicyFactory) -> None:
    patch = {"spec": {"artifact": {"source": {"hf_repo": "a/b", "revision": "main"}}}}
    assert "spec.artifact.source.revision" in refused(make_policy, patch).message


def test_pinned_path_traversal_is_refused(make_policy: PolicyFactory) -> None:
    patch = {"spec": {"artifact": {"files": {"pinned": {"../etc/passwd": "0" * 64}}}}}
    assert "not a clean relative path" in refused(make_policy, patch).message


# --- floor waivers: a policy cannot lower the non-waivable floor -----------------------------


def test_p4_remote_code_is_refused(make_policy: PolicyFactory) -> None:
    patch = {"spec": {"artifact": {"remote_code": {"allowed": True, "reviewed": []}}}}
    err = refused(make_policy, patch)
    assert err.rule == "P4"
    assert ".py files are refused everywhere" in err.message


def test_p5_network_cannot_be_enabled(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"sandbox": {"network": "bridge"}}})
    assert err.rule == "P5"
    assert "sandbox.network is 'bridge'" in err.message


@pytest.mark.parametrize("dropped", ["*.pyc", "__pycache__/**", "*.py"])
def test_p6_floor_deny_patterns_cannot_be_dropped(make_policy: PolicyFactory, dropped: str) -> None:
    deny = [p for p in ["*.py", "*.pyc", "__pycache__/**"] if p != dropped]
    err = refused(make_policy, {"spec": {"artifact": {"files": {"deny": deny}}}})
    assert err.rule == "P6"
    assert f"missing ['{dropped}']" in err.message


@pytest.mark.parametrize("pattern", ["*.py", "*", "model*", "__pycache__/*", "*.p[y]", "x/*.py"])
def test_p6_allow_cannot_admit_code(make_policy: PolicyFactory, pattern: str) -> None:
    err = refused(make_policy, {"spec": {"artifact": {"files": {"allow": ["*.json", pattern]}}}})
    assert err.rule == "P6"
    assert "admits code" in err.message


def test_p7_unsigned_models_cannot_be_allowed(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"signatures": {"required": False}}})
    assert err.rule == "P7"
    assert "unsigned model is a non-waivable floor check" in err.message


def test_p1_allow_disable_needs_compensating_guardrail(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"guardrails": {"allow_disable": True}}})
    assert err.rule == "P1"
    assert "allow_disable: true requires compensating_guardrail" in err.message


def test_p1_missing_filter_is_a_disabled_guardrail(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"guardrails": {"output_filter": DELETE}}})
    assert err.rule == "P1"
    assert "guardrails left off (output_filter)" in err.message


def test_p1_dropping_a_forbidden_override_needs_compensation(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"guardrails": {"forbid_overrides": ["chat_template"]}}})
    assert err.rule == "P1"
    assert "forbid_overrides:adapters" in err.message


def test_p1_satisfied_by_named_compensating_guardrail(make_policy: PolicyFactory) -> None:
    comp = {"name": "llama-guard", "approver": "security-team"}
    policy = make_policy({"spec": {"guardrails": {"allow_disable": True, "compensating_guardrail": comp}}})
    assert policy.spec.guardrails.compensating_guardrail is not None


def test_p2_weights_licence_must_be_allowed_and_catalogued(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"licenses": {"weights_expression": "GPL-3.0-only"}}})
    assert err.rule == "P2" and "'GPL-3.0-only' is not in the licence catalogue" in err.message
    err = refused(make_policy, {"spec": {"licenses": {"allowed": ["MIT"]}}})
    assert "'Apache-2.0' is not in licenses.allowed" in err.message
    err = refused(make_policy, {"spec": {"licenses": {"weights_expression": "Apache-2.0 AND"}}})
    assert "ends too early" in err.message
    err = refused(make_policy, {"spec": {"licenses": {"denied": ["MIT"]}}})
    assert "both allowed and denied: ['MIT']" in err.message


def test_p2_catalog_cannot_redefine_builtin(make_policy: PolicyFactory) -> None:
    entry = {"id": "Apache-2.0", "name": "fake", "fingerprints": ["0" * 64]}
    assert "redefines built-in entries ['Apache-2.0']" in refused(make_policy, {"spec": {"licenses": {"catalog": [entry]}}}).message


def test_p3_p8_p11_oml_obligations(make_policy: PolicyFactory) -> None:
    oml = "LicenseRef-NVIDIA-OML-2025-10-24"
    lic = {"weights_expression": oml, "allowed": [oml, "Apache-2.0"]}
    acc = {"required": True}
    err = refused(make_policy, {"spec": {"licenses": lic, "acceptance": acc, "guardrails": {"pinned_integrity": DELETE}}})
    assert err.rule == "P3"
    patch = {"spec": {"licenses": lic, "acceptance": acc, "guardrails": {"prohibited_uses": ["unlawful_use"]}}}
    err = refused(make_policy, patch)
    assert err.rule == "P8" and "illegal_surveillance" in err.message
    err = refused(make_policy, {"spec": {"licenses": lic}})
    assert err.rule == "P11"
    ok = make_policy({"spec": {"licenses": lic, "acceptance": {"required": True}}})
    assert ok.spec.weights_entries()[0].id == oml


@pytest.mark.parametrize(
    "regex", ["(a+)+", "a*", "(?=x)", "\\1", "^bomb", "[a-z]{1,64}[a-z]{1,64}[a-z]{1,64}", "a{3,}", "(x)"]
)
def test_p9_unsafe_regexes_are_refused(make_policy: PolicyFactory, regex: str) -> None:
    err = refused(make_policy, {"spec": {"guardrails": {"input_filter": {"patterns": [{"regex": regex}]}}}})
    assert err.rule == "P9"


def test_p9_blocklist_must_match_its_pin(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"guardrails": {"input_filter": {"blocklist_sha256": "0" * 64}}}})
    assert err.rule == "P9"
    assert "does not match blocklist_sha256" in err.message


def test_p9_blocklist_needs_a_pin(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"guardrails": {"input_filter": {"blocklist_sha256": DELETE}}}})
    assert "blocklist and blocklist_sha256 go together" in err.message


def test_p10_default_use_cannot_be_prohibited(make_policy: PolicyFactory) -> None:
    patch = {"spec": {"guardrails": {"declared_use": {"allowed": ["research", "unlawful_use"]}}}}
    assert refused(make_policy, patch).rule == "P10"


def test_relative_state_paths_are_refused(make_policy: PolicyFactory) -> None:
    err = refused(make_policy, {"spec": {"guardrails": {"audit_log": "audit.jsonl"}}})
    assert err.rule == "policy.paths"


def test_policy_file_symlink_is_refused(make_policy: PolicyFactory, tmp_path: Path) -> None:
    make_policy()
    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "policy0" / "policy.yaml")
    with pytest.raises(PolicyFileError, match="without following links"):
        load_policy(link)


def test_hash_is_canonical(make_policy: PolicyFactory, tmp_path: Path) -> None:
    a = make_policy()
    text = (tmp_path / "policy0" / "policy.yaml").read_text()
    reordered = yaml.safe_dump(yaml.safe_load(text), sort_keys=True)  # same content, other key order
    b = parse_policy(reordered.encode(), source="b.yaml", base_dir=tmp_path / "policy0")
    assert a.sha256 == b.sha256 == policy_sha256(b.document)
    c = make_policy({"spec": {"guardrails": {"limits": {"max_new_tokens": 255}}}})
    assert c.sha256 != a.sha256


def test_yaml_attacks_are_refused_for_policy_files(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("apiVersion: secure-run/v1alpha1\nkind: RunPolicy\nspec: {mode: enforce}\nspec: {mode: audit}\n")
    with pytest.raises(PolicyFileError, match="duplicate key 'spec' at line 4") as info:
        load_policy(path)
    assert info.value.rule == "yaml.safe"
    path.write_text("a: &x [1, 2]\nb: [*x, *x, *x]\n")
    with pytest.raises(PolicyFileError, match="anchors are refused"):
        load_policy(path)


# -- issue 10 item 7: values PyYAML cannot convert end in a refusal, not a ValueError ---------------


@pytest.mark.parametrize(
    ("line", "fragment"),
    [("  expires: 2024-02-30", "not a valid date"), ("  expires: " + "9" * 5000, "integer of 5000 characters")],
    ids=["date 2024-02-30", "5000-digit int"],
)
def test_unconvertible_yaml_values_in_a_policy_are_refused(tmp_path: Path, line: str, fragment: str) -> None:
    from secure_run.policies.policy import default_policy_path

    text = default_policy_path("superlinear-exp-v0.1").read_text()
    assert "  expires: 2027-12-31" in text
    path = tmp_path / "p.policy.yaml"
    path.write_text(text.replace("  expires: 2027-12-31", line))
    with pytest.raises(PolicyFileError) as info:
        load_policy(path)
    assert info.value.rule == "yaml.safe" and info.value.exit_code == 2
    assert fragment in info.value.message and "line 15" in info.value.message


@pytest.mark.parametrize("value", ["2024-02-30", "9" * 5000])
def test_unconvertible_values_in_readme_front_matter_are_a_card_error(value: str) -> None:
    from secure_run.policies.card import CardError, front_matter

    with pytest.raises(CardError) as info:
        front_matter(f"---\nlicense: other\ndate: {value}\n---\n# Model\n")
    assert "line 3" in str(info.value)  # the line in README.md
