"""GPU test hygiene (issue 11 item 5): ``gpu_session.sh`` fails when a GPU test fails, and the skip
reason of the ``gpu`` tests says what really keeps them from running. Runs on CPU: the GPU tools
(``nvidia-smi``, pytest on the GPU suite, the benchmark) are replaced by stubs on ``PATH``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "kernels" / "gpu_session.sh"

_STUB_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  exit 0  # carried wheels (.whl/ on a GPU box) are not installed by the stub
fi
if [ "$1" = "-P" ] && [ "$3" = "pytest" ]; then
  echo "stub pytest: 1 failed, 3 passed"; echo "$*" > "$STUB_DIR/pytest_args"; exit "${STUB_PYTEST_RC:-0}"
fi
if [ "$1" = "bench/kernels.py" ]; then
  echo "stub bench table"; echo '{"json": 1}'; touch "$STUB_DIR/bench_ran"; exit "${STUB_BENCH_RC:-0}"
fi
exec "$REAL_PYTHON" "$@"
"""


def _run(tmp_path: Path, pytest_rc: int, bench_rc: int = 0) -> subprocess.CompletedProcess[str]:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "python3").write_text(_STUB_PYTHON)
    (stubs / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'Stub GPU, 1 MiB, 0'\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PATH=f"{stubs}:{env['PATH']}", REAL_PYTHON=sys.executable, STUB_DIR=str(tmp_path),
               STUB_PYTEST_RC=str(pytest_rc), STUB_BENCH_RC=str(bench_rc), OUT=str(tmp_path / "out"),
               SR_ROOT=str(tmp_path / "sr"), SITE=str(tmp_path / "site"))
    return subprocess.run(["bash", str(SCRIPT), "decode"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_gpu_session_fails_when_a_gpu_test_fails(tmp_path: Path) -> None:
    r = _run(tmp_path, pytest_rc=1)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "GPU tests failed (exit 1" in r.stderr
    assert "stub pytest: 1 failed" in r.stdout  # the tail of the log is shown
    assert "stub pytest" in (tmp_path / "out" / "gpu_tests.log").read_text()
    assert not (tmp_path / "bench_ran").exists()  # no benchmark after failing tests
    assert "-k decode" in (tmp_path / "pytest_args").read_text()


def test_gpu_session_reports_a_test_timeout(tmp_path: Path) -> None:
    r = _run(tmp_path, pytest_rc=124)
    assert r.returncode == 124 and "124 = timeout" in r.stderr


def test_gpu_session_passes_and_runs_the_benchmark(tmp_path: Path) -> None:
    r = _run(tmp_path, pytest_rc=0)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "bench_ran").exists()
    assert "stub bench table" in r.stdout and '{"json"' not in r.stdout
    assert '{"json": 1}' in (tmp_path / "out" / "bench.log").read_text()
    assert (tmp_path / "sr" / "secure_run" / "kernels").resolve() == ROOT / "kernels"


def test_gpu_session_fails_when_the_benchmark_fails(tmp_path: Path) -> None:
    r = _run(tmp_path, pytest_rc=0, bench_rc=3)
    assert r.returncode == 3 and "benchmark failed" in r.stderr


def _root_conftest() -> ModuleType:
    """tests/conftest.py itself (``import conftest`` may find a folder's own conftest first)."""
    spec = importlib.util.spec_from_file_location("_secure_run_root_conftest", ROOT / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_skip_reason_names_the_interpreter_on_a_gpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    conftest = _root_conftest()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = conftest.gpu_missing_reason()
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "GPU is present" in reason
    monkeypatch.delenv("TRITON_INTERPRET")
    assert conftest.gpu_missing_reason() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert conftest.gpu_missing_reason() == "no CUDA GPU on this host"
