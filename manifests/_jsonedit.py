"""Remove members from a JSON object while keeping every other byte of the file as it was.

Used by ``secure-run import`` to strip remote-code keys (``auto_map``...) from upstream
``config.json`` / ``tokenizer_config.json``: the reviewer's diff is then exactly the removed
members, and non-standard literals such as ``Infinity`` stay as written. Only members of the
top-level object are removed byte-wise; anything else falls back to re-serialization
(:func:`dump_like_hf`). The result is always re-parsed and compared with the expected document.
"""

from __future__ import annotations

import json
from typing import Any

from ._jsoncheck import JsonProblem, loads_strict

_WS = " \t\r\n"


class _Lex:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i] in _WS:
            self.i += 1

    def string(self) -> str:
        start = self.i
        if self.text[self.i] != '"':
            raise ValueError("expected a string")
        self.i += 1
        while True:
            ch = self.text[self.i]
            if ch == "\\":
                self.i += 2
                continue
            self.i += 1
            if ch == '"':
                break
        value = json.loads(self.text[start : self.i])
        assert isinstance(value, str)
        return value

    def value(self) -> None:
        depth = 0
        while True:
            ch = self.text[self.i]
            if ch == '"':
                self.string()
                if depth == 0:
                    return
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                if depth == 0:
                    return
                depth -= 1
                if depth == 0:
                    self.i += 1
                    return
            elif ch == "," and depth == 0:
                return
            self.i += 1


def _members(text: str) -> list[tuple[str, int, int]]:
    """(key, start of the key, end of the value) for each top-level member."""
    lex = _Lex(text)
    lex.ws()
    if text[lex.i] != "{":
        raise ValueError("not an object")
    lex.i += 1
    out: list[tuple[str, int, int]] = []
    while True:
        lex.ws()
        if text[lex.i] == "}":
            return out
        start = lex.i
        key = lex.string()
        lex.ws()
        if text[lex.i] != ":":
            raise ValueError("expected ':'")
        lex.i += 1
        lex.ws()
        lex.value()
        end = lex.i
        # scalars end at ',' or '}' possibly after trailing white space: trim it
        while end > start and text[end - 1] in _WS:
            end -= 1
        out.append((key, start, end))
        lex.ws()
        if text[lex.i] == ",":
            lex.i += 1


def _remove_one(text: str, key: str) -> str:
    members = _members(text)
    idx = next(i for i, m in enumerate(members) if m[0] == key)
    _, start, end = members[idx]
    if idx + 1 < len(members):
        return text[:start] + text[members[idx + 1][1] :]
    if idx > 0:
        return text[: members[idx - 1][2]] + text[end:]
    return text[:start] + text[end:]


def dump_like_hf(doc: Any) -> str:
    """Fallback formatting: 2-space indent, key order kept, UTF-8, ``Infinity`` kept, final newline."""
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=True) + "\n"


def remove_top_level_keys(text: str, keys: list[str]) -> tuple[str, bool]:
    """Remove top-level ``keys`` from the JSON object ``text``.

    Returns:
        (new text, byte_preserving): ``byte_preserving`` is False when the fallback
        re-serialization was used.
    """
    doc = loads_strict(text.encode("utf-8"))
    expected = {k: v for k, v in doc.items() if k not in set(keys)}
    try:
        new = text
        for key in keys:
            if key in doc:
                new = _remove_one(new, key)
        if loads_strict(new.encode("utf-8")) == expected:
            return new, True
    except (ValueError, IndexError, StopIteration, JsonProblem):
        pass
    return dump_like_hf(expected), False
