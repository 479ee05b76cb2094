"""Fixtures for the manifests tests (builders live in mf_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mf_helpers import new_key, write_key, write_model

from secure_run.manifests import sign_model


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """(private key, public key) P-256 PEM files."""
    return write_key(tmp_path / "signer.pem", new_key())


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A clean, unsigned two-shard model folder."""
    return write_model(tmp_path / "tiny-model")


@pytest.fixture
def signed(model: Path, keys: tuple[Path, Path]) -> Path:
    """The clean model folder, signed (DIR/model.sig) with the ``keys`` fixture's key."""
    sign_model(model, keys[0])
    return model
