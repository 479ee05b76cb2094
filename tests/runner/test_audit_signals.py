"""generate: audit log checked first, gate refusals audited, SIGINT/SIGTERM stop and audit (issue 10 items 15-16)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from secure_run.runner.cli import cli
from secure_run.sandbox.protocol import StatsEvent, TextEvent, TokenEvent


class FakeBackend:
    name = "fake"


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A scripted worker stream; ``signal`` (if set) is raised on the host after the first token."""
    calls: dict[str, Any] = {"started": 0, "closed": 0, "signal": None}

    def run_worker(backend: Any, policy: Any, request: Any) -> Iterator[Any]:
        calls["started"] += 1
        try:
            yield TokenEvent(type="token", index=0, token_id=5)
            yield TextEvent(type="text", text="hel")
            if calls["signal"] is not None:
                os.kill(os.getpid(), calls["signal"])
            yield TokenEvent(type="token", index=1, token_id=6)
            yield TextEvent(type="text", text="lo")
            yield StatsEvent(type="stats", prompt_tokens=3, generated_tokens=2, seconds=0.1, tokens_per_second=20,
                             device="cpu")
        finally:
            calls["closed"] += 1  # what stopping the sandbox runs

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.backends.run_worker", run_worker)
    return calls


def _generate(*extra: str) -> Any:
    return CliRunner().invoke(cli, ["generate", "--prompt", "hello", "--max-new-tokens", "4", "--json", *extra],
                              catch_exceptions=False)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _last_json(output: str) -> dict[str, Any]:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])  # type: ignore[no-any-return]


def test_a_run_is_audited_started_then_finished(state: Path, worker: dict[str, Any]) -> None:
    r = _generate()
    assert r.exit_code == 0, r.output
    assert [rec["event"] for rec in _records(state)] == ["started", "finished"]


def test_an_unwritable_audit_log_refuses_before_anything_runs(tmp_path: Path, state: Path,
                                                              worker: dict[str, Any]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    r = _generate("--audit-log", str(blocker / "audit.jsonl"))
    assert r.exit_code == 2, r.output
    err = _last_json(r.output)["error"]
    assert err["rule"] == "run.audit-unwritable" and "audit.jsonl" in err["message"]
    assert worker["started"] == 0


def test_a_verification_refusal_is_audited(tmp_path: Path, state: Path, worker: dict[str, Any]) -> None:
    import shutil

    from secure_run import manifests
    from secure_run.model.demo import demo_model_dir

    root = tmp_path / "superlinear-demo"
    shutil.copytree(demo_model_dir(), root, ignore=shutil.ignore_patterns("model.sig"))
    keys = manifests.generate_key(tmp_path / "k.pem")
    signed = manifests.sign_model(root, keys.private)
    lock = tmp_path / "lock" / "models.lock.json"
    lock.parent.mkdir()
    with manifests.verify_model(root, manifests.KeyTrust.from_file(keys.public)) as result:
        manifests.pin_model(lock, "demo", root_digest=signed.root_digest, signer=result.signer,
                            public_key=os.path.relpath(keys.public, lock.parent),
                            path=os.path.relpath(root, lock.parent), policy="builtin:demo")
    shard = sorted(root.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1
    shard.write_bytes(bytes(data))
    r = _generate("--model", str(root), "--policy", "builtin:demo", "--lock", str(lock))
    assert r.exit_code == 1, r.output
    rec = _records(state)[-1]
    assert rec["event"] == "refused" and rec["stage"] == "verify" and rec["allowed"] is False
    assert rec["run_stats"]["refused"]["kind"] == "verification" and rec["model_dir"] == str(root)
    assert worker["started"] == 0


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_stream_stops_the_sandbox_and_is_audited(state: Path, worker: dict[str, Any],
                                                                     signum: int, code: int) -> None:
    worker["signal"] = signum
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    r = _generate()
    assert r.exit_code == code, r.output
    err = _last_json(r.output)["error"]
    assert err["kind"] == "interrupted" and err["exit_code"] == code
    assert err["rule"] == f"run.interrupted.{signal.Signals(signum).name.lower()}"
    assert worker["started"] == 1 and worker["closed"] == 1  # the sandbox was stopped
    assert [rec["event"] for rec in _records(state)] == ["started", "interrupted"]
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before  # handlers restored


def test_a_signal_during_verification_is_audited(state: Path, worker: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_run.manifests as manifests

    def interrupted(*a: Any, **k: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal handler did not raise")

    monkeypatch.setattr(manifests, "verify_model", interrupted)
    r = _generate()
    assert r.exit_code == 130, r.output
    assert _last_json(r.output)["error"]["kind"] == "interrupted"
    assert _records(state)[-1]["event"] == "interrupted" and worker["started"] == 0
