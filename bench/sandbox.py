"""Sandbox overheads: image build, start-to-exit of a trivial process, the worker's selftest.

    .venv/bin/python bench/sandbox.py [--repeat 5] [--rebuild]

Prints a small table and writes bench/out/sandbox.json. ``--rebuild`` removes the current
runtime image first, to time a cold build (FROM scratch, build context streamed from this host).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from secure_run.sandbox import SandboxPolicy, SelftestRequest, get_backend, run_worker


def _median(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    from secure_run.sandbox._internal.docker_backend import connect
    from secure_run.sandbox._internal.image import ensure_image, plan_image

    results: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = plan_image()
    results["image plan + digest (s)"] = time.perf_counter() - t0
    client = connect()
    if args.rebuild and client.images.list(name=plan.tag):
        client.images.remove(plan.tag, force=True)
    t0 = time.perf_counter()
    ensure_image(client, build=True)
    results["ensure_image (s)" + (" cold build" if args.rebuild else "")] = time.perf_counter() - t0
    policy = SandboxPolicy(memory_mib=2048, pids_limit=256, wall_clock_s=120)
    for name in ("docker", "namespace"):
        backend = get_backend(name)  # type: ignore[arg-type]
        argv = [*backend.python_argv(), "-c", "pass"]
        results[f"{name}: python -c pass, start to exit (s)"] = _median(
            lambda b=backend, a=argv: b.run(a, policy), args.repeat)
        req = SelftestRequest(task="selftest", seed=1, steps=8)
        results[f"{name}: selftest worker incl. torch import (s)"] = _median(
            lambda b=backend, r=req: list(run_worker(b, policy, r)), max(1, args.repeat // 2))
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:7.2f}")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "sandbox.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
