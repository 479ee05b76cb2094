"""Guardrail patterns: literal phrases and a bounded, ReDoS-safe regex subset.

Matching happens on a *normalised view* of the text (:func:`normalise_for_match`): every
character is NFKD-decomposed, combining marks (Mn/Me) and invisible format characters (Cf: zero-width
space/joiner, soft hyphen, bidi controls) are dropped, and matching ignores case. So ``b\u200bomb``,
``ｂｏｍｂ`` (full width) and ``bómb`` all match the literal ``bomb``. Homoglyphs from other scripts
(Cyrillic ``о``) and spacing tricks (``b o m b``) are *not* normalised: the keyword tier is a
baseline, model-based rails are the next tier.

Regex subset (anything else is refused when the policy is loaded):

* ASCII only, at most :data:`MAX_PATTERN_LEN` characters;
* atoms: literal characters, escaped metacharacters (``\\.``), ``.``, classes ``[a-z0-9_]`` /
  ``[^...]``, shorthands ``\\d \\D \\w \\W \\s \\S``; zero-width ``\\b`` / ``\\B``;
* quantifiers only on a single atom and only *bounded*: ``?``, ``{m}``, ``{m,n}`` with
  ``n <= 64``; ``*``, ``+`` and ``{m,}`` are refused (unbounded);
* non-capturing groups ``(?:a|b)`` and top-level ``|``; a group cannot be quantified;
* refused: capturing groups, backreferences, lookarounds, inline flags, anchors ``^ $``, lazy
  quantifiers.

Why this is safe: every pattern has a finite maximum match width ``W`` (so a stream filter only
needs to hold back ``W - 1`` characters), and the number of ways the backtracking engine can try to
match at one start position is bounded by the product of the quantifier ranges and alternation
counts, which must stay below :data:`MAX_BRANCHES`. Work per scanned character is therefore bounded
by a constant fixed at load time, whatever the model outputs.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

MAX_PATTERN_LEN = 256
MAX_REPEAT = 64
MAX_BRANCHES = 4096
MAX_PATTERNS = 2000

_META = set(".^$*+?{}[]\\|()")
_SHORTHANDS = set("dDwWsS")
_DROP_CATEGORIES = {"Mn", "Me", "Cf"}


class PatternError(ValueError):
    """A guardrail pattern is outside the safe subset (message says which rule)."""


def normalise_for_match(text: str) -> tuple[str, list[int]]:
    """Normalised view of ``text`` and, for each of its characters, the index in ``text`` it came from.

    See the module docstring for the rules. Case is left alone (matching is case-insensitive).
    """
    out: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        if ch.isascii():
            out.append(ch)
            index.append(i)
            continue
        if unicodedata.category(ch) in _DROP_CATEGORIES:
            continue
        for part in unicodedata.normalize("NFKD", ch):
            if unicodedata.category(part) in _DROP_CATEGORIES:
                continue
            out.append(part)
            index.append(i)
    return "".join(out), index


@dataclass(frozen=True)
class CompiledPattern:
    """One validated pattern.

    Attributes:
        label: how the pattern is named in events (``literal:...`` / ``regex:...``).
        regex: the compiled expression, matched against normalised text, case-insensitive.
        max_width: the longest match it can produce, in normalised characters.
    """

    label: str
    regex: re.Pattern[str]
    max_width: int


class _Parser:
    """Recursive-descent checker for the regex subset; computes widths and the branch bound."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.pos = 0

    def fail(self, why: str) -> PatternError:
        return PatternError(f"regex {self.src!r}: {why} (at offset {self.pos})")

    def peek(self) -> str | None:
        return self.src[self.pos] if self.pos < len(self.src) else None

    def parse(self) -> tuple[int, int, int]:
        result = self.alternation()
        if self.pos != len(self.src):
            raise self.fail("unbalanced ')'")
        return result

    def alternation(self) -> tuple[int, int, int]:
        lo, hi, branches = self.sequence()
        while self.peek() == "|":
            self.pos += 1
            a, b, c = self.sequence()
            lo, hi, branches = min(lo, a), max(hi, b), branches + c
        return lo, hi, branches

    def sequence(self) -> tuple[int, int, int]:
        lo = hi = 0
        branches = 1
        while (ch := self.peek()) is not None and ch not in "|)":
            a, b, c = self.quantified()
            lo, hi, branches = lo + a, hi + b, branches * c
            if branches > MAX_BRANCHES:
                raise self.fail(f"too many alternatives/repetitions to try per position (> {MAX_BRANCHES})")
        return lo, hi, branches

    def quantified(self) -> tuple[int, int, int]:
        is_group = self.peek() == "("
        lo, hi, branches = self.atom()
        ch = self.peek()
        if ch in ("*", "+"):
            raise self.fail(f"unbounded quantifier {ch!r}; use {{m,n}} with n <= {MAX_REPEAT}")
        if ch not in ("?", "{"):
            return lo, hi, branches
        if is_group:
            raise self.fail("a group cannot be quantified; repeat a single character or class instead")
        if hi == 0:
            raise self.fail("a zero-width assertion cannot be quantified")
        if ch == "?":
            self.pos += 1
            m, n = 0, 1
        else:
            match = re.compile(r"\{(\d{1,3})(?:,(\d{1,3}))?\}").match(self.src, self.pos)
            if match is None:
                if re.compile(r"\{\d{1,3},\}").match(self.src, self.pos):
                    raise self.fail(f"unbounded quantifier {{m,}}; use {{m,n}} with n <= {MAX_REPEAT}")
                raise self.fail("malformed {m,n} quantifier (escape a literal '{' as '\\{')")
            m = int(match.group(1))
            n = int(match.group(2)) if match.group(2) is not None else m
            self.pos = match.end()
            if m > n or n > MAX_REPEAT:
                raise self.fail(f"repeat {{{m},{n}}} must satisfy m <= n <= {MAX_REPEAT}")
        if self.peek() in ("?", "+", "*", "{"):
            raise self.fail("lazy, possessive or stacked quantifiers are not supported")
        return lo * m, hi * n, branches * (n - m + 1)

    def atom(self) -> tuple[int, int, int]:
        ch = self.peek()
        assert ch is not None
        if ch == "(":
            if not self.src.startswith("(?:", self.pos):
                raise self.fail("only non-capturing groups '(?:...)' are allowed (no captures, lookarounds, flags)")
            self.pos += 3
            lo, hi, branches = self.alternation()
            if self.peek() != ")":
                raise self.fail("missing ')'")
            self.pos += 1
            return lo, hi, branches
        if ch in "^$":
            raise self.fail("anchors '^' and '$' are not supported")
        if ch in "*+?{":
            raise self.fail(f"nothing to repeat before {ch!r}")
        if ch in "}]":
            raise self.fail(f"unescaped {ch!r}")
        if ch == "[":
            self.char_class()
            return 1, 1, 1
        if ch == "\\":
            nxt = self.src[self.pos + 1 : self.pos + 2]
            if not nxt:
                raise self.fail("trailing backslash")
            self.pos += 2
            if nxt in "bB":
                return 0, 0, 1
            if nxt in _SHORTHANDS or nxt in _META or nxt in "-/ '\"#&~%,:;<=>@!`":
                return 1, 1, 1
            raise self.fail(f"escape \\{nxt} is not supported (backreferences and special escapes are refused)")
        self.pos += 1
        return 1, 1, 1

    def char_class(self) -> None:
        self.pos += 1
        if self.peek() == "^":
            self.pos += 1
        first = True
        while True:
            ch = self.peek()
            if ch is None:
                raise self.fail("missing ']'")
            if ch == "]" and not first:
                self.pos += 1
                return
            if ch == "[":
                raise self.fail("nested '[' in a class must be escaped")
            if ch == "\\":
                nxt = self.src[self.pos + 1 : self.pos + 2]
                if not nxt or not (nxt in _SHORTHANDS or nxt in _META or nxt == "-"):
                    raise self.fail(f"escape \\{nxt} is not supported inside a class")
                self.pos += 2
            elif ch == "]":
                raise self.fail("empty class '[]'")
            else:
                self.pos += 1
            first = False


def compile_regex(src: str) -> CompiledPattern:
    """Validate ``src`` against the safe subset and compile it.

    Raises:
        PatternError: naming the rule that was broken.
    """
    if not src:
        raise PatternError("regex is empty")
    if len(src) > MAX_PATTERN_LEN:
        raise PatternError(f"regex is {len(src)} characters long; the limit is {MAX_PATTERN_LEN}")
    if not src.isascii() or not src.isprintable():
        raise PatternError(f"regex {src!r} must be printable ASCII (write non-ASCII terms as literals)")
    lo, hi, _ = _Parser(src).parse()
    if lo == 0:
        raise PatternError(f"regex {src!r} can match the empty string")
    return CompiledPattern(label=f"regex:{src}", regex=re.compile(src, re.IGNORECASE), max_width=hi)


def compile_literal(text: str) -> CompiledPattern:
    """Compile a literal phrase (normalised like the text it is matched against).

    Raises:
        PatternError: empty, too long or containing control characters.
    """
    if len(text) > MAX_PATTERN_LEN:
        raise PatternError(f"literal is {len(text)} characters long; the limit is {MAX_PATTERN_LEN}")
    if not text.isprintable():
        raise PatternError(f"literal {text!r} contains control characters")
    norm, _ = normalise_for_match(text)
    if not norm.strip():
        raise PatternError(f"literal {text!r} is empty after normalisation")
    return CompiledPattern(label=f"literal:{text}", regex=re.compile(re.escape(norm), re.IGNORECASE), max_width=len(norm))


def parse_blocklist(text: str, *, source: str) -> list[tuple[str, str]]:
    """Parse a blocklist file into ``(kind, value)`` pairs.

    Format: one pattern per line; ``regex:`` prefix for a regex, optional ``literal:`` prefix for a
    literal (the default); blank lines and lines starting with ``#`` are ignored; surrounding
    whitespace is stripped.

    Raises:
        PatternError: with the file name and line number.
    """
    out: list[tuple[str, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("regex:"):
            out.append(("regex", line[len("regex:") :].strip()))
        elif line.startswith("literal:"):
            out.append(("literal", line[len("literal:") :].strip()))
        else:
            out.append(("literal", line))
        if not out[-1][1]:
            raise PatternError(f"{source}:{lineno}: empty pattern")
    return out
