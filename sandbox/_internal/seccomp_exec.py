"""Load a seccomp BPF filter into this process, then exec the target (runs inside the sandbox).

Usage: ``python -S -E seccomp_exec.py FILTER.bpf PROGRAM [ARGS...]``. Standard library only: it runs
after ``setpriv`` dropped every privilege and before the sandboxed program starts. It sets
``PR_SET_NO_NEW_PRIVS`` (again), ``PR_SET_PDEATHSIG`` = SIGKILL (so the sandbox dies with its
launcher), installs the filter, and ``execvpe``\\s the program with the current environment.
Exit status 126 means the filter could not be installed (nothing was executed).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    sys.stderr.write(f"secure-run seccomp_exec: {what} failed: {os.strerror(err)}\n")
    sys.stderr.flush()
    os._exit(126)


def main(argv: list[str]) -> None:
    """Install the filter in ``argv[1]`` and exec ``argv[2:]``."""
    if len(argv) < 3:
        sys.stderr.write("usage: seccomp_exec.py FILTER.bpf PROGRAM [ARGS...]\n")
        os._exit(126)
    with open(argv[1], "rb") as f:
        blob = f.read()
    if not blob or len(blob) % 8 or len(blob) // 8 > 4096:
        sys.stderr.write("secure-run seccomp_exec: malformed filter\n")
        os._exit(126)
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("PR_SET_NO_NEW_PRIVS")
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        _fail("PR_SET_PDEATHSIG")
    buf = ctypes.create_string_buffer(blob, len(blob))
    prog = _SockFprog(len(blob) // 8, ctypes.addressof(buf))
    if prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        _fail("PR_SET_SECCOMP")
    try:
        os.execvpe(argv[2], argv[2:], dict(os.environ))
    except OSError as err:
        sys.stderr.write(f"secure-run seccomp_exec: cannot execute {argv[2]!r}: {err.strerror}\n")
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv)
