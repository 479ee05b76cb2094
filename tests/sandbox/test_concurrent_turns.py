"""Concurrent turns in the persistent worker (in-process, demo model, CPU): continuous batching.

Several turns in flight give each the tokens it gets alone (greedy and seeded sampling), turns of
one session run in order, a full batch queues, and cancelling one turn mid-stream leaves the others
untouched. The pool starts small here, so its rows grow while turns decode (on CUDA the graphs
are then captured again).
"""

from __future__ import annotations

import io
import json
import os
import threading
from typing import Any

import pytest
from sealed_support import pins_of, sealed
from test_persistent_worker import ROOT, U1, U2, of, run, text, tokens, turn

import secure_run.sandbox._internal.warm_worker as ww
import secure_run.sandbox.worker as worker
from secure_run.sandbox.handoff import HandoffServer
from secure_run.sandbox.protocol import parse_request
from secure_run.sandbox.worker import serve_persistent

PROMPTS = ["the quick brown fox", "a", "once upon a time there was a very long prompt that goes on and on",
           "hello", "numbers: 1 2 3 4 5"]


@pytest.fixture(autouse=True)
def _small_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool rows start at 16 positions, so they grow (16 -> 32 -> 64) while turns decode."""
    monkeypatch.setattr(ww, "POOL_START_LEN", 16)


def plain(rid: str, prompt: str, n: int, **kw: Any) -> dict[str, Any]:
    return {"task": "turn", "request": rid, "prompt": prompt, "max_new_tokens": n, **kw}


def _interleaved(events: list[dict[str, Any]], a: str, b: str) -> bool:
    """Whether a token of ``b`` came before the stats of ``a`` (both were in flight together)."""
    end_a = next(i for i, e in enumerate(events) if e.get("request") == a and e["type"] == "stats")
    return any(e.get("request") == b and e["type"] == "token" for e in events[:end_a])


def test_concurrent_turns_equal_each_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = [plain(f"r{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS, (9, 14, 5, 12, 7), strict=True))]
    reqs.append(plain("s1", PROMPTS[0], 10, temperature=0.9, top_k=20, seed=7))
    together = run(monkeypatch, reqs)
    assert _interleaved(together, "r1", "r3")
    for r in reqs:
        alone = run(monkeypatch, [r])
        assert tokens(together, r["request"]) == tokens(alone, r["request"]), r["request"]
        assert text(together, r["request"]) == text(alone, r["request"])
        assert of(together, r["request"], "stats")[0]["generated_tokens"] == len(tokens(alone, r["request"]))


def test_a_full_batch_queues_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = [plain(f"q{i}", p, 6) for i, p in enumerate(PROMPTS)]
    events = run(monkeypatch, reqs, max_batch=2)
    wide = run(monkeypatch, reqs)
    for r in reqs:
        assert tokens(events, r["request"]) == tokens(wide, r["request"]) and len(tokens(events, r["request"])) == 6
    # at most two turns in flight: q2 starts only after one of q0, q1 ended
    first_q2 = next(i for i, e in enumerate(events) if e.get("request") == "q2" and e["type"] == "token")
    ended = {e["request"] for e in events[:first_q2] if e["type"] == "stats"}
    assert ended & {"q0", "q1"}


def test_sessions_in_flight_together_equal_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    first = run(monkeypatch, [turn("a1", [U1], session="a", n=8), turn("b1", [U2], session="b", n=8)])
    ha = [U1, {"role": "assistant", "content": text(first, "a1")}, U2]
    hb = [U2, {"role": "assistant", "content": text(first, "b1")}, U1]
    # four requests at once: each session's second turn waits for its first, the sessions run together
    both = run(monkeypatch, [turn("a1", [U1], session="a", n=8), turn("b1", [U2], session="b", n=8),
                             turn("a2", ha, session="a", n=10), turn("b2", hb, session="b", n=10)])
    serial_a = run(monkeypatch, [turn("a1", [U1], session="a", n=8), turn("a2", ha, session="a", n=10)])
    serial_b = run(monkeypatch, [turn("b1", [U2], session="b", n=8), turn("b2", hb, session="b", n=10)])
    for rid, serial in (("a1", serial_a), ("a2", serial_a), ("b1", serial_b), ("b2", serial_b)):
        assert tokens(both, rid) == tokens(serial, rid), rid
    for rid in ("a2", "b2"):
        detail = of(both, rid, "stats")[0]["detail"]
        assert detail["reused_tokens"] > 0 and detail["session_turns"] == 2
    assert _interleaved(both, "a1", "b1")


class _CancelWhen(io.RawIOBase):
    """The worker's output; writes a cancel line to the worker's stdin once ``rid`` sent ``after`` tokens."""

    def __init__(self, stdin_w: int, rid: str, after: int) -> None:
        self.buf = bytearray()
        self.stdin_w, self.rid, self.after = stdin_w, rid, after
        self.sent = threading.Event()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.buf.extend(data)
        ev = json.loads(data)
        if (not self.sent.is_set() and ev.get("request") == self.rid and ev["type"] == "token"
                and ev["index"] + 1 == self.after):
            os.write(self.stdin_w, json.dumps({"task": "cancel", "request": self.rid}).encode() + b"\n")
            os.close(self.stdin_w)  # the last line: the worker ends once every turn has ended
            self.sent.set()
        return len(data)


def test_cancel_of_one_turn_does_not_disturb_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = [plain("c0", PROMPTS[0], 16), plain("c1", PROMPTS[2], 16), plain("c2", PROMPTS[4], 16)]
    r, w = os.pipe()
    os.write(w, b"".join(json.dumps(q).encode() + b"\n" for q in reqs))
    out = _CancelWhen(w, "c1", after=4)
    with sealed(ROOT) as folder, HandoffServer([(c.name, c.fd) for c in folder.copies()]) as server:
        monkeypatch.setattr(worker, "HANDOFF_SOCKET", str(server.mount_dir / "sealed.sock"))
        pins = {n: p.model_dump(mode="json") for n, p in pins_of(folder).items()}
        load = parse_request(json.dumps({"task": "load", "request": "load", "files": pins}).encode() + b"\n")
        with os.fdopen(r, "rb") as stdin:
            assert serve_persistent(load, stdin, out) == 0  # type: ignore[arg-type]
    events = [json.loads(line) for line in out.buf.splitlines()]
    stats = of(events, "c1", "stats")[0]
    assert stats["detail"]["finish_reason"] == "cancelled" and 4 <= stats["generated_tokens"] < 16
    alone = run(monkeypatch, reqs)  # no cancel: the reference tokens
    assert tokens(events, "c1") == tokens(alone, "c1")[:stats["generated_tokens"]]
    for rid in ("c0", "c2"):
        assert tokens(events, rid) == tokens(alone, rid) and len(tokens(events, rid)) == 16
        assert of(events, rid, "stats")[0]["detail"]["finish_reason"] == "length"


@pytest.mark.gpu
def test_concurrent_turns_on_cuda_equal_each_alone_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA: the batched decode runs as graphs (one per batch size); fp32 greedy tokens equal each
    turn alone on the GPU and on the CPU."""
    reqs = [plain(f"g{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS[:4], (12, 20, 6, 16), strict=True))]
    together = run(monkeypatch, reqs, device="cuda", dtype="float32")
    assert _interleaved(together, "g0", "g1")
    cpu = run(monkeypatch, reqs, dtype="float32")
    for r in reqs:
        alone = run(monkeypatch, [r], device="cuda", dtype="float32")
        assert tokens(together, r["request"]) == tokens(alone, r["request"]) == tokens(cpu, r["request"])


def test_a_turn_that_fails_to_join_frees_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_run.model.cache import SlotPool

    real = SlotPool.load
    calls = iter(range(100))

    def flaky(self: SlotPool, row: int, src: Any) -> None:
        if next(calls) == 0:
            raise MemoryError("no room for the row")
        real(self, row, src)

    monkeypatch.setattr(SlotPool, "load", flaky)
    events = run(monkeypatch, [plain("f1", PROMPTS[0], 4), plain("f2", PROMPTS[1], 4)], max_batch=1)
    assert of(events, "f1", "error") and len(tokens(events, "f1")) == 1  # its first token, then the error
    assert len(tokens(events, "f2")) == 4  # the only row was given back
