"""Local state files (audit log, licence acceptances): default location and safe JSON-lines appends.

Appends are all-or-nothing: one ``write`` of one full line under an exclusive ``flock``, then
``fsync``; a short or failed write (``ENOSPC``, ``EDQUOT``, ``EIO``...) is rolled back with
``ftruncate`` to the old size and raised as :class:`StateFileError` (exit 2). Readers recover from a
torn tail (a last line without ``\\n``, left by a crash or a full disk on an older version): it is
ignored and reported (:attr:`StateRead.torn`), never fatal, and the next append cuts it off before
writing, so one partial line never poisons later reads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import StateFileError

#: one record may not be larger than this (keeps every append a single bounded write)
MAX_RECORD_BYTES = 1024 * 1024
#: state files larger than this are not read back
MAX_STATE_BYTES = 64 * 1024 * 1024
#: an append needs at least this much free space on the file system (checked up front)
MIN_FREE_BYTES = 2 * MAX_RECORD_BYTES
_TAIL_CHUNK = 64 * 1024


def state_dir() -> Path:
    """``$XDG_STATE_HOME/secure-run`` (default ``~/.local/state/secure-run``)."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "secure-run"


def resolve_state_path(value: str | None, default_name: str) -> Path:
    """A configured path (``~`` expanded; must then be absolute) or the default under :func:`state_dir`."""
    if value is None:
        return state_dir() / default_name
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise StateFileError(
            f"state file path {value!r} is relative",
            hint="give an absolute path or one starting with ~",
            rule="state.path",
        )
    return path


def _check_open_file(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise StateFileError(f"{path} is not a regular file", path=str(path), rule="state.file")
    if st.st_uid != os.geteuid():
        raise StateFileError(
            f"{path} belongs to uid {st.st_uid}, not to this user", path=str(path), rule="state.owner",
            hint="use a state file in your own state directory",
        )
    if st.st_mode & 0o077:
        raise StateFileError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; state files must be private (0600)",
            path=str(path),
            rule="state.mode",
            hint=f"chmod 600 {path}",
        )


def _os_hint(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space (or raise the quota) on that file system, or point the policy at another state file"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the state file and its folder writable by this user, or point the policy at another file"
    return "check the file system holding the state file"


@contextlib.contextmanager
def _open_nofollow(path: Path, flags: int) -> Iterator[int]:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if os.path.islink(path):
            raise StateFileError(
                f"{path} is a symlink; state files are never written or read through links",
                path=str(path),
                rule="state.symlink",
                hint="remove the link and point the policy at a real file",
            ) from None
        raise StateFileError(
            f"cannot open {path}: {err.strerror}", path=str(path), rule="state.open", hint=_os_hint(err)
        ) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise StateFileError(
            f"cannot create {path.parent}: {err.strerror}", path=str(path), rule="state.open", hint=_os_hint(err)
        ) from None


@dataclass(frozen=True)
class TornTail:
    """A last line without its ``\\n`` (a crashed or failed append): never part of the records.

    Attributes:
        offset: byte offset where the torn line starts.
        length: its length in bytes.
        sha256: hex SHA-256 of its bytes (kept as evidence when an append cuts it off).
    """

    offset: int
    length: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        """Plain-data form (audit records, ``--json`` reports)."""
        return {"offset": self.offset, "length": self.length, "sha256": self.sha256}


def _torn(offset: int, data: bytes) -> TornTail | None:
    return TornTail(offset, len(data), hashlib.sha256(data).hexdigest()) if data else None


@dataclass(frozen=True)
class Tail:
    """The end of a state file as an append found it (under the lock).

    Attributes:
        last_line: the last complete line, with its ``\\n`` (None for an empty file).
        size: the file size after the torn tail (if any) was cut off.
        torn: the torn tail that was cut off before this append, if any.
    """

    last_line: bytes | None
    size: int
    torn: TornTail | None


def _read_tail(fd: int, size: int) -> Tail:
    """Find the last complete line and any torn tail, reading backwards in bounded chunks."""
    buf = b""
    pos = size
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        last_nl = buf.rfind(b"\n")
        if last_nl != -1 and buf.rfind(b"\n", 0, last_nl) != -1:
            break
    last_nl = buf.rfind(b"\n")
    if last_nl == -1:
        return Tail(None, pos, _torn(pos, buf))
    start = buf.rfind(b"\n", 0, last_nl) + 1
    return Tail(buf[start : last_nl + 1], pos + last_nl + 1, _torn(pos + last_nl + 1, buf[last_nl + 1 :]))


class Appender:
    """An open, exclusively locked state file: see :func:`locked_append`."""

    def __init__(self, path: Path, fd: int, tail: Tail) -> None:
        self.path = path
        self._fd = fd
        self.tail = tail

    def write(self, line: bytes) -> None:
        """Append one full line, all or nothing (rolled back on a short or failed write).

        Raises:
            StateFileError: the line is malformed or too large, or the write failed (the file is
                left as it was).
        """
        if not line.endswith(b"\n") or b"\n" in line[:-1]:
            raise StateFileError(f"{self.path}: a state record must be exactly one line", path=str(self.path))
        if len(line) > MAX_RECORD_BYTES:
            raise StateFileError(
                f"record of {len(line)} bytes is over the {MAX_RECORD_BYTES}-byte limit", path=str(self.path)
            )
        old = self.tail.size
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes: the disk is full)")
            os.fsync(self._fd)
        except OSError as err:
            self._rollback(old, err)
        self.tail = Tail(line, old + len(line), None)

    def _rollback(self, old: int, err: OSError) -> None:
        why = err.strerror or str(err)
        try:
            os.ftruncate(self._fd, old)
            os.fsync(self._fd)
            undone = "nothing was recorded"
        except OSError:
            undone = "the partial line could not be removed (readers skip it; the next append cuts it off)"
        raise StateFileError(
            f"cannot append to {self.path}: {why}; {undone}",
            path=str(self.path),
            rule="state.write",
            hint=_os_hint(err),
        ) from None

    def rotate(self, rotated: Path) -> None:
        """Keep the locked file as ``rotated`` and continue in a new, empty file at the old path.

        The new file is created and locked under a temporary name first, then renamed over the
        path (after the old file got its second name by a hard link), so the path always names a
        file whose lock this appender holds: no other writer can slip a record in between.
        Writers that opened the old file notice the rename once they get its lock and reopen.
        """
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StateFileError(
                f"cannot rotate {self.path}: {err.strerror}", path=str(self.path), rule="state.write", hint=_os_hint(err)
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.link(self.path, rotated)
            try:
                os.rename(tmp, self.path)
            except OSError:
                os.unlink(rotated)
                raise
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateFileError(
                f"cannot rotate {self.path} to {rotated.name}: {err.strerror}",
                path=str(self.path), rule="state.write", hint=_os_hint(err),
            ) from None
        self._fd = fd  # the rotated file stays locked (and open) until the append ends
        self.tail = Tail(self.tail.last_line, 0, None)


@contextlib.contextmanager
def locked_append(path: Path) -> Iterator[Appender]:
    """Open ``path`` for appending under an exclusive ``flock`` and yield an :class:`Appender`.

    The file is created 0600 (parent 0700); a symlink at the final component is refused
    (O_NOFOLLOW); an existing file must be a private regular file owned by this user. If another
    writer rotated the file while we waited for the lock, the new file is opened instead. A torn
    tail is cut off (and reported in ``appender.tail.torn``) before anything is written.

    Raises:
        StateFileError: the file cannot be written safely.
    """
    _make_parent(path)
    for _attempt in range(100):
        with _open_nofollow(path, os.O_RDWR | os.O_APPEND | os.O_CREAT) as fd:
            _check_open_file(fd, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.lstat(path)
            except FileNotFoundError:
                continue
            opened = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
                continue  # rotated (or replaced) while we waited: lock the file now at ``path``
            tail = _read_tail(fd, opened.st_size)
            if tail.torn is not None:
                try:
                    os.ftruncate(fd, tail.size)
                except OSError as err:
                    raise StateFileError(
                        f"cannot cut the torn last line of {path}: {err.strerror}", path=str(path), rule="state.write"
                    ) from None
            appender = Appender(path, fd, tail)
            try:
                yield appender
            finally:
                if appender._fd != fd:
                    os.close(appender._fd)
            return
    raise StateFileError(f"{path} keeps being replaced while waiting for its lock", path=str(path), rule="state.open")


def check_writable(path: Path) -> None:
    """Check up front that ``path`` can take an append: safe file, writable, lockable, space left.

    Creates the file (0600) when missing, writes nothing.

    Raises:
        StateFileError: naming the path and why it cannot be written.
    """
    _make_parent(path)
    with _open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT) as fd:
        _check_open_file(fd, path)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fs = os.fstatvfs(fd)
        free = fs.f_bavail * fs.f_frsize
        if free < MIN_FREE_BYTES:
            raise StateFileError(
                f"cannot append to {path}: only {free} bytes free on its file system (need {MIN_FREE_BYTES})",
                path=str(path),
                rule="state.space",
                hint=_os_hint(OSError(errno.ENOSPC, "")),
            )


def dump_line(record: object) -> bytes:
    """The canonical one-line JSON form of a state record (sorted keys, compact, UTF-8, ``\\n``)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return (text + "\n").encode()


def append_json_line(path: Path, record: object) -> None:
    """Append one record as one JSON line, all or nothing (see :func:`locked_append`).

    Raises:
        StateFileError: the file cannot be written safely, the record is too large, or the write failed.
    """
    line = dump_line(record)
    if len(line) > MAX_RECORD_BYTES:
        raise StateFileError(f"record of {len(line)} bytes is over the {MAX_RECORD_BYTES}-byte limit", path=str(path))
    with locked_append(path) as out:
        out.write(line)


@dataclass(frozen=True)
class StateRead:
    """A JSON-lines state file read back.

    Attributes:
        lines: the complete lines, each with its ``\\n`` (line ``i + 1`` is ``lines[i]``).
        torn: a last line without ``\\n``, ignored (None when the file ends cleanly).
    """

    lines: tuple[bytes, ...]
    torn: TornTail | None


def read_lines(path: Path, *, private: bool = True) -> StateRead:
    """Read the complete lines of a state file under a shared lock (missing file: no lines).

    Lines end at ``\n`` only (a stray ``\r`` stays inside its line, as the chain hashes it).

    Args:
        path: the file.
        private: require a private file owned by this user (state the program trusts); False for
            read-only checks of a copy (``audit verify`` / ``show`` of an auditor's evidence), where
            only a regular file, not followed through a link, is required.

    Raises:
        StateFileError: symlink, unsafe mode or too large.
    """
    if not os.path.lexists(path):
        return StateRead((), None)
    with _open_nofollow(path, os.O_RDONLY) as fd:
        if private:
            _check_open_file(fd, path)
        elif not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateFileError(f"{path} is not a regular file", path=str(path), rule="state.file")
        if os.fstat(fd).st_size > MAX_STATE_BYTES:
            raise StateFileError(f"{path} is larger than {MAX_STATE_BYTES} bytes", path=str(path), rule="state.size")
        fcntl.flock(fd, fcntl.LOCK_SH)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    data = b"".join(chunks)
    end = data.rfind(b"\n") + 1
    lines = tuple(line + b"\n" for line in data[: end - 1].split(b"\n")) if end else ()
    return StateRead(lines, _torn(end, data[end:]))


def parse_line(path: Path, lineno: int, raw: bytes) -> dict[str, object]:
    """One line as a JSON object.

    Raises:
        StateFileError: ``state.format`` naming ``path:lineno``.
    """
    from secure_run.manifests._jsoncheck import JsonProblem, loads_strict  # the one strict JSON loader

    try:
        value = loads_strict(raw)
    except JsonProblem as exc:
        raise StateFileError(f"{path}:{lineno}: not a JSON object ({exc.message})", path=str(path),
                             rule="state.format") from None
    if not isinstance(value, dict):
        raise StateFileError(f"{path}:{lineno}: not a JSON object", path=str(path), rule="state.format")
    return value


def read_json_lines(path: Path) -> list[dict[str, object]]:
    """Read back a JSON-lines state file (missing file: empty list; a torn last line is skipped).

    Raises:
        StateFileError: symlink, unsafe mode, too large, or a complete line that is not a JSON object.
    """
    return [parse_line(path, i, raw) for i, raw in enumerate(read_lines(path).lines, start=1)]
