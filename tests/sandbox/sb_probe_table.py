"""Run the sandbox probes from inside each backend and print one markdown table (sandbox/README.md).

    python tests/sandbox/sb_probe_table.py namespace docker          # CPU host (this repo's tests)
    python tests/sandbox/sb_probe_table.py --gpu namespace docker    # GPU host (sandbox/gpu_docker_e2e.sh)

Every cell is what the probe observed inside (an errno name, ``ok``, a value). The probes are
``sb_probe_inside.py`` (network, capabilities, filesystem, seccomp, limits) plus native-code
execution (memfd, W+X), the host view (``$PYTHONPATH=/``, ``/sys/firmware``, ``/usr``), the CPU
quota and pid 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from sb_helpers import PROBE, Listener, py
from test_sandbox_hardening import NATIVE_CODE, VIEW

from secure_run.sandbox import SandboxPolicy
from secure_run.sandbox.backends import Backend, get_backend

CPU_BURN = ("import time\nt0, c0 = time.monotonic(), time.process_time()\n"
            "while time.monotonic() - t0 < 2.0: pass\nprint(round(time.process_time() - c0, 2))")


def _last_json(data: bytes) -> dict[str, Any]:
    lines = data.decode(errors="replace").strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def probe_backend(backend: Backend, *, gpu: bool) -> dict[str, Any]:
    policy = SandboxPolicy(memory_mib=2048, pids_limit=64, wall_clock_s=120, scratch_mib=16, shm_mib=16,
                           jit_cache_mib=16, gpu=gpu)
    out: dict[str, Any] = {}
    lst = Listener()
    try:
        res = py(backend, policy, PROBE, str(lst.port))
        out.update(_last_json(res.stdout) if res.exit_code == 0 else {"probe": f"exit {res.exit_code}"})
        out["host_listener_accepted"] = lst.accepted
    finally:
        lst.close()
    res = py(backend, policy, NATIVE_CODE)
    out.update(_last_json(res.stdout) if res.exit_code == 0 else {"native": f"exit {res.exit_code}"})
    with tempfile.TemporaryDirectory() as d:
        marker = Path(d) / "host-secret"
        marker.write_text("x")
        old = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = f"/:{d}:{old}"
        try:
            res = py(backend, policy, VIEW, str(marker))
        finally:
            os.environ["PYTHONPATH"] = old
        view = _last_json(res.stdout) if res.exit_code == 0 else {}
    out["pythonpath_root_sites_hold_etc_or_proc"] = any(
        {"etc", "proc"} & set(v) for v in view.get("sites", {}).values())
    out["host_file_visible"] = view.get("marker")
    out["sys_firmware"] = view.get("firmware")
    out["usr_entries"] = view.get("usr")
    out["pid_of_program"] = view.get("pid")
    res = py(backend, policy.with_overrides(cpus=0.25), CPU_BURN)
    out["cpu_seconds_in_2s_at_0.25_cores"] = res.stdout.decode().strip() if res.exit_code == 0 else f"exit {res.exit_code}"
    jit = py(backend, policy, "import os, stat; print(oct(stat.S_IMODE(os.stat('/var/cache/jit').st_mode)))")
    out["jit_tmpfs_mode"] = jit.stdout.decode().strip()
    t0 = time.monotonic()
    slow = py(backend, policy.with_overrides(wall_clock_s=2.0), "import time; time.sleep(60)")
    out["wall_clock_2s"] = f"timed_out={slow.timed_out} after {time.monotonic() - t0:.1f} s"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("backends", nargs="+", choices=["namespace", "docker"])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for name in args.backends:
        backend = get_backend(name, build=True) if name == "docker" else get_backend(name)
        try:
            results[name] = probe_backend(backend, gpu=args.gpu)
        except Exception as err:  # the table records what failed
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
    keys = sorted({k for r in results.values() for k in r})
    print("| probe | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys:
        cells = [json.dumps(results[b].get(k), separators=(",", ":"))[:120].replace("|", "/") for b in results]
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
