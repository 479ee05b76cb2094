"""Namespace backend specifics: it refuses to start rather than run with a missing control."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from sb_helpers import py

from secure_run.errors import SandboxError
from secure_run.sandbox import GpuUnavailable, SandboxPolicy
from secure_run.sandbox._internal import cgroups
from secure_run.sandbox._internal.namespace_backend import NamespaceBackend

pytestmark = pytest.mark.namespace

BOMB = """
import errno, os, time
n = 0
try:
    while n < 5000:
        if os.fork() == 0:
            time.sleep(20)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, errno.errorcode[e.errno])
"""


def _no_cgroups(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cgroups, "_ROOT", tmp_path / "no-cgroupfs")
    monkeypatch.setattr(cgroups, "_v1_mounts", dict)


def test_refuses_to_start_without_cgroup_limits(namespace_backend: NamespaceBackend, policy: SandboxPolicy,
                                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_cgroups(monkeypatch, tmp_path)
    with pytest.raises(SandboxError) as info:
        py(namespace_backend, policy, "print('must not run')")
    assert info.value.rule == "sandbox.control.cgroup_pids"
    assert "allow_missing" in (info.value.hint or "")
    with pytest.raises(SandboxError) as info:
        py(namespace_backend, policy.with_overrides(allow_missing=frozenset({"cgroup_pids"})), "print('x')")
    assert info.value.rule == "sandbox.control.cgroup_memory"
    with pytest.raises(SandboxError) as info:  # issue 10 item 13: no CPU quota, no run
        py(namespace_backend, policy.with_overrides(allow_missing=frozenset({"cgroup_pids", "cgroup_memory"})),
           "print('x')")
    assert info.value.rule == "sandbox.control.cgroup_cpu"


def test_explicitly_allowed_missing_controls_are_reported(namespace_backend: NamespaceBackend, policy: SandboxPolicy,
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_cgroups(monkeypatch, tmp_path)
    allowed = policy.with_overrides(allow_missing=frozenset({"cgroup_pids", "cgroup_memory", "cgroup_cpu"}),
                                    pids_limit=24)
    res = py(namespace_backend, allowed, BOMB)
    assert res.missing_controls == {"cgroup_pids", "cgroup_memory", "cgroup_cpu"}
    # without the pids cgroup, RLIMIT_NPROC (per user namespace) still bounds the fork bomb
    forks, err = res.stdout.decode().split()
    assert err == "EAGAIN" and int(forks) < 24


def test_refuses_when_not_root(namespace_backend: NamespaceBackend, policy: SandboxPolicy,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxError) as info:
        py(namespace_backend, policy, "pass")
    assert info.value.rule == "sandbox.control.user_namespace"


def test_docker_default_seccomp_is_not_silently_replaced(namespace_backend: NamespaceBackend,
                                                        policy: SandboxPolicy) -> None:
    with pytest.raises(SandboxError) as info:
        py(namespace_backend, policy.with_overrides(seccomp="docker-default"), "pass")
    assert info.value.rule == "sandbox.control.seccomp"


def test_gpu_requested_without_device_nodes(namespace_backend: NamespaceBackend, policy: SandboxPolicy) -> None:
    if any(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this host has NVIDIA device nodes")
    with pytest.raises(GpuUnavailable) as info:
        py(namespace_backend, policy.with_overrides(gpu=True), "pass")
    assert info.value.rule == "sandbox.namespace.gpu_unavailable"


def test_setup_failure_names_the_control(namespace_backend: NamespaceBackend, policy: SandboxPolicy,
                                         tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    pol = policy.with_overrides(model_dir=model)
    shutil.rmtree(model)  # gone between validation and launch: the bind mount fails inside
    with pytest.raises(SandboxError) as info:
        py(namespace_backend, pol, "print('must not run')")
    assert info.value.rule == "sandbox.control.model_mount"
    assert "refused to start" in (info.value.hint or "")


def _mountinfo() -> list[str]:
    return sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_nothing_leaks_onto_the_host(namespace_backend: NamespaceBackend, policy: SandboxPolicy) -> None:
    before_mounts = _mountinfo()
    before_tmp = {p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("secure-run-root-*")}
    cg_dirs = [m / "secure-run-probe" for m in cgroups._v1_mounts().values()]
    res = py(namespace_backend, policy, "import json, os; print(json.dumps(open('/proc/self/cgroup').read()))")
    assert res.exit_code == 0, res.stderr
    assert _mountinfo() == before_mounts
    assert {p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("secure-run-root-*")} == before_tmp
    assert not any(d.exists() for d in cg_dirs)
    for mount in cgroups._v1_mounts().values():
        assert not list(mount.glob("secure-run-*"))
    if Path("/sys/fs/cgroup/secure-run").is_dir():
        assert not list(Path("/sys/fs/cgroup/secure-run").glob("run-*"))
    # inside, the cgroup namespace hides the host's cgroup paths
    assert all(line.endswith(":/") for line in json.loads(res.stdout).splitlines())


def test_only_the_runtime_is_visible(namespace_backend: NamespaceBackend, policy: SandboxPolicy) -> None:
    import sysconfig

    code = ("import json, os, sys\n"
            "site = sys.argv[1]\n"
            "print(json.dumps({'root': sorted(os.listdir('/')), 'etc': sorted(os.listdir('/etc')),"
            " 'hidden_site': os.listdir(site) if os.path.isdir(site) else None,"
            " 'repo_visible': os.path.exists(sys.argv[2]), 'dev': sorted(os.listdir('/dev'))}))")
    site = os.path.realpath(sysconfig.get_path("purelib", vars={"base": os.path.realpath(sys.base_prefix)}))
    repo = str(Path(__file__).resolve().parents[2])
    res = py(namespace_backend, policy, code, site, repo)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    python_top = Path(os.path.realpath(sys.base_prefix)).parts[1]  # e.g. usr, or root for a pyenv build
    assert set(r["root"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "opt", "proc", "sbin", "sys",
                              "tmp", "usr", python_top}
    assert r["etc"] == sorted(["alternatives", "group", "hosts", "ld.so.cache", "nsswitch.conf", "passwd"]) or \
        r["etc"] == sorted(["group", "hosts", "ld.so.cache", "nsswitch.conf", "passwd"])
    from secure_run.sandbox._internal.namespace_backend import worker_site_dirs

    if site not in worker_site_dirs():  # the base interpreter's own site-packages is hidden unless it is the runtime
        assert r["hidden_site"] in (None, [])
    assert r["repo_visible"] is False
    assert r["dev"] == ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
