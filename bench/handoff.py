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


def build(root: Path, gib: float) -> int:
    """The demo's files with a MoE wide enough for ``gib`` GiB of fp32 weights; returns the folder's bytes."""
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
    moe_layers = cfg["hybrid_override_pattern"].count("E")
    cfg.update(hidden_size=512, moe_intermediate_size=2048)
    per_expert = 2 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 4
    cfg["n_routed_experts"] = max(8, int(gib * (1 << 30) / (per_expert * moe_layers)) // 8 * 8)
    text = json.dumps(cfg, indent=2)
    (root / "config.json").write_text(text)
    table = expected_tensors(parse_config_json(text.encode(), path="config.json"))
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, spec in sorted(table.items()):
        t = torch.randn(spec.shape, generator=gen) * 0.02
        if size + t.numel() * 4 > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 4
    weight_map: dict[str, str] = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(root / fname))
        weight_map.update({n: fname for n in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in root.iterdir())


def sign_and_pin(root: Path, work: Path) -> Path:
    from secure_run import manifests

    key = manifests.generate_key(work / "bench-handoff-test-key.pem")
    manifests.sign_model(root, key.private)
    result = manifests.verify_model(root, manifests.KeyTrust.from_file(key.public))
    lock = work / "models.lock.json"
    manifests.pin_model(lock, "superlinear-demo", root_digest=result.root_digest, signer=result.signer,
                        public_key=os.path.relpath(key.public, work), path=os.path.relpath(root, work),
                        policy="builtin:demo")
    result.close()
    return lock


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


def run_generate(root: Path, lock: Path, state: Path, sandbox: str) -> dict[str, Any]:
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    args = [*CLI, "generate", "--model", str(root), "--policy", "builtin:demo", "--lock", str(lock),
            "--prompt", "hello", "--max-new-tokens", "1", "--sandbox", sandbox, "--memory-mib", "16384", "--json"]
    before_blocks = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    before_sectors = _device_sectors_read(root)
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"generate failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    final = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return {"seconds": round(seconds, 3),
            "ru_inblock_bytes": (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before_blocks) * 512,
            "device_read_bytes": (_device_sectors_read(root) - before_sectors) * 512,
            "final": final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.0, help="approximate size of the weights (GiB)")
    ap.add_argument("--sandbox", default="namespace", choices=["namespace", "docker"])
    ap.add_argument("--out", type=Path, default=Path("bench/out/handoff.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-handoff-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        root = work / "superlinear-demo"
        t0 = time.perf_counter()
        folder_bytes = build(root, args.gib)
        lock = sign_and_pin(root, work)
        print(f"built and signed {folder_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
        state = work / "state"
        state.mkdir()
        warm = run_generate(root, lock, state, args.sandbox)  # everything but the model is cached after this
        cached_after_evict = evict(root)
        cold = run_generate(root, lock, state, args.sandbox)
    rows = {"warm-up run (page cache warm)": warm, "cold model folder": cold}
    result = {
        "bench": "handoff", "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "machine": platform.node(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "sandbox": args.sandbox,
        "folder_bytes": folder_bytes, "model_pages_cached_before_cold_run_bytes": cached_after_evict,
        "runs": rows,
        "v2_ratio_ru_inblock": cold["ru_inblock_bytes"] / folder_bytes,
        "v2_ratio_device": cold["device_read_bytes"] / folder_bytes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nfolder: {folder_bytes / 1e9:.2f} GB; model bytes cached before the cold run: {cached_after_evict}")
    print("| run | seconds | read from disk (process tree) | per folder byte | read (device, whole machine) | per byte |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['seconds']:.2f} | {r['ru_inblock_bytes'] / 1e9:.3f} GB | "
              f"{r['ru_inblock_bytes'] / folder_bytes:.3f} | {r['device_read_bytes'] / 1e9:.3f} GB | "
              f"{r['device_read_bytes'] / folder_bytes:.3f} |")
    print(f"V2 (cold): {result['v2_ratio_ru_inblock']:.3f} bytes read per folder byte (target <= 1.05)")


if __name__ == "__main__":
    main()
