"""Our seccomp profile and its BPF compiler: decisions checked by an emulator and by the kernel."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from secure_run.errors import SandboxError
from secure_run.sandbox._internal import seccomp
from secure_run.sandbox._internal.seccomp import compile_bpf, load_profile, parse_profile, profile_text
from secure_run.sandbox._internal.syscalls_x86_64 import AUDIT_ARCH_X86_64, SYSCALLS_X86_64

ALLOW, KILL = seccomp.RET_ALLOW, seccomp.RET_KILL_PROCESS
EPERM, ENOSYS = seccomp.RET_ERRNO | 1, seccomp.RET_ERRNO | 38
CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD_FLAGS = 0x10000000, 0x40000000, 0x003D0F00


def run_bpf(prog: bytes, nr: int, args: tuple[int, ...] = (), arch: int = AUDIT_ARCH_X86_64) -> int:
    """A small classic-BPF interpreter over struct seccomp_data (independent of the compiler)."""
    args = tuple(args) + (0,) * (6 - len(args))
    data = struct.pack("<IIQ6Q", nr & 0xFFFFFFFF, arch, 0, *args)
    insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    for _ in range(100000):
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x54:  # and #k
            acc &= k
            pc += 1
        elif code == 0x15:  # jeq #k
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x35:  # jge #k
            pc += 1 + (jt if acc >= k else jf)
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("no return")


@pytest.fixture(scope="module")
def prog() -> bytes:
    return compile_bpf(load_profile())


def test_every_known_syscall_gets_the_profiles_action(prog: bytes) -> None:
    profile = load_profile()
    for name, nr in SYSCALLS_X86_64.items():
        rule = profile.rule_for(name)
        got = run_bpf(prog, nr, (1,))  # arg0 = 1 satisfies the AF_UNIX / no-namespace-flags conditions
        if rule is None:
            assert got == profile.default_ret(), name
        elif rule.action == "SCMP_ACT_ALLOW":
            assert got == ALLOW, name
        else:
            assert got == seccomp.RET_ERRNO | int(rule.errnoRet or 0), name


@pytest.mark.parametrize("name", ["ptrace", "mount", "umount2", "unshare", "setns", "pivot_root", "bpf",
                                  "perf_event_open", "keyctl", "add_key", "userfaultfd", "init_module",
                                  "finit_module", "kexec_load", "process_vm_readv", "process_vm_writev",
                                  "open_by_handle_at", "io_uring_setup", "chroot", "mknod", "personality"])
def test_dangerous_calls_fail_with_eperm(prog: bytes, name: str) -> None:
    assert run_bpf(prog, SYSCALLS_X86_64[name]) == EPERM


def test_argument_rules(prog: bytes) -> None:
    sock, pair, clone = SYSCALLS_X86_64["socket"], SYSCALLS_X86_64["socketpair"], SYSCALLS_X86_64["clone"]
    assert run_bpf(prog, sock, (1,)) == ALLOW                 # AF_UNIX
    for family in (2, 10, 16, 17, 40):                        # INET, INET6, NETLINK, PACKET, VSOCK
        assert run_bpf(prog, sock, (family,)) == EPERM
        assert run_bpf(prog, pair, (family,)) == EPERM
    assert run_bpf(prog, sock, (1 | (1 << 32),)) == EPERM     # high bits set: not exactly AF_UNIX
    assert run_bpf(prog, clone, (CLONE_THREAD_FLAGS,)) == ALLOW  # pthread_create's flags
    assert run_bpf(prog, clone, (0x11,)) == ALLOW                # fork (SIGCHLD)
    for flag in (CLONE_NEWUSER, CLONE_NEWNET, 0x00020000, 0x20000000, 0x02000000, 0x04000000, 0x08000000):
        assert run_bpf(prog, clone, (0x11 | flag,)) == EPERM, hex(flag)
    assert run_bpf(prog, SYSCALLS_X86_64["clone3"]) == ENOSYS    # libc falls back to clone


def test_foreign_arch_x32_and_unknown_numbers(prog: bytes) -> None:
    assert run_bpf(prog, 0, arch=0x40000003) == KILL            # i386 (int 0x80)
    assert run_bpf(prog, 0x40000000 + 39) == ENOSYS             # x32 getpid
    assert run_bpf(prog, max(SYSCALLS_X86_64.values()) + 1) == ENOSYS
    assert run_bpf(prog, -1) == ENOSYS


def test_docker_and_namespace_backends_share_one_file() -> None:
    text = profile_text()
    assert json.loads(text) == json.loads((Path(__file__).parents[2] / "sandbox" / "seccomp.json").read_text())
    doc = json.loads(text)
    assert doc["defaultAction"] == "SCMP_ACT_ERRNO" and doc["architectures"] == ["SCMP_ARCH_X86_64"]


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(defaultAction="SCMP_ACT_ALLOW"), "defaultAction"),
    (lambda d: d.update(architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]), "architectures"),
    (lambda d: d["syscalls"][0]["names"].append("no_such_syscall"), "no_such_syscall"),
    (lambda d: d["syscalls"].append({"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}), "appears in"),
    (lambda d: d["syscalls"].append({"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"}), "errnoRet"),
    (lambda d: d["syscalls"][1]["args"][0].update(op="SCMP_CMP_GT"), "op"),
    (lambda d: d["syscalls"].append({"names": ["sync"], "action": "SCMP_ACT_TRACE"}), "action"),
    (lambda d: d.update(listenerPath="/run/x.sock"), "listenerPath"),
])
def test_profile_refusals(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(profile_text())
    for rule in doc["syscalls"]:
        rule["names"] = [n for n in rule["names"] if n != "sync"]
    mutate(doc)
    with pytest.raises(SandboxError) as info:
        parse_profile(json.dumps(doc))
    assert info.value.rule == "sandbox.seccomp.profile"
    assert needle in " ".join(info.value.details)


PROBE = r"""
import ctypes, errno, json, os, socket, threading, subprocess
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *a):
    if libc.syscall(nr, *a) == -1:
        raise OSError(ctypes.get_errno(), "")
def t(f):
    try:
        f(); return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
th = threading.Thread(target=lambda: None); th.start(); th.join()
out = {
 "inet": t(lambda: socket.socket(socket.AF_INET).close()),
 "inet6": t(lambda: socket.socket(socket.AF_INET6).close()),
 "netlink": t(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
 "unix": t(lambda: socket.socket(socket.AF_UNIX).close()),
 "unshare_user": t(lambda: sc(272, 0x10000000)),
 "clone3": t(lambda: sc(435, 0, 0)),
 "ptrace": t(lambda: sc(101, 0, 0, 0, 0)),
 "mount": t(lambda: sc(165, b"none", b"/tmp", b"tmpfs", 0, None)),
 "subprocess": subprocess.run(["/bin/true"]).returncode,
 "seccomp": open("/proc/self/status").read().split("Seccomp:")[1].split()[0],
}
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86_64 Linux only")
def test_kernel_enforces_the_compiled_filter(tmp_path: Path) -> None:
    """Load the filter with seccomp_exec.py (as the namespace backend does) and probe from the child."""
    blob = tmp_path / "filter.bpf"
    blob.write_bytes(compile_bpf(load_profile()))
    loader = Path(seccomp.__file__).with_name("seccomp_exec.py")
    res = subprocess.run([sys.executable, "-S", "-E", str(loader), str(blob), sys.executable, "-c", PROBE],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out == {"inet": "EPERM", "inet6": "EPERM", "netlink": "EPERM", "unix": "ok", "unshare_user": "EPERM",
                   "clone3": "ENOSYS", "ptrace": "EPERM", "mount": "EPERM", "subprocess": 0, "seccomp": "2"}


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_loader_refuses_malformed_filters(tmp_path: Path) -> None:
    loader = Path(seccomp.__file__).with_name("seccomp_exec.py")
    for blob in (b"", b"\x00" * 7, b"\x06\x00\x00\x00\x00\x00\x00\x00" * 5000):
        (tmp_path / "f.bpf").write_bytes(blob)
        res = subprocess.run([sys.executable, "-S", "-E", str(loader), str(tmp_path / "f.bpf"), "/bin/true"],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 126 and "malformed filter" in res.stderr
    # a filter the kernel rejects (jump out of range) is never silently skipped
    (tmp_path / "f.bpf").write_bytes(struct.pack("=HBBI", 0x15, 200, 200, 0))
    res = subprocess.run([sys.executable, "-S", "-E", str(loader), str(tmp_path / "f.bpf"), "/bin/true"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 126 and "PR_SET_SECCOMP failed" in res.stderr


def test_syscall_numbers_match_the_running_kernel() -> None:
    """Spot-check the table against real calls (getpid, getuid, uname are harmless)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("x86_64 Linux only")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(SYSCALLS_X86_64["getpid"]) == os.getpid()
    assert libc.syscall(SYSCALLS_X86_64["getuid"]) == os.getuid()
    assert libc.syscall(SYSCALLS_X86_64["getppid"]) == os.getppid()
    assert libc.syscall(SYSCALLS_X86_64["gettid"]) == __import__("threading").get_native_id()


PROT_R, PROT_W, PROT_X = 1, 2, 4


@pytest.mark.parametrize("name", ["mmap", "mprotect", "pkey_mprotect"])
def test_write_xor_execute(prog: bytes, name: str) -> None:
    """Issue 10 item 13: anonymous W+X memory ran native code; writable-and-executable is now refused."""
    nr = SYSCALLS_X86_64[name]
    for prot in (0, PROT_R, PROT_R | PROT_W, PROT_R | PROT_X, PROT_X, PROT_W):
        assert run_bpf(prog, nr, (0, 4096, prot)) == ALLOW, prot
    for prot in (PROT_W | PROT_X, PROT_R | PROT_W | PROT_X, PROT_R | PROT_W | PROT_X | 0x1000000):
        assert run_bpf(prog, nr, (0, 4096, prot)) == EPERM, prot


@pytest.mark.parametrize("name", ["memfd_create", "execveat"])
def test_no_code_from_anonymous_files(prog: bytes, name: str) -> None:
    assert run_bpf(prog, SYSCALLS_X86_64[name]) == EPERM


def test_alternative_rules_must_share_an_action() -> None:
    doc = json.loads(profile_text())
    doc["syscalls"].append({"names": ["mmap"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                            "args": [{"index": 2, "value": 6, "valueTwo": 6, "op": "SCMP_CMP_MASKED_EQ"}]})
    with pytest.raises(SandboxError) as info:
        parse_profile(json.dumps(doc))
    assert "same action" in " ".join(info.value.details)
