"""The namespace sandbox on a GPU host: CUDA matmul and a Triton kernel inside it (marker gpu).

On CPU hosts the same path runs with the Triton interpreter (marker namespace), so the in-sandbox
Triton import, the JIT-cache mount and the request plumbing are exercised in CI too.
"""

from __future__ import annotations

import json
import os

import pytest

from secure_run.sandbox import SandboxPolicy, SelftestRequest, StatsEvent, TokenEvent, run_worker
from secure_run.sandbox._internal import selftest
from secure_run.sandbox._internal.namespace_backend import NamespaceBackend

GPU_POLICY = SandboxPolicy(gpu=True, jit_cache_mib=1024, memory_mib=32768, pids_limit=1024, wall_clock_s=300,
                           scratch_mib=1024, shm_mib=1024)


@pytest.mark.namespace
def test_triton_interpreter_inside_the_namespace_sandbox(namespace_backend: NamespaceBackend) -> None:
    pytest.importorskip("triton")
    policy = SandboxPolicy(jit_cache_mib=64, memory_mib=4096, wall_clock_s=120, env={"TRITON_INTERPRET": "1"})
    events = list(run_worker(namespace_backend, policy, SelftestRequest(task="selftest", seed=3, steps=4,
                                                                         triton=True)))
    stats = events[-1]
    assert isinstance(stats, StatsEvent)
    assert stats.detail["triton.max_abs_err"] == 0.0
    assert stats.detail["uid"] == 65534


@pytest.mark.gpu
@pytest.mark.namespace
def test_cuda_matmul_and_triton_kernel_inside_the_namespace_sandbox(namespace_backend: NamespaceBackend) -> None:
    import torch

    req = SelftestRequest(task="selftest", device="cuda", seed=5, steps=8, triton=True, matmul_size=4096)
    events = list(run_worker(namespace_backend, GPU_POLICY, req))
    stats = events[-1]
    assert isinstance(stats, StatsEvent)
    print("GPU-SANDBOX-STATS " + json.dumps(stats.model_dump(mode="json")))
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    # the same model on the same GPU outside the sandbox gives the same tokens
    assert tokens == selftest.greedy_tokens(selftest.build_weights(5), steps=8, seed=5, device="cuda")
    assert stats.detail["cuda.device"] == torch.cuda.get_device_name(0)
    assert stats.detail["triton.max_abs_err"] == 0.0
    assert isinstance(stats.detail["matmul.max_rel_err"], float) and stats.detail["matmul.max_rel_err"] < 1e-2
    assert stats.detail["uid"] == 65534 and stats.detail["gid"] == 65534


@pytest.mark.gpu
@pytest.mark.namespace
def test_gpu_sandbox_keeps_every_control(namespace_backend: NamespaceBackend) -> None:
    code = ("import json, os, socket, errno\n"
            "st = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
            "def t(f):\n"
            "    try:\n"
            "        f(); return 'ok'\n"
            "    except OSError as e:\n"
            "        return errno.errorcode[e.errno]\n"
            "print(json.dumps({'CapEff': st['CapEff'].strip(), 'NoNewPrivs': st['NoNewPrivs'].strip(),"
            " 'Seccomp': st['Seccomp'].strip(), 'uid': os.getuid(),"
            " 'ifaces': [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]],"
            " 'write_root': t(lambda: open('/x', 'w')), 'inet': t(lambda: socket.socket(socket.AF_INET)),"
            " 'nvidia': sorted(d for d in os.listdir('/dev') if d.startswith('nvidia'))}))")
    res = namespace_backend.run([*namespace_backend.python_argv(), "-c", code], GPU_POLICY)
    assert res.exit_code == 0, res.stderr.decode(errors="replace")[-2000:]
    r = json.loads(res.stdout)
    print("GPU-SANDBOX-CONTROLS " + json.dumps(r))
    assert r["CapEff"] == "0000000000000000" and r["NoNewPrivs"] == "1" and r["Seccomp"] == "2"
    assert r["uid"] == 65534 and r["ifaces"] == ["lo"]
    assert r["write_root"] == "EROFS" and r["inet"] == "EPERM"
    assert "nvidiactl" in r["nvidia"] and any(n[6:].isdigit() for n in r["nvidia"])
    assert os.path.exists("/dev/nvidiactl")
