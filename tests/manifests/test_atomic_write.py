"""The one atomic writer (manifests/_atomic.py) behind model.sig and the lock file (issue 10 item 7)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from secure_run import manifests
from secure_run.errors import EnvironmentProblem
from secure_run.manifests import _atomic, lock, signing
from secure_run.manifests._atomic import write_atomic


def _disk_full(*_a: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_writes_replace_atomically(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"old")
    write_atomic(p, b"new", mode=0o600)
    assert p.read_bytes() == b"new" and (p.stat().st_mode & 0o777) == 0o600
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f"]


def test_disk_full_is_exit_2_and_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"old")
    monkeypatch.setattr(_atomic.os, "fsync", _disk_full)
    with pytest.raises(EnvironmentProblem) as info:
        write_atomic(p, b"new")
    assert info.value.exit_code == 2 and info.value.rule == "io.write" and str(p) in info.value.message
    assert "nothing was changed" in info.value.message and "free disk space" in (info.value.hint or "")
    assert p.read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["f"]


def test_sign_and_lock_use_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 18: disk full in sign / lock gave a traceback and exit 1; now exit 2, nothing half-written."""
    assert signing.write_atomic is write_atomic and lock.write_atomic is write_atomic
    keys = manifests.generate_key(tmp_path / "k.pem")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    signed = manifests.sign_model(model, keys.private)
    before = (model / "model.sig").read_bytes()
    monkeypatch.setattr(_atomic.os, "fsync", _disk_full)
    (model / "config.json").write_text('{"a": 1}')
    with pytest.raises(EnvironmentProblem) as info:
        manifests.sign_model(model, keys.private)
    assert info.value.exit_code == 2
    assert (model / "model.sig").read_bytes() == before
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.sig"]
    lock_path = tmp_path / "models.lock.json"
    with pytest.raises(EnvironmentProblem):
        manifests.pin_model(lock_path, "m", root_digest=signed.root_digest, signer=signed.signer,
                            public_key=str(keys.public))
    assert not lock_path.exists() and not list(tmp_path.glob(".models.lock.json-*"))
