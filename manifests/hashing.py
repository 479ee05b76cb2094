"""Parallel SHA-256 of model files, the OMS root digest, and file identities for re-checks.

Files are hashed in a thread pool (hashlib releases the GIL), one file per task, with a reusable
1 MiB buffer per file and ``readinto``; workers default to ``min(files, usable CPUs)``
(spec/signing.md section 9). Each file is opened once with ``O_NOFOLLOW``, ``fstat``-ed before and
after hashing, and the :class:`FileIdentity` (dev, inode, size, mtime, ctime) is returned so that
the worker can prove it loads the very files that were verified:

    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp()); _ = (root / "a.json").write_text("{}")
    >>> digests = hash_files(root, ["a.json"])
    >>> digests["a.json"].sha256[:16], digests["a.json"].identity.size
    ('44136fa355b3678a', 2)
    >>> digests["a.json"].identity.check(root / "a.json")  # raises VerificationFailed if changed
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from secure_run.errors import VerificationError

from .findings import verification_failed

if TYPE_CHECKING:
    from .sealed import SealedCopy

#: Read size per ``readinto`` call (fits in L2 cache; larger buffers measured slower).
CHUNK_BYTES = 1 << 20
#: Progress is reported every this many bytes per file (keeps lock traffic negligible).
PROGRESS_STEP = 32 << 20
#: Upper bound on hashing threads (a guard, not a tuning knob: the default is one thread per usable CPU,
#: measured on a 16-CPU host to scale past 8 threads, see bench/RESULTS.md "verify").
MAX_WORKERS = 64


class ProgressSink(Protocol):
    """Receives hashing progress; the CLI renders it with rich on a TTY, tests may count it."""

    def start(self, total_bytes: int, total_files: int) -> None:
        """Called once before hashing starts."""

    def advance(self, nbytes: int) -> None:
        """Called from worker threads as bytes are hashed (must be thread-safe)."""

    def finish(self) -> None:
        """Called once when hashing ends (also on errors)."""


@dataclass(frozen=True)
class FileIdentity:
    """What identifies one on-disk version of a file (compare before/after loading).

    Attributes:
        dev: ``st_dev``.
        ino: ``st_ino``.
        size: ``st_size``.
        mtime_ns: ``st_mtime_ns``.
        ctime_ns: ``st_ctime_ns`` (cannot be set back by ``touch``, so it catches restored mtimes).
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        """Build from an ``os.stat_result``."""
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def check(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        """Re-``lstat`` ``path`` and raise if it is no longer this exact file version.

        Raises:
            VerificationFailed: rule ``FILE-CHANGED``.
        """
        label = name or os.fspath(path)
        try:
            now = FileIdentity.from_stat(os.lstat(path))
        except OSError as exc:
            raise verification_failed(label, "FILE-CHANGED", f"cannot stat the verified file any more: {exc.strerror}") from None
        if now != self:
            raise verification_failed(label, "FILE-CHANGED", f"file changed since it was verified ({self.describe_change(now)})")

    def describe_change(self, other: FileIdentity) -> str:
        """Which fields differ, e.g. ``size 10 -> 11``."""
        diffs = [
            f"{field} {getattr(self, field)} -> {getattr(other, field)}"
            for field in ("dev", "ino", "size", "mtime_ns", "ctime_ns")
            if getattr(self, field) != getattr(other, field)
        ]
        return ", ".join(diffs) or "no change"

    def to_json(self) -> dict[str, int]:
        """JSON form (field names as above)."""
        return {"dev": self.dev, "ino": self.ino, "size": self.size, "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns}


@dataclass(frozen=True)
class FileDigest:
    """SHA-256 of one file and the identity of the version that was hashed."""

    name: str
    sha256: str
    identity: FileIdentity
    #: with ``hash_files(..., seal=True)``: the sealed copy whose bytes ``sha256`` is the digest of
    sealed: SealedCopy | None = None


def default_workers(n_files: int) -> int:
    """``min(files, usable CPUs, MAX_WORKERS)``, at least 1 (one thread per CPU: hashlib releases the GIL)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(n_files, cores, MAX_WORKERS))


def _open(root: Path, name: str, dirfd: int | None) -> int:
    if dirfd is None:
        return os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    from .folder import open_beneath  # no link followed at any component below the verified root

    return open_beneath(dirfd, name)


def _sha256_of(fd: int, name: str, progress: ProgressSink | None) -> tuple[str, int]:
    """sha256 and length of everything readable from ``fd``'s current offset."""
    with io.FileIO(fd, "rb", closefd=False) as f:
        h = hashlib.sha256()
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        total = 0
        pending = 0
        while True:
            n = f.readinto(view)
            if not n:
                break
            h.update(view[:n])
            total += n
            pending += n
            if progress is not None and pending >= PROGRESS_STEP:
                progress.advance(pending)
                pending = 0
        if progress is not None and pending:
            progress.advance(pending)
    return h.hexdigest(), total


def _hash_one(root: Path, name: str, expected: FileIdentity | None, progress: ProgressSink | None,
              dirfd: int | None = None, seal: bool = False) -> FileDigest:
    try:
        fd = _open(root, name, dirfd)
    except (OSError, VerificationError) as exc:
        rule = "FILE-CHANGED" if expected is not None else "SET-MISSING"
        why = exc.strerror if isinstance(exc, OSError) else exc.message
        raise verification_failed(name, rule, f"cannot open: {why}") from None
    sealed_fd = -1
    try:
        before_st = os.fstat(fd)
        before = FileIdentity.from_stat(before_st)
        if not stat.S_ISREG(before_st.st_mode):
            raise verification_failed(name, "FILE-CHANGED", "is no longer a regular file")
        if expected is not None and before != expected:
            raise verification_failed(name, "FILE-CHANGED", f"file changed after the inventory ({expected.describe_change(before)})")
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):  # pragma: no cover - not on every platform
            pass
        if seal:
            # read once from disk into a sealed memory copy, then hash the copy: the digest is the
            # digest of bytes that can no longer change, and those bytes are what the worker gets
            from .sealed import copy_and_seal

            sealed_fd = copy_and_seal(fd, name, before.size)
            os.lseek(sealed_fd, 0, os.SEEK_SET)
            digest, total = _sha256_of(sealed_fd, name, progress)
        else:
            digest, total = _sha256_of(fd, name, progress)
        after = FileIdentity.from_stat(os.fstat(fd))
        if after != before or total != before.size:
            raise verification_failed(
                name, "FILE-CHANGED", f"file changed while it was hashed ({before.describe_change(after)}, read {total} bytes)"
            )
        sealed = None
        if seal:
            from .sealed import SealedCopy, require_sealed

            sealed = SealedCopy(name, digest, require_sealed(name, sealed_fd), sealed_fd)
        return FileDigest(name, digest, before, sealed)
    except BaseException:
        if sealed_fd >= 0:
            os.close(sealed_fd)
        raise
    finally:
        os.close(fd)


def hash_files(
    root: str | os.PathLike[str],
    names: Sequence[str],
    *,
    expected: Mapping[str, FileIdentity] | None = None,
    workers: int | None = None,
    progress: ProgressSink | None = None,
    dirfd: int | None = None,
    seal: bool = False,
) -> dict[str, FileDigest]:
    """SHA-256 every named file below ``root`` in parallel.

    Args:
        root: the model folder.
        names: canonical relative names (already checked by the inventory).
        expected: identities recorded by the inventory; a file whose ``fstat`` differs is refused
            (``FILE-CHANGED``), which closes the swap-after-inventory window.
        workers: thread count (default :func:`default_workers`).
        progress: optional :class:`ProgressSink`.
        dirfd: an open directory descriptor of ``root``; when given every file is opened relative
            to it, no link followed at any component (what :func:`~secure_run.manifests.verify_model`
            uses, so that what is hashed is what the verified folder object later reads).
        seal: copy each file once into a sealed memory file and hash that copy
            (:mod:`secure_run.manifests.sealed`); each result then carries its ``sealed`` copy, whose
            descriptor the caller owns (all are closed again when hashing fails).

    Returns:
        name -> :class:`FileDigest`, in the order of ``names``.

    Raises:
        VerificationFailed: a file cannot be opened or changed during hashing.
    """
    base = Path(root)
    expected = expected or {}
    n_workers = workers or default_workers(len(names))
    if progress is not None:
        progress.start(sum(e.size for e in expected.values()) if expected else 0, len(names))
    done: dict[str, FileDigest] = {}

    def one(n: str) -> FileDigest:
        d = _hash_one(base, n, expected.get(n), progress, dirfd, seal)
        done[n] = d
        return d

    try:
        if n_workers == 1 or len(names) <= 1:
            for n in names:
                one(n)
        else:
            # Largest files first so that one big shard does not start last.
            order = sorted(names, key=lambda n: -(expected[n].size if n in expected else 0))
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="sha256") as pool:
                futures = [pool.submit(one, n) for n in order]
            for fut in futures:
                fut.result()  # the first failure, after every thread has finished
        results = [done[n] for n in names]
    except BaseException:
        for d in done.values():
            if d.sealed is not None:
                os.close(d.sealed.fd)
        raise
    finally:
        if progress is not None:
            progress.finish()
    return {r.name: r for r in results}


def root_digest(digests: Iterable[str]) -> str:
    """OMS v1.0 root digest: SHA-256 over the raw bytes of each resource digest, in the given order.

    Args:
        digests: lowercase hex SHA-256 digests in manifest (document) order.

    Returns:
        Lowercase hex digest.
    """
    h = hashlib.sha256()
    for d in digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()
