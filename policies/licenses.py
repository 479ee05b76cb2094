"""Licence identification: normalised-text fingerprints, a catalogue, and classification (check A1).

A LICENSE file is identified by the sha256 of its *normalised* text (:func:`normalise_license_text`),
so copies that differ only in layout get the same fingerprint, while any change of wording changes
it. Normalisation ("normalised-v1"), in order:

1. decode UTF-8, drop a BOM, Unicode NFKC;
2. curly quotes to ``'`` / ``"``, the Unicode dashes and minus to ``-``, no-break spaces to spaces;
3. CRLF / CR line endings to LF;
4. per line: strip, casefold; drop the line if it is a date line (``last modified:``,
   ``version release date:``) or a copyright notice (``copyright (c)`` / ``copyright ©`` /
   ``copyright <year>`` / ``copyright [yyyy]``);
5. join the lines with spaces; drop standalone bullet / heading tokens (``-``, ``*``, ``•``,
   ``·``, ``#`` ... ``######``) and the trailing dot of section numbers (``1.1.`` -> ``1.1``), so
   numbering styles and re-wrapping do not matter;
6. collapse every run of whitespace to one space.

Numbers, words and all other punctuation are kept: changing "30 days" to "90 days" changes the
fingerprint.

Classification of a text against the catalogue (:func:`classify_license`):

* **exact**: the fingerprint is one of an entry's pinned fingerprints -> that licence;
* **near**: no fingerprint matches, but an entry with a stored reference text has a Sørensen–Dice
  similarity (word bigrams) >= the threshold, all its ``key_phrases`` and one ``version_marker``
  are present -> "near match": the wording differs from every reviewed text (the evidence lists
  the changed words). Denied by default (``licenses.on_near_match``), because a changed clause is
  exactly what this check exists to catch;
* **structural**: the entry has no reference text (the NVIDIA licences, whose real text is not
  stored offline) but every ``key_phrase`` and a ``version_marker`` are present. If the entry has
  pinned fingerprints (catalogue or policy ``licenses.fingerprints``) the text is a *mismatch*
  (changed clause); otherwise it is "unpinned" and must be pinned on first import;
* **unknown**: nothing fits.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from importlib import resources
from typing import Literal

from pydantic import ValidationError

from ._base import LicenseId, Name, Sha256, Strict, Text
from ._yaml import load_yaml
from .errors import PolicyFileError

Obligation = Literal[
    "attribution_on_redistribution",
    "attribution_if_notice_present",
    "trustworthy_ai_terms",
    "preserve_guardrails",
    "no_ip_litigation",
    "export_compliance",
    "revocable",
    "nvidia_may_update",
    "include_license_on_redistribution",
    "state_changes",
]

#: name of the normalisation scheme; part of every fingerprint's evidence
NORMALISATION = "normalised-v1"


class Incorporated(Strict):
    """A document incorporated by reference (e.g. NVIDIA's Trustworthy AI terms)."""

    name: Name
    url: Name
    sha256: Sha256 | None = None
    fetched: date | None = None


class LicenseEntry(Strict):
    """One catalogue entry: what identifies a licence text and what it obliges.

    ``reference_text`` names a file under ``policies/data/licenses/texts/`` (built-in entries only);
    ``fingerprints`` are normalised-v1 sha256 values of reviewed copies.
    """

    id: LicenseId
    name: Name
    version: Name | None = None
    aliases: tuple[Name, ...] = ()
    url: Name | None = None
    fingerprints: tuple[Sha256, ...] = ()
    fingerprint_status: Literal["computed", "placeholder"] = "computed"
    reference_text: Name | None = None
    version_markers: tuple[Text, ...] = ()
    key_phrases: tuple[Text, ...] = ()
    attribution: Text | None = None
    obligations: tuple[Obligation, ...] = ()
    incorporated: tuple[Incorporated, ...] = ()
    notes: Text | None = None


class Catalog(Strict):
    """The licence catalogue file (``policies/data/licenses/catalog.yaml``)."""

    normalisation: Literal["normalised-v1"]
    licenses: tuple[LicenseEntry, ...]


_PUNCT = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2033": '"',
        "\u2010": "-",
        "\u2011": "-",
        "\u2012": "-",
        "\u2013": "-",
        "\u2014": "-",
        "\u2015": "-",
        "\u2212": "-",
        "\u00a0": " ",
        "\u202f": " ",
    }
)
_DROP_LINE = re.compile(r"^(?:last modified\s*:|version release date\s*:|copyright\s+(?:\(c\)|©|\d{4}|\[yyyy\]))")
_MARKER_TOKEN = re.compile(r"(?<!\S)(?:#{1,6}|[-*•·])(?!\S)")
_SECTION_DOT = re.compile(r"(?<!\S)(\d+(?:\.\d+)*)\.(?!\S)")


def normalise_license_text(text: str) -> str:
    """Normalise a licence text (rules "normalised-v1" in the module docstring)."""
    text = unicodedata.normalize("NFKC", text.removeprefix("\ufeff")).translate(_PUNCT)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    kept: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip().casefold()
        if not line or _DROP_LINE.match(line):
            continue
        kept.append(line)
    joined = _SECTION_DOT.sub(r"\1", _MARKER_TOKEN.sub(" ", " ".join(kept)))
    return re.sub(r"\s+", " ", joined).strip()


def license_fingerprint(text: str) -> str:
    """sha256 (hex) of :func:`normalise_license_text` of ``text``."""
    return hashlib.sha256(normalise_license_text(text).encode("utf-8")).hexdigest()


def normalise_notice_text(text: str) -> str:
    """Normalisation for NOTICE / attribution matching: NFKC, straight quotes, casefold, one space."""
    text = unicodedata.normalize("NFKC", text).translate(_PUNCT).casefold()
    return re.sub(r"\s+", " ", text).strip()


def similarity(a: str, b: str) -> float:
    """Sørensen–Dice coefficient over the multisets of word bigrams of two normalised texts."""
    wa, wb = a.split(), b.split()
    ba = Counter(zip(wa, wa[1:], strict=False))
    bb = Counter(zip(wb, wb[1:], strict=False))
    total = sum(ba.values()) + sum(bb.values())
    if total == 0:
        return 1.0 if a == b else 0.0
    return 2 * sum((ba & bb).values()) / total


def word_diff(reference: str, text: str, *, limit: int = 5) -> list[str]:
    """Up to ``limit`` readable changes between two normalised texts (``'old' -> 'new'``)."""
    ref_words, words = reference.split(), text.split()
    out: list[str] = []
    matcher = difflib.SequenceMatcher(a=ref_words, b=words, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        old = " ".join(ref_words[i1:i2])[:80]
        new = " ".join(words[j1:j2])[:80]
        out.append(f"{tag}: {old!r} -> {new!r}")
        if len(out) >= limit:
            break
    return out


def _data_dir() -> resources.abc.Traversable:
    return resources.files("secure_run.policies").joinpath("data")


@functools.cache
def builtin_catalog() -> tuple[LicenseEntry, ...]:
    """The catalogue shipped as package data (validated once, cached)."""
    source = "policies/data/licenses/catalog.yaml"
    raw = load_yaml(_data_dir().joinpath("licenses", "catalog.yaml").read_bytes(), source=source)
    try:
        catalog = Catalog.model_validate_json(json.dumps(raw))
    except ValidationError as err:
        raise PolicyFileError(f"{source}: invalid licence catalogue", details=[str(err)], path=source) from None
    return catalog.licenses


@functools.cache
def reference_text(entry_id: str) -> str | None:
    """The stored reference text of a built-in entry, normalised, or None when there is none."""
    for entry in builtin_catalog():
        if entry.id == entry_id and entry.reference_text is not None:
            raw = _data_dir().joinpath("licenses", "texts", entry.reference_text).read_text(encoding="utf-8")
            return normalise_license_text(raw)
    return None


MatchKind = Literal["exact", "near", "structural", "mismatch", "unknown"]


@dataclass(frozen=True)
class LicenseMatch:
    """What a LICENSE text was identified as.

    Attributes:
        kind: ``exact`` | ``near`` | ``structural`` (unpinned) | ``mismatch`` | ``unknown``.
        license_id: the catalogue id (None for ``unknown``).
        fingerprint: normalised-v1 sha256 of the text.
        file_sha256: sha256 of the file bytes.
        similarity: Dice similarity to the reference text, when one was compared.
        differences: readable word changes against the closest reference (near matches).
        missing: key phrases / version markers not found (structural checks).
        closest: for ``unknown``: the most similar catalogue entry with a reference text, if any.
    """

    kind: MatchKind
    license_id: str | None
    fingerprint: str
    file_sha256: str
    similarity: float | None = None
    differences: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    closest: str | None = None

    def to_json(self) -> dict[str, object]:
        """Plain-data form."""
        return {
            "kind": self.kind,
            "license_id": self.license_id,
            "fingerprint": self.fingerprint,
            "normalisation": NORMALISATION,
            "file_sha256": self.file_sha256,
            "similarity": self.similarity,
            "differences": list(self.differences),
            "missing": list(self.missing),
            "closest": self.closest,
        }


def _structure_missing(entry: LicenseEntry, light: str) -> list[str]:
    """Key phrases / version markers of ``entry`` absent from ``light`` (notice-normalised text)."""
    missing = [f"key phrase {p!r}" for p in entry.key_phrases if normalise_notice_text(p) not in light]
    if entry.version_markers and not any(normalise_notice_text(v) in light for v in entry.version_markers):
        missing.append(f"version marker (one of {list(entry.version_markers)!r})")
    return missing


def classify_license(
    data: bytes,
    catalog: Sequence[LicenseEntry],
    *,
    extra_fingerprints: Mapping[str, Sequence[str]] | None = None,
    threshold: float = 0.98,
) -> LicenseMatch:
    """Identify a LICENSE file's bytes against ``catalog`` (rules in the module docstring).

    Args:
        data: the file bytes (must be UTF-8 text; anything else is ``unknown``).
        catalog: entries to compare with, in priority order.
        extra_fingerprints: licence id -> more pinned fingerprints (policy ``licenses.fingerprints``).
        threshold: Dice similarity needed for a near match.
    """
    file_sha = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return LicenseMatch("unknown", None, hashlib.sha256(data).hexdigest(), file_sha, missing=("UTF-8 text",))
    norm = normalise_license_text(text)
    light = normalise_notice_text(text)
    fingerprint = hashlib.sha256(norm.encode("utf-8")).hexdigest()
    extra = extra_fingerprints or {}

    def pinned(entry: LicenseEntry) -> set[str]:
        return set(entry.fingerprints) | set(extra.get(entry.id, ()))

    # 1. exact fingerprint
    for entry in catalog:
        if fingerprint in pinned(entry):
            return LicenseMatch("exact", entry.id, fingerprint, file_sha)
    # 2. near match against stored reference texts
    best: tuple[float, LicenseEntry, str] | None = None
    for entry in catalog:
        ref = reference_text(entry.id)
        if ref is None:
            continue
        score = similarity(ref, norm)
        if best is None or score > best[0]:
            best = (score, entry, ref)
    if best is not None and best[0] >= threshold and not _structure_missing(best[1], light):
        score, entry, ref = best
        return LicenseMatch("near", entry.id, fingerprint, file_sha, round(score, 6), tuple(word_diff(ref, norm)))
    # 3. structural identification (entries without a stored reference text)
    for entry in catalog:
        if reference_text(entry.id) is not None or not entry.key_phrases:
            continue
        if not _structure_missing(entry, light):
            kind: MatchKind = "mismatch" if pinned(entry) else "structural"
            return LicenseMatch(kind, entry.id, fingerprint, file_sha)
    if best is None or best[0] < 0.5:
        return LicenseMatch("unknown", None, fingerprint, file_sha)
    score, entry, ref = best
    missing = tuple(_structure_missing(entry, light))
    return LicenseMatch(
        "unknown", None, fingerprint, file_sha, round(score, 6), tuple(word_diff(ref, norm)), missing, closest=entry.id
    )
