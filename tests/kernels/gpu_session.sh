#!/usr/bin/env bash
# One device-machine session for the kernels: GPU test suite, then the benchmark (bench/kernels.py).
# Run from the repository root on the GPU box (torch + triton + pytest preinstalled, no pydantic):
#   bash tests/kernels/gpu_session.sh [pytest -k expression] [bench args...]
# (python3 -P: the repo's own secure_run/ folder must not shadow the $SR_ROOT symlink farm.)
# Needs .whl/superlinear-0.1.0-py3-none-any.whl carried along for the upstream baseline / parity.
# Exit status: that of the first failing step (a failing or timed-out GPU test fails the script, and
# the benchmark is then not run); full logs are in $OUT/gpu_tests.log and $OUT/bench.log.
set -euo pipefail
OUT=${OUT:-bench/out}
SR_ROOT=${SR_ROOT:-/tmp/sr}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$SR_ROOT/secure_run"
ln -sfn "$PWD/kernels" "$SR_ROOT/secure_run/kernels"
cp secure_run/__init__.py secure_run/errors.py "$SR_ROOT/secure_run/"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
fi
export PYTHONPATH=$SR_ROOT:$SITE PYTHONUNBUFFERED=1 SECURE_RUN_TEST_GPU=1 SECURE_RUN_REQUIRE=gpu
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
KEXPR=${1:-}
shift || true
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  rc=0
  timeout "${TEST_TIMEOUT:-330}" python3 -P -m pytest -p no:cacheprovider -q -rfEs tests/kernels/test_triton_gpu.py \
    ${KEXPR:+-k "$KEXPR"} >"$OUT/gpu_tests.log" 2>&1 || rc=$?
  tail -40 "$OUT/gpu_tests.log"
  if [ "$rc" -ne 0 ]; then
    echo "gpu_session: GPU tests failed (exit $rc; 124 = timeout), see $OUT/gpu_tests.log" >&2
    exit "$rc"
  fi
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  rc=0
  timeout "${BENCH_TIMEOUT:-330}" python3 bench/kernels.py "$@" >"$OUT/bench.log" 2>&1 || rc=$?
  grep -v '^{' "$OUT/bench.log" || true
  if [ "$rc" -ne 0 ]; then
    echo "gpu_session: benchmark failed (exit $rc; 124 = timeout), see $OUT/bench.log" >&2
    exit "$rc"
  fi
fi
