"""Namespace sandbox launcher (standard library only; started by the host as root).

``python -S -E nsinit.py CONFIG_FD STATUS_FD``: reads one JSON config from CONFIG_FD (written by
``namespace_backend.py``), reports progress as JSON lines on STATUS_FD, and keeps stdin, stdout
and stderr for the sandboxed program. Three processes:

1. **launcher** (host namespaces, root): joins the run's cgroups, forks 2, writes 2's uid/gid
   maps (identity maps of 0, which the setup runs as, and of the sandbox uid/gid; nothing else),
   relays 2's exit status.
2. **holder** (new user namespace): ``unshare(USER|NS|PID|NET|IPC|UTS|CGROUP)``, waits for its
   maps, forks 3 (pid 1 of the new pid namespace) and waits for it.
3. **init** (pid 1, and it stays pid 1): private mounts; a fresh tmpfs root with read-only binds of the runtime
   (``/usr``, the Python installation, site-packages), a copy of our code, the model folder
   read-only at ``/model``, tmpfs ``/tmp`` (noexec), a minimal ``/dev``, new ``/proc``; then
   ``pivot_root``, detach the old root, remount ``/`` read-only, set the hostname and rlimits,
   and fork the program: ``setpriv`` (non-root uid/gid, no groups, no capabilities in any set,
   no_new_privs) -> ``seccomp_exec.py`` (loads the BPF filter) -> the program. pid 1 then only
   supervises: it forwards SIGTERM/SIGINT/SIGHUP to the program (SIGKILL for all after 5 s),
   reaps orphans, kills everything when the program exits, and at the wall-clock limit kills
   everything and exits 124, so the sandbox is bounded in time even if the host is gone.

Killing pid 1 (the host does that on timeout) kills every process of the sandbox. The network
namespace has only ``lo`` (down). Any failure before the exec is reported on STATUS_FD as
``{"event": "error", "control": ..., "message": ...}`` and exit status 125.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
SYS_PIVOT_ROOT = 155
SYS_MOUNT_SETATTR = 442
PR_SET_PDEATHSIG = 1
SETUP_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """A sandbox control could not be applied."""

    def __init__(self, control: str, message: str) -> None:
        super().__init__(message)
        self.control = control
        self.message = message


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret: int, control: str, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(control, f"{what}: {os.strerror(err)} (errno {err})")


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None, control: str) -> None:
    """mount(2), raising SetupError naming ``control``."""
    ret = _libc.mount(_b(src), _b(dst), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(ret, control, f"mount {src or fstype} on {dst}")


def set_attrs(path: str, attrs: int, control: str, recursive: bool = True) -> None:
    """mount_setattr(2): make the mount at ``path`` (and below) read-only / nosuid / nodev / noexec."""
    attr = _MountAttr(attrs, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    ret = _libc.syscall(SYS_MOUNT_SETATTR, ctypes.c_int(AT_FDCWD), _b(path), ctypes.c_uint(flags),
                        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(ret, control, f"mount_setattr {path}")


def _status(fd: int, **event: Any) -> None:
    os.write(fd, (json.dumps(event) + "\n").encode())


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _touch(path: str) -> None:
    _mkdirs(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)


def _write_file(path: str, data: bytes, mode: int) -> None:
    _mkdirs(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _copy_tree(src: str, dst: str, suffixes: list[str]) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        rel = os.path.relpath(dirpath, src)
        target = os.path.normpath(os.path.join(dst, rel))
        _mkdirs(target)
        for name in sorted(filenames):
            if not any(name.endswith(s) for s in suffixes):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                _write_file(os.path.join(target, name), f.read(), 0o644)


def _bind(src: str, rel_dst: str, root: str, *, exec_ok: bool, control: str, is_file: bool = False,
          dev_ok: bool = False) -> None:
    dst = root + rel_dst
    if is_file:
        _touch(dst)
    else:
        _mkdirs(dst)
    mount(src, dst, None, MS_BIND | (0 if is_file else MS_REC), None, control)
    attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | (0 if dev_ok else MOUNT_ATTR_NODEV)
    if not exec_ok:
        attrs |= MOUNT_ATTR_NOEXEC
    set_attrs(dst, attrs, control, recursive=not is_file)


def _tmpfs(rel_dst: str, root: str, size_mib: int, *, exec_ok: bool, mode: str, control: str) -> None:
    dst = root + rel_dst
    _mkdirs(dst)
    flags = MS_NOSUID | MS_NODEV | (0 if exec_ok else MS_NOEXEC)
    mount("tmpfs", dst, "tmpfs", flags, f"size={size_mib}m,mode={mode}", control)


def build_root(cfg: dict[str, Any]) -> None:
    """Populate the new root (runs as pid 1, before pivot_root)."""
    root: str = cfg["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE, None, "mount_namespace")
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=0755", "read_only_root")
    for link in cfg["symlinks"]:
        os.symlink(link["target"], root + link["path"])
    for b in cfg["binds"]:
        _bind(b["src"], b["dst"], root, exec_ok=b["exec"], control=b["control"], is_file=bool(b.get("file")))
    for hidden in cfg["hide"]:
        if os.path.isdir(root + hidden):
            mount("tmpfs", root + hidden, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555",
                  "read_only_root")
    for tree in cfg["copy_trees"]:
        _copy_tree(tree["src"], root + tree["dst"], tree["suffixes"])
    for f in cfg["files"]:
        _write_file(root + f["path"], bytes.fromhex(f["hex"]), int(f["mode"]))
    for t in cfg["tmpfs"]:
        _tmpfs(t["dst"], root, t["size_mib"], exec_ok=t["exec"], mode=t["mode"], control=t["control"])
    # /dev: a small tmpfs holding bind mounts of a few device nodes (and the GPU's when asked)
    _tmpfs("/dev", root, 1, exec_ok=False, mode="0755", control="read_only_root")
    os.chmod(root + "/dev", 0o755)
    for node in cfg["devices"]:
        _bind(node, node, root, exec_ok=False, control=cfg["device_control"], is_file=True, dev_ok=True)
    _tmpfs("/dev/shm", root, cfg["shm_mib"], exec_ok=False, mode="1777", control="shm")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    _mkdirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None, "pid_namespace")
    mask_proc(root + "/proc")
    _mkdirs(root + "/sys")
    try:
        mount("sysfs", root + "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None, "sysfs")
    except SetupError:
        return  # /sys is a convenience (CPU topology); without it the directory stays empty
    for hidden in _SYS_MASKED_DIRS:  # firmware tables (ACPI, DMI, EFI variables) are the host's business
        if os.path.isdir(f"{root}/sys/{hidden}"):
            mount("tmpfs", f"{root}/sys/{hidden}", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "size=4k,mode=0555", "sysfs")


_SYS_MASKED_DIRS = ("firmware", "kernel/security", "kernel/debug", "fs/cgroup", "power")
_PROC_MASKED_FILES = ("kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug", "sysrq-trigger")
_PROC_MASKED_DIRS = ("acpi", "asound", "scsi")
_PROC_READ_ONLY = ("bus", "fs", "irq", "sys")


def mask_proc(proc: str) -> None:
    """Hide what Docker hides in /proc: kernel memory and timers, sysrq, and make sys/bus/fs/irq read-only."""
    for name in _PROC_MASKED_FILES:
        if os.path.isfile(f"{proc}/{name}"):
            mount("/dev/null", f"{proc}/{name}", None, MS_BIND, None, "proc_mask")
            set_attrs(f"{proc}/{name}", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, "proc_mask",
                      recursive=False)
    for name in _PROC_MASKED_DIRS:
        if os.path.isdir(f"{proc}/{name}"):
            mount("tmpfs", f"{proc}/{name}", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k",
                  "proc_mask")
    for name in _PROC_READ_ONLY:
        if os.path.isdir(f"{proc}/{name}"):
            mount(f"{proc}/{name}", f"{proc}/{name}", None, MS_BIND | MS_REC, None, "proc_mask")
            set_attrs(f"{proc}/{name}", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                      "proc_mask")


def enter_root(root: str) -> None:
    """pivot_root into ``root``, drop the old root, make ``/`` read-only."""
    old = root + "/.old-root"
    _mkdirs(old)
    ret = _libc.syscall(SYS_PIVOT_ROOT, _b(root), _b(old))
    _check(ret, "read_only_root", "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old-root", MNT_DETACH), "read_only_root", "detach the old root")
    os.rmdir("/.old-root")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None, "read_only_root")


def _init(cfg: dict[str, Any], status_fd: int) -> None:
    """pid 1: build the root, then run setpriv -> seccomp loader -> program as its child. Never returns."""
    import resource

    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the sandbox dies with its holder
    try:
        build_root(cfg)
        enter_root(cfg["root"])
        name = cfg["hostname"].encode()
        _check(_libc.sethostname(name, ctypes.c_size_t(len(name))), "uts_namespace", "sethostname")
        for res, value in ((resource.RLIMIT_NOFILE, cfg["nofile"]), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (value, value))
        if cfg["nproc"]:
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
        os.chdir(cfg["cwd"])
    except SetupError as err:
        _status(status_fd, event="error", control=err.control, message=err.message)
        os._exit(SETUP_FAILED)
    except OSError as err:
        _status(status_fd, event="error", control="setup", message=str(err))
        os._exit(SETUP_FAILED)
    uid, gid = str(cfg["uid"]), str(cfg["gid"])
    argv = [cfg["setpriv"], f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--", cfg["python"], "-S", "-E", cfg["seccomp_exec"],
            cfg["seccomp_filter"], *cfg["argv"]]
    child = os.fork()
    if child == 0:
        os.setsid()
        try:
            os.execve(argv[0], argv, cfg["env"])
        except OSError as err:
            _status(status_fd, event="error", control="setpriv", message=f"exec {argv[0]}: {err.strerror}")
        os._exit(SETUP_FAILED)
    os.close(status_fd)
    os._exit(_supervise(child, float(cfg["wall_clock_s"])))


#: Seconds between a forwarded SIGTERM/SIGINT/SIGHUP and SIGKILL for everything.
TERM_GRACE_S = 5.0
EXIT_TIMEOUT = 124


def _supervise(child: int, wall_clock_s: float) -> int:
    """pid 1's loop: forward termination signals, reap orphans, enforce the wall clock; the child's status."""
    import time

    deadline = time.monotonic() + wall_clock_s
    term_deadline: list[float] = []
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # pid 1 holds none of the sandbox's streams (EOF comes when the program ends)
        os.dup2(null, fd)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass
        if not term_deadline:
            term_deadline.append(time.monotonic() + TERM_GRACE_S)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        now = time.monotonic()
        if now >= deadline or (term_deadline and now >= term_deadline[0]):
            _kill_everything()
            return EXIT_TIMEOUT if now >= deadline else 128 + signal.SIGTERM
        try:
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                if pid == child:
                    _kill_everything()  # nothing outlives the program
                    return _exit_code(status)
        except ChildProcessError:
            return 0
        time.sleep(0.02)


def _kill_everything() -> None:
    try:
        os.kill(-1, signal.SIGKILL)  # as pid 1 of the namespace: every other process in it
    except ProcessLookupError:
        pass


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _holder(cfg: dict[str, Any], status_fd: int, to_parent: int, from_parent: int) -> None:
    """Process 2: new namespaces, then fork pid 1 and wait for it. Never returns."""
    try:
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
        _check(_libc.unshare(ctypes.c_int(flags)), "user_namespace", "unshare")
    except SetupError as err:
        _status(status_fd, event="error", control=err.control, message=err.message)
        os._exit(SETUP_FAILED)
    os.write(to_parent, b"U")
    if os.read(from_parent, 1) != b"M":
        os._exit(SETUP_FAILED)
    pid = os.fork()
    if pid == 0:
        _init(cfg, status_fd)
    _status(status_fd, event="started", pid=pid)
    os.close(status_fd)
    _, status = os.waitpid(pid, 0)
    os._exit(_exit_code(status))


def _launcher(cfg: dict[str, Any], status_fd: int) -> int:
    """Process 1: cgroups, fork the holder, map its ids, relay its exit status."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for procs in cfg["cgroup_procs"]:
        try:
            with open(procs, "w", encoding="ascii") as f:
                f.write("0")
        except OSError as err:
            _status(status_fd, event="error", control="cgroup", message=f"join {procs}: {err.strerror}")
            return SETUP_FAILED
    c2p_r, c2p_w = os.pipe()
    p2c_r, p2c_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(c2p_r)
        os.close(p2c_w)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _holder(cfg, status_fd, c2p_w, p2c_r)
    os.close(c2p_w)
    os.close(p2c_r)
    if os.read(c2p_r, 1) == b"U":
        try:
            for kind, ident in (("uid_map", cfg["uid"]), ("gid_map", cfg["gid"])):
                with open(f"/proc/{pid}/{kind}", "w", encoding="ascii") as f:
                    f.write(f"0 0 1\n{ident} {ident} 1\n")
            os.write(p2c_w, b"M")
        except OSError as err:
            _status(status_fd, event="error", control="user_namespace", message=f"id maps: {err.strerror}")
            os.kill(pid, signal.SIGKILL)
    os.close(p2c_w)
    os.close(status_fd)
    _, status = os.waitpid(pid, 0)
    return _exit_code(status)


def main(argv: list[str]) -> int:
    """Read the config and run the launcher."""
    cfg_fd, status_fd = int(argv[1]), int(argv[2])
    with os.fdopen(cfg_fd, "rb") as f:
        cfg = json.loads(f.read())
    os.set_inheritable(status_fd, False)
    return _launcher(cfg, status_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
