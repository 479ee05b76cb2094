"""Careful file access for policy checks: no symlinks followed, size caps, relative names only."""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: size caps for the small text files the policy reads from a model folder
MAX_TEXT_BYTES = 1024 * 1024
#: the folder scan stops (and reports) after this many entries
MAX_SCAN_ENTRIES = 20_000


class UnsafeFile(Exception):
    """A file could not be read safely (symlink, not a regular file, too large, missing)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_relative_name(name: str) -> str:
    """Return ``name`` if it is a clean relative POSIX path inside a folder, else raise ValueError.

    Refused: empty names, absolute paths, ``.``/``..`` components, backslashes, NUL/control chars.
    """
    if not name or name.startswith("/") or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{name!r} is not a clean relative path")
    parts = PurePosixPath(name).parts
    if any(p in ("", ".", "..") for p in parts) or "//" in name or name.endswith("/"):
        raise ValueError(f"{name!r} is not a clean relative path")
    return name


def read_bytes(folder: Path, name: str, *, limit: int = MAX_TEXT_BYTES) -> bytes:
    """Read ``folder/name`` without following a symlink at any component below ``folder``.

    Raises:
        UnsafeFile: missing, a symlink, not a regular file, or larger than ``limit``.
    """
    check_relative_name(name)
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = name.split("/")
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                raise UnsafeFile("missing") from None
            except OSError:
                raise UnsafeFile(f"folder {part!r} is a symlink or not a folder") from None
            os.close(dir_fd)
            dir_fd = nxt
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError:
            raise UnsafeFile("missing") from None
        except OSError as err:
            raise UnsafeFile(f"cannot be opened without following links ({err.strerror})") from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile("not a regular file")
        if st.st_size > limit:
            raise UnsafeFile(f"{st.st_size} bytes is over the {limit}-byte limit")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, 65536):
            total += len(chunk)
            if total > limit:
                raise UnsafeFile(f"grew over the {limit}-byte limit while reading")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(folder: Path, name: str, *, limit: int = MAX_TEXT_BYTES) -> str:
    """Like :func:`read_bytes` and decode strict UTF-8 (a BOM is dropped)."""
    data = read_bytes(folder, name, limit=limit)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise UnsafeFile("not valid UTF-8 text") from None


@dataclass(frozen=True)
class FolderEntry:
    """One entry of a folder scan: relative POSIX path and what kind of thing it is."""

    path: str
    kind: str  # "file" | "dir" | "symlink" | "other"


def scan_folder(folder: Path) -> tuple[list[FolderEntry], bool]:
    """List every entry below ``folder`` without following symlinks.

    Returns:
        (entries sorted by path, truncated flag when more than MAX_SCAN_ENTRIES were present).
    """
    entries: list[FolderEntry] = []
    stack: list[tuple[Path, str]] = [(folder, "")]
    while stack:
        current, prefix = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                rel = f"{prefix}{entry.name}"
                if len(entries) >= MAX_SCAN_ENTRIES:
                    return sorted(entries, key=lambda e: e.path), True
                if entry.is_symlink():
                    entries.append(FolderEntry(rel, "symlink"))
                elif entry.is_dir(follow_symlinks=False):
                    entries.append(FolderEntry(rel, "dir"))
                    stack.append((Path(entry.path), rel + "/"))
                elif entry.is_file(follow_symlinks=False):
                    entries.append(FolderEntry(rel, "file"))
                else:
                    entries.append(FolderEntry(rel, "other"))
    return sorted(entries, key=lambda e: e.path), False


def glob_match(pattern: str, path: str) -> bool:
    """Match a relative POSIX ``path`` against one allow/deny pattern.

    Rules (gitignore-like, case-sensitive):

    * ``NAME/**`` matches everything below any folder component called ``NAME`` (fnmatch on the
      component), at any depth;
    * a pattern without ``/`` matches the last path component (``*.pyc`` matches ``a/b/x.pyc``);
    * any other pattern is matched against the whole path with :func:`fnmatch.fnmatchcase`.
    """
    parts = path.split("/")
    if pattern.endswith("/**") and "/" not in pattern[:-3]:
        head = pattern[:-3]
        return any(fnmatch.fnmatchcase(part, head) for part in parts[:-1])
    if "/" not in pattern:
        return fnmatch.fnmatchcase(parts[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern)


def describe(err: UnsafeFile, name: str) -> str:
    """A one-line description of why ``name`` could not be read."""
    return f"{name}: {err.reason}"
