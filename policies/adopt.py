"""Adopting a policy: a self-contained copy of a built-in template, and its pins filled from a folder.

    >>> import tempfile, pathlib
    >>> from datetime import date
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "org-policy"
    >>> result = init_policy("builtin:demo", out, today=date(2026, 12, 2))
    >>> sorted(p.name for p in out.iterdir()), result.expires.isoformat()
    (['policy.yaml', 'rails-blocklist.txt'], '2027-12-02')

``init_policy`` copies the template's text (comments kept), every file it references (the keyword
blocklists, pinned by sha256) and sets ``metadata.expires`` to a date you choose (default: one
year from today), then loads the result to prove it is self-contained.

``plan_pins`` reads a reviewed model folder and computes every pin the policy leaves ``null`` or
that differs: ``spec.artifact.files.pinned``, ``spec.guardrails.pinned_integrity`` and the
licence fingerprint (only for a LICENSE that has the structure of an allowed catalogue licence and
no pinned fingerprint; a near match is never pinned, it may hide a changed clause).
``apply_pins`` edits the YAML text line by line (comments and layout kept), re-validates it and
checks that every planned value landed, before anything is written.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from secure_run.errors import UsageError

from . import _files
from .acceptance import classify_model_license
from .errors import PolicyFileError
from .policy import DEFAULT_POLICIES, Policy, default_policy_path, load_policy, parse_policy
from .schema import KeywordFilter

POLICY_FILE = "policy.yaml"
DEFAULT_VALIDITY_DAYS = 365
_HASH_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class InitResult:
    """What ``policy init`` wrote."""

    policy: Path
    files: tuple[Path, ...]
    expires: date
    template: str


def _init_error(message: str, hint: str, path: str | None = None) -> UsageError:
    return UsageError(message, rule="POLICY-INIT", hint=hint, path=path)


def _set_expires(text: str, expires: date) -> str:
    """Set ``metadata.expires`` in the YAML text (replace the line, or add it after ``name:``)."""
    lines = text.splitlines(keepends=True)
    in_meta = False
    for i, line in enumerate(lines):
        if re.match(r"^metadata:\s*(#.*)?$", line):
            in_meta = True
            continue
        if in_meta and line.strip() and not line.startswith((" ", "#")):
            break
        if in_meta and re.match(r"^  expires:", line):
            lines[i] = f"  expires: {expires.isoformat()}\n"
            return "".join(lines)
    for i, line in enumerate(lines):
        if re.match(r"^  name:", line) and any(re.match(r"^metadata:", x) for x in lines[:i]):
            lines.insert(i + 1, f"  expires: {expires.isoformat()}\n")
            return "".join(lines)
    raise _init_error("the template has no block-style metadata.name to put expires after",
                      "write metadata.expires by hand")


def _referenced_files(policy: Policy) -> list[str]:
    rails = policy.spec.guardrails
    names = [f.blocklist for f in (rails.input_filter, rails.output_filter)
             if isinstance(f, KeywordFilter) and f.blocklist is not None]
    return sorted(set(names))


def init_policy(source: str, dest: Path, *, expires: date | None = None, today: date | None = None) -> InitResult:
    """Write ``dest/policy.yaml`` (from ``builtin:NAME``) plus the files it references.

    Raises:
        UsageError: ``POLICY-INIT``: unknown template, ``dest`` exists and is not an empty folder,
            or ``expires`` is not in the future.
    """
    if not source.startswith("builtin:") or source.removeprefix("builtin:") not in DEFAULT_POLICIES:
        raise _init_error(f"unknown template {source!r}",
                          f"use --from builtin:NAME, NAME one of {sorted(DEFAULT_POLICIES)}")
    today = today or date.today()
    expires = expires or today + timedelta(days=DEFAULT_VALIDITY_DAYS)
    if expires <= today:
        raise _init_error(f"--expires {expires.isoformat()} is not after today ({today.isoformat()})",
                          "choose a date in the future (a review cycle, e.g. one year)")
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise _init_error(f"{dest} exists and is not an empty folder", "choose a new or empty folder", str(dest))
    template_path = default_policy_path(source.removeprefix("builtin:"))
    template = load_policy(source)
    text = _set_expires(template_path.read_text(encoding="utf-8"), expires)
    copies: dict[str, bytes] = {name: _files.read_bytes(template_path.parent, name) for name in _referenced_files(template)}
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, data in copies.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    policy_file = dest / POLICY_FILE
    policy_file.write_text(text, encoding="utf-8")
    load_policy(policy_file)  # self-contained: the blocklists resolve next to it, hashes match
    return InitResult(policy_file, (policy_file, *written), expires, source)


# ------------------------------------------------------------------------------------------------
# pins


@dataclass(frozen=True)
class PinChange:
    """One value to write: ``section`` is a dotted path (``spec.artifact.files.pinned``)."""

    section: str
    key: str
    old: str | None
    new: str

    def to_json(self) -> dict[str, str | None]:
        return {"field": f"{self.section}.{self.key}", "old": self.old, "new": self.new}


@dataclass(frozen=True)
class PinPlan:
    """Every pin a reviewed folder gives a policy, and what cannot be pinned automatically."""

    changes: tuple[PinChange, ...]
    unresolved: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())


_SECTIONS = {
    "files": ("spec", "artifact", "files", "pinned"),
    "rails": ("spec", "guardrails", "pinned_integrity"),
    "fingerprints": ("spec", "licenses", "fingerprints"),
}


def _sha256(folder: Path, name: str) -> str:
    return hashlib.sha256(_files.read_bytes(folder, name, limit=_HASH_LIMIT)).hexdigest()


def plan_pins(policy: Policy, folder: Path) -> PinPlan:
    """The pins ``folder`` (reviewed) gives ``policy``: missing (``null``) or differing values.

    Raises:
        UsageError: a pinned file is missing or unsafe in ``folder`` (``POLICY-PIN``).
    """
    changes: list[PinChange] = []
    unresolved: list[str] = []
    notes: list[str] = []
    for key, pins in (("files", policy.spec.artifact.files.pinned), ("rails", policy.spec.guardrails.pinned_integrity)):
        for name, old in sorted(pins.items()):
            try:
                new = _sha256(folder, name)
            except _files.UnsafeFile as err:
                raise UsageError(f"{folder / name}: {err.reason}", rule="POLICY-PIN", path=str(folder / name),
                                 hint="pin from the reviewed model folder that holds every pinned file") from None
            if new != old:
                changes.append(PinChange(".".join(_SECTIONS[key]), name, old, new))
    match, problem = classify_model_license(policy, folder)
    lic = policy.spec.licenses
    if match is None:
        unresolved.append(f"licence: {problem}")
    elif match.kind == "structural" and match.license_id is not None:
        if match.license_id in lic.allowed and match.license_id not in lic.denied:
            changes.append(PinChange(".".join(_SECTIONS["fingerprints"]), match.license_id, None, match.fingerprint))
            notes.append(f"{match.license_id} is identified by its structure only (no reference text is stored): "
                         f"compare {folder / 'LICENSE'} with the published licence before you write this pin")
        else:
            unresolved.append(f"licence: LICENSE has the structure of {match.license_id}, which the policy does not allow")
    elif match.kind != "exact":
        unresolved.append(f"licence: LICENSE is a {match.kind} match ({match.license_id or match.closest or 'unknown'}); "
                          "it is never pinned automatically: compare it with the reviewed text first")
    return PinPlan(tuple(changes), tuple(unresolved), tuple(notes))


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the last line of the block that starts after ``start`` (children indented more)."""
    i = start + 1
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("#") and len(lines[i]) - len(lines[i].lstrip(" ")) <= indent:
            break
        i += 1
    while i > start + 1 and not lines[i - 1].strip():
        i -= 1
    return i


def _find_key(lines: list[str], path: tuple[str, ...]) -> tuple[int, int]:
    """(line index, indent) of the block-style key ``path``; ``PolicyFileError`` when not found."""
    lo, hi, parent = 0, len(lines), -1
    line_no = -1
    for part in path:
        child: int | None = None
        found = -1
        for i in range(lo, hi):
            text = lines[i]
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            ind = len(text) - len(text.lstrip(" "))
            child = ind if child is None else child
            m = re.match(r"^ *([A-Za-z0-9_.\-]+):", text)
            if ind == child and m and m.group(1) == part:
                found = i
                break
        if found < 0 or child is None or child <= parent:
            raise PolicyFileError(f"cannot find block-style key {'.'.join(path)} to edit", rule="POLICY-PIN",
                                  hint="write the pins by hand (the values are listed above)")
        line_no, parent = found, child
        lo, hi = found + 1, _block_end(lines, found, child)
    return line_no, parent


def _quote(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", key) else '"' + key.replace('"', '\\"') + '"'


def _edit(text: str, change: PinChange, as_list: bool) -> str:
    lines = text.splitlines(keepends=True)
    path = tuple(change.section.split("."))
    idx, indent = _find_key(lines, path)
    head = re.match(r"^( *)([A-Za-z0-9_.\-]+):(.*)$", lines[idx].rstrip("\n"))
    assert head is not None
    inline = head.group(3).split("#")[0].strip()
    child = " " * (indent + 2)
    value = f"[{change.new}]" if as_list else change.new
    if inline in ("{}", "null", "~"):
        lines[idx] = f"{head.group(1)}{head.group(2)}:\n"
        lines.insert(idx + 1, f"{child}{_quote(change.key)}: {value}\n")
        return "".join(lines)
    if inline:
        raise PolicyFileError(f"{change.section} is written in flow style; cannot edit it", rule="POLICY-PIN",
                              hint="write the pins by hand (the values are listed above)")
    end = _block_end(lines, idx, indent)
    for i in range(idx + 1, end):
        m = re.match(r"^( *)(\"[^\"]+\"|'[^']+'|[^:#]+):(.*)$", lines[i].rstrip("\n"))
        if m and m.group(2).strip("\"'") == change.key and len(m.group(1)) == indent + 2:
            comment = ""
            if "#" in m.group(3):
                comment = "  #" + m.group(3).split("#", 1)[1]
            lines[i] = f"{m.group(1)}{m.group(2)}: {value}{comment}\n"
            return "".join(lines)
    lines.insert(end, f"{child}{_quote(change.key)}: {value}\n")
    return "".join(lines)


def apply_pins(policy_file: Path, plan: PinPlan) -> tuple[str, str]:
    """(old text, new text) with every change of ``plan`` applied; validated, nothing written.

    Raises:
        PolicyFileError: the edited text does not load, or a value did not land where planned.
    """
    old = policy_file.read_text(encoding="utf-8")
    new = old
    for change in plan.changes:
        new = _edit(new, change, as_list=change.section.endswith("fingerprints"))
    edited = parse_policy(new.encode("utf-8"), source=str(policy_file), base_dir=policy_file.parent)
    for change in plan.changes:
        if change.section.endswith("files.pinned"):
            got: object = edited.spec.artifact.files.pinned.get(change.key)
        elif change.section.endswith("pinned_integrity"):
            got = edited.spec.guardrails.pinned_integrity.get(change.key)
        else:
            got = change.new if change.new in edited.spec.licenses.fingerprints.get(change.key, ()) else None
        if got != change.new:
            raise PolicyFileError(f"editing {policy_file} did not set {change.section}.{change.key}",
                                  rule="POLICY-PIN", path=str(policy_file), hint="write the pins by hand")
    return old, new


def unified_diff(old: str, new: str, name: str) -> str:
    """A unified diff of the policy text (what ``policy pin`` shows before writing)."""
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (same folder temp file + rename; mode of the old file kept)."""
    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
