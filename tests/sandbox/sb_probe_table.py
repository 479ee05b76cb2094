"""Run the sandbox probes from inside each backend and print one markdown table (sandbox/README.md).

    python tests/sandbox/sb_probe_table.py namespace docker          # CPU host (this repo's tests)
    python tests/sandbox/sb_probe_table.py --gpu namespace docker    # GPU host (sandbox/gpu_docker_e2e.sh)

The probes are the package's (:mod:`secure_run.sandbox.probes`, the same ones ``secure-run sandbox
selftest`` runs): one row per control (held or FAIL, and what was observed inside), then, with
``--raw``, every raw observation (an errno name, ``ok``, a value).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from secure_run.sandbox.backends import get_backend
from secure_run.sandbox.probes import run_probes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("backends", nargs="+", choices=["namespace", "docker"])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--raw", action="store_true", help="also print every raw observation")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for name in args.backends:
        backend = get_backend(name, build=True) if name == "docker" else get_backend(name)
        try:
            report = run_probes(backend, gpu=args.gpu)
            results[name] = {"controls": {c.name: c.to_json() for c in report.controls}, "raw": dict(report.raw)}
        except Exception as err:  # the table records what failed
            results[name] = {"controls": {}, "raw": {"error": f"{type(err).__name__}: {err}"[:300]}}
    names = list(results)
    print("| control | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    controls = [c for c in next(iter(results.values()))["controls"]] or ["error"]
    for c in controls:
        cells = []
        for b in names:
            ctl = results[b]["controls"].get(c)
            cells.append("n/a" if ctl is None else ("ok: " if ctl["holds"] else "**FAIL**: ") +
                         str(ctl["observed"]).replace("|", "/")[:160])
        print(f"| {c} | " + " | ".join(cells) + " |")
    if args.raw:
        print()
        print("| probe | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for k in sorted({k for r in results.values() for k in r["raw"]}):
            cells = [json.dumps(results[b]["raw"].get(k), separators=(",", ":"))[:120].replace("|", "/")
                     for b in names]
            print(f"| {k} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    ok = all(r["controls"] and all(c["holds"] for c in r["controls"].values()) for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
