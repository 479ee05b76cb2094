"""Append cost of one chained, locked, fsynced audit record (issue 14, target < 5 ms per run).

Times ``AuditLog.append`` of a realistic run record (every issue 14.2 field filled) in a fresh log
under ``--dir`` (default: a temporary folder on the state directory's file system, so that ``fsync``
costs what it costs there). Three modes:

* ``chained``: hash chain + flock + one write + fsync, no key;
* ``chained+signed/64``: with the host audit key, a signed checkpoint every 64 records (the default);
* ``checkpoint``: only the appends that also sign and write a checkpoint (the worst case);
* ``disk floor``: a bare ``write`` + ``fsync`` of a line of the same size with no lock, chain or
  JSON: what the file system costs by itself (the rest is secure-run's overhead).

Prints a table (mean, p50, p95, max in ms) and writes JSON to ``--out`` (default ``bench/out/audit.json``).

    .venv/bin/python bench/audit.py [--n 500] [--dir /path/on/target/fs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_MS = 5.0


def _decision() -> Any:
    from secure_run.policies.findings import Decision

    return Decision(
        allowed=True, mode="enforce", stage="run", policy_name="demo", policy_sha256="cd" * 32, findings=(),
        model_dir="/models/demo-tiny", model_root_digest="ab" * 32,
        license={"license_id": "Apache-2.0", "fingerprint": "ef" * 32}, banner=None, patent_notice=(), limits={},
        declared_use="research", operator="bench", timestamp="2026-01-01T00:00:00Z",
    )


def _record(i: int) -> dict[str, object]:
    from secure_run.policies import audit_record
    from secure_run.policies.audit import code_identity

    return audit_record(
        _decision(), event="finished", run_id=f"run-{i}", signer={"method": "key", "key_sha256": "12" * 32},
        code=code_identity(), sandbox_backend="docker", image_digest="sha256:" + "34" * 32,
        gpu={"name": "NVIDIA H200", "driver": "570.1"}, prompt="p" * 2000, output="o" * 4000,
        parameters={"max_new_tokens": 256, "temperature": 0.7, "seed": i},
        host_measured={"generated_tokens": 256, "seconds": 3.1, "output_blocked": False},
        worker_reported={"tokens_per_second": 82.5},
    )


def _time(log: Any, n: int) -> list[float]:
    out = []
    for i in range(n):
        rec = _record(i)
        t0 = time.perf_counter()
        log.append(rec)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _floor(path: Path, n: int, size: int) -> list[float]:
    line = b"x" * (size - 1) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, line)
            os.fsync(fd)
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
    return out


def _row(mode: str, ms: list[float]) -> dict[str, Any]:
    ms_sorted = sorted(ms)
    return {
        "mode": mode, "n": len(ms), "mean_ms": statistics.fmean(ms), "p50_ms": statistics.median(ms),
        "p95_ms": ms_sorted[max(0, int(len(ms) * 0.95) - 1)], "max_ms": ms_sorted[-1],
        "meets_target": statistics.fmean(ms) < TARGET_MS,
    }


def main() -> None:
    from secure_run.manifests import generate_key
    from secure_run.policies import AuditLog
    from secure_run.policies._state import state_dir
    from secure_run.policies.audit import code_identity, verify_log

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="appends per mode")
    ap.add_argument("--dir", type=Path, default=None, help="folder for the temporary logs")
    ap.add_argument("--out", type=Path, default=Path("bench/out/audit.json"))
    args = ap.parse_args()
    base = args.dir
    if base is None:
        base = state_dir()
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    code_identity()  # hashed once per process; not part of an append
    rows = []
    with tempfile.TemporaryDirectory(prefix="audit-bench-", dir=base) as tmp:
        root = Path(tmp)
        keys = generate_key(root / "audit-key.pem")
        rows.append(_row("chained", _time(AuditLog(root / "a.jsonl"), args.n)))
        signed = AuditLog(root / "b.jsonl", key=keys.private, checkpoint_every=64)
        rows.append(_row("chained+signed/64", _time(signed, args.n)))
        every = AuditLog(root / "c.jsonl", key=keys.private, checkpoint_every=1)
        rows.append(_row("checkpoint", _time(every, max(20, args.n // 10))))
        rows.append(_row("disk floor", _floor(root / "d.raw", args.n, len(json.dumps(_record(0))) + 200)))
        t0 = time.perf_counter()
        report = verify_log(root / "b.jsonl", keys.public)
        verify_s = time.perf_counter() - t0
        fs = os.statvfs(root)
    print(f"{'mode':<20} {'n':>5} {'mean ms':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  < {TARGET_MS} ms")
    for r in rows:
        print(f"{r['mode']:<20} {r['n']:>5} {r['mean_ms']:>8.3f} {r['p50_ms']:>8.3f} {r['p95_ms']:>8.3f} "
              f"{r['max_ms']:>8.3f}  {'yes' if r['meets_target'] else 'NO'}")
    print(f"verify of {report.records} records with {report.checkpoints} checkpoints: {verify_s * 1000:.1f} ms")
    doc = {
        "bench": "audit-append", "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "fs_block": fs.f_bsize},
        "record_bytes": len(json.dumps(_record(0))), "target_ms": TARGET_MS, "rows": rows,
        "verify": {"records": report.records, "checkpoints": report.checkpoints, "seconds": verify_s},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
