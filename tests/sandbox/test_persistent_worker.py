"""The persistent worker in-process (no sandbox): sessions, cache snapshots, growth and limits.

The worker receives the demo folder's sealed copies over a real hand-off socket and adopts them
against the pins (as in the sandbox); requests are fed as stdin lines and the events read back.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sealed_support import pins_of, sealed

import secure_run.sandbox.worker as worker
from secure_run.model.cache import HybridCache
from secure_run.model.demo import demo_model_dir
from secure_run.sandbox._internal.conversations import Conversations
from secure_run.sandbox.handoff import HandoffServer
from secure_run.sandbox.protocol import parse_request
from secure_run.sandbox.worker import serve_persistent

ROOT = Path(demo_model_dir())


def run(monkeypatch: pytest.MonkeyPatch, requests: list[dict[str, Any]], **load: Any) -> list[dict[str, Any]]:
    with sealed(ROOT) as folder, HandoffServer([(c.name, c.fd) for c in folder.copies()]) as server:
        monkeypatch.setattr(worker, "HANDOFF_SOCKET", str(server.mount_dir / "sealed.sock"))
        pins = {n: p.model_dump(mode="json") for n, p in pins_of(folder).items()}
        first = json.dumps({"task": "load", "request": "load", "files": pins, **load}).encode() + b"\n"
        rest = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
        out = io.BytesIO()
        assert serve_persistent(parse_request(first), io.BytesIO(rest), out) == 0  # type: ignore[arg-type]
    return [json.loads(line) for line in out.getvalue().splitlines()]


def of(events: list[dict[str, Any]], rid: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("request") == rid and e["type"] == kind]


def tokens(events: list[dict[str, Any]], rid: str) -> list[int]:
    return [e["token_id"] for e in of(events, rid, "token")]


def text(events: list[dict[str, Any]], rid: str) -> str:
    return "".join(e["text"] for e in of(events, rid, "text"))


def turn(rid: str, messages: list[dict[str, str]], session: str | None = "s", n: int = 6) -> dict[str, Any]:
    return {"task": "turn", "request": rid, "session": session, "messages": messages, "max_new_tokens": n}


U1 = {"role": "user", "content": "hello there"}
U2 = {"role": "user", "content": "and again"}


def test_growing_the_cache_does_not_change_the_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    ev1 = run(monkeypatch, [turn("t1", [U1])])
    reply = text(ev1, "t1")
    history = [U1, {"role": "assistant", "content": reply}, U2]
    grown = run(monkeypatch, [turn("t1", [U1]), turn("t2", history, n=12)])
    # the first turn's cache is sized for that turn only, so turn 2 grows it (copying what it holds)
    assert of(grown, "t2", "stats")[0]["detail"]["reused_tokens"] > 0

    real_new = Conversations.new
    monkeypatch.setattr(Conversations, "new", lambda self, n: real_new(self, self.max_context))  # never grows
    big = run(monkeypatch, [turn("t1", [U1]), turn("t2", history, n=12)])
    assert tokens(grown, "t2") == tokens(big, "t2") and len(tokens(big, "t2")) == 12


def test_a_conversation_past_max_context_is_refused_and_the_worker_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    events = run(monkeypatch, [turn("t1", [U1], n=40), turn("t2", [U1], session=None, n=2)], max_context=32)
    err = of(events, "t1", "error")[0]
    assert err["rule"] == "sandbox.worker.context_full" and err["code"] == "bad_request"
    assert len(tokens(events, "t2")) >= 1


def test_least_recently_used_sessions_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    events = run(monkeypatch, [
        turn("a1", [U1], session="a", n=2), turn("b1", [U1], session="b", n=2), turn("c1", [U1], session="c", n=2),
        {"task": "session", "request": "ra", "op": "rollback", "session": "a", "turn": 0},
        {"task": "session", "request": "rc", "op": "rollback", "session": "c", "turn": 0},
    ], max_sessions=2)
    assert of(events, "ra", "error")[0]["rule"] == "sandbox.worker.no_session"
    assert of(events, "rc", "session")[0]["turns"] == 0


def test_bad_lines_and_session_errors_get_error_events(monkeypatch: pytest.MonkeyPatch) -> None:
    events = run(monkeypatch, [
        {"task": "nope"},
        turn("t1", [U1], n=2),
        {"task": "session", "request": "f", "op": "fork", "session": "s", "target": "s2", "turn": 5},
        {"task": "cancel", "request": "t1"},   # nothing in flight: ignored
        turn("t2", [U1], session=None, n=2),
    ])
    assert events[0]["type"] == "loaded" and events[0]["loads"] >= 1
    assert events[1]["type"] == "error" and events[1]["request"] is None and events[1]["code"] == "bad_request"
    assert of(events, "f", "error")[0]["rule"] == "sandbox.worker.bad_turn"
    assert of(events, "t2", "stats")[0]["generated_tokens"] == 2


def test_a_reply_the_client_changed_falls_back_to_an_earlier_point(monkeypatch: pytest.MonkeyPatch) -> None:
    ev = run(monkeypatch, [turn("t1", [U1])])
    changed = [U1, {"role": "assistant", "content": text(ev, "t1") + " (edited)"}, U2]
    events = run(monkeypatch, [turn("t1", [U1]), turn("t2", changed)])
    stats = of(events, "t2", "stats")[0]
    assert stats["detail"]["reused_tokens"] == 0 and stats["detail"]["prefilled_tokens"] == stats["prompt_tokens"]


def test_snapshots_restore_and_copy_the_cache() -> None:
    from secure_run.model.config import parse_config_json

    cfg = parse_config_json((ROOT / "config.json").read_text())
    cache = HybridCache(cfg, batch_size=1, max_len=8)
    layer = cfg.layers_of("mamba")[0]
    cache.mamba(layer).ssm.fill_(1.0)
    cache.filled = 3
    snap = cache.snapshot()
    cache.mamba(layer).ssm.fill_(2.0)
    cache.filled = 5
    cache.restore(snap)
    assert cache.filled == 3 and torch.all(cache.mamba(layer).ssm == 1.0)
    other = HybridCache(cfg, batch_size=1, max_len=16)
    kv_layer = cfg.attention_layers[0]
    cache.kv(kv_layer).k[:, :, :3] = 7.0
    cache.copy_prefix_to(other, snap)
    assert other.filled == 3 and torch.all(other.kv(kv_layer).k[:, :, :3] == 7.0)
    assert torch.all(other.kv(kv_layer).k[:, :, 3:] == 0.0) and torch.all(other.mamba(layer).ssm == 1.0)
    ahead = cache.snapshot()
    cache.filled = 1
    with pytest.raises(Exception, match="ahead"):
        cache.restore(ahead)


def test_the_reply_is_matched_as_sent_after_sanitizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the session recorded the raw reply, so a client sending back the (sanitized) text it
    received never matched, and every turn re-prefilled the whole conversation."""
    from secure_run.model.inference import InferenceModel

    real = InferenceModel.decode_stream

    def noisy(self: InferenceModel, ids: Any, **kw: Any) -> Any:
        for piece in real(self, ids, **kw):
            yield piece + "\x1b[31m\u200b"  # escapes and invisible characters the protocol strips

    monkeypatch.setattr(InferenceModel, "decode_stream", noisy)
    ev = run(monkeypatch, [turn("t1", [U1])])
    sent = text(ev, "t1")
    assert "\x1b" not in sent and "\u200b" not in sent
    events = run(monkeypatch, [turn("t1", [U1]), turn("t2", [U1, {"role": "assistant", "content": sent}, U2])])
    assert of(events, "t2", "stats")[0]["detail"]["reused_tokens"] > 0
