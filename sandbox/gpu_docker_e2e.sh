#!/usr/bin/env bash
# Docker + GPU on a GPU host that has no Docker (issue 10 item 8), plus the namespace backend for
# comparison: starts Debian's dockerd carried as binaries, runs the GPU selftest (CUDA matmul +
# Triton kernel) in both backends, `secure-run generate --gpu --sandbox docker|namespace` on the
# demo, checks whether the GPU path needs memfd_create / W+X memory (our seccomp profile denies
# both; a permissive variant is tried only when the shipped one fails), runs the probe table from
# inside both backends, and prints a summary table. Run as root from the repository root:
#
#   sandbox/gpu_docker_e2e.sh CARRY OUT
#
# CARRY holds docker-bin.tar.xz (dockerd, containerd, containerd-shim-runc-v2, runc, docker-init =
# tini-static, libdevmapper.so.1.02.1, taken from Debian bookworm's .debs with dpkg -x) and whl/
# (wheels the GPU image lacks: pydantic, pydantic-core, annotated-types, typing-inspection,
# typing-extensions, cryptography, cffi, pycparser, docker). Logs go to OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=$(realpath "$1")
OUT=$(realpath -m "$2")
mkdir -p "$OUT"
PY=${PYTHON:-python3}
summary=()

step() {  # step NAME CMD...: run, keep the log, record rc and seconds (never hides a failure's code)
  local name=$1 rc t0 t1
  shift
  t0=$EPOCHREALTIME
  set +e
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  set -e
  t1=$EPOCHREALTIME
  summary+=("$(printf '| %s | %s | %.1f |' "$name" "$rc" "$(echo "$t1 $t0" | awk '{print $1-$2}')")")
  echo "== $name: rc=$rc"
  tail -n 25 "$OUT/$name.log"
  return 0
}

echo "== host"
uname -r
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
ls -l /dev/nvidia* || true
cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null || echo "cgroup v1"
grep -c . /proc/swaps || true
command -v gcc cc as ld || true

# --- Python packages the GPU image lacks, and secure_run through a symlink tree ---------------
mkdir -p /tmp/sr-site /tmp/sr-tree/secure_run /tmp/sr-state
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sr-site "$CARRY"/whl/*.whl
for f in secure_run/*.py; do ln -sf "$PWD/$f" /tmp/sr-tree/secure_run/; done
for d in runner manifests policies model kernels sandbox; do ln -sfn "$PWD/$d" "/tmp/sr-tree/secure_run/$d"; done
export PYTHONPATH="/tmp/sr-tree:/tmp/sr-site" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 XDG_STATE_HOME=/tmp/sr-state
"$PY" -c 'import sys, torch, triton, pydantic, docker; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "pydantic", pydantic.__version__, "docker-sdk", docker.__version__, "cuda", torch.cuda.is_available())'

# --- dockerd from the carried Debian binaries ---------------------------------------------------
mkdir -p /tmp/sr-docker
tar -xJf "$CARRY/docker-bin.tar.xz" -C /tmp/sr-docker
BIN=/tmp/sr-docker/sbox-bin
export PATH="$BIN:$PATH" DOCKER_HOST=unix:///tmp/sr-docker.sock
LD_LIBRARY_PATH=$BIN setsid "$BIN/dockerd" --bridge=none --iptables=false --ip6tables=false --ip-forward=false \
  --ip-masq=false --userland-proxy=false --data-root /tmp/sr-docker/data --exec-root /tmp/sr-docker/exec \
  --pidfile /tmp/sr-docker/dockerd.pid -H "$DOCKER_HOST" >"$OUT/dockerd.log" 2>&1 </dev/null &
up=no
for _ in $(seq 150); do
  if "$PY" -c 'import docker; docker.from_env(timeout=2).ping()' 2>/dev/null; then up=yes; break; fi
  sleep 0.2
done
echo "== dockerd up: $up"
if [ "$up" != yes ]; then tail -n 40 "$OUT/dockerd.log"; fi
"$PY" - <<'EOF' || true
import docker
i = docker.from_env(timeout=10).info()
print({k: i.get(k) for k in ("ServerVersion", "Driver", "CgroupVersion", "CgroupDriver", "Runtimes", "SwapLimit",
                              "MemoryLimit", "PidsLimit", "CpuCfsQuota", "SecurityOptions", "KernelVersion")})
EOF

# --- GPU selftest (CUDA matmul + Triton kernel) inside each backend ---------------------------
cat >/tmp/sr-selftest.py <<'EOF'
import json, sys, time
from secure_run.sandbox import SandboxPolicy, SelftestRequest, get_backend, run_worker
from secure_run.sandbox._internal import docker_backend, namespace_backend, seccomp
backend_name, variant = sys.argv[1], sys.argv[2]
if variant != "shipped":  # a permissive variant, only to find out what the GPU path needs
    doc = json.loads(seccomp.profile_text())
    allow = doc["syscalls"][0]["names"]
    if variant in ("allow_memfd", "allow_both"):
        doc["syscalls"] = [r for r in doc["syscalls"] if "memfd_create" not in r["names"]]
        allow += ["memfd_create", "execveat"]
    if variant in ("allow_wx", "allow_both"):
        doc["syscalls"] = [r for r in doc["syscalls"] if "mprotect" not in r["names"]]
        allow += ["mmap", "mprotect", "pkey_mprotect"]
    text = json.dumps(doc)
    prof = seccomp.parse_profile(text)
    namespace_backend.load_profile = lambda: prof
    docker_backend.load_profile = lambda: prof
    docker_backend.profile_text = lambda: text
policy = SandboxPolicy(gpu=True, jit_cache_mib=1024, memory_mib=32768, pids_limit=1024, wall_clock_s=300,
                       scratch_mib=1024, shm_mib=1024)
backend = get_backend("docker", build=True) if backend_name == "docker" else get_backend("namespace")
req = SelftestRequest(task="selftest", device="cuda", seed=5, steps=8, triton=True, matmul_size=4096)
t0 = time.monotonic()
events = list(run_worker(backend, policy, req))
print("RESULT", json.dumps({"backend": backend_name, "seccomp": variant, "wall_s": round(time.monotonic() - t0, 1),
                            **events[-1].model_dump(mode="json")}))
EOF
for b in docker namespace; do
  step "selftest_${b}_shipped" "$PY" -P /tmp/sr-selftest.py "$b" shipped
  if ! grep -q '^RESULT' "$OUT/selftest_${b}_shipped.log"; then
    for v in allow_memfd allow_wx allow_both; do
      step "selftest_${b}_${v}" "$PY" -P /tmp/sr-selftest.py "$b" "$v"
    done
  fi
done

# --- the product path: secure-run generate --gpu on the demo ------------------------------------
for b in docker namespace; do
  step "generate_${b}_gpu" "$PY" -P -m secure_run.runner.cli generate --sandbox "$b" --gpu --dtype float32 \
    --prompt "Why verify model files before loading them?" --max-new-tokens 32 --json
done

# --- probes from inside both backends on this host -------------------------------------------
step probe_table "$PY" -P tests/sandbox/sb_probe_table.py --gpu namespace docker --json "$OUT/probes_gpu.json"

# --- nothing left behind ----------------------------------------------------------------------
"$PY" -c 'import docker; c = docker.from_env(); print("containers left:", len(c.containers.list(all=True, filters={"label": "org.secure-run.sandbox"})))' || true
ls -d /tmp/secure-run-root-* 2>/dev/null | wc -l | sed 's/^/namespace roots left: /'

echo
echo "| step | rc | seconds |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
echo
grep -h '^RESULT' "$OUT"/selftest_*.log || true
for b in docker namespace; do
  echo "-- generate $b:"; grep -E '"type": ?"final"|"kind"' "$OUT/generate_${b}_gpu.log" | tail -n 2 || true
done
echo "-- probe table:"; sed -n '/^| probe/,$p' "$OUT/probe_table.log" || true
kill "$(cat /tmp/sr-docker/dockerd.pid 2>/dev/null)" 2>/dev/null || true
