"""The runnable examples in the manifests docstrings (package, modules) stay true."""

from __future__ import annotations

import doctest
import importlib
import tempfile
from pathlib import Path

import pytest

MODULES = [
    "secure_run.manifests",
    "secure_run.manifests.findings",
    "secure_run.manifests.hashing",
    "secure_run.manifests.importer",
    "secure_run.manifests.inspection",
    "secure_run.manifests.inventory",
    "secure_run.manifests.lock",
    "secure_run.manifests.signing",
    "secure_run.manifests.tensors",
    "secure_run.manifests.trust",
    "secure_run.manifests.verify",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp() lands in tmp_path
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_manifests_never_imports_torch() -> None:
    import subprocess
    import sys

    code = "import sys, secure_run.manifests; assert 'torch' not in sys.modules and 'sigstore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
