"""The verified folder: the one way anything after the gate sees a model folder.

Verification proves, for every file, its sha256 and the identity of the version that was hashed
(device, inode, size, mtime, ctime). :class:`VerifiedFolder` carries that proof together with an
open directory descriptor of the verified root (``O_DIRECTORY | O_NOFOLLOW``). Every later open is
relative to that descriptor, component by component, without following a link, so replacing the
folder (or one of its sub-folders) by a symbolic link after verification changes nothing that is
read. Each open re-checks the file's identity with ``fstat`` before and after reading; small files
(configs, tokenizer, chat template, index) are read whole and hashed again, so that even a swap
that kept every identity field could not go unnoticed.

The host builds it in :func:`secure_run.manifests.verify_model`; the sandboxed worker builds the
same object from the pins it was sent (:meth:`VerifiedFolder.open`) over its read-only mount.

    >>> import hashlib, os, pathlib, tempfile
    >>> from secure_run.manifests.hashing import FileIdentity
    >>> root = pathlib.Path(tempfile.mkdtemp()); _ = (root / "config.json").write_bytes(b"{}")
    >>> pin = PinnedFile("config.json", hashlib.sha256(b"{}").hexdigest(),
    ...                  FileIdentity.from_stat(os.lstat(root / "config.json")))
    >>> with VerifiedFolder.open(root, [pin]) as folder:
    ...     folder.read_bytes("config.json")
    b'{}'

Errors are :class:`~secure_run.errors.VerificationError` (exit 1) with the rules
``folder.unpinned`` (a file that verification did not prove), ``folder.changed`` (a file or the
folder is no longer the verified version), ``folder.digest`` (the bytes read differ from the
verified digest), ``folder.open`` (the file cannot be opened safely: missing, a link, not regular).
"""

from __future__ import annotations

import hashlib
import os
import stat
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Protocol

from secure_run.errors import VerificationError

from .hashing import FileIdentity

__all__ = [
    "SMALL_FILE_LIMIT",
    "FolderError",
    "FolderReader",
    "PinnedFile",
    "UnverifiedFolder",
    "VerifiedFolder",
    "open_beneath",
]

#: Largest file :meth:`VerifiedFolder.read_bytes` reads whole (tokenizer.json of large models is ~17 MB).
SMALL_FILE_LIMIT = 64 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class FolderError(VerificationError):
    """A verified file could not be used as verified (exit 1)."""

    kind = "verification"


def _refuse(name: str, rule: str, message: str, hint: str) -> FolderError:
    return FolderError(f"{name}: {message}", path=name, rule=rule, hint=hint)


_REVERIFY = "the folder changed after verification; stop whatever writes to it and verify it again"


@dataclass(frozen=True)
class PinnedFile:
    """What verification proved about one file: its digest and the identity that was hashed."""

    name: str
    sha256: str
    identity: FileIdentity


def _clean_name(name: str) -> list[str]:
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise _refuse(repr(name), "folder.open", "not a clean relative file name", "use the names verification listed")
    parts = PurePosixPath(name).parts
    if any(p in ("", ".", "..") for p in parts) or "//" in name or name.endswith("/"):
        raise _refuse(repr(name), "folder.open", "not a clean relative file name", "use the names verification listed")
    return list(parts)


def open_beneath(dirfd: int, name: str) -> int:
    """Open ``name`` (relative, ``/``-separated) below ``dirfd`` without following any link.

    Every intermediate folder is opened with ``O_DIRECTORY | O_NOFOLLOW`` relative to the previous
    one and the file itself with ``O_NOFOLLOW``, so no component can redirect the open.

    Raises:
        FolderError: rule ``folder.open`` (missing, a link, not a folder).
    """
    parts = _clean_name(name)
    current = dirfd
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=current)
            except OSError as exc:
                raise _refuse(name, "folder.open", f"cannot open folder {part!r} without following a link "
                              f"({exc.strerror})", _REVERIFY) from None
            if current != dirfd:
                os.close(current)
            current = nxt
        try:
            return os.open(parts[-1], _FILE_FLAGS, dir_fd=current)
        except OSError as exc:
            raise _refuse(name, "folder.open", f"cannot open without following a link ({exc.strerror})",
                          _REVERIFY) from None
    finally:
        if current != dirfd:
            os.close(current)


class FolderReader(Protocol):
    """What the model loader and the tokenizer need from a folder (both classes below provide it)."""

    root: Path

    def exists(self, name: str) -> bool:
        """True when ``name`` may be read (verified folder: it is pinned)."""

    def read_bytes(self, name: str, *, limit: int = SMALL_FILE_LIMIT) -> bytes:
        """The whole content of a small file."""

    def open_fd(self, name: str) -> tuple[int, FileIdentity]:
        """An open descriptor (the caller closes it) and the identity it must keep while read."""

    def check_fd(self, name: str, fd: int) -> None:
        """Raise if the descriptor's file no longer has the identity :meth:`open_fd` returned."""


class VerifiedFolder:
    """An open, verified model folder: pins (name -> sha256 + identity) and a directory descriptor.

    Build it with :meth:`open` (or get it from ``verify_model(...).folder``); close it with
    :meth:`close` or a ``with`` block (it is also closed when garbage-collected).
    """

    def __init__(self, root: Path, dirfd: int, pins: Mapping[str, PinnedFile]) -> None:
        self.root = root
        self._dirfd = dirfd
        self._pins = dict(pins)
        st = os.fstat(dirfd)
        self.root_identity = (st.st_dev, st.st_ino)
        self._finalizer = weakref.finalize(self, os.close, dirfd)

    @classmethod
    def open(cls, root: str | os.PathLike[str], pins: Iterable[PinnedFile]) -> VerifiedFolder:
        """Open ``root`` (not a link) and attach the pins.

        Raises:
            FolderError: ``folder.open`` when ``root`` is missing, a link or not a folder.
        """
        path = Path(root)
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            raise _refuse(str(path), "folder.open", f"cannot open the model folder without following a link "
                          f"({exc.strerror})", "pass the real folder, not a symbolic link") from None
        return cls(path, fd, {p.name: p for p in pins})

    def with_pins(self, pins: Iterable[PinnedFile], *, root: Path | None = None) -> VerifiedFolder:
        """A folder over the same descriptor with ``pins``; the descriptor moves to it (this one is closed)."""
        fd = self.dirfd
        self._finalizer.detach()
        return VerifiedFolder(root or self.root, fd, {p.name: p for p in pins})

    # --- what was proved ------------------------------------------------------------------------

    @property
    def dirfd(self) -> int:
        """The directory descriptor of the verified root (valid until :meth:`close`)."""
        if not self._finalizer.alive:
            raise ValueError("the verified folder is closed")
        return self._dirfd

    @property
    def names(self) -> tuple[str, ...]:
        """Every pinned file name."""
        return tuple(self._pins)

    def pins(self) -> Mapping[str, PinnedFile]:
        """name -> :class:`PinnedFile` (a copy)."""
        return dict(self._pins)

    def has(self, name: str) -> bool:
        """True when ``name`` was verified (pinned)."""
        return name in self._pins

    def exists(self, name: str) -> bool:
        """For readers: a verified folder shows only its pinned files."""
        return name in self._pins

    def pin(self, name: str) -> PinnedFile:
        """The pin of ``name``.

        Raises:
            FolderError: ``folder.unpinned`` when verification did not prove this file.
        """
        try:
            return self._pins[name]
        except KeyError:
            raise _refuse(name, "folder.unpinned", "was not verified (no digest and identity pinned for it)",
                          "only files proved by verification may be read; verify the folder again") from None

    def digests(self) -> dict[str, str]:
        """name -> verified sha256 (hex)."""
        return {n: p.sha256 for n, p in self._pins.items()}

    # --- reading --------------------------------------------------------------------------------

    def open_fd(self, name: str) -> tuple[int, FileIdentity]:
        """Open a pinned file below the root, with its identity checked; the caller closes the fd.

        Raises:
            FolderError: ``folder.unpinned``, ``folder.open`` or ``folder.changed``.
        """
        pin = self.pin(name)
        fd = open_beneath(self.dirfd, name)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _refuse(name, "folder.open", "is not a regular file", _REVERIFY)
            now = FileIdentity.from_stat(st)
            if now != pin.identity:
                raise _refuse(name, "folder.changed", f"is not the verified file ({pin.identity.describe_change(now)})",
                              _REVERIFY)
        except BaseException:
            os.close(fd)
            raise
        return fd, pin.identity

    def check_fd(self, name: str, fd: int) -> None:
        """After reading: the open file must still have its verified identity.

        Raises:
            FolderError: ``folder.changed``.
        """
        pin = self.pin(name)
        now = FileIdentity.from_stat(os.fstat(fd))
        if now != pin.identity:
            raise _refuse(name, "folder.changed", f"changed while it was read ({pin.identity.describe_change(now)})",
                          _REVERIFY)

    def read_bytes(self, name: str, *, limit: int = SMALL_FILE_LIMIT) -> bytes:
        """The whole content of a small pinned file, proved equal to what was verified.

        Opens through the directory descriptor without following links, checks the identity
        before and after reading, and checks that the sha256 of the bytes read is the verified one.

        Raises:
            FolderError: ``folder.unpinned``, ``folder.open``, ``folder.changed`` or ``folder.digest``.
        """
        pin = self.pin(name)
        if pin.identity.size > limit:
            raise _refuse(name, "folder.open", f"is {pin.identity.size} bytes, more than the {limit} read whole",
                          "this file is too large to be a configuration file")
        fd, _ = self.open_fd(name)
        try:
            chunks: list[bytes] = []
            total = 0
            while total <= pin.identity.size:
                chunk = os.read(fd, min(1 << 20, pin.identity.size + 1 - total) or 1)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            self.check_fd(name, fd)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if hashlib.sha256(data).hexdigest() != pin.sha256:
            raise _refuse(name, "folder.digest", f"the bytes read ({len(data)}) do not have the verified sha256 "
                          f"{pin.sha256}", _REVERIFY)
        return data

    def read_text(self, name: str, *, limit: int = SMALL_FILE_LIMIT) -> str:
        """:meth:`read_bytes` decoded as strict UTF-8.

        Raises:
            FolderError: as :meth:`read_bytes`, or ``folder.open`` for text that is not UTF-8.
        """
        data = self.read_bytes(name, limit=limit)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _refuse(name, "folder.open", f"is not UTF-8 text (byte {err.start})", "re-save the file as UTF-8") from None

    # --- whole-folder checks --------------------------------------------------------------------

    def check_root_path(self) -> None:
        """The folder's path still names the verified directory (not a link, not a replacement).

        Needed only where a path must be handed to something that cannot take the descriptor
        (a container bind mount); the worker re-checks every file anyway.

        Raises:
            FolderError: ``folder.changed``.
        """
        try:
            st = os.lstat(self.root)
        except OSError as exc:
            raise _refuse(str(self.root), "folder.changed", f"the verified folder is gone ({exc.strerror})",
                          _REVERIFY) from None
        if stat.S_ISLNK(st.st_mode) or (st.st_dev, st.st_ino) != self.root_identity:
            raise _refuse(str(self.root), "folder.changed", "the path no longer names the verified folder "
                          "(replaced or turned into a link)", _REVERIFY)

    def recheck(self) -> None:
        """Re-``fstat`` every pinned file through the descriptor; refuse at the first change.

        Raises:
            FolderError: ``folder.open`` or ``folder.changed``.
        """
        for name in self._pins:
            fd, _ = self.open_fd(name)
            os.close(fd)

    # --- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the directory descriptor (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return not self._finalizer.alive

    def __enter__(self) -> VerifiedFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[PinnedFile]:
        return iter(self._pins.values())

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self._dirfd}"
        return f"VerifiedFolder({str(self.root)!r}, {len(self._pins)} files, {state})"


class UnverifiedFolder:
    """A plain folder read with the same care but without pins (tools, tests, benchmarks).

    Files are opened below a directory descriptor without following links, size-capped, and
    ``fstat``-ed before and after reading; nothing is proved about their content. The runner and
    the worker never use this class: they read through a :class:`VerifiedFolder`.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            raise _refuse(str(self.root), "folder.open", f"cannot open the folder without following a link "
                          f"({exc.strerror})", "pass the real folder, not a symbolic link") from None
        self._dirfd = fd
        self._opened: dict[str, FileIdentity] = {}
        self._finalizer = weakref.finalize(self, os.close, fd)

    def exists(self, name: str) -> bool:
        """True when ``name`` is an entry below the folder (not following a final link)."""
        parts = _clean_name(name)
        if len(parts) == 1:
            try:
                os.stat(name, dir_fd=self._dirfd, follow_symlinks=False)
            except OSError:
                return False
            return True
        try:
            os.close(open_beneath(self._dirfd, name))
        except FolderError:
            return False
        return True

    def open_fd(self, name: str) -> tuple[int, FileIdentity]:
        """Open a regular file below the folder (no link followed); its identity is remembered."""
        fd = open_beneath(self._dirfd, name)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _refuse(name, "folder.open", "is not a regular file", "model files must be regular files")
        identity = FileIdentity.from_stat(st)
        self._opened[name] = identity
        return fd, identity

    def check_fd(self, name: str, fd: int) -> None:
        """The file must still have the identity it had when :meth:`open_fd` opened it."""
        before = self._opened[name]
        now = FileIdentity.from_stat(os.fstat(fd))
        if now != before:
            raise _refuse(name, "folder.changed", f"changed while it was read ({before.describe_change(now)})",
                          "something is writing to the folder; stop it and retry")

    def read_bytes(self, name: str, *, limit: int = SMALL_FILE_LIMIT) -> bytes:
        """The whole file (at most ``limit`` bytes), unchanged while read."""
        fd, identity = self.open_fd(name)
        try:
            if identity.size > limit:
                raise _refuse(name, "folder.open", f"is {identity.size} bytes, more than the {limit} read whole",
                              "this file is too large to be a configuration file")
            data = b""
            while len(data) <= identity.size:
                more = os.read(fd, identity.size + 1 - len(data))
                if not more:
                    break
                data += more
            self.check_fd(name, fd)
        finally:
            os.close(fd)
        return data

    def close(self) -> None:
        """Close the directory descriptor (idempotent)."""
        self._finalizer()

    def __enter__(self) -> UnverifiedFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
