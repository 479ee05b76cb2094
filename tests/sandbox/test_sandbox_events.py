"""Issue 10 item 14: the worker does not control host output.

The host (not the worker) counts tokens and bounds text per token; worker stats are checked and
labelled as worker-reported; worker errors cannot carry host rule ids or kinds; invisible
characters are removed. These run the real ``run_worker`` over a scripted sandbox (no engine
needed); ``test_sandbox_isolation.py`` repeats the text flood with a hostile worker inside both
real backends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest

from secure_run.errors import ModelError, Refusal, SandboxError
from secure_run.sandbox.backends import (
    STDOUT,
    Backend,
    Outcome,
    SandboxRun,
    WorkerFailure,
    WorkerRefusal,
    run_worker,
)
from secure_run.sandbox.policy import SandboxPolicy
from secure_run.sandbox.protocol import (
    EventReader,
    EventValidator,
    GenerateRequest,
    ProtocolError,
    RunBounds,
    SelftestRequest,
    StatsEvent,
    TextEvent,
    TokenEvent,
    WorkerStats,
    encode_event,
    terminal_safe,
)


class _ScriptedRun(SandboxRun):
    def __init__(self, policy: SandboxPolicy, out: bytes) -> None:
        super().__init__(policy)
        self.out = out
        self.killed = False
        self.finished = False

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        for i in range(0, len(self.out), 4096):
            yield STDOUT, self.out[i:i + 4096]

    def kill(self) -> None:
        self.killed = True

    def finish(self) -> Outcome:
        self.finished = True
        return Outcome(exit_code=0, timed_out=False, oom_killed=False)


class _ScriptedBackend(Backend):
    """A 'sandbox' whose worker printed exactly ``out``."""

    name = "scripted"

    def __init__(self, out: bytes) -> None:
        self.out = out
        self.runs: list[_ScriptedRun] = []

    def python_argv(self) -> list[str]:
        return ["python"]

    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"") -> SandboxRun:
        run = _ScriptedRun(policy, self.out)
        self.runs.append(run)
        return run


POLICY = SandboxPolicy()
GEN8 = GenerateRequest(task="generate", prompt="hi", max_new_tokens=8)


def _lines(*docs: dict[str, object]) -> bytes:
    return b"".join(json.dumps(d).encode() + b"\n" for d in docs)


def _tok(i: int, tid: int = 1) -> dict[str, object]:
    return {"type": "token", "index": i, "token_id": tid}


def _stats(n: int, **kw: object) -> dict[str, object]:
    doc: dict[str, object] = {"type": "stats", "prompt_tokens": 1, "generated_tokens": n, "seconds": 1.0,
                              "tokens_per_second": float(n), "device": "cpu", "detail": {"uid": 65534}}
    doc.update(kw)
    return doc


def _run(out: bytes, request: GenerateRequest | SelftestRequest = GEN8) -> list[object]:
    backend = _ScriptedBackend(out)
    try:
        return list(run_worker(backend, POLICY, request))
    finally:
        assert all(r.finished for r in backend.runs)  # cleanup always ran


def test_honest_stream_passes() -> None:
    out = _lines(_tok(0), {"type": "text", "text": "Hel"}, _tok(1), {"type": "text", "text": "lo"}, _stats(2))
    events = _run(out)
    assert [type(e).__name__ for e in events] == ["TokenEvent", "TextEvent", "TokenEvent", "TextEvent", "StatsEvent"]


def test_3mb_of_text_for_8_tokens_is_refused() -> None:
    # issue 10 item 14: a worker printed 3 MB of text with --max-new-tokens 8 (text without token events)
    chunk = {"type": "text", "text": "A" * 16000}
    out = _lines(_tok(0), *([chunk] * 200), _stats(1))
    with pytest.raises(ProtocolError) as info:
        _run(out)
    assert info.value.rule == "sandbox.protocol.text_exceeds_tokens"


def test_text_before_any_token_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        _run(_lines({"type": "text", "text": "[verify] signature ok"}, _stats(0)))
    assert info.value.rule == "sandbox.protocol.text_exceeds_tokens"


def test_more_tokens_than_asked_are_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        _run(_lines(*[_tok(i) for i in range(9)], _stats(9)))
    assert info.value.rule == "sandbox.protocol.too_many_tokens"


def test_token_indices_must_count_up() -> None:
    with pytest.raises(ProtocolError) as info:
        _run(_lines(_tok(0), _tok(0), _stats(2)))
    assert info.value.rule == "sandbox.protocol.token_order"


def test_token_out_of_vocab() -> None:
    v = EventValidator(RunBounds(max_tokens=4, vocab_size=100))
    with pytest.raises(ProtocolError) as info:
        v.check(TokenEvent(type="token", index=0, token_id=100))
    assert info.value.rule == "sandbox.protocol.token_out_of_vocab"


@pytest.mark.parametrize("stats, what", [
    (_stats(2, generated_tokens=5), "stats_mismatch"),                       # claims more tokens
    (_stats(2, detail={"uid": 0}), "stats_implausible"),                     # claims to run as root
    (_stats(2, tokens_per_second=1e9), "stats_implausible"),                 # 1e9 tok/s
    (_stats(2, seconds=10.0, tokens_per_second=50.0), "stats_implausible"),  # rate not from its own numbers
    (_stats(2, detail={"uid": "65534"}), "stats_implausible"),
])
def test_forged_stats_are_refused(stats: dict[str, object], what: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _run(_lines(_tok(0), _tok(1), stats))
    assert info.value.rule == f"sandbox.protocol.{what}"


def test_prompt_token_count_is_checked_when_the_host_knows_it() -> None:
    v = EventValidator(RunBounds(max_tokens=4, prompt_tokens=7))
    with pytest.raises(ProtocolError) as info:
        v.stats(StatsEvent(type="stats", prompt_tokens=3, generated_tokens=0, seconds=0.0, tokens_per_second=0.0,
                           device="cpu"))
    assert info.value.rule == "sandbox.protocol.stats_mismatch"


def test_worker_stats_are_labelled_as_worker_reported() -> None:
    ev = StatsEvent(type="stats", prompt_tokens=3, generated_tokens=2, seconds=1.0, tokens_per_second=2.0,
                    device="cpu", detail={"uid": 65534})
    rec = WorkerStats.from_event(ev, host_counted_tokens=2).as_record()
    assert rec["source"].startswith("worker-reported") and rec["host_counted_tokens"] == 2
    assert rec["tokens_per_second"] == 2.0


def test_forged_signature_refusal_becomes_a_worker_error() -> None:
    # issue 10 item 14: the worker forged a host refusal ("signature invalid" with a verification rule)
    forged = {"type": "error", "code": "model_refused", "message": "signature invalid: model.sig does not verify",
              "rule": "verify.signature"}
    with pytest.raises(WorkerRefusal) as info:
        _run(_lines(forged))
    err = info.value
    assert err.kind == "worker" and err.rule == "sandbox.worker.model_refused"
    assert err.message.startswith("the sandboxed worker refused the model: ")
    assert any("verify.signature (not a worker rule; not trusted)" in d for d in err.details)
    assert err.exit_code == 1 and isinstance(err, ModelError) and isinstance(err, Refusal)


def test_worker_rules_of_its_own_namespace_are_kept() -> None:
    ev = {"type": "error", "code": "unavailable", "message": "CUDA was requested", "rule": "sandbox.worker.no_cuda"}
    with pytest.raises(WorkerFailure) as info:
        _run(_lines(ev))
    assert info.value.rule == "sandbox.worker.no_cuda" and info.value.exit_code == 2
    assert isinstance(info.value, SandboxError) and info.value.kind == "worker"


@pytest.mark.parametrize("ch", ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u2028", "\u2029",
                                "\U000e0001", "\U000e0041", "\U000e007f", "\U000e0000", "\u061c", "\u200e",
                                "\u2066", "\u202e", "\ue000"])
def test_invisible_characters_are_removed(ch: str) -> None:
    assert terminal_safe(f"a{ch}b") == "ab"
    ev = EventReader().parse_line(json.dumps({"type": "text", "text": f"a{ch}b"}).encode())
    assert isinstance(ev, TextEvent) and ev.text == "ab"


def test_visible_text_is_kept() -> None:
    s = "héllo ☕ 日本語 Ελληνικά\n\tok"
    assert terminal_safe(s) == s


def test_selftest_bounds_come_from_steps() -> None:
    req = SelftestRequest(task="selftest", steps=2)
    with pytest.raises(ProtocolError) as info:
        _run(_lines(_tok(0), _tok(1), _tok(2), _stats(3)), request=req)
    assert info.value.rule == "sandbox.protocol.too_many_tokens"


def test_encode_event_round_trip_passes_validator() -> None:
    v = EventValidator(RunBounds(max_tokens=1, expected_uid=65534))
    v.check(TokenEvent(type="token", index=0, token_id=3))
    v.check(TextEvent(type="text", text="x"))
    assert encode_event(TextEvent(type="text", text="x")).endswith(b"\n")
