"""Weight-load path to the GPU: one pageable buffer per tensor vs the loader's page-locked staging.

Writes one safetensors shard of ``--tensors`` bf16 tensors of ``--mib`` MiB each under ``--tmp``
(page cache warm after the write), then moves every tensor to ``cuda`` through the loader's own
descriptor reads, two ways, best of ``--repeat``:

* ``pageable``: ``_OpenShard.read`` (a fresh ``bytearray`` per tensor) then ``.to("cuda")``: the
  path the loader took before staging;
* ``staged``: ``_Staging.read`` (two reusable page-locked buffers, read and copy overlapped).

Also times a plain pinned host-to-device copy (the DMA ceiling) in the same run. Table last, JSON
to ``$OUT/load.json`` (or ``--out``)::

    python3 -P bench/load.py --tensors 32 --mib 128
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _build(root: Path, tensors: int, mib: int) -> Path:
    from safetensors.torch import save_file

    n = (mib << 20) // 2
    save_file({f"t{i:03d}": torch.randn(n, dtype=torch.bfloat16) for i in range(tensors)}, str(root / "w.safetensors"))
    return root / "w.safetensors"


def _time(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    from secure_run.manifests.folder import UnverifiedFolder
    from secure_run.model.loader import _OpenShard, _Staging

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")) / "load.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="secure-run-load-", dir=args.tmp))
    try:
        path = _build(tmp, args.tensors, args.mib)
        folder = UnverifiedFolder(tmp)
        shard = _OpenShard(folder, path.name, None)
        infos = list(shard.header().tensors.values())
        total = sum(i.nbytes for i in infos)
        staging = _Staging(torch.device("cuda"))
        want = [shard.read(i).to("cuda") for i in infos]
        got = [staging.read(shard, i) for i in infos]
        staging.finish()
        exact = all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        del want, got
        pageable = _time(lambda: [shard.read(i).to("cuda") for i in infos], args.repeat)
        staged = _time(lambda: ([staging.read(shard, i) for i in infos], staging.finish()), args.repeat)
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(total, dtype=torch.uint8, device="cuda")
        dma = _time(lambda: dev.copy_(host, non_blocking=True), args.repeat)
        shard.close()
        folder.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {"pageable buffer per tensor": pageable, "page-locked staging (loader)": staged, "pinned H2D copy alone": dma}
    result = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "card": torch.cuda.get_device_name(),
              "torch": torch.__version__, "bytes": total, "tensors": len(infos), "bit_exact": exact,
              "seconds": rows, "gbps": {k: total / v / 1e9 for k, v in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{len(infos)} tensors, {total / 1e9:.2f} GB, {result['card']}, best of {args.repeat}, staged == pageable: {exact}")
    for k, v in rows.items():
        print(f"{k:<32} {v:7.3f} s {total / v / 1e9:7.2f} GB/s")
    if not exact:
        raise SystemExit("staged load differs from the pageable load")


if __name__ == "__main__":
    main()
