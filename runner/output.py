"""Rendering helpers: JSON documents on stdout, human text on stderr/stdout, and the error contract.

Every ``--json`` document is printed on ONE line (so that ``generate``'s JSON-lines stream and a
failure of any command read the same way). A failure is::

    {"schema_version": 1, "ok": false, "type": "error", "error": {"kind", "message", "details",
     "hint", "path", "rule", "exit_code"}}

``error.kind`` is one of :data:`ERROR_KINDS` (documented in the README, "Errors and exit codes").
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1

#: every ``error.kind`` the CLI can print, with its exit code and meaning (README table).
ERROR_KINDS: dict[str, tuple[int, str]] = {
    "refused": (1, "a generic refusal"),
    "manifest": (1, "the folder inventory, a file's content or a safetensors header is refused"),
    "verification": (1, "signature, digest, signer or lock verification failed"),
    "policy": (1, "the licence / guardrail policy denies the run"),
    "model": (1, "the config or weights do not match the vendored architecture"),
    "audit": (1, "the audit log or a run attestation fails verification (a broken chain link: tampering)"),
    "aborted": (1, "a confirmation was declined"),
    "usage": (2, "bad arguments, option combinations or an existing output"),
    "policy-file": (2, "a policy file or the licence catalogue cannot be read or breaks the schema"),
    "state-file": (2, "the audit log or licence-acceptance store cannot be read or written safely"),
    "environment": (2, "something missing on this host (file, engine, GPU, permission)"),
    "sandbox": (2, "the sandbox could not be set up or the sandboxed run failed"),
    "worker": (2, "the sandboxed worker failed; its message is its own claim"),
    "worker-refused": (1, "the sandboxed worker refused the model files (its own checks); its message is its own claim"),
    "kernel": (2, "a requested kernel backend (Triton/CUDA) is not available"),
    "kernel-input": (2, "a kernel argument has the wrong shape, dtype or value"),
    "error": (2, "any other secure-run error"),
    "internal": (2, "an unexpected error (a bug, or a library failure); `secure-run -v` shows the traceback"),
    "interrupted": (130, "interrupted (SIGINT, Ctrl-C)"),
}


@dataclass
class OutputSettings:
    """Process-wide output manners set by the group options (``--quiet``, ``--verbose``, ``NO_COLOR``)."""

    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose
    color: bool | None = None  # None: click decides (a terminal); False: NO_COLOR / --no-color


SETTINGS = OutputSettings()


def no_color_requested(environ: dict[str, str] | None = None) -> bool:
    """True when ``NO_COLOR`` is set to a non-empty value (https://no-color.org)."""
    env = os.environ if environ is None else environ
    return bool(env.get("NO_COLOR", ""))


def error_document(error: dict[str, Any]) -> dict[str, Any]:
    """The one-line failure document of the contract (also the last line of a JSON-lines stream)."""
    return {"schema_version": SCHEMA_VERSION, "ok": False, "type": "error", "error": error}


def error_object(kind: str, message: str, *, exit_code: int, hint: str | None = None,
                 rule: str | None = None, details: tuple[str, ...] = (), path: str | None = None) -> dict[str, Any]:
    """An ``error`` object for failures that are not a SecureRunError (click usage, SIGINT)."""
    return {"kind": kind, "message": message, "details": list(details), "hint": hint, "path": path,
            "rule": rule, "exit_code": exit_code}


def denial_error(decision: Any) -> dict[str, Any] | None:
    """The ``error`` object of a policy decision that denies (None when it allows)."""
    from secure_run.errors import PolicyViolation

    try:
        decision.raise_if_denied()
    except PolicyViolation as err:
        return err.to_json()
    return None


def emit_json(doc: dict[str, Any]) -> None:
    """Print one JSON document, on one line, with the schema version stamped in."""
    out = {"schema_version": SCHEMA_VERSION, **doc}
    sys.stdout.write(json.dumps(out, separators=(",", ":"), default=str) + "\n")
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
