"""The whole pipeline through the real Docker backend (marker ``docker``; required in CI).

* the embedded demo: ``secure-run generate`` with no ``--model`` produces tokens and an audit record;
* an upstream-like snapshot (real file names, remote code, ``__pycache__``, ``auto_map``,
  ``Infinity``) goes through import -> sign -> verify -> generate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import sign_and_pin

from secure_run.manifests import Lock, default_lock_path
from secure_run.model.demo import demo_model_dir

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CLI = [sys.executable, "-m", "secure_run.runner.cli"]


def _run(args: list[str], env_state: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(env_state)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_demo_generates_tokens_in_docker_and_writes_an_audit_record(tmp_path: Path) -> None:
    proc = _run(["generate", "--prompt", "Tell me about secure model loading.", "--max-new-tokens", "12",
                 "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    events = _lines(proc.stdout)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "status" and kinds[-1] == "final"
    final = events[-1]
    assert 1 <= final["stats"]["generated_tokens"] <= 12
    assert final["stats"]["backend"] == "docker"
    assert final["blocked"] is False
    assert any(e["type"] == "text" and e["text"] for e in events)
    audit = tmp_path / "secure-run" / "audit.jsonl"
    assert final["audit_log"] == str(audit)
    record = json.loads(audit.read_text().splitlines()[-1])
    pinned = Lock.load(default_lock_path()).get("superlinear-demo")
    assert pinned is not None
    assert record["event"] == "finished" and record["allowed"] is True
    assert json.loads(audit.read_text().splitlines()[-2])["event"] == "started"
    assert record["model_root_digest"] == pinned.root_digest
    assert record["run_stats"]["generated_tokens"] == final["stats"]["generated_tokens"]
    assert record["policy_sha256"]


def _upstream_like(src: Path) -> None:
    """Turn a copy of the demo folder into what a Hugging Face snapshot of the real repo looks like."""
    cfg = (src / "config.json").read_text()
    extra = ('{\n  "_attn_implementation": "block-span-gqa",\n  "auto_map": {\n'
             '    "AutoConfig": "configuration_superlinear_exp.SuperlinearExpConfig",\n'
             '    "AutoModelForCausalLM": "modeling_superlinear_exp.SuperlinearExpForCausalLM"\n  },\n'
             '  "decode_kernel": "staged-gqa",\n  "enable_cuda_graph": true,\n')
    (src / "config.json").write_text(extra + cfg.lstrip()[1:].lstrip("\n"))
    for name in ("modeling_superlinear_exp.py", "configuration_superlinear_exp.py", "moe.py"):
        (src / name).write_text("import os\nos.system('echo pwned')\n")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "modeling_superlinear_exp.cpython-311.pyc").write_bytes(
        b"\xa7\x0d\x0d\x0a" + b"\x00" * 12 + b"\xe3")
    (src / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")


def test_import_sign_verify_generate_an_upstream_like_snapshot(tmp_path: Path) -> None:
    src = tmp_path / "snapshot"
    shutil.copytree(demo_model_dir(), src, ignore=shutil.ignore_patterns("model.sig"))
    _upstream_like(src)
    dest = tmp_path / "superlinear-exp-v0.1"

    # import: only allowlisted files, remote-code keys stripped, every drop reported.
    proc = _run(["import", str(src), str(dest), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(proc.stdout)
    dropped = json.dumps(report)
    for name in ("modeling_superlinear_exp.py", "moe.py", "__pycache__", ".gitattributes", "auto_map"):
        assert name in dropped
    assert not list(dest.glob("*.py")) and not (dest / "__pycache__").exists()
    cfg = (dest / "config.json").read_text()
    assert "auto_map" not in cfg and "Infinity" in cfg
    assert (dest / "import-report.json").is_file()

    # sign with the organisation's key, pin in a lock, verify.
    model = sign_and_pin(dest, tmp_path, "superlinear-exp-v0.1")
    proc = _run(["verify", str(dest), "--lock", str(model.lock), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert json.loads(proc.stdout)["lock"]["name"] == "superlinear-exp-v0.1"

    # generate through the Docker sandbox.
    proc = _run(["generate", "--model", str(dest), "--policy", "builtin:demo", "--lock", str(model.lock),
                 "--prompt", "hello", "--max-new-tokens", "6", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    final = _lines(proc.stdout)[-1]
    assert final["type"] == "final" and 1 <= final["stats"]["generated_tokens"] <= 6
