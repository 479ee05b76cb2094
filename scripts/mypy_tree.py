"""Run mypy --strict on the security-critical packages (manifests, policies, sandbox, runner) under their installed names.

The top-level folders are mapped to ``secure_run.<folder>`` by pyproject.toml; mypy cannot see
that mapping (the editable install uses an import hook), so this builds a throw-away tree of
symlinks (``<tmp>/secure_run/<folder>``) and checks the packages there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("secure_run", "secure_run.errors")
PACKAGES = ("secure_run.manifests", "secure_run.policies", "secure_run.sandbox", "secure_run.runner")
FOLDERS = ("runner", "manifests", "policies", "model", "kernels", "sandbox")


def main() -> int:
    tree = Path(tempfile.mkdtemp(prefix="secure-run-mypy-"))
    pkg = tree / "secure_run"
    pkg.mkdir(parents=True)
    for f in (ROOT / "secure_run").glob("*.py"):
        (pkg / f.name).symlink_to(os.path.relpath(f, pkg))
    for folder in FOLDERS:
        (pkg / folder).symlink_to(os.path.relpath(ROOT / folder, pkg))
    args = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
            str(ROOT / ".mypy_cache")]
    for name in MODULES:
        args += ["-m", name]
    for name in PACKAGES:
        args += ["-p", name]
    env = {**os.environ, "MYPYPATH": str(tree)}
    workdir = tree / "cwd"  # an empty working directory, so the tree is found only through MYPYPATH
    workdir.mkdir()
    try:
        return subprocess.call(args, cwd=workdir, env=env)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
