"""Probe every sandbox control from INSIDE a real sandbox and judge each one (``sandbox selftest``).

    >>> from secure_run.sandbox import get_backend                      # doctest: +SKIP
    >>> report = run_probes(get_backend("namespace"))
    >>> [(c.name, c.holds) for c in report.controls]
    [('network', True), ('read-only root', True), ...]

:data:`INSIDE_PROBE` is a standard-library-only script run with the sandbox's Python (``python -c
INSIDE_PROBE HOST_PORT``); it records what actually happened for every attempt (``"ok"`` or the
errno name, or a value) as one JSON line. :func:`run_probes` runs it (and a CPU-quota burner and a
wall-clock sleeper) in fresh sandboxes with a small probe policy, with a TCP listener on the host's
127.0.0.1 and a throwaway model file handed over as the runner hands over a verified folder (a
sealed copy through the hand-off socket, no model folder mounted), then :func:`judge` turns the observations
into one :class:`Control` per sandbox control: its expectation, what was observed, and whether it held.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from secure_run.sandbox.backends import Backend, RunResult
from secure_run.sandbox.policy import SandboxPolicy

__all__ = ["CONTROLS", "INSIDE_PROBE", "Control", "ProbeReport", "judge", "probe_policy", "run_probes"]

#: the controls, in table order
CONTROLS: Final = ("network", "read-only root", "sealed model", "noexec scratch", "seccomp", "capabilities",
                   "uid", "pids", "memfd/W+X", "CPU quota", "wall clock")

#: the probe's model file and its content (handed over as a sealed copy; or mounted read-only at /model)
MODEL_FILE: Final = "weights.bin"
MODEL_TEXT: Final = "weights-v1"
#: CPU-quota probe: cores granted and wall seconds burnt; holds below CPU_LIMIT_S of CPU time
CPU_QUOTA: Final = 0.25
CPU_BURN_S: Final = 2.0
CPU_LIMIT_S: Final = 0.9
#: wall-clock probe: the sandbox's limit and the most seconds the host may wait for the kill
WALL_LIMIT_S: Final = 2.0
WALL_SLACK_S: Final = 15.0

#: run inside the sandbox (standard library only); argv[1] is the host listener's port
INSIDE_PROBE: Final[str] = r"""import ctypes
import errno
import json
import os
import resource
import socket
import sys

PORT = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
out = {}


def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as err:
        return errno.errorcode.get(err.errno, str(err.errno))


def syscall(nr, *args):
    ret = libc.syscall(nr, *args)
    if ret == -1:
        raise OSError(ctypes.get_errno(), "syscall")


status = {}
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    status[key] = value.strip()
out["caps"] = {k: status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
out["no_new_privs"] = status["NoNewPrivs"]
out["seccomp"] = status["Seccomp"]
out["uid"], out["euid"], out["gid"], out["egid"] = os.getuid(), os.geteuid(), os.getgid(), os.getegid()
out["groups"] = os.getgroups()
out["interfaces"] = sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:])


def connect(addr, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(addr)
    finally:
        s.close()


out["connect_host_loopback"] = attempt(lambda: connect(("127.0.0.1", PORT)))
out["connect_other_address"] = attempt(lambda: connect(("192.0.2.1", 9)))  # TEST-NET-1: never routed
out["connect_ipv6_loopback"] = attempt(lambda: connect(("::1", PORT), socket.AF_INET6))
out["unix_socket"] = attempt(lambda: socket.socketpair()[0].close())
out["write_root"] = attempt(lambda: open("/secure-run-probe", "w").close())
out["write_etc"] = attempt(lambda: open("/etc/secure-run-probe", "w").close())
out["write_usr"] = attempt(lambda: open("/usr/secure-run-probe", "w").close())
out["mkdir_root"] = attempt(lambda: os.mkdir("/secure-run-probe-dir"))
if os.path.exists("/model/weights.bin"):
    out["model_files"] = sorted(os.listdir("/model"))
    out["write_model_new"] = attempt(lambda: open("/model/new-file", "w").close())
    out["write_model_existing"] = attempt(lambda: open("/model/weights.bin", "r+b").close())
    out["model_read"] = open("/model/weights.bin", "rb").read().decode()
if os.path.exists("/handoff/sealed.sock"):  # the sealed hand-off, received as the worker receives it
    import fcntl
    import mmap

    hs = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hs.settimeout(10)
    hs.connect("/handoff/sealed.sock")
    hs.recv(4096)
    _, fds, _, _ = socket.recv_fds(hs, 4096, 1)
    sealed = fds[0]
    out["sealed_read"] = os.pread(sealed, 4096, 0).decode()
    out["sealed_write"] = attempt(lambda: os.pwrite(sealed, b"x", 0))
    out["sealed_truncate"] = attempt(lambda: os.ftruncate(sealed, 0))
    out["sealed_grow"] = attempt(lambda: os.ftruncate(sealed, 1 << 20))
    out["sealed_mmap_write"] = attempt(
        lambda: mmap.mmap(sealed, 1, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
    out["sealed_unseal"] = attempt(lambda: fcntl.fcntl(sealed, 1033, 0))  # F_ADD_SEALS after F_SEAL_SEAL
    out["write_handoff"] = attempt(lambda: open("/handoff/new-file", "w").close())
    out["model_folder_visible"] = os.path.isdir("/model") and bool(os.listdir("/model"))  # an empty mount point is fine
out["write_tmp"] = attempt(lambda: open("/tmp/probe.txt", "w").write("x"))
with open("/tmp/probe.sh", "w") as f:
    f.write("#!/bin/sh\nexit 0\n")
os.chmod("/tmp/probe.sh", 0o755)


def run_tmp_script():
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/tmp/probe.sh", ["/tmp/probe.sh"])
        except OSError as err:
            os._exit(100 + err.errno)
    _, st = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(st)
    if code >= 100:
        raise OSError(code - 100, "exec")


def in_child(fn):
    # a call that would change this process if it succeeded (ptrace, unshare, mount) runs in a child
    try:
        pid = os.fork()
    except OSError as err:
        return "fork-failed-" + errno.errorcode.get(err.errno, str(err.errno))
    if pid == 0:
        try:
            fn()
        except OSError as err:
            os._exit(100 + err.errno if err.errno < 150 else 99)
        os._exit(0)
    _, st = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(st) if os.WIFEXITED(st) else -1
    if code == 0:
        return "ok"
    return errno.errorcode.get(code - 100, "exit-%d" % code) if code >= 100 else "exit-%d" % code


out["exec_from_tmp"] = attempt(run_tmp_script)
out["setuid_root"] = in_child(lambda: os.setuid(0))
out["unshare_user"] = in_child(lambda: syscall(272, 0x10000000))  # unshare(CLONE_NEWUSER)
out["mount_tmpfs"] = in_child(lambda: syscall(165, b"none", b"/tmp", b"tmpfs", 0, None))
out["ptrace_traceme"] = in_child(lambda: syscall(101, 0, 0, 0, 0))
out["root_mount_options"] = next(line.split()[3] for line in open("/proc/mounts") if line.split()[1] == "/")
out["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
out["core"] = resource.getrlimit(resource.RLIMIT_CORE)
out["pids_visible"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["hostname"] = socket.gethostname()
out["root_entries"] = sorted(os.listdir("/"))
out["home"] = os.environ.get("HOME")
out["env_names"] = sorted(os.environ)


def fork_until_refused(cap=1024):
    r, w = os.pipe()
    kids, error = [], None
    try:
        for _ in range(cap):
            try:
                pid = os.fork()
            except OSError as err:
                error = errno.errorcode.get(err.errno, str(err.errno))
                break
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            kids.append(pid)
    finally:
        os.close(w)
        for pid in kids:
            os.waitpid(pid, 0)
        os.close(r)
    return {"forked": len(kids), "error": error}


out["fork_until_refused"] = fork_until_refused()
import mmap
try:
    os.close(os.memfd_create("x"))
    out["memfd_create"] = "allowed"
except OSError as e:
    out["memfd_create"] = errno.errorcode[e.errno]
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    out["mmap_wx"] = "allowed"
except OSError as e:
    out["mmap_wx"] = errno.errorcode[e.errno]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
addr = libc.mmap(None, 4096, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
out["mmap_rw"] = "allowed" if addr not in (None, ctypes.c_void_p(-1).value) else "failed"
rc = libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(4096), 7)
out["mprotect_wx"] = "allowed" if rc == 0 else errno.errorcode[ctypes.get_errno()]
libc.syscall.restype = ctypes.c_long


def try_execveat():
    # in a child: an allowed execveat replaces the calling process, so the probe must survive it
    pid = os.fork()
    if pid == 0:
        argv = (ctypes.c_char_p * 4)(b"python3", b"-c", b"raise SystemExit(77)", None)
        envp = (ctypes.c_char_p * 1)(None)
        rc = libc.syscall(322, -100, sys.executable.encode(), argv, envp, 0)  # execveat(AT_FDCWD, ...)
        err = ctypes.get_errno() if rc < 0 else 0
        os._exit(min(err, 76) if err else 78)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 77:
        return "allowed"  # the new program ran
    return errno.errorcode.get(code, f"exit {code}")


out["execveat"] = try_execveat()
out["pid_of_program"] = os.getpid()
print(json.dumps(out))
"""

CPU_BURN: Final[str] = (f"import time\nt0, c0 = time.monotonic(), time.process_time()\n"
                        f"while time.monotonic() - t0 < {CPU_BURN_S}: pass\nprint(round(time.process_time() - c0, 3))")


@dataclass(frozen=True)
class Control:
    """One sandbox control: what must hold, what the probe saw inside, and whether it held."""

    name: str
    holds: bool
    expected: str
    observed: str

    def to_json(self) -> dict[str, object]:
        """The control as a JSON object (``sandbox selftest --json``)."""
        return {"control": self.name, "holds": self.holds, "expected": self.expected, "observed": self.observed}


@dataclass(frozen=True)
class ProbeReport:
    """The raw observations and the judged controls of one backend."""

    backend: str
    raw: Mapping[str, Any]
    controls: tuple[Control, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """Whether every control held."""
        return bool(self.controls) and all(c.holds for c in self.controls)


class HostListener:
    """A TCP listener on the host's 127.0.0.1 that counts accepted connections."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def probe_policy(*, gpu: bool = False, model_dir: Path | None = None) -> SandboxPolicy:
    """The small policy the probes run under (the default hardening; pids 64, 2 GiB)."""
    return SandboxPolicy(memory_mib=2048, pids_limit=64, wall_clock_s=120, scratch_mib=16, shm_mib=16,
                         jit_cache_mib=16, gpu=gpu, model_dir=model_dir)


def _py(backend: Backend, policy: SandboxPolicy, code: str, *args: str) -> RunResult:
    return backend.run([*backend.python_argv(), "-c", code, *args], policy)


def _last_json(res: RunResult) -> dict[str, Any] | None:
    if res.exit_code != 0:
        return None
    lines = res.stdout.decode(errors="replace").strip().splitlines()
    try:
        doc = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _tail(res: RunResult) -> str:
    return f"exit {res.exit_code}: " + res.stderr.decode(errors="replace").strip()[-300:]


def run_probes(backend: Backend, *, gpu: bool = False) -> ProbeReport:
    """Run every probe in fresh sandboxes of ``backend`` and judge the controls.

    Three sandboxes run: the inside probe (with a host listener and a sealed model file handed over), a
    CPU burner under a quarter-core quota, and a sleeper under a 2 s wall clock.
    """
    from secure_run.manifests.sealed import seal_folder

    from .handoff import HandoffServer

    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="secure-run-probe-") as d:
        model = Path(d).resolve()
        (model / MODEL_FILE).write_text(MODEL_TEXT)
        with seal_folder(model, [MODEL_FILE]) as sealed, \
                HandoffServer([(c.name, c.fd) for c in sealed.copies()], accept_timeout_s=60) as handoff:
            policy = probe_policy(gpu=gpu).with_overrides(handoff_dir=handoff.mount_dir)
            listener = HostListener()
            try:
                res = _py(backend, policy, INSIDE_PROBE, str(listener.port))
                time.sleep(0.3)  # a connection that got through is accepted by now
                raw["host_listener_accepted"] = listener.accepted
            finally:
                listener.close()
        inside = _last_json(res)
        if inside is None:
            raw["probe_error"] = _tail(res)
        else:
            raw.update(inside)
    burn = _py(backend, probe_policy(gpu=gpu).with_overrides(cpus=CPU_QUOTA), CPU_BURN)
    raw["cpu_seconds"] = float(burn.stdout.decode().split()[-1]) if burn.exit_code == 0 and burn.stdout.split() \
        else _tail(burn)
    t0 = time.monotonic()
    slow = _py(backend, probe_policy(gpu=gpu).with_overrides(wall_clock_s=WALL_LIMIT_S), "import time; time.sleep(600)")
    raw["wall_clock"] = {"timed_out": slow.timed_out, "seconds": round(time.monotonic() - t0, 2)}
    return ProbeReport(backend=backend.name, raw=raw, controls=judge(raw, pids_limit=probe_policy().pids_limit))


# --- judging ---------------------------------------------------------------------------------------

_Check = Callable[[Mapping[str, Any], int], tuple[bool, str]]


def _refused(raw: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[bool, str]:
    values = {k: raw.get(k) for k in keys}
    # refused means an errno name (EPERM, EROFS, ...); "ok", "allowed", "fork-failed-..." do not count
    holds = all(isinstance(v, str) and v.startswith("E") for v in values.values())
    return holds, ", ".join(f"{k}={v}" for k, v in values.items())


def _network(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    held, seen = _refused(raw, ("connect_host_loopback", "connect_other_address", "connect_ipv6_loopback"))
    ifaces = raw.get("interfaces")
    accepted = raw.get("host_listener_accepted")
    holds = held and ifaces == ["lo"] and accepted == 0
    return holds, f"interfaces={ifaces}, {seen}, host listener accepted {accepted}"


def _root(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    held, seen = _refused(raw, ("write_root", "write_etc", "write_usr", "mkdir_root"))
    opts = raw.get("root_mount_options")
    first = opts.split(",")[0] if isinstance(opts, str) else None
    return held and first == "ro", f"{seen}, / mounted {first}"


def _sealed(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    held, seen = _refused(raw, ("sealed_write", "sealed_truncate", "sealed_grow", "sealed_mmap_write", "sealed_unseal"))
    read = raw.get("sealed_read")
    visible = raw.get("model_folder_visible")
    handoff = raw.get("write_handoff")
    return (held and read == MODEL_TEXT and visible is False and handoff == "EROFS",
            f"{seen}, read back {read!r}, /model visible={visible}, write_handoff={handoff}")


def _scratch(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    held, seen = _refused(raw, ("exec_from_tmp",))
    return held and raw.get("write_tmp") == "ok", f"write_tmp={raw.get('write_tmp')}, {seen}"


def _seccomp(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    held, seen = _refused(raw, ("ptrace_traceme", "unshare_user", "mount_tmpfs"))
    mode = raw.get("seccomp")
    return held and mode == "2", f"Seccomp mode {mode}, {seen}"


def _caps(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    caps = raw.get("caps")
    nnp = raw.get("no_new_privs")
    if not isinstance(caps, dict) or not caps:
        return False, f"caps={caps}"
    zero = all(isinstance(v, str) and int(v, 16) == 0 for v in caps.values())
    nonzero = [k for k, v in caps.items() if not (isinstance(v, str) and int(v, 16) == 0)]
    return zero and nnp == "1", ("all capability sets empty" if zero else f"non-empty: {nonzero}") + \
        f", NoNewPrivs {nnp}"


def _uid(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    ids = [raw.get(k) for k in ("uid", "euid", "gid", "egid")]
    held, seen = _refused(raw, ("setuid_root",))
    holds = held and all(isinstance(i, int) and i != 0 for i in ids)
    return holds, f"uid/euid/gid/egid={'/'.join(str(i) for i in ids)}, {seen}"


def _pids_check(raw: Mapping[str, Any], pids_limit: int) -> tuple[bool, str]:
    fork = raw.get("fork_until_refused")
    visible = raw.get("pids_visible")
    pid = raw.get("pid_of_program")
    if not isinstance(fork, dict) or not isinstance(visible, list):
        return False, f"fork probe: {fork}"
    forked, error = fork.get("forked"), fork.get("error")
    holds = error is not None and isinstance(forked, int) and forked < pids_limit and len(visible) <= 3 and pid != 1
    return holds, f"fork refused ({error}) after {forked} children (limit {pids_limit}), " \
                  f"{len(visible)} pids visible, program pid {pid}"


def _native(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    held, seen = _refused(raw, ("memfd_create", "mmap_wx", "mprotect_wx", "execveat"))
    return held and raw.get("mmap_rw") == "allowed", seen


def _cpu(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    used = raw.get("cpu_seconds")
    if not isinstance(used, float):
        return False, f"CPU burner failed: {used}"
    return used < CPU_LIMIT_S, f"{used:.2f} CPU s in {CPU_BURN_S:g} s at {CPU_QUOTA} cores"


def _wall(raw: Mapping[str, Any], _pids: int) -> tuple[bool, str]:
    w = raw.get("wall_clock")
    if not isinstance(w, dict):
        return False, f"wall clock probe: {w}"
    secs = w.get("seconds")
    holds = w.get("timed_out") is True and isinstance(secs, float | int) and secs < WALL_LIMIT_S + WALL_SLACK_S
    return holds, f"killed={w.get('timed_out')} after {secs} s"


_RULES: Final[dict[str, tuple[str, _Check]]] = {
    "network": ("only lo; host 127.0.0.1, ::1 and other addresses unreachable", _network),
    "read-only root": ("writes to /, /etc, /usr refused; / mounted ro", _root),
    "sealed model": ("no model folder; the sealed copy handed over reads back, and every write, resize, "
                     "writable map or unseal is refused; /handoff read-only", _sealed),
    "noexec scratch": ("/tmp writable, exec from it refused", _scratch),
    "seccomp": ("filter mode 2; ptrace, unshare, mount refused", _seccomp),
    "capabilities": ("every capability set empty; no_new_privs", _caps),
    "uid": ("non-root uid and gid; setuid(0) refused", _uid),
    "pids": ("own pid namespace; fork refused at the pids limit", _pids_check),
    "memfd/W+X": ("memfd_create, W+X mmap/mprotect, execveat refused", _native),
    "CPU quota": (f"under {CPU_LIMIT_S} CPU s in {CPU_BURN_S:g} s at {CPU_QUOTA} cores", _cpu),
    "wall clock": (f"killed at its {WALL_LIMIT_S:g} s limit", _wall),
}


def judge(raw: Mapping[str, Any], *, pids_limit: int) -> tuple[Control, ...]:
    """One :class:`Control` per entry of :data:`CONTROLS`, judged from the probe's observations."""
    out = []
    for name in CONTROLS:
        expected, check = _RULES[name]
        try:
            holds, observed = check(raw, pids_limit)
        except (TypeError, ValueError) as err:  # an observation of the wrong shape never passes
            holds, observed = False, f"unreadable observation: {err}"
        if "probe_error" in raw and name not in ("CPU quota", "wall clock"):
            observed = f"{observed} (probe failed: {raw['probe_error']})"
        out.append(Control(name=name, holds=holds, expected=expected, observed=observed))
    return tuple(out)
