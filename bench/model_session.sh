#!/usr/bin/env bash
# One device-machine session for the whole model: GPU tests of the engine, then bench/model.py.
# Run from the repository root on the GPU box (torch + triton + pytest + transformers preinstalled):
#   bash bench/model_session.sh [bench args...]        (env: SKIP_TESTS=1, SKIP_BENCH=1, TEST_TIMEOUT, BENCH_TIMEOUT,
#                                                         GPU_TESTS: the test files, default below)
# Needs .whl/ with pydantic, pydantic_core, annotated_types, typing_inspection wheels (cp312).
# (python3 -P: the repo's own secure_run/ folder must not shadow the /tmp/sr symlink farm.)
set -euo pipefail
source bench/gpu_env.sh
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
status=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -P -m pytest -p no:cacheprovider -q -rfE -m gpu \
    ${GPU_TESTS:-tests/kernels/test_moe_mamba_kernels.py tests/kernels/test_gemv.py tests/kernels/test_gemv_router.py
    tests/model/test_graph_decode.py} >"$OUT/gpu_tests.log" 2>&1 || status=$?
  tail -25 "$OUT/gpu_tests.log"
  echo "gpu tests exit code: $status"
  if grep -E "^(FAILED|ERROR).*(ssd|conv)" "$OUT/gpu_tests.log" >/dev/null; then
    echo "Triton prefill conv/scan failed its GPU test: the bench uses PyTorch's (SECURE_RUN_SSD=torch)"
    export SECURE_RUN_SSD=torch
  fi
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  bstatus=0
  timeout "${BENCH_TIMEOUT:-420}" python3 -P bench/model.py --out "$OUT" "$@" >"$OUT/bench.log" 2>&1 || bstatus=$?
  { grep -E '^(\||card:|\[|built)' "$OUT/bench.log" || true; } | tail -70  # display only; the exit code is bstatus
  echo "bench exit code: $bstatus"
  [ "$bstatus" -eq 0 ] || status=$bstatus
fi
exit "$status"
