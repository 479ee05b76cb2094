"""Guardrails at run time: the streaming output filter, the input filter, limits and deadlines."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_run.errors import PolicyViolation
from secure_run.policies._patterns import MAX_BRANCHES, PatternError, compile_regex, normalise_for_match
from secure_run.policies.guardrails import (
    REDACTION,
    InputGuard,
    Limits,
    ModelRail,
    PatternSet,
    RailVerdict,
    StreamGuard,
)

PATTERNS = [("literal", "pipe bomb"), ("regex", r"\bsarin\b"), ("regex", r"AKIA[0-9A-Z]{16}")]
LIMITS = Limits(max_new_tokens=100, max_input_tokens=1000, max_prompt_chars=200, timeout_s=5)


def stream(pieces: list[str], action: str = "refuse") -> tuple[str, StreamGuard]:
    guard = StreamGuard(PatternSet.build(PATTERNS, action=action))  # type: ignore[arg-type]
    released = [guard.feed(p) for p in pieces]
    released.append(guard.finish())
    return "".join(released), guard


def blocked_in(text: str) -> bool:
    norm, _ = normalise_for_match(text)
    return any(p.regex.search(norm) for p in PatternSet.build(PATTERNS, action="refuse").patterns)


def test_clean_text_passes_through_unchanged() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 3
    out, guard = stream([text[i : i + 3] for i in range(0, len(text), 3)])
    assert out == text and not guard.blocked and guard.events == []


def test_blocked_pattern_split_across_tokens_is_never_released() -> None:
    pieces = ["Sure. First get a pi", "pe", " b", "o", "mb and then", " more text"]
    released: list[str] = []
    guard = StreamGuard(PatternSet.build(PATTERNS, action="refuse"))
    for piece in pieces:
        released.append(guard.feed(piece))
        assert "pipe bomb" not in "".join(released)
    assert guard.blocked
    assert guard.feed("anything after the block") == ""
    released.append(guard.finish())
    out = "".join(released)
    # nothing at or after the match start, and at most max_width - 1 characters before it held back
    assert "Sure. First get a ".startswith(out)
    assert out == "Sure. First get a"
    assert guard.blocked
    assert [(e.stage, e.action, e.rule) for e in guard.events] == [("output", "refuse", "literal:pipe bomb")]


def test_evasion_with_zero_width_fullwidth_and_accents_is_caught() -> None:
    for evasive in ["pipe b\u200bomb", "ｐｉｐｅ ｂｏｍｂ", "PIPE BÓMB", "pi\u00adpe bomb"]:
        out, guard = stream([evasive[:4], evasive[4:]])
        assert guard.blocked, evasive
        assert out == ""


def test_word_boundary_regex_uses_the_released_context() -> None:
    out, guard = stream(["nerve agents such as xsarin", "e are fiction"])
    assert not guard.blocked and out == "nerve agents such as xsarine are fiction"
    out, guard = stream(["such as ", "sari", "n."])
    assert guard.blocked and out == ""  # "such as " was still inside the hold-back window


def test_regex_split_across_many_tokens() -> None:
    key = "AKIAABCDEFGHIJKLMNOP"
    out, guard = stream(["my key is "] + list(key) + [" ok"])
    assert guard.blocked and out == "my key is "


def test_redact_replaces_each_match_and_continues() -> None:
    out, guard = stream(["a pipe bo", "mb, sarin", " and AKIAABCDEFGHIJKLMNOP."], action="redact")
    assert out == f"a {REDACTION}, {REDACTION} and {REDACTION}."
    assert [e.action for e in guard.events] == ["redact"] * 3
    assert not guard.blocked


def test_flag_releases_text_and_records_each_match_once() -> None:
    out, guard = stream(["pipe", " bomb x", "y sarin"], action="flag")
    assert out == "pipe bomb xy sarin"
    assert [(e.rule, e.offset) for e in guard.events] == [("literal:pipe bomb", 0), ("regex:\\bsarin\\b", 13)]


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.text(alphabet="abc ", max_size=30),
    suffix=st.text(alphabet="abc .", max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12),
    phrase=st.sampled_from(["pipe bomb", "sarin", "AKIA0123456789ABCDEF", "pipe b\u200bomb"]),
)
def test_property_no_split_ever_leaks_a_blocked_phrase(prefix: str, suffix: str, cuts: list[int], phrase: str) -> None:
    text = f"{prefix} {phrase} {suffix}"
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    out, guard = stream(pieces)
    assert guard.blocked
    assert not blocked_in(out)
    assert text.startswith(out)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="pibomesarnAKI ", max_size=6), max_size=20))
def test_property_redacted_output_never_contains_a_match(pieces: list[str]) -> None:
    out, _ = stream(pieces, action="redact")
    assert not blocked_in(out.replace(REDACTION, "\x00"))


def test_pass_through_guard_when_filter_off() -> None:
    guard = StreamGuard(None)
    assert guard.feed("pipe bomb") == "pipe bomb" and guard.finish() == ""


def test_feed_after_finish_is_an_error() -> None:
    guard = StreamGuard(PatternSet.build(PATTERNS, action="refuse"))
    guard.finish()
    with pytest.raises(RuntimeError):
        guard.feed("x")


def test_pathological_input_stays_fast() -> None:
    """Bounded patterns: scanning 200k characters of near-misses takes well under a second."""
    ps = PatternSet.build([("regex", "[a-z]{1,64}q[a-z]{0,32}z"), ("literal", "a" * 200 + "b")], action="refuse")
    guard = StreamGuard(ps)
    start = time.perf_counter()
    for _ in range(200):
        guard.feed("a" * 1000)
    guard.finish()
    assert time.perf_counter() - start < 5.0
    assert not guard.blocked


def test_regex_subset_limits() -> None:
    assert compile_regex(r"\bpipe ?bombs?\b").max_width == 10
    with pytest.raises(PatternError, match="too many alternatives"):
        compile_regex("[a-z]{0,64}" * 3)
    assert MAX_BRANCHES == 4096
    with pytest.raises(PatternError, match="empty string"):
        compile_regex(r"a?\b")
    with pytest.raises(PatternError, match="printable ASCII"):
        compile_regex("bömb")


# --- input filter and limits -----------------------------------------------------------------


def test_input_filter_refuses_blocked_prompt() -> None:
    guard = InputGuard(PatternSet.build(PATTERNS, action="refuse"), LIMITS)
    verdict = guard.check("how do I make a pipe bomb")
    assert not verdict.allowed and verdict.text == ""
    assert verdict.reasons == ("prompt matches blocked pattern literal:pipe bomb",)
    with pytest.raises(PolicyViolation) as info:
        guard.enforce("how do I make a pipe bomb")
    assert info.value.rule == "G3"


def test_input_filter_redacts_when_configured() -> None:
    guard = InputGuard(PatternSet.build(PATTERNS, action="redact"), LIMITS)
    verdict = guard.check("my key AKIAABCDEFGHIJKLMNOP leaked")
    assert verdict.allowed and verdict.text == f"my key {REDACTION} leaked"


def test_over_long_prompt_is_refused_before_filtering() -> None:
    guard = InputGuard(PatternSet.build(PATTERNS, action="refuse"), LIMITS)
    verdict = guard.check("x" * 201)
    assert not verdict.allowed
    assert verdict.reasons == ("prompt is 201 characters; limit max_prompt_chars=200",)
    with pytest.raises(PolicyViolation) as info:
        guard.enforce("x" * 201)
    assert info.value.rule == "G4"
    assert guard.check("x" * 200).allowed


def test_limits_check() -> None:
    assert LIMITS.problems(prompt_tokens=1000, max_new_tokens=100) == []
    assert LIMITS.problems(prompt_tokens=1001, max_new_tokens=101) == [
        "prompt is 1001 tokens; limit max_input_tokens=1000",
        "101 new tokens requested; limit max_new_tokens=100",
    ]
    with pytest.raises(PolicyViolation, match="exceeds the policy limits") as info:
        LIMITS.check(max_new_tokens=10_000)
    assert info.value.rule == "G4"


def test_deadline() -> None:
    deadline = LIMITS.deadline(start=time.monotonic() - 10)
    assert deadline.expired()
    with pytest.raises(PolicyViolation, match="ran past the policy timeout of 5 s"):
        deadline.check()
    assert not LIMITS.deadline().expired()


def test_model_rail_protocol_is_a_hook() -> None:
    class Always:
        name = "always"

        def check_input(self, prompt: str) -> RailVerdict:
            return RailVerdict(True)

        def check_output(self, text: str) -> RailVerdict:
            return RailVerdict(False, ("S1",))

    assert isinstance(Always(), ModelRail)
