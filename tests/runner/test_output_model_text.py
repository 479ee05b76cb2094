"""Issue 10 item 14: in text mode the model cannot print lines that look like secure-run's status lines."""

from __future__ import annotations

import pytest

from secure_run.runner.output import ModelTextWriter


def _render(chunks: list[str]) -> str:
    w = ModelTextWriter()
    return "".join(w.render(c) for c in chunks) + w.flush()


@pytest.mark.parametrize("chunks", [
    ["[verify] verified /models/x: 3 files\n"],
    ["\n[done] 8 tokens, 1e9 tokens/s\n"],
    ["answer\n", "[", "policy] allowed\n"],
    ["answer\n   ", "\t[guardrail] ok\n"],
    ["secure-run: refused: signature invalid\n"],
    ["secu", "re-run: refused\n"],
])
def test_status_looking_lines_are_marked(chunks: list[str]) -> None:
    out = _render(chunks)
    for line in out.splitlines():
        body = line.lstrip(" \t")
        assert not body.startswith("[") and not body.startswith("secure-run"), out
    assert out.replace(ModelTextWriter.MARK, "") == "".join(chunks)  # nothing else changes


def test_ordinary_text_is_unchanged() -> None:
    chunks = ["Hello", ", world!\n", "  a [bracket] inside\n", "sec", "ond line", "\n"]
    assert _render(chunks) == "".join(chunks)


def test_trailing_partial_prefix_is_flushed_marked() -> None:
    assert _render(["ok\nsecure"]) == "ok\n" + ModelTextWriter.MARK + "secure"
