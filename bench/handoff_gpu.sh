#!/usr/bin/env bash
# One device-machine call for issue 12's GPU row: verify + load-to-GPU of a large signed bf16 folder
# through `secure-run generate --gpu --sandbox namespace` (sealed hand-off), page cache warm and cold,
# with the host's sha256 ceiling and host-to-device copy bandwidth measured in the same run.
# Run from the repository root on the GPU box:  bash bench/handoff_gpu.sh WHEELS_DIR [bench/handoff.py args...]
# WHEELS_DIR holds the cp312 wheels the GPU image lacks (pydantic, pydantic-core, annotated-types,
# typing-inspection, cryptography, cffi, pycparser). Output JSON goes to $OUT (or bench/out).
set -euo pipefail
WHEELS=$(realpath "$1")
shift
OUT=${OUT:-bench/out}
mkdir -p "$OUT" /tmp/sr-site /tmp/sr-tree/secure_run /tmp/sr-state
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sr-site "$WHEELS"/*.whl
for f in secure_run/*.py; do ln -sf "$PWD/$f" /tmp/sr-tree/secure_run/; done
for d in runner manifests policies model kernels sandbox; do ln -sfn "$PWD/$d" "/tmp/sr-tree/secure_run/$d"; done
export PYTHONPATH="/tmp/sr-tree:/tmp/sr-site" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 BENCH_DIR=/tmp
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /tmp | tail -1
free -g | head -2
python3 -P bench/handoff.py --gpu --out "$OUT/handoff_gpu.json" "$@"
