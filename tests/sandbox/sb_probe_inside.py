"""Probe run INSIDE a sandbox (standard library only): reports every control as one JSON line.

Usage: ``python -S -c "$(cat sb_probe_inside.py)" HOST_PORT``. Every check records what actually
happened (``"ok"`` or the errno name), so the tests assert on observed behaviour.
"""

import ctypes
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


out["exec_from_tmp"] = attempt(run_tmp_script)
out["setuid_root"] = attempt(lambda: os.setuid(0))
out["unshare_user"] = attempt(lambda: syscall(272, 0x10000000))  # unshare(CLONE_NEWUSER)
out["mount_tmpfs"] = attempt(lambda: syscall(165, b"none", b"/tmp", b"tmpfs", 0, None))
out["ptrace_traceme"] = attempt(lambda: syscall(101, 0, 0, 0, 0))
out["root_mount_options"] = next(line.split()[3] for line in open("/proc/mounts") if line.split()[1] == "/")
out["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
out["core"] = resource.getrlimit(resource.RLIMIT_CORE)
out["pids_visible"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["hostname"] = socket.gethostname()
out["root_entries"] = sorted(os.listdir("/"))
out["home"] = os.environ.get("HOME")
out["env_names"] = sorted(os.environ)
print(json.dumps(out))
