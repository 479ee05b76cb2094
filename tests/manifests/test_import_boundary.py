"""What importing manifests pulls in: never torch; the loader's modules never the signing stack."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_loader_modules_do_not_import_cryptography_or_torch() -> None:
    mods = _modules_after("import secure_run.manifests.tensors, secure_run.manifests.findings")
    assert "cryptography" not in mods and "sigstore" not in mods and "torch" not in mods


def test_full_api_never_imports_torch() -> None:
    mods = _modules_after("from secure_run import manifests\nfor n in manifests.__all__: getattr(manifests, n)")
    assert "torch" not in mods and "cryptography" in mods
