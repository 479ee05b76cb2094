"""Licence fingerprints, normalisation rules, classification (exact / near / structural / unknown)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from policies_support import APACHE, oml_license_text

from secure_run.policies.licenses import (
    builtin_catalog,
    classify_license,
    license_fingerprint,
    normalise_license_text,
    reference_text,
    similarity,
)

TEXTS = Path(__file__).resolve().parents[2] / "policies/data/licenses/texts"


def classify(text: str, **kw: object) -> object:
    return classify_license(text.encode(), builtin_catalog(), **kw)  # type: ignore[arg-type]


def test_catalogue_fingerprints_are_computed_from_the_stored_texts() -> None:
    """Every 'computed' entry's first fingerprint is the stored reference text's (no invented hashes)."""
    for entry in builtin_catalog():
        if entry.fingerprint_status == "computed":
            assert entry.reference_text is not None
            text = (TEXTS / entry.reference_text).read_text()
            assert license_fingerprint(text) == entry.fingerprints[0], entry.id
        else:
            assert entry.fingerprints == (), f"{entry.id}: placeholder entries carry no fingerprint"


def test_apache_without_appendix_is_the_second_fingerprint() -> None:
    cut = APACHE.split("APPENDIX: How to apply")[0]
    apache = next(e for e in builtin_catalog() if e.id == "Apache-2.0")
    assert license_fingerprint(cut) == apache.fingerprints[1]


def test_layout_changes_keep_the_fingerprint() -> None:
    paragraphs = APACHE.split("\n\n")
    rewrapped = "\n\n".join(textwrap.fill(" ".join(p.split()), width=60) for p in paragraphs)
    renumbered = APACHE.replace("1. Definitions.", "1 Definitions.").replace("2. Grant", "2 Grant")
    bulleted = APACHE.replace("(a) You must", "- (a) You must")
    crlf = APACHE.replace("\n", "\r\n")
    curly = APACHE.replace('"License"', "\u201cLicense\u201d").replace("non-exclusive", "non\u2013exclusive")
    filled = APACHE.replace("Copyright [yyyy] [name of copyright owner]", "Copyright 2026 Example Corp")
    for variant in (rewrapped, renumbered, bulleted, crlf, curly, filled, APACHE.upper(), "\ufeff" + APACHE):
        assert license_fingerprint(variant) == license_fingerprint(APACHE)


def test_normalisation_rules_are_as_documented() -> None:
    raw = "# Title\r\nLast Modified: October 24, 2025\n1.1. “Model”  means\u00a0x\u2014y\n- (a) item\nCopyright (c) 2025 A\n"
    assert normalise_license_text(raw) == 'title 1.1 "model" means x-y (a) item'


def test_numbers_still_count() -> None:
    assert license_fingerprint("within 30 days") != license_fingerprint("within 90 days")


def test_copyright_licence_clause_lines_are_not_dropped() -> None:
    """Only copyright *notices* are dropped, not wrapped clause lines that start with 'copyright'."""
    assert "copyright license to reproduce" in normalise_license_text(APACHE)


def test_exact_match() -> None:
    match = classify(APACHE)
    assert (match.kind, match.license_id) == ("exact", "Apache-2.0")  # type: ignore[attr-defined]


def test_changed_clause_is_a_near_match_with_the_difference() -> None:
    changed = APACHE.replace("grants to You a perpetual,", "grants to You a revocable,", 1)
    assert changed != APACHE
    match = classify(changed)
    assert match.kind == "near" and match.license_id == "Apache-2.0"  # type: ignore[attr-defined]
    assert match.fingerprint != license_fingerprint(APACHE)  # type: ignore[attr-defined]
    assert match.similarity > 0.99  # type: ignore[attr-defined]
    assert "replace: 'perpetual,' -> 'revocable,'" in match.differences  # type: ignore[attr-defined]


def test_unrelated_text_is_unknown() -> None:
    match = classify("All rights reserved. You may not use this model for anything.")
    assert match.kind == "unknown" and match.license_id is None  # type: ignore[attr-defined]


def test_heavily_edited_apache_is_unknown_with_closest() -> None:
    words = APACHE.split()
    edited = " ".join(w if i % 5 else "X" for i, w in enumerate(words))
    match = classify(edited)
    assert match.kind == "unknown" and match.closest == "Apache-2.0"  # type: ignore[attr-defined]


def test_binary_is_unknown() -> None:
    assert classify_license(b"\xff\xfe\x00", builtin_catalog()).kind == "unknown"


def test_oml_structure_is_identified_but_unpinned() -> None:
    match = classify(oml_license_text())
    assert (match.kind, match.license_id) == ("structural", "LicenseRef-NVIDIA-OML-2025-10-24")  # type: ignore[attr-defined]


def test_oml_without_version_marker_is_not_identified() -> None:
    text = oml_license_text().replace("October 24, 2025", "September 23, 2025")
    assert classify(text).kind == "unknown"  # type: ignore[attr-defined]


def test_pinned_oml_exact_and_changed_clause_mismatch() -> None:
    oml = "LicenseRef-NVIDIA-OML-2025-10-24"
    pins = {oml: [license_fingerprint(oml_license_text())]}
    assert classify(oml_license_text(), extra_fingerprints=pins).kind == "exact"  # type: ignore[attr-defined]
    changed = oml_license_text(variant=" NVIDIA may waive this condition.")
    match = classify(changed, extra_fingerprints=pins)
    assert (match.kind, match.license_id) == ("mismatch", oml)  # type: ignore[attr-defined]


def test_nemotron_licence_is_not_mistaken_for_the_oml() -> None:
    text = (
        "NVIDIA Nemotron Open Model License\n\nRedistribution: include a Notice with "
        "Licensed by NVIDIA Corporation under the NVIDIA Nemotron Model License.\n"
    )
    match = classify(text)
    assert (match.kind, match.license_id) == ("structural", "LicenseRef-NVIDIA-Nemotron-OML-2025-12-15")  # type: ignore[attr-defined]


def test_mit_variants() -> None:
    mit = (TEXTS / "MIT.txt").read_text()
    assert classify(mit).license_id == "MIT"  # type: ignore[attr-defined]
    assert classify(mit.split("\n", 1)[1]).kind == "exact"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("a", "b", "expected"), [("a b c", "a b c", 1.0), ("a b c", "x y z", 0.0), ("a b", "a b c", 2 / 3)])
def test_similarity(a: str, b: str, expected: float) -> None:
    assert similarity(a, b) == pytest.approx(expected)


def test_reference_text_only_for_entries_with_text() -> None:
    assert reference_text("Apache-2.0") is not None
    assert reference_text("LicenseRef-NVIDIA-OML-2025-10-24") is None
