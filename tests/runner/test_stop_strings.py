"""``generate --stop`` (host-side stop strings) and the ``--max-new-tokens`` default from the policy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from runner_helpers import worker_stats as _stats
from runner_helpers import worker_tokens as _tokens

from secure_run.policies import load_policy
from secure_run.runner.cli import cli
from secure_run.runner.pipeline import Final, GenerateOptions, Text, prepare
from secure_run.runner.stops import StopStrings


def test_stop_string_split_across_chunks() -> None:
    s = StopStrings(["<|im_end|>"])
    out = [s.feed(c) for c in ["Hello <|im", "_e", "nd|> after"]]
    assert "".join(out) == "Hello " and s.stopped and s.matched == "<|im_end|>"
    assert s.feed("more") == "" and s.finish() == ""


def test_earliest_of_several_stops_wins_and_held_text_is_released_at_the_end() -> None:
    s = StopStrings(["END", "\n\n"])
    assert s.feed("a\n") == "a"  # "\n" may start "\n\n": held back
    assert s.feed("b E") == "\nb "  # the "\n" was not a stop; "E" may start "END"
    assert s.finish() == "E" and not s.stopped
    s = StopStrings(["END", "\n\n"])
    assert s.feed("x\n\ny END") == "x" and s.matched == "\n\n"


def test_no_stops_pass_everything_through() -> None:
    s = StopStrings([])
    assert s.feed("<|im_end|>") == "<|im_end|>" and s.finish() == "" and not s.stopped


class FakeBackend:
    name = "fake"


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    state: dict[str, Any] = {"events": [], "requests": [], "consumed": 0}

    def run_worker(backend: Any, policy: Any, request: Any) -> Iterator[Any]:
        state["requests"].append(request)
        for ev in state["events"]:
            state["consumed"] += 1
            yield ev

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.backends.run_worker", run_worker)
    return state


def test_the_stream_ends_at_the_stop_string(scripted: dict[str, Any], tmp_path: Path) -> None:
    pieces = ["The answer", " is 42.</an", "swer> Now some", " more text", " that nobody sees"]
    scripted["events"] = [*_tokens(pieces), _stats(len(pieces))]
    session = prepare(GenerateOptions(max_new_tokens=16, stop=("</answer>",)))
    out = list(session.run_turn([{"role": "user", "content": "hello"}]))
    assert "".join(e.text for e in out if isinstance(e, Text)) == "The answer is 42."
    final = out[-1]
    assert isinstance(final, Final) and final.stats["stop"] == "</answer>" and final.blocked is False
    assert scripted["consumed"] == 6  # the worker's stream was closed right after the stop string
    record = json.loads((tmp_path / "state/secure-run/audit.jsonl").read_text().splitlines()[-1])
    assert record["run_stats"]["stop"] == "</answer>"


def test_without_a_stop_the_whole_text_is_released(scripted: dict[str, Any]) -> None:
    scripted["events"] = [*_tokens(["a</ans", "wer"]), _stats(2)]
    out = list(prepare(GenerateOptions(max_new_tokens=16, stop=("</answer>",))).run_turn(
        [{"role": "user", "content": "hello"}]))
    assert "".join(e.text for e in out if isinstance(e, Text)) == "a</answer"
    assert isinstance(out[-1], Final) and out[-1].stats["stop"] is None


def test_max_new_tokens_defaults_to_the_policy_limit(scripted: dict[str, Any]) -> None:
    scripted["events"] = [*_tokens(["x"]), _stats(1)]
    session = prepare(GenerateOptions())
    limit = load_policy("builtin:demo").limits().max_new_tokens
    assert session.max_new_tokens == limit == 512  # was min(64, limit)
    list(session.run_turn([{"role": "user", "content": "hello"}]))
    assert scripted["requests"][0].max_new_tokens == limit


def test_generate_stop_option(scripted: dict[str, Any]) -> None:
    scripted["events"] = [*_tokens(["one two", " STOP three"]), _stats(2)]
    res = CliRunner().invoke(cli, ["generate", "--prompt", "hi", "--stop", "STOP", "--stop", "never", "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert "".join(d["text"] for d in lines if d["type"] == "text") == "one two "
    assert lines[-1]["type"] == "final" and lines[-1]["stats"]["stop"] == "STOP"


def test_quiet_generate_keeps_the_completion_and_the_licence_notice_only(scripted: dict[str, Any]) -> None:
    scripted["events"] = [*_tokens(["one two"]), _stats(1)]
    loud = CliRunner().invoke(cli, ["generate", "--prompt", "hi"], catch_exceptions=False)
    quiet = CliRunner().invoke(cli, ["-q", "generate", "--prompt", "hi"], catch_exceptions=False)
    assert loud.exit_code == quiet.exit_code == 0
    assert loud.stdout.startswith("one two") and quiet.stdout.startswith("one two")
    assert "[verify]" in loud.stderr and "[verify]" not in quiet.stderr and "[sandbox]" not in quiet.stderr
    assert "[licence]" in loud.stderr and "[licence]" in quiet.stderr  # the attribution notice stays (A4)
    assert "[done]" in quiet.stderr
