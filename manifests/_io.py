"""Careful reads of input files and clear errors for failed writes.

Every input file secure-run reads outside a model folder walk (trust files, lock files, the
signature, files ``inspect`` summarizes) goes through :func:`read_input`: opened with
``O_NONBLOCK | O_NOFOLLOW`` (a FIFO cannot block the open, a link is not followed), ``fstat``-ed
(it must be a regular file: a FIFO, ``/dev/zero`` or a socket is refused before any read), and
read with a size cap (at most ``limit + 1`` bytes are ever read).

    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.json"; _ = p.write_bytes(b"{}")
    >>> read_input(p, limit=16)
    b'{}'
    >>> read_input("/dev/zero", limit=16)
    Traceback (most recent call last):
    ...
    secure_run.manifests._io.InputFileProblem: is a character device, not a regular file

Writes that fail for lack of space or another storage fault become
:class:`~secure_run.errors.EnvironmentProblem` (exit 2) through :func:`storage_error`, never a
traceback.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from typing import Literal

from secure_run.errors import EnvironmentProblem

Reason = Literal["missing", "link", "special", "too-large", "unreadable"]


class InputFileProblem(Exception):
    """An input file cannot be read safely; ``reason`` says why, ``message`` says it in words."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"


def read_input(path: str | os.PathLike[str], *, limit: int) -> bytes:
    """Read a regular file of at most ``limit`` bytes without following a final symbolic link.

    Raises:
        InputFileProblem: missing, a link, not a regular file, larger than ``limit``, or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputFileProblem("missing", "does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputFileProblem("link", "is a symbolic link (links are not followed; pass the real file)") from None
        raise InputFileProblem("unreadable", f"cannot open: {exc.strerror}") from None
    with io.FileIO(fd, "rb", closefd=True) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileProblem("special", f"is a {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise InputFileProblem("too-large", f"is {st.st_size} bytes, larger than the {limit}-byte limit")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise InputFileProblem("unreadable", f"cannot read: {exc.strerror}") from None
    if len(data) > limit:
        raise InputFileProblem("too-large", f"grew past the {limit}-byte limit while it was read")
    return data


#: errno values that mean "the storage cannot take this write" (not a bug, not a refusal).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM})


def storage_error(exc: OSError, action: str, path: str | os.PathLike[str]) -> EnvironmentProblem:
    """An exit-2 error for a failed write: what was being written, where, and what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free disk space (or quota) on that file system, then run the command again"
    elif exc.errno == errno.EROFS:
        hint = "the file system is read-only; write to a writable location"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "make the folder writable for the current user"
    else:
        hint = "check the disk and the file system, then run the command again"
    reason = exc.strerror or str(exc)
    return EnvironmentProblem(f"cannot {action} {os.fspath(path)}: {reason}; nothing was changed", path=os.fspath(path),
                              rule="io.write", hint=hint)
