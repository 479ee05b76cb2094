#!/usr/bin/env bash
# The namespace sandbox on a GPU host (no Docker there): CUDA matmul + a Triton kernel inside it,
# plus the namespace isolation tests on that host (cgroup v2). Run from the repository root as root.
#
#   sandbox/gpu_selftest.sh            # on the GPU host
#   MODE=cpu sandbox/gpu_selftest.sh   # dry run on a CPU host (Triton interpreter, GPU tests skip)
#
# The GPU host has python3 with torch + triton but no pydantic: wheels for it may be carried in
# $WHEELS (default .devcarry/sandbox-whl: pydantic, pydantic-core, annotated-types,
# typing-inspection, typing-extensions for cp312) and are unpacked into a private directory. secure_run is made importable through a symlink tree
# (the repository maps each top-level folder to secure_run.<folder>), so nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-gpu}
PY=${PYTHON:-python3}
work=$(mktemp -d /tmp/secure-run-gpu.XXXXXX)
trap 'rm -rf "$work"' EXIT

WHEELS=${WHEELS:-.devcarry/sandbox-whl}
mkdir -p "$work/site"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" "$WHEELS"/*.whl
fi
mkdir -p "$work/tree/secure_run"
for f in secure_run/*.py; do ln -s "$PWD/$f" "$work/tree/secure_run/"; done
for d in runner manifests policies model kernels sandbox; do ln -s "$PWD/$d" "$work/tree/secure_run/$d"; done
export PYTHONPATH="$work/tree:$work/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

echo "== host"
uname -r
if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  export SECURE_RUN_TEST_GPU=1
  "$PY" -c 'import torch; torch.zeros(1, device="cuda"); print("host CUDA ok:", torch.cuda.get_device_name(0))'
  ls -l /dev/nvidia*
fi
"$PY" -c 'import sys, torch, triton, pydantic; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "pydantic", pydantic.__version__, "cuda", torch.cuda.is_available())'
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then echo "cgroup v2: $(cat /sys/fs/cgroup/cgroup.controllers)"; else echo "cgroup v1"; fi
command -v setpriv unshare

echo "== one sandboxed selftest (the record)"
"$PY" -P - "$MODE" <<'EOF'
import json, sys, time
from secure_run.sandbox import SandboxPolicy, SelftestRequest, get_backend, run_worker
gpu = sys.argv[1] == "gpu"
policy = SandboxPolicy(gpu=gpu, jit_cache_mib=1024, memory_mib=32768, pids_limit=1024, wall_clock_s=300,
                       scratch_mib=1024, shm_mib=1024, env={} if gpu else {"TRITON_INTERPRET": "1"})
req = SelftestRequest(task="selftest", device="cuda" if gpu else "cpu", seed=5, steps=8, triton=True,
                      matmul_size=4096 if gpu else 256)
t0 = time.monotonic()
events = list(run_worker(get_backend("namespace"), policy, req))
print("tokens", "".join(e.text for e in events if e.type == "text"))
print("stats", json.dumps(events[-1].model_dump(mode="json")))
print(f"wall {time.monotonic() - t0:.1f} s")
EOF

echo "== pytest: GPU + namespace sandbox tests"
"$PY" -P -m pytest -p no:cacheprovider tests/sandbox -m "gpu or namespace" -k "not generate" -q -rs --no-header \
  -o addopts="" -s 2>&1 | grep -v "^$" | tail -40
