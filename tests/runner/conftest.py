"""Shared fixtures of the runner tests (shared helpers: runner_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The audit log path under a private XDG state folder."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "secure-run" / "audit.jsonl"
