#!/usr/bin/env bash
# One device call for the Mamba-2 prefill (issue 11): GPU tests of the prefill kernels, then bench/mamba.py.
# Run from the repository root on the GPU box:  bash bench/mamba_session.sh [bench/mamba.py args...]
# (env: SKIP_TESTS=1, TEST_TIMEOUT, BENCH_TIMEOUT). Needs .whl/ with the pydantic wheels (cp312) for
# the whole-model tests. Exit status: the first failing step's.
set -euo pipefail
source bench/gpu_env.sh
export SECURE_RUN_REQUIRE=gpu
unset TRITON_INTERPRET
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-100}" python3 -P -m pytest -p no:cacheprovider -q -rA -m gpu \
    tests/kernels/test_ssd_prefill.py tests/kernels/test_moe_mamba_kernels.py \
    tests/model/test_graph_decode.py -k "ssd or mamba_decode or conv or cpu" >"$OUT/gpu_tests.log" 2>&1 || status=$?
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.log" | tail -25 || true
  echo "gpu tests exit code: $status"
fi
bstatus=0
timeout "${BENCH_TIMEOUT:-200}" python3 -P bench/mamba.py --out "$OUT" "$@" >"$OUT/bench.log" 2>&1 || bstatus=$?
{ grep -E '^(\||card:|chosen|ACCURACY)' "$OUT/bench.log" || true; } | tail -60
echo "bench exit code: $bstatus"
[ "$bstatus" -eq 0 ] || status=$bstatus
exit "$status"
