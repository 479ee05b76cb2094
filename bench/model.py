"""Whole-model benchmark: the full-size Superlinear-Exp config on one GPU, random weights, batch 1, bf16.

Rows (each in its own try block; a failure is reported, the run goes on):

* decode tok/s at 4K / 128K / 1M / 10M context, CUDA-graph replay of one step (the cache is
  filled directly: K/V random normal, Mamba states random; ``cache.filled`` set to the context),
  both the bare step and the step plus a greedy argmax read back to the host (what ``generate``
  pays per token);
* where a decode token's GPU time goes at 1M (profiler over eager steps, grouped per mixer kind,
  plus the graph step's wall time);
* prefill tok/s at 32K / 128K / 1M through the model with the chunk chosen from free memory
  (:func:`secure_run.model.generate.choose_prefill_chunk`), and its peak memory;
* time to first token of ``generate`` for a 4K prompt (median of 3 after a warm-up) and the
  decode rate of ``generate`` itself;
* transformers' NemotronH at the same shapes where it fits (same config without the attention
  change, its own random weights), after our model is freed.

Weights: normal(0, 0.02) for every matrix (router included), norms 1, Mamba A_log / dt_bias / D
at the module defaults. Prints a table last and writes ``$OUT/model_bench.json``.

Run (``secure_run`` importable): ``python bench/model.py [--quick] [--skip-hf] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch

from secure_run.model.cache import HybridCache
from secure_run.model.config import ModelConfig, config_from_dict
from secure_run.model.generate import (
    GenerationConfig,
    activation_bytes_per_token,
    choose_prefill_chunk,
    generate,
)
from secure_run.model.model import DecodeGraph, HybridLM
from secure_run.model.moe import MoE

DEV = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" only for the --smoke self-check
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
GIB = 1 << 30

#: The released configuration (spec/model.md 1.1-1.2), the keys our config accepts today.
FULL: dict[str, Any] = {
    "model_type": "superlinear-exp", "vocab_size": 131072, "hidden_size": 2688, "num_hidden_layers": 52,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "mamba_num_heads": 64,
    "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4, "chunk_size": 128,
    "use_conv_bias": True, "time_step_limit": [0.0, math.inf], "n_routed_experts": 128, "num_experts_per_tok": 6,
    "n_shared_experts": 1, "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712,
    "intermediate_size": 1856, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "span_attention_sw_index": 65,
    "span_attention_num_spans": 3, "span_attention_backward_factor": 3, "span_attention_forward_factor": 1,
    "span_attention_search_power": 0.55, "span_attention_span_power": 0.55,
}


#: --smoke: a tiny variant (same layer pattern kinds) to check this script end to end on a CPU.
SMOKE: dict[str, Any] = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 4, "hybrid_override_pattern": "ME*E",
                         "num_attention_heads": 4, "head_dim": 16, "mamba_num_heads": 4, "mamba_head_dim": 16,
                         "ssm_state_size": 16, "n_groups": 2, "chunk_size": 16, "n_routed_experts": 8,
                         "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 48, "intermediate_size": 32,
                         "span_attention_sw_index": 4, "torch_dtype": "float32"}


def log(*a: object) -> None:
    print(*a, flush=True)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if DEV == "cuda" else float("nan")


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


class _EagerStep:
    """CPU stand-in of DecodeGraph for the --smoke self-check."""

    def __init__(self, model: HybridLM, cache: HybridCache) -> None:
        self.model, self.cache = model, cache

    def __call__(self, tok: int) -> torch.Tensor:
        out: torch.Tensor = self.model(torch.tensor([[tok]]), self.cache, check_ids=False)
        return out


_JSON_PATH: list[str] = []  # where the results are written after every section (a timeout keeps what ran)


@contextlib.contextmanager
def section(results: dict[str, Any], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    except Exception as err:  # a row that fails is reported, the run goes on
        results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[:600]
        log(f"[{name}] FAILED: {type(err).__name__}: {err}")
        traceback.print_exc(limit=6)
    finally:
        gc.collect()
        torch.cuda.empty_cache()
        results.setdefault("seconds", {})[name] = time.perf_counter() - t0
        log(f"[{name}] {time.perf_counter() - t0:.1f} s")
        if _JSON_PATH:
            with open(_JSON_PATH[0], "w") as fh:
                json.dump(results, fh, indent=1, default=str)


def build_model(cfg: ModelConfig) -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(cfg, device=DEV, dtype=DT).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                p.normal_(0.0, 0.02)
        for m in model.modules():
            if isinstance(m, MoE):
                m.stacked_experts()  # pack the experts once (views, no second copy)
                torch.cuda.empty_cache()
    for p in model.parameters():
        p.requires_grad_(False)
    sync()
    return model


def fill_cache(model: HybridLM, ctx: int, extra: int) -> HybridCache:
    """A cache of ctx + extra slots whose first ctx positions hold random K/V and random Mamba states."""
    cache = model.new_cache(1, ctx + extra)
    g = torch.Generator(device=DEV).manual_seed(ctx)
    for i in model.config.attention_layers:
        kv = cache.kv(i)
        kv.k.normal_(generator=g)
        kv.v.normal_(generator=g)
    for i in model.config.layers_of("mamba"):
        st = cache.mamba(i)
        st.conv.normal_(generator=g)
        st.ssm.normal_(0.0, 0.1, generator=g)
    cache.filled = ctx
    sync()
    return cache


def clone_cache(model: HybridLM, cache: HybridCache) -> HybridCache:
    twin = model.new_cache(cache.batch_size, cache.max_len)
    for i in model.config.attention_layers:
        twin.kv(i).k.copy_(cache.kv(i).k)
        twin.kv(i).v.copy_(cache.kv(i).v)
    for i in model.config.layers_of("mamba"):
        twin.mamba(i).conv.copy_(cache.mamba(i).conv)
        twin.mamba(i).ssm.copy_(cache.mamba(i).ssm)
    twin.filled = cache.filled
    return twin


def graph_vs_eager(model: HybridLM, ctx: int, steps: int = 8) -> dict[str, Any]:
    """Greedy decode from one filled cache: CUDA-graph replay vs the eager step (full-size model)."""
    cache = fill_cache(model, ctx, steps + 8)
    twin = clone_cache(model, cache)
    graph: Any = DecodeGraph(model, cache) if DEV == "cuda" else _EagerStep(model, cache)
    tg = te = 17
    toks_g, toks_e, worst = [], [], 0.0
    for _ in range(steps):
        lg = graph(tg).clone()
        le = model(torch.tensor([[te]], device=DEV), twin, check_ids=False)
        worst = max(worst, float((lg - le).abs().max() / le.abs().max()))
        tg, te = int(lg[0, -1].argmax()), int(le[0, -1].argmax())
        toks_g.append(tg)
        toks_e.append(te)
    return {"context": ctx, "steps": steps, "tokens_equal": toks_g == toks_e, "max_rel_logit_diff": worst,
            "graph_tokens": toks_g, "eager_tokens": toks_e}


@contextlib.contextmanager
def env_settings(spec: str) -> Iterator[None]:
    """Set ``ENV=VALUE[,ENV=VALUE]`` for the block, then restore the previous values."""
    pairs = [kv.split("=", 1) for kv in spec.split(",") if kv]
    if any(len(p) != 2 or not p[0] for p in pairs):
        raise SystemExit(f"--variant {spec!r}: expected ENV=VALUE[,ENV=VALUE]")
    old = {k: os.environ.get(k) for k, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def decode_row(model: HybridLM, ctx: int, steps: int) -> dict[str, Any]:
    cache = fill_cache(model, ctx, steps * 2 + 8)
    graph: Any = DecodeGraph(model, cache) if DEV == "cuda" else _EagerStep(model, cache)
    t0 = time.perf_counter()
    graph(17)
    sync()
    first = time.perf_counter() - t0  # eager step + capture
    for _ in range(3):
        graph(17)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        graph(17 + i)
    sync()
    step_ms = (time.perf_counter() - t0) * 1e3 / steps
    tok = 17
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = int(graph(tok)[0, -1].argmax())
    greedy_ms = (time.perf_counter() - t0) * 1e3 / steps
    row = {"context": ctx, "cache": "filled directly (random K/V and Mamba states)", "graph_step_ms": step_ms,
           "tok_s": 1e3 / step_ms, "greedy_tok_s": 1e3 / greedy_ms, "first_call_s": first,
           "peak_gib": peak_gib()}
    del graph, cache
    return row


#: Kernel name prefixes of each part of a step. The profiler does not tie Triton launches (driver
#: API) to the Python ranges they run in, so the parts are read from the kernel names instead.
KERNEL_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MoE experts", ("_up_gemv", "_down_gemv", "_down_finalize", "_up_gemm", "_down_gemm", "_sum_slots")),
    ("MoE router", ("_router",)),
    ("span attention", ("_decode_", "_search_kernel", "_pair_attn", "_merge_kernel")),
    ("Mamba-2", ("_ssm_step", "_conv_step", "_gated_norm", "_ssd_", "_conv_prefill")),
    ("dense projections", ("_gemv", "nvjet", "sm80_xmma_gemm", "sm90_xmma_gemm", "cutlass", "gemm")),
    ("add + RMSNorm", ("_add_rmsnorm",)),
)


def kernel_parts(kernels: dict[str, float]) -> dict[str, float]:
    """ms per part (KERNEL_PARTS, first match wins), the rest under "other (PyTorch ops)"."""
    parts: dict[str, float] = {}
    for name, ms in kernels.items():
        part = next((p for p, prefixes in KERNEL_PARTS if name.startswith(prefixes)), "other (PyTorch ops)")
        parts[part] = round(parts.get(part, 0.0) + ms, 4)
    return parts


def profile_decode(model: HybridLM, ctx: int, length: int = 1, steps: int = 5) -> dict[str, Any]:
    """GPU time of one step (``length`` new tokens at ``ctx``) per mixer kind (eager, under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    cache = fill_cache(model, ctx, length * (steps + 3) + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=DEV)
    for _ in range(2 if length == 1 else 1):
        model(ids, cache, check_ids=False, logits_to_keep=1)
    sync()
    acts = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if DEV == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(steps):
            model(ids, cache, check_ids=False, logits_to_keep=1)
        sync()
    kernels: dict[str, float] = {}
    busy = 0.0
    n_kernels = 0
    for ev in prof.key_averages():
        dev_us = float(getattr(ev, "self_device_time_total", 0.0) or 0.0)
        if dev_us > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.key] = dev_us / steps / 1e3
            busy += dev_us / steps / 1e3
            n_kernels += ev.count // steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    del cache
    return {"context": ctx, "new_tokens": length, "gpu_busy_ms": busy, "kernels_per_token": n_kernels,
            "parts_ms": kernel_parts(kernels), "top_kernels_ms": dict(top)}


def prefill_row(model: HybridLM, length: int) -> dict[str, Any]:
    cache = model.new_cache(1, length + 16)
    chunk = choose_prefill_chunk(model, length)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=DEV)
    reset_peak()
    sync()
    t0 = time.perf_counter()
    for s in range(0, length, chunk):
        model(ids[:, s:s + chunk], cache, logits_to_keep=1, check_ids=False)
    sync()
    dt = time.perf_counter() - t0
    row = {"length": length, "chunk": chunk, "seconds": dt, "tok_s": length / dt,
           "peak_gib": peak_gib(),
           "estimate_act_gib_per_chunk": activation_bytes_per_token(model.config, DT) * chunk / GIB}
    del cache, ids
    return row


def ttft_row(model: HybridLM, length: int = 4096, new: int = 64) -> dict[str, Any]:
    prompt = torch.randint(0, model.config.vocab_size, (length,)).tolist()
    cfg1 = GenerationConfig(max_new_tokens=1, stop_ids=frozenset())
    list(generate(model, prompt, cfg1))  # warm-up (kernel compilation)
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        next(iter(generate(model, prompt, cfg1)))
        times.append(time.perf_counter() - t0)
    cfg_n = GenerationConfig(max_new_tokens=new, stop_ids=frozenset())
    list(generate(model, prompt, cfg_n))  # warm-up: kernels of this cache length compiled
    t0 = time.perf_counter()
    stream = generate(model, prompt, cfg_n)
    next(stream)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in stream)
    t2 = time.perf_counter()
    return {"prompt": length, "ttft_s": statistics.median(times), "ttft_all_s": times,
            "generate_decode_tok_s_incl_capture": (n - 1) / (t2 - t1), "generate_tokens": n,
            "generate_first_token_s": t1 - t0}


#: MoE decode GEMV variants timed by --tune (each over the committed table ``_GEMV``): the up and the
#: down kernel are varied separately, then the best of each is timed together (batch 1 and 4 tokens).
UP_VARIANTS: list[dict[str, Any]] = [
    {}, {"up_block_f": 4, "up_block_d": 1024}, {"up_acc2d": True}, {"up_acc2d": True, "up_block_f": 4, "up_block_d": 1024},
    {"up_acc2d": True, "up_block_f": 16, "up_block_d": 256}, {"up_acc2d": True, "up_unroll": 2},
    {"up_acc2d": True, "up_block_f": 8, "up_block_d": 256, "up_unroll": 2},
    {"up_acc2d": True, "up_block_f": 4, "up_block_d": 512, "up_warps": 2},
    {"up_acc2d": True, "up_block_f": 16, "up_block_d": 512, "up_warps": 8},
    {"up_acc2d": True, "up_stages": 1}, {"up_acc2d": True, "up_block_f": 4, "up_block_d": 1024, "up_stages": 4},
]
DOWN_VARIANTS: list[dict[str, Any]] = [
    {}, {"down_acc2d": True}, {"down_mode": "slots"}, {"down_mode": "slots", "down_acc2d": True},
    {"down_mode": "slots", "down_acc2d": True, "down_block_f": 1024},
    {"down_mode": "slots", "down_acc2d": True, "down_block_d": 8, "down_block_f": 256},
    {"down_mode": "slots", "down_acc2d": True, "down_block_d": 2, "down_block_f": 1024},
    {"down_mode": "slots", "down_acc2d": True, "down_unroll": 2},
    {"down_mode": "slots", "down_acc2d": True, "down_block_f": 2048, "down_warps": 8},
    {"down_mode": "slots", "down_acc2d": True, "down_block_d": 8, "down_warps": 8},
    {"down_mode": "slots", "down_acc2d": True, "down_block_f": 256, "down_warps": 2},
    {"down_mode": "slots", "down_block_d": 8, "down_block_f": 256},
    {"down_mode": "slots", "down_acc2d": True, "down_stages": 1},
    {"down_mode": "slots", "down_acc2d": True, "down_stages": 4, "down_block_f": 1024},
]
GEMM_VARIANTS: list[dict[str, Any]] = [
    {}, {"n_fast": True}, {"scatter": True}, {"n_fast": True, "scatter": True},
    {"n_fast": True, "block_m": 128, "block_n": 128, "block_k": 64, "warps": 8},
    {"n_fast": True, "block_m": 128, "block_n": 128, "block_k": 64, "warps": 8, "scatter": True},
    {"n_fast": True, "block_m": 64, "block_n": 128, "stages": 4},
    {"n_fast": True, "block_m": 128, "block_n": 256, "block_k": 64, "warps": 8, "stages": 3},
    {"n_fast": True, "block_m": 128, "block_n": 128, "block_k": 64, "warps": 4, "stages": 4},
]


def _graph_of(fn: Any) -> Any:
    """``fn`` captured in a CUDA graph (after a warm-up call that compiles); returns its replay (CPU: fn)."""
    fn()
    if DEV != "cuda":
        return fn
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


#: Dense decode GEMV variants timed by --tune-gemv (kernels/_triton_gemv.py ``_GEMV_TABLE``): one
#: activation row ("m1" / "m1_small_n") and 2..16 rows ("mdot"); the committed entries first.
GEMV_M1_VARIANTS: list[dict[str, int]] = [
    {"block_n": 4, "block_k": 1024, "warps": 4, "stages": 3}, {"block_n": 2, "block_k": 1024, "warps": 4, "stages": 3},
    {"block_n": 1, "block_k": 1024, "warps": 4, "stages": 3}, {"block_n": 8, "block_k": 1024, "warps": 8, "stages": 3},
    {"block_n": 4, "block_k": 512, "warps": 4, "stages": 3}, {"block_n": 8, "block_k": 512, "warps": 4, "stages": 4},
    {"block_n": 2, "block_k": 2048, "warps": 8, "stages": 3}, {"block_n": 4, "block_k": 2048, "warps": 8, "stages": 2},
    {"block_n": 2, "block_k": 512, "warps": 2, "stages": 4}, {"block_n": 16, "block_k": 256, "warps": 4, "stages": 4},
    {"block_n": 4, "block_k": 1024, "warps": 4, "stages": 1}, {"block_n": 1, "block_k": 2048, "warps": 8, "stages": 2},
]
GEMV_DOT_VARIANTS: list[dict[str, int]] = [
    {"block_n": 16, "block_k": 256, "warps": 4, "stages": 3}, {"block_n": 32, "block_k": 256, "warps": 4, "stages": 3},
    {"block_n": 16, "block_k": 512, "warps": 4, "stages": 3}, {"block_n": 32, "block_k": 128, "warps": 4, "stages": 4},
    {"block_n": 64, "block_k": 128, "warps": 4, "stages": 3}, {"block_n": 16, "block_k": 128, "warps": 2, "stages": 4},
]
#: (input width, output rows of each weight of one launch, launches per token) at the released shapes
GEMV_SHAPES: dict[str, tuple[int, tuple[int, ...], int]] = {
    "mamba in_proj": (2688, (10304,), 23), "out_proj / o_proj": (4096, (2688,), 29),
    "attn q_search+q+k+v": (2688, (4096, 4096, 256, 256), 6), "lm_head": (2688, (131072,), 1),
}
#: router variants for --tune-gemv (over the committed ``_ROUTER``)
ROUTER_GEMV_VARIANTS: list[dict[str, int]] = [
    {}, {"topk_warps": 1}, {"logit_block_d": 4096}, {"logit_block_d": 4096, "topk_warps": 1},
    {"logit_block_e": 1, "logit_warps": 2, "topk_warps": 1}, {"fused": 1}, {"fused": 1, "logit_block_d": 4096},
    {"fused": 1, "logit_block_e": 1, "logit_warps": 2}, {"fused": 1, "logit_block_e": 4},
    {"fused": 1, "logit_block_e": 1, "logit_block_d": 4096, "logit_warps": 4},
]


def _graph_many_us(fns: list[Any], do_bench: Any, reps: int = 2) -> float:
    """Median time of one call, from CUDA-graph replays of ``fns`` (rotating weight sets) x ``reps``."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in fns:
                f()
    return float(do_bench(graph.replay, warmup=25, rep=120, return_mode="median")) * 1e3 / (reps * len(fns))


def tune_gemv(cfg: ModelConfig) -> dict[str, Any]:
    """Dense decode GEMVs (Triton variants vs cuBLAS F.linear) and the decode router variants at the
    released shapes, each under a CUDA graph over 4 rotating weight sets (no L2 reuse)."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    from secure_run.kernels import _triton_gemv as tg
    from secure_run.kernels import _triton_moe as tm

    out: dict[str, Any] = {"copy_1GiB_TB_s": _copy_tb_s(do_bench)}
    base = {k: dict(v) for k, v in tg._GEMV_TABLE.items()}
    for name, (k, ns, per_token) in GEMV_SHAPES.items():
        nbytes = sum(ns) * k * 2
        sets = [[torch.randn(n, k, device=DEV, dtype=DT) * 0.02 for n in ns] for _ in range(4)]
        for m in (1, 4, 16) if name in ("mamba in_proj", "out_proj / o_proj") else (1,):
            x = torch.randn(m, k, device=DEV, dtype=DT)
            rows: dict[str, Any] = {}
            us = _graph_many_us([lambda s=s, x=x: [F.linear(x, w) for w in s] for s in sets], do_bench)
            rows["cublas"] = {"us": us, "TB_s": nbytes / us / 1e6}
            for cand in GEMV_M1_VARIANTS if m == 1 else GEMV_DOT_VARIANTS:
                tg._GEMV_TABLE.update({"m1": cand, "m1_small_n": cand} if m == 1 else {"mdot": cand})
                try:
                    us = _graph_many_us([lambda s=s, x=x: tg.gemv_triton(x, s) for s in sets], do_bench)
                    rows[str(cand)] = {"us": us, "TB_s": nbytes / us / 1e6}
                except Exception as err:  # a variant that fails to compile is reported, the sweep goes on
                    rows[str(cand)] = f"{type(err).__name__}: {err}"[:200]
                finally:
                    tg._GEMV_TABLE.clear()
                    tg._GEMV_TABLE.update({kk: dict(v) for kk, v in base.items()})
            for key, v in rows.items():
                if isinstance(v, dict):
                    log(f"gemv {name} M={m} {key}: {v['us']:.2f} us ({v['TB_s']:.2f} TB/s)")
            out[f"gemv {name} M={m}"] = {"rows": rows, "per_token": per_token, "bytes": nbytes}
        del sets
        torch.cuda.empty_cache()
    # router: logits + top-k at batch 1 and 4, 4 rotating gate matrices
    d, e, kk = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    gates = [torch.randn(e, d, device=DEV, dtype=DT) * 0.02 for _ in range(4)]
    bias = torch.zeros(e, device=DEV)
    rbase = dict(tm._ROUTER)
    for t in (1, 4):
        x = torch.randn(t, d, device=DEV, dtype=DT)
        for cand in ROUTER_GEMV_VARIANTS:
            tm._ROUTER.update(rbase | cand)
            try:
                us = _graph_many_us([lambda g=g, x=x: tm.moe_route_triton(x, g, bias, kk, True, 2.5) for g in gates],
                                    do_bench)
                out[f"router T={t} {cand or 'committed'}"] = {"us": us}
                log(f"router T={t} {cand or 'committed'}: {us:.2f} us")
            except Exception as err:
                out[f"router T={t} {cand or 'committed'}"] = f"{type(err).__name__}: {err}"[:200]
            finally:
                tm._ROUTER.clear()
                tm._ROUTER.update(rbase)
    return out


def gemv_table(t: dict[str, Any]) -> str:
    """The --tune-gemv results: per shape cuBLAS, the committed and the best variant; per-token totals."""
    lines = ["| shape | cuBLAS us (TB/s) | committed us (TB/s) | best variant | best us (TB/s) |", "|---|---|---|---|---|"]
    for name, v in t.items():
        if not (isinstance(v, dict) and "rows" in v):
            continue
        rows = {k: r for k, r in v["rows"].items() if isinstance(r, dict)}
        cub = rows.get("cublas", {"us": float("nan"), "TB_s": float("nan")})
        tri = {k: r for k, r in rows.items() if k != "cublas"}
        first = next(iter(tri.values()), {"us": float("nan"), "TB_s": float("nan")})
        best = min(tri.items(), key=lambda kv: kv[1]["us"]) if tri else ("-", first)
        lines.append(f"| {name} | {cub['us']:.2f} ({cub['TB_s']:.2f}) | {first['us']:.2f} ({first['TB_s']:.2f}) | "
                     f"{best[0]} | {best[1]['us']:.2f} ({best[1]['TB_s']:.2f}) |")
    for name, v in t.items():
        if name.startswith("router") and isinstance(v, dict):
            lines.append(f"| {name} | | {v['us']:.2f} | | |")
    return "\n".join(lines)


def _cublas_gemv_ms(x: torch.Tensor, rows: int, do_bench: Any) -> float:
    """cuBLAS GEMV x [1, d] @ W[rows, d]^T over 4 rotating weights (the same bytes as a MoE layer)."""
    w = [torch.randn(rows, x.shape[1], device=DEV, dtype=DT) for _ in range(4)]
    calls = [_graph_of(lambda m=m: torch.nn.functional.linear(x, m)) for m in w]
    it = iter(range(1 << 30))
    return float(do_bench(lambda: calls[next(it) % 4](), return_mode="median"))


def _copy_tb_s(do_bench: Any) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (the bandwidth ceiling)."""
    src = torch.empty(1 << 30, device=DEV, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / float(do_bench(lambda: dst.copy_(src), return_mode="median")) / 1e9


#: Decode router variants (graphed; the committed table first).
ROUTER_VARIANTS: list[dict[str, int]] = [
    {}, {"topk_warps": 1}, {"topk_warps": 2}, {"logit_block_e": 1, "logit_warps": 2},
    {"logit_block_e": 1, "logit_warps": 1, "topk_warps": 1}, {"logit_block_e": 4, "topk_warps": 1},
    {"logit_warps": 2, "topk_warps": 1},
]


def _tune_router(tm: Any, sets: list[list[torch.Tensor]], x: torch.Tensor, bias: torch.Tensor, k: int,
                 do_bench: Any) -> dict[str, Any]:
    """Graph-replay time of the decode router (logits + top-k launches) per ROUTER_VARIANTS entry."""
    from secure_run.kernels import moe_route

    base = dict(tm._ROUTER)
    it = iter(range(1 << 30))
    res: dict[str, Any] = {}
    for cand in ROUTER_VARIANTS:
        tm._ROUTER.update(base | cand)
        try:
            calls = [_graph_of(lambda s=s: moe_route(x, s[4], bias, k, True, 2.5)) for s in sets]
            us = float(do_bench(lambda c=calls: c[next(it) % 4](), warmup=25, rep=100, return_mode="median")) * 1e3
            res[f"router {cand or 'committed'}"] = {"us": us}
            log(f"router {cand or 'committed'}: {us:.2f} us")
        except Exception as err:  # report the variant, keep going
            res[f"router {cand or 'committed'}"] = f"{type(err).__name__}: {err}"[:200]
        finally:
            tm._ROUTER.clear()
            tm._ROUTER.update(base)
    return res


def _tune_moe_decode(tm: Any, sets: list[list[torch.Tensor]], routes: list[Any], x: torch.Tensor, moe_bytes: int,
                     do_bench: Any) -> dict[str, Any]:
    """Time the decode GEMV variants (rotating 4 weight sets), return {name: {us, TB_s}} plus the best."""
    from secure_run.kernels import moe_experts, moe_route

    base = dict(tm._GEMV)
    it = iter(range(1 << 30))
    res: dict[str, Any] = {}

    def time_with(cand: dict[str, Any], xt: torch.Tensor, rts: list[Any]) -> float:
        tm._GEMV.clear()
        tm._GEMV.update(base | cand)
        try:  # one CUDA graph per weight set (decode runs graphed), replays rotated
            calls = [_graph_of(lambda s=s, r=r: moe_experts(xt, r[0], r[1], s[0], s[1], s[2], s[3]))
                     for s, r in zip(sets, rts)]
            return float(do_bench(lambda: calls[next(it) % 4](), warmup=25, rep=150, return_mode="median")) * 1e3
        finally:
            tm._GEMV.clear()
            tm._GEMV.update(base)

    def record(name: str, cand: dict[str, Any]) -> float:
        try:
            us = time_with(cand, x, routes)
        except Exception as err:  # a variant that fails to compile is reported, the sweep goes on
            res[name] = f"{type(err).__name__}: {err}"[:200]
            return math.inf
        res[name] = {"us": us, "TB_s": moe_bytes / us / 1e6}
        log(f"moe decode {name}: {us:.1f} us ({moe_bytes / us / 1e6:.2f} TB/s)")
        return us

    ups = [(record(f"up {c or 'committed'}", c), i) for i, c in enumerate(UP_VARIANTS)]
    downs = [(record(f"down {c or 'committed'}", c), i) for i, c in enumerate(DOWN_VARIANTS)]
    best = UP_VARIANTS[min(ups)[1]] | DOWN_VARIANTS[min(downs)[1]]
    res["best"] = best
    record(f"best {best}", best)
    for t in (4,):  # a batch of decode tokens (still the GEMV path): committed vs best
        xt = torch.randn(t, x.shape[1], device=x.device, dtype=x.dtype)
        rts = [moe_route(xt, s[4], torch.zeros(s[4].shape[0], device=x.device), routes[0][0].shape[1], True, 2.5)
               for s in sets]
        for name, cand in (("committed", {}), ("best", best)):
            try:
                res[f"T={t} {name}"] = {"us": time_with(cand, xt, rts)}
            except Exception as err:
                res[f"T={t} {name}"] = f"{type(err).__name__}: {err}"[:200]
    return res


def tune_rows(cfg: ModelConfig) -> dict[str, Any]:
    """Kernel-level times at the released shapes (median of do_bench) with effective bandwidth."""
    import triton
    from triton.testing import do_bench

    from secure_run.kernels import _triton_moe as tm
    from secure_run.kernels import add_rmsnorm, mamba_decode_step, moe_experts, moe_route

    out: dict[str, Any] = {}
    d, e, f, fs, k = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, \
        cfg.moe_shared_expert_intermediate_size, cfg.num_experts_per_tok
    sets = []
    for i in range(4):  # rotate weight sets: far larger than L2
        g = torch.Generator(device=DEV).manual_seed(i)
        sets.append([torch.randn(*s, device=DEV, generator=g).to(DT) * 0.02
                     for s in ((e, f, d), (e, d, f), (fs, d), (d, fs), (e, d))])
    x = torch.randn(1, d, device=DEV, dtype=DT)
    bias = torch.zeros(e, device=DEV)
    routes = [moe_route(x, s[4], bias, k, True, 2.5) for s in sets]
    it = iter(range(1 << 30))

    def rot(fn: Any) -> Any:
        return lambda: fn(sets[next(it) % 4], routes[next(it) % 4])

    moe_bytes = (2 * k * f * d + 2 * fs * d) * 2
    out["moe_route_us"] = 1e3 * do_bench(rot(lambda s, r: moe_route(x, s[4], bias, k, True, 2.5)), return_mode="median")
    out["router_decode"] = _tune_router(tm, sets, x, bias, k, do_bench)
    out["moe_decode"] = _tune_moe_decode(tm, sets, routes, x, moe_bytes, do_bench)
    ms = _cublas_gemv_ms(x, moe_bytes // 2 // d, do_bench)
    out["cublas_gemv_same_bytes"] = {"us": ms * 1e3, "TB_s": moe_bytes / ms / 1e9}
    out["copy_1GiB_TB_s"] = _copy_tb_s(do_bench)
    # Mamba decode step (between in_proj and out_proj)
    h, p, gr, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    c = cfg.mamba_conv_dim
    proj = torch.randn(1, h * p + c + h, device=DEV, dtype=DT)
    conv = torch.randn(1, c, cfg.conv_kernel, device=DEV, dtype=DT)
    ssm = [torch.randn(1, h, p, n, device=DEV) for _ in range(4)]
    cw, cb = torch.randn(c, cfg.conv_kernel, device=DEV, dtype=DT), torch.randn(c, device=DEV, dtype=DT)
    hv = torch.zeros(h, device=DEV)
    nw = torch.ones(h * p, device=DEV, dtype=DT)
    ms = do_bench(lambda: mamba_decode_step(proj, conv, ssm[next(it) % 4], cw, cb, hv, hv, hv, nw, n_heads=h,
                                            head_dim=p, n_groups=gr, state_size=n, dt_min=0.0, dt_max=math.inf,
                                            eps=1e-5), return_mode="median")
    out["mamba_decode_step"] = {"us": ms * 1e3, "state_TB_s": 2 * h * p * n * 4 / ms / 1e9}
    hh = torch.randn(1, d, device=DEV, dtype=DT)
    out["add_rmsnorm_us"] = 1e3 * do_bench(lambda: add_rmsnorm(hh, hh, nw[:d], 1e-5), return_mode="median")
    # prefill grouped GEMM, 32K tokens
    t = 32768
    xs = torch.randn(t, d, device=DEV, dtype=DT)
    gate = torch.randn(e, d, device=DEV, dtype=DT) * 0.02
    ids, wts = moe_route(xs, gate, bias, k, True, 2.5)
    s0 = sets[0]
    flops = 2 * t * k * 2 * f * d
    for cand in GEMM_VARIANTS:
        saved = dict(tm._GEMM)
        tm._GEMM.update(cand)
        try:
            ms = do_bench(lambda: moe_experts(xs, ids, wts, s0[0], s0[1]), return_mode="median")
            out[f"moe_prefill_32k {cand or 'default'}"] = {"ms": ms, "TFLOP_s": flops / ms / 1e9}
        except Exception as err:
            out[f"moe_prefill_32k {cand or 'default'}"] = f"{type(err).__name__}: {err}"[:200]
        tm._GEMM.clear()
        tm._GEMM.update(saved)
    a_ = torch.randn(t * k, d, device=DEV, dtype=DT)
    ms = do_bench(lambda: torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(a_, s0[0][0])), s0[1][0]),
                  return_mode="median")
    out["dense_same_flops_ms"] = {"ms": ms, "TFLOP_s": flops / ms / 1e9}
    # Mamba prefill at 32K tokens: PyTorch chunked scan vs the Triton scan; conv1d vs the Triton conv
    from secure_run.kernels import causal_conv1d, ssd_scan
    from secure_run.kernels.model_reference import causal_conv1d_reference
    from secure_run.model.mamba2 import ssd_chunked_scan

    sets.clear()
    routes.clear()
    xs = a_ = None  # free the MoE inputs (the closures above hold the names, not the tensors)
    torch.cuda.empty_cache()
    xbc = torch.randn(1, t, h * p + 2 * gr * n, device=DEV, dtype=DT)
    xm = xbc[..., :h * p].reshape(1, t, h, p)
    bmv = xbc[..., h * p:h * p + gr * n].reshape(1, t, gr, n)
    cmv = xbc[..., h * p + gr * n:].reshape(1, t, gr, n)
    dtv = torch.rand(1, t, h, device=DEV) * 0.1
    av = -torch.rand(h, device=DEV)
    s0 = torch.randn(1, h, p, n, device=DEV)
    ms_t = do_bench(lambda: ssd_scan(xm, dtv, av, bmv, cmv, chunk_size=128, initial_state=s0), return_mode="median")
    ms_p = do_bench(lambda: ssd_chunked_scan(xm, dtv, av, bmv, cmv, chunk_size=128, initial_state=s0),
                    return_mode="median", rep=200)
    y1, f1 = ssd_scan(xm, dtv, av, bmv, cmv, chunk_size=128, initial_state=s0)
    y2, f2 = ssd_chunked_scan(xm, dtv, av, bmv, cmv, chunk_size=128, initial_state=s0)
    err = float((y1 - y2).norm() / y2.norm())
    floor_bytes = t * (h * p * 2 + 2 * gr * n * 2 + h * 4 + h * p * 4) + 3 * (t // 128) * h * p * n * 4
    out["ssd_scan_32k"] = {"triton_ms": ms_t, "torch_ms": ms_p, "rel_err": err,
                           "bytes_floor_ms": floor_bytes / 4.3e12 * 1e3}
    cst = torch.randn(1, c, cfg.conv_kernel, device=DEV, dtype=DT)
    xc = torch.randn(1, t, h * p + c + h, device=DEV, dtype=DT)[..., h * p:h * p + c]
    out["conv_32k"] = {
        "triton_ms": do_bench(lambda: causal_conv1d(xc, cst, cw, cb), return_mode="median"),
        "torch_ms": do_bench(lambda: causal_conv1d_reference(xc, cst, cw, cb), return_mode="median")}
    out["triton"] = triton.__version__
    return out


# --- transformers NemotronH --------------------------------------------------------------------------


def hf_rows(spec: dict[str, Any], shapes_prefill: list[int], decode_ctx: int, results: dict[str, Any]) -> None:
    import transformers
    from transformers import NemotronHConfig, NemotronHForCausalLM

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "hybrid_override_pattern", "num_attention_heads",
            "num_key_value_heads", "head_dim", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
            "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "moe_shared_expert_intermediate_size", "intermediate_size", "norm_topk_prob", "routed_scaling_factor",
            "layer_norm_epsilon", "tie_word_embeddings")
    hf_cfg = NemotronHConfig(**{k: spec[k] for k in keys}, use_mamba_kernels=False, initializer_range=0.02)
    results["hf_version"] = transformers.__version__
    torch.manual_seed(0)
    t0 = time.perf_counter()
    saved_dtype = torch.get_default_dtype()
    torch.set_default_dtype(DT)  # build in bf16 directly (fp32 would need 126 GB)
    try:
        with torch.device(DEV):
            model = NemotronHForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(saved_dtype)
    sync()
    results["hf_build_s"] = time.perf_counter() - t0
    hf: dict[str, Any] = {"decode": [], "prefill": []}
    results["hf"] = hf
    with section(results, f"hf decode @{decode_ctx}"), torch.inference_mode():
        ids = torch.randint(0, spec["vocab_size"], (1, decode_ctx), device=DEV)
        gen_kw = {"do_sample": False, "pad_token_id": 0}
        sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen_kw)
        sync()
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=9, min_new_tokens=9, **gen_kw)
        sync()
        t2 = time.perf_counter()
        pre = t1 - t0
        hf["decode"].append({"context": decode_ctx, "tok_s": 8 / max(1e-9, (t2 - t1) - pre),
                             "prefill_tok_s": decode_ctx / pre, "ttft_s": pre})
        log("hf decode", hf["decode"][-1])
    for length in shapes_prefill:
        with section(results, f"hf prefill {length}"), torch.inference_mode():
            ids = torch.randint(0, spec["vocab_size"], (1, length), device=DEV)
            reset_peak()
            sync()
            t0 = time.perf_counter()
            try:
                model(ids, use_cache=True, logits_to_keep=1)
                sync()
                dt = time.perf_counter() - t0
                hf["prefill"].append({"length": length, "tok_s": length / dt, "seconds": dt,
                                      "peak_gib": peak_gib()})
            except torch.OutOfMemoryError:
                hf["prefill"].append({"length": length, "result": "out of memory"})
                del ids
                break
            finally:
                log("hf prefill", hf["prefill"][-1] if hf["prefill"] else None)
    del model


# --- main ------------------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    lines = [f"card: {res['card']} | torch {res['torch']} | triton {res['triton']} | {res['date']}",
             "| measure | ours | transformers NemotronH |", "|---|---|---|"]
    hf = res.get("hf", {})
    hfd = {r["context"]: r for r in hf.get("decode", [])}
    for r in res.get("decode", []):
        other = hfd.get(r["context"], {})
        lines.append(f"| decode tok/s @{r['context']:,} (graph step / +greedy readback) | {r['tok_s']:.1f} / "
                     f"{r['greedy_tok_s']:.1f} | {other.get('tok_s', float('nan')):.2f} |")
        for spec, tok_s in r.get("variants", {}).items():
            lines.append(f"| decode tok/s @{r['context']:,}, same run with {spec} | {tok_s:.1f} | - |")
    hfp = {r["length"]: r for r in hf.get("prefill", [])}
    for r in res.get("prefill", []):
        other = hfp.get(r["length"], {})
        o = other.get("result") or (f"{other['tok_s']:,.0f}" if "tok_s" in other else "-")
        lines.append(f"| prefill tok/s {r['length']:,} (chunk {r['chunk']}, peak {r['peak_gib']:.1f} GiB) | "
                     f"{r['tok_s']:,.0f} | {o} |")
    if "ttft" in res:
        t = res["ttft"]
        hft = hfd.get(4096, {}).get("ttft_s")
        lines.append(f"| time to first token, 4K prompt | {t['ttft_s']:.3f} s | "
                     f"{'-' if hft is None else f'{hft:.2f} s'} |")
        lines.append(f"| generate() decode tok/s @4K (incl. graph capture) | "
                     f"{t['generate_decode_tok_s_incl_capture']:.1f} | - |")
    if "profile" in res:
        p = res["profile"]
        mix = ", ".join(f"{k} {v:.2f}" for k, v in p["parts_ms"].items())
        lines.append(f"| decode @{p['context']:,} GPU busy ms/token (eager, {p['kernels_per_token']} kernels) | "
                     f"{p['gpu_busy_ms']:.2f} ({mix}) | - |")
    if "graph_vs_eager" in res:
        gv = res["graph_vs_eager"]
        lines.append(f"| graph vs eager, {gv['steps']} greedy steps @{gv['context']:,}: tokens equal / max rel logit diff | "
                     f"{gv['tokens_equal']} / {gv['max_rel_logit_diff']:.2e} | - |")
    lines.append(f"| peak memory | {res.get('peak_gib', float('nan')):.1f} GiB | - |")
    for k, v in res.get("errors", {}).items():
        lines.append(f"| ERROR {k} | {v[:120]} | |")
    return "\n".join(lines)


def tune_table(t: dict[str, Any]) -> str:
    """The --tune results as short lines (times in us or ms, rates)."""
    lines = ["| kernel variant | time | rate |", "|---|---|---|"]
    for name, v in t.get("router_decode", {}).items():
        lines.append(f"| {name} | {v['us']:.2f} us | |" if isinstance(v, dict) else f"| {name} | {v} | |")
    for name, v in t.get("moe_decode", {}).items():
        if isinstance(v, dict) and "us" in v:
            lines.append(f"| moe decode {name} | {v['us']:.1f} us | {v.get('TB_s', float('nan')):.2f} TB/s |")
        elif name != "best":
            lines.append(f"| moe decode {name} | {v} | |")
    for name, v in t.items():
        if isinstance(v, dict) and "TFLOP_s" in v:
            lines.append(f"| {name} | {v['ms']:.2f} ms | {v['TFLOP_s']:.0f} TFLOP/s |")
        elif isinstance(v, dict) and "TB_s" in v:
            lines.append(f"| {name} | {v['us']:.1f} us | {v['TB_s']:.2f} TB/s |")
        elif isinstance(v, (int, float)):
            lines.append(f"| {name} | {v:.3g} | |")
        elif isinstance(v, str) and name.startswith("moe_prefill"):
            lines.append(f"| {name} | {v[:80]} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4K and 1M decode, 32K prefill, TTFT; no transformers")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--decode", type=str, default=None, help="comma-separated contexts")
    ap.add_argument("--prefill", type=str, default=None, help="comma-separated lengths")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--tune", action="store_true", help="kernel-level variants at the released shapes")
    ap.add_argument("--tune-only", action="store_true", help="only the kernel-level variants (no model is built)")
    ap.add_argument("--tune-gemv", action="store_true", help="only the dense decode GEMV and router variants")
    ap.add_argument("--cublas-baseline", action="store_true",
                    help="also time each decode row with SECURE_RUN_GEMV=torch (cuBLAS projections)")
    ap.add_argument("--variant", action="append", default=[], metavar="ENV=VALUE[,ENV=VALUE]",
                    help="also time each decode row with these environment settings (repeatable), same process")
    ap.add_argument("--smoke", action="store_true", help="self-check of this script on a tiny config (BENCH_DEVICE=cpu)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    import triton

    card = torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu"
    res: dict[str, Any] = {"card": card, "torch": torch.__version__,
                           "triton": triton.__version__, "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "decode": [], "prefill": []}
    decode_ctx = [4096, 1 << 20] if a.quick else [4096, 131072, 1 << 20, 10 << 20]
    prefill_len = [32768] if a.quick else [32768, 131072, 1 << 20]
    if a.decode:
        decode_ctx = [int(x) for x in a.decode.split(",") if x]
    if a.prefill is not None:
        prefill_len = [int(x) for x in a.prefill.split(",") if x]
    cfg = config_from_dict(FULL if not a.smoke else FULL | SMOKE)
    for wanted, key, tune, show in ((a.tune_gemv, "tune_gemv", tune_gemv, gemv_table),
                                    (a.tune_only, "tune", tune_rows, tune_table)):
        if wanted:  # kernel-level variants only: no model is built
            with section(res, key.replace("_", " ")):
                res[key] = tune(cfg)
            with open(os.path.join(a.out, f"model_{key}.json"), "w") as fh:
                json.dump(res, fh, indent=1, default=str)
            log(show(res.get(key, {})))
            return 0
    res["prefill_mamba_kernels"] = os.environ.get("SECURE_RUN_SSD", "triton")
    _JSON_PATH.append(os.path.join(a.out, "model_bench.json"))
    t0 = time.perf_counter()
    model = build_model(cfg)
    res["build_s"] = time.perf_counter() - t0
    res["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    res["weights_gib"] = torch.cuda.memory_allocated() / GIB if DEV == "cuda" else float("nan")
    log(f"built {res['params_b']:.2f} B params, {res['weights_gib']:.1f} GiB in {res['build_s']:.1f} s")
    with section(res, "graph vs eager"):
        res["graph_vs_eager"] = graph_vs_eager(model, 4096 if not a.smoke else 64)
        log("graph vs eager", res["graph_vs_eager"])
    for ctx in decode_ctx:
        with section(res, f"decode {ctx}"):
            res["decode"].append(decode_row(model, ctx, a.steps))
            log("decode", res["decode"][-1])
        for spec in (["SECURE_RUN_GEMV=torch"] if a.cublas_baseline else []) + a.variant:
            with section(res, f"decode {ctx} {spec}"):
                with env_settings(spec):
                    other = decode_row(model, ctx, a.steps)
                res["decode"][-1].setdefault("variants", {})[spec] = other["tok_s"]
                log(f"decode {spec}", other)
    with section(res, "ttft"):
        res["ttft"] = ttft_row(model, 4096 if not a.smoke else 100, 64 if not a.smoke else 4)
        log("ttft", res["ttft"])
    with section(res, "profile"):
        res["profile"] = profile_decode(model, 1 << 20 if (1 << 20) in decode_ctx else decode_ctx[-1])
        log("profile", json.dumps(res["profile"]))
    for length in prefill_len:
        with section(res, f"prefill {length}"):
            res["prefill"].append(prefill_row(model, length))
            log("prefill", res["prefill"][-1])
    with section(res, "profile prefill"):
        res["profile_prefill"] = profile_decode(model, 1 << 20 if not a.smoke else 256, 32768 if not a.smoke else 64,
                                                steps=1)
        log("profile prefill", json.dumps(res["profile_prefill"]))
    res["peak_gib"] = peak_gib()
    if a.tune:
        with section(res, "tune"):
            res["tune"] = tune_rows(cfg)
            log("tune", json.dumps(res["tune"], indent=1))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if not (a.quick or a.skip_hf):
        with section(res, "transformers"):
            if a.smoke:
                hf_rows(FULL | SMOKE, [200, 300], 64, res)
            else:
                hf_rows(FULL, [32768, 131072], 4096, res)
    path = os.path.join(a.out, "model_bench.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    log("\n" + table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
