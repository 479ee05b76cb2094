#!/usr/bin/env bash
# `secure-run generate` end to end on a GPU host without Docker: the embedded demo model through
# verify -> policy -> namespace sandbox (--gpu) -> Triton kernels -> streamed tokens -> audit record.
# Run from the repository root. The GPU image lacks pydantic and cryptography: wheels for them can
# be carried in $WHEELS (default .devcarry/lead-whl) and are unpacked into a private folder;
# secure_run is made importable through a symlink tree (nothing is installed).
#
#   scripts/gpu_e2e.sh              # on the GPU host
#   MODE=cpu scripts/gpu_e2e.sh     # dry run on a CPU host (namespace sandbox, no --gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-gpu}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.devcarry/lead-whl}
work=$(mktemp -d /tmp/secure-run-e2e.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/site" "$work/tree/secure_run" "$work/state"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$WHEELS"/*.whl
fi
for f in secure_run/*.py; do ln -s "$PWD/$f" "$work/tree/secure_run/"; done
for d in runner manifests policies model kernels sandbox; do ln -s "$PWD/$d" "$work/tree/secure_run/$d"; done
export PYTHONPATH="$work/tree:$work/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export XDG_STATE_HOME="$work/state"
gpu=()
dtypes=(float32)
if [ "$MODE" = gpu ]; then
  gpu=(--gpu)
  dtypes=(float32 bfloat16 float16)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
fi
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'
for dtype in "${dtypes[@]}"; do
  echo "== generate --sandbox namespace ${gpu[*]} --dtype $dtype"
  "$PY" -P -m secure_run.runner.cli generate --sandbox namespace "${gpu[@]}" --dtype "$dtype" \
    --prompt "Why verify model files before loading them? Explain the signature, the lock and the sandbox." \
    --max-new-tokens 48 --json | tee "$work/out.jsonl" | "$PY" -c '
import json, sys
evs = [json.loads(l) for l in sys.stdin]
for e in evs:
    if e["type"] == "status": print("  [%s] %s" % (e["stage"], e["message"][:150]))
text = "".join(e["text"] for e in evs if e["type"] == "text")
print("  text:", repr(text[:120]))
print("  final:", json.dumps(evs[-1]))
assert evs[-1]["type"] == "final" and evs[-1]["stats"]["generated_tokens"] > 0, "no tokens"'
done
echo "== audit records"
"$PY" -c 'import json,sys; [print(" ", r["event"], r["allowed"], r["model_root_digest"], (r["run_stats"] or {}).get("worker", {}).get("device")) for r in map(json.loads, open(sys.argv[1]))]' "$work/state/secure-run/audit.jsonl"
