"""HTTP overhead of `secure-run serve`: the same warm worker, in-process vs through the OpenAI API.

One process opens one :class:`WarmSession` (the embedded demo on CPU by default: the gate once, one
Docker sandbox, weights loaded once) and serves it with the real app (runner/serve.py) on uvicorn
on loopback. Then, alternating so that both see the same machine load, it runs the same greedy
request

* in-process: ``WarmSession.complete`` directly, timed from the call to each Text event;
* over HTTP: the official ``openai`` client, streamed, timed from the call to each content chunk.

Reported per path (median over runs): time to first token, decode tok/s (tokens after the first
over the time after the first), end-to-end seconds; and the HTTP overhead per token, i.e. the
relative increase of the mean time per generated token (end-to-end / tokens). Target: < 5 %.

    .venv/bin/python bench/serve.py [--runs 5] [--max-tokens 32] [--out bench/out/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROMPT = "Tell me about secure model loading."


def _inprocess(session: Any, max_tokens: int, run: int) -> dict[str, float]:
    from dataclasses import replace

    from secure_run.runner.pipeline import Final, Text
    from secure_run.runner.warm import CompletionRequest

    sampling = replace(session.generation_defaults, temperature=0.0, seed=0, max_tokens=max_tokens, stop=())
    req = CompletionRequest(request_id=f"bench-inproc-{run}", messages=({"role": "user", "content": PROMPT},),
                            prompt=None, sampling=sampling, client="bench/serve.py")
    t0, c0 = time.perf_counter(), time.process_time()
    first: float | None = None
    tokens = 0
    for ev in session.complete(req, threading.Event()):
        if isinstance(ev, Text) and ev.text and first is None:
            first = time.perf_counter() - t0
        if isinstance(ev, Final):
            tokens = int(str(ev.stats.get("completion_tokens", 0)))
    return _summary(t0, c0, first, tokens)


def _http(client: Any, model: str, max_tokens: int) -> dict[str, float]:
    t0, c0, k0 = time.perf_counter(), time.process_time(), time.thread_time()
    first: float | None = None
    tokens = 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            temperature=0.0, seed=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    out = _summary(t0, c0, first, tokens)
    out["client_cpu_s_per_token"] = (time.thread_time() - k0) / tokens  # this thread: the openai client
    out["server_cpu_s_per_token"] = out["host_cpu_s_per_token"] - out["client_cpu_s_per_token"]
    return out


def _summary(t0: float, c0: float, first: float | None, tokens: int) -> dict[str, float]:
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0  # this process's CPU (server, client and host side of the worker)
    if first is None or tokens < 2:
        raise SystemExit(f"the run produced {tokens} tokens; the benchmark needs at least 2")
    return {"first_token_s": first, "total_s": total, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / max(total - first, 1e-9), "s_per_token": total / tokens,
            "host_cpu_s_per_token": cpu / tokens}


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--sandbox", choices=["docker", "namespace"], default="docker")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--model", type=Path, help="model folder (default: the embedded demo)")
    ap.add_argument("--policy", help="policy (required with --model)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/serve.json"))
    args = ap.parse_args()

    import openai

    from secure_run.runner.pipeline import GenerateOptions
    from secure_run.runner.serve import ServeSettings, create_app
    from secure_run.runner.warm import WarmSession

    os.environ.setdefault("XDG_STATE_HOME", tempfile.mkdtemp(prefix="bench-serve-"))
    t_open = time.perf_counter()
    session = WarmSession.open(GenerateOptions(model_dir=args.model, policy=args.policy, sandbox=args.sandbox,
                                               gpu=args.gpu))
    open_s = time.perf_counter() - t_open

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(session, ServeSettings()), log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none", max_retries=0)
    try:
        _inprocess(session, args.max_tokens, -1)  # warm-up of both paths (not timed)
        _http(client, session.model_id, args.max_tokens)
        inproc: list[dict[str, float]] = []
        http: list[dict[str, float]] = []
        for i in range(args.runs):
            inproc.append(_inprocess(session, args.max_tokens, i))
            http.append(_http(client, session.model_id, args.max_tokens))
    finally:
        server.should_exit = True
        thread.join(timeout=60)  # the app's shutdown closes the session
        sock.close()

    per_tok_in, per_tok_http = _median(inproc, "s_per_token"), _median(http, "s_per_token")
    # paired (each HTTP run against the in-process run just before it): the machine's load drifts
    paired = statistics.median(h["s_per_token"] / i["s_per_token"] - 1.0 for i, h in zip(inproc, http))
    cpu_extra = _median(http, "host_cpu_s_per_token") - _median(inproc, "host_cpu_s_per_token")
    server_extra = _median(http, "server_cpu_s_per_token") - _median(inproc, "host_cpu_s_per_token")
    doc = {
        "bench": "serve", "backend": args.sandbox, "gpu": args.gpu, "model": session.model_id,
        "max_tokens": args.max_tokens, "runs": args.runs, "open_s": round(open_s, 3),
        "inprocess": inproc, "http": http,
        "median": {
            path: {k: _median(rs, k) for k in ("first_token_s", "decode_tok_s", "total_s", "tokens", "s_per_token",
                                               "host_cpu_s_per_token")}
            for path, rs in (("inprocess", inproc), ("http", http))
        },
        "http_overhead_per_token": paired,
        "http_overhead_per_token_of_medians": per_tok_http / per_tok_in - 1.0,
        # the extra host CPU the HTTP path spends per token (server + client), as a share of the time
        # per token: what it costs on an otherwise idle machine, independent of the load of a shared one
        "http_extra_cpu_s_per_token": cpu_extra,
        "http_cpu_overhead_per_token": cpu_extra / per_tok_in,
        # the same without the openai client's own work (its thread's CPU): what the server adds
        "server_extra_cpu_s_per_token": server_extra,
        "server_cpu_overhead_per_token": server_extra / per_tok_in,
        "http_first_token_overhead_s": _median(http, "first_token_s") - _median(inproc, "first_token_s"),
        "target_overhead": 0.05,
        "host": {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    m = doc["median"]
    print(f"{'path':<12}{'first token s':>15}{'decode tok/s':>14}{'total s':>10}{'tokens':>8}{'ms/token':>10}"
          f"{'host CPU ms/token':>19}")
    for path in ("inprocess", "http"):
        r = m[path]
        print(f"{path:<12}{r['first_token_s']:>15.3f}{r['decode_tok_s']:>14.2f}{r['total_s']:>10.3f}"
              f"{r['tokens']:>8.0f}{1000 * r['s_per_token']:>10.2f}{1000 * r['host_cpu_s_per_token']:>19.3f}")
    ok = doc["http_overhead_per_token"] < doc["target_overhead"]
    print(f"HTTP overhead per token (wall, paired median): {100 * doc['http_overhead_per_token']:+.2f} % "
          f"(target < 5 %: {'met' if ok else 'NOT met'}); extra host CPU per token "
          f"{1000 * cpu_extra:.3f} ms = {100 * doc['http_cpu_overhead_per_token']:.2f} % of the time per token "
          f"(server side alone {1000 * server_extra:.3f} ms = {100 * doc['server_cpu_overhead_per_token']:.2f} %); "
          f"first-token overhead {1000 * doc['http_first_token_overhead_s']:+.1f} ms; "
          f"session open (gate + sandbox + load) {open_s:.2f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
