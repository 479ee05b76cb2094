"""Issue 10 items 11, 13 and 16, checked from inside the sandbox.

* item 11: ``PYTHONPATH=/`` made the namespace backend mount the whole host filesystem;
* item 13: memfd exec and W+X memory, no CPU limit, ``/sys/firmware`` and host ``/usr`` visible;
* item 16: the program was pid 1 (ignoring SIGTERM); nothing bounded a sandbox without its host;
  roots and cgroups of a killed host stayed behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sb_helpers import py

from secure_run.sandbox import SandboxPolicy
from secure_run.sandbox._internal import cgroups
from secure_run.sandbox._internal.namespace_backend import NamespaceBackend, reap_leftovers, worker_site_dirs
from secure_run.sandbox._internal.owner import owner_token
from secure_run.sandbox.backends import Backend

POLICY = SandboxPolicy(memory_mib=512, pids_limit=64, wall_clock_s=60, scratch_mib=16, shm_mib=16)

NATIVE_CODE = r"""
import ctypes, errno, json, mmap, os
out = {}
try:
    fd = os.memfd_create("x")
    out["memfd_create"] = "allowed"
except OSError as e:
    out["memfd_create"] = errno.errorcode[e.errno]
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    out["mmap_wx"] = "allowed"
except OSError as e:
    out["mmap_wx"] = errno.errorcode[e.errno]
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
addr = libc.mmap(None, 4096, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
out["mmap_rw"] = "allowed" if addr not in (None, ctypes.c_void_p(-1).value) else "failed"
rc = libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(4096), 7)
out["mprotect_wx"] = "allowed" if rc == 0 else errno.errorcode[ctypes.get_errno()]
rc = libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(4096), 5)
out["mprotect_rx"] = "allowed" if rc == 0 else errno.errorcode[ctypes.get_errno()]
libc.syscall.restype = ctypes.c_long
rc = libc.syscall(322, -100, b"/usr/local/bin/python3", None, None, 0)  # execveat
out["execveat"] = errno.errorcode[ctypes.get_errno()] if rc < 0 else "allowed"
print(json.dumps(out))
"""


def test_memfd_exec_and_wx_memory_are_refused_inside(backend: Backend) -> None:
    res = py(backend, POLICY, NATIVE_CODE)
    assert res.exit_code == 0, res.stderr.decode(errors="replace")[-2000:]
    r = json.loads(res.stdout.decode().splitlines()[-1])
    assert r == {"memfd_create": "EPERM", "mmap_wx": "EPERM", "mmap_rw": "allowed", "mprotect_wx": "EPERM",
                 "mprotect_rx": "allowed", "execveat": "EPERM"}


def test_cpu_quota_holds_inside(backend: Backend) -> None:
    """A busy loop for 2 s of wall time gets at most about a quarter core with cpus=0.25."""
    code = ("import time\nt0, c0 = time.monotonic(), time.process_time()\n"
            "while time.monotonic() - t0 < 2.0: pass\nprint(time.process_time() - c0)")
    res = py(backend, POLICY.with_overrides(cpus=0.25), code)
    assert res.exit_code == 0, res.stderr.decode(errors="replace")[-2000:]
    used = float(res.stdout.decode().split()[-1])
    assert used < 0.9, f"{used:.2f} s of CPU in 2 s with a 0.25-core quota"


def test_policy_cpus_defaults_to_every_host_core() -> None:
    assert SandboxPolicy().cpus == float(os.cpu_count() or 1)


VIEW = r"""
import json, os, sys
sites = sorted(p for p in os.environ["PYTHONPATH"].split(":") if p.startswith("/opt/secure-run/site"))
def ls(p):
    try:
        return sorted(os.listdir(p))
    except OSError as e:
        return "error:" + type(e).__name__
print(json.dumps({"sites": {s: ls(s)[:50] for s in sites}, "firmware": ls("/sys/firmware"),
                  "usr": ls("/usr"), "usr_bin": ls("/usr/bin"), "pid": os.getpid(),
                  "marker": os.path.exists(sys.argv[1])}))
"""


@pytest.mark.namespace
def test_pythonpath_root_does_not_expose_the_host(namespace_backend: NamespaceBackend, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 11: with PYTHONPATH=/ the whole host filesystem (and host /proc) was mounted inside."""
    marker = tmp_path / "host-secret"
    marker.write_text("x")
    monkeypatch.setenv("PYTHONPATH", f"/:{tmp_path}")
    res = py(namespace_backend, POLICY, VIEW, str(marker))
    assert res.exit_code == 0, res.stderr.decode(errors="replace")[-2000:]
    r = json.loads(res.stdout.decode().splitlines()[-1])
    assert len(r["sites"]) == len(worker_site_dirs())
    for listing in r["sites"].values():
        assert not {"etc", "proc", "root", "home", "host-secret"} & set(listing), listing
    assert r["marker"] is False


@pytest.mark.namespace
def test_firmware_and_host_usr_are_hidden(namespace_backend: NamespaceBackend) -> None:
    res = py(namespace_backend, POLICY, VIEW, "/nonexistent")
    assert res.exit_code == 0, res.stderr.decode(errors="replace")[-2000:]
    r = json.loads(res.stdout.decode().splitlines()[-1])
    assert r["firmware"] in ([], "error:FileNotFoundError")
    assert not {"share", "sbin", "local", "games", "src", "include"} & set(r["usr"]), r["usr"]
    programs = set(r["usr_bin"]) if isinstance(r["usr_bin"], list) else set()
    assert programs <= {"setpriv", *(p for p in programs if p.startswith("python"))}, programs
    assert r["pid"] != 1  # item 16: the program is not pid 1


@pytest.mark.namespace
def test_sigterm_reaches_a_program_that_ignores_it(namespace_backend: NamespaceBackend) -> None:
    """Item 16: SIGTERM to the sandbox's pid 1 is forwarded; a program ignoring it is killed after the grace."""
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(600)"
    run = namespace_backend.start([*namespace_backend.python_argv(), "-c", code], POLICY)
    try:
        for _stream, data in run.chunks():
            if b"ready" in data:
                break
        assert run.pid1 is not None  # type: ignore[attr-defined]
        t0 = time.monotonic()
        os.kill(run.pid1, signal.SIGTERM)  # type: ignore[attr-defined]
        run.proc.wait(timeout=20)  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 10
        assert run.proc.returncode == 128 + signal.SIGTERM  # type: ignore[attr-defined]
    finally:
        run.kill()
        run.finish()


@pytest.mark.namespace
def test_sandbox_bounds_its_own_wall_clock(namespace_backend: NamespaceBackend) -> None:
    """Item 16: with nobody watching (no chunks(), no finish()), the sandbox still ends at its deadline."""
    run = namespace_backend.start([*namespace_backend.python_argv(), "-c", "import time; time.sleep(600)"],
                                  POLICY.with_overrides(wall_clock_s=2.0))
    try:
        run.proc.wait(timeout=30)  # type: ignore[attr-defined]
        assert run.proc.returncode == 124  # type: ignore[attr-defined]
    finally:
        outcome = run.finish()
    assert outcome.timed_out


@pytest.mark.namespace
def test_leftovers_of_a_killed_host_are_reaped(namespace_backend: NamespaceBackend, policy: SandboxPolicy) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    _, dead_pid, dead_ticks = owner_token(proc.pid).split(":")
    proc.wait()
    _, my_pid, my_ticks = owner_token().split(":")
    tmp = tempfile.gettempdir()
    dead_root = tempfile.mkdtemp(prefix=f"secure-run-root-{dead_pid}-{dead_ticks}-", dir=tmp)
    live_root = tempfile.mkdtemp(prefix=f"secure-run-root-{my_pid}-{my_ticks}-", dir=tmp)
    made: list[Path] = []
    if (cgroups._ROOT / "cgroup.controllers").exists():
        parent = cgroups._ROOT / cgroups._PARENT
        parent.mkdir(exist_ok=True)
        made = [parent / f"run-{dead_pid}-{dead_ticks}-feedc0ffee00"]
    else:
        made = [m / f"secure-run-{dead_pid}-{dead_ticks}-feedc0ffee00" for m in set(cgroups._v1_mounts().values())]
    for d in made:
        d.mkdir()
    try:
        res = py(namespace_backend, policy, "print('ok')")  # the next start reaps
        assert res.exit_code == 0
        assert not os.path.exists(dead_root)
        assert not any(d.exists() for d in made)
        assert os.path.isdir(live_root)  # a live process's run is never touched
        assert reap_leftovers() == {"roots": [], "cgroups": []}
    finally:
        os.rmdir(live_root)
        for d in made:
            if d.exists():
                d.rmdir()


@pytest.mark.docker
def test_docker_host_runtime_mounts_only_the_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The docker ``host`` runtime (GPU hosts): the host's runtime bound read-only, nothing else of the host."""
    from secure_run.sandbox import SelftestRequest, run_worker
    from secure_run.sandbox._internal.docker_backend import DockerBackend

    backend = DockerBackend(build=True, runtime="host")
    assert backend.runtime_for(SandboxPolicy(gpu=True)) == "host"
    assert DockerBackend().runtime_for(SandboxPolicy()) == "image"
    marker = tmp_path / "host-secret"
    marker.write_text("x")
    monkeypatch.setenv("PYTHONPATH", f"/:{tmp_path}")
    res = py(backend, POLICY, VIEW, str(marker))
    assert res.exit_code == 0, res.stderr.decode(errors="replace")[-2000:]
    r = json.loads(res.stdout.decode().splitlines()[-1])
    assert r["marker"] is False and len(r["sites"]) == len(worker_site_dirs())
    for listing in r["sites"].values():
        assert not {"etc", "proc", "root", "home"} & set(listing), listing
    assert not {"share", "include", "games", "src"} & set(r["usr"]), r["usr"]
    assert r["firmware"] in ([], "error:FileNotFoundError", "error:PermissionError")
    events = list(run_worker(backend, POLICY.with_overrides(memory_mib=2048), SelftestRequest(task="selftest", seed=2)))
    assert events[-1].type == "stats" and events[-1].detail["uid"] == 65534  # type: ignore[union-attr]
