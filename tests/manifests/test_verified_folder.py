"""The verified folder returned by verify_model: descriptor, pins, checked reads (issue 10 item 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from secure_run import manifests
from secure_run.errors import VerificationError
from secure_run.manifests.folder import VerifiedFolder


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, manifests.KeyTrust]:
    keys = manifests.generate_key(tmp_path / "k.pem")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "tokenizer.json").write_text('{"t": 2}')
    manifests.sign_model(model, keys.private)
    return model, manifests.KeyTrust.from_file(keys.public)


def test_verify_model_returns_the_open_verified_folder(signed: tuple[Path, manifests.KeyTrust]) -> None:
    model, trust = signed
    with manifests.verify_model(model, trust) as result:
        folder = result.verified
        assert isinstance(folder, VerifiedFolder) and not folder.closed
        assert sorted(folder.names) == ["config.json", "tokenizer.json"]
        for f in result.files:
            pin = folder.pin(f.name)
            assert pin.sha256 == f.sha256 and pin.identity == f.identity and pin.identity.ctime_ns > 0
        assert result.read_bytes("config.json") == b'{"a": 1}'
        assert result.digests() == {f.name: f.sha256 for f in result.files}
        with pytest.raises(VerificationError) as info:
            folder.read_bytes("model.sig")  # present, but never a verified file
        assert info.value.rule == "folder.unpinned"
    assert folder.closed


def test_reads_go_through_the_descriptor_not_the_path(signed: tuple[Path, manifests.KeyTrust],
                                                      tmp_path: Path) -> None:
    model, trust = signed
    result = manifests.verify_model(model, trust)
    os.rename(model, tmp_path / "moved")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"a": 666}')
    os.symlink(other, model)  # the path now leads elsewhere; the descriptor does not
    assert result.read_bytes("config.json") == b'{"a": 1}'
    with pytest.raises(VerificationError) as info:
        result.verified.check_root_path()
    assert info.value.rule == "folder.changed"
    result.close()


def test_in_place_edit_with_restored_mtime_is_caught(signed: tuple[Path, manifests.KeyTrust]) -> None:
    model, trust = signed
    result = manifests.verify_model(model, trust)
    cfg = model / "config.json"
    st = os.stat(cfg)
    cfg.write_text('{"a": 9}')  # same size
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    for call in (lambda: result.read_bytes("config.json"), result.recheck):
        with pytest.raises(VerificationError) as info:
            call()
        assert info.value.rule == "folder.changed" and "ctime_ns" in info.value.message
    result.close()


def test_a_root_symlink_is_refused_by_the_inventory(signed: tuple[Path, manifests.KeyTrust], tmp_path: Path) -> None:
    model, trust = signed
    link = tmp_path / "link"
    os.symlink(model, link)
    with pytest.raises(manifests.FindingsError):
        manifests.verify_model(link, trust)


def test_names_that_escape_are_refused(signed: tuple[Path, manifests.KeyTrust]) -> None:
    model, trust = signed
    with manifests.verify_model(model, trust) as result:
        for bad in ("../m/config.json", "/etc/passwd", "a//b", ""):
            with pytest.raises(VerificationError):
                result.verified.read_bytes(bad)


@pytest.mark.parametrize("name", ["secure_run.manifests.folder", "secure_run.manifests._atomic"])
def test_docstring_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import doctest
    import importlib
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
