"""Rendering helpers: JSON documents on stdout, human text (rich) on stderr/stdout."""

from __future__ import annotations

import json
import sys
from typing import Any

SCHEMA_VERSION = 1


def emit_json(doc: dict[str, Any]) -> None:
    """Print one JSON document with the schema version stamped in."""
    out = {"schema_version": SCHEMA_VERSION, **doc}
    sys.stdout.write(json.dumps(out, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def emit_line(doc: dict[str, Any]) -> None:
    """Print one JSON line (streamed output), flushed at once."""
    sys.stdout.write(json.dumps(doc, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


class ModelTextWriter:
    """Makes streamed model text unable to pose as secure-run's own status lines in text mode.

    secure-run's status lines start with ``[stage]`` (``[verify]``, ``[policy]``, ``[done]`` ...)
    or ``secure-run:``. A line of model output whose first non-blank character is ``[`` or that
    starts with ``secure-run`` is prefixed with :data:`MARK`, across chunk boundaries (leading
    blanks are held back until the line's first visible character arrives). The text must
    already be :func:`~secure_run.sandbox.protocol.terminal_safe` (no escapes, no invisible
    characters), which the worker protocol guarantees.

        >>> w = ModelTextWriter()
        >>> w.render("ok\\n[ver") + w.render("ify] signature ok\\n  [done]") + w.flush()
        'ok\\n» [verify] signature ok\\n»   [done]'
    """

    MARK = "» "
    _IMPERSONATED = ("secure-run", "Secure-run", "SECURE-RUN")

    def __init__(self) -> None:
        self._pending = ""  # blanks (and a possible 'secure-run' prefix) at the start of the current line
        self._at_line_start = True

    def render(self, text: str) -> str:
        """The terminal form of the next chunk of model text."""
        out: list[str] = []
        for ch in text:
            if not self._at_line_start:
                out.append(ch)
                if ch == "\n":
                    self._at_line_start = True
                continue
            self._pending += ch
            stripped = self._pending.lstrip(" \t")
            if ch == "\n":
                out.append(self._pending)
                self._pending = ""
                continue
            if not stripped:
                continue  # still blanks
            if stripped.startswith(("[", *self._IMPERSONATED)):
                out.append(self.MARK + self._pending)
            elif any(p.startswith(stripped) for p in self._IMPERSONATED):
                continue  # could still become 'secure-run'; wait for more
            else:
                out.append(self._pending)
            self._pending = ""
            self._at_line_start = False
        return "".join(out)

    def flush(self) -> str:
        """What is held back at the end of the stream."""
        rest, self._pending = self._pending, ""
        stripped = rest.lstrip(" \t")
        if stripped and any(p.startswith(stripped) for p in self._IMPERSONATED):
            return self.MARK + rest
        return rest
