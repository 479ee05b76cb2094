#!/usr/bin/env bash
# One device-machine session for the kernels: GPU test suite, then the benchmark (bench/kernels.py).
# Run from the repository root on the GPU box (torch + triton + pytest preinstalled, no pydantic):
#   bash tests/kernels/gpu_session.sh [pytest -k expression] [bench args...]
# (python3 -P: the repo's own secure_run/ folder must not shadow the /tmp/sr symlink farm.)
# Needs .whl/superlinear-0.1.0-py3-none-any.whl carried along for the upstream baseline / parity.
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT" /tmp/sr/secure_run
ln -sfn "$PWD/kernels" /tmp/sr/secure_run/kernels
cp secure_run/__init__.py secure_run/errors.py /tmp/sr/secure_run/
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/sr:/tmp/site PYTHONUNBUFFERED=1 SECURE_RUN_TEST_GPU=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
KEXPR=${1:-}
shift || true
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-330}" python3 -P -m pytest -p no:cacheprovider -q -rfE tests/kernels/test_triton_gpu.py \
    ${KEXPR:+-k "$KEXPR"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  timeout "${BENCH_TIMEOUT:-330}" python3 bench/kernels.py "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{' 
fi
