"""The sandbox's own wall clock: runs a program and kills everything at the deadline, host or no host.

Used as the first process inside a docker sandbox (under the engine's init), so that a container
left behind by a killed host is still bounded in time. Standard library only; run by path::

    python -S deadline.py SECONDS -- PROGRAM ARGS...

It forwards SIGTERM/SIGINT/SIGHUP to the program, reaps it, and at SECONDS sends SIGKILL to every
process it may signal (in the container: all of the sandbox's processes) and exits 124. If the
program kills this process instead, the container's init exits and the engine kills the rest.
"""

from __future__ import annotations

import os
import signal
import sys
import time

EXIT_TIMEOUT = 124


def main(argv: list[str]) -> int:
    """Run ``argv[3:]`` with a deadline of ``argv[1]`` seconds (``argv[2]`` is ``--``)."""
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: deadline.py SECONDS -- PROGRAM [ARGS...]\n")
        return 2
    deadline = time.monotonic() + float(argv[1])
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(argv[3], argv[3:])
        finally:
            os._exit(127)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            try:
                os.kill(-1, signal.SIGKILL)  # every process of this uid but this one
            except ProcessLookupError:
                pass
            sys.stderr.write(f"secure-run sandbox: wall-clock limit of {argv[1]} s reached, killed\n")
            return EXIT_TIMEOUT
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done == pid:
            return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(min(left, 0.05))

if __name__ == "__main__":
    sys.exit(main(sys.argv))
