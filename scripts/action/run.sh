#!/usr/bin/env bash
# The check the secure-run GitHub Action runs (action.yml calls this; tests/action runs it on a local
# repository with a base and a PR branch). Inputs come from the environment, never interpolated:
#   SR_LOCK          lock file, repository-relative, inside SR_TRUST_DIR (required)
#   SR_TRUST_DIR     trust directory: keys, lock, policies, blocklists (default .secure-run)
#   SR_BASE          base commit of a pull request (trust is read from it), or empty
#   SR_TRUST_SOURCE  protected trust directory given by the caller (instead of SR_BASE), or empty
#   SR_EXTRA_TRUST   more trust paths, space separated (default: .github/workflows .github/CODEOWNERS)
#   SR_REPORT_DIR    where secure-run-junit.xml and secure-run-report.json go (default .)
#   SECURE_RUN       the secure-run executable (default: the action's venv)
#   SR_PYTHON        python for gate.py (default python3)
# Exit: 0 every locked model passes, 1 refused (a model, or trust and weights changed together),
# 2 setup error. pipefail everywhere; no pipe decides the outcome.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${SR_LOCK:?SR_LOCK (the lock file) is required}"
trust_dir="${SR_TRUST_DIR:-.secure-run}"
report_dir="${SR_REPORT_DIR:-.}"
secure_run="${SECURE_RUN:-${RUNNER_TEMP:-/tmp}/secure-run-venv/bin/secure-run}"
python="${SR_PYTHON:-python3}"
read -r -a extra <<< "${SR_EXTRA_TRUST-.github/workflows .github/CODEOWNERS}"

gate=("$python" "$here/gate.py" trust --repo . --trust-dir "$trust_dir" --lock "$SR_LOCK")
if [ -n "${SR_TRUST_SOURCE:-}" ]; then
  gate+=(--trust-source "$SR_TRUST_SOURCE")
elif [ -n "${SR_BASE:-}" ]; then
  gate+=(--base "$SR_BASE")
fi
if [ "${#extra[@]}" -gt 0 ]; then
  gate+=(--extra-trust "${extra[@]}")
fi
"${gate[@]}"

mkdir -p "$report_dir"
summary=()
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  summary=(--summary "$GITHUB_STEP_SUMMARY")
fi
export HF_HUB_OFFLINE=1
exec "$secure_run" ci-check --lock "$SR_LOCK" --format github \
  --junit-xml "$report_dir/secure-run-junit.xml" --json-out "$report_dir/secure-run-report.json" "${summary[@]}"
