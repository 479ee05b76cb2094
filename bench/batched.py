"""Batched decode (issue 12, item 4): aggregate decode tok/s at 1, 4 and 16 concurrent streams.

Two levels, each in its own section (a failure is reported, the run goes on):

* **model**: the full-size Superlinear-Exp config with random bf16 weights, built by
  ``bench/model.py``'s ``build_model`` (imported, not copied), on one GPU. A
  :class:`~secure_run.model.cache.SlotPool` of 16 rows, each active row filled directly (random
  K/V up to its context, random Mamba states) at its own context ``ctx - 61 * row`` (so every row
  decodes at a different position), then :class:`~secure_run.model.model.BatchDecoder` steps:
  the first step of a batch size compiles and captures its CUDA graph (timed separately), then
  ``--steps`` steps are timed, each including the greedy argmax of every row read back to the
  host (what the worker pays per step). Aggregate tok/s = streams x steps / seconds. For
  reference, the single-sequence ``DecodeGraph`` at the same context (``bench/model.py``'s
  ``decode_row``).
* **worker**: the persistent worker in-process (no sandbox; the demo folder sealed and handed
  over a real hand-off socket, every file pinned as the runner pins it) with the demo model on the device: N plain
  greedy turns of ``--worker-tokens`` tokens written at once, timed from the first request line
  to the last stats event; aggregate tok/s = tokens generated / seconds. One warm-up round first
  (the graphs of every batch size are captured once, for the worker's life).
* **kernel** (``--kernel``): the span attention alone at the full-size shapes, bf16, per call
  captured in a CUDA graph (as in the decode step): the shared-position batch-1 decode, 16 rows at
  their own positions as a loop of batch-1 calls (what the model did before per-row positions
  reached the kernels), and as one call with ``cache_position`` [16, 1] when the installed kernels
  take it (``rows_supported``). Run it against another checkout (PYTHONPATH) for a before/after.

Prints a table last and writes ``$OUT/batched_bench.json`` (or ``--out``).

    python3 -P bench/batched.py [--ctx 4096] [--steps 64] [--skip-model] [--skip-worker] [--kernel]
    BENCH_DEVICE=cpu python3 -P bench/batched.py --smoke        # a tiny model on the CPU, end to end
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
STREAMS = (1, 4, 16)


def _bench_model() -> Any:
    """bench/model.py as a module (its builder and the full-size config; DEV from BENCH_DEVICE)."""
    spec = importlib.util.spec_from_file_location("bench_model", HERE / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = mod
    spec.loader.exec_module(mod)
    return mod


def profile_step(model: Any, dec: Any, n: int, steps: int = 3) -> dict[str, Any]:
    """GPU time of one eager batched step of ``n`` rows, per mixer kind and top kernels (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    toks = {r: 17 + r for r in range(n)}
    dec.step(toks)
    torch.cuda.synchronize()
    bench_model = sys.modules.get("bench_model") or _bench_model()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            dec.step(toks)
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        dev_us = float(getattr(ev, "self_device_time_total", 0.0) or 0.0)
        if dev_us > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.key[:60]] = round(dev_us / steps / 1e3, 3)
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:10])
    return {"streams": n, "gpu_busy_ms": round(sum(kernels.values()), 3), "parts_ms": bench_model.kernel_parts(kernels),
            "top_kernels_ms": top}


def model_rows(bm: Any, ctx: int, steps: int, smoke: bool, profile: bool = False) -> dict[str, Any]:
    """Aggregate decode tok/s of BatchDecoder at 1, 4 and 16 streams on the full-size config."""
    from secure_run.model.cache import SlotPool
    from secure_run.model.config import config_from_dict
    from secure_run.model.model import BatchDecoder

    if ctx <= 61 * max(STREAMS):
        raise SystemExit(f"--ctx must be > {61 * max(STREAMS)} (row r decodes at ctx - 61 * r)")
    cfg = config_from_dict(bm.FULL | bm.SMOKE if smoke else bm.FULL)
    t0 = time.perf_counter()
    model = bm.build_model(cfg)
    out: dict[str, Any] = {"config": "smoke" if smoke else "full-size", "context": ctx, "steps": steps,
                           "build_s": round(time.perf_counter() - t0, 2),
                           "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}
    bm.log(f"built {out['params_b']} B params in {out['build_s']} s")
    rows = max(STREAMS)
    pool = SlotPool(cfg, rows, ctx + steps + 16, device=bm.DEV, dtype=bm.DT)
    g = torch.Generator(device=bm.DEV).manual_seed(ctx)
    for i in cfg.attention_layers:
        pool.cache.kv(i).k.normal_(generator=g)
        pool.cache.kv(i).v.normal_(generator=g)
    for _ in range(rows):
        pool.acquire()  # (zeroes the Mamba states; filled below)
    for i in cfg.layers_of("mamba"):
        pool.cache.mamba(i).conv.normal_(generator=g)
        pool.cache.mamba(i).ssm.normal_(0.0, 0.1, generator=g)
    dec = BatchDecoder(model, pool, graphs=bm.DEV == "cuda")
    per: dict[str, Any] = {}
    for n in STREAMS:
        for r in range(rows):
            pool.lengths[r] = ctx - 61 * r  # every row at its own position
        live = list(range(n))
        toks = {r: 17 + r for r in live}
        c0 = time.perf_counter()
        logits = dec.step(toks)  # first use of this batch size: eager step + capture
        nxt = torch.argmax(logits[:n], dim=-1).tolist()
        capture_s = time.perf_counter() - c0
        bm.sync()
        t1 = time.perf_counter()
        for _ in range(steps):
            logits = dec.step({r: nxt[r] for r in live})
            nxt = torch.argmax(logits[:n], dim=-1).tolist()  # one host read per step (all rows)
        secs = time.perf_counter() - t1
        per[str(n)] = {"streams": n, "step_ms": round(1e3 * secs / steps, 3),
                       "aggregate_tok_s": round(n * steps / secs, 1),
                       "per_stream_tok_s": round(steps / secs, 1), "first_step_with_capture_s": round(capture_s, 3),
                       "contexts": [ctx - 61 * r for r in live]}
        bm.log(f"[model] {n:2d} streams: {per[str(n)]['aggregate_tok_s']} tok/s aggregate, "
               f"{per[str(n)]['step_ms']} ms/step (first step + capture {capture_s:.2f} s)")
    out["batched"] = per
    if profile:
        for r in range(rows):
            pool.lengths[r] = ctx - 61 * r
        out["profile"] = profile_step(model, BatchDecoder(model, pool, graphs=False), max(STREAMS))
        bm.log(f"[model] profile @{max(STREAMS)} streams: {out['profile']}")
    out["graph_captures"] = dec.captures
    again = dec.captures
    dec.step({0: 1})  # a later request at a batch size seen before: replay, no capture
    out["capture_reused"] = dec.captures == again
    del dec, pool
    if bm.DEV == "cuda":
        torch.cuda.empty_cache()
    try:
        out["single_decode_graph"] = bm.decode_row(model, ctx, steps)
    except Exception as err:  # the reference row is optional
        out["single_decode_graph"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    del model
    return out


def _graph_us(fn: Any, inner: int = 20, reps: int = 10) -> float:
    """Microseconds per ``fn()`` call: ``inner`` calls captured in one CUDA graph, median of ``reps`` replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(1e3 * a.elapsed_time(b) / inner)
    return round(sorted(times)[len(times) // 2], 2)


def _kernel_ctx(attn: Any, params: Any, heads: tuple[int, int, int], ctx: int, rows: int, per_row: bool) -> dict[str, Any]:
    """One context of :func:`kernel_rows` (random bf16 K/V of ``rows`` rows, ``ctx + 80`` slots)."""
    hq, hkv, d = heads
    lkv = ctx + 80
    g = torch.Generator(device="cuda").manual_seed(ctx)
    k, v = (torch.randn(rows, hkv, lkv, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q1, q2 = (torch.randn(rows, hq, 1, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.tensor([[ctx - 61 * r] for r in range(rows)], device="cuda")
    o = torch.empty_like(q2)
    row: dict[str, Any] = {"context": ctx, "rows": rows, "positions": [ctx - 61 * r for r in range(rows)]}
    row["shared_b1_us"] = _graph_us(lambda: attn(q1[:1], q2[:1], k[:1], v[:1], pos[0], params, out=o[:1]))
    row["loop_us"] = _graph_us(lambda: [attn(q1[r:r + 1], q2[r:r + 1], k[r:r + 1], v[r:r + 1], pos[r], params,
                                             out=o[r:r + 1]) for r in range(rows)])
    if per_row:
        row["rows_one_call_us"] = _graph_us(lambda: attn(q1, q2, k, v, pos, params, out=o))
    return row


def kernel_rows(bm: Any, ctxs: list[int], rows: int = 16) -> dict[str, Any]:
    """Span attention alone (full-size heads, bf16): shared batch-1 decode, and ``rows`` rows at
    positions ``ctx - 61 r`` as a loop of batch-1 calls or as one per-row-position call."""
    import secure_run.kernels._checks as checks
    from secure_run.kernels.span_triton import superlinear_attention_triton as attn
    from secure_run.model.config import config_from_dict

    cfg = config_from_dict(bm.FULL)
    params = cfg.span_params()
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    out: dict[str, Any] = {"rows_supported": hasattr(checks, "per_row_positions"), "heads": list(heads),
                           "mode": params.position_mode}
    for ctx in ctxs:
        out[str(ctx)] = _kernel_ctx(attn, params, heads, ctx, rows, out["rows_supported"])
        bm.log(f"[kernel] {out[str(ctx)]}")
        torch.cuda.empty_cache()
    return out


class _Events:
    """The worker's output: counts tokens and notes when the last stats event came."""

    def __init__(self) -> None:
        self.tokens = 0
        self.stats = 0
        self.last = 0.0
        self.errors: list[str] = []

    def write(self, b: bytes) -> int:
        ev = json.loads(b)
        if ev["type"] == "token":
            self.tokens += 1
        elif ev["type"] == "stats":
            self.stats += 1
            self.last = time.perf_counter()
        elif ev["type"] == "error":
            self.errors.append(str(ev.get("message"))[:200])
        return len(b)

    def flush(self) -> None:
        pass


def worker_rows(device: str, tokens: int) -> dict[str, Any]:
    """Aggregate tok/s of the persistent worker (demo model) at 1, 4 and 16 concurrent turns."""
    import secure_run.sandbox._internal.warm_worker as ww
    import secure_run.sandbox.worker as sandbox_worker
    from secure_run.manifests.sealed import seal_folder
    from secure_run.model.demo import demo_model_dir
    from secure_run.sandbox.handoff import HandoffServer
    from secure_run.sandbox.protocol import PinnedFileModel, parse_persistent_request, parse_request
    from secure_run.sandbox.worker import _error_event

    root = Path(demo_model_dir())
    sink = _Events()
    with seal_folder(root, sorted(p.name for p in root.iterdir())) as folder, \
            HandoffServer([(c.name, c.fd) for c in folder.copies()]) as server:
        sandbox_worker.HANDOFF_SOCKET = str(server.mount_dir / "sealed.sock")  # type: ignore[attr-defined]
        pins = {c.name: PinnedFileModel(sha256=c.sha256, identity=c.identity).model_dump(mode="json")
                for c in folder.copies()}
        load = parse_request(json.dumps({"task": "load", "request": "load", "device": device, "max_batch": 16,
                                         "files": pins}).encode() + b"\n")
        worker = ww.WarmWorker.load(load, lambda ev: sink.write(ev.model_dump_json().encode()))  # type: ignore[arg-type]
    r, w = os.pipe()
    thread = threading.Thread(target=worker.serve, args=(os.fdopen(r, "rb"),
                                                         lambda ev: sink.write(ev.model_dump_json().encode())),
                              kwargs={"parse": parse_persistent_request, "error_event": _error_event}, daemon=True)
    thread.start()
    out: dict[str, Any] = {"device": device, "tokens_per_turn": tokens, "model": "demo (superlinear-demo)"}
    rid = 0

    def round_of(n: int) -> dict[str, Any]:
        nonlocal rid
        sink.tokens = sink.stats = 0
        lines = []
        for i in range(n):
            rid += 1
            lines.append(json.dumps({"task": "turn", "request": f"b{rid}", "prompt": f"stream {i}: tell me more",
                                     "max_new_tokens": tokens, "temperature": 0.0}).encode() + b"\n")
        t0 = time.perf_counter()
        os.write(w, b"".join(lines))
        while sink.stats < n:
            time.sleep(0.001)
        secs = sink.last - t0
        return {"streams": n, "generated": sink.tokens, "seconds": round(secs, 3),
                "aggregate_tok_s": round(sink.tokens / secs, 1)}

    out["warmup"] = round_of(16)
    for n in STREAMS:
        out[str(n)] = round_of(n)
        print(f"[worker] {n:2d} streams: {out[str(n)]['aggregate_tok_s']} tok/s aggregate "
              f"({out[str(n)]['generated']} tokens in {out[str(n)]['seconds']} s)", flush=True)
    os.close(w)
    thread.join(30)
    out["errors"] = sink.errors
    return out


def table(res: dict[str, Any]) -> str:
    lines = ["| level | streams | aggregate tok/s | per stream tok/s | ms/step |", "|---|---|---|---|---|"]
    m = res.get("model", {})
    for n in STREAMS:
        row = m.get("batched", {}).get(str(n))
        if row:
            lines.append(f"| model ({m['config']}, ~{m['context']} ctx) | {n} | {row['aggregate_tok_s']} | "
                         f"{row['per_stream_tok_s']} | {row['step_ms']} |")
    single = m.get("single_decode_graph", {})
    if isinstance(single, dict) and "error" not in single and single:
        lines.append(f"| model, single-sequence DecodeGraph + greedy (reference) | 1 | "
                     f"{round(single['greedy_tok_s'], 1)} | {round(single['greedy_tok_s'], 1)} | "
                     f"{round(single['graph_step_ms'], 3)} (bare step) |")
    kn = res.get("kernel", {})
    for key, row in kn.items():
        if isinstance(row, dict) and "loop_us" in row:
            lines.append(f"| kernel, ctx {key}: shared batch-1 {row['shared_b1_us']} us; {row['rows']} rows: loop "
                         f"{row['loop_us']} us, one call {row.get('rows_one_call_us', 'n/a')} us | | | | |")
    wk = res.get("worker", {})
    for n in STREAMS:
        row = wk.get(str(n))
        if row:
            lines.append(f"| worker (demo, {wk['device']}) | {n} | {row['aggregate_tok_s']} | "
                         f"{round(row['aggregate_tok_s'] / n, 1)} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--worker-tokens", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="also profile one eager step at 16 streams (CUDA)")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-worker", action="store_true")
    ap.add_argument("--kernel", action="store_true", help="also time the span attention alone (CUDA)")
    ap.add_argument("--kernel-ctx", type=int, nargs="+", default=[4096, 1 << 20])
    ap.add_argument("--smoke", action="store_true", help="a tiny config (CPU self-check of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args(argv)
    bm = _bench_model()
    res: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name() if bm.DEV == "cuda" else platform.processor(),
                           "args": vars(args)}
    status = 0
    for name, fn in (("kernel", lambda: kernel_rows(bm, args.kernel_ctx)),
                     ("model", lambda: model_rows(bm, args.ctx, args.steps, args.smoke, args.profile)),
                     ("worker", lambda: worker_rows(bm.DEV, args.worker_tokens))):
        if (name == "kernel" and not args.kernel) or (name != "kernel" and getattr(args, f"skip_{name}")):
            continue
        try:
            res[name] = fn()
        except Exception as err:  # a failed section is reported, the run goes on
            import traceback

            traceback.print_exc(limit=8)
            res[name] = {"error": f"{type(err).__name__}: {err}"[:600]}
            status = 1
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "batched_bench.json", "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    print(table(res))
    return status


if __name__ == "__main__":
    sys.exit(main())
