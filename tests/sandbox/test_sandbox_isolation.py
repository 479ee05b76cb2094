"""Every control asserted from INSIDE each real sandbox (docker and namespace backends).

Each test runs a probe in the sandbox and checks what actually happened there: the network
(a listener on the host's 127.0.0.1 is never reached), the filesystem (read-only root and model
mount, noexec scratch), privileges (uid, capabilities, no_new_privs, seccomp), and the limits
(pids, memory, wall clock), plus the worker's selftest end to end.
"""

from __future__ import annotations

import dataclasses
import socket
import time
import uuid
from pathlib import Path

import pytest
from sb_helpers import Listener, host_processes_with, probe, py
from sealed_support import handed_off

from secure_run.errors import ModelError, SandboxError
from secure_run.sandbox import (
    GenerateRequest,
    ProtocolError,
    SandboxOOM,
    SandboxPolicy,
    SandboxTimeout,
    SelftestRequest,
    StatsEvent,
    TextEvent,
    TokenEvent,
    run_worker,
)
from secure_run.sandbox._internal import selftest
from secure_run.sandbox.backends import Backend
from secure_run.sandbox.protocol import ChatMessage

ZERO_CAPS = "0000000000000000"


def test_controls_from_inside(backend: Backend, policy: SandboxPolicy, listener: Listener, model_dir: Path) -> None:
    # control: the listener is reachable from the host itself
    socket.create_connection(("127.0.0.1", listener.port), timeout=2).close()
    time.sleep(0.3)
    assert listener.accepted == 1

    r = probe(backend, policy.with_overrides(model_dir=model_dir), listener.port)

    # privileges
    assert r["uid"] == r["euid"] == 65534 and r["gid"] == r["egid"] == 65534
    assert r["groups"] in ([], [65534])
    assert r["caps"] == {k: ZERO_CAPS for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert r["no_new_privs"] == "1"
    assert r["seccomp"] == "2"
    assert r["setuid_root"] == "EPERM"
    assert r["unshare_user"] == "EPERM"
    assert r["mount_tmpfs"] == "EPERM"
    assert r["ptrace_traceme"] == "EPERM"
    # network: only loopback exists, nothing on the host (or anywhere) is reachable
    assert r["interfaces"] == ["lo"]
    assert r["connect_host_loopback"] != "ok"
    assert r["connect_other_address"] != "ok"
    assert r["connect_ipv6_loopback"] != "ok"
    assert r["unix_socket"] == "ok"
    time.sleep(0.3)
    assert listener.accepted == 1, "a connection from inside the sandbox reached the host listener"
    # filesystem
    assert r["write_root"] == "EROFS"
    assert r["write_etc"] == "EROFS"
    assert r["write_usr"] == "EROFS"
    assert r["mkdir_root"] == "EROFS"
    assert r["root_mount_options"].split(",")[0] == "ro"
    assert r["model_files"] == ["weights.bin"]
    assert r["model_read"] == "weights-v1"
    assert r["write_model_new"] == "EROFS"
    assert r["write_model_existing"] in ("EROFS", "EACCES")
    assert (model_dir / "weights.bin").read_text() == "weights-v1" and sorted(p.name for p in model_dir.iterdir()) == [
        "weights.bin"]
    assert r["write_tmp"] == "ok"
    assert r["exec_from_tmp"] == "EACCES"  # scratch is noexec
    # the process is alone in its own pid namespace, with fixed limits and environment
    assert len(r["pids_visible"]) <= 3
    assert r["hostname"] == "sandbox"
    assert r["nofile"] == [policy.nofile, policy.nofile]
    assert r["core"] == [0, 0]
    assert r["home"] == "/tmp"
    assert not any(name.startswith(("LD_", "DOCKER", "SSH_", "SECURE_RUN")) for name in r["env_names"])
    assert "work" not in r["root_entries"] and "home" not in r["root_entries"]


def test_fork_bomb_stopped_by_pids_limit(backend: Backend, policy: SandboxPolicy) -> None:
    marker = f"sr-bomb-{uuid.uuid4().hex}"
    bomb = f"""# {marker}
import errno, os, time
n = 0
try:
    while n < 10000:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, errno.errorcode[e.errno])
"""
    res = py(backend, policy.with_overrides(pids_limit=32, wall_clock_s=30), bomb)
    assert res.exit_code == 0, res.stderr[-2000:]
    forks, err = res.stdout.decode().split()
    assert err == "EAGAIN"
    assert 10 <= int(forks) < 32
    assert res.duration_s < 20  # pid 1 exiting ended the whole sandbox (no waiting for the sleepers)
    assert host_processes_with(marker) == [], "forked children outlived the sandbox"


def test_memory_limit_kills_and_reports_oom(backend: Backend, policy: SandboxPolicy) -> None:
    res = py(backend, policy.with_overrides(memory_mib=96),
             "x = bytearray(64 * 1024 * 1024); y = bytearray(512 * 1024 * 1024); print('survived')")
    assert res.oom_killed
    assert res.exit_code == 137
    assert b"survived" not in res.stdout
    assert not res.timed_out


def test_wall_clock_limit_kills_the_whole_tree(backend: Backend, policy: SandboxPolicy) -> None:
    marker = f"sr-sleep-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-S', '-c', 'import time; time.sleep(600)', sys.argv[1]])\n"
        "time.sleep(600)\n"
    )
    t0 = time.monotonic()
    res = py(backend, policy.with_overrides(wall_clock_s=2), code, marker)
    elapsed = time.monotonic() - t0
    assert res.timed_out
    assert not res.oom_killed
    assert elapsed < 15
    assert host_processes_with(marker) == [], "a process of the sandbox outlived the timeout"


def test_selftest_worker_end_to_end(backend: Backend, policy: SandboxPolicy) -> None:
    events = list(run_worker(backend, policy.with_overrides(memory_mib=2048), SelftestRequest(
        task="selftest", seed=11, steps=8, matmul_size=32)))
    expected = selftest.greedy_tokens(selftest.build_weights(11), steps=8, seed=11)
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    assert tokens == expected
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == "".join(map(selftest.token_text, expected))
    stats = events[-1]
    assert isinstance(stats, StatsEvent)
    assert stats.generated_tokens == 8 and stats.device == "cpu"
    assert stats.detail["uid"] == 65534
    assert isinstance(stats.detail["matmul.max_rel_err"], float) and stats.detail["matmul.max_rel_err"] < 1e-5


def test_selftest_reads_weights_from_the_read_only_model_mount(backend: Backend, policy: SandboxPolicy,
                                                               tmp_path: Path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "selftest-model"
    d.mkdir(mode=0o755)
    save_file(selftest.build_weights(23), str(d / "selftest.safetensors"))
    (d / "selftest.safetensors").chmod(0o644)
    pol = policy.with_overrides(memory_mib=2048, model_dir=d)
    events = list(run_worker(backend, pol, SelftestRequest(task="selftest", seed=23, steps=5,
                                                            weights_file="selftest.safetensors")))
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == selftest.greedy_tokens(
        selftest.build_weights(23), steps=5, seed=23)
    assert isinstance(events[-1], StatsEvent) and events[-1].detail["weights"] == "file"
    # a weights file that is not there is a refusal reported by the worker
    with pytest.raises(ModelError) as info:
        list(run_worker(backend, pol, SelftestRequest(task="selftest", seed=1, weights_file="absent.safetensors")))
    assert info.value.rule == "sandbox.worker.selftest_weights"


def test_worker_reports_missing_cuda(backend: Backend, policy: SandboxPolicy) -> None:
    with pytest.raises(SandboxError) as info:
        list(run_worker(backend, policy.with_overrides(memory_mib=2048),
                        SelftestRequest(task="selftest", device="cuda")))
    assert info.value.rule == "sandbox.worker.no_cuda"
    assert "CUDA was requested" in info.value.message


class _HostileWorker(Backend):
    """Wraps a real backend but runs a hostile 'worker' that breaks the protocol, then hangs."""

    def __init__(self, inner: Backend, script: str) -> None:
        self.inner, self.script, self.name = inner, script, inner.name

    def python_argv(self) -> list[str]:
        return self.inner.python_argv()

    def worker_argv(self) -> list[str]:
        return [*self.python_argv(), "-c", self.script]

    def start(self, argv, policy, *, stdin=b""):  # type: ignore[no-untyped-def]
        return self.inner.start(argv, policy, stdin=stdin)


@pytest.mark.parametrize("line, what", [
    ('"x" * 200000', "line_too_long"),
    ("'{\"type\": \"shell\", \"cmd\": \"rm -rf /\"}'", "unknown_event"),
    ("'not json'", "bad_json"),
])
def test_protocol_violation_stops_the_sandbox(backend: Backend, policy: SandboxPolicy, line: str, what: str) -> None:
    marker = f"sr-hostile-{uuid.uuid4().hex}"
    script = (
        "import sys, time\n"
        "sys.stdout.write('{\"type\": \"token\", \"index\": 0, \"token_id\": 1}\\n')\n"
        f"sys.stdout.write({line} + '\\n'); sys.stdout.flush()\n"
        f"time.sleep(600)  # {marker}\n"
    )
    t0 = time.monotonic()
    with pytest.raises(ProtocolError) as info:
        for _ in run_worker(_HostileWorker(backend, script), policy, SelftestRequest(task="selftest")):
            pass
    assert info.value.rule == f"sandbox.protocol.{what}"
    assert time.monotonic() - t0 < 20
    assert host_processes_with(marker) == []


def test_generate_runs_the_demo_model_inside_the_sandbox(backend: Backend, policy: SandboxPolicy) -> None:
    """The worker's generate task: the verified (demo) model read from the read-only mount, tokens streamed."""
    from secure_run.model import GenerationConfig, load_for_inference
    from secure_run.model.demo import demo_model_dir

    d = Path(demo_model_dir())
    messages = (ChatMessage(role="user", content="Hello, sandbox!"),)
    with handed_off(d, policy.with_overrides(memory_mib=2048)) as (pol, pins):
        assert pol.model_dir is None  # the worker gets the sealed copies, not the folder
        req = GenerateRequest(task="generate", messages=messages, max_new_tokens=6, files=pins)
        events = list(run_worker(backend, pol, req))
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    # the same model and prompt on the host, outside any sandbox, greedy: the same tokens
    m = load_for_inference(d, device="cpu")
    prompt = m.tokenizer.encode(m.render_chat([{"role": "user", "content": "Hello, sandbox!"}]))
    assert tokens == list(m.generate(prompt, GenerationConfig(max_new_tokens=6)))
    stats = events[-1]
    assert isinstance(stats, StatsEvent) and stats.generated_tokens == len(tokens) and stats.prompt_tokens == len(prompt)
    assert stats.detail["uid"] == 65534


def test_generate_refuses_a_pin_whose_identity_is_not_the_sealed_copy(backend: Backend, policy: SandboxPolicy) -> None:
    from secure_run.model.demo import demo_model_dir

    d = Path(demo_model_dir())
    with handed_off(d, policy.with_overrides(memory_mib=2048)) as (pol, ids):
        first = sorted(n for n in ids if n.endswith(".safetensors"))[0]
        ident = ids[first].identity
        ids[first] = ids[first].model_copy(update={"identity": dataclasses.replace(ident, ino=ident.ino + 1)})
        req = GenerateRequest(task="generate", prompt="hi", max_new_tokens=2, files=ids)
        with pytest.raises(ModelError) as info:
            list(run_worker(backend, pol, req))
    assert info.value.exit_code == 1 and info.value.rule == "folder.unsealed"
    assert first in info.value.message


def test_worker_oom_and_timeout_are_reported(backend: Backend, policy: SandboxPolicy) -> None:
    """The real worker, killed by each limit, surfaces as SandboxOOM / SandboxTimeout (not a vague failure)."""
    big = SelftestRequest(task="selftest", seed=1, matmul_size=8192)  # ~1.5 GB of float64 operands
    with pytest.raises(SandboxOOM) as oom:
        list(run_worker(backend, policy.with_overrides(memory_mib=600), big))
    assert oom.value.rule == "sandbox.oom" and "600 MiB" in oom.value.message
    t0 = time.monotonic()
    with pytest.raises(SandboxTimeout) as slow:
        list(run_worker(backend, policy.with_overrides(memory_mib=2048, wall_clock_s=0.5), big))
    assert slow.value.rule == "sandbox.timeout"
    assert time.monotonic() - t0 < 10
