"""Inventory of a model folder: every file classified, sniffed and checked; all findings collected.

The walk never follows links: the root and every sub-folder are opened with ``O_NOFOLLOW`` and
entries are ``lstat``-ed relative to their parent's descriptor, so a link swapped in during the
walk is seen as a link. Each regular file is classified by name against an explicit allowlist of
file kinds (:class:`FileKind`); names of code, compiled code, native code, pickle-capable and other
refused formats are refused first; then *every* file's leading bytes are sniffed (pickle, ZIP,
ELF, PE, Mach-O, .pyc, shebang, HDF5, NumPy, GGUF, archives), JSON files are parsed strictly and
scanned for remote-code pointers, text files must be clean UTF-8, and safetensors headers and
shard indexes are validated (without reading tensor data).

    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "config.json").write_text('{"model_type": "demo", "auto_map": {"AutoModel": "m.M"}}')
    >>> _ = (root / "modeling.py").write_text("import os")
    >>> inv = take_inventory(root)
    >>> [(f.path, f.rule) for f in inv.findings]
    [('config.json#/auto_map', 'JSON-REMOTE-CODE'), ('modeling.py', 'INV-CODE')]

Decisions: ``.git`` (anywhere) and a top-level ``.github`` are refused (a deployed folder carries
no version-control metadata; rule ``INV-GIT``); top-level ``.gitattributes`` / ``.gitignore`` and
``model.sig`` are accepted (text / bundle JSON, sniffed) and are the files an OMS signature may
leave unsigned. A refused folder (``__pycache__``, ``.git``) is reported once, not per file.
"""

from __future__ import annotations

import enum
import io
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from secure_run.errors import UsageError

from ._jsoncheck import JsonProblem, loads_strict, remote_code_pointers, scans_for_remote_code
from ._names import MAX_DEPTH, component_problem, sort_key
from ._sniff import HEAD_BYTES, PICKLE_SCAN_BYTES, lfs_pointer, pickle_program, sniff
from .findings import Finding, FindingsError, shown
from .hashing import FileIdentity
from .tensors import (
    SafetensorsHeader,
    ShardIndex,
    check_shard_index,
    parse_safetensors_header,
    parse_shard_index,
)


class FileKind(enum.StrEnum):
    """The allowlisted kinds of file a model folder may contain."""

    SAFETENSORS = "safetensors"
    SHARD_INDEX = "safetensors-index"
    JSON = "json"
    TEXT = "text"
    TEMPLATE = "template"
    TOKENIZER_MODEL = "tokenizer-model"
    SIGNATURE = "signature"
    IMPORT_REPORT = "import-report"
    GIT_METADATA = "git-metadata"
    DATA = "data"


#: Files an OMS signature may leave unsigned (top level only): the signature itself and the
#: git attribute files in secure-run's fixed ignore list.
IGNORABLE = frozenset({"model.sig", ".gitattributes", ".gitignore"})

_CODE = frozenset("py pyw pyi pyx pxd ipynb sh bash zsh fish ps1 bat cmd js mjs cjs rb pl lua".split())
_PYC = frozenset({"pyc", "pyo"})
_NATIVE = frozenset("so dll dylib pyd exe o a lib node wasm".split())
_PICKLE = frozenset("bin pt pth ckpt pkl pickle joblib dill npy npz h5 hdf5 keras msgpack".split())
_FORMAT = frozenset("onnx gguf ggml tflite pb mar nemo zip tar gz tgz bz2 xz zst 7z rar whl egg jar".split())
_REFUSED_EXT: tuple[tuple[frozenset[str], str, str], ...] = (
    (_CODE, "INV-CODE", "code file"),
    (_PYC, "INV-PYC", "compiled Python file"),
    (_NATIVE, "INV-NATIVE", "native library or executable"),
    (_PICKLE, "INV-PICKLE", "pickle-capable format"),
    (_FORMAT, "INV-FORMAT", "refused model/archive format"),
)
_DOC_NAME = re.compile(r"(?i)(LICEN[CS]E|NOTICE|README|COPYING|AUTHORS|CONTRIBUTORS)(-[A-Za-z0-9]+)?\Z")
_TOKENIZER_MODELS = frozenset({"tokenizer.model", "spiece.model", "sentencepiece.bpe.model"})
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class InventoryRules:
    """Limits and (for tests/fixtures only) extra accepted names.

    Attributes:
        extra_data_names: exact relative names accepted as opaque data (still sniffed and still
            subject to every refusal-by-name rule). Empty in production; the upstream OMS test
            fixtures (``signme-1``...) need it.
        max_files: most files accepted in one folder.
        max_json_bytes: largest JSON file parsed (tokenizer.json of large vocabularies is tens of MB).
        max_text_bytes: largest text / template file.
    """

    extra_data_names: frozenset[str] = frozenset()
    max_files: int = 100_000
    max_json_bytes: int = 256 << 20
    max_text_bytes: int = 16 << 20


DEFAULT_RULES = InventoryRules()


@dataclass(frozen=True)
class InventoryFile:
    """One regular file found in the folder.

    Attributes:
        name: canonical relative POSIX path.
        size: bytes.
        kind: allowlisted kind, or None when the name itself is refused.
        identity: dev/inode/size/mtime/ctime at inventory time.
    """

    name: str
    size: int
    kind: FileKind | None
    identity: FileIdentity

    @property
    def ignorable(self) -> bool:
        """Whether an OMS signature may leave this file unsigned (see :data:`IGNORABLE`)."""
        return self.name in IGNORABLE


@dataclass(frozen=True)
class Inventory:
    """Everything found in a model folder.

    Attributes:
        root: the folder.
        files: every regular file (accepted or not), in manifest (path-component) order.
        findings: every refusal, sorted by path then rule.
        headers: relative name -> validated safetensors header (valid shards only).
        indexes: parsed shard indexes.
    """

    root: Path
    files: tuple[InventoryFile, ...]
    findings: tuple[Finding, ...]
    headers: Mapping[str, SafetensorsHeader] = field(default_factory=dict)
    indexes: tuple[ShardIndex, ...] = ()
    _by_name: Mapping[str, InventoryFile] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {f.name: f for f in self.files})

    @property
    def ok(self) -> bool:
        """True when nothing was refused."""
        return not self.findings

    @property
    def total_bytes(self) -> int:
        """Sum of all file sizes."""
        return sum(f.size for f in self.files)

    def file(self, name: str) -> InventoryFile | None:
        """The entry for ``name`` or None."""
        return self._by_name.get(name)

    def raise_for_findings(self) -> None:
        """Raise one :class:`FindingsError` listing every finding (no-op when :attr:`ok`)."""
        if self.findings:
            raise FindingsError(self.findings, root=str(self.root))


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    if ".so." in base:
        return "so"
    return base.rsplit(".", 1)[-1].lower() if "." in base.lstrip(".") else ""


def classify(name: str, rules: InventoryRules = DEFAULT_RULES) -> tuple[FileKind | None, Finding | None]:
    """Classify one relative file name: (kind, None) if allowlisted, (None, finding) if refused.

    Refusal by name comes first (code, .pyc, native, pickle-capable, other formats), so no
    allowlist entry can accept e.g. ``x.py``.
    """
    base = name.rsplit("/", 1)[-1]
    top = "/" not in name
    ext = _extension(name)
    for exts, rule, what in _REFUSED_EXT:
        if ext in exts:
            return None, Finding(name, rule, f"{what} (.{ext})")
    if name in rules.extra_data_names:
        return FileKind.DATA, None
    if top and base == "model.sig":
        return FileKind.SIGNATURE, None
    if top and base == "import-report.json":
        return FileKind.IMPORT_REPORT, None
    if top and base in (".gitattributes", ".gitignore"):
        return FileKind.GIT_METADATA, None
    if base.endswith(".safetensors.index.json"):
        return FileKind.SHARD_INDEX, None
    if ext == "safetensors":
        return FileKind.SAFETENSORS, None
    if ext == "json":
        return FileKind.JSON, None
    if ext in ("jinja", "jinja2"):
        return FileKind.TEMPLATE, None
    if ext in ("txt", "md") or _DOC_NAME.match(base):
        return FileKind.TEXT, None
    if base in _TOKENIZER_MODELS:
        return FileKind.TOKENIZER_MODEL, None
    return None, Finding(
        name, "INV-KIND", "not an allowlisted file kind (safetensors, json, jinja, txt/md, LICENSE/NOTICE/README, tokenizer files)"
    )


class _Walker:
    def __init__(self, root: Path, rules: InventoryRules) -> None:
        self.root = root
        self.rules = rules
        self.files: list[InventoryFile] = []
        self.findings: list[Finding] = []
        self.headers: dict[str, SafetensorsHeader] = {}
        self.indexes: list[ShardIndex] = []
        self.present: set[str] = set()
        self.count = 0

    def add(self, path: str, rule: str, message: str) -> None:
        self.findings.append(Finding(path, rule, message))

    def walk(self, dfd: int, prefix: str, depth: int) -> None:
        with os.scandir(dfd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            if self.count >= self.rules.max_files:
                self.add(prefix.rstrip("/") or ".", "INV-LIMIT", f"more than {self.rules.max_files} entries; stopped")
                return
            self.count += 1
            self.entry(dfd, prefix, name, depth)

    def entry(self, dfd: int, prefix: str, name: str, depth: int) -> None:
        rel = prefix + name
        shown = rel.encode("utf-8", "backslashreplace").decode("utf-8")
        problem = component_problem(name)
        if problem:
            self.add(shown, "INV-NAME", problem)
            return
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            self.add(rel, "INV-IO", f"cannot stat: {exc.strerror}")
            return
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            self.symlink(dfd, rel, name)
        elif stat.S_ISDIR(mode):
            self.directory(dfd, rel, name, depth)
        elif stat.S_ISREG(mode):
            self.regular(dfd, rel, name, st)
        else:
            self.add(rel, "INV-SPECIAL", f"is a {_special_kind(mode)}, not a regular file")

    def symlink(self, dfd: int, rel: str, name: str) -> None:
        try:
            target = os.readlink(name, dir_fd=dfd)
        except OSError:
            target = "?"
        depth = rel.count("/")
        escapes = target.startswith("/") or _escapes(target, depth)
        where = "outside the folder" if escapes else "inside the folder"
        self.add(rel, "INV-SYMLINK", f"is a symbolic link to {target!r} ({where}); links are never followed")

    def directory(self, dfd: int, rel: str, name: str, depth: int) -> None:
        if name == "__pycache__":
            self.add(rel, "INV-PYCACHE", "compiled-Python cache folder")
            return
        if name == ".git" or (depth == 0 and name == ".github"):
            self.add(rel, "INV-GIT", f"version-control folder {name}")
            return
        if depth + 1 >= MAX_DEPTH:
            self.add(rel, "INV-LIMIT", f"folder nested deeper than {MAX_DEPTH} levels")
            return
        try:
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            self.add(rel, "INV-IO", f"cannot open folder: {exc.strerror}")
            return
        try:
            self.walk(child, rel + "/", depth + 1)
        finally:
            os.close(child)

    def regular(self, dfd: int, rel: str, name: str, st: os.stat_result) -> None:
        if st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH | stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
            self.add(rel, "INV-EXEC", f"mode {stat.filemode(st.st_mode)} has execute/setuid/setgid/sticky bits")
        kind, refusal = classify(rel, self.rules)
        if refusal is not None:
            self.findings.append(refusal)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        except OSError as exc:
            self.add(rel, "INV-IO", f"cannot open: {exc.strerror}")
            self.files.append(InventoryFile(rel, st.st_size, kind, FileIdentity.from_stat(st)))
            return
        with io.FileIO(fd, "rb", closefd=True) as f:
            fst = os.fstat(fd)
            identity = FileIdentity.from_stat(fst)
            self.files.append(InventoryFile(rel, fst.st_size, kind, identity))
            self.present.add(rel)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
                self.add(rel, "INV-IO", "file was replaced during the inventory")
                return
            self.content(f, rel, kind, fst.st_size, refused=refusal is not None)

    def content(self, f: io.FileIO, rel: str, kind: FileKind | None, size: int, *, refused: bool) -> None:
        if kind is FileKind.SAFETENSORS:
            try:
                self.headers[rel] = parse_safetensors_header(f, size, rel)
            except FindingsError as exc:
                self.findings.extend(exc.findings)
            return
        head = f.read(PICKLE_SCAN_BYTES)  # the pickle scan reads up to the text-file limit
        if lfs_pointer(head, size):
            self.add(rel, "LFS-POINTER", "is a Git LFS pointer file, not the real content (the LFS object was never downloaded)")
            return
        found = sniff(head[:HEAD_BYTES]) or pickle_program(head)
        if found and not refused:
            self.add(rel, "INV-MAGIC", f"content is a {found} although the name says {kind.value if kind else 'otherwise'}")
            return
        if kind in (FileKind.JSON, FileKind.SHARD_INDEX, FileKind.SIGNATURE, FileKind.IMPORT_REPORT):
            self.json_file(f, rel, kind, size, head)
        elif kind in (FileKind.TEXT, FileKind.TEMPLATE, FileKind.GIT_METADATA):
            self.text_file(f, rel, size, head)

    def _read_all(self, f: io.FileIO, rel: str, size: int, head: bytes, limit: int) -> bytes | None:
        if size > limit:
            self.add(rel, "INV-LIMIT", f"{size} bytes exceeds the {limit}-byte limit for this kind of file")
            return None
        return head + f.read(max(0, limit + 1 - len(head)))

    def json_file(self, f: io.FileIO, rel: str, kind: FileKind, size: int, head: bytes) -> None:
        data = self._read_all(f, rel, size, head, self.rules.max_json_bytes)
        if data is None:
            return
        if kind is FileKind.SHARD_INDEX:
            try:
                self.indexes.append(parse_shard_index(rel, data))
            except FindingsError as exc:
                self.findings.extend(exc.findings)
            return
        try:
            doc = loads_strict(data)
        except JsonProblem as exc:
            self.add(rel, exc.rule, exc.message)
            return
        if scans_for_remote_code(rel):
            for hit in remote_code_pointers(doc, rel.rsplit("/", 1)[-1]):
                self.add(f"{rel}#{hit.pointer}", "JSON-REMOTE-CODE", hit.reason)

    def text_file(self, f: io.FileIO, rel: str, size: int, head: bytes) -> None:
        data = self._read_all(f, rel, size, head, self.rules.max_text_bytes)
        if data is None:
            return
        problem = text_problem(data)
        if problem:
            self.add(rel, "INV-TEXT", problem)

    def finish(self) -> Inventory:
        for index in self.indexes:
            self.findings.extend(check_shard_index(index, self.headers, present=self.present))
        files = tuple(sorted(self.files, key=lambda e: sort_key(e.name)))
        findings = tuple(sorted(self.findings, key=lambda x: (sort_key(x.path), x.rule, x.message)))
        return Inventory(self.root, files, findings, dict(self.headers), tuple(self.indexes))


def text_problem(data: bytes) -> str | None:
    """Why ``data`` is not clean text (UTF-8, no control characters but tab/newline/CR/FF), or None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 ({exc.reason} at byte {exc.start})"
    bad = _TEXT_CONTROL.search(text)
    if bad:
        return f"control character U+{ord(bad.group()):04X} at offset {bad.start()}"
    return None


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    return "special file"


def _escapes(target: str, depth: int) -> bool:
    level = depth
    for part in target.split("/"):
        if part == "..":
            level -= 1
            if level < 0:
                return True
        elif part not in ("", "."):
            level += 1
    return False


def open_root(root: str | os.PathLike[str]) -> tuple[Path, int]:
    """Open a model folder without following a link; return (path, directory fd).

    Raises:
        UsageError: the path does not exist or is not a directory (exit 2).
        FindingsError: the path is a symbolic link (``INV-ROOT``, exit 1).
    """
    path = Path(root)
    label = shown(str(path))  # the path may come from a lock file or a pull request
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UsageError(f"{label}: {exc.strerror}", path=str(path), rule="INV-ROOT", hint="pass an existing model directory") from None
    if stat.S_ISLNK(st.st_mode):
        raise FindingsError([Finding(".", "INV-ROOT", f"{label} is a symbolic link; pass the real directory")], root=str(path))
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{label} is not a directory", path=str(path), rule="INV-ROOT", hint="pass the model directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{label}: cannot open ({exc.strerror})", path=str(path), rule="INV-ROOT") from None
    return path, fd


def take_inventory(root: str | os.PathLike[str], rules: InventoryRules = DEFAULT_RULES) -> Inventory:
    """Walk ``root`` (never following links) and check every file; collect all findings.

    Args:
        root: the model folder.
        rules: limits and test-only extra names (default :data:`DEFAULT_RULES`).

    Returns:
        The :class:`Inventory`; call :meth:`Inventory.raise_for_findings` to refuse.

    Raises:
        UsageError: ``root`` is missing or not a directory.
        FindingsError: ``root`` is a symbolic link.
    """
    path, fd = open_root(root)
    walker = _Walker(path, rules)
    try:
        walker.walk(fd, "", 0)
    finally:
        os.close(fd)
    return walker.finish()
