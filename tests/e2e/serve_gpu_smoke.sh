#!/usr/bin/env bash
# `secure-run serve --gpu --sandbox namespace` on a GPU host (issue 12): the demo model served from one
# warm GPU worker, checked with curl (the GPU image has no `openai` package; CI's CPU tests use the
# official client): /health, a non-streaming and a streaming chat completion, /v1/models, /metrics
# (one worker load across all requests), then SIGTERM and a clean exit. Needs secure_run importable
# (PYTHONPATH) with fastapi / uvicorn / starlette / pydantic. Exit 0 only when every check passed.
#   tests/e2e/serve_gpu_smoke.sh OUT_DIR
set -euo pipefail
OUT=$(realpath -m "$1")
mkdir -p "$OUT"
PORT=${PORT:-18123}
URL="http://127.0.0.1:$PORT"
export XDG_STATE_HOME=${XDG_STATE_HOME:-/tmp/sr-serve-state}
# SERVE_ARGS: what to serve with (default the GPU run; the script's own check runs it on CPU hosts too)
read -r -a args <<<"${SERVE_ARGS:---gpu --sandbox namespace}"
"${PYTHON:-python3}" -P -m secure_run.runner.cli serve "${args[@]}" --port "$PORT" >"$OUT/serve.log" 2>&1 &
pid=$!
fail() { echo "serve_gpu_smoke: FAILED: $*"; tail -n 30 "$OUT/serve.log"; kill -KILL "$pid" 2>/dev/null || true; exit 1; }
for _ in $(seq 300); do
  if curl -fsS "$URL/health" >"$OUT/health.json" 2>/dev/null; then break; fi
  kill -0 "$pid" 2>/dev/null || fail "serve exited before it was healthy"
  sleep 0.5
done
curl -fsS "$URL/health" >/dev/null || fail "not healthy after 150 s"
t0=$EPOCHREALTIME
curl -fsS "$URL/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "superlinear-demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "temperature": 0}' \
  >"$OUT/chat.json" || fail "chat completion"
t1=$EPOCHREALTIME
curl -fsSN "$URL/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "superlinear-demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "temperature": 0, "stream": true}' \
  >"$OUT/stream.txt" || fail "streaming chat completion"
t2=$EPOCHREALTIME
curl -fsS "$URL/v1/models" >"$OUT/models.json" || fail "models"
curl -fsS "$URL/metrics" >"$OUT/metrics.txt" || fail "metrics"
"${PYTHON:-python3}" - "$OUT" <<'PY' || fail "response checks"
import json, sys
out = sys.argv[1]
chat = json.load(open(f"{out}/chat.json"))
text = chat["choices"][0]["message"]["content"]
assert chat["usage"]["completion_tokens"] >= 1, chat
chunks = [json.loads(l[6:]) for l in open(f"{out}/stream.txt").read().splitlines() if l.startswith("data: {")]
streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
assert open(f"{out}/stream.txt").read().rstrip().endswith("data: [DONE]")
assert streamed == text, (streamed, text)  # greedy: the same text both ways
metrics = open(f"{out}/metrics.txt").read()
loads = [l for l in metrics.splitlines() if l.startswith("secure_run_worker_loads_total")]
assert loads and float(loads[0].split()[-1]) == 1.0, loads
print("serve: chat text", repr(text[:60]), "| streamed equal | worker loads 1")
PY
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
echo "| check | result |"
echo "|---|---|"
echo "| health, chat, stream, models, metrics (1 load) | ok |"
printf '| non-streaming request | %.2f s |\n| streaming request | %.2f s |\n' "$(echo "$t1 $t0" | awk '{print $1-$2}')" "$(echo "$t2 $t1" | awk '{print $1-$2}')"
echo "| exit after SIGTERM | $rc |"
[ "$rc" -eq 0 ] || [ "$rc" -eq 143 ] || fail "serve exited $rc after SIGTERM"
