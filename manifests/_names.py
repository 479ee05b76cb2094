"""Canonical relative names: one set of rules for file-system names and signed resource names.

A canonical name is a POSIX relative path (``a/b.json``) whose every component is a plain,
printable, valid-UTF-8 name. The same checks apply to names found on disk (inventory) and to
names found in a signed manifest (``predicate.resources[].name``), so a name that could never be
produced by the inventory can never match a signed one.
"""

from __future__ import annotations

import unicodedata

#: Longest component in bytes (Linux NAME_MAX) and longest relative path in bytes.
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
#: Deepest folder nesting accepted below the model root.
MAX_DEPTH = 32

# Unicode categories refused inside names: controls, format characters (bidi overrides,
# zero-width joiners), line/paragraph separators, surrogates, private use.
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co"})


def component_problem(component: str) -> str | None:
    """Say what is wrong with one path component, or return None when it is acceptable.

    Args:
        component: one name between slashes, as decoded by Python (non-UTF-8 bytes from the
            file system arrive as lone surrogates and are refused here).

    Returns:
        A short reason (for the finding text) or None.
    """
    if component in ("", ".", ".."):
        return f"component {component!r} is not a plain name"
    try:
        raw = component.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if len(raw) > MAX_COMPONENT_BYTES:
        return f"component is {len(raw)} bytes long (limit {MAX_COMPONENT_BYTES})"
    if "\\" in component:
        return "name contains a backslash"
    if "/" in component:
        return "name contains a slash"
    for ch in component:
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            return f"name contains the control/format character U+{ord(ch):04X}"
    if component != component.strip():
        return "name starts or ends with white space"
    return None


def name_problem(name: str) -> str | None:
    """Say what is wrong with a relative POSIX path, or return None when it is canonical.

    Canonical: non-empty, no leading ``/``, no trailing ``/``, no empty component (``//``), no
    ``.`` or ``..`` component, at most :data:`MAX_DEPTH` components, and every component
    acceptable to :func:`component_problem`.
    """
    if not name:
        return "empty name"
    if name.startswith("/"):
        return "absolute name (leading '/')"
    if name.endswith("/"):
        return "trailing '/'"
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        return f"nested {len(parts)} levels deep (limit {MAX_DEPTH})"
    try:
        if len(name.encode("utf-8")) > MAX_PATH_BYTES:
            return f"name longer than {MAX_PATH_BYTES} bytes"
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    for part in parts:
        problem = component_problem(part)
        if problem:
            return problem
    return None


def sort_key(name: str) -> tuple[str, ...]:
    """Order of resources in a manifest: path-component tuples (what the reference emits)."""
    return tuple(name.split("/"))
