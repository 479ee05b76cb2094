"""Strict JSON loading and the config-borne remote-code rules (spec/signing.md section 7).

Decisions (DESIGN.md, "Decisions that settle conflicts"):

* JSON files are parsed with Python's :mod:`json`, which accepts the non-standard literals
  ``Infinity`` / ``-Infinity`` (upstream Nemotron/Superlinear ``config.json`` has
  ``"time_step_limit": [0.0, Infinity]``). ``NaN`` is refused (rule ``JSON-NAN``): it has no
  meaning in a config, compares unequal to itself and is a classic way to make two parsers
  disagree.
* Duplicate keys are refused (``JSON-DUPKEY``): parsers disagree on which value wins.
* Remote-code pointers are refused (``JSON-REMOTE-CODE``), found anywhere in the document:
  the keys ``auto_map``, ``trust_remote_code``, ``custom_pipelines``,
  ``_attn_implementation_internal``; ``attn_implementation`` / ``_attn_implementation`` /
  ``decode_kernel`` whose value names a Hub repository (contains ``/`` or ``:``); any ``*_class`` key or
  ``architectures`` entry whose value is a module path or repository reference (contains ``.``,
  ``/``, ``:`` or ``--``) rather than a bare class name; ``type`` entries of a sentence-transformers
  ``modules.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: Keys whose mere presence is a remote-code pointer (refused by verify, removed by import).
REMOTE_CODE_KEYS = frozenset({"auto_map", "trust_remote_code", "custom_pipelines", "_attn_implementation_internal"})
#: Keys that select an upstream attention implementation or kernel by name; a value that names a
#: Hub repository is a remote-code pointer (``decode_kernel`` is upstream Superlinear's kernel switch).
ATTN_KEYS = frozenset({"attn_implementation", "_attn_implementation", "decode_kernel"})
#: Every key that points at upstream code or kernels: the vendored model accepts them in
#: ``config.json`` only to report them, and never acts on them (``secure_run.model.config``).
#: This is the one definition; the model's config schema imports it.
CODE_POINTER_KEYS = REMOTE_CODE_KEYS | ATTN_KEYS
#: JSON files that are token tables (keys are arbitrary token strings): parsed strictly but not
#: scanned for remote-code keys (a token may legitimately be spelled "auto_map").
TOKEN_TABLES = frozenset({"tokenizer.json", "vocab.json", "added_tokens.json"})


class JsonProblem(Exception):
    """A JSON document could not be accepted; ``rule`` is JSON-PARSE, JSON-DUPKEY or JSON-NAN."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonProblem("JSON-DUPKEY", f"duplicate key {key!r}")
        out[key] = value
    return out


def _constant(allow_infinity: bool) -> Any:
    def parse(name: str) -> float:
        if name == "NaN":
            raise JsonProblem("JSON-NAN", "NaN literal")
        if not allow_infinity:
            raise JsonProblem("JSON-PARSE", f"non-standard literal {name}")
        return float("inf") if name == "Infinity" else float("-inf")

    return parse


def loads_strict(data: bytes, *, allow_infinity: bool = True) -> Any:
    """Parse one UTF-8 JSON document; refuse BOMs, duplicate keys and NaN.

    Args:
        data: the raw file bytes.
        allow_infinity: accept ``Infinity`` / ``-Infinity`` (True for config files).

    Raises:
        JsonProblem: with the rule id and a one-line reason.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonProblem("JSON-PARSE", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise JsonProblem("JSON-PARSE", "starts with a byte-order mark")
    try:
        return json.loads(
            text, object_pairs_hook=_pairs_no_duplicates, parse_constant=_constant(allow_infinity)
        )
    except JsonProblem:
        raise
    except json.JSONDecodeError as exc:
        raise JsonProblem("JSON-PARSE", f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise JsonProblem("JSON-PARSE", "nesting too deep") from None
    except ValueError as exc:  # e.g. integer string too long
        raise JsonProblem("JSON-PARSE", str(exc)) from None


def _pointer(parts: tuple[str, ...]) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass(frozen=True)
class RemoteCodePointer:
    """One remote-code pointer found in a JSON document.

    Attributes:
        pointer: RFC 6901 JSON pointer of the offending key (``/auto_map``).
        key: the key name.
        reason: why it is refused.
        value: the offending value (for reports).
    """

    pointer: str
    key: str
    reason: str
    value: Any


def _is_code_reference(value: str) -> bool:
    return any(marker in value for marker in (".", "/", ":", "--"))


def _check_member(parts: tuple[str, ...], key: str, value: Any, file_name: str) -> RemoteCodePointer | None:
    here = _pointer((*parts, key))
    if key in REMOTE_CODE_KEYS:
        return RemoteCodePointer(here, key, f"{key!r} makes loaders import code from the repository", value)
    if key in ATTN_KEYS and isinstance(value, str) and ("/" in value or ":" in value):
        return RemoteCodePointer(here, key, f"{key}={value!r} names a Hub kernel repository (CVE-2026-4372)", value)
    if key.endswith("_class") and isinstance(value, str) and _is_code_reference(value):
        return RemoteCodePointer(here, key, f"{key}={value!r} is a module path, not a built-in class name", value)
    if key == "architectures" and isinstance(value, list):
        bad = [v for v in value if not isinstance(v, str) or _is_code_reference(v)]
        if bad:
            return RemoteCodePointer(here, key, f"architectures entries {bad!r} are not bare class names", value)
    if file_name == "modules.json" and key == "type":
        return RemoteCodePointer(here, key, f"sentence-transformers imports the class {value!r}", value)
    return None


def remote_code_pointers(doc: Any, file_name: str) -> Iterator[RemoteCodePointer]:
    """Yield every remote-code pointer in a parsed JSON document (depth-first, document order).

    Args:
        doc: the parsed document.
        file_name: base name of the file (rules depend on it, e.g. ``modules.json``).
    """
    stack: list[tuple[tuple[str, ...], Any]] = [((), doc)]
    while stack:
        parts, node = stack.pop()
        children: list[tuple[tuple[str, ...], Any]] = []
        if isinstance(node, dict):
            for key, value in node.items():
                hit = _check_member(parts, key, value, file_name)
                if hit is not None:
                    yield hit
                    continue
                children.append(((*parts, key), value))
        elif isinstance(node, list):
            children = [((*parts, str(i)), v) for i, v in enumerate(node)]
        stack.extend(reversed(children))


def scans_for_remote_code(name: str) -> bool:
    """Whether the JSON file ``name`` (relative path) is scanned for remote-code pointers."""
    base = name.rsplit("/", 1)[-1]
    if base in TOKEN_TABLES or base.endswith(".safetensors.index.json"):
        return False
    return name not in ("model.sig", "import-report.json")
