"""The one atomic file writer of secure-run (the signature and the lock file use it).

A temporary file is created in the destination's folder, written, flushed to disk (``fsync``),
given its final mode, and renamed over the destination; the folder is then ``fsync``-ed so the
rename survives a crash. Readers see the old file or the new one, never a partial one. A failure
(disk full, read-only folder, ...) removes the temporary file and raises
:class:`~secure_run.errors.EnvironmentProblem` (exit 2) naming the file, instead of a traceback.

    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "out.json"
    >>> write_atomic(p, b"{}")
    >>> p.read_bytes(), oct(p.stat().st_mode & 0o777)
    (b'{}', '0o644')
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ._io import storage_error

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, action: str = "write") -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Args:
        path: the destination.
        data: the new content.
        mode: the final file mode.
        action: what is being done, for the error message (``write the lock file``).

    Raises:
        EnvironmentProblem: rule ``io.write`` when the file cannot be written (exit 2).
    """
    p = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}-", dir=p.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, p)
        tmp = None
        dir_fd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise storage_error(err, action, p) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
