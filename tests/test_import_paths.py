"""The test run imports secure-run only as the installed package: the checkout's top-level folders
(kernels/, model/, ...) must not shadow installed packages of the same name. transformers >= 5.25
imports the PyPI package `kernels`; with the checkout on sys.path it got this repository's kernels/
folder instead and failed (`cannot import name 'CUDAProperties' from 'kernels'`). scripts/test runs
pytest with ``python -P``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_folders_do_not_shadow_installed_packages() -> None:
    for name in ("kernels", "model", "runner", "sandbox", "policies", "manifests"):
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        # an installed package (even in the checkout's .venv) is fine; the checkout's own folder is not
        assert origin is None or origin.parent != ROOT / name, f"import {name!r} resolves to the checkout: {origin}"


def test_secure_run_kernels_is_the_checkout() -> None:
    import secure_run.kernels

    assert ROOT / "kernels" in Path(secure_run.kernels.__file__).resolve().parents
