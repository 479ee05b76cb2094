"""The generate pipeline's run phase with a scripted worker (no sandbox engine needed).

The sandbox backend is replaced by a fake whose worker stream is scripted by each test, so the
host-side duties can be checked precisely: the output guardrail on the token stream, limits,
the audit record, and that the worker receives the verified file identities.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runner_helpers import worker_stats as _stats
from runner_helpers import worker_tokens as _tokens

from secure_run.errors import PolicyViolation, SecureRunError
from secure_run.runner.pipeline import Final, GenerateOptions, Text, prepare


class FakeBackend:
    name = "fake"


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    state: dict[str, Any] = {"events": [], "requests": []}

    def run_worker(backend: Any, policy: Any, request: Any) -> Iterator[Any]:
        state["requests"].append((policy, request))
        yield from state["events"]

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.backends.run_worker", run_worker)
    return state


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "state" / "secure-run" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(session: Any, text: str = "hello") -> list[Any]:
    return list(session.run_turn([{"role": "user", "content": text}]))


def test_clean_stream_is_released_and_audited(scripted: dict[str, Any], tmp_path: Path) -> None:
    scripted["events"] = [*_tokens(["Hel", "lo ", "world"]), _stats(3)]
    session = prepare(GenerateOptions(max_new_tokens=8))
    out = _run(session)
    assert "".join(e.text for e in out if isinstance(e, Text)) == "Hello world"
    final = out[-1]
    assert isinstance(final, Final) and final.blocked is False and final.stats["generated_tokens"] == 3
    records = _audit(tmp_path)
    assert [r["event"] for r in records[-2:]] == ["started", "finished"]
    record = records[-1]
    assert record["run_stats"]["output_blocked"] is False
    # the worker got the pins of every verified file: its verified sha256 and the identity of the sealed
    # copy the host hashed; a no-network policy that mounts the hand-off socket and no model folder
    policy, request = scripted["requests"][0]
    assert sorted(request.files) == sorted(f.name for f in session.verification.files)
    sealed = session.verification.sealed
    assert sealed is not None
    for f in session.verification.files:
        copy = sealed.copy(f.name)
        assert request.files[f.name].sha256 == f.sha256 == copy.sha256
        assert request.files[f.name].identity == copy.identity != f.identity
    assert policy.network == "none" and policy.model_dir is None and policy.handoff_dir is not None
    assert request.messages[-1].content == "hello" and request.max_new_tokens == 8


def test_blocked_pattern_split_across_tokens_is_never_released(scripted: dict[str, Any], tmp_path: Path) -> None:
    secret = ["Sure: ---", "--BEGIN RSA PRIV", "ATE KEY-----\nMIIE", "vQIBADANBg"]
    scripted["events"] = [*_tokens(secret), _stats(4)]
    session = prepare(GenerateOptions(max_new_tokens=8))
    out = _run(session)
    released = "".join(e.text for e in out if isinstance(e, Text))
    assert "BEGIN" not in released and "PRIV" not in released and "MIIE" not in released
    assert released.startswith("Sure:") or released == ""
    final = out[-1]
    assert isinstance(final, Final) and final.blocked is True
    record = _audit(tmp_path)[-1]
    assert record["run_stats"]["output_blocked"] is True
    assert any(e["stage"] == "output" for e in record["guardrail_events"])


def test_blocked_prompt_is_refused_before_the_sandbox(scripted: dict[str, Any], tmp_path: Path) -> None:
    session = prepare(GenerateOptions())
    with pytest.raises(PolicyViolation) as err:
        _run(session, "please print -----BEGIN OPENSSH PRIVATE KEY----- for me")
    assert err.value.rule == "G3"
    assert scripted["requests"] == []
    assert _audit(tmp_path)[-1]["event"] == "refused"


def test_max_new_tokens_above_the_policy_limit_is_refused(scripted: dict[str, Any]) -> None:
    with pytest.raises(PolicyViolation) as err:
        prepare(GenerateOptions(max_new_tokens=100_000))  # the policy evaluation (G4) refuses at the gate
    assert err.value.rule == "G4" and "512" in err.value.diagnostics()
    assert scripted["requests"] == []


def test_a_worker_that_exceeds_its_token_budget_is_stopped(scripted: dict[str, Any], tmp_path: Path) -> None:
    scripted["events"] = [*_tokens(["a", "b", "c", "d"]), _stats(4)]
    session = prepare(GenerateOptions(max_new_tokens=2))
    with pytest.raises(PolicyViolation) as err:
        _run(session)
    assert err.value.rule == "G4"
    assert _audit(tmp_path)[-1]["event"] == "refused"


# generate --chat runs a warm session: tests/runner/test_warm.py::test_chat_uses_one_warm_session_and_keeps_the_history


def _policy_requiring_acceptance(tmp_path: Path) -> Path:
    from secure_run.policies import default_policy_path

    src = default_policy_path("demo")
    text = src.read_text().replace(
        "  acceptance:\n    required: false\n",
        "  acceptance:\n    required: true\n    acknowledgements: [export_compliance]\n")
    assert "required: true" in text
    dst = tmp_path / "accept.policy.yaml"
    dst.write_text(text)
    for extra in src.parent.glob("*.txt"):  # the blocklists the policy names, relative to it
        (tmp_path / extra.name).write_bytes(extra.read_bytes())
    return dst


def test_licence_acceptance_is_required_then_recorded(scripted: dict[str, Any], tmp_path: Path) -> None:
    policy = str(_policy_requiring_acceptance(tmp_path))
    with pytest.raises(PolicyViolation) as err:
        prepare(GenerateOptions(policy=policy, operator="alice"))
    assert err.value.rule == "L1"
    with pytest.raises(SecureRunError) as missing:  # acknowledgements are explicit
        prepare(GenerateOptions(policy=policy, operator="alice", accept_license="Apache-2.0"))
    assert "export_compliance" in missing.value.diagnostics()
    session = prepare(GenerateOptions(policy=policy, operator="alice", accept_license="Apache-2.0",
                                      acknowledgements=("export_compliance",)))
    assert session.decision.allowed
    # recorded: the next run of the same operator needs no flag; another operator still does
    assert prepare(GenerateOptions(policy=policy, operator="alice")).decision.allowed
    with pytest.raises(PolicyViolation):
        prepare(GenerateOptions(policy=policy, operator="bob"))


def test_interactive_licence_prompt(scripted: dict[str, Any], tmp_path: Path) -> None:
    policy = str(_policy_requiring_acceptance(tmp_path))
    shown: list[str] = []
    with pytest.raises(PolicyViolation):
        prepare(GenerateOptions(policy=policy, operator="carol"), confirm_license=lambda t: shown.append(t) or False)
    assert shown and "Apache-2.0" in shown[0] and "export_compliance" in shown[0]
    session = prepare(GenerateOptions(policy=policy, operator="carol"), confirm_license=lambda t: True)
    assert session.decision.allowed
