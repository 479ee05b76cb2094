"""The worker (in-process and as a plain subprocess) and run_worker's error mapping (fake backend)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import pytest

from secure_run.errors import ModelError, SandboxError
from secure_run.sandbox import (
    ProtocolError,
    SandboxOOM,
    SandboxPolicy,
    SandboxTimeout,
    SelftestRequest,
    StatsEvent,
    TokenEvent,
    run_worker,
)
from secure_run.sandbox._internal import selftest
from secure_run.sandbox.backends import Backend, Outcome, SandboxRun
from secure_run.sandbox.protocol import EventReader, encode_request
from secure_run.sandbox.worker import serve


def _events(out: bytes) -> list[object]:
    reader = EventReader()
    events = list(reader.feed(out))
    reader.close()
    return events


def test_selftest_is_deterministic_and_matches_the_reference() -> None:
    out1, out2 = io.BytesIO(), io.BytesIO()
    req = encode_request(SelftestRequest(task="selftest", seed=42, steps=6))
    assert serve(req, out1) == 0 and serve(req, out2) == 0
    ev1, ev2 = _events(out1.getvalue()), _events(out2.getvalue())
    tokens = [e.token_id for e in ev1 if isinstance(e, TokenEvent)]
    assert tokens == [e.token_id for e in ev2 if isinstance(e, TokenEvent)]
    assert tokens == selftest.greedy_tokens(selftest.build_weights(42), steps=6, seed=42)
    assert isinstance(ev1[-1], StatsEvent) and ev1[-1].generated_tokens == 6
    # a different seed gives a different model and different tokens
    assert selftest.greedy_tokens(selftest.build_weights(43), steps=6, seed=43) != tokens


def test_selftest_weights_are_checked() -> None:
    w = selftest.build_weights(1)
    w["w1"] = w["w1"].double()
    with pytest.raises(ValueError, match="expected float32"):
        selftest.check_weights(w)
    w = selftest.build_weights(1)
    w["extra"] = w["w1"]
    with pytest.raises(ValueError, match="must be exactly"):
        selftest.check_weights(w)


@pytest.mark.parametrize("data, code, status", [
    (b"not json", "bad_request", 2),
    (b'{"task": "selftest", "steps": 0}', "bad_request", 2),
    (b'{"task": "selftest", "device": "cuda"}', "unavailable", 4),
])
def test_worker_reports_errors_as_one_event(data: bytes, code: str, status: int) -> None:
    import torch

    if code == "unavailable" and torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    out = io.BytesIO()
    assert serve(data, out) == status
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    ev = json.loads(lines[0])
    assert ev["type"] == "error" and ev["code"] == code


def test_worker_main_keeps_stray_prints_off_the_protocol_stream() -> None:
    """Anything printed to fd 1 by libraries must not corrupt the event stream."""
    code = ("import os, sys\n"
            "from secure_run.sandbox import worker\n"
            "import secure_run.sandbox._internal.selftest as st\n"
            "orig = st.greedy_tokens\n"
            "def noisy(*a, **k):\n"
            "    print('library chatter on stdout'); os.write(1, b'C-level chatter\\n')\n"
            "    return orig(*a, **k)\n"
            "st.greedy_tokens = noisy\n"
            "sys.exit(worker.main())\n")
    res = subprocess.run([sys.executable, "-c", code], input=encode_request(SelftestRequest(task="selftest", steps=2)),
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    events = _events(res.stdout)
    assert isinstance(events[-1], StatsEvent)
    assert b"chatter" in res.stderr and b"chatter" not in res.stdout


# --- run_worker's mapping, with a scripted fake backend ---------------------------------------------


class _FakeRun(SandboxRun):
    def __init__(self, policy: SandboxPolicy, chunks: list[tuple[int, bytes]], outcome: Outcome) -> None:
        super().__init__(policy)
        self._chunks, self._outcome, self.killed, self.finished = chunks, outcome, False, 0

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        yield from self._chunks

    def kill(self) -> None:
        self.killed = True

    def finish(self) -> Outcome:
        self.finished += 1
        return self._outcome


class _FakeBackend(Backend):
    name = "fake"

    def __init__(self, chunks: list[tuple[int, bytes]], outcome: Outcome) -> None:
        self.chunks, self.outcome = chunks, outcome
        self.runs: list[_FakeRun] = []

    def python_argv(self) -> list[str]:
        return ["python"]

    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"") -> SandboxRun:
        assert json.loads(stdin)["task"] == "selftest"
        run = _FakeRun(policy, self.chunks, self.outcome)
        self.runs.append(run)
        return run


OK = Outcome(exit_code=0, timed_out=False, oom_killed=False)
TOKEN = b'{"type": "token", "index": 0, "token_id": 3}\n'
STATS = (b'{"type": "stats", "prompt_tokens": 1, "generated_tokens": 1, "seconds": 0.1, '
         b'"tokens_per_second": 10.0, "device": "cpu"}\n')
REQ = SelftestRequest(task="selftest")
POLICY = SandboxPolicy(wall_clock_s=5)


def _drain(backend: _FakeBackend) -> list[object]:
    return list(run_worker(backend, POLICY, REQ))


def test_run_worker_yields_events_and_cleans_up() -> None:
    b = _FakeBackend([(1, TOKEN), (2, b"some stderr"), (1, STATS)], OK)
    events = _drain(b)
    assert [type(e).__name__ for e in events] == ["TokenEvent", "StatsEvent"]
    assert b.runs[0].finished == 1


@pytest.mark.parametrize("outcome, error, rule", [
    (Outcome(exit_code=137, timed_out=True, oom_killed=False), SandboxTimeout, "sandbox.timeout"),
    (Outcome(exit_code=137, timed_out=False, oom_killed=True), SandboxOOM, "sandbox.oom"),
    (Outcome(exit_code=1, timed_out=False, oom_killed=False), SandboxError, "sandbox.worker.failed"),
])
def test_run_worker_maps_how_the_sandbox_ended(outcome: Outcome, error: type, rule: str) -> None:
    with pytest.raises(error) as info:
        _drain(_FakeBackend([(1, TOKEN), (2, b"Traceback: \x1b[31mboom")], outcome))
    assert info.value.rule == rule
    if rule == "sandbox.worker.failed":
        assert "boom" in info.value.details[0] and "\x1b" not in info.value.details[0]


@pytest.mark.parametrize("code, error, exit_code, kind", [
    ("model_refused", ModelError, 1, "worker-refused"),
    ("bad_request", SandboxError, 2, "worker"),
    ("unavailable", SandboxError, 2, "worker"),
    ("internal", SandboxError, 2, "worker"),
])
def test_run_worker_maps_worker_errors(code: str, error: type, exit_code: int, kind: str) -> None:
    # the worker claims a host rule id ("verify.signature"): it is kept only as a worker-reported detail
    line = json.dumps({"type": "error", "code": code, "message": "shard changed \x1b[2J", "rule": "verify.signature"})
    with pytest.raises(error) as info:
        _drain(_FakeBackend([(1, line.encode() + b"\n")], Outcome(exit_code=3, timed_out=False, oom_killed=False)))
    assert info.value.rule == f"sandbox.worker.{code}" and info.value.kind == kind
    assert info.value.exit_code == exit_code
    assert info.value.message.endswith(": shard changed ") and "sandboxed worker" in info.value.message
    assert "worker-reported rule: verify.signature (not a rule the worker checks; not trusted)" in info.value.details


def test_run_worker_refuses_events_after_the_final_one_and_kills() -> None:
    b = _FakeBackend([(1, TOKEN + STATS + TOKEN)], OK)  # a token after the (consistent) final stats
    with pytest.raises(ProtocolError) as info:
        _drain(b)
    assert info.value.rule == "sandbox.protocol.after_final"
    assert b.runs[0].killed


def test_run_worker_requires_a_final_stats_event() -> None:
    with pytest.raises(SandboxError) as info:
        _drain(_FakeBackend([(1, TOKEN)], OK))
    assert info.value.rule == "sandbox.worker.failed"


def test_stopping_iteration_early_kills_the_sandbox() -> None:
    b = _FakeBackend([(1, TOKEN), (1, TOKEN.replace(b"0", b"1", 1)), (1, STATS)], OK)
    gen = run_worker(b, POLICY, REQ)
    next(gen)
    gen.close()
    assert b.runs[0].killed and b.runs[0].finished == 1


@pytest.mark.parametrize(("thinking", "rendered_with"), [(b"", True), (b'"enable_thinking": false, ', False),
                                                       (b'"enable_thinking": true, ', True)])
def test_generate_request_reaches_the_model_api(monkeypatch: pytest.MonkeyPatch, thinking: bytes,
                                                rendered_with: bool) -> None:
    """The worker's generate task calls the model package's inference API with the request's values."""
    calls: dict[str, object] = {}

    class _Tok:
        def encode(self, text: str) -> list[int]:
            calls["text"] = text
            return [1, 2, 3]

    class _Model:
        tokenizer = _Tok()

        def render_chat(self, messages: list[dict[str, str]], *, enable_thinking: bool = True) -> str:
            calls["messages"] = messages
            calls["enable_thinking"] = enable_thinking
            return "<chat>"

        def generate(self, ids: list[int], cfg: object) -> Iterator[int]:
            calls["cfg"] = cfg
            yield from (7, 8)

        def decode_stream(self, ids: Iterator[int]) -> Iterator[str]:
            for i in ids:
                yield f"<{i}>"

    class _Folder:
        def __enter__(self) -> str:
            return "folder"

        def __exit__(self, *exc: object) -> None:
            calls["closed"] = True

    def fake_open(request: object) -> _Folder:
        calls["open"] = (request,)
        return _Folder()

    def fake_load(folder: str, **kw: object) -> str:
        calls["load"] = (folder, kw)
        return "weights"

    import secure_run.model.inference as inference
    import secure_run.model.loader as loader
    import secure_run.model.tokenizer as tokenizer
    import secure_run.sandbox.worker as worker

    monkeypatch.setattr(worker, "open_pinned_folder", fake_open)
    monkeypatch.setattr(loader, "load_model", fake_load)
    monkeypatch.setattr(tokenizer.ModelTokenizer, "from_folder", classmethod(lambda cls, folder: "tok"))
    monkeypatch.setattr(inference, "InferenceModel", lambda model, tokenizer: _Model())
    req = (b'{"task": "generate", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2, '
           b'"seed": 9, ' + thinking + b'"files": {"a.safetensors": {"sha256": "' + b"ab" * 32 + b'", "identity": {"dev": 1, '
           b'"ino": 2, "size": 3, "mtime_ns": 4, "ctime_ns": 5}}}}')
    out = io.BytesIO()
    t0 = time.perf_counter()
    assert serve(req, out) == 0, out.getvalue()
    assert time.perf_counter() - t0 < 30
    events = _events(out.getvalue())
    assert [getattr(e, "token_id", getattr(e, "text", None)) for e in events[:-1]] == [7, "<7>", 8, "<8>"]
    (request,) = calls["open"]  # type: ignore[misc]
    assert calls["closed"] is True
    pin = request.files["a.safetensors"]
    assert (pin.identity.dev, pin.identity.ino, pin.identity.size, pin.identity.ctime_ns) == (1, 2, 3, 5)
    folder, kw = calls["load"]  # type: ignore[misc]
    assert folder == "folder" and kw["device"] == "cpu"
    assert calls["messages"] == [{"role": "user", "content": "hi"}] and calls["text"] == "<chat>"
    assert calls["enable_thinking"] is rendered_with  # --no-thinking reaches the worker's render
    assert calls["cfg"].max_new_tokens == 2 and calls["cfg"].seed == 9  # type: ignore[attr-defined]
    assert isinstance(events[-1], StatsEvent) and events[-1].prompt_tokens == 3 and events[-1].generated_tokens == 2
