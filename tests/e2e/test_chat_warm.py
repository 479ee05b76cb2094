"""``generate --chat`` and WarmSession through the real Docker backend (marker ``docker``).

* a two-turn chat on the embedded demo: one sandbox, the weights loaded once, the second turn
  prefills only the new message, one audit record per turn;
* a shard swapped after the gate verified the folder but before the persistent worker loads it is
  refused by the worker (the pins are enforced exactly as in one-shot runs), and audited.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import SignedModel

from secure_run.manifests import KeyTrust
from secure_run.runner.pipeline import Final, GenerateOptions, Text
from secure_run.runner.warm import CompletionRequest, SamplingParams, WarmSession

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _audit(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "secure-run" / "audit.jsonl").read_text().splitlines()]


def test_chat_is_one_warm_sandbox_and_the_second_turn_prefills_only_new_tokens(
        state_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from secure_run.runner.cli import cli

    monkeypatch.setattr("secure_run.runner.cmd_generate._stdin_is_tty", lambda: True)
    result = CliRunner().invoke(cli, ["generate", "--chat", "--max-new-tokens", "6", "--sandbox", "docker"],
                                input="Tell me about verified loading.\nAnd then?\n\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = _audit(state_env)
    started = [r for r in records if r["event"] == "started"]
    finished = [r for r in records if r["event"] == "finished"]
    assert len(started) == 1 and started[0]["run_stats"]["mode"] == "warm"  # one sandbox for the chat
    assert len(finished) == 2
    first, second = (r["run_stats"] for r in finished)
    assert first["worker_loads"] == second["worker_loads"] == 1  # the weights were loaded once
    assert first["reused_tokens"] == 0 and first["prefilled_tokens"] == first["prompt_tokens"]
    assert second["reused_tokens"] > first["prompt_tokens"]  # turn 1's prompt and reply stay in the cache
    assert 0 < second["prefilled_tokens"] < second["prompt_tokens"] // 2
    assert first["request_id"] != second["request_id"] and first["client"] == "cli"
    assert second["session_turns"] == 2


def test_a_shard_swapped_before_the_worker_loads_has_no_effect(
        demo_copy: SignedModel, state_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker loads the sealed copies the gate hashed: a shard rewritten on disk just before the
    Docker sandbox starts changes nothing it loads (issue 12 item 2; issue 10 refused it by identity)."""
    from secure_run.sandbox.persistent import PersistentWorker

    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=0, max_tokens=6)
    options = GenerateOptions(model_dir=demo_copy.root, policy="builtin:demo", lock=demo_copy.lock,
                              trust=KeyTrust.from_file(demo_copy.public_key), sandbox="docker")

    def reply() -> str:
        with WarmSession.open(options) as warm:
            out = list(warm.complete(CompletionRequest(request_id="r", messages=None, prompt="hello",
                                                       sampling=greedy, client="test"), threading.Event()))
        return "".join(e.text for e in out if isinstance(e, Text))

    control = reply()
    original = PersistentWorker.start
    shard = demo_copy.root / "model-00002-of-00002.safetensors"

    def swap_then_start(*args: Any, **kw: Any) -> PersistentWorker:
        data = bytearray(shard.read_bytes())
        data[-4:] = b"\x00\x00\x80\x7f"  # the last weight becomes +inf
        shard.unlink()
        shard.write_bytes(bytes(data))
        shard.chmod(0o644)
        return original(*args, **kw)

    monkeypatch.setattr(PersistentWorker, "start", swap_then_start)
    assert control and reply() == control
    assert _audit(state_env)[-1]["event"] == "finished"


def test_warm_session_many_requests_one_load(state_env: Path) -> None:
    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=0, max_tokens=4)
    with WarmSession.open(GenerateOptions(sandbox="docker")) as warm:
        for i in range(5):
            out = list(warm.complete(CompletionRequest(request_id=f"m{i}", messages=None, prompt=f"hello {i}",
                                                       sampling=greedy, client="test"), threading.Event()))
            assert isinstance(out[-1], Final) and out[-1].stats["completion_tokens"] >= 1
            assert all(isinstance(e, Text) for e in out[:-1])
        m = warm.metrics()
        assert m["worker_loads_total"] == 1.0 and m["requests_total"] == 5.0 and m["worker_alive"] == 1.0
    assert warm.metrics()["worker_alive"] == 0.0
