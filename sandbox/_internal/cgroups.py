"""Per-run cgroups for the namespace backend: pids and memory limits, OOM accounting, cleanup.

cgroup v2 (the GPU hosts): a child of ``/sys/fs/cgroup/secure-run`` with ``pids.max``,
``memory.max`` and ``memory.swap.max = 0``. cgroup v1 (the CI hosts): one child in the ``pids``
hierarchy and one in the ``memory`` hierarchy (``memory.limit_in_bytes`` and, with swap
accounting, ``memory.memsw.limit_in_bytes`` at the same value). The launcher moves itself into
the cgroups (writes ``0`` to each ``cgroup.procs``) before it creates any namespace, so every
process of the sandbox is counted.

A control that cannot be applied raises :class:`SandboxError` naming it, unless the policy lists
it in ``allow_missing``; then it is recorded in :attr:`RunCgroup.missing`.
"""

from __future__ import annotations

import errno
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from secure_run.errors import SandboxError

from ..policy import ControlName, SandboxPolicy
from .owner import owner_alive, owner_token

__all__ = ["RunCgroup", "create_run_cgroup", "reap_cgroups"]

_ROOT = Path("/sys/fs/cgroup")
_PARENT = "secure-run"
#: CFS period for the CPU quota (microseconds).
_CPU_PERIOD_US = 100_000


def _owner_part() -> str:
    """``<pid>-<start ticks>`` of this process, put into every run cgroup's name (for reaping)."""
    _, pid, ticks = owner_token().split(":")
    return f"{pid}-{ticks}"


def _owner_of(name: str) -> str | None:
    """The owner token encoded in a run cgroup's name (``...-<pid>-<ticks>-<hex>``), if any."""
    parts = name.split("-")
    if len(parts) < 4 or not (parts[-3].isdigit() and parts[-2].isdigit()):
        return None
    boot = owner_token().split(":")[0]
    return f"{boot}:{parts[-3]}:{parts[-2]}"


def _cpu_quota(policy: SandboxPolicy) -> int:
    return max(1000, int(policy.cpus * _CPU_PERIOD_US))


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _swap_active() -> bool:
    try:
        lines = Path("/proc/swaps").read_text(encoding="ascii").splitlines()
    except OSError:
        return False
    return len(lines) > 1


def _v1_mounts() -> dict[str, Path]:
    """controller name -> mount point of its v1 hierarchy (from /proc/self/mountinfo)."""
    out: dict[str, Path] = {}
    try:
        text = Path("/proc/self/mountinfo").read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        pre, _, post = line.partition(" - ")
        fields = post.split()
        if len(fields) < 3 or fields[0] != "cgroup":
            continue
        mount_point = Path(pre.split()[4])
        for opt in fields[2].split(","):
            if opt in ("pids", "memory", "cpu"):
                out[opt] = mount_point
    return out


@dataclass
class RunCgroup:
    """The cgroup(s) of one sandbox run."""

    version: int
    dirs: list[Path] = field(default_factory=list)
    missing: set[ControlName] = field(default_factory=set)
    memory_dir: Path | None = None

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files the launcher writes ``0`` into to join."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup."""
        if self.memory_dir is None:
            return 0
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.memory_dir / name).read_text(encoding="ascii")
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def pids(self) -> list[int]:
        """Processes still in the cgroup(s)."""
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text(encoding="ascii").split())
            except OSError:
                continue
        return sorted(found)

    def kill_all(self) -> None:
        """SIGKILL every process left in the cgroup(s)."""
        for d in self.dirs:
            if self.version == 2 and (d / "cgroup.kill").exists():
                try:
                    _write(d / "cgroup.kill", "1")
                except OSError:
                    pass
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def destroy(self) -> None:
        """Kill what is left and remove the cgroup directories."""
        self.kill_all()
        for d in self.dirs:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if err.errno != errno.EBUSY:
                        break
                    time.sleep(0.02)


def _require(policy: SandboxPolicy, control: ControlName, why: str, cg: RunCgroup) -> None:
    if control in policy.allow_missing:
        cg.missing.add(control)
        return
    cg.destroy()
    raise SandboxError(
        f"the namespace sandbox cannot apply {control}: {why}",
        rule=f"sandbox.control.{control}",
        hint=f"run as root on a host with cgroups, use --sandbox docker, or (knowingly) add {control!r} "
        "to the policy's allow_missing",
    )


def _v2(policy: SandboxPolicy, cg: RunCgroup) -> None:
    controllers = set((_ROOT / "cgroup.controllers").read_text(encoding="ascii").split())
    parent = _ROOT / _PARENT
    wanted = [c for c in ("pids", "memory", "cpu") if c in controllers]
    try:
        parent.mkdir(exist_ok=True)
        for c in wanted:  # one at a time: a controller the host cannot delegate must not block the others
            for d in (_ROOT, parent):
                try:
                    _write(d / "cgroup.subtree_control", f"+{c}")
                except OSError:
                    pass  # checked below against the child's cgroup.controllers
        child = parent / f"run-{_owner_part()}-{uuid.uuid4().hex[:12]}"
        child.mkdir()
    except OSError as err:
        _require(policy, "cgroup_pids", f"cannot create a cgroup under {parent}: {err.strerror}", cg)
        _require(policy, "cgroup_memory", f"cannot create a cgroup under {parent}: {err.strerror}", cg)
        _require(policy, "cgroup_cpu", f"cannot create a cgroup under {parent}: {err.strerror}", cg)
        return
    cg.dirs.append(child)
    enabled = set((child / "cgroup.controllers").read_text(encoding="ascii").split())
    if "pids" in enabled:
        _write(child / "pids.max", str(policy.pids_limit))
    else:
        _require(policy, "cgroup_pids", "the pids controller is not available", cg)
    if "memory" in enabled:
        _write(child / "memory.max", str(policy.memory_mib * 1024 * 1024))
        cg.memory_dir = child
        if (child / "memory.swap.max").exists():
            _write(child / "memory.swap.max", "0")
        elif _swap_active():
            _require(policy, "swap_limit", "swap is on but memory.swap.max is missing", cg)
    else:
        _require(policy, "cgroup_memory", "the memory controller is not available", cg)
    if "cpu" in enabled:
        _write(child / "cpu.max", f"{_cpu_quota(policy)} {_CPU_PERIOD_US}")
    else:
        _require(policy, "cgroup_cpu", "the cpu controller is not available", cg)


def _v1(policy: SandboxPolicy, cg: RunCgroup) -> None:
    mounts = _v1_mounts()
    name = f"{_PARENT}-{_owner_part()}-{uuid.uuid4().hex[:12]}"
    if "pids" in mounts:
        try:
            d = mounts["pids"] / name
            d.mkdir()
            cg.dirs.append(d)
            _write(d / "pids.max", str(policy.pids_limit))
        except OSError as err:
            _require(policy, "cgroup_pids", f"cannot create {mounts['pids'] / name}: {err.strerror}", cg)
    else:
        _require(policy, "cgroup_pids", "no cgroup v1 pids hierarchy is mounted", cg)
    if "memory" in mounts:
        try:
            d = mounts["memory"] / name
            d.mkdir()
            cg.dirs.append(d)
            limit = str(policy.memory_mib * 1024 * 1024)
            _write(d / "memory.limit_in_bytes", limit)
            cg.memory_dir = d
        except OSError as err:
            _require(policy, "cgroup_memory", f"cannot create {mounts['memory'] / name}: {err.strerror}", cg)
            return
        memsw = d / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            _write(memsw, limit)
        elif _swap_active():
            _require(policy, "swap_limit", "swap is on but memory.memsw.limit_in_bytes is missing", cg)
    else:
        _require(policy, "cgroup_memory", "no cgroup v1 memory hierarchy is mounted", cg)
    if "cpu" in mounts:
        try:
            d = mounts["cpu"] / name
            d.mkdir()
            cg.dirs.append(d)
            _write(d / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(_cpu_quota(policy)))
        except OSError as err:
            _require(policy, "cgroup_cpu", f"cannot set a CPU quota in {mounts['cpu'] / name}: {err.strerror}", cg)
    else:
        _require(policy, "cgroup_cpu", "no cgroup v1 cpu hierarchy is mounted", cg)


def create_run_cgroup(policy: SandboxPolicy) -> RunCgroup:
    """Create the cgroup(s) for one run with the policy's limits.

    Raises:
        SandboxError: a limit cannot be applied and is not in ``policy.allow_missing``
            (rule ``sandbox.control.<name>``).
    """
    if (_ROOT / "cgroup.controllers").exists():
        cg = RunCgroup(version=2)
        _v2(policy, cg)
    else:
        cg = RunCgroup(version=1)
        _v1(policy, cg)
    return cg


def _run_dirs() -> list[Path]:
    """Every run cgroup directory of secure-run on this host (v2 children, v1 hierarchies)."""
    if (_ROOT / "cgroup.controllers").exists():
        parent = _ROOT / _PARENT
        return sorted(parent.glob("run-*")) if parent.is_dir() else []
    out: list[Path] = []
    for mount in set(_v1_mounts().values()):
        out.extend(sorted(mount.glob(f"{_PARENT}-*")))
    return out


def reap_cgroups() -> list[Path]:
    """Kill and remove the run cgroups whose creating process is gone (left by a killed host)."""
    reaped: list[Path] = []
    version = 2 if (_ROOT / "cgroup.controllers").exists() else 1
    for d in _run_dirs():
        owner = _owner_of(d.name)
        if owner is None or owner_alive(owner):
            continue
        RunCgroup(version=version, dirs=[d]).destroy()
        if not d.exists():
            reaped.append(d)
    return reaped
