"""Model card (README.md) front matter: parsed with the hardened YAML loader (checks A3, A5, G2)."""

from __future__ import annotations

import re
from typing import Any

from ._yaml import load_yaml
from .errors import PolicyFileError

_FENCE = re.compile(r"^---[ \t]*$", re.MULTILINE)


class CardError(Exception):
    """The front matter is missing or malformed (message says why)."""


def front_matter(readme: str, *, source: str = "README.md") -> dict[str, Any]:
    """The YAML front matter of a model card (``---`` fenced block at the very top).

    Raises:
        CardError: no front matter, or it is not a YAML mapping (duplicate keys, aliases ... refused).
    """
    text = readme.removeprefix("\ufeff")
    if not _FENCE.match(text):
        raise CardError(f"{source} has no YAML front matter (it must start with a '---' line)")
    end = _FENCE.search(text, 3)
    if end is None:
        raise CardError(f"{source}: front matter is not closed by a '---' line")
    try:
        data = load_yaml(text[3 : end.start()].encode("utf-8"), source=source)
    except PolicyFileError as err:
        raise CardError(err.message) from None
    if not isinstance(data, dict):
        raise CardError(f"{source}: front matter is not a mapping")
    return data


def as_list(value: object) -> list[str]:
    """A front-matter value that may be a string or a list of strings, as a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def sentences_with(text: str, word: str, *, limit: int = 5) -> list[str]:
    """Sentences of ``text`` that mention ``word`` (case-insensitive), whitespace collapsed."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if not ln.lstrip().startswith(("#", "---", "|"))]
        flat = re.sub(r"\s+", " ", " ".join(lines)).strip()
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if word.lower() in s.lower()]
    return [s[:300] for s in out[:limit]]
