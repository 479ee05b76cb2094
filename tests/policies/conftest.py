"""Fixtures for the policies tests (helpers live in policies_support.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from policies_support import BLOCKLIST, PolicyFactory, base_policy, demo_like_files, merge, write_files

from secure_run.policies import Policy, load_policy
from secure_run.policies.licenses import builtin_catalog


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private state dir; XDG_STATE_HOME points at it so nothing touches the real home."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_STATE_HOME", str(path))
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_files(tmp_path / "model", demo_like_files())


@pytest.fixture
def make_policy(tmp_path: Path, model_dir: Path, state: Path) -> PolicyFactory:
    """Write a policy (base + deep-merged patch) next to a rails file and load it."""
    counter = iter(range(1000))

    def factory(patch: dict[str, Any] | None = None, *, base: dict[str, Any] | None = None) -> Policy:
        doc = merge(base if base is not None else base_policy(model_dir, state), patch or {})
        folder = tmp_path / f"policy{next(counter)}"
        folder.mkdir()
        (folder / "rails.txt").write_text(BLOCKLIST)
        path = folder / "policy.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return load_policy(path)

    return factory


@pytest.fixture
def catalog_ids() -> set[str]:
    return {e.id for e in builtin_catalog()}
