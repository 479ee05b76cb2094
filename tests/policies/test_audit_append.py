"""All-or-nothing appends and torn-tail recovery (issue 10 item 15) for the audit log and the
licence-acceptance store; disk full is exit 2 with a clear message."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from policies_support import OML_ATTRIBUTION, PolicyFactory, good_facts, oml_license_text, result, write_files

from secure_run.policies import AcceptanceStore, AuditLog, StateFileError, _state, accept_license, evaluate
from secure_run.policies.audit import verify_log
from secure_run.policies.licenses import license_fingerprint
from secure_run.runner.cli import cli

OML = "LicenseRef-NVIDIA-OML-2025-10-24"
ACKS = ["export_compliance", "no_ip_litigation", "revocable_terms", "trustworthy_ai_terms"]


def _short_write(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.write in _state writes only half the bytes (what a full disk does) and reports it."""
    real = os.write
    calls: list[int] = []

    def half(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real(fd, bytes(data)[: len(data) // 2])

    monkeypatch.setattr(_state.os, "write", half)
    return calls


def _enospc(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_state.os, "write", full)


# --- the audit log ----------------------------------------------------------------------------------


def test_short_write_is_rolled_back_and_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"event": "one"})
    before = log.path.read_bytes()
    calls = _short_write(monkeypatch)
    with pytest.raises(StateFileError) as info:
        log.append({"event": "two", "pad": "x" * 500})
    assert calls, "the patched write was not used"
    assert info.value.rule == "state.write" and info.value.exit_code == 2
    assert "short write" in info.value.message and "nothing was recorded" in info.value.message
    assert str(log.path) in info.value.message and "free space" in (info.value.hint or "")
    assert log.path.read_bytes() == before  # rolled back: no partial line
    monkeypatch.undo()
    log.append({"event": "three"})
    assert [r["event"] for r in log.read()] == ["one", "three"]
    assert verify_log(log.path).records == 2


def test_enospc_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"event": "one"})
    before = log.path.read_bytes()
    _enospc(monkeypatch)
    with pytest.raises(StateFileError, match="No space left on device; nothing was recorded"):
        log.append({"event": "two"})
    assert log.path.read_bytes() == before


def test_failed_fsync_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"event": "one"})
    before = log.path.read_bytes()
    calls = []

    def bad_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(_state.os, "fsync", bad_fsync)
    with pytest.raises(StateFileError, match="Input/output error"):
        log.append({"event": "two"})
    assert log.path.read_bytes() == before


def test_torn_tail_is_ignored_reported_and_cut_with_evidence(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"event": "one"})
    torn = b'{"event":"half-writ'
    with log.path.open("ab") as fh:
        fh.write(torn)
    assert [r["event"] for r in log.read()] == ["one"]  # readers skip the torn tail
    report = verify_log(log.path)
    assert report.records == 1 and report.torn is not None and report.torn.length == len(torn)
    log.append({"event": "two"})
    raw = log.path.read_bytes()
    assert torn not in raw and raw.endswith(b"\n")
    second = log.read()[1]
    assert second["torn_tail_cut"] == {"offset": len(raw.splitlines(keepends=True)[0]), "length": len(torn),
                                       "sha256": __import__("hashlib").sha256(torn).hexdigest()}
    assert verify_log(log.path).records == 2


def test_check_writable_names_path_and_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "real.jsonl"
    target.write_text("")
    (tmp_path / "link.jsonl").symlink_to(target)
    with pytest.raises(StateFileError) as info:
        AuditLog(tmp_path / "link.jsonl").check_writable()
    assert info.value.rule == "state.symlink" and "link.jsonl is a symlink" in info.value.message
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(StateFileError, match="dir.jsonl: Is a directory"):
        AuditLog(tmp_path / "dir.jsonl").check_writable()

    class Tiny:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(_state.os, "fstatvfs", lambda fd: Tiny())
    ok = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(StateFileError) as info:
        ok.check_writable()
    assert info.value.rule == "state.space"
    assert f"cannot append to {ok.path}: only 12288 bytes free" in info.value.message
    monkeypatch.undo()
    ok.check_writable()
    assert ok.path.read_bytes() == b""  # created, nothing written


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a private tmpfs")
def test_real_full_disk_on_a_tiny_tmpfs(tmp_path: Path) -> None:
    """A real ENOSPC: a 4 KiB tmpfs in a private mount namespace, filled by appends."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
import os, sys
from pathlib import Path
from secure_run.policies import AuditLog, StateFileError
log = AuditLog(Path({str(mnt)!r}) / "audit.jsonl")
n = 0
try:
    while n < 1000:
        log.append({{"event": "fill", "pad": "x" * 300}}); n += 1
except StateFileError as err:
    data = log.path.read_bytes()
    assert data.endswith(b"\\n") and data.count(b"\\n") == n, (n, len(data))
    assert len(log.read()) == n
    print("REFUSED", n, err.rule, err.message)
    sys.exit(0)
print("NEVER FULL", n)
sys.exit(3)
"""
    cmd = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=4k tmpfs "{mnt}" && exec "$0" -c "$1"',
           sys.executable, script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "mount" in proc.stderr and "REFUSED" not in proc.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REFUSED" in proc.stdout and "state.write" in proc.stdout and "nothing was recorded" in proc.stdout
    assert "No space left on device" in proc.stdout or "the disk is full" in proc.stdout


# --- the licence-acceptance store ------------------------------------------------------------------------


@pytest.fixture
def oml(make_policy: PolicyFactory, tmp_path: Path) -> tuple[Path, object]:
    folder = tmp_path / "model"
    write_files(folder, {"LICENSE": oml_license_text(), "NOTICE": f"{OML_ATTRIBUTION}.\n"})
    policy = make_policy({
        "spec": {
            "artifact": {"files": {"pinned": {"LICENSE": None, "NOTICE": None}}, "card": {"license": "other"}},
            "licenses": {"weights_expression": OML, "allowed": [OML, "Apache-2.0"],
                         "fingerprints": {OML: [license_fingerprint(oml_license_text())]}},
            "notices": {"required_strings": []},
            "acceptance": {"required": True, "acknowledgements": ACKS},
        }
    })
    return folder, policy


def test_partial_acceptance_line_does_not_refuse_every_later_run(oml: tuple[Path, object], state: Path) -> None:
    """Regression (issue 10 item 15): one partial line used to make every later run refused."""
    folder, policy = oml
    store = AcceptanceStore(policy.acceptance_store_path())  # type: ignore[attr-defined]
    accept_license(policy, folder, license_id=OML, operator="alice", acknowledgements=ACKS, store=store)  # type: ignore[arg-type]
    with store.path.open("ab") as fh:
        fh.write(b'{"license_id": "LicenseRef-NVIDIA-OML-2025-10-24", "operat')  # a crashed append
    after = evaluate(policy, good_facts(folder), acceptances=store)  # type: ignore[arg-type]
    assert result(after, "L1") == "pass" and result(after, "L2") == "pass"
    torn = store.torn_tail()
    assert torn is not None and torn.length == len(b'{"license_id": "LicenseRef-NVIDIA-OML-2025-10-24", "operat')
    # another operator can still accept, and the torn line is cut off first
    accept_license(policy, folder, license_id=OML, operator="bob", acknowledgements=ACKS, store=store)  # type: ignore[arg-type]
    lines = store.path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and all(json.loads(line) for line in lines) and store.torn_tail() is None
    assert result(evaluate(policy, good_facts(folder, operator="bob"), acceptances=store), "L1") == "pass"  # type: ignore[arg-type]


def test_disk_full_in_accept_license_is_exit_2(oml: tuple[Path, object], state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, policy = oml
    path = folder.parent / "policy0" / "policy.yaml"
    _enospc(monkeypatch)
    args = ["policy", "accept-license", OML, str(folder), "--policy", str(path), "--operator", "alice", "--yes"]
    for ack in ACKS:
        args += ["--acknowledge", ack]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 2, res.output
    assert "state-file" in res.output and "No space left on device; nothing was recorded" in res.output
    assert "Traceback" not in res.output
    store = AcceptanceStore(policy.acceptance_store_path())  # type: ignore[attr-defined]
    assert store.path.read_bytes() == b""
