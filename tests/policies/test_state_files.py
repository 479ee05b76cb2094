"""Audit log and licence-acceptance store: append safety, symlinks, permissions, binding rules."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from policies_support import OML_ATTRIBUTION, PolicyFactory, good_facts, oml_license_text, result, write_files

from secure_run.errors import PolicyViolation, UsageError
from secure_run.policies import (
    AcceptanceStore,
    AuditLog,
    StateFileError,
    accept_license,
    audit_record,
    evaluate,
)
from secure_run.policies.guardrails import PatternSet, StreamGuard
from secure_run.policies.licenses import license_fingerprint

# --- audit log -------------------------------------------------------------------------------------


def test_audit_record_of_a_decision_and_run(make_policy: PolicyFactory, model_dir: Path, state: Path) -> None:
    policy = make_policy()
    decision = evaluate(policy, good_facts(model_dir))
    guard = StreamGuard(PatternSet.build([("literal", "pipe bomb")], action="refuse"))
    guard.feed("a pipe bomb")
    guard.finish()
    log = AuditLog(policy.audit_log_path())
    log.append(audit_record(decision, event="run", run_stats={"tokens": 3, "tokens_per_s": 1.5}, guardrail_events=guard.events))
    (rec,) = log.read()
    assert rec["policy_sha256"] == policy.sha256 and rec["model_root_digest"] == "ab" * 32
    assert rec["license_id"] == "Apache-2.0" and rec["license_fingerprint"] == decision.license["fingerprint"]  # type: ignore[index]
    assert rec["host"] and rec["allowed"] is True and rec["event"] == "run" and rec["run_stats"] == {"tokens": 3, "tokens_per_s": 1.5}
    assert rec["guardrail_events"] == [{"stage": "output", "action": "refuse", "rule": "literal:pipe bomb", "offset": 2}]
    assert len(rec["findings"]) == 24  # type: ignore[arg-type]
    assert stat.S_IMODE(os.stat(state / "audit.jsonl").st_mode) == 0o600
    raw = (state / "audit.jsonl").read_bytes()
    assert raw.count(b"\n") == 1 and raw.endswith(b"\n")


def test_audit_log_refuses_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("")
    (tmp_path / "audit.jsonl").symlink_to(target)
    with pytest.raises(StateFileError) as info:
        AuditLog(tmp_path / "audit.jsonl").append({"x": 1})
    assert info.value.rule == "state.symlink"
    assert target.read_text() == ""


def test_audit_log_refuses_group_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o644)
    with pytest.raises(StateFileError, match="must be private") as info:
        AuditLog(path).append({"x": 1})
    assert info.value.rule == "state.mode"


def test_audit_log_refuses_a_directory_and_huge_records(tmp_path: Path) -> None:
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(StateFileError):
        AuditLog(tmp_path / "dir.jsonl").append({"x": 1})
    with pytest.raises(StateFileError, match="over the"):
        AuditLog(tmp_path / "a.jsonl").append({"x": "y" * (2 << 20)})


def test_audit_log_reports_corrupt_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path)
    log.append({"x": 1})
    with path.open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(StateFileError, match=r"a.jsonl:2: not a JSON object"):
        log.read()


def _writer(path: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path))
    for i in range(count):
        log.append({"worker": worker, "i": i, "pad": "x" * (100 + 37 * i)})


def test_concurrent_appends_stay_intact(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 40)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = AuditLog(path).read()
    assert len(records) == 240
    for w in range(6):
        assert [r["i"] for r in records if r["worker"] == w] == list(range(40))


# --- licence acceptance ---------------------------------------------------------------------------

OML = "LicenseRef-NVIDIA-OML-2025-10-24"
ACKS = ["export_compliance", "no_ip_litigation", "revocable_terms", "trustworthy_ai_terms"]


@pytest.fixture
def oml_setup(make_policy: PolicyFactory, tmp_path: Path) -> tuple[Path, PolicyFactory]:
    folder = tmp_path / "model"
    write_files(folder, {"LICENSE": oml_license_text(), "NOTICE": f"{OML_ATTRIBUTION}.\n"})

    def factory(extra: dict | None = None) -> object:
        patch = {
            "spec": {
                "artifact": {"files": {"pinned": {"LICENSE": None, "NOTICE": None}}, "card": {"license": "other"}},
                "licenses": {"weights_expression": OML, "allowed": [OML, "Apache-2.0"],
                             "fingerprints": {OML: [license_fingerprint(oml_license_text())]}},
                "notices": {"required_strings": []},
                "acceptance": {"required": True, "acknowledgements": ACKS},
            }
        }
        if extra:
            patch["spec"].update(extra)
        return make_policy(patch)

    return folder, factory  # type: ignore[return-value]


def test_generation_refused_until_accepted(oml_setup: tuple[Path, PolicyFactory], state: Path) -> None:
    folder, factory = oml_setup
    policy = factory()
    store = AcceptanceStore(policy.acceptance_store_path())
    before = evaluate(policy, good_facts(folder), acceptances=store)
    assert result(before, "L1") == "deny" and result(before, "L2") == "deny"
    l1 = next(f for f in before.findings if f.check == "L1")
    assert l1.hint is not None and l1.hint.startswith(f"secure-run policy accept-license {OML} ")
    record = accept_license(policy, folder, license_id=OML, operator="alice", acknowledgements=ACKS, store=store)
    assert record.license_fingerprint == license_fingerprint(oml_license_text())
    assert record.incorporated == ("NVIDIA Trustworthy AI terms=unpinned",)
    after = evaluate(policy, good_facts(folder), acceptances=store)
    assert result(after, "L1") == "pass" and result(after, "L2") == "pass"
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    # another operator, another policy, or another licence text: refused again
    assert result(evaluate(policy, good_facts(folder, operator="bob"), acceptances=store), "L1") == "deny"
    edited = factory({"mode": "warn"})
    assert result(evaluate(edited, good_facts(folder), acceptances=store), "L1") == "warn"  # downgraded, not passed


def test_changed_licence_text_invalidates_acceptance(oml_setup: tuple[Path, PolicyFactory]) -> None:
    folder, factory = oml_setup
    policy = factory()
    store = AcceptanceStore(policy.acceptance_store_path())
    accept_license(policy, folder, license_id=OML, operator="alice", acknowledgements=ACKS, store=store)
    (folder / "LICENSE").write_text(oml_license_text(variant=" Except where NVIDIA decides otherwise."))
    decision = evaluate(policy, good_facts(folder), acceptances=store)
    assert result(decision, "A1") == "deny" and "fingerprint mismatch" in decision.findings[
        [f.check for f in decision.findings].index("A1")].message
    assert result(decision, "L1") == "deny"
    with pytest.raises(PolicyViolation, match="not exactly identified"):
        accept_license(policy, folder, license_id=OML, operator="alice", acknowledgements=ACKS, store=store)


def test_acceptance_needs_every_acknowledgement_and_the_right_id(oml_setup: tuple[Path, PolicyFactory]) -> None:
    folder, factory = oml_setup
    policy = factory()
    store = AcceptanceStore(policy.acceptance_store_path())
    with pytest.raises(UsageError, match=r"requires acknowledging \['trustworthy_ai_terms'\]"):
        accept_license(policy, folder, license_id=OML, operator="a", acknowledgements=ACKS[:3], store=store)
    with pytest.raises(UsageError, match="unknown acknowledgements"):
        accept_license(policy, folder, license_id=OML, operator="a", acknowledgements=[*ACKS, "whatever"], store=store)
    with pytest.raises(PolicyViolation, match=f"LICENSE is {OML}, not Apache-2.0"):
        accept_license(policy, folder, license_id="Apache-2.0", operator="a", acknowledgements=ACKS, store=store)
    assert store.records() == []


def test_unpinned_oml_cannot_be_accepted(oml_setup: tuple[Path, PolicyFactory]) -> None:
    folder, factory = oml_setup
    policy = factory({"licenses": {"weights_expression": OML, "allowed": [OML, "Apache-2.0"]}})
    store = AcceptanceStore(policy.acceptance_store_path())
    with pytest.raises(PolicyViolation, match="classification: structural, looks like"):
        accept_license(policy, folder, license_id=OML, operator="a", acknowledgements=ACKS, store=store)


def test_acceptance_store_refuses_symlink_and_malformed(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("")
    (tmp_path / "licenses.jsonl").symlink_to(tmp_path / "real")
    with pytest.raises(StateFileError, match="symlink"):
        AcceptanceStore(tmp_path / "licenses.jsonl").records()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"license_id": "MIT"}) + "\n")
    bad.chmod(0o600)
    with pytest.raises(StateFileError, match="record 1 is malformed"):
        AcceptanceStore(bad).records()
