"""The default Superlinear-Exp-v0.1 policy on an upstream-like snapshot, before and after review.

Run with ``-s`` to see both decisions as the operator would (the closing note quotes them).
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import yaml
from policies_support import PATENT, good_facts, result, sha, upstream_superlinear_files, write_files

from secure_run.policies import (
    AcceptanceStore,
    SignatureFacts,
    accept_license,
    default_policy,
    default_policy_path,
    evaluate,
    load_policy,
)
from secure_run.policies.licenses import license_fingerprint

OML = "LicenseRef-NVIDIA-OML-2025-10-24"
ACKS = ["no_ip_litigation", "export_compliance", "revocable_terms", "research_only_model", "trustworthy_ai_terms"]
UNSIGNED = SignatureFacts(verified=False, digests_matched=False)
#: inside the default policy's validity period (metadata.expires: 2026-12-31), whatever the clock says
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_upstream_snapshot_is_denied_with_actionable_findings(tmp_path: Path, state: Path) -> None:
    folder = write_files(tmp_path / "superlinear-exp-v0.1", upstream_superlinear_files())
    policy = default_policy("superlinear-exp-v0.1")
    decision = evaluate(policy, good_facts(folder, signature=UNSIGNED), now=NOW)
    print("\n" + decision.render_text())
    assert not decision.allowed
    denied = {f.check: f for f in decision.denials()}
    assert set(denied) == {"S1", "S2", "S3", "S4", "S7", "S10", "A1", "G1", "L1", "L2"}  # S10: not imported
    assert {c for c, f in denied.items() if f.floor} == {"S1", "S2", "S3", "S4", "S7", "G1"}
    assert denied["S4"].message == (
        "code or pickle-capable files present: __pycache__/modeling_superlinear_exp.cpython-311.pyc, "
        "configuration_superlinear_exp.py, modeling_superlinear_exp.py, moe.py"
    )
    assert denied["A1"].message == f"LICENSE has the structure of {OML} but no reviewed fingerprint is pinned"
    assert denied["A1"].hint is not None and license_fingerprint(upstream_superlinear_files()["LICENSE"]) in denied["A1"].hint  # type: ignore[arg-type]
    # the licence-derived checks that can pass already do
    for check in ("A2", "A3", "G2", "G3", "G4", "G5", "S5", "S6"):
        assert result(decision, check) == "pass", check
    assert result(decision, "A5") == "info" and decision.patent_notice == (PATENT,)
    assert decision.banner is not None and "Licensed by NVIDIA Corporation under the NVIDIA Open Model License" in decision.banner


def reviewed_policy(folder: Path, dest: Path) -> Path:
    """The default policy completed at review: every null pin filled, the OML fingerprint pinned."""
    source = default_policy_path("superlinear-exp-v0.1")
    doc = yaml.safe_load(source.read_text())
    art = doc["spec"]["artifact"]["files"]["pinned"]
    for name in art:
        art[name] = sha((folder / name).read_bytes())
    rails = doc["spec"]["guardrails"]["pinned_integrity"]
    for name in rails:
        rails[name] = sha((folder / name).read_bytes())
    doc["spec"]["licenses"]["fingerprints"] = {OML: [license_fingerprint((folder / "LICENSE").read_text())]}
    dest.mkdir()
    shutil.copy(source.parent / "rails-blocklist.txt", dest / "rails-blocklist.txt")
    (dest / "policy.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest / "policy.yaml"


def test_reviewed_signed_snapshot_is_allowed_after_acceptance(tmp_path: Path, state: Path) -> None:
    files = {k: v for k, v in upstream_superlinear_files().items() if not k.endswith((".py", ".pyc"))}
    folder = write_files(tmp_path / "superlinear-exp-v0.1", files)
    policy = load_policy(reviewed_policy(folder, tmp_path / "reviewed"))
    assert [f.check for f in evaluate(policy, good_facts(folder), now=NOW).denials()] == ["S10", "L1", "L2"]
    source = policy.spec.artifact.source  # imported with --source-repo / --source-revision (S10)
    assert source is not None
    (folder / "provenance.intoto.json").write_text(json.dumps({"predicate": {"buildDefinition": {
        "externalParameters": {"source": {"repository": source.hf_repo, "revision": source.revision}}}}}))
    signed = SignatureFacts(verified=True, signer="org-release-key", digests_matched=True, root_digest="5e" * 32,
                            lock_matched=True)
    facts = good_facts(folder, signature=signed)
    store = AcceptanceStore(policy.acceptance_store_path())
    assert store.path == state / "secure-run" / "licenses.jsonl"
    assert [f.check for f in evaluate(policy, facts, now=NOW).denials()] == ["L1", "L2"]
    accept_license(policy, folder, license_id=OML, operator="alice", acknowledgements=ACKS, store=store)
    decision = evaluate(policy, facts, now=NOW)
    print("\n" + decision.render_text())
    assert decision.allowed, decision.render_text()
    assert decision.license is not None and decision.license["kind"] == "exact"
    # a tampered chat template after review is caught (G1, non-waivable)
    (folder / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}")
    tampered = evaluate(policy, facts, now=NOW)
    assert [f.check for f in tampered.denials()] == ["G1"]


def test_notice_without_the_oml_attribution_is_denied(tmp_path: Path, state: Path) -> None:
    files = upstream_superlinear_files()
    files["NOTICE"] = "Superlinear-Exp-v0.1\n\nA derivative of NVIDIA Nemotron-3-Nano-30B-A3B, modified by Concavity AI.\n"
    folder = write_files(tmp_path / "snap", files)
    decision = evaluate(default_policy("superlinear-exp-v0.1"), good_facts(folder, signature=UNSIGNED), now=NOW)
    (a2,) = [f for f in decision.findings if f.check == "A2"]
    assert a2.result == "deny"
    assert a2.message == "NOTICE lacks 'Licensed by NVIDIA Corporation under the NVIDIA Open Model License'"
