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
