"""Cold start and warm second turn on the embedded demo (CPU).

* cold: `secure-run generate`, from process start to the first token. Docker backend, image
  already built (target C1 in spec/performance.md: <= 10 s). Each run is a fresh `secure-run`
  process (verification, policy, a fresh container, model load inside it), timed from just before
  the process is spawned to the moment its first "text" JSON line arrives.
* warm second turn (issue 12): one WarmSession (the gate once, one sandbox, weights loaded once);
  each run is a new two-turn chat, timed from the second turn's request (the user's prompt) to
  its first released text (target <= 0.3 s). Also reported: the worker's prefilled vs reused
  tokens for that turn, and the load counter (must stay 1).

    .venv/bin/python bench/coldstart.py [--runs 5] [--warm-runs 10] [--skip-cold] [--out bench/out/coldstart.json]
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


def warm_runs(state: Path, backend: str, runs: int) -> dict[str, object]:
    """Second chat turns in one warm session: seconds from the request to the first released text."""
    import threading

    from secure_run.runner.pipeline import Final, GenerateOptions, Text
    from secure_run.runner.warm import CompletionRequest, SamplingParams, WarmSession

    os.environ["XDG_STATE_HOME"] = str(state)
    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=0, max_tokens=8)
    t0 = time.perf_counter()
    warm = WarmSession.open(GenerateOptions(sandbox=backend))  # type: ignore[arg-type]
    open_s = time.perf_counter() - t0

    def turn(rid: str, messages: tuple[dict[str, str], ...], session: str) -> tuple[str, float, dict[str, object]]:
        start = time.perf_counter()
        first = None
        text = ""
        stats: dict[str, object] = {}
        req = CompletionRequest(request_id=rid, messages=messages, prompt=None, sampling=greedy, client="bench",
                                session_id=session)
        for ev in warm.complete(req, threading.Event()):
            if isinstance(ev, Text):
                if first is None:
                    first = time.perf_counter() - start
                text += ev.text
            elif isinstance(ev, Final):
                stats = ev.stats
        return text, first if first is not None else float("nan"), stats

    rows = []
    try:
        for i in range(runs):
            u1 = {"role": "user", "content": f"Tell me about verified loading, run {i}."}
            reply, first1, _ = turn(f"w{i}-1", (u1,), f"bench-{i}")
            u2 = {"role": "user", "content": "And what happens on the second turn?"}
            _, first2, s2 = turn(f"w{i}-2", (u1, {"role": "assistant", "content": reply}, u2), f"bench-{i}")
            rows.append({"first_turn_first_text_s": first1, "second_turn_first_text_s": first2,
                         "second_turn_first_token_s": s2.get("first_token_seconds"),
                         "second_turn_worker_first_token_s": s2.get("worker_first_token_seconds"),
                         "prefilled_tokens": s2.get("prefilled_tokens"), "reused_tokens": s2.get("reused_tokens"),
                         "worker_loads": s2.get("worker_loads")})
        loads = warm.metrics()["worker_loads_total"]
    finally:
        warm.close()
    second = [float(r["second_turn_first_text_s"]) for r in rows]  # type: ignore[arg-type]
    return {"backend": backend, "open_s": open_s, "runs": rows, "worker_loads_total": loads,
            "median_second_turn_first_text_s": statistics.median(second), "max_second_turn_first_text_s": max(second),
            "target_s": 0.3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backend", choices=["docker", "namespace"], default="docker")
    ap.add_argument("--warm-runs", type=int, default=10)
    ap.add_argument("--skip-cold", action="store_true", help="only the warm second-turn row")
    ap.add_argument("--out", type=Path, default=Path("bench/out/coldstart.json"))
    args = ap.parse_args()
    doc: dict[str, object] = {"bench": "coldstart", "backend": args.backend, "machine": platform.node(),
                              "cpus": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        one_run(state, args.backend)  # warm-up: builds the image if it is missing (not timed)
        if not args.skip_cold:
            runs = [one_run(state, args.backend) for _ in range(args.runs)]
            first = [r["first_token_s"] for r in runs]
            doc.update({
                "runs": runs, "median_first_token_s": statistics.median(first), "min_first_token_s": min(first),
                "median_sandbox_start_s": statistics.median(r["sandbox_start_s"] for r in runs), "target_s": 10.0,
            })
        warm = warm_runs(state, args.backend, args.warm_runs)
        doc["warm_second_turn"] = warm
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'row':<22} {'backend':<10} {'runs':>4} {'median (s)':>11} {'min/max (s)':>12} {'target':>8}")
    if not args.skip_cold:
        print(f"{'cold: first token':<22} {args.backend:<10} {args.runs:>4} {doc['median_first_token_s']:>11.3f} "
              f"{doc['min_first_token_s']:>12.3f} {'<= 10':>8}")
    rows = warm["runs"]
    assert isinstance(rows, list)
    print(f"{'warm: 2nd turn text':<22} {args.backend:<10} {len(rows):>4} "
          f"{warm['median_second_turn_first_text_s']:>11.3f} {warm['max_second_turn_first_text_s']:>12.3f} "
          f"{'<= 0.3':>8}")
    pre = [r["prefilled_tokens"] for r in rows]
    reused = [r["reused_tokens"] for r in rows]
    print(f"warm session: opened in {warm['open_s']:.2f} s, worker loads {warm['worker_loads_total']:.0f}, "
          f"2nd turn prefilled {pre} tokens, reused {reused}")


if __name__ == "__main__":
    main()
