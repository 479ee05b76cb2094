"""The README's "Running the real model" steps, command for command, on an upstream-like snapshot.

The commands are read from README.md (not copied here), so a README edit is tested as written.
Substitutions, and only these: the ``hf download`` line builds the snapshot instead (the demo
model's weights with the upstream repository's files: OML LICENSE/NOTICE/README, remote code,
``__pycache__``, ``auto_map``, ``.gitattributes``); without a CUDA GPU ``--gpu --dtype float16`` are
dropped from ``generate``. ``# -> exit N`` after a command is the exit code the README promises.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from upstream_snapshot import build_upstream_like_snapshot

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[tuple[str, int]]:
    """(command line, expected exit code) of the README's real-model section, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## Running the real model")
    section = text[start:text.index("\n## ", start)]  # up to the next section
    out: list[tuple[str, int]] = []
    for block in re.findall(r"```\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            command, _, comment = line.partition("#")
            m = re.search(r"-> exit (\d+)", comment)
            out.append((" ".join(command.split()), int(m.group(1)) if m else 0))
    return out


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def test_readme_commands_are_found() -> None:
    commands = [c for c, _ in readme_commands()]
    assert commands[0].startswith("hf download concavity-ai/superlinear-exp-v0.1 --revision")
    assert sum(c.startswith("secure-run ") for c in commands) == len(commands) - 1 >= 12
    assert any(c.startswith("secure-run policy pin") and c.endswith("--yes") for c in commands)


@pytest.mark.docker
@pytest.mark.slow
def test_readme_real_model_steps_run_as_written(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("secure-run")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "secure_run.runner.cli"]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    ran: list[str] = []
    for command, expected in readme_commands():
        argv = shlex.split(command)
        if argv[0] == "hf":
            assert argv[1] == "download" and argv[-2:] == ["--local-dir", "snapshot/"]
            build_upstream_like_snapshot(tmp_path / "snapshot")
            continue
        assert argv[0] == "secure-run", command
        if argv[1] == "generate" and not _has_cuda():
            argv = [a for a in argv if a != "--gpu"]
            i = argv.index("--dtype")
            del argv[i:i + 2]
        proc = subprocess.run([*cli, *argv[1:]], cwd=tmp_path, env=env, input="y\n", capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == expected, f"{command}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        ran.append(argv[1] + (" " + argv[2] if argv[1] in ("policy", "lock") else ""))
        if command.endswith("--policy org-policy/policy.yaml") and argv[1:3] == ["policy", "pin"]:
            assert "NOT written" in proc.stdout and "+++ b/policy.yaml" in proc.stdout
        if argv[1] == "generate":
            assert "[done]" in proc.stderr and "tokens" in proc.stderr
    assert ran.count("policy check") == 2 and "generate" in ran and "ci-check" in ran
    policy = (tmp_path / "org-policy/policy.yaml").read_text()
    assert ": null" not in policy  # every pin was filled
    lock = json.loads((tmp_path / "org.lock.json").read_text())
    assert "superlinear-exp-v0.1" in json.dumps(lock)
