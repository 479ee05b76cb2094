"""``sandbox selftest`` probes every control from inside the sandbox (issue 13 item 7).

The judge is tested on observations with each control broken in turn (no sandbox needed); the
probes are run in both real backends (every control holds) and, as the attack, with NO sandbox at
all (a "backend" that runs the probe as an unprivileged host process): then the controls must fail.
The CLI prints the table, and exits 1 with rule ``sandbox.selftest.control`` when a control fails.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import pytest
from click.testing import CliRunner

from secure_run.runner.cli import cli
from secure_run.sandbox import SandboxPolicy
from secure_run.sandbox.backends import Backend, RunResult
from secure_run.sandbox.probes import CONTROLS, MODEL_TEXT, judge, run_probes

ZERO = "0000000000000000"
#: what the namespace backend reported on a good host (trimmed to the keys the judge reads)
GOOD: dict[str, Any] = {
    "interfaces": ["lo"], "connect_host_loopback": "EPERM", "connect_other_address": "EPERM",
    "connect_ipv6_loopback": "EPERM", "host_listener_accepted": 0,
    "write_root": "EROFS", "write_etc": "EROFS", "write_usr": "EROFS", "mkdir_root": "EROFS",
    "root_mount_options": "ro,nosuid,nodev", "sealed_read": MODEL_TEXT, "sealed_write": "EPERM",
    "sealed_truncate": "EPERM", "sealed_grow": "EPERM", "sealed_mmap_write": "EPERM", "sealed_unseal": "EPERM",
    "write_handoff": "EROFS", "model_folder_visible": False, "write_tmp": "ok", "exec_from_tmp": "EACCES", "seccomp": "2",
    "ptrace_traceme": "EPERM", "unshare_user": "EPERM", "mount_tmpfs": "EPERM",
    "caps": {k: ZERO for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}, "no_new_privs": "1",
    "uid": 65534, "euid": 65534, "gid": 65534, "egid": 65534, "setuid_root": "EPERM",
    "fork_until_refused": {"forked": 60, "error": "EAGAIN"}, "pids_visible": [1, 2], "pid_of_program": 2,
    "memfd_create": "EPERM", "mmap_wx": "EPERM", "mmap_rw": "allowed", "mprotect_wx": "EPERM",
    "execveat": "EPERM", "cpu_seconds": 0.5, "wall_clock": {"timed_out": True, "seconds": 2.05},
}


def _broken(path: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(GOOD)
    keys = path.split(".")
    target = raw
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return raw


def _failing(raw: dict[str, Any]) -> set[str]:
    return {c.name for c in judge(raw, pids_limit=64) if not c.holds}


def test_every_control_holds_on_good_observations() -> None:
    controls = judge(GOOD, pids_limit=64)
    assert tuple(c.name for c in controls) == CONTROLS and all(c.holds for c in controls)
    assert set(CONTROLS) >= {"network", "read-only root", "sealed model", "seccomp", "capabilities", "uid",
                             "pids", "memfd/W+X", "CPU quota", "wall clock"}


@pytest.mark.parametrize(("path", "value", "control"), [
    ("connect_other_address", "ok", "network"),
    ("host_listener_accepted", 1, "network"),
    ("interfaces", ["eth0", "lo"], "network"),
    ("write_etc", "ok", "read-only root"),
    ("root_mount_options", "rw,relatime", "read-only root"),
    ("sealed_write", "ok", "sealed model"),  # the copy could be changed: not sealed
    ("sealed_mmap_write", "ok", "sealed model"),
    ("sealed_unseal", "ok", "sealed model"),
    ("sealed_read", None, "sealed model"),
    ("model_folder_visible", True, "sealed model"),  # the model folder is mounted too
    ("write_handoff", "ok", "sealed model"),
    ("exec_from_tmp", "ok", "noexec scratch"),
    ("seccomp", "0", "seccomp"),
    ("ptrace_traceme", "ok", "seccomp"),
    ("caps.CapBnd", "000001ffffffffff", "capabilities"),
    ("no_new_privs", "0", "capabilities"),
    ("uid", 0, "uid"),
    ("setuid_root", "ok", "uid"),
    ("fork_until_refused", {"forked": 1024, "error": None}, "pids"),
    ("pids_visible", list(range(1, 200)), "pids"),
    ("memfd_create", "allowed", "memfd/W+X"),
    ("mprotect_wx", "allowed", "memfd/W+X"),
    ("cpu_seconds", 1.9, "CPU quota"),
    ("cpu_seconds", "exit 1: boom", "CPU quota"),
    ("wall_clock", {"timed_out": False, "seconds": 60.0}, "wall clock"),
])
def test_one_broken_control_fails_exactly_that_control(path: str, value: Any, control: str) -> None:
    assert _failing(_broken(path, value)) == {control}


def test_a_probe_that_did_not_run_fails_every_inside_control() -> None:
    raw = {"probe_error": "exit 1: Traceback", "cpu_seconds": 0.5, "wall_clock": {"timed_out": True, "seconds": 2.0}}
    assert _failing(raw) == set(CONTROLS) - {"CPU quota", "wall clock"}
    wrong_shape = _broken("caps", "everything")
    assert _failing(wrong_shape) == {"capabilities"}


# --- the real backends, and no sandbox at all ------------------------------------------------------


def test_every_control_holds_in_the_real_sandbox(backend: Backend) -> None:
    report = run_probes(backend)
    assert report.ok, [c for c in report.controls if not c.holds]
    assert report.raw["host_listener_accepted"] == 0 and report.raw["sealed_read"] == MODEL_TEXT


#: a Python that the unprivileged user can run (a virtual environment under /root may not be)
HOST_PYTHON = "/usr/bin/python3"


class NoSandbox(Backend):
    """The attack: "sandbox" runs that are plain host processes as nobody (private /tmp, at most 64
    processes, killed after 18 s), so nothing but the uid is enforced."""

    name = "none"

    def python_argv(self) -> list[str]:
        return [HOST_PYTHON, "-S"]

    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"",
              keep_stdin_open: bool = False) -> Any:
        raise NotImplementedError

    def run(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"",
            max_output: int = 1 << 20) -> RunResult:
        wrapped = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs none /tmp && exec prlimit --nproc=64 setpriv --reuid=65534 --regid=65534 '
                   '--clear-groups "$@"', "sh", *argv]
        t0 = time.monotonic()
        try:
            p = subprocess.run(wrapped, input=stdin, capture_output=True, timeout=18)
            return RunResult("none", p.returncode, p.stdout, p.stderr, False, False, time.monotonic() - t0)
        except subprocess.TimeoutExpired as err:
            return RunResult("none", None, err.stdout or b"", err.stderr or b"", True, False, time.monotonic() - t0)


@pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(p) for p in ("unshare", "setpriv", "prlimit"))
                    or not os.access(HOST_PYTHON, os.X_OK),
                    reason="needs root, util-linux and the system python3 to drop to nobody in a private /tmp")
def test_without_a_sandbox_the_controls_fail() -> None:
    report = run_probes(NoSandbox())
    failed = {c.name for c in report.controls if not c.holds}
    # the host process shares the network, a writable root, no seccomp, a full bounding set, host pids,
    # memfd and W+X memory, no hand-off socket, and nothing kills it at 2 s; only the uid is "enforced"
    assert {"network", "read-only root", "sealed model", "seccomp", "capabilities", "pids", "memfd/W+X",
            "wall clock"} <= failed, report.controls
    assert "uid" not in failed
    assert report.raw["host_listener_accepted"] >= 1 and report.raw["seccomp"] == "0"
    assert not report.ok


# --- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def scripted_selftest(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The token part of the selftest passes (the reference tokens); the probes report ``state['raw']``."""
    from secure_run.sandbox import StatsEvent, TokenEvent
    from secure_run.sandbox._internal import selftest
    from secure_run.sandbox.probes import ProbeReport

    state: dict[str, Any] = {"raw": GOOD}

    class Fake:
        name = "fake"

    def run_worker(backend: Any, policy: Any, req: Any) -> Any:
        toks = selftest.greedy_tokens(selftest.build_weights(req.seed), steps=8, seed=req.seed, device="cpu")
        yield from (TokenEvent(type="token", index=i, token_id=t) for i, t in enumerate(toks))
        yield StatsEvent(type="stats", prompt_tokens=1, generated_tokens=8, seconds=0.1, tokens_per_second=80,
                         device="cpu", detail={"uid": 65534})

    def fake_probes(backend: Any, *, gpu: bool = False) -> ProbeReport:
        return ProbeReport(backend="fake", raw=state["raw"], controls=judge(state["raw"], pids_limit=64))

    monkeypatch.setattr("secure_run.sandbox.get_backend", lambda *a, **k: Fake())
    monkeypatch.setattr("secure_run.sandbox.run_worker", run_worker)
    monkeypatch.setattr("secure_run.sandbox.probes.run_probes", fake_probes)
    return state


def test_cli_prints_every_control_as_a_table(scripted_selftest: dict[str, Any]) -> None:
    res = CliRunner().invoke(cli, ["sandbox", "selftest"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = {line.split("  ")[1].strip(): line for line in res.stdout.splitlines() if line.startswith("  ")
            and not line.startswith("   ")}
    for name in CONTROLS:
        assert name in rows and " ok " in rows[name], rows
    assert f"all {len(CONTROLS)} controls hold" in res.stdout
    res = CliRunner().invoke(cli, ["sandbox", "selftest", "--json"], catch_exceptions=False)
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["ok"] is True
    assert [c["control"] for c in doc["controls"]] == list(CONTROLS) and all(c["holds"] for c in doc["controls"])


def test_cli_exits_1_when_a_control_does_not_hold(scripted_selftest: dict[str, Any]) -> None:
    scripted_selftest["raw"] = _broken("seccomp", "0")
    res = CliRunner().invoke(cli, ["sandbox", "selftest"], catch_exceptions=False)
    assert res.exit_code == 1, res.output
    assert any(line.split() [:2] == ["seccomp", "FAIL"] for line in res.stdout.splitlines())
    assert "1 of 11 sandbox controls do not hold" in res.stderr and "seccomp: expected" in res.stderr
    res = CliRunner().invoke(cli, ["sandbox", "selftest", "--json"], catch_exceptions=False)
    assert res.exit_code == 1
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    err = json.loads(lines[0])["error"]
    assert err["rule"] == "sandbox.selftest.control" and err["kind"] == "refused" and err["exit_code"] == 1
    assert any(d.startswith("seccomp: expected") for d in err["details"])
