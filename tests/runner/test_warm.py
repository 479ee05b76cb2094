"""WarmSession's host-side duties with a scripted persistent worker (no sandbox engine needed).

The real gate runs (the embedded demo is verified, its policy evaluated); only the persistent
worker is replaced by a fake whose events each test scripts. The real worker, through the real
backends, is covered by tests/sandbox/test_persistent.py and tests/e2e/test_chat_warm.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from secure_run.errors import PolicyViolation, SandboxError, UsageError
from secure_run.runner.pipeline import Final, GenerateOptions, Text
from secure_run.runner.warm import CompletionRequest, SamplingParams, WarmSession, _StopStrings
from secure_run.sandbox.protocol import (
    LoadedEvent,
    SessionEvent,
    SessionRequest,
    StatsEvent,
    TextEvent,
    TokenEvent,
    TurnRequest,
)


class FakeBackend:
    name = "fake"


class FakeWorker:
    """Plays the persistent worker: ``script(req)`` gives the text pieces of each turn."""

    def __init__(self, script: Callable[[TurnRequest], list[str]]) -> None:
        self.script = script
        self.loaded = LoadedEvent(type="loaded", request="load", loads=1, load_seconds=0.1, vocab_size=512,
                                  device="cpu", uid=65534)
        self.alive = True
        self.turns: list[TurnRequest] = []
        self.cancelled: list[str] = []
        self.sessions: dict[str, int] = {}
        self.closed = 0

    def turn(self, req: TurnRequest, *, cancel: Any = None, timeout_s: float = 0) -> Iterator[Any]:
        self.turns.append(req)
        finish = "length"
        n = 0
        for i, piece in enumerate(self.script(req)):
            if cancel is not None and cancel.is_set():
                self.cancelled.append(req.request)
                finish = "cancelled"
                break
            yield TokenEvent(type="token", request=req.request, index=i, token_id=10 + i)
            yield TextEvent(type="text", request=req.request, text=piece)
            n += 1
        turns = 0
        if req.session is not None:
            turns = self.sessions.get(req.session, 0) + 1
            self.sessions[req.session] = turns
        yield StatsEvent(type="stats", request=req.request, prompt_tokens=7, generated_tokens=n, seconds=0.1,
                         tokens_per_second=n / 0.1, device="cpu",
                         detail={"finish_reason": finish, "prefilled_tokens": 3, "reused_tokens": 4, "loads": 1,
                                 "session_turns": turns})

    def session(self, req: SessionRequest, *, timeout_s: float = 0) -> SessionEvent:
        name = req.target or req.session
        turns = req.turn if req.turn is not None else self.sessions[req.session]
        self.sessions[name] = turns
        return SessionEvent(type="session", request=req.request, session=name, turns=turns, tokens=0)

    def close(self) -> None:
        self.closed += 1
        self.alive = False


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    state: dict[str, Any] = {"script": lambda req: ["Hel", "lo ", "world"], "workers": [], "loads": []}

    def start(backend: Any, policy: Any, load: Any, **kw: Any) -> FakeWorker:
        state["loads"].append((policy, load))
        w = FakeWorker(lambda req: state["script"](req))
        state["workers"].append(w)
        return w

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.persistent.PersistentWorker.start", start)
    return state


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "state" / "secure-run" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=1, max_tokens=8)


def _req(rid: str, text: str = "hello", *, sampling: SamplingParams = GREEDY, session: str | None = None,
         prompt: str | None = None) -> CompletionRequest:
    messages = None if prompt is not None else ({"role": "user", "content": text},)
    return CompletionRequest(request_id=rid, messages=messages, prompt=prompt, sampling=sampling,
                             client="127.0.0.1:5555", session_id=session)


def _collect(warm: WarmSession, req: CompletionRequest, cancel: threading.Event | None = None) -> tuple[str, Final]:
    out = list(warm.complete(req, cancel or threading.Event()))
    final = out[-1]
    assert isinstance(final, Final)
    return "".join(e.text for e in out if isinstance(e, Text)), final


def test_open_loads_once_with_the_pins_and_a_session_wall_clock(fake: dict[str, Any], tmp_path: Path) -> None:
    with WarmSession.open(GenerateOptions()) as warm:
        for i in range(3):
            _collect(warm, _req(f"r{i}"))
        assert len(fake["loads"]) == 1 and warm.metrics()["worker_loads_total"] == 1.0
        assert warm.metrics()["requests_total"] == 3.0 and warm.metrics()["tokens_total"] == 9.0
        policy, load = fake["loads"][0]
        v = warm.session.verification
        assert sorted(load.files) == sorted(f.name for f in v.files)
        for f in v.files:  # the verified sha256, and the identity of the sealed copy (not of the disk file)
            assert load.files[f.name].sha256 == f.sha256 and load.files[f.name].identity != f.identity
        assert v.sealed is not None and v.sealed.closed  # the host released its copies once the worker loaded
        assert policy.wall_clock_s == 24 * 3600 and policy.network == "none"
        assert policy.model_dir is None and policy.handoff_dir is not None
        assert warm.model_id == "superlinear-demo"
        # generation defaults come from the verified generation_config.json
        assert (warm.generation_defaults.temperature, warm.generation_defaults.top_p) == (0.7, 0.95)
    assert fake["workers"][0].closed == 1
    warm.close()  # idempotent
    assert fake["workers"][0].closed == 1


def test_one_audit_record_per_request_with_id_client_and_counts(fake: dict[str, Any], tmp_path: Path) -> None:
    with WarmSession.open(GenerateOptions()) as warm:
        before = len(_audit(tmp_path))
        text, final = _collect(warm, _req("req-42"))
        assert text == "Hello world"
        assert final.stats["finish_reason"] == "length" and final.stats["completion_tokens"] == 3
        records = _audit(tmp_path)[before:]
        assert len(records) == 1
        r = records[0]
        assert r["event"] == "finished" and r["run_id"] == "req-42"
        assert r["run_stats"]["request_id"] == "req-42" and r["run_stats"]["client"] == "127.0.0.1:5555"
        assert r["run_stats"]["completion_tokens"] == 3 and isinstance(r["run_stats"]["prompt_tokens"], int)
        assert r["parameters"]["seed"] == 1


def test_stop_strings_cut_the_text_and_cancel_the_worker(fake: dict[str, Any], tmp_path: Path) -> None:
    fake["script"] = lambda req: ["one ", "tw", "o ST", "OP three", " four", " five"]
    with WarmSession.open(GenerateOptions()) as warm:
        sp = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=0, max_tokens=8, stop=("STOP",))
        text, final = _collect(warm, _req("s1", sampling=sp))
        assert text == "one two "
        assert final.stats["finish_reason"] == "stop"
        assert fake["workers"][0].cancelled == ["s1"]  # the worker was told to stop


def test_a_guardrail_block_mid_stream_ends_the_request(fake: dict[str, Any], tmp_path: Path) -> None:
    fake["script"] = lambda req: ["Sure: ---", "--BEGIN RSA PRIV", "ATE KEY-----\nMIIE", "vQIBADANBg", "more"]
    with WarmSession.open(GenerateOptions()) as warm:
        text, final = _collect(warm, _req("b1"))
        assert "BEGIN" not in text and "MIIE" not in text
        assert final.blocked and final.stats["finish_reason"] == "blocked"
        record = _audit(tmp_path)[-1]
        assert record["run_stats"]["output_blocked"] is True
        assert any(e["stage"] == "output" for e in record["guardrail_events"])


def test_cancel_ends_the_request_as_cancelled(fake: dict[str, Any]) -> None:
    cancel = threading.Event()

    def script(req: TurnRequest) -> Iterator[str]:
        yield "a"
        cancel.set()
        yield from ["b", "c", "d"]

    fake["script"] = script
    with WarmSession.open(GenerateOptions()) as warm:
        _, final = _collect(warm, _req("c1"), cancel)
        assert final.stats["finish_reason"] == "cancelled"
        assert warm.metrics()["requests_cancelled_total"] == 1.0


def test_refusals_are_raised_with_rule_ids_and_audited_once(fake: dict[str, Any], tmp_path: Path) -> None:
    with WarmSession.open(GenerateOptions()) as warm:
        before = len(_audit(tmp_path))
        with pytest.raises(PolicyViolation) as err:
            _collect(warm, _req("g3", "please print -----BEGIN OPENSSH PRIVATE KEY----- for me"))
        assert err.value.rule == "G3"
        big = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=0, max_tokens=100_000)
        with pytest.raises(PolicyViolation) as err:
            _collect(warm, _req("g4", sampling=big))
        assert err.value.rule == "G4"
        bad = SamplingParams(temperature=-1.0, top_p=1.0, top_k=0, seed=0, max_tokens=4)
        with pytest.raises(UsageError) as err:
            _collect(warm, _req("u1", sampling=bad))
        assert err.value.rule == "warm.request" and "temperature" in err.value.diagnostics()
        with pytest.raises(UsageError):
            _collect(warm, _req("u2", prompt="plain", session="s"))  # sessions are for chats
        records = _audit(tmp_path)[before:]
        assert [(r["event"], r["run_id"]) for r in records] == [
            ("refused", "g3"), ("refused", "g4"), ("refused", "u1"), ("refused", "u2")]
        assert all(r["run_stats"]["client"] == "127.0.0.1:5555" for r in records)
        assert fake["workers"][0].turns == []  # nothing reached the worker
        assert warm.metrics()["requests_refused_total"] == 4.0


def test_fork_and_rollback_know_the_sessions(fake: dict[str, Any]) -> None:
    with WarmSession.open(GenerateOptions()) as warm:
        with pytest.raises(UsageError) as err:
            warm.fork("nope")
        assert err.value.rule == "warm.session-unknown"
        _collect(warm, _req("t1", session="chat"))
        _collect(warm, _req("t2", session="chat"))
        assert warm.sessions() == {"chat": 2}
        with pytest.raises(UsageError) as err:
            warm.rollback("chat", 3)
        assert err.value.rule == "warm.session-turn"
        child = warm.fork("chat", at_turn=1)
        assert child != "chat" and warm.sessions()[child] == 1
        warm.rollback("chat", 0)
        assert warm.sessions()["chat"] == 0


def test_a_dead_worker_refuses_further_requests(fake: dict[str, Any]) -> None:
    with WarmSession.open(GenerateOptions()) as warm:
        fake["workers"][0].alive = False
        with pytest.raises(SandboxError) as err:
            _collect(warm, _req("d1"))
        assert err.value.rule == "sandbox.worker.died"
        assert warm.metrics()["worker_alive"] == 0.0


def test_chat_uses_one_warm_session_and_keeps_the_history(fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    from click.testing import CliRunner

    from secure_run.runner.cli import cli

    fake["script"] = lambda req: ["first ", "reply"]
    monkeypatch.setattr("secure_run.runner.cmd_generate._stdin_is_tty", lambda: True)
    result = CliRunner().invoke(cli, ["generate", "--chat", "--max-new-tokens", "4"],
                                input="hi there\nand again\n\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("first reply") == 2
    assert len(fake["workers"]) == 1 and fake["workers"][0].closed == 1  # one sandbox for the whole chat
    turn1, turn2 = fake["workers"][0].turns
    assert turn1.session == turn2.session is not None
    assert [m.role for m in turn1.messages or ()] == ["user"]
    assert [(m.role, m.content) for m in turn2.messages or ()] == [
        ("user", "hi there"), ("assistant", "first reply"), ("user", "and again")]
    assert turn1.max_new_tokens == 4
    records = [r for r in _audit(tmp_path) if r["event"] == "finished"]
    assert [r["run_stats"]["client"] for r in records] == ["cli", "cli"]


@pytest.mark.parametrize(("pieces", "stops", "expected", "hit"), [
    (["ab", "cS", "TOPd"], ("STOP",), "abc", True),
    (["abc"], ("STOP",), "abc", False),
    (["x", "S", "T"], ("STOP",), "xST", False),   # a partial match is released at the end
    (["hello", " wor", "ld"], ("wor", "hello w"), "", True),  # the earliest stop wins
    (["a", "b"], (), "ab", False),
])
def test_stop_strings(pieces: list[str], stops: tuple[str, ...], expected: str, hit: bool) -> None:
    s = _StopStrings(stops)
    out, got = "", False
    for i, p in enumerate(pieces):
        text, h = s.feed(p, final=i == len(pieces) - 1)
        out += text
        got = got or h
    assert (out, got) == (expected, hit)


def test_a_consumer_that_goes_away_still_gets_one_audit_record(fake: dict[str, Any], tmp_path: Path) -> None:
    fake["script"] = lambda req: ["word " * 3] * 6
    with WarmSession.open(GenerateOptions()) as warm:
        before = len(_audit(tmp_path))
        stream = warm.complete(_req("gone"), threading.Event())
        first = next(stream)
        assert isinstance(first, Text)
        stream.close()  # e.g. the HTTP client disconnected
        records = _audit(tmp_path)[before:]
        assert len(records) == 1
        r = records[0]["run_stats"]
        assert records[0]["run_id"] == "gone" and r["finish_reason"] == "cancelled" and r["client_gone"] is True
        assert 1 <= r["completion_tokens"] < 6
        assert warm.metrics()["requests_cancelled_total"] == 1.0
        _collect(warm, _req("after"))  # the lock was released: the next request runs


def test_concurrent_requests_are_serialized(fake: dict[str, Any]) -> None:
    fake["script"] = lambda req: [f"{req.request}-{i} " for i in range(5)]
    with WarmSession.open(GenerateOptions()) as warm:
        results: dict[str, str] = {}

        def worker(rid: str) -> None:
            results[rid] = _collect(warm, _req(rid))[0]

        threads = [threading.Thread(target=worker, args=(f"c{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {f"c{i}": "".join(f"c{i}-{j} " for j in range(5)) for i in range(4)}
        assert warm.metrics()["requests_total"] == 4.0


def test_completions_are_not_serialized(fake: dict[str, Any]) -> None:
    """A second completion starts while the first is still streaming (the worker batches them)."""
    a_started, b_started = threading.Event(), threading.Event()

    def script(req: TurnRequest) -> list[str]:
        if req.request == "a":
            a_started.set()
            assert b_started.wait(5.0), "b never started while a was in flight"
        else:
            b_started.set()
        return ["x", "y"]

    fake["script"] = script
    with WarmSession.open(GenerateOptions()) as warm:
        out: dict[str, tuple[str, Final]] = {}
        t = threading.Thread(target=lambda: out.__setitem__("a", _collect(warm, _req("a"))))
        t.start()
        assert a_started.wait(5.0)
        out["b"] = _collect(warm, _req("b"))
        t.join(10.0)
        assert out["a"][0] == out["b"][0] == "xy"
        assert warm.metrics()["requests_total"] == 2.0
