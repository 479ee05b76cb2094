"""An upstream-like Superlinear-Exp-v0.1 snapshot built from the demo model (shared by tests)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from secure_run.model.demo import demo_model_dir

REPO = Path(__file__).resolve().parents[2]


def _policies_support() -> object:
    spec = importlib.util.spec_from_file_location("policies_support_readme", REPO / "tests/policies/policies_support.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["policies_support_readme"] = mod
    spec.loader.exec_module(mod)
    return mod


def build_upstream_like_snapshot(dest: Path) -> None:
    """The demo model (real architecture, tiny) dressed as a Hugging Face snapshot of the real repo."""
    shutil.copytree(demo_model_dir(), dest, ignore=shutil.ignore_patterns("model.sig"))
    upstream = _policies_support().upstream_superlinear_files()  # type: ignore[attr-defined]
    for name in ("LICENSE", "NOTICE", "README.md"):  # the OML licence files of the real repository
        (dest / name).write_text(upstream[name])
    cfg = (dest / "config.json").read_text()
    extra = ('{\n  "_attn_implementation": "block-span-gqa",\n  "auto_map": {\n'
             '    "AutoConfig": "configuration_superlinear_exp.SuperlinearExpConfig",\n'
             '    "AutoModelForCausalLM": "modeling_superlinear_exp.SuperlinearExpForCausalLM"\n  },\n')
    (dest / "config.json").write_text(extra + cfg.lstrip()[1:].lstrip("\n"))
    for name in ("modeling_superlinear_exp.py", "configuration_superlinear_exp.py", "moe.py"):
        (dest / name).write_text("import os\nos.system('echo pwned')\n")
    (dest / "__pycache__").mkdir()
    (dest / "__pycache__" / "modeling_superlinear_exp.cpython-311.pyc").write_bytes(b"\xa7\r\r\n" + b"\x00" * 12)
    (dest / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
