"""V2 (issue 12): bytes read from disk per byte of weights, verify + load, cold cache for the model.

Builds a multi-GB signed model folder (the demo's tokenizer, template, licence files and policy,
with a wider MoE so the random fp32 weights reach ``--gib``), pins it in a private lock, runs
`secure-run generate` once to warm everything *but* the model (Python, torch, the sandbox), then
evicts the model folder's pages from the page cache (``POSIX_FADV_DONTNEED`` on each file, checked
with ``fincore`` when present) and runs `secure-run generate --max-new-tokens 1` again: the gate
verifies into sealed copies (manifests/sealed.py), the namespace sandbox's worker loads from them.

Bytes read from disk are measured two ways: ``ru_inblock`` of the child process tree (every
process of the run, the sandboxed worker included, counted in 512-byte blocks by the kernel) and
the read sectors of the folder's block device in ``/proc/diskstats`` (whole machine: other work
adds to it). Target V2: <= 1.05 bytes read per byte of the folder.

    .venv/bin/python bench/handoff.py [--gib 4] [--sandbox namespace] [--out bench/out/handoff.json]

On a GPU host (``--gpu``; bench/handoff_gpu.sh) the weights are bf16 and wider, the worker loads
them to the GPU, and the same run also measures the host's sha256 ceiling (every core hashing in
memory) and the host-to-device copy bandwidth, so that verify + load can be compared with both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "secure_run.runner.cli"]
AUX = ("LICENSE", "NOTICE", "README.md", "chat_template.jinja", "generation_config.json", "special_tokens_map.json",
       "tokenizer.json", "tokenizer_config.json")
SHARD_BYTES = 1 << 30


def build(root: Path, gib: float, *, dtype: str = "float32", hidden: int = 512, moe_inter: int = 2048,
          experts: int = 0, repeat: int = 1) -> int:
    """The demo's files with a MoE wide enough for ``gib`` GiB of weights; returns the folder's bytes.

    ``experts`` 0: as many routed experts as ``gib`` needs; ``repeat``: the layer pattern repeated.
    """
    import torch
    from safetensors.torch import save_file

    from secure_run.model.checkpoint import expected_tensors
    from secure_run.model.config import parse_config_json
    from secure_run.model.demo import demo_model_dir

    demo = Path(demo_model_dir())
    root.mkdir(parents=True)
    for name in AUX:
        shutil.copy(demo / name, root / name)
    cfg = json.loads((demo / "config.json").read_text())
    cfg["hybrid_override_pattern"] *= repeat
    cfg["num_hidden_layers"] = len(cfg["hybrid_override_pattern"])
    moe_layers = cfg["hybrid_override_pattern"].count("E")
    width = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    cfg.update(hidden_size=hidden, moe_intermediate_size=moe_inter, torch_dtype=dtype)
    per_expert = 2 * hidden * moe_inter * width
    cfg["n_routed_experts"] = experts or max(8, int(gib * (1 << 30) / (per_expert * moe_layers)) // 8 * 8)
    text = json.dumps(cfg, indent=2)
    (root / "config.json").write_text(text)
    table = expected_tensors(parse_config_json(text.encode(), path="config.json"))
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, spec in sorted(table.items()):
        t = (torch.randn(spec.shape, generator=gen) * 0.02).to(getattr(torch, dtype))
        if name.endswith("e_score_correction_bias"):
            t = t.float()  # always F32 in the checkpoint table
        if size + t.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map: dict[str, str] = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(root / fname))
        weight_map.update({n: fname for n in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in root.iterdir())


def sign_and_pin(root: Path, work: Path) -> tuple[Path, Path]:
    from secure_run import manifests

    key = manifests.generate_key(work / "bench-handoff-test-key.pem")
    manifests.sign_model(root, key.private)
    result = manifests.verify_model(root, manifests.KeyTrust.from_file(key.public))
    lock = work / "models.lock.json"
    manifests.pin_model(lock, "superlinear-demo", root_digest=result.root_digest, signer=result.signer,
                        public_key=os.path.relpath(key.public, work), path=os.path.relpath(root, work),
                        policy="builtin:demo")
    result.close()
    return lock, key.public


def openssl_rate() -> float:
    """Single-core ``openssl speed -evp sha256`` GB/s at 16 KiB blocks (hashlib on one thread without openssl)."""
    if shutil.which("openssl") is None:
        return sha256_ceiling(1)
    out = subprocess.run(["openssl", "speed", "-seconds", "3", "-bytes", "16384", "-evp", "sha256"],
                         capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.lower().startswith("sha256")][-1]
    return float(line.split()[-1].rstrip("k")) * 1000 / 1e9


def v1_verify(root: Path, pub: Path, repeat: int = 3) -> dict[str, float]:
    """`secure-run verify` end to end on the folder (page cache warm), best of ``repeat``, vs cores x openssl."""
    best = float("inf")
    hash_s = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run([*CLI, "verify", str(root), "--public-key", str(pub), "--json"],
                             capture_output=True, text=True, check=True).stdout
        best = min(best, time.perf_counter() - t0)
        hash_s = min(hash_s, json.loads(out.splitlines()[-1])["hash_seconds"])
    return {"verify_seconds": best, "hash_seconds": hash_s, "openssl_1core_gbps": openssl_rate()}


def evict(root: Path) -> int:
    """Drop the folder's pages from the page cache; returns the pages still cached (fincore), -1 if unknown."""
    for p in root.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if shutil.which("fincore") is None:
        return -1
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, root.iterdir())],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split())


def _device_sectors_read(path: Path) -> int:
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if int(f[0]) == major and int(f[1]) == minor:
            return int(f[5])
    raise SystemExit(f"no /proc/diskstats line for device {major}:{minor}")


def run_generate(root: Path, lock: Path, state: Path, sandbox: str, gpu: bool) -> dict[str, Any]:
    """One `secure-run generate` of one token; times the gate (to the sandbox status line) and the run."""
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    args = [*CLI, "generate", "--model", str(root), "--policy", "builtin:demo", "--lock", str(lock),
            "--prompt", "hello", "--max-new-tokens", "1", "--sandbox", sandbox, "--memory-mib", "16384", "--json",
            *(["--gpu"] if gpu else [])]
    before_blocks = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    before_sectors = _device_sectors_read(root)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    gate_s: float | None = None
    lines: list[dict[str, Any]] = []
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        ev = json.loads(line)
        lines.append(ev)
        if gate_s is None and ev.get("type") == "status" and ev.get("stage") == "sandbox":
            gate_s = time.perf_counter() - t0
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    if rc != 0 or not lines or lines[-1].get("type") != "final":
        err = proc.stderr.read() if proc.stderr else ""
        raise SystemExit(f"generate failed (exit {rc}):\n{lines[-3:]}\n{err[-4000:]}")
    final = lines[-1]
    load_s = final["stats"]["worker"]["detail"]["load_seconds"]
    return {"seconds": round(seconds, 3), "gate_seconds": gate_s, "worker_load_seconds": load_s,
            "ru_inblock_bytes": (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before_blocks) * 512,
            "device_read_bytes": (_device_sectors_read(root) - before_sectors) * 512,
            "final": final}


def sha256_ceiling(threads: int, mib: int = 512) -> float:
    """GB/s of ``threads`` threads each hashing an in-memory buffer (hashlib releases the GIL)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    buf = os.urandom(1 << 20) * mib

    def one(_: int) -> None:
        hashlib.sha256(buf).digest()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads)))  # warm-up
        t0 = time.perf_counter()
        list(pool.map(one, range(threads)))
        dt = time.perf_counter() - t0
    return threads * len(buf) / dt / 1e9


def h2d_bandwidth(gib: int = 4) -> dict[str, float]:
    """Host-to-device copy GB/s from pageable and from pinned memory."""
    import torch

    out: dict[str, float] = {}
    for label, pinned in (("pageable", False), ("pinned", True)):
        src = torch.empty(gib << 30, dtype=torch.uint8, pin_memory=pinned)
        src.fill_(1)
        dst = torch.empty_like(src, device="cuda")
        dst.copy_(src)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        out[label] = src.numel() / (time.perf_counter() - t0) / 1e9
        del src, dst
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.0, help="approximate size of the weights (GiB)")
    ap.add_argument("--sandbox", default="namespace", choices=["namespace", "docker"])
    ap.add_argument("--gpu", action="store_true", help="bf16 weights loaded to the GPU (--hidden 2048 "
                    "--moe-inter 4096 --experts 128 unless given)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--moe-inter", type=int)
    ap.add_argument("--experts", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="repeat the demo's layer pattern")
    ap.add_argument("--out", type=Path, default=Path("bench/out/handoff.json"))
    args = ap.parse_args()
    shape = {"dtype": "bfloat16" if args.gpu else "float32",
             "hidden": args.hidden or (2048 if args.gpu else 512),
             "moe_inter": args.moe_inter or (4096 if args.gpu else 2048),
             "experts": args.experts or (128 if args.gpu else 0), "repeat": args.repeat}
    with tempfile.TemporaryDirectory(prefix="bench-handoff-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        root = work / "superlinear-demo"
        t0 = time.perf_counter()
        folder_bytes = build(root, args.gib, **shape)
        lock, pub = sign_and_pin(root, work)
        print(f"built and signed {folder_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
        v1 = v1_verify(root, pub)
        state = work / "state"
        state.mkdir()
        # first run: the folder is in the page cache (just written and signed); everything else warms up
        warm = run_generate(root, lock, state, args.sandbox, args.gpu)
        print(f"warm run: {warm['seconds']:.1f} s", flush=True)
        cached_after_evict = evict(root)
        cold = run_generate(root, lock, state, args.sandbox, args.gpu)
    rows = {"page cache warm (first run)": warm, "cold model folder": cold}
    cores = os.cpu_count() or 1
    ceiling = sha256_ceiling(cores)
    h2d = h2d_bandwidth() if args.gpu else {}
    result = {
        "bench": "handoff", "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "machine": platform.node(),
        "cpus": cores, "python": platform.python_version(), "sandbox": args.sandbox, "gpu": args.gpu, "shape": shape,
        "folder_bytes": folder_bytes, "model_pages_cached_before_cold_run_bytes": cached_after_evict,
        "runs": rows, "sha256_ceiling_gbps": ceiling, "h2d_gbps": h2d, "v1": v1,
        "v1_ratio": folder_bytes / v1["verify_seconds"] / (cores * v1["openssl_1core_gbps"] * 1e9),
        "v2_ratio_ru_inblock": cold["ru_inblock_bytes"] / folder_bytes,
        "v2_ratio_device": cold["device_read_bytes"] / folder_bytes,
    }
    if args.gpu:
        import torch

        result["card"] = torch.cuda.get_device_name(0)
        result["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    gb = folder_bytes / 1e9
    print(f"\nfolder: {gb:.2f} GB ({shape}); model bytes cached before the cold run: {cached_after_evict}")
    print(f"sha256 ceiling, {cores} threads in memory: {ceiling:.2f} GB/s" +
          (f"; host-to-device copy: pageable {h2d['pageable']:.1f} GB/s, pinned {h2d['pinned']:.1f} GB/s" if h2d else ""))
    print("| run | total s | gate (verify + seal + policy) s | GB/s | worker load s | GB/s | "
          "read from disk (process tree) | per folder byte | read (device) | per byte |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        g, w = r["gate_seconds"] or float("nan"), r["worker_load_seconds"]
        print(f"| {label} | {r['seconds']:.2f} | {g:.2f} | {gb / g:.2f} | {w:.2f} | {gb / w:.2f} | "
              f"{r['ru_inblock_bytes'] / 1e9:.3f} GB | {r['ru_inblock_bytes'] / folder_bytes:.3f} | "
              f"{r['device_read_bytes'] / 1e9:.3f} GB | {r['device_read_bytes'] / folder_bytes:.3f} |")
    print(f"V2 (cold): {result['v2_ratio_ru_inblock']:.3f} bytes read per folder byte (target <= 1.05)")
    print(f"V1: secure-run verify {v1['verify_seconds']:.2f} s ({gb / v1['verify_seconds']:.2f} GB/s, hashing step "
          f"{v1['hash_seconds']:.2f} s) = {result['v1_ratio']:.2f} x ({cores} cores x openssl "
          f"{v1['openssl_1core_gbps']:.2f} GB/s) (target >= 0.9)")


if __name__ == "__main__":
    main()
