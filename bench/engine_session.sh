#!/usr/bin/env bash
# One device call for issue 11's numbers: the whole-model bench (bench/model.py), the one-layer kernel
# bench (bench/kernels.py: prefill rows incl. K4, the K3 chunk, the decode sweep incl. K1/K2), then the
# GPU tests of the engine. Each step has its own time limit; the exit code is nonzero if any step failed.
#   bash bench/engine_session.sh            (env: MODEL_TIMEOUT, KERNEL_TIMEOUT, TEST_TIMEOUT, MODEL_ARGS, KERNEL_ONLY, GPU_K)
set -euo pipefail
source bench/gpu_env.sh
unset TRITON_INTERPRET
export SECURE_RUN_REQUIRE=gpu
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
mstatus=0
# shellcheck disable=SC2086  # MODEL_ARGS is a list of arguments
timeout "${MODEL_TIMEOUT:-220}" python3 -P bench/model.py --out "$OUT" ${MODEL_ARGS:---decode 4096,131072,1048576,10485760 --prefill 32768,131072,1048576 --steps 30 --skip-hf} \
  >"$OUT/model.log" 2>&1 || mstatus=$?
{ grep -E '^(\||card:|built)' "$OUT/model.log" || true; } | tail -30
echo "model bench exit code: $mstatus"
kstatus=0
timeout "${KERNEL_TIMEOUT:-120}" python3 -P bench/kernels.py --only "${KERNEL_ONLY:-prefill,chunk,sweep}" --skip-upstream --out "$OUT" \
  >"$OUT/kernels.log" 2>&1 || kstatus=$?
{ grep -v '^{' "$OUT/kernels.log" || true; } | tail -50  # the table (JSON progress lines left out)
echo "kernel bench exit code: $kstatus"
tstatus=0
timeout "${TEST_TIMEOUT:-150}" python3 -P -m pytest -p no:cacheprovider -q -rfE -m gpu \
  -k "${GPU_K:-search or prefill or ssd or graph_replay or cuda_fused or gemv_step or greedy}" \
  tests/kernels/test_ssd_prefill.py tests/kernels/test_search_split_gpu.py tests/kernels/test_triton_gpu.py \
  tests/kernels/test_decode_long_gpu.py tests/kernels/test_decode_rows_gpu.py \
  tests/model/test_graph_decode.py >"$OUT/gpu_tests.log" 2>&1 || tstatus=$?
tail -15 "$OUT/gpu_tests.log"
echo "gpu tests exit code: $tstatus"
for s in "$mstatus" "$kstatus" "$tstatus"; do [ "$s" -eq 0 ] || status=$s; done
exit "$status"
