"""Mamba-2 prefill of one layer (issue 11, E2): the committed kernels ("old") against the new ones.

At the released shapes (64 heads x 64, 8 groups, state 128, chunk 128, d_inner 4096, hidden 2688,
bf16) and one prompt chunk of ``--length`` tokens (default 32K), in one process:

1. per kernel: the chunk states, the state pass, the chunk scan and the PyTorch D skip + gated norm
   of the old path; the same stages of the new one (state pass and chunk scan launch variants, the
   norm kernel), with the bytes each stage must move and the achieved rate;
2. the tail after the conv (scan + D + gated norm, the out_proj input), old vs new;
3. the whole mixer forward (in_proj .. out_proj), ``SECURE_RUN_SSD=v1`` vs the default;
4. accuracy: old and new against the float64 reference at an odd length, new vs old at ``--length``.

Timing: ``triton.testing.do_bench`` median (ms). Writes ``mamba.json`` to ``--out`` and prints a
short table last. ``--smoke``: a tiny self-check of this script under the CPU interpreter.
Run on the GPU box through the symlink farm: ``python3 -P bench/mamba.py`` after ``source bench/gpu_env.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Dims:
    length: int
    h: int = 64
    p: int = 64
    g: int = 8
    n: int = 128
    chunk: int = 128
    hidden: int = 2688


def _timer(smoke: bool) -> Callable[[Callable[[], Any]], float]:
    if smoke:
        def wall(fn: Callable[[], Any]) -> float:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return wall
    import triton.testing

    def bench(fn: Callable[[], Any]) -> float:
        return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))
    return bench


def _inputs(d: Dims, dev: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=dev).manual_seed(seed)
    di, gn = d.h * d.p, d.g * d.n

    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev)

    xbc = rn(1, d.length, di + 2 * gn).to(dtype)  # the conv output [B, L, C]
    proj = rn(1, d.length, di + di + 2 * gn + d.h).to(dtype)  # in_proj rows: z is its first d_inner
    return {
        "x": xbc[..., :di].reshape(1, d.length, d.h, d.p),
        "bm": xbc[..., di:di + gn].reshape(1, d.length, d.g, d.n),
        "cm": xbc[..., di + gn:].reshape(1, d.length, d.g, d.n),
        "z": proj[..., :di],
        "dt": F.softplus(rn(1, d.length, d.h) - 2.0).clamp(1e-3, 0.5),
        "A": -torch.exp(rn(d.h)).clamp(max=16.0),
        "D": rn(d.h),
        "w": (1.0 + 0.1 * rn(di)).to(dtype),
        "s0": 0.1 * rn(1, d.h, d.p, d.n),
    }


def _old_tail(t: dict[str, torch.Tensor], d: Dims, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The committed mixer after the scan: ``y + D x`` and GatedRMSNorm in PyTorch, then the cast."""
    from secure_run.model.norms import GatedRMSNorm

    norm = _NORMS.get(id(t["w"]))
    if norm is None:
        norm = GatedRMSNorm(d.h * d.p, d.h * d.p // d.g, 1e-5, device=y.device, dtype=dtype)
        with torch.no_grad():
            norm.weight.copy_(t["w"])
        _NORMS[id(t["w"])] = norm
    x = t["x"]
    yy = y + t["D"].float()[:, None] * x.float()
    with torch.no_grad():
        return norm(yy.reshape(1, d.length, d.h * d.p), t["z"]).to(dtype)


_NORMS: dict[int, Any] = {}


def _old_after_conv(t: dict[str, torch.Tensor], d: Dims, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from secure_run.kernels import ssd_scan

    y, fin = ssd_scan(t["x"], t["dt"], t["A"], t["bm"], t["cm"], chunk_size=d.chunk, initial_state=t["s0"],
                      backend="triton", legacy=True)
    return _old_tail(t, d, y, dtype), fin


def _new_after_conv(t: dict[str, torch.Tensor], d: Dims, dtype: torch.dtype, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from secure_run.kernels._triton_mamba import ssd_prefill_triton

    return ssd_prefill_triton(t["x"], t["dt"], t["A"], t["bm"], t["cm"], t["D"], t["z"], t["w"],
                              chunk_size=d.chunk, initial_state=t["s0"], eps=1e-5, group_size=d.h * d.p // d.g,
                              out_dtype=dtype, cfg=cfg)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _stage_bytes(d: Dims, dtype: torch.dtype) -> dict[str, float]:
    """Fewest bytes each stage must move (each input read once, each output written once)."""
    e = torch.tensor([], dtype=dtype).element_size()
    length, di, gn = d.length, d.h * d.p, d.g * d.n
    nc = -(-length // d.chunk)
    st = nc * d.h * d.p * d.n * 4
    return {
        "chunk_states": length * (di + gn) * e + length * d.h * 4 + st,
        "state_pass": 2 * st,
        "chunk_scan_y": length * (di + 2 * gn) * e + length * d.h * 4 + st + length * di * 4,
        "chunk_scan_gated": length * (2 * di + 2 * gn) * e + length * d.h * 4 + st + length * di * 4,
        "chunk_scan_fused": length * (2 * di + 2 * gn) * e + length * d.h * 4 + st + length * di * (4 + e),
        "norm": length * di * (4 + e),
        "conv": 2 * length * (di + 2 * gn) * e,
        "after_conv": length * (2 * di + 2 * gn) * e + length * di * e + st,  # one pass, states once (ideal)
    }


def _per_kernel(t: dict[str, torch.Tensor], d: Dims, dtype: torch.dtype, bench: Callable[..., float],
                sweep: bool, extra: bool, rows: list[dict[str, Any]]) -> Any:
    """Times each stage, old and new (with the launch variants when ``sweep``); returns the best config."""
    from secure_run.kernels import _triton_mamba as tm

    q = d.chunk
    x, bm, cm = t["x"], t["bm"], t["cm"]
    dtc, a = t["dt"].contiguous(), t["A"].float().contiguous()
    nbytes = _stage_bytes(d, dtype)

    def add(stage: str, variant: str, ms: float, key: str) -> None:
        rows.append({"stage": stage, "variant": variant, "ms": ms, "GB/s": nbytes[key] / ms / 1e6})
        print(f"  {stage:<14} {variant:<48} {ms:8.3f} ms  {nbytes[key] / ms / 1e6:7.0f} GB/s", flush=True)

    states, decay = tm._chunk_states(x, dtc, a, bm, q, lowp=False)
    add("chunk_states", "old (tf32)", bench(lambda: tm._chunk_states(x, dtc, a, bm, q, lowp=False)), "chunk_states")
    add("chunk_states", "lowp", bench(lambda: tm._chunk_states(x, dtc, a, bm, q, lowp=True)), "chunk_states")
    work = states.clone()
    add("state_pass", "old (per head, 16 rows of P)",
        bench(lambda: tm._pass_states(work, decay, t["s0"], tm.SCAN_API, legacy=True)), "state_pass")
    best = tm.SsdConfig()
    sp = [(best.state_block, best.state_warps)] if not sweep else [(blk, w) for blk in (256, 512, 1024, 2048) for w in (4, 8)]
    sp_best = (float("inf"), best)
    for blk, w in sp:
        cfg = replace(best, state_block=blk, state_warps=w)
        ms = bench(lambda cfg=cfg: tm._pass_states(work, decay, t["s0"], cfg, legacy=False))
        add("state_pass", f"flat block={blk} warps={w}", ms, "state_pass")
        sp_best = min(sp_best, (ms, cfg), key=lambda v: v[0])
    best = sp_best[1]
    tm._pass_states(states, decay, t["s0"], best, legacy=False)  # states now: the entering states
    add("chunk_scan", "old (per head, fp32 tiles, y only)", bench(lambda: tm._scan_chunks_v1(x, dtc, a, bm, cm, states, q)),
        "chunk_scan_y")
    add("chunk_scan", "new tf32, y only (ssd_scan)",
        bench(lambda: tm._scan_chunks(x, dtc, a, bm, cm, states, q, tm.SCAN_API, lowp=False)), "chunk_scan_y")
    D = t["D"].float().contiguous()
    norm = (t["w"], 1e-5, dtype)
    grid: list[Any] = [best]
    if sweep:
        grid = [replace(best, scan_heads=hp, scan_block_l=bl, scan_warps=w)
                for hp in (1, 2, 8) for bl in (64, 128) for w in (4, 8)]
    sc_best = (float("inf"), best)
    tried: set[Any] = set()

    def scan_variants() -> Any:
        yield from grid
        if sweep:  # software-pipelining depth of the per-head loop, for the best of the grid
            yield from (replace(sc_best[1], scan_stages=st) for st in (1, 3))
        if extra:  # around the first sweep's pick (heads=8, rows=64, 4 warps, 2 stages)
            yield from (replace(best, scan_heads=hp, scan_block_l=bl, scan_warps=w)
                        for hp, bl, w in ((4, 64, 4), (8, 32, 4), (8, 64, 2), (8, 32, 2)))

    for cfg in scan_variants():
        if cfg in tried:
            continue
        tried.add(cfg)
        try:
            ms = bench(lambda cfg=cfg: tm._scan_chunks(x, dtc, a, bm, cm, states, q, cfg, lowp=True, D=D, z=t["z"],
                                                       norm=norm))
        except Exception as exc:  # a launch choice the compiler refuses (shared memory): recorded, skipped
            print(f"  chunk_scan     heads={cfg.scan_heads} bl={cfg.scan_block_l} failed: {type(exc).__name__}")
            continue
        add("chunk_scan", f"lowp+D+gate heads={cfg.scan_heads} bl={cfg.scan_block_l} w={cfg.scan_warps} "
            f"st={cfg.scan_stages}", ms, "chunk_scan_gated")
        sc_best = min(sc_best, (ms, cfg), key=lambda v: v[0])
    best = sc_best[1]
    add("chunk_scan", "best, tf32 operands (lowp off)",
        bench(lambda: tm._scan_chunks(x, dtc, a, bm, cm, states, q, best, lowp=False, D=D, z=t["z"], norm=norm)),
        "chunk_scan_gated")
    y, _ = tm._scan_chunks(x, dtc, a, bm, cm, states, q, best, lowp=True, D=D, z=t["z"], norm=norm)
    nr_best = (float("inf"), best)
    for nr in ((1, 2, 4, 8) if sweep else (best.norm_rows,)):
        ms = bench(lambda nr=nr: tm._norm_rows(y.reshape(1, d.length, -1), t["w"], 1e-5, d.h * d.p // d.g, dtype, nr))
        add("norm", f"gated-norm kernel rows={nr}", ms, "norm")
        nr_best = min(nr_best, (ms, replace(best, norm_rows=nr)), key=lambda v: v[0])
    best = nr_best[1]
    yold = tm._scan_chunks_v1(x, dtc, a, bm, cm, states, q)
    add("norm", "old: PyTorch D skip + GatedRMSNorm + cast", bench(lambda: _old_tail(t, d, yold, dtype)), "norm")
    for hp, bl in ((8, 64), (8, 128)):
        fcfg = replace(best, fuse_norm=True, scan_heads=hp, scan_block_l=bl)
        try:
            ms = bench(lambda fcfg=fcfg: tm._scan_chunks(x, dtc, a, bm, cm, states, q, fcfg, lowp=True, D=D,
                                                         z=t["z"], norm=norm))
        except Exception as exc:
            print(f"  fused norm bl={bl} failed: {type(exc).__name__}")
            continue
        add("chunk_scan", f"lowp+D+gate+norm fused heads={hp} bl={bl} w={best.scan_warps} st={best.scan_stages}",
            ms, "chunk_scan_fused")
    return best


CONV_BLOCKS_V1 = (32, 128, 4)  # the conv launch before the ssd branch: the "old" side of the mixer timing


def _conv_variants(d: Dims, dtype: torch.dtype, dev: str, bench: Callable[..., float], extra: bool,
                   rows: list[dict[str, Any]]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The prefill conv (reads the in_proj rows in place) with its launch blocks; returns (old, best)."""
    from secure_run.kernels import _triton_mamba as tm

    di, gn = d.h * d.p, d.g * d.n
    c = di + 2 * gn
    gen = torch.Generator(device=dev).manual_seed(3)
    proj = torch.randn(1, d.length, di + c + d.h, generator=gen, device=dev).to(dtype)
    xbc = proj[..., di:di + c]
    state = torch.randn(1, c, 4, generator=gen, device=dev).to(dtype)
    w = (0.3 * torch.randn(c, 4, generator=gen, device=dev)).to(dtype)
    bias = (0.1 * torch.randn(c, generator=gen, device=dev)).to(dtype)
    old = CONV_BLOCKS_V1
    ref = tm.causal_conv1d_triton(xbc, state, w, bias, old)
    nbytes = _stage_bytes(d, dtype)["conv"]
    variants = [old] + ([tm.CONV_BLOCKS] if tm.CONV_BLOCKS != old else []) + ([(64, 128, 4), (128, 128, 8), (32, 256, 4), (64, 256, 8), (16, 256, 4), (128, 64, 4),
                         (64, 64, 2)] if extra else [])
    best = (float("inf"), old)
    for blk in dict.fromkeys(variants):
        got = tm.causal_conv1d_triton(xbc, state, w, bias, blk)
        if not torch.equal(got, ref):  # same per-element math: any difference is a bug
            print(f"  conv {blk} differs from the committed launch: skipped")
            continue
        ms = bench(lambda blk=blk: tm.causal_conv1d_triton(xbc, state, w, bias, blk))
        rows.append({"stage": "conv", "variant": f"rows={blk[0]} ch={blk[1]} warps={blk[2]}", "ms": ms,
                     "GB/s": nbytes / ms / 1e6})
        print(f"  conv {blk} {ms:.3f} ms", flush=True)
        best = min(best, (ms, blk), key=lambda v: v[0])
    return old, best[1]


def _mixer_forward(d: Dims, dtype: torch.dtype, dev: str, bench: Callable[..., float],
                   conv_old: tuple[int, int, int], conv_new: tuple[int, int, int]) -> dict[str, Any]:
    """The whole mixer (in_proj, conv, scan, norm, out_proj) with SECURE_RUN_SSD=v1 and the committed conv
    launch, and with the default path and the chosen conv launch."""
    from secure_run.kernels import _triton_mamba as tm
    from secure_run.model.config import parse_config_json
    from secure_run.model.mamba2 import Mamba2Mixer

    cfg = parse_config_json(json.dumps({
        "model_type": "nemotron_h", "vocab_size": 64, "hidden_size": d.hidden, "num_hidden_layers": 1,
        "hybrid_override_pattern": "M", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "mamba_num_heads": d.h, "mamba_head_dim": d.p, "ssm_state_size": d.n, "n_groups": d.g, "conv_kernel": 4,
        "chunk_size": d.chunk, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 16, "torch_dtype": "bfloat16"}))
    torch.manual_seed(5)
    mixer = Mamba2Mixer(cfg, device=dev, dtype=dtype)
    with torch.no_grad():
        for lin in (mixer.in_proj, mixer.out_proj):
            lin.weight.normal_(0.0, 0.02)
        mixer.conv1d.weight.normal_(0.0, 0.3)
        mixer.A_log.copy_(torch.log(torch.linspace(1.0, 16.0, d.h, device=dev)))
        mixer.dt_bias.copy_(torch.randn(d.h, device=dev) - 3.0)
    u = torch.randn(1, d.length, d.hidden, device=dev, dtype=dtype)
    out: dict[str, Any] = {}
    ys = {}
    for mode in ("v1", "triton"):
        os.environ["SECURE_RUN_SSD"] = mode
        tm.CONV_BLOCKS = conv_old if mode == "v1" else conv_new
        with torch.no_grad():
            ys[mode] = mixer(u, None, fused=True)
            out[f"mixer_{mode}_ms"] = bench(lambda: mixer(u, None, fused=True))
    os.environ.pop("SECURE_RUN_SSD", None)
    tm.CONV_BLOCKS = conv_old
    out["mixer_new_vs_old_rel"] = _rel(ys["triton"], ys["v1"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--check-length", type=int, default=4173, help="odd length of the float64 accuracy check")
    ap.add_argument("--sweep", action="store_true", help="state-pass / chunk-scan / norm launch variants")
    ap.add_argument("--extra", action="store_true", help="a few more chunk-scan variants and the conv launch variants")
    ap.add_argument("--no-mixer", action="store_true", help="skip the whole-mixer timing")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 on the CPU")
    args = ap.parse_args(argv)
    from secure_run.kernels import _triton_mamba as tm
    from secure_run.kernels.model_reference import mamba_prefill_ssd_reference

    smoke = args.smoke
    dev = "cpu" if smoke else "cuda"
    dtype = torch.float16 if smoke else torch.bfloat16
    d = Dims(length=args.length) if not smoke else Dims(length=300, h=4, p=16, g=2, n=16, chunk=32, hidden=32)
    bench = _timer(smoke)
    card = torch.cuda.get_device_name() if not smoke else "cpu (interpreter)"
    import triton

    print(f"card: {card}, torch {torch.__version__}, triton {triton.__version__}, dims {asdict(d)}", flush=True)
    rows: list[dict[str, Any]] = []
    t = _inputs(d, dev, dtype, seed=1)
    best = _per_kernel(t, d, dtype, bench, args.sweep and not smoke, args.extra, rows)
    conv_old, conv_best = _conv_variants(d, dtype, dev, bench, args.extra, rows)
    print(f"chosen: {best}", flush=True)
    res: dict[str, Any] = {"card": card, "dims": asdict(d), "dtype": str(dtype), "rows": rows,
                           "chosen": asdict(best), "default": asdict(tm.SsdConfig())}
    old_ms = bench(lambda: _old_after_conv(t, d, dtype))
    new_def_ms = bench(lambda: _new_after_conv(t, d, dtype, None))
    new_best_ms = bench(lambda: _new_after_conv(t, d, dtype, best))
    fused_best = replace(best, fuse_norm=True, scan_heads=8)
    new_fused_ms = bench(lambda: _new_after_conv(t, d, dtype, fused_best))
    o_old, f_old = _old_after_conv(t, d, dtype)
    o_new, f_new = _new_after_conv(t, d, dtype, None)
    res.update({"after_conv_old_ms": old_ms, "after_conv_new_default_ms": new_def_ms,
                "after_conv_new_chosen_ms": new_best_ms, "after_conv_new_fused_norm_ms": new_fused_ms,
                "after_conv_bytes_floor_ms": _stage_bytes(d, dtype)["after_conv"] / 4.0e12 * 1e3,
                "new_vs_old_out_rel": _rel(o_new, o_old), "new_vs_old_state_rel": _rel(f_new, f_old)})
    del o_old, o_new, f_old, f_new
    # accuracy against float64 at an odd length (every variant family once)
    dc = replace(d, length=args.check_length if not smoke else 77)
    tc = _inputs(dc, dev, dtype, seed=2)
    ref, rfin = mamba_prefill_ssd_reference(
        tc["x"].double(), tc["dt"].double(), tc["A"].double(), tc["bm"].double(), tc["cm"].double(),
        tc["D"].double(), tc["z"].double(), tc["w"].double(), chunk_size=dc.chunk, initial_state=tc["s0"].double(),
        eps=1e-5, group_size=dc.h * dc.p // dc.g, out_dtype=torch.float64)
    acc: dict[str, Any] = {}
    o, f = _old_after_conv(tc, dc, dtype)
    acc["old"] = (_rel(o, ref), _rel(f, rfin))
    for name, cfg in (("new default", tm.SsdConfig()), ("new chosen", best), ("new fused norm", fused_best),
                      ("new lowp off", replace(best, lowp=False))):
        o, f = _new_after_conv(tc, dc, dtype, cfg)
        acc[name] = (_rel(o, ref), _rel(f, rfin))
    res["accuracy_vs_fp64"] = {k: {"out": v[0], "state": v[1]} for k, v in acc.items()}
    if not args.no_mixer and not smoke:
        res.update(_mixer_forward(d, dtype, dev, bench, conv_old, conv_best))
    res["conv_blocks"] = {"old": conv_old, "chosen": conv_best}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mamba.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"\n| Mamba-2 prefill, one layer, L={d.length} {dtype} | ms |")
    print("|---|---|")
    for r in rows:
        print(f"| {r['stage']}: {r['variant']} | {r['ms']:.3f} ({r['GB/s']:.0f} GB/s) |")
    print(f"| after conv, old (v1 scan + PyTorch D/norm) | {old_ms:.3f} |")
    print(f"| after conv, new default / chosen / fused norm | {new_def_ms:.3f} / {new_best_ms:.3f} / {new_fused_ms:.3f} |")
    print(f"| after conv, bytes floor at 4 TB/s | {res['after_conv_bytes_floor_ms']:.3f} |")
    if "mixer_v1_ms" in res:
        print(f"| whole mixer (in_proj..out_proj) v1 / new | {res['mixer_v1_ms']:.3f} / {res['mixer_triton_ms']:.3f} "
              f"(rel diff {res['mixer_new_vs_old_rel']:.2e}) |")
    print(f"| new vs old at L={d.length}: out / state rel diff | {res['new_vs_old_out_rel']:.2e} / "
          f"{res['new_vs_old_state_rel']:.2e} |")
    for k, v in acc.items():
        print(f"| vs fp64 at L={dc.length}: {k} out / state | {v[0]:.2e} / {v[1]:.2e} |")
    print(f"chosen config: {best}; conv blocks {conv_best} (committed {conv_old})")
    bad = [k for k, v in acc.items() if not (v[0] < 1e-2 and v[1] < 1e-2)]
    if bad:
        print(f"ACCURACY FAILED: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
