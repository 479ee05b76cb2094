"""The persistent protocol and the host's rules for it, with a scripted interactive sandbox (fast).

A fake sandbox answers each request line the host writes with scripted worker output, so the
host's checks can be driven precisely: request ids on every event, per-request bounds, cancel at
the deadline and kill when the worker does not stop, load refusals, and one-shot runs refusing
persistent events.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

import secure_run.sandbox.persistent as persistent
from secure_run.errors import SandboxError, UsageError
from secure_run.sandbox import SandboxPolicy, SandboxTimeout, run_worker
from secure_run.sandbox.backends import Backend, Outcome, SandboxRun, WorkerFailure, WorkerRefusal
from secure_run.sandbox.persistent import PersistentWorker
from secure_run.sandbox.protocol import (
    LoadRequest,
    ProtocolError,
    SelftestRequest,
    SessionRequest,
    StatsEvent,
    TurnRequest,
    parse_persistent_request,
    parse_request,
)
from secure_run.sandbox.worker import serve

Respond = Callable[[dict[str, Any]], list[dict[str, Any]]]
PIN = {"sha256": "0" * 64, "identity": {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4, "ctime_ns": 5}}
POLICY = SandboxPolicy(wall_clock_s=60)


class _Interactive(SandboxRun):
    def __init__(self, policy: SandboxPolicy, respond: Respond) -> None:
        super().__init__(policy)
        self.respond = respond
        self.q: queue.Queue[bytes | None] = queue.Queue()
        self.sent: list[dict[str, Any]] = []
        self.killed = False
        self.finished = 0
        self.stdin_closed = False
        self._outcome: Outcome | None = None

    def write_stdin(self, data: bytes) -> None:
        if self.killed:
            raise SandboxError("gone", rule="sandbox.stdin")
        for line in data.splitlines():
            msg = json.loads(line)
            self.sent.append(msg)
            for out in self.respond(msg):
                self.q.put(json.dumps(out).encode() + b"\n")

    def close_stdin(self) -> None:
        self.stdin_closed = True
        self.q.put(None)

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        while True:
            item = self.q.get()
            if item is None:
                return
            yield 1, item

    def kill(self) -> None:
        self.killed = True
        self.q.put(None)

    def finish(self) -> Outcome:
        self.finished += 1
        self._outcome = Outcome(exit_code=137 if self.killed else 0, timed_out=False, oom_killed=False)
        return self._outcome


class _Backend(Backend):
    name = "fake"

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.runs: list[_Interactive] = []

    def python_argv(self) -> list[str]:
        return ["python"]

    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"",
              keep_stdin_open: bool = False) -> SandboxRun:
        assert keep_stdin_open
        run = _Interactive(policy, self.respond)
        self.runs.append(run)
        run.write_stdin(stdin)
        return run


def _loaded(msg: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "loaded", "request": msg["request"], "loads": 1, "load_seconds": 0.1, "vocab_size": 100,
             "device": "cpu", "uid": 65534}]


def _tokens(rid: str, n: int, *, tid: int = 5) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        out.append({"type": "token", "request": rid, "index": i, "token_id": tid})
        out.append({"type": "text", "request": rid, "text": "x"})
    return out


def _stats(rid: str, n: int, finish: str = "length") -> dict[str, Any]:
    return {"type": "stats", "request": rid, "prompt_tokens": 3, "generated_tokens": n, "seconds": 0.1,
            "tokens_per_second": n / 0.1, "device": "cpu", "detail": {"finish_reason": finish, "uid": 65534}}


def _worker(respond_turn: Respond) -> tuple[PersistentWorker, _Backend]:
    def respond(msg: dict[str, Any]) -> list[dict[str, Any]]:
        return _loaded(msg) if msg["task"] == "load" else respond_turn(msg)

    backend = _Backend(respond)
    load = LoadRequest.model_validate({"task": "load", "request": "load", "files": {"config.json": PIN}}, strict=False)
    return PersistentWorker.start(backend, POLICY.with_overrides(uid=65534), load), backend


def _turn(rid: str = "r1", n: int = 4) -> TurnRequest:
    return TurnRequest(task="turn", request=rid, prompt="hi", max_new_tokens=n)


def test_a_turn_is_validated_and_the_worker_lives_on() -> None:
    w, b = _worker(lambda m: [*_tokens(m["request"], 2), _stats(m["request"], 2)] if m["task"] == "turn" else [])
    for rid in ("a", "b", "c"):
        events = list(w.turn(_turn(rid)))
        assert isinstance(events[-1], StatsEvent) and events[-1].generated_tokens == 2
    assert w.alive and not b.runs[0].killed
    w.close()
    assert b.runs[0].stdin_closed and b.runs[0].finished == 1 and not w.alive
    w.close()  # idempotent
    assert b.runs[0].finished == 1


def test_an_event_for_another_request_kills_the_sandbox() -> None:
    w, b = _worker(lambda m: [*_tokens("other", 1)] if m["task"] == "turn" else [])
    with pytest.raises(ProtocolError) as err:
        list(w.turn(_turn("mine")))
    assert err.value.rule == "sandbox.protocol.wrong_request"
    assert b.runs[0].killed and not w.alive
    with pytest.raises(SandboxError):
        list(w.turn(_turn("next")))


def test_per_request_bounds_apply_to_each_turn() -> None:
    w, b = _worker(lambda m: [*_tokens(m["request"], 3), _stats(m["request"], 3)] if m["task"] == "turn" else [])
    with pytest.raises(ProtocolError) as err:
        list(w.turn(_turn("r", n=2)))
    assert err.value.rule == "sandbox.protocol.too_many_tokens" and b.runs[0].killed
    w2, _ = _worker(lambda m: _tokens(m["request"], 1, tid=100) if m["task"] == "turn" else [])
    with pytest.raises(ProtocolError) as err:
        list(w2.turn(_turn("r")))
    assert err.value.rule == "sandbox.protocol.token_out_of_vocab"  # the vocabulary the worker reported at load


def test_cancel_is_sent_when_the_flag_is_set() -> None:
    def respond(m: dict[str, Any]) -> list[dict[str, Any]]:
        if m["task"] == "turn":
            return _tokens(m["request"], 2)
        if m["task"] == "cancel":
            return [_stats(m["request"], 2, "cancelled")]
        return []

    w, b = _worker(respond)
    flag = threading.Event()
    flag.set()
    events = list(w.turn(_turn("c", n=50), cancel=flag))
    assert isinstance(events[-1], StatsEvent) and events[-1].detail["finish_reason"] == "cancelled"
    assert [m["task"] for m in b.runs[0].sent] == ["load", "turn", "cancel"]
    assert w.alive


def test_closing_the_stream_early_cancels_and_drains_the_turn() -> None:
    def respond(m: dict[str, Any]) -> list[dict[str, Any]]:
        if m["task"] == "turn" and m["request"] == "early":
            return _tokens(m["request"], 3)  # still running when the consumer goes away
        if m["task"] == "cancel":
            return [_stats(m["request"], 3, "cancelled")]
        return [*_tokens(m["request"], 1), _stats(m["request"], 1)]

    w, b = _worker(respond)
    stream = w.turn(_turn("early", n=50))
    next(stream)
    stream.close()
    assert b.runs[0].sent[-1] == {"task": "cancel", "request": "early"}
    # the next request does not see the old turn's events
    events = list(w.turn(_turn("next")))
    assert [e.request for e in events] == ["next"] * len(events) and w.alive


def test_a_worker_that_ignores_cancel_is_killed_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persistent, "CANCEL_GRACE_S", 0.3)
    w, b = _worker(lambda m: [])  # never answers
    with pytest.raises(SandboxTimeout):
        list(w.turn(_turn("slow"), timeout_s=0.2))
    assert {"task": "cancel", "request": "slow"} in b.runs[0].sent
    assert b.runs[0].killed and not w.alive


def test_a_worker_error_fails_the_request_only() -> None:
    def respond(m: dict[str, Any]) -> list[dict[str, Any]]:
        if m["task"] == "session":
            return [{"type": "error", "request": m["request"], "code": "bad_request", "message": "no such session",
                     "rule": "sandbox.worker.no_session"}]
        return [*_tokens(m["request"], 1), _stats(m["request"], 1)]

    w, b = _worker(respond)
    with pytest.raises(WorkerFailure) as err:
        w.session(SessionRequest(task="session", request="s", op="rollback", session="x", turn=0))
    assert err.value.rule == "sandbox.worker.no_session"
    assert w.alive and len(list(w.turn(_turn("after")))) == 3


def test_a_refused_load_is_reported_and_the_sandbox_removed() -> None:
    def respond(m: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "error", "request": m["request"], "code": "model_refused",
                 "message": "model-00001.safetensors changed", "rule": "folder.changed"}]

    backend = _Backend(respond)
    load = LoadRequest.model_validate({"task": "load", "request": "load", "files": {"config.json": PIN}}, strict=False)
    with pytest.raises(WorkerRefusal) as err:
        PersistentWorker.start(backend, POLICY, load)
    assert err.value.rule == "folder.changed" and err.value.kind == "worker-refused"  # a worker-side check
    assert backend.runs[0].killed and backend.runs[0].finished >= 1


def test_a_load_answered_with_the_wrong_uid_is_refused() -> None:
    backend = _Backend(_loaded)
    load = LoadRequest.model_validate({"task": "load", "request": "load", "files": {"config.json": PIN}}, strict=False)
    with pytest.raises(ProtocolError):
        PersistentWorker.start(backend, POLICY.with_overrides(uid=1000), load)
    assert backend.runs[0].killed


# --- one-shot runs and request parsing ------------------------------------------------------------


class _OneShot(Backend):
    name = "fake"

    def __init__(self, out: bytes) -> None:
        self.out = out

    def python_argv(self) -> list[str]:
        return ["python"]

    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"",
              keep_stdin_open: bool = False) -> SandboxRun:
        run = _Interactive(policy, lambda m: [])
        run.q.put(self.out)
        run.q.put(None)
        return run


@pytest.mark.parametrize("line", [
    {"type": "loaded", "request": "x", "loads": 1, "load_seconds": 0.1, "vocab_size": 10, "device": "cpu", "uid": 1},
    {"type": "token", "request": "x", "index": 0, "token_id": 1},
    {"type": "session", "request": "x", "session": "s", "turns": 0, "tokens": 0},
])
def test_a_one_shot_run_refuses_persistent_events(line: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as err:
        list(run_worker(_OneShot(json.dumps(line).encode() + b"\n"), POLICY, SelftestRequest(task="selftest")))
    assert err.value.rule == "sandbox.protocol.unexpected_event"


@pytest.mark.parametrize(("doc", "needle"), [
    ({"task": "turn", "request": "r", "session": "s", "prompt": "hi"}, "session continues a chat"),
    ({"task": "turn", "request": "r", "prompt": "hi", "rendered": "x"}, "rendered goes with messages"),
    ({"task": "turn", "request": "r"}, "exactly one of messages and prompt"),
    ({"task": "turn", "request": "bad id!", "prompt": "hi"}, "request"),
    ({"task": "session", "request": "r", "op": "fork", "session": "s"}, "fork needs target"),
    ({"task": "session", "request": "r", "op": "rollback", "session": "s"}, "rollback needs turn"),
    ({"task": "load", "request": "r", "files": {"config.json": PIN}}, "task"),  # load only as the first line
    ({"task": "turn", "request": "r", "prompt": "hi", "extra": 1}, "extra"),
])
def test_persistent_requests_are_validated(doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_persistent_request(json.dumps(doc).encode())
    assert err.value.rule == "sandbox.protocol.bad_request" and needle in err.value.message


def test_a_load_request_is_not_served_one_shot() -> None:
    data = json.dumps({"task": "load", "request": "l", "files": {"config.json": PIN}}).encode()
    assert isinstance(parse_request(data), LoadRequest)
    out = io.BytesIO()
    assert serve(data, out) == 2
    ev = json.loads(out.getvalue().splitlines()[-1])
    assert ev["type"] == "error" and ev["code"] == "bad_request" and "persistent" in ev["message"]


def test_events_of_turns_in_flight_together_go_to_their_own_request() -> None:
    """The worker batches turns: their events interleave on stdout and each request gets its own."""

    def respond(m: dict[str, Any]) -> list[dict[str, Any]]:
        if m["task"] != "turn":
            return []
        if m["request"] == "a":
            return _tokens("a", 1, tid=7)
        tok_a = [{"type": "token", "request": "a", "index": 1, "token_id": 7}, {"type": "text", "request": "a", "text": "x"}]
        return [*_tokens("b", 1, tid=9), *tok_a, _stats("b", 1), _stats("a", 2)]

    w, b = _worker(respond)
    turn_a = w.turn(_turn("a", n=4))
    first = next(turn_a)
    assert first.type == "token" and first.request == "a"
    events_b = list(w.turn(_turn("b", n=4)))  # a's events that arrive meanwhile wait in a's queue
    assert [e.type for e in events_b] == ["token", "text", "stats"] and {e.request for e in events_b} == {"b"}
    rest_a = list(turn_a)
    assert [e.type for e in rest_a] == ["text", "token", "text", "stats"] and {e.request for e in rest_a} == {"a"}
    assert w.alive and not b.runs[0].killed
    with pytest.raises(UsageError) as err:  # one id in flight twice is refused before it is sent
        w._open("c")
        w._open("c")
    assert err.value.rule == "sandbox.worker.duplicate_request"
    w.close()
