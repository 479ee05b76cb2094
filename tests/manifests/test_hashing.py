"""Parallel hashing: correct digests, OMS root digest vector, progress, identity checks."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from mf_helpers import FIXTURES

from secure_run.manifests import FileIdentity, VerificationFailed, hash_files, root_digest, take_inventory
from secure_run.manifests.hashing import MAX_WORKERS, default_workers


class CountingSink:
    def __init__(self) -> None:
        self.total = -1
        self.files = -1
        self.seen = 0
        self.finished = False
        self.lock = threading.Lock()

    def start(self, total_bytes: int, total_files: int) -> None:
        self.total, self.files = total_bytes, total_files

    def advance(self, nbytes: int) -> None:
        with self.lock:
            self.seen += nbytes

    def finish(self) -> None:
        self.finished = True


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_digests_match_hashlib(tmp_path: Path, workers: int) -> None:
    sizes = {"a.bin": 0, "b.bin": 1, "c.bin": (1 << 20) + 7, "sub/d.bin": 3 * (1 << 20)}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(os.urandom(size))
    sink = CountingSink()
    inv = {n: FileIdentity.from_stat(os.stat(tmp_path / n)) for n in sizes}
    got = hash_files(tmp_path, list(sizes), expected=inv, workers=workers, progress=sink)
    assert list(got) == list(sizes)
    for name in sizes:
        assert got[name].sha256 == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert got[name].identity == inv[name]
    assert sink.total == sum(sizes.values()) == sink.seen and sink.files == 4 and sink.finished


def test_root_digest_matches_upstream_fixture() -> None:
    folder = FIXTURES / "model-transparency" / "v1.1.0-elliptic-key"
    digests = hash_files(folder, ["signme-1", "signme-2"])
    assert root_digest(d.sha256 for d in digests.values()) == "92745110b1ab4368471cbe31664e10174e954b113a3df333db860317b2c6dec4"


def test_changed_after_inventory_is_refused(model: Path) -> None:
    inv = take_inventory(model)
    expected = {f.name: f.identity for f in inv.files}
    (model / "README.md").write_text("# changed\n")
    with pytest.raises(VerificationFailed) as err:
        hash_files(model, ["README.md"], expected=expected)
    assert err.value.rule == "FILE-CHANGED" and err.value.path == "README.md"


def test_replaced_file_is_refused(model: Path) -> None:
    inv = take_inventory(model)
    expected = {f.name: f.identity for f in inv.files}
    (model / "LICENSE.new").write_bytes((model / "LICENSE").read_bytes())
    os.replace(model / "LICENSE.new", model / "LICENSE")  # same bytes, another inode
    with pytest.raises(VerificationFailed) as err:
        hash_files(model, ["LICENSE"], expected=expected)
    assert err.value.rule == "FILE-CHANGED" and "ino" in err.value.message


def test_symlink_swapped_in_after_inventory(model: Path) -> None:
    inv = take_inventory(model)
    expected = {f.name: f.identity for f in inv.files}
    (model / "NOTICE").unlink()
    os.symlink("LICENSE", model / "NOTICE")
    with pytest.raises(VerificationFailed) as err:
        hash_files(model, ["NOTICE"], expected=expected)
    assert err.value.rule == "FILE-CHANGED"


def test_identity_check_catches_restored_mtime(model: Path) -> None:
    path = model / "config.json"
    ident = FileIdentity.from_stat(os.lstat(path))
    ident.check(path)  # unchanged: no error
    st = os.stat(path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"bfloat16", b"float16_"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # attacker restores the mtime; size is equal
    with pytest.raises(VerificationFailed) as err:
        ident.check(path, name="config.json")
    assert err.value.rule == "FILE-CHANGED" and "ctime_ns" in err.value.message


def test_default_workers() -> None:
    assert default_workers(1) == 1
    assert 1 <= default_workers(100) <= MAX_WORKERS


def test_default_workers_one_thread_per_usable_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16-CPU host hashes 16 files on 16 threads (it was capped at 8: half the H200 host's CPUs idle)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_workers(100) == 16
    assert default_workers(5) == 5
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)))
    assert default_workers(1000) == MAX_WORKERS
