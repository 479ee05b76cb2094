"""Host-side validation of the worker protocol: every hostile line is refused with its rule."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_run.sandbox.protocol import (
    MAX_REQUEST_BYTES,
    EventReader,
    GenerateRequest,
    ProtocolError,
    SelftestRequest,
    StatsEvent,
    StreamLimits,
    TextEvent,
    TokenEvent,
    encode_event,
    encode_request,
    parse_request,
    terminal_safe,
)


def _stats(**extra: object) -> bytes:
    doc = {"type": "stats", "prompt_tokens": 1, "generated_tokens": 2, "seconds": 0.5,
           "tokens_per_second": 4.0, "device": "cpu", **extra}
    return json.dumps(doc).encode()


def test_valid_events_round_trip() -> None:
    reader = EventReader()
    events = [TokenEvent(type="token", index=0, token_id=5), TextEvent(type="text", text="héllo ☕\n"),
              StatsEvent(type="stats", prompt_tokens=3, generated_tokens=1, seconds=1.0, tokens_per_second=1.0,
                         device="cuda", detail={"a": 1, "b": "x", "c": 1.5, "d": True})]
    data = b"".join(encode_event(e) for e in events)
    got = [ev for i in range(0, len(data), 7) for ev in reader.feed(data[i:i + 7])]  # arbitrary chunking
    reader.close()
    assert got == events


@pytest.mark.parametrize("raw, clean", [
    ("a\x1b[31mred\x1b[0m", "ared"),                      # CSI colour
    ("x\x1b[2J\x1b[H", "x"),                              # clear screen, cursor home
    ("t\x1b]0;owned\x07u", "tu"),                         # OSC window title
    ("t\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "tlink"),  # OSC 8 hyperlink
    ("a\x9b31mb", "ab"),                                  # 8-bit CSI
    ("a\rb\x08c\x00d\x7f", "abcd"),                       # CR, backspace, NUL, DEL
    ("safe\u202eexe.txt", "safeexe.txt"),                 # right-to-left override
    ("keep\nnew\tlines", "keep\nnew\tlines"),
])
def test_escape_sequences_and_controls_are_stripped(raw: str, clean: str) -> None:
    line = json.dumps({"type": "text", "text": raw}).encode()
    ev = EventReader().parse_line(line)
    assert isinstance(ev, TextEvent) and ev.text == clean


def test_lone_surrogates_are_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        EventReader().parse_line(b'{"type": "text", "text": "a\\ud800b"}')
    assert info.value.rule == "sandbox.protocol.invalid_event"


def test_stats_detail_strings_are_sanitised_too() -> None:
    ev = EventReader().parse_line(_stats(detail={"note": "\x1b[5mblink"}, device="cpu\x1b[0m"))
    assert isinstance(ev, StatsEvent) and ev.detail["note"] == "blink" and ev.device == "cpu"


def _refused(reader: EventReader, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        for _ in reader.feed(data):
            pass
        reader.close()
    return info.value


@pytest.mark.parametrize("line, what", [
    (b"not json", "bad_json"),
    (b'{"type": "text", "text": "x"', "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (b'"just a string"', "bad_json"),
    (b'{"type": "text", "text": "a", "text": "b"}', "bad_json"),      # duplicate key
    (_stats(seconds=float("nan")), "bad_json"),
    (b"[" * 20000 + b"]" * 20000, "bad_json"),                       # nesting bomb
    (b'{"type": "exec", "cmd": "sh"}', "unknown_event"),
    (b'{"text": "no type"}', "unknown_event"),
    (b'{"type": "token", "index": 0, "token_id": 1, "extra": 1}', "invalid_event"),
    (b'{"type": "token", "index": "0", "token_id": 1}', "invalid_event"),
    (b'{"type": "token", "index": 0, "token_id": true}', "invalid_event"),
    (b'{"type": "token", "index": -1, "token_id": 1}', "invalid_event"),
    (b'{"type": "error", "code": "pwned", "message": "x"}', "invalid_event"),
    (b'{"type": "text", "text": "' + b"a" * 20000 + b'"}', "invalid_event"),  # text too long
    (_stats(detail={f"k{i}": i for i in range(100)}), "invalid_event"),     # too many detail keys
    (_stats(detail={"Bad Key": 1}), "invalid_event"),
    (_stats(seconds=-1.0), "invalid_event"),
])
def test_hostile_lines_are_refused(line: bytes, what: str) -> None:
    err = _refused(EventReader(), line + b"\n")
    assert err.rule == f"sandbox.protocol.{what}"
    assert err.exit_code == 2
    assert "\x1b" not in err.message


def test_oversized_line_is_refused_before_the_newline_arrives() -> None:
    reader = EventReader(StreamLimits(max_line_bytes=1000))
    with pytest.raises(ProtocolError) as info:
        for _ in reader.feed(b'{"type": "text", "text": "' + b"a" * 5000):
            pass
    assert info.value.rule == "sandbox.protocol.line_too_long"


def test_line_count_and_total_size_caps() -> None:
    line = encode_event(TokenEvent(type="token", index=0, token_id=1))
    err = _refused(EventReader(StreamLimits(max_lines=3)), line * 4)
    assert err.rule == "sandbox.protocol.too_many_lines"
    err = _refused(EventReader(StreamLimits(max_total_bytes=100)), line * 10)
    assert err.rule == "sandbox.protocol.output_too_large"


def test_truncated_final_line_is_refused() -> None:
    reader = EventReader()
    list(reader.feed(b'{"type": "token", "index": 0, "token_id": 1}\n{"type": "tok'))
    with pytest.raises(ProtocolError) as info:
        reader.close()
    assert info.value.rule == "sandbox.protocol.truncated_line"


def test_unknown_type_is_shown_sanitised() -> None:
    err = _refused(EventReader(), b'{"type": "\\u001b[31mevil"}\n')
    assert "evil" in err.message and "\x1b" not in err.message


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_escape_as_anything_but_protocol_errors(data: bytes) -> None:
    reader = EventReader(StreamLimits(max_line_bytes=512))
    try:
        for ev in reader.feed(data):
            assert isinstance(ev, (TokenEvent, TextEvent, StatsEvent)) or ev.type == "error"
        reader.close()
    except ProtocolError:
        pass


@given(st.text(max_size=300))
@settings(max_examples=500, deadline=None)
def test_terminal_safe_output_has_no_controls(text: str) -> None:
    out = terminal_safe(text)
    for ch in out:
        assert ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs")
        assert ch not in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    assert terminal_safe(out) == out  # idempotent


# --- requests -------------------------------------------------------------------------------------


def test_requests_round_trip() -> None:
    sel = SelftestRequest(task="selftest", seed=3, steps=4, device="cuda", triton=True, matmul_size=64)
    assert parse_request(encode_request(sel)) == sel
    gen = GenerateRequest.model_validate({"task": "generate", "messages": [{"role": "user", "content": "hi"}],
                                          "max_new_tokens": 5, "files": _FILES}, strict=False)
    assert parse_request(encode_request(gen)) == gen
    assert gen.files["model-00001.safetensors"].identity.ctime_ns == 5


_FILES = {"model-00001.safetensors": {"sha256": "ab" * 32, "identity": {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4,
                                                                      "ctime_ns": 5}}}


@pytest.mark.parametrize("doc, needle", [
    ({"task": "shell"}, "task"),
    ({"task": "selftest", "extra": 1}, "extra"),
    ({"task": "selftest", "weights_file": "../../etc/passwd"}, "weights_file"),
    ({"task": "selftest", "weights_file": "/etc/passwd"}, "weights_file"),
    ({"task": "selftest", "steps": 0}, "steps"),
    ({"task": "selftest", "device": "tpu"}, "device"),
    ({"task": "generate", "files": _FILES}, "exactly one of messages and prompt"),
    ({"task": "generate", "prompt": "a", "messages": [], "files": _FILES}, "exactly one of messages and prompt"),
    ({"task": "generate", "prompt": "a", "device": "cuda:0; rm", "files": _FILES}, "device"),
    ({"task": "generate", "prompt": "a", "files": {"../x": _FILES["model-00001.safetensors"]}}, "files"),
    ({"task": "generate", "messages": [{"role": "root", "content": "x"}], "files": _FILES}, "role"),
    ({"task": "generate", "prompt": "a", "temperature": -1, "files": _FILES}, "temperature"),
    # issue 10 item 3: a request without pins, or with an identity lacking ctime, is refused
    ({"task": "generate", "prompt": "a"}, "files"),
    ({"task": "generate", "prompt": "a", "files": {}}, "files"),
    ({"task": "generate", "prompt": "a", "files": {"a.json": {"sha256": "ab" * 32, "identity": {
        "dev": 1, "ino": 2, "size": 3, "mtime_ns": 4}}}}, "ctime_ns"),
    ({"task": "generate", "prompt": "a", "files": {"a.json": {"sha256": "xyz", "identity": {
        "dev": 1, "ino": 2, "size": 3, "mtime_ns": 4, "ctime_ns": 5}}}}, "sha256"),
])
def test_bad_requests_are_refused(doc: dict[str, object], needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(json.dumps(doc).encode())
    assert info.value.rule == "sandbox.protocol.bad_request"
    assert needle in info.value.message


def test_oversized_request_is_refused() -> None:
    with pytest.raises(ProtocolError, match="more than"):
        parse_request(b" " * (MAX_REQUEST_BYTES + 1))
