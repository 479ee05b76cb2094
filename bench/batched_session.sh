#!/usr/bin/env bash
# One device-machine call for the batched decode (issue 12 item 4): its GPU tests, then bench/batched.py.
# Run from the repository root on the GPU box (torch + triton + pytest preinstalled):
#   bash bench/batched_session.sh [bench args...]     (env: SKIP_TESTS=1, SKIP_BENCH=1, TEST_TIMEOUT, BENCH_TIMEOUT)
# BEFORE_ROOT=<another checkout>: also time the span attention alone (bench/batched.py --kernel) with that
# checkout's kernels, for a before/after in the same call (its JSON under $OUT/before).
# Needs .whl/ with pydantic, pydantic_core, annotated_types, typing_inspection wheels (cp312) for the
# worker (the protocol). python3 -P: the repo's own secure_run/ must not shadow the /tmp/sr symlink farm.
set -euo pipefail
source bench/gpu_env.sh
status=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -P -m pytest -p no:cacheprovider -q -rfE -m gpu \
    tests/kernels/test_decode_rows_gpu.py tests/model/test_batched_decode.py tests/sandbox/test_concurrent_turns.py \
    tests/model/test_graph_decode.py \
    >"$OUT/gpu_tests.log" 2>&1 || status=$?
  tail -15 "$OUT/gpu_tests.log"
  echo "gpu tests exit code: $status"
fi
if [ -n "${BEFORE_ROOT:-}" ]; then
  mkdir -p /tmp/sr_before/secure_run
  for pkg in kernels model manifests policies runner sandbox; do ln -sfn "$BEFORE_ROOT/$pkg" "/tmp/sr_before/secure_run/$pkg"; done
  cp "$BEFORE_ROOT"/secure_run/*.py /tmp/sr_before/secure_run/
  kstatus=0
  PYTHONPATH=/tmp/sr_before:/tmp/site timeout "${BEFORE_TIMEOUT:-120}" python3 -P bench/batched.py --skip-model \
    --skip-worker --kernel --out "$OUT/before" >"$OUT/before.log" 2>&1 || kstatus=$?
  { grep -E '^\| kernel' "$OUT/before.log" || true; } | sed 's/^/before: /'
  echo "before (kernel only, $BEFORE_ROOT) exit code: $kstatus"
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  bstatus=0
  timeout "${BENCH_TIMEOUT:-300}" python3 -P bench/batched.py --out "$OUT" "$@" >"$OUT/batched.log" 2>&1 || bstatus=$?
  { grep -E '^(\||built|\[)' "$OUT/batched.log" || true; } | tail -40  # display only; the exit code is bstatus
  echo "bench exit code: $bstatus"
  [ "$bstatus" -eq 0 ] || status=$bstatus
fi
exit "$status"
