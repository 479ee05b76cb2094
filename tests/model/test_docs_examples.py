"""The runnable examples in the model package docstrings (they are the documentation)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "secure_run.model", "secure_run.model.config", "secure_run.model.checkpoint", "secure_run.model.norms",
    "secure_run.model.mamba2", "secure_run.model.moe", "secure_run.model.attention", "secure_run.model.cache",
    "secure_run.model.model", "secure_run.model.loader", "secure_run.model.tokenizer", "secure_run.model.generate",
    "secure_run.model.inference", "secure_run.model.demo", "secure_run.model.demo.build",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__ and ">>>" in module.__doc__, f"{name} has no runnable example"
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
