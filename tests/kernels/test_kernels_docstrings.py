"""The runnable examples in the kernels package docstrings (documentation that must stay true:
e.g. the tunables table quoted in ``span_triton``'s module docstring)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "secure_run.kernels", "secure_run.kernels._checks", "secure_run.kernels._schedule",
    "secure_run.kernels.params", "secure_run.kernels.span_triton", "secure_run.kernels.model_reference",
    "secure_run.kernels.reference",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
