"""Local state files (audit log, licence acceptances): default location and safe JSON-lines appends."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import StateFileError

#: one record may not be larger than this (keeps every append a single bounded write)
MAX_RECORD_BYTES = 1024 * 1024
#: state files larger than this are not read back
MAX_STATE_BYTES = 64 * 1024 * 1024


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
        raise StateFileError(f"cannot open {path}: {err.strerror}", path=str(path), rule="state.open") from None
    try:
        yield fd
    finally:
        os.close(fd)


def append_json_line(path: Path, record: object) -> None:
    """Append one record as one JSON line, safely.

    O_APPEND (each write lands at the end even with concurrent writers), one ``write`` per record
    under an exclusive ``flock``, ``fsync`` after it, file created 0600 (parent 0700), a symlink at
    the final component refused (O_NOFOLLOW), and an existing file must be a private regular file
    owned by this user.

    Raises:
        StateFileError: the file cannot be written safely, or the record is too large.
    """
    line = (json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode()
    if len(line) > MAX_RECORD_BYTES:
        raise StateFileError(f"record of {len(line)} bytes is over the {MAX_RECORD_BYTES}-byte limit", path=str(path))
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise StateFileError(f"cannot create {path.parent}: {err.strerror}", path=str(path), rule="state.open") from None
    with _open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT) as fd:
        _check_open_file(fd, path)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise StateFileError(f"short write to {path} ({written} of {len(line)} bytes)", path=str(path))
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def read_json_lines(path: Path) -> list[dict[str, object]]:
    """Read back a JSON-lines state file (missing file: empty list).

    Raises:
        StateFileError: symlink, unsafe mode, too large, or a line that is not a JSON object.
    """
    if not os.path.lexists(path):
        return []
    with _open_nofollow(path, os.O_RDONLY) as fd:
        _check_open_file(fd, path)
        if os.fstat(fd).st_size > MAX_STATE_BYTES:
            raise StateFileError(f"{path} is larger than {MAX_STATE_BYTES} bytes", path=str(path))
        fcntl.flock(fd, fcntl.LOCK_SH)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    out: list[dict[str, object]] = []
    for lineno, raw in enumerate(b"".join(chunks).splitlines(), start=1):
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            value = None
        if not isinstance(value, dict):
            raise StateFileError(f"{path}:{lineno}: not a JSON object", path=str(path), rule="state.format")
        out.append(value)
    return out
