"""A small SPDX licence-expression parser (``AND`` / ``OR`` / ``WITH`` / parentheses / ``+``).

Only what the policy needs: check the syntax and list the licence symbols. Grammar (SPDX 2.3
annex D, operators upper case)::

    expr   := term ("OR" term)*
    term   := factor ("AND" factor)*
    factor := "(" expr ")" | ID ["+"] ["WITH" ID]
    ID     := [A-Za-z0-9.-]+ | "LicenseRef-" [A-Za-z0-9.-]+
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\s*(?:(\()|(\))|([A-Za-z0-9][A-Za-z0-9.\-]*\+?))")
_ID = re.compile(r"^(?:LicenseRef-[A-Za-z0-9.\-]+|[A-Za-z0-9][A-Za-z0-9.\-]*)$")
_MAX_LEN = 1000


class SpdxError(ValueError):
    """The expression is not valid SPDX."""


def _tokens(expr: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise SpdxError(f"unexpected character {expr[pos:].lstrip()[:1]!r} in {expr!r}")
        out.append(m.group(m.lastindex or 0))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[str], expr: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.expr = expr
        self.symbols: list[str] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise SpdxError(f"{self.expr!r} ends too early")
        self.pos += 1
        return tok

    def expr_(self) -> None:
        self.term()
        while self.peek() == "OR":
            self.pos += 1
            self.term()

    def term(self) -> None:
        self.factor()
        while self.peek() == "AND":
            self.pos += 1
            self.factor()

    def factor(self) -> None:
        tok = self.take()
        if tok == "(":
            self.expr_()
            if self.take() != ")":
                raise SpdxError(f"missing ')' in {self.expr!r}")
            return
        if tok in ("AND", "OR", "WITH", ")") or tok.lower() in ("and", "or", "with"):
            raise SpdxError(f"expected a licence id, got {tok!r} in {self.expr!r}")
        ident = tok.removesuffix("+")
        if not _ID.match(ident):
            raise SpdxError(f"{tok!r} is not a valid SPDX licence id")
        self.symbols.append(ident)
        if self.peek() == "WITH":
            self.pos += 1
            exc = self.take()
            if not _ID.match(exc):
                raise SpdxError(f"{exc!r} is not a valid licence exception id")


def license_symbols(expr: str) -> list[str]:
    """Parse ``expr`` and return its licence ids in order (exceptions and ``+`` dropped).

    >>> license_symbols("Apache-2.0 AND (MIT OR LicenseRef-NVIDIA-OML-2025-10-24)")
    ['Apache-2.0', 'MIT', 'LicenseRef-NVIDIA-OML-2025-10-24']

    Raises:
        SpdxError: the expression is malformed.
    """
    if not expr.strip():
        raise SpdxError("empty licence expression")
    if len(expr) > _MAX_LEN:
        raise SpdxError(f"licence expression longer than {_MAX_LEN} characters")
    parser = _Parser(_tokens(expr), expr)
    parser.expr_()
    if parser.peek() is not None:
        raise SpdxError(f"unexpected {parser.peek()!r} in {expr!r}")
    return parser.symbols
