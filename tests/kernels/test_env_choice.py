"""Kernel switches read from the environment refuse unknown values (a typo is not read as the default)."""

from __future__ import annotations

import pytest

from secure_run.errors import UsageError
from secure_run.kernels import GEMV_ENV, env_choice
from secure_run.model.mamba2 import SSD_ENV, _ssd_mode


def test_env_choice_default_and_known_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GEMV_ENV, raising=False)
    assert env_choice(GEMV_ENV, ("triton", "torch"), "triton") == "triton"
    monkeypatch.setenv(GEMV_ENV, "torch")
    assert env_choice(GEMV_ENV, ("triton", "torch"), "triton") == "torch"


@pytest.mark.parametrize("value", ["Torch", "tourch", "", "off"])
def test_env_choice_refuses_unknown(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GEMV_ENV, value)
    with pytest.raises(UsageError) as err:
        env_choice(GEMV_ENV, ("triton", "torch"), "triton")
    assert err.value.rule == "kernels.env-choice"
    assert GEMV_ENV in str(err.value)


def test_ssd_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    for mode in ("triton", "v1", "torch"):
        monkeypatch.setenv(SSD_ENV, mode)
        assert _ssd_mode() == mode
    monkeypatch.setenv(SSD_ENV, "v2")  # was silently read as "triton"
    with pytest.raises(UsageError, match=SSD_ENV):
        _ssd_mode()
