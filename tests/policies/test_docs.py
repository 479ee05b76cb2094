"""The docstring examples of the policies package run (STYLE.md: package docstrings open with one)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import secure_run.policies

MODULES = sorted(m.name for m in pkgutil.iter_modules(secure_run.policies.__path__, "secure_run.policies."))


@pytest.mark.parametrize("name", ["secure_run.policies", *MODULES])
def test_docstring_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0


def test_package_docstring_opens_with_an_example() -> None:
    assert secure_run.policies.__doc__ is not None and ">>> " in secure_run.policies.__doc__.split("\n\n")[1]
