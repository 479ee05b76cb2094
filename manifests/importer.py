"""``secure-run import SRC DEST``: a clean copy of an upstream snapshot, allowlisted files only.

    >>> import pathlib, tempfile
    >>> src = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (src / "config.json").write_text('{"model_type": "m", "auto_map": {"AutoModel": "x.M"}}')
    >>> _ = (src / "modeling_x.py").write_text("import os")
    >>> report = import_snapshot(src, src.parent / (src.name + "-clean"))
    >>> [k.name for k in report.kept], [(d.name, d.rule) for d in report.dropped]
    (['config.json'], [('modeling_x.py', 'INV-CODE')])
    >>> [(s.file, s.pointer) for s in report.stripped]
    [('config.json', '/auto_map')]

What it does (nothing is executed or unpickled, links are not followed):

* refuses a DEST that exists and is not an empty folder (``IMP-DEST``);
* walks SRC; drops (and reports) every file the inventory would refuse by name -- code,
  ``__pycache__``, ``.pyc``, native code, pickle-capable formats, unknown kinds, ``.git``,
  ``.github``, the ``.cache`` folder of download tools, git attribute files, an upstream
  ``model.sig`` / ``import-report.json`` / ``provenance.intoto.json``;
* copies the allowlisted files with mode 0644, checking their content on the way (magic bytes,
  strict JSON, clean UTF-8 text, strict safetensors headers); a content failure in a file that
  would be kept refuses the whole import, because dropping it would silently change the model;
* strips remote-code pointers from JSON files (``auto_map``, ``trust_remote_code``, ...;
  :mod:`secure_run.manifests._jsoncheck`): top-level members are removed byte-for-byte, leaving
  every other byte (including ``Infinity``) untouched; nested ones make the file be re-written with
  2-space indentation, key order kept, ``Infinity`` kept;
* cross-checks the shard index, writes ``import-report.json`` (schema ``secure-run/import-report/v1``)
  and re-runs the full inventory on DEST, which must be clean.

On any refusal the files and folders it created are removed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from secure_run import __version__
from secure_run.errors import UsageError

from ._io import storage_error
from ._jsoncheck import JsonProblem, loads_strict, remote_code_pointers, scans_for_remote_code
from ._jsonedit import dump_like_hf, remove_top_level_keys
from ._names import MAX_DEPTH, component_problem, sort_key
from ._sniff import HEAD_BYTES, PICKLE_SCAN_BYTES, lfs_pointer, pickle_program, sniff
from .findings import Finding, FindingsError, shown
from .hashing import ProgressSink
from .inventory import DEFAULT_RULES, FileKind, classify, open_root, take_inventory, text_problem
from .provenance import PROVENANCE_FILE, check_source, import_provenance
from .tensors import SafetensorsHeader, check_shard_index, parse_safetensors_header, parse_shard_index

REPORT_NAME = "import-report.json"
REPORT_SCHEMA = "secure-run/import-report/v1"
_COPY_CHUNK = 4 << 20
_DROP_DIRS = {"__pycache__": ("INV-PYCACHE", "compiled-Python cache folder"), ".git": ("INV-GIT", "version-control folder")}


@dataclass(frozen=True)
class KeptFile:
    """A file copied into DEST.

    Attributes:
        name: relative path.
        kind: allowlisted kind.
        size: bytes written.
        sha256: digest of the bytes written.
        source_sha256: digest of the upstream bytes (differs when keys were stripped).
        modified: True when remote-code keys were stripped.
        mode_normalized: True when the upstream file had execute or other special mode bits.
    """

    name: str
    kind: str
    size: int
    sha256: str
    source_sha256: str
    modified: bool = False
    mode_normalized: bool = False


@dataclass(frozen=True)
class DroppedFile:
    """A file or folder not copied, and why (rule id + reason)."""

    name: str
    rule: str
    reason: str


@dataclass(frozen=True)
class StrippedKey:
    """A remote-code pointer removed from a kept JSON file."""

    file: str
    pointer: str
    reason: str
    value: Any
    byte_preserving: bool


@dataclass(frozen=True)
class ImportReport:
    """Everything ``import`` did; also written to ``DEST/import-report.json``."""

    source: str
    dest: Path
    kept: tuple[KeptFile, ...]
    dropped: tuple[DroppedFile, ...]
    stripped: tuple[StrippedKey, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """The ``import-report.json`` document (no absolute paths: the source is named by its basename)."""
        return {
            "schema": REPORT_SCHEMA,
            "tool": f"secure-run {__version__}",
            "source": self.source,
            "kept": [k.__dict__ for k in self.kept],
            "dropped": [d.__dict__ for d in self.dropped],
            "stripped_keys": [
                {"file": s.file, "pointer": s.pointer, "reason": s.reason, "value": s.value, "byte_preserving": s.byte_preserving}
                for s in self.stripped
            ],
            "notes": list(self.notes),
        }


class _Refused(Exception):
    def __init__(self, findings: list[Finding]) -> None:
        super().__init__("import refused")
        self.findings = findings


class _WriteFailed(Exception):
    """Writing the copy failed (disk full, quota, I/O error); becomes an exit-2 error."""

    def __init__(self, error: OSError, path: Path) -> None:
        super().__init__(str(error))
        self.error = error
        self.path = path


def _put(out: BinaryIO, data: bytes | memoryview) -> None:
    """Write all of ``data`` (the one place the copy writes, so tests can make the disk full)."""
    out.write(data)


def _get(f: io.FileIO, view: memoryview, rel: str) -> int:
    """Read the next chunk of a source file; a read error is a refusal of that file, not a crash."""
    try:
        return f.readinto(view) or 0
    except OSError as exc:
        raise _Refused([Finding(rel, "INV-IO", f"cannot read: {exc.strerror}")]) from None


class _Importer:
    def __init__(self, src: Path, dest: Path, dereference: bool, progress: ProgressSink | None) -> None:
        self.src = src
        self.dest = dest
        self.dereference = dereference
        self.link_roots = _link_roots(src)
        self.progress = progress
        self.kept: list[KeptFile] = []
        self.dropped: list[DroppedFile] = []
        self.stripped: list[StrippedKey] = []
        self.notes: list[str] = []
        self.refusals: list[Finding] = []
        self.headers: dict[str, SafetensorsHeader] = {}
        self.index_names: list[str] = []
        self.created: list[Path] = []

    # -- walking ---------------------------------------------------------------------------
    def walk(self, dfd: int, prefix: str, depth: int) -> None:
        with os.scandir(dfd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            rel = prefix + name
            problem = component_problem(name)
            if problem:
                self.drop(shown(rel.encode("utf-8", "backslashreplace").decode()), "INV-NAME", problem)
                continue
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                self.directory(dfd, rel, name, depth)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                self.file(dfd, rel, name, st)
            else:
                self.drop(rel, "INV-SPECIAL", "not a regular file")

    def directory(self, dfd: int, rel: str, name: str, depth: int) -> None:
        if name in _DROP_DIRS:
            rule, why = _DROP_DIRS[name]
            self.drop(rel + "/", rule, why)
            return
        if depth == 0 and name == ".github":
            self.drop(rel + "/", "INV-GIT", "repository automation folder")
            return
        if depth == 0 and name == ".cache":
            self.drop(rel + "/", "IMP-CACHE", "download-tool cache (e.g. huggingface-cli --local-dir)")
            return
        if depth + 1 >= MAX_DEPTH:
            self.drop(rel + "/", "INV-LIMIT", f"nested deeper than {MAX_DEPTH} levels")
            return
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            self.walk(child, rel + "/", depth + 1)
        finally:
            os.close(child)

    def link_escape(self, fd: int) -> str | None:
        """Where the opened link target really is, if that is outside :attr:`link_roots`, else None.

        The check is on the file that was actually opened (``/proc/self/fd``), so a link swapped
        between a check and the open cannot slip through.
        """
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return "(unknown: /proc/self/fd is not available)"
        for root in self.link_roots:
            if real.startswith(str(root).rstrip("/") + "/"):
                return None
        return real

    def drop(self, rel: str, rule: str, reason: str) -> None:
        self.dropped.append(DroppedFile(rel, rule, reason))

    def file(self, dfd: int, rel: str, name: str, st: os.stat_result) -> None:
        top = "/" not in rel
        if top and name in (".gitattributes", ".gitignore"):
            self.drop(rel, "INV-GIT", "git metadata, not needed by the model")
            return
        if top and name in ("model.sig", REPORT_NAME, PROVENANCE_FILE):
            self.drop(rel, "IMP-STALE", "upstream signature/report; the cleaned copy is signed by you after review")
            return
        kind, refusal = classify(rel)
        if refusal is not None or kind is None:
            assert refusal is not None
            link = " (symbolic link)" if stat.S_ISLNK(st.st_mode) else ""
            self.drop(rel, refusal.rule, refusal.message + link)
            return
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
        if stat.S_ISLNK(st.st_mode):
            if not self.dereference:
                self.refusals.append(
                    Finding(rel, "INV-SYMLINK", "is a symbolic link", "pass --dereference to copy the files that links point to (e.g. a Hugging Face cache snapshot), or download with --local-dir")
                )
                return
            self.notes.append(f"{rel}: copied from the target of a symbolic link (--dereference)")
        else:
            flags |= os.O_NOFOLLOW
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except OSError as exc:
            self.refusals.append(Finding(rel, "INV-IO", f"cannot open: {exc.strerror}"))
            return
        if stat.S_ISLNK(st.st_mode):
            outside = self.link_escape(fd)
            if outside is not None:
                os.close(fd)
                self.refusals.append(
                    Finding(
                        rel,
                        "INV-SYMLINK",
                        f"is a symbolic link to {shown(outside)!r}, outside the snapshot; --dereference only follows links into the snapshot"
                        + (" and its Hugging Face cache's blobs/ folder" if len(self.link_roots) > 1 else ""),
                    )
                )
                return
        with io.FileIO(fd, "rb", closefd=True) as f:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                self.refusals.append(Finding(rel, "INV-SPECIAL", "does not lead to a regular file"))
                return
            special = bool(fst.st_mode & 0o7111)
            self.copy(f, rel, kind, fst.st_size, special)

    # -- copying ---------------------------------------------------------------------------
    def copy(self, f: io.FileIO, rel: str, kind: FileKind, size: int, special: bool) -> None:
        try:
            if kind is FileKind.SAFETENSORS:
                self.headers[rel] = parse_safetensors_header(f, size, rel)
                f.seek(0)
                self.stream(f, rel, kind, size, special)
                return
            head = f.read(PICKLE_SCAN_BYTES)
            if lfs_pointer(head, size):
                raise _Refused([Finding(rel, "LFS-POINTER", "is a Git LFS pointer file, not the real content (the LFS object was never downloaded)")])
            found = sniff(head[:HEAD_BYTES]) or pickle_program(head)
            if found:
                raise _Refused([Finding(rel, "INV-MAGIC", f"content is a {found} although the name says {kind.value}")])
            if kind is FileKind.TOKENIZER_MODEL:
                f.seek(0)
                self.stream(f, rel, kind, size, special)
                return
            limit = DEFAULT_RULES.max_json_bytes if kind in (FileKind.JSON, FileKind.SHARD_INDEX) else DEFAULT_RULES.max_text_bytes
            if size > limit:
                raise _Refused([Finding(rel, "INV-LIMIT", f"{size} bytes exceeds the {limit}-byte limit")])
            data = head + f.read(max(0, limit + 1 - len(head)))
            if kind is FileKind.SHARD_INDEX:
                parse_shard_index(rel, data)
                self.index_names.append(rel)
                self.write(rel, kind, data, data, special)
            elif kind is FileKind.JSON:
                self.json_file(rel, data, special)
            else:
                self.text_file(rel, kind, data, special)
        except FindingsError as exc:
            self.refusals.extend(exc.findings)
        except _Refused as exc:
            self.refusals.extend(exc.findings)

    def json_file(self, rel: str, data: bytes, special: bool) -> None:
        try:
            doc = loads_strict(data)
        except JsonProblem as exc:
            raise _Refused([Finding(rel, exc.rule, exc.message)]) from None
        hits = list(remote_code_pointers(doc, rel.rsplit("/", 1)[-1])) if scans_for_remote_code(rel) else []
        if not hits:
            self.write(rel, FileKind.JSON, data, data, special)
            return
        top = [h.key for h in hits if h.pointer.count("/") == 1]
        nested = [h for h in hits if h.pointer.count("/") != 1]
        text = data.decode("utf-8")
        if nested or not isinstance(doc, dict):
            new_doc = _strip(doc, {h.pointer for h in hits})
            new_text, preserving = dump_like_hf(new_doc), False
        else:
            new_text, preserving = remove_top_level_keys(text, top)
        for h in hits:
            self.stripped.append(StrippedKey(rel, h.pointer, h.reason, h.value, preserving))
        self.write(rel, FileKind.JSON, data, new_text.encode("utf-8"), special, modified=True)

    def text_file(self, rel: str, kind: FileKind, data: bytes, special: bool) -> None:
        problem = text_problem(data)
        if problem:
            raise _Refused([Finding(rel, "INV-TEXT", problem)])
        self.write(rel, kind, data, data, special)

    def _open_dest(self, rel: str) -> int:
        target = self.dest / rel
        try:
            for parent in reversed(target.relative_to(self.dest).parents[:-1]):
                d = self.dest / parent
                if not d.exists():
                    d.mkdir(mode=0o755)
                    self.created.append(d)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _WriteFailed(exc, target) from None
        self.created.append(target)
        return fd

    def write(self, rel: str, kind: FileKind, original: bytes, data: bytes, special: bool, *, modified: bool = False) -> None:
        fd = self._open_dest(rel)
        try:
            with os.fdopen(fd, "wb") as out:
                _put(out, data)
            os.chmod(self.dest / rel, 0o644)
        except OSError as exc:
            raise _WriteFailed(exc, self.dest / rel) from None
        self.kept.append(
            KeptFile(rel, kind.value, len(data), hashlib.sha256(data).hexdigest(), hashlib.sha256(original).hexdigest(), modified, special)
        )

    def stream(self, f: io.FileIO, rel: str, kind: FileKind, size: int, special: bool) -> None:
        fd = self._open_dest(rel)
        h = hashlib.sha256()
        buf = bytearray(_COPY_CHUNK)
        view = memoryview(buf)
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    n = _get(f, view, rel)
                    if not n:
                        break
                    h.update(view[:n])
                    _put(out, view[:n])
                    written += n
                    if self.progress is not None:
                        self.progress.advance(n)
            os.chmod(self.dest / rel, 0o644)
        except OSError as exc:
            raise _WriteFailed(exc, self.dest / rel) from None
        if written != size:
            raise _Refused([Finding(rel, "INV-IO", f"file changed while it was copied ({written} of {size} bytes)")])
        digest = h.hexdigest()
        self.kept.append(KeptFile(rel, kind.value, written, digest, digest, False, special))

    def cleanup(self, created_dest: bool) -> None:
        for p in reversed(self.created):
            try:
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass
        if created_dest:
            try:
                self.dest.rmdir()
            except OSError:
                pass


def _strip(doc: Any, pointers: set[str], here: str = "") -> Any:
    if isinstance(doc, dict):
        return {
            k: _strip(v, pointers, f"{here}/{k.replace('~', '~0').replace('/', '~1')}")
            for k, v in doc.items()
            if f"{here}/{k.replace('~', '~0').replace('/', '~1')}" not in pointers
        }
    if isinstance(doc, list):
        return [_strip(v, pointers, f"{here}/{i}") for i, v in enumerate(doc)]
    return doc


def _link_roots(src: Path) -> tuple[Path, ...]:
    """Folders ``--dereference`` may read link targets from: the snapshot itself and, for a
    Hugging Face cache snapshot (``models--ORG--NAME/snapshots/REV``), that repository's
    ``blobs/`` folder (where the cache's links point)."""
    real = src.resolve()
    roots = [real]
    repo = real.parent.parent
    if real.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        roots.append(repo / "blobs")
    return tuple(roots)


def _prepare_dest(dest: Path) -> bool:
    """Check DEST; return True when it was created here."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        dest.mkdir(parents=True, mode=0o755)
        return True
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise _dest_error(dest, "exists and is not a folder")
    if any(os.scandir(dest)):
        raise _dest_error(dest, "exists and is not empty")
    return False


def import_snapshot(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    dereference: bool = False,
    progress: ProgressSink | None = None,
    source_repo: str | None = None,
    source_revision: str | None = None,
) -> ImportReport:
    """Copy the allowlisted files of ``src`` into ``dest`` (see the module docstring).

    Args:
        src: upstream snapshot folder.
        dest: new or empty destination folder.
        dereference: copy the targets of symbolic links to allowlisted files (Hugging Face cache
            snapshots are link farms); each is noted in the report. Default: refuse such links.
        progress: optional sink (bytes copied for large files).
        source_repo: upstream repository id; with ``source_revision`` (its full commit hash) a
            provenance statement is written to ``dest/provenance.intoto.json``
            (:func:`secure_run.manifests.provenance.import_provenance`).
        source_revision: see ``source_repo``.

    Returns:
        The :class:`ImportReport` (also written to ``dest/import-report.json``).

    Raises:
        UsageError: ``IMP-DEST`` (exit 2).
        FindingsError: content failures of files that would be kept; nothing
            is left behind in ``dest``.
        UsageError: ``src`` is not a folder.
    """
    check_source(source_repo, source_revision)
    src_path, sfd = open_root(src)
    dest_path = Path(dest)
    if dest_path.resolve() == src_path.resolve() or src_path.resolve() in dest_path.resolve().parents:
        os.close(sfd)
        raise _dest_error(dest_path, "must not be SRC or inside it")
    try:
        created_dest = _prepare_dest(dest_path)
    except BaseException:
        os.close(sfd)
        raise
    imp = _Importer(src_path, dest_path, dereference, progress)
    if progress is not None:
        progress.start(0, 0)  # total unknown up front: the sink shows bytes copied so far
    try:
        try:
            imp.walk(sfd, "", 0)
        finally:
            os.close(sfd)
            if progress is not None:
                progress.finish()
        if not imp.refusals:
            for index_name in imp.index_names:
                data = (dest_path / index_name).read_bytes()
                present = {k.name for k in imp.kept}
                imp.refusals.extend(check_shard_index(parse_shard_index(index_name, data), imp.headers, present=present))
        if imp.refusals:
            raise FindingsError(imp.refusals, what="import refused", root=str(src_path))
        report = ImportReport(
            src_path.resolve().name,
            dest_path,
            tuple(sorted(imp.kept, key=lambda k: sort_key(k.name))),
            tuple(sorted(imp.dropped, key=lambda d: sort_key(d.name.rstrip("/")))),
            tuple(imp.stripped),
            tuple(imp.notes),
        )
        body = (json.dumps(report.to_json(), indent=2, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")
        fd = imp._open_dest(REPORT_NAME)
        try:
            with os.fdopen(fd, "wb") as out:
                _put(out, body)
        except OSError as exc:
            raise _WriteFailed(exc, dest_path / REPORT_NAME) from None
        if source_repo is not None and source_revision is not None:
            doc = import_provenance(report, source_repo, source_revision, dereference=dereference)
            try:
                with os.fdopen(imp._open_dest(PROVENANCE_FILE), "wb") as out:
                    _put(out, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
            except OSError as exc:
                raise _WriteFailed(exc, dest_path / PROVENANCE_FILE) from None
        take_inventory(dest_path).raise_for_findings()  # self-check: DEST must be a clean model folder
        return report
    except _WriteFailed as exc:
        imp.cleanup(created_dest)
        raise storage_error(exc.error, "write the imported copy to", exc.path) from None
    except BaseException:
        imp.cleanup(created_dest)
        raise


def _dest_error(dest: Path, problem: str) -> UsageError:
    """``IMP-DEST``: a bad destination is a usage error (exit 2), like ``keygen`` over an existing file."""
    return UsageError(f"import destination {dest} {problem} [IMP-DEST]", path=str(dest), rule="IMP-DEST",
                      hint="choose a new or empty destination folder")
