"""Who created a sandbox, so that sandboxes left behind by a killed host process can be reaped.

An owner token is ``<boot id>:<pid>:<process start time in clock ticks>``: a pid alone is reused,
the start time (field 22 of ``/proc/<pid>/stat``) is not within one boot.

    >>> tok = owner_token()
    >>> owner_alive(tok)
    True
    >>> owner_alive(tok.rsplit(":", 1)[0] + ":1")      # same pid, another start time: a reused pid
    False
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["owner_alive", "owner_token"]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return "unknown-boot"


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
    try:
        return int(rest[19])  # field 22 overall: starttime
    except (IndexError, ValueError):
        return None


def owner_token(pid: int | None = None) -> str:
    """This process's (or ``pid``'s) owner token."""
    pid = os.getpid() if pid is None else pid
    return f"{_boot_id()}:{pid}:{_start_ticks(pid)}"


def owner_alive(token: str) -> bool:
    """Whether the process named by ``token`` still runs (a malformed token counts as gone)."""
    parts = token.split(":")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    boot, pid, start = parts[0], int(parts[1]), parts[2]
    if boot != _boot_id():
        return False
    return str(_start_ticks(pid)) == start and _start_ticks(pid) is not None
