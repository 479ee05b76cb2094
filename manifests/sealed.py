"""Sealed copies: the verified bytes themselves, handed to the sandboxed worker (read once).

When the runner is going to hand a folder to a worker, verification does not hash the files on
disk and let the worker read them again later. It copies each file once from disk into an
anonymous memory file (``memfd_create``), **seals** it (``F_SEAL_WRITE | F_SEAL_GROW |
F_SEAL_SHRINK | F_SEAL_SEAL``: nobody, not even the host, can change a byte of it any more) and
only then hashes the sealed copy. The digest that is compared with the signed manifest is
therefore the digest of bytes that can no longer change, and the worker receives descriptors of
those very copies (:mod:`secure_run.sandbox.handoff`). Nothing the worker uses is read from the
model folder after hashing, so a file edited, replaced or swapped for a link between hashing and
use changes nothing that runs: there is no window to check, not just a re-check of one.

Each byte is read from disk once (``sendfile`` into the copy, then ``POSIX_FADV_DONTNEED`` so that
the page cache does not hold a second copy); the cost is that the folder lives in memory
(``shmem``) until the worker has loaded it and both sides have closed their descriptors.

    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp()); _ = (root / "config.json").write_bytes(b"{}")
    >>> with seal_folder(root, ["config.json"]) as folder:
    ...     folder.read_bytes("config.json"), folder.digests()["config.json"][:12]
    (b'{}', '44136fa355b3')

Errors are :class:`~secure_run.manifests.folder.FolderError` (exit 1) with the rules
``folder.unpinned`` (not a sealed file of this folder), ``folder.unsealed`` (a descriptor that is
not a sealed, unchangeable copy of the pinned size and identity, or a copy the kernel would not
let us seal), ``folder.digest`` (bytes that do
not have the pinned sha256) and ``folder.memory`` (the folder does not fit in memory).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .folder import SMALL_FILE_LIMIT, FolderError
from .hashing import FileDigest, FileIdentity

__all__ = ["SEALS", "SealedCopy", "SealedFolder", "check_memory", "copy_and_seal", "require_sealed", "seal_folder"]

#: Every seal: no write, no growth, no shrinking, and no way to remove a seal.
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
#: ``sendfile`` step (the page-cache pages of each step are dropped after it).
COPY_STEP = 64 << 20
#: Pauses (seconds) between tries to seal a copy whose pages the kernel still holds (``EBUSY``).
SEAL_PAUSES = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
#: Largest share of the host's available memory the sealed copies may take.
MEMORY_SHARE = 0.9


def _refuse(name: str, rule: str, message: str, hint: str) -> FolderError:
    return FolderError(f"{name}: {message}", path=name, rule=rule, hint=hint)


_RESEND = "the host must hand over the sealed copies it verified; run the command again"


def copy_and_seal(src_fd: int, name: str, size: int) -> int:
    """Copy ``size`` bytes of ``src_fd`` into a new memory file and seal it; returns its descriptor.

    The copy may be shorter or longer than ``size`` when the file changes meanwhile; the caller
    compares the sealed size with what it expects. Page-cache pages of the source are dropped as
    they are copied (clean pages only; nothing is lost).
    """
    label = "secure-run:" + "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[-200:]
    mfd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        offset = 0
        while True:
            n = _copy_step(mfd, src_fd, offset, COPY_STEP if offset < size else 1)
            if n <= 0:
                break
            _drop_cache(src_fd, offset, n)
            offset += n
            if offset > size:  # grew while copied: one byte past is enough to tell
                break
        _seal(mfd, name)
    except BaseException:
        os.close(mfd)
        raise
    return mfd


def _seal(mfd: int, name: str) -> None:
    """Add every seal to ``mfd``, waiting out pages the kernel still holds for a moment.

    ``F_SEAL_WRITE`` fails with ``EBUSY`` while any page of the file has a reference beyond the page
    cache's own. The kernel waits ~75 ms for such references to go before it gives up, but on a
    loaded host a freshly written page can stay referenced longer (a per-CPU LRU batch of another
    CPU, migration, compaction); CI saw this once in ~2000 tests. Nobody else holds this descriptor,
    so the references are the kernel's own and transient: try again after :data:`SEAL_PAUSES`, then
    refuse with ``folder.unsealed``.

    Raises:
        FolderError: ``folder.unsealed`` (still busy after every pause, or any other error).
    """
    for pause in (*SEAL_PAUSES, None):
        try:
            fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, SEALS)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise _refuse(name, "folder.unsealed", f"its memory copy cannot be sealed ({exc.strerror})",
                              "the kernel refuses memory-file seals here; secure-run needs Linux >= 3.17 "
                              "with memfd sealing") from None
            if pause is None:
                raise _refuse(name, "folder.unsealed", f"its memory copy cannot be sealed ({exc.strerror} after "
                              f"{len(SEAL_PAUSES) + 1} tries over {sum(SEAL_PAUSES):.2f} s)",
                              "the kernel still holds pages of the copy; run the command again on a less "
                              "loaded host") from None
        time.sleep(pause)


def _copy_step(dst: int, src: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes of ``src`` at ``offset`` to ``dst``'s end; 0 at the end of ``src``.

    ``sendfile`` (in the kernel) where the source's file system supports it, else read + write.
    """
    try:
        return os.sendfile(dst, src, offset, count)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(src, count, offset)
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.write(dst, view[done:])
    return len(data)


def _drop_cache(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:  # pragma: no cover - advisory only
        pass


def require_sealed(name: str, fd: int, expected: FileIdentity | None = None) -> FileIdentity:
    """Prove that ``fd`` is a fully sealed regular memory file (and, if given, has ``expected``'s identity).

    Raises:
        FolderError: ``folder.unsealed``.
    """
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise _refuse(name, "folder.unsealed", f"is not a sealed copy ({exc.strerror})", _RESEND) from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(name, "folder.unsealed", "is not a regular memory file", _RESEND)
    if seals & SEALS != SEALS:
        raise _refuse(name, "folder.unsealed", f"is not sealed against every change (seals {seals:#x}, "
                      f"need {SEALS:#x})", _RESEND)
    now = FileIdentity.from_stat(st)
    if expected is not None and now != expected:
        raise _refuse(name, "folder.unsealed", f"is not the pinned sealed copy ({expected.describe_change(now)})",
                      _RESEND)
    return now


def check_memory(total_bytes: int, *, meminfo: str = "/proc/meminfo") -> None:
    """Refuse to seal a folder that does not fit in the host's available memory.

    Raises:
        FolderError: ``folder.memory``.
    """
    try:
        with open(meminfo, encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # pragma: no cover - not Linux: nothing to compare with
        return
    if total_bytes > available * MEMORY_SHARE:
        raise _refuse("model folder", "folder.memory",
                      f"its {total_bytes / 1e9:.1f} GB do not fit in {MEMORY_SHARE:.0%} of the "
                      f"{available / 1e9:.1f} GB of memory available; the verified copies handed to the "
                      "worker are held in memory until it has loaded them",
                      "free memory or run on a host with more memory than the model's files")


@dataclass(frozen=True)
class SealedCopy:
    """One sealed file: its verified sha256, the copy's identity and its descriptor (owned by the folder)."""

    name: str
    sha256: str
    identity: FileIdentity
    fd: int


class SealedFolder:
    """Sealed copies of every verified file; the reader the worker loads from (a ``FolderReader``).

    The host gets one from verification (``verify_model(..., seal=True)``); the worker builds one
    with :meth:`adopt` from the descriptors it received and the pins of its request. Close it (or use
    ``with``) to release the memory; it is also closed when garbage-collected.
    """

    def __init__(self, copies: Mapping[str, SealedCopy], *, root: Path | None = None) -> None:
        self.root = root or Path("/sealed")
        self._copies = dict(copies)
        self._finalizer = weakref.finalize(self, _close_all, [c.fd for c in self._copies.values()])

    @classmethod
    def adopt(cls, received: Mapping[str, int], pins: Mapping[str, tuple[str, FileIdentity]]) -> SealedFolder:
        """The worker's side: check each received descriptor against its pin (sealed, same identity).

        ``received``: name -> descriptor (this object owns them from now on, also on error);
        ``pins``: name -> (sha256, identity of the sealed copy) from the request.

        Raises:
            FolderError: ``folder.unpinned`` (a descriptor for a file without a pin, or a pin without
            a descriptor) or ``folder.unsealed``.
        """
        folder = cls({n: SealedCopy(n, pins[n][0] if n in pins else "", FileIdentity(0, 0, 0, 0, 0), fd)
                      for n, fd in received.items()})
        try:
            extra = sorted(set(received) - set(pins))
            missing = sorted(set(pins) - set(received))
            if extra or missing:
                what = [f"received without a pin: {n}" for n in extra] + [f"pinned but not received: {n}" for n in missing]
                raise _refuse(", ".join(extra + missing), "folder.unpinned",
                              "the sealed files received are not the pinned set (" + "; ".join(what) + ")", _RESEND)
            checked = {n: SealedCopy(n, pins[n][0], require_sealed(n, fd, pins[n][1]), fd) for n, fd in received.items()}
        except BaseException:
            folder.close()
            raise
        folder._copies = checked
        return folder

    @classmethod
    def from_digests(cls, digests: Iterable[FileDigest], *, root: Path | None = None) -> SealedFolder:
        """The host's side: the sealed copies that ``hash_files(..., seal=True)`` hashed.

        Raises:
            ValueError: a digest without a sealed copy (hashed without ``seal=True``).
        """
        copies: dict[str, SealedCopy] = {}
        for d in digests:
            if d.sealed is None:
                _close_all([c.fd for c in copies.values()])
                raise ValueError(f"{d.name} was hashed without a sealed copy")
            copies[d.name] = d.sealed
        return cls(copies, root=root)

    # --- what was proved ------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Every sealed file name."""
        return tuple(self._copies)

    def copies(self) -> list[SealedCopy]:
        """Every sealed copy (the descriptors stay owned by this folder)."""
        self._alive()
        return list(self._copies.values())

    def digests(self) -> dict[str, str]:
        """name -> verified sha256 (hex)."""
        return {n: c.sha256 for n, c in self._copies.items()}

    def has(self, name: str) -> bool:
        """True when ``name`` is one of the sealed files."""
        return name in self._copies

    exists = has

    def copy(self, name: str) -> SealedCopy:
        """The sealed copy of ``name``.

        Raises:
            FolderError: ``folder.unpinned``.
        """
        self._alive()
        try:
            return self._copies[name]
        except KeyError:
            raise _refuse(name, "folder.unpinned", "is not one of the verified files",
                          "only files proved by verification may be read") from None

    def total_bytes(self) -> int:
        """Bytes held by the sealed copies."""
        return sum(c.identity.size for c in self._copies.values())

    # --- reading (FolderReader) -----------------------------------------------------------------

    def open_fd(self, name: str) -> tuple[int, FileIdentity]:
        """A new descriptor of the sealed copy (the caller closes it) and the copy's identity."""
        c = self.copy(name)
        return os.dup(c.fd), c.identity

    def check_fd(self, name: str, fd: int) -> None:
        """The descriptor is still the sealed copy (it cannot change; this proves it is the same one).

        Raises:
            FolderError: ``folder.unsealed``.
        """
        require_sealed(name, fd, self.copy(name).identity)

    def read_bytes(self, name: str, *, limit: int = SMALL_FILE_LIMIT) -> bytes:
        """The whole content of a small sealed file, with its sha256 checked again.

        Raises:
            FolderError: ``folder.unpinned``, ``folder.open`` (larger than ``limit``) or ``folder.digest``.
        """
        c = self.copy(name)
        if c.identity.size > limit:
            raise _refuse(name, "folder.open", f"is {c.identity.size} bytes, more than the {limit} read whole",
                          "this file is too large to be a configuration file")
        data = _pread_all(c.fd, c.identity.size)
        if hashlib.sha256(data).hexdigest() != c.sha256:
            raise _refuse(name, "folder.digest", f"the sealed bytes ({len(data)}) do not have the verified sha256 "
                          f"{c.sha256}", _RESEND)
        return data

    def read_text(self, name: str, *, limit: int = SMALL_FILE_LIMIT) -> str:
        """:meth:`read_bytes` decoded as strict UTF-8."""
        data = self.read_bytes(name, limit=limit)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _refuse(name, "folder.open", f"is not UTF-8 text (byte {err.start})", "re-save the file as UTF-8") from None

    # --- lifetime -------------------------------------------------------------------------------

    def _alive(self) -> None:
        if not self._finalizer.alive:
            raise ValueError("the sealed folder is closed")

    def close(self) -> None:
        """Close every descriptor (idempotent); the memory is freed once nobody else holds one."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return not self._finalizer.alive

    def __enter__(self) -> SealedFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[SealedCopy]:
        return iter(self._copies.values())

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.total_bytes()} bytes"
        return f"SealedFolder({len(self._copies)} files, {state})"


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _pread_all(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def seal_folder(root: str | os.PathLike[str], names: Sequence[str], *, workers: int | None = None) -> SealedFolder:
    """Seal and hash ``names`` below ``root`` without any signature check (tools, tests, benchmarks).

    The runner never uses this: it gets its sealed folder from ``verify_model(..., seal=True)``,
    which compares the digests with the signed manifest.
    """
    from .hashing import hash_files

    digests = hash_files(root, list(names), workers=workers, seal=True)
    return SealedFolder.from_digests(digests.values(), root=Path(root))

