"""The namespace backend: unshare + setpriv + our seccomp filter + a cgroup, for hosts without Docker.

The host side (this module) checks the host, creates the run's cgroup, writes the launch
config, and starts ``nsinit.py`` (standard library only) as root; see that module for the
process structure inside. The sandbox sees:

* of the host's ``/usr`` only the libraries (``/usr/lib*``), the interpreter and ``setpriv`` (and,
  with ``policy.gpu``, the C toolchain and headers Triton compiles its launcher with); the Python
  installation; and the site-packages directories that hold the worker's distributions (as
  ``/opt/secure-run/site<N>``), never ``$PYTHONPATH`` entries as such; all read-only (nosuid,
  nodev); the base interpreter's own site-packages is hidden;
* a copy of our code at ``/opt/secure-run/code``; ``/etc`` with only passwd, group, hosts,
  nsswitch.conf and ld.so.cache;
* the model folder read-only (noexec) at ``/model``; tmpfs ``/tmp`` (noexec) and ``/dev/shm``;
  ``/dev`` with null, zero, full, random, urandom (and ``/dev/nvidia*`` when ``policy.gpu``);
* a new ``/proc`` of its own pid namespace; ``/sys`` read-only without ``/sys/firmware``; a
  network namespace with only ``lo`` (down).

pid 1 of the sandbox is ``nsinit`` itself, not the program: it forwards SIGTERM/SIGINT/SIGHUP,
kills everything at ``policy.wall_clock_s`` on its own (exit 124) and dies with its launcher.
Temporary roots and cgroups carry their creator's pid and start time; the next start removes
those whose creator is gone (:func:`reap_leftovers`).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from secure_run.errors import SandboxError

from ..backends import STDERR, STDOUT, Backend, Outcome, SandboxRun
from ..errors import GpuUnavailable
from ..policy import HANDOFF_MOUNT, JIT_CACHE_MOUNT, MODEL_MOUNT, SCRATCH_MOUNT, SandboxPolicy
from . import cgroups
from .image import WORKER_DISTRIBUTIONS
from .layout import CODE_DIR, OPT, code_packages, sandbox_env
from .owner import owner_alive, owner_token
from .seccomp import compile_bpf, load_profile

__all__ = ["NamespaceBackend", "covered", "reap_leftovers", "runtime_layout", "worker_site_dirs"]

NSINIT = Path(__file__).with_name("nsinit.py")
SECCOMP_EXEC = f"{CODE_DIR}/secure_run/sandbox/_internal/seccomp_exec.py"
SECCOMP_FILTER = f"{OPT}/seccomp.bpf"
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_ETC = {
    "/etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "/etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}


def _refuse(control: str, message: str, hint: str) -> SandboxError:
    return SandboxError(f"the namespace sandbox cannot apply {control}: {message}", rule=f"sandbox.control.{control}",
                        hint=hint)


def _gpu_nodes() -> list[str]:
    nodes = sorted(str(p) for p in Path("/dev").glob("nvidia*") if p.is_char_device())
    caps = Path("/dev/nvidia-caps")
    if caps.is_dir():
        nodes += sorted(str(p) for p in caps.iterdir() if p.is_char_device())
    return nodes


_DRIVER_DIRS = ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64",
                "/usr/lib")


def _gpu_library_dirs() -> list[str]:
    """Directories holding the NVIDIA driver's libcuda (host LD_LIBRARY_PATH first, then the usual places)."""
    out: list[str] = []
    for d in [*os.environ.get("LD_LIBRARY_PATH", "").split(":"), *_DRIVER_DIRS]:
        if d and os.path.isdir(d) and any(Path(d).glob("libcuda.so*")):
            real = os.path.realpath(d)
            if real not in out:
                out.append(real)
    return out


#: Extra distributions the worker imports on a GPU host (Triton compiles the kernels).
GPU_DISTRIBUTIONS = ("triton",)
_NEVER_SITE = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root",
                         "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/lib", "/usr/local", "/var"})


def worker_site_dirs(*, gpu: bool = False) -> list[str]:
    """The site-packages directories that hold the worker's distributions (and nothing chosen by $PYTHONPATH).

    Each directory is where a distribution of :data:`WORKER_DISTRIBUTIONS` (plus Triton for
    ``gpu``) is installed, found through its metadata; a directory such as ``/`` or ``/usr`` is
    refused whatever put it on ``sys.path``.

    Raises:
        SandboxError: a distribution is missing, or lives in a system directory (rule
            ``sandbox.control.read_only_root``).
    """
    import importlib.metadata

    names = [*WORKER_DISTRIBUTIONS, *(GPU_DISTRIBUTIONS if gpu else ())]
    out: list[str] = []
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if name in GPU_DISTRIBUTIONS:
                continue  # without Triton the worker uses the PyTorch reference path
            raise _refuse("read_only_root", f"the worker's distribution {name!r} is not installed",
                          "run scripts/bootstrap (or install secure-run with its dependencies)") from None
        real = os.path.realpath(str(dist.locate_file("")))
        if real in _NEVER_SITE or not os.path.isdir(real):
            raise _refuse("read_only_root", f"the distribution {name!r} is installed in {real!r}, which cannot be "
                          "mounted into the sandbox", "install the worker's packages into a virtual environment")
        if real not in out:
            out.append(real)
    return out


_TOOLCHAIN = re.compile(r"^(gcc|cc|c\+\+|g\+\+|as|ld|ld\.bfd|ld\.gold|x86_64-linux-gnu-(gcc|g\+\+|as|ld)\S*|"
                        r"gcc-\d+|g\+\+-\d+)$")


def runtime_layout(python: str, programs: list[str], *, gpu: bool) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Read-only binds (and root symlinks) that give a sandbox the host's runtime, and no more of the host.

    Of ``/usr`` only the library folders, ``python`` and ``programs`` (each bound alone), and with
    ``gpu`` the C toolchain, ``/usr/libexec`` and ``/usr/include`` (Triton compiles its launcher);
    the Python installation when it lives outside ``/usr/lib``; ``/lib*`` folders (or their
    merged-``/usr`` symlinks). Never ``/usr/share``, ``/usr/sbin``, ``/usr/local`` as a whole or a
    real ``/bin``/``/sbin`` full of host programs. Used by the namespace backend and by the docker
    backend's ``host`` runtime.

    Returns (binds, symlinks): binds as ``{"src", "dst", "exec", "control", "file"?}``, symlinks as
    ``{"path", "target"}``.
    """
    binds: list[dict[str, Any]] = []
    for d in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32"):
        if os.path.isdir(d) and not os.path.islink(d):
            binds.append({"src": d, "dst": d, "exec": True, "control": "read_only_root"})
    if gpu:
        for d in ("/usr/libexec", "/usr/include"):
            if os.path.isdir(d):
                binds.append({"src": d, "dst": d, "exec": True, "control": "read_only_root"})
    files = {python, *programs}
    if gpu and os.path.isdir("/usr/bin"):
        for entry in sorted(os.listdir("/usr/bin")):
            if _TOOLCHAIN.match(entry):
                files.add(f"/usr/bin/{entry}")
    for path in sorted(files):
        if not path or path.startswith(("/usr/lib/", "/usr/lib64/")):
            continue  # already inside a bound library folder
        real = os.path.realpath(path)
        if os.path.isfile(real):
            binds.append({"src": real, "dst": path, "exec": True, "control": "read_only_root", "file": True})
    prefix = os.path.realpath(sys.base_prefix)
    if prefix != "/usr" and not prefix.startswith("/usr/lib"):
        # the interpreter's installation (stdlib; e.g. /usr/local or a pyenv build), read-only
        src = f"{prefix}/lib" if prefix.startswith("/usr/") else prefix
        if os.path.isdir(src):
            binds.append({"src": src, "dst": src, "exec": True, "control": "read_only_root"})
    symlinks: list[dict[str, str]] = []
    for name in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(name):
            symlinks.append({"path": name, "target": os.readlink(name)})
        elif os.path.isdir(name) and name.startswith("/lib"):
            binds.append({"src": name, "dst": name, "exec": True, "control": "read_only_root"})
        # a real /bin or /sbin (no merged /usr) holds host programs: not mounted
    return binds, symlinks


def covered(path: str, folders: list[str]) -> bool:
    """Whether ``path`` is one of ``folders`` or lies inside one of them."""
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


#: Prefix of the temporary root folders; the owner's pid and start time follow.
ROOT_PREFIX = "secure-run-root-"
_ROOT_NAME = re.compile(r"^secure-run-root-(\d+)-(\d+)-")


def reap_leftovers() -> dict[str, list[str]]:
    """Remove temporary roots and cgroups left by a namespace sandbox whose host process was killed.

    A root folder is removed only when empty (after the run it is an empty mount point on the
    host); cgroups are killed and removed. Runs of live processes are never touched.
    """
    removed_roots: list[str] = []
    tmp = tempfile.gettempdir()
    boot = owner_token().split(":")[0]
    try:
        names = os.listdir(tmp)
    except OSError:
        names = []
    for name in names:
        m = _ROOT_NAME.match(name)
        if m is None or owner_alive(f"{boot}:{m.group(1)}:{m.group(2)}"):
            continue
        try:
            os.rmdir(os.path.join(tmp, name))
            removed_roots.append(name)
        except OSError:
            continue
    return {"roots": removed_roots, "cgroups": [str(p) for p in cgroups.reap_cgroups()]}


class NamespaceBackend(Backend):
    """unshare/setpriv/seccomp/cgroup sandbox (needs root; Linux x86_64)."""

    name = "namespace"

    def __init__(self) -> None:
        self.python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        self.base_prefix = os.path.realpath(sys.base_prefix)
        self.setpriv = shutil.which("setpriv") or ""

    def python_argv(self) -> list[str]:
        """The base interpreter, without ``site`` (only PYTHONPATH and the standard library)."""
        return [self.python, "-S"]

    def _check_host(self) -> None:
        if sys.platform != "linux" or os.uname().machine != "x86_64":
            raise _refuse("seccomp", f"only Linux x86_64 is supported, this is {sys.platform}/{os.uname().machine}",
                          "use the docker backend")
        if os.geteuid() != 0:
            raise _refuse("user_namespace", "the launcher must run as root (it maps the sandbox uid and "
                          "creates cgroups)", "run as root, or use --sandbox docker")
        if not self.setpriv or not os.path.realpath(self.setpriv).startswith("/usr/"):
            raise _refuse("capabilities", "setpriv (util-linux) was not found under /usr",
                          "install util-linux, or use --sandbox docker")

    def _layout(self, policy: SandboxPolicy, root: str) -> dict[str, Any]:
        binds, symlinks = runtime_layout(self.python, [os.path.realpath(self.setpriv)], gpu=policy.gpu)
        sites = worker_site_dirs(gpu=policy.gpu)
        site_paths = [f"{OPT}/site{i}" for i in range(len(sites))]
        for src, dst in zip(sites, site_paths):
            binds.append({"src": src, "dst": dst, "exec": True, "control": "read_only_root"})
        if policy.model_dir is not None:
            binds.append({"src": str(policy.model_dir), "dst": MODEL_MOUNT, "exec": False, "control": "model_mount"})
        if policy.handoff_dir is not None:
            binds.append({"src": str(policy.handoff_dir), "dst": HANDOFF_MOUNT, "exec": False, "control": "model_mount"})
        stdlib_site = sysconfig.get_path("purelib", vars={"base": self.base_prefix, "platbase": self.base_prefix})
        hide = [os.path.realpath(stdlib_site)] if os.path.realpath(stdlib_site) not in sites else []
        files = {**_ETC,
                 "/etc/passwd": f"root:x:0:0::/:/bin/false\nsandbox:x:{policy.uid}:{policy.gid}::{SCRATCH_MOUNT}:/bin/false\n",
                 "/etc/group": f"root:x:0:\nsandbox:x:{policy.gid}:\n"}
        blobs = [{"path": p, "hex": t.encode().hex(), "mode": 0o644} for p, t in files.items()]
        if os.path.isfile("/etc/ld.so.cache"):
            blobs.append({"path": "/etc/ld.so.cache", "hex": Path("/etc/ld.so.cache").read_bytes().hex(), "mode": 0o644})
        blobs.append({"path": SECCOMP_FILTER, "hex": compile_bpf(load_profile()).hex(), "mode": 0o644})
        tmpfs = [{"dst": SCRATCH_MOUNT, "size_mib": policy.scratch_mib, "exec": False, "mode": "1777",
                  "control": "scratch"}]
        if policy.jit_cache_mib:
            tmpfs.append({"dst": JIT_CACHE_MOUNT, "size_mib": policy.jit_cache_mib, "exec": True, "mode": "1777",
                          "control": "jit_cache"})
        devices = list(_DEVICES)
        backend_env: dict[str, str] = {}
        if policy.gpu:
            gpu = _gpu_nodes()
            if not any(n.startswith("/dev/nvidia") and n[11:].isdigit() for n in gpu):
                raise GpuUnavailable("no /dev/nvidia<N> device node on this host", backend="namespace")
            devices += gpu
            libdirs = _gpu_library_dirs()
            if not libdirs:
                raise GpuUnavailable("the NVIDIA driver library libcuda.so was not found", backend="namespace")
            bound = [b["dst"] for b in binds if not b.get("file")]
            for d in libdirs:
                if not covered(d, bound):  # e.g. /usr/local/nvidia/lib64 (no longer inside a whole-/usr bind)
                    binds.append({"src": d, "dst": d, "exec": True, "control": "gpu"})
            backend_env = {"LD_LIBRARY_PATH": ":".join(libdirs), "TRITON_LIBCUDA_PATH": libdirs[0]}
        copy_trees = [{"src": str(p.src), "dst": p.dst, "suffixes": [".py"]} for p in code_packages()]
        return {
            "root": root,
            "binds": binds,
            "symlinks": symlinks,
            "hide": hide,
            "copy_trees": copy_trees,
            "files": blobs,
            "tmpfs": tmpfs,
            "devices": devices,
            "device_control": "gpu" if policy.gpu else "devices",
            "shm_mib": policy.shm_mib,
            "hostname": "sandbox",
            "nofile": policy.nofile,
            "wall_clock_s": policy.wall_clock_s,
            "uid": policy.uid,
            "gid": policy.gid,
            "cwd": SCRATCH_MOUNT,
            "setpriv": os.path.realpath(self.setpriv),
            "python": self.python,
            "seccomp_exec": SECCOMP_EXEC,
            "seccomp_filter": SECCOMP_FILTER,
            "env": sandbox_env(policy, site_paths, backend_env=backend_env),
        }

    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"",
              keep_stdin_open: bool = False) -> SandboxRun:
        """Start ``argv`` in a new namespace sandbox."""
        if policy.seccomp != "secure-run":
            raise _refuse("seccomp", f"profile {policy.seccomp!r} is only available with docker",
                          "use seccomp='secure-run' (the default)")
        self._check_host()
        reap_leftovers()
        _, pid, ticks = owner_token().split(":")
        root = tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{pid}-{ticks}-")
        try:
            cfg = self._layout(policy, root)
            cg = cgroups.create_run_cgroup(policy)
        except BaseException:
            os.rmdir(root)
            raise
        cfg["cgroup_procs"] = cg.procs_files
        cfg["nproc"] = policy.pids_limit if "cgroup_pids" in cg.missing else 0
        cfg["argv"] = list(argv)
        return _NamespaceRun(policy, cfg, cg, stdin, keep_stdin_open=keep_stdin_open)


class _NamespaceRun(SandboxRun):
    def __init__(self, policy: SandboxPolicy, cfg: dict[str, Any], cg: cgroups.RunCgroup, stdin: bytes, *,
                 keep_stdin_open: bool = False) -> None:
        super().__init__(policy)
        self.cg = cg
        self.root = cfg["root"]
        self.pid1: int | None = None
        self.setup_error: dict[str, str] | None = None
        self._outcome = None
        cfg_r, cfg_w = os.pipe()
        st_r, st_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-E", "-B", str(NSINIT), str(cfg_r), str(st_w)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(cfg_r, st_w), close_fds=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                start_new_session=True,
            )
        except BaseException:
            for fd in (cfg_r, cfg_w, st_r, st_w):
                os.close(fd)
            cg.destroy()
            os.rmdir(self.root)
            raise
        os.close(cfg_r)
        os.close(st_w)
        self.status_fd = st_r
        with os.fdopen(cfg_w, "wb") as f:
            f.write(json.dumps(cfg).encode())
        self._stdin_lock = threading.Lock()
        self._keep_stdin_open = keep_stdin_open
        self._writer = threading.Thread(target=self._feed_stdin, args=(stdin,), daemon=True)
        self._writer.start()

    def _feed_stdin(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            with self._stdin_lock:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass
        finally:
            if not self._keep_stdin_open:
                self.close_stdin()

    def write_stdin(self, data: bytes) -> None:
        """Write ``data`` to the sandbox's stdin (after what was given at start)."""
        self._writer.join()  # the initial data goes first
        assert self.proc.stdin is not None
        with self._stdin_lock:
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError) as err:
                raise SandboxError(f"could not write to the sandbox: {err}", rule="sandbox.stdin",
                                   hint="the sandbox has ended; start a new one") from None

    def close_stdin(self) -> None:
        """EOF on the sandbox's stdin."""
        assert self.proc.stdin is not None
        with self._stdin_lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _on_status(self, data: bytes) -> None:
        for line in data.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "started":
                self.pid1 = int(ev["pid"])
            elif ev.get("event") == "error" and self.setup_error is None:
                self.setup_error = {"control": str(ev.get("control")), "message": str(ev.get("message"))}

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        """Stream stdout/stderr; kill the sandbox at the deadline."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = {self.proc.stdout.fileno(): STDOUT, self.proc.stderr.fileno(): STDERR}
        open_fds = {*streams, self.status_fd}
        while streams.keys() & open_fds:
            left = self.remaining()
            if left <= 0:
                self.timed_out = True
                self.kill()
                return
            ready, _, _ = select.select(list(open_fds), [], [], left)
            for fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    open_fds.discard(fd)
                elif fd == self.status_fd:
                    self._on_status(data)
                else:
                    yield streams[fd], data

    def kill(self) -> None:
        """SIGKILL pid 1 of the sandbox (the kernel then kills every process in it) and the launcher."""
        if self.pid1 is not None:
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()

    def finish(self) -> Outcome:
        """Wait, collect, clean up (cgroup, temporary mount point)."""
        if self._outcome is not None:
            return self._outcome
        try:
            try:
                self.proc.wait(timeout=max(self.remaining(), 0.0))
            except subprocess.TimeoutExpired:
                self.timed_out = True
                self.kill()
                self.proc.wait()
            while True:  # read the rest of the status pipe (setup errors)
                ready, _, _ = select.select([self.status_fd], [], [], 0)
                if not ready:
                    break
                data = os.read(self.status_fd, 65536)
                if not data:
                    break
                self._on_status(data)
            oom = self.cg.oom_kills() > 0
        finally:
            os.close(self.status_fd)
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()
            self.cg.destroy()
            try:
                os.rmdir(self.root)
            except OSError:
                pass
        if self.setup_error is not None:
            control = self.setup_error["control"]
            raise SandboxError(
                f"the namespace sandbox could not apply {control}: {self.setup_error['message']}",
                rule=f"sandbox.control.{control}",
                hint="the sandbox refused to start rather than run with a weaker policy; use --sandbox docker, "
                "or fix the host (kernel with user namespaces, cgroups, mount_setattr)",
            )
        if self.proc.returncode == 124:
            self.timed_out = True  # pid 1 of the sandbox enforced the wall clock itself
        self._outcome = Outcome(exit_code=self.proc.returncode, timed_out=self.timed_out, oom_killed=oom,
                                missing_controls=frozenset(self.cg.missing))
        return self._outcome
