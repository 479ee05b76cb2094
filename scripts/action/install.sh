#!/usr/bin/env bash
# Install secure-run from the action's own checkout (the commit the caller pinned with
# `uses: OWNER/secure-run@<sha>`) into "$RUNNER_TEMP/secure-run-venv". torch is the CPU wheel
# (verification needs no GPU); SR_TORCH_INDEX overrides its index.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${RUNNER_TEMP:-/tmp}/secure-run-venv"
python="${SR_PYTHON:-python3}"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --index-url "${SR_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" "torch==2.13.0"
"${pip[@]}" "$src"
"$venv/bin/secure-run" --version
