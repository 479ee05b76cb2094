"""Cold start: `secure-run generate` on the embedded demo, from process start to the first token.

CPU, Docker backend, image already built (target C1 in spec/performance.md: <= 10 s). Each run is
a fresh `secure-run` process (verification, policy, a fresh container, model load inside it),
timed from just before the process is spawned to the moment its first "text" JSON line arrives.

    .venv/bin/python bench/coldstart.py [--runs 5] [--out bench/out/coldstart.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "secure_run.runner.cli"]


def one_run(state: Path, backend: str) -> dict[str, float]:
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    args = [*CLI, "generate", "--prompt", "hello", "--max-new-tokens", "8", "--sandbox", backend, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    marks: dict[str, float] = {}
    for line in proc.stdout:
        ev = json.loads(line)
        now = time.perf_counter() - t0
        if ev.get("type") == "status" and ev.get("stage") == "sandbox":
            marks.setdefault("sandbox_start_s", now)
        if ev.get("type") == "text" and "first_token_s" not in marks:
            marks["first_token_s"] = now
        if ev.get("type") == "final":
            marks["total_s"] = now
    rc = proc.wait()
    if rc != 0 or "first_token_s" not in marks:
        raise SystemExit(f"generate failed (exit {rc}): {proc.stderr.read() if proc.stderr else ''}")
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backend", choices=["docker", "namespace"], default="docker")
    ap.add_argument("--out", type=Path, default=Path("bench/out/coldstart.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        one_run(state, args.backend)  # warm-up: builds the image if it is missing (not timed)
        runs = [one_run(state, args.backend) for _ in range(args.runs)]
    first = [r["first_token_s"] for r in runs]
    doc = {
        "bench": "coldstart", "backend": args.backend, "runs": runs,
        "median_first_token_s": statistics.median(first), "min_first_token_s": min(first),
        "median_sandbox_start_s": statistics.median(r["sandbox_start_s"] for r in runs),
        "target_s": 10.0, "machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'backend':<10} {'runs':>4} {'gate (s)':>9} {'first token median (s)':>23} {'min':>6} {'target':>7}")
    print(f"{args.backend:<10} {len(runs):>4} {doc['median_sandbox_start_s']:>9.2f} "
          f"{doc['median_first_token_s']:>23.2f} {doc['min_first_token_s']:>6.2f} {'<= 10':>7}")


if __name__ == "__main__":
    main()
