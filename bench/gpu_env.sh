# Sourced by the device-call scripts (bench/model_session.sh, bench/batched_session.sh): secure_run
# through a symlink farm at /tmp/sr (run Python with -P so the repository's own secure_run/ folder
# does not shadow it), the carried wheels of .whl/ installed into /tmp/site, $OUT created, the card
# printed. Expects `set -euo pipefail` in the caller.
OUT=${OUT:-bench/out}
mkdir -p "$OUT" /tmp/sr/secure_run
for pkg in kernels model manifests policies runner sandbox; do ln -sfn "$PWD/$pkg" "/tmp/sr/secure_run/$pkg"; done
cp secure_run/*.py /tmp/sr/secure_run/
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/sr:/tmp/site PYTHONUNBUFFERED=1 SECURE_RUN_TEST_GPU=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
