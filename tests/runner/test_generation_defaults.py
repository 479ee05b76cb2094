"""Issue 13 item 6: sampling defaults from the verified ``generation_config.json`` (explicit flags win)
and the chat template's thinking switch as ``--thinking/--no-thinking`` (refused without a switch)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from secure_run.model.demo import demo_model_dir
from secure_run.model.tokenizer import ChatTemplate, ModelTokenizer
from secure_run.runner.cli import cli
from secure_run.runner.pipeline import GenerateOptions, model_sampling, prepare, resolve_sampling
from secure_run.sandbox.protocol import StatsEvent, TextEvent, TokenEvent

NO_SWITCH = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: names enable_thinking only in literal text and a comment: no switch
TEXT_ONLY = "{# enable_thinking #}enable_thinking{{ messages[0].content }}"


class FakeBackend:
    name = "fake"


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    state: dict[str, Any] = {"requests": []}

    def run_worker(backend: Any, policy: Any, request: Any) -> Iterator[Any]:
        state["requests"].append(request)
        yield TokenEvent(type="token", index=0, token_id=10)
        yield TextEvent(type="text", text="ok")
        yield StatsEvent(type="stats", prompt_tokens=5, generated_tokens=1, seconds=0.1, tokens_per_second=10,
                         device="cpu")

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.backends.run_worker", run_worker)
    return state


def _patch_tokenizer(monkeypatch: pytest.MonkeyPatch, **changes: Any) -> None:
    """The verified tokenizer, with its template or generation_config.json values replaced."""
    original = ModelTokenizer.from_folder.__func__  # type: ignore[attr-defined]

    def from_folder(cls: type[ModelTokenizer], folder: Any) -> ModelTokenizer:
        return dataclasses.replace(original(cls, folder), **changes)

    monkeypatch.setattr(ModelTokenizer, "from_folder", classmethod(from_folder))


def _one_turn(options: GenerateOptions) -> None:
    session = prepare(options)
    try:
        list(session.run_turn([{"role": "user", "content": "hello"}]))
    finally:
        session.close()


# --- sampling -------------------------------------------------------------------------------------


def test_model_sampling_reads_valid_values_only() -> None:
    assert model_sampling({"temperature": 0.6, "top_p": 0.95, "top_k": 20}) == \
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert model_sampling({"do_sample": False, "temperature": 0.6}) == {"temperature": 0.0}
    assert model_sampling({"temperature": "hot", "top_p": 0, "top_k": -1}) == {}
    assert model_sampling({"temperature": True, "top_p": 1.5, "top_k": 2.0}) == {}
    assert model_sampling({"temperature": 1000.0}) == {}


def test_flags_win_then_the_model_then_greedy() -> None:
    cfg = {"temperature": 0.6, "top_p": 0.95}
    s = resolve_sampling(GenerateOptions(), cfg)
    assert (s.temperature, s.top_p, s.top_k) == (0.6, 0.95, 0)
    assert s.sources == {"temperature": "generation_config.json", "top_p": "generation_config.json",
                         "top_k": "default"}
    s = resolve_sampling(GenerateOptions(temperature=0.0, top_k=5), cfg)
    assert (s.temperature, s.top_p, s.top_k) == (0.0, 0.95, 5)
    assert s.sources["temperature"] == "flag" and s.sources["top_k"] == "flag"
    s = resolve_sampling(GenerateOptions(), {})
    assert (s.temperature, s.top_p, s.top_k) == (0.0, 1.0, 0)


def test_one_shot_request_uses_the_verified_generation_config(scripted: dict[str, Any]) -> None:
    # the demo's signed generation_config.json: do_sample, temperature 0.7, top_p 0.95, no top_k
    cfg = json.loads((Path(demo_model_dir()) / "generation_config.json").read_text())
    assert (cfg["temperature"], cfg["top_p"]) == (0.7, 0.95)
    _one_turn(GenerateOptions(max_new_tokens=4))
    req = scripted["requests"][-1]
    assert (req.temperature, req.top_p, req.top_k) == (0.7, 0.95, 0)  # was 0.0 / 1.0 / 0 regardless


def test_explicit_flags_win_over_generation_config(scripted: dict[str, Any]) -> None:
    res = CliRunner().invoke(cli, ["generate", "--prompt", "hi", "--temperature", "0", "--top-k", "3", "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    req = scripted["requests"][-1]
    assert (req.temperature, req.top_p, req.top_k) == (0.0, 0.95, 3)
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    line = next(d["message"] for d in lines if d["type"] == "status" and d["stage"] == "sampling")
    assert line == ("sampling: temperature 0 (flag), top_p 0.95 (generation_config.json), top_k 3 (flag)")


def test_generation_config_values_are_read_from_the_verified_folder(scripted: dict[str, Any],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_tokenizer(monkeypatch, generation_defaults={"do_sample": False, "temperature": 0.9, "top_k": 40})
    _one_turn(GenerateOptions(max_new_tokens=4))
    req = scripted["requests"][-1]
    assert (req.temperature, req.top_p, req.top_k) == (0.0, 1.0, 40)


# --- thinking -------------------------------------------------------------------------------------


def test_thinking_switch_is_detected_from_the_template_code() -> None:
    demo = ModelTokenizer.from_dir(demo_model_dir())
    assert demo.thinking_switch  # the Superlinear/Nemotron-style template reads enable_thinking
    assert not dataclasses.replace(demo, chat_template=ChatTemplate(NO_SWITCH)).thinking_switch
    assert not dataclasses.replace(demo, chat_template=ChatTemplate(TEXT_ONLY)).thinking_switch
    assert not dataclasses.replace(demo, chat_template=None).thinking_switch


def test_no_thinking_reaches_the_host_render_and_the_worker(scripted: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    demo = ModelTokenizer.from_dir(demo_model_dir())
    msgs = [{"role": "user", "content": "hello"}]
    assert demo.render_chat(msgs, enable_thinking=False).endswith("<think></think>")
    assert demo.render_chat(msgs, enable_thinking=True).rstrip().endswith("<think>")
    seen: list[bool] = []
    original = ModelTokenizer.render_chat

    def render_chat(self: ModelTokenizer, messages: Any, **kw: Any) -> str:
        seen.append(kw.get("enable_thinking", True))
        return original(self, messages, **kw)

    monkeypatch.setattr(ModelTokenizer, "render_chat", render_chat)
    _one_turn(GenerateOptions(max_new_tokens=4, thinking=False))
    assert seen == [False] and scripted["requests"][-1].enable_thinking is False
    _one_turn(GenerateOptions(max_new_tokens=4))
    assert seen == [False, True] and scripted["requests"][-1].enable_thinking is None  # the template's default


@pytest.mark.parametrize("flag", ["--thinking", "--no-thinking"])
def test_thinking_flag_is_refused_without_a_switch(scripted: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                   flag: str) -> None:
    _patch_tokenizer(monkeypatch, chat_template=ChatTemplate(NO_SWITCH))
    res = CliRunner().invoke(cli, ["generate", "--prompt", "hi", flag, "--json"], catch_exceptions=False)
    assert res.exit_code == 2, res.output
    err = json.loads(res.stdout.splitlines()[-1])["error"]
    assert err["rule"] == "generate.thinking-unsupported" and flag in err["message"]
    assert "chat_template.jinja" in err["message"] and err["hint"]
    assert scripted["requests"] == []  # refused before any sandbox
    ok = CliRunner().invoke(cli, ["generate", "--prompt", "hi", "--json"], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output  # without the flag the same model runs


def test_the_worker_protocol_carries_the_switch() -> None:
    """The worker's render itself is tested in tests/sandbox/test_sandbox_worker.py (parametrized)."""
    from pydantic import ValidationError

    from secure_run.sandbox.protocol import GenerateRequest

    pin = {"sha256": "ab" * 32, "identity": {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4, "ctime_ns": 5}}
    base = {"task": "generate", "messages": [{"role": "user", "content": "hi"}], "files": {"a.safetensors": pin}}
    assert GenerateRequest.model_validate_json(json.dumps(base)).enable_thinking is None
    assert GenerateRequest.model_validate_json(json.dumps({**base, "enable_thinking": False})).enable_thinking is False
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate_json(json.dumps({**base, "enable_thinking": "maybe"}))


# --- generate --chat (one warm session) -------------------------------------------------------------


class _FakeWorker:
    """Plays the persistent worker: records every turn, answers one token."""

    def __init__(self) -> None:
        from secure_run.sandbox.protocol import LoadedEvent

        self.loaded = LoadedEvent(type="loaded", request="load", loads=1, load_seconds=0.1, vocab_size=512,
                                  device="cpu", uid=65534)
        self.alive = True
        self.turns: list[Any] = []

    def turn(self, req: Any, *, cancel: Any = None, timeout_s: float = 0) -> Iterator[Any]:
        self.turns.append(req)
        yield TokenEvent(type="token", request=req.request, index=0, token_id=10)
        yield TextEvent(type="text", request=req.request, text="ok")
        yield StatsEvent(type="stats", request=req.request, prompt_tokens=7, generated_tokens=1, seconds=0.1,
                         tokens_per_second=10, device="cpu", detail={"finish_reason": "length",
                                                                     "prefilled_tokens": 7, "reused_tokens": 0})

    def close(self) -> None:
        self.alive = False


def test_chat_uses_the_model_sampling_flags_and_thinking(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    workers: list[_FakeWorker] = []

    def start(*a: Any, **k: Any) -> _FakeWorker:
        workers.append(_FakeWorker())
        return workers[-1]

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.persistent.PersistentWorker.start", start)
    monkeypatch.setattr("secure_run.runner.cmd_generate._stdin_is_tty", lambda: True)
    res = CliRunner().invoke(cli, ["generate", "--chat", "--top-k", "7", "--no-thinking"], input="hi\n\n",
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (turn,) = workers[0].turns
    assert (turn.temperature, turn.top_p, turn.top_k) == (0.7, 0.95, 7)  # the model's, and the flag
    assert turn.rendered.endswith("<think></think>")  # the host render the worker prefills
    assert "[sampling] sampling: temperature 0.7 (generation_config.json)" in res.stderr
    res = CliRunner().invoke(cli, ["generate", "--chat", "--temperature", "0"], input="hi\n\n",
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (turn,) = workers[1].turns
    assert (turn.temperature, turn.top_p, turn.top_k) == (0.0, 0.95, 0)
    assert turn.rendered.rstrip().endswith("<think>")
