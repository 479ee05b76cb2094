"""Dependency direction: policies never imports torch, manifests, sandbox, model or runner."""

from __future__ import annotations

import subprocess
import sys


def test_import_policies_pulls_in_nothing_heavy_or_upstream() -> None:
    code = (
        "import sys, secure_run.policies, secure_run.policies.evaluate;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'transformers') or "
        "m.startswith(('secure_run.manifests', 'secure_run.sandbox', 'secure_run.model', 'secure_run.runner')));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
