"""Findings (one refused thing: path + rule + remedy) and the errors that carry them.

Every check in :mod:`secure_run.manifests` reports a :class:`Finding` whose ``rule`` is a stable
identifier from :data:`RULES`; tests and the ``--json`` output pin these ids. A check that looks
at many files collects *all* findings before raising one :class:`FindingsError`.

    >>> f = Finding("x/run.py", "INV-CODE", "Python source file")
    >>> f.render()
    'x/run.py: [INV-CODE] Python source file (fix: delete the file; secure-run never runs code shipped with a model)'
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from secure_run.errors import ManifestError, VerificationError

#: rule id -> default remedy. The rule ids are part of the stable CLI/JSON contract.
RULES: dict[str, str] = {
    # inventory of the folder
    "INV-ROOT": "pass an existing, real (non-symlink) model directory",
    "INV-SYMLINK": "replace the link by the file it points to (or delete it); links are never followed",
    "INV-SPECIAL": "delete the device/fifo/socket; a model folder holds regular files and folders only",
    "INV-EXEC": "clear the permission bits (chmod a-x,u-s,g-s,o-t FILE); model files are data",
    "INV-NAME": "rename the file to a plain printable UTF-8 name without control characters or backslashes",
    "INV-PYCACHE": "delete the __pycache__ folder; compiled Python is never accepted",
    "INV-CODE": "delete the file; secure-run never runs code shipped with a model",
    "INV-PYC": "delete the compiled Python file; it can execute code when imported",
    "INV-NATIVE": "delete the native library/executable; secure-run never loads native code from a model",
    "INV-PICKLE": "delete the file or convert the weights to .safetensors; pickle-capable formats can execute code",
    "INV-FORMAT": "delete the file or convert the weights to .safetensors; only safetensors weights are accepted",
    "INV-KIND": "delete the file, or import the snapshot with `secure-run import` which keeps allowlisted files only",
    "INV-MAGIC": "the content does not match the file name; delete the file (renamed binaries are refused)",
    "INV-GIT": "deploy the model without version-control metadata (.git, .github); use `secure-run import`",
    "INV-TEXT": "store text files as UTF-8 without NUL or other control characters",
    "INV-LIMIT": "the folder exceeds a safety limit (file count, file size, depth); remove unneeded files",
    "INV-IO": "make the file readable by the current user",
    # JSON files
    "JSON-PARSE": "fix the JSON syntax (the file must be one UTF-8 JSON document)",
    "JSON-DUPKEY": "remove the duplicated key; parsers disagree on which value wins",
    "JSON-NAN": "replace NaN by a number or null (Infinity is accepted, NaN is not)",
    "JSON-REMOTE-CODE": "remove the remote-code pointer (`secure-run import` strips these keys and records it)",
    # safetensors headers (spec/signing.md section 6.1)
    "ST-H1": "the file is not a safetensors file (needs an 8-byte little-endian header length)",
    "ST-H2": "the header length is larger than allowed or than the file",
    "ST-H3": "the header must be valid UTF-8",
    "ST-H4": "the header must be one JSON object, right-padded with spaces only",
    "ST-H5": "the header must be valid JSON without duplicate keys",
    "ST-H6": "each tensor entry must have exactly dtype, shape and data_offsets",
    "ST-H7": "use a safetensors dtype from the allowlist",
    "ST-H8": "shapes must be lists of non-negative integers",
    "ST-H9": "data_offsets must be two integers 0 <= BEGIN <= END",
    "ST-H10": "tensors must tile the data buffer from 0 without holes or overlaps",
    "ST-H11": "END - BEGIN must equal the tensor's element count times its dtype size",
    "ST-H12": "__metadata__ must map strings to strings within the size limits",
    "ST-H13": "the file must end exactly at the end of the last tensor (no trailing bytes)",
    "ST-H14": "tensor names must be short printable ASCII names",
    "ST-LIMIT": "the file has more tensors than secure-run parses in one file (262,144); split it into shards",
    "ST-POLYGLOT": "the tensor data ends with a ZIP directory (polyglot file); re-export the weights",
    "LFS-POINTER": "the file is a Git LFS pointer, not its content: run `git lfs install` and `git lfs pull` in the clone (or download with `hf download`)",
    # shard index (model.safetensors.index.json)
    "IDX-SCHEMA": "the index must be {'metadata': {...}, 'weight_map': {tensor: shard}}",
    "IDX-SHARD-MISSING": "add the missing shard or fix weight_map",
    "IDX-SHARD-UNREFERENCED": "delete the unreferenced shard or add its tensors to weight_map",
    "IDX-TENSOR-MISSING": "weight_map names a tensor that its shard does not contain; fix the index",
    "IDX-TENSOR-UNMAPPED": "add the tensor to weight_map (every tensor must be listed exactly once)",
    "IDX-TENSOR-DUP": "a tensor appears in more than one shard; remove the duplicate",
    "IDX-TOTAL-SIZE": "metadata.total_size must equal the sum of tensor byte sizes",
    # signature bundle and statement
    "OMS-JSON": "the signature file must be an OMS v1.0 Sigstore bundle (JSON); re-sign the folder",
    "OMS-BUNDLE": "the bundle lacks a required part; re-sign with `secure-run sign` or model_signing >= 1.0",
    "OMS-MEDIATYPE": "only Sigstore bundle v0.3 (application/vnd.dev.sigstore.bundle.v0.3+json) is accepted",
    "OMS-PAYLOADTYPE": "the DSSE payloadType must be application/vnd.in-toto+json",
    "OMS-SIGNATURES": "the DSSE envelope must carry exactly one signature",
    "OMS-STATEMENT": "the payload must be an in-toto Statement v1 with exactly one subject",
    "OMS-PREDICATE-TYPE": "only the OMS v1.0 predicate https://model_signing/signature/v1.0 is accepted",
    "OMS-PROFILE": "re-sign with the interop profile: method files, hash sha256, allow_symlinks false",
    "OMS-NAME": "signed resource names must be canonical relative POSIX paths of a directory model",
    "OMS-DUPLICATE": "each resource may be listed once; re-sign the folder",
    "OMS-EMPTY": "an empty model cannot be signed or verified",
    "OMS-ROOT-DIGEST": "the subject digest does not match the resources; the manifest is inconsistent",
    "OMS-METHOD": "verify with the trust option that matches how the folder was signed",
    # signature / signer
    "SIG-MISSING": "sign the folder with `secure-run sign` (writes DIR/model.sig) or pass --signature FILE",
    "SIG-INVALID": "the signature does not verify; the manifest was altered or signed by another key",
    "SIG-KEY-HINT": "the bundle names another public key; verify with the signer's pinned key",
    "SIG-KEY-TYPE": "use an EC P-256, P-384 or P-521 key",
    "CERT-PARSE": "the certificate chain in the bundle could not be parsed",
    "CERT-CHAIN": "the signing certificate does not chain to the pinned root",
    "CERT-EXPIRED": "the signing certificate is not valid now; re-sign with a current certificate",
    "CERT-KU": "the signing certificate needs key usage digitalSignature",
    "CERT-EKU": "the signing certificate needs extended key usage codeSigning",
    "CERT-IDENTITY": "the signing certificate's identity is not the pinned --identity",
    "SIGSTORE": "the keyless bundle does not verify against the pinned trusted root and identity",
    # folder vs manifest
    "SET-EXTRA": "delete the unsigned files or re-sign the folder after review",
    "SET-MISSING": "restore the missing files or re-sign the folder",
    "DIGEST-MISMATCH": "the file content differs from what was signed; restore the signed files",
    "FILE-CHANGED": "a file changed while it was being verified; retry on a quiescent folder",
    # lock file
    "LOCK-FILE": "fix the lock file (see manifests/README.md, 'Lock file')",
    "LOCK-UNKNOWN": "after review, pin it in your own lock: `secure-run lock add DIR --lock FILE --public-key PUB.pem`, then pass --lock FILE (the shipped lock holds only the demo)",
    "LOCK-DIGEST": "this is a different (e.g. older) signed version than the one pinned; deploy the pinned version or update the lock after review",
    "LOCK-SIGNER": "the folder was signed by another signer than the pinned one",
    # import
    "IMP-DEST": "choose a new or empty destination folder",
    "IMP-SRC": "pass an existing snapshot folder",
    "IMP-STALE": "an upstream signature or import report does not describe the cleaned copy; sign the copy after review",
    "IMP-CACHE": "download-tool cache, not part of the model",
}


_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def shown(text: str) -> str:
    """``text`` safe for a terminal: control, format (bidi, zero-width), separator, surrogate,
    private-use and unassigned characters become ``\\xNN`` / ``\\uNNNN`` / ``\\UNNNNNNNN`` escapes.

    Every refused name is printed through this (file names come from the model folder, which is
    untrusted: an ``ESC [`` sequence in a name could rewrite the terminal).

        >>> print(shown("a" + chr(27) + "[31mred" + chr(0x202E) + ".txt"))
        a\\x1b[31mred\\u202e.txt
    """
    if text.isascii() and text.isprintable():
        return text
    out: list[str] = []
    for ch in text:
        if ch != " " and unicodedata.category(ch) in _UNSAFE_CATEGORIES or ch in "\x85\xa0":
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class Finding:
    """One refused thing: the file (or field), the rule it breaks, and what to do.

    Attributes:
        path: relative POSIX path of the file (plus ``#/json/pointer`` for a JSON field), or
            ``"."`` for the folder itself.
        rule: stable rule id, a key of :data:`RULES`.
        message: what was found (got vs expected where it applies).
        hint: remedy; defaults to the rule's remedy.
    """

    path: str
    rule: str
    message: str
    hint: str = ""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise KeyError(f"unknown rule id {self.rule!r}")
        if not self.hint:
            object.__setattr__(self, "hint", RULES[self.rule])

    def render(self) -> str:
        """One line: ``path: [RULE] message (fix: hint)``."""
        return f"{shown(self.path)}: [{self.rule}] {shown(self.message)} (fix: {shown(self.hint)})"

    def to_json(self) -> dict[str, str]:
        """Stable JSON form (``path``, ``rule``, ``message``, ``hint``)."""
        return {"path": self.path, "rule": self.rule, "message": self.message, "hint": self.hint}


def _summary(findings: Sequence[Finding], what: str) -> str:
    rules = sorted({f.rule for f in findings})
    return f"{shown(what)}: {len(findings)} finding(s) ({', '.join(rules)})"


class FindingsError(ManifestError):
    """The folder (or a file in it) is refused; carries every finding, not just the first."""

    def __init__(self, findings: Sequence[Finding], *, what: str = "model folder refused", root: str | None = None):
        self.findings = tuple(findings)
        first = self.findings[0]
        super().__init__(
            _summary(self.findings, what),
            details=[f.render() for f in self.findings],
            hint=first.hint if len({f.rule for f in self.findings}) == 1 else "fix every finding listed above",
            path=root if root is not None else first.path,
            rule=first.rule,
        )

    def to_json(self) -> dict[str, object]:
        """The base error JSON plus ``findings`` (list of :meth:`Finding.to_json`)."""
        doc = super().to_json()
        doc["findings"] = [f.to_json() for f in self.findings]
        return doc


def refuse(path: str, rule: str, message: str, hint: str = "") -> FindingsError:
    """Build a :class:`FindingsError` for a single finding (convenience for one-off refusals)."""
    return FindingsError([Finding(path, rule, message, hint)], what=f"{path} refused")


class VerificationFailed(VerificationError):
    """Signature / digest / signer / lock verification failed, with machine-readable findings."""

    def __init__(
        self,
        message: str,
        findings: Sequence[Finding],
        *,
        path: str | None = None,
        hint: str | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        self.findings = tuple(findings)
        self.extra = dict(extra or {})
        rule = self.findings[0].rule if self.findings else None
        super().__init__(
            message,
            details=[f.render() for f in self.findings],
            hint=hint or (self.findings[0].hint if self.findings else None),
            path=path,
            rule=rule,
        )

    def to_json(self) -> dict[str, object]:
        """The base error JSON plus ``findings`` and any extra keys (e.g. ``extra``/``missing``)."""
        doc = super().to_json()
        doc["findings"] = [f.to_json() for f in self.findings]
        doc.update(self.extra)
        return doc


def verification_failed(path: str, rule: str, message: str, hint: str = "") -> VerificationFailed:
    """A :class:`VerificationFailed` with one finding whose text is also the summary."""
    finding = Finding(path, rule, message, hint)
    return VerificationFailed(f"{message} [{rule}]", [finding], path=path)
