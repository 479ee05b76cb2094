"""Fixtures for the end-to-end tests: signed copies of the demo model, a private lock, state dirs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import SignedModel, sign_and_pin

from secure_run.model.demo import demo_model_dir


@pytest.fixture
def state_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the audit log and licence-acceptance store at a temporary state folder."""
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture
def demo_copy(tmp_path: Path) -> Iterator[SignedModel]:
    """A copy of the demo model, signed with a fresh test key and pinned in a private lock."""
    root = tmp_path / "superlinear-demo"
    shutil.copytree(demo_model_dir(), root, ignore=shutil.ignore_patterns("model.sig"))
    yield sign_and_pin(root, tmp_path, "superlinear-demo")
