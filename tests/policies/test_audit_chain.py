"""The hash-chained audit log (issue 14.1): every tampering case is refused with its rule and line."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from secure_run.manifests import generate_key
from secure_run.policies import AuditLog, StateFileError
from secure_run.policies.audit import GENESIS, AuditTampered, line_sha256, verify_log


def _log(tmp_path: Path, n: int, **kw: object) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", **kw)  # type: ignore[arg-type]
    for i in range(n):
        log.append({"event": "run", "i": i, "operator": f"op{i % 3}"})
    return log


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def _write(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(lines))


def _refusal(path: Path, public_key: Path | None = None) -> AuditTampered:
    with pytest.raises(AuditTampered) as info:
        verify_log(path, public_key)
    assert info.value.exit_code == 1
    return info.value


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, Path]:
    keys = generate_key(tmp_path / "audit-key.pem")
    return keys.private, keys.public


def test_records_carry_seq_and_the_hash_of_the_previous_line(tmp_path: Path) -> None:
    log = _log(tmp_path, 4)
    lines = _lines(log)
    docs = [json.loads(x) for x in lines]
    assert [d["seq"] for d in docs] == [0, 1, 2, 3]
    assert docs[0]["prev"] == GENESIS
    for before, doc in zip(lines, docs[1:], strict=False):
        assert doc["prev"] == hashlib.sha256(before).hexdigest()
    report = verify_log(log.path)
    assert report.records == 4 and report.head is not None and report.head.seq == 3
    assert report.head.sha256 == line_sha256(lines[-1])


def test_edited_line_is_refused_at_the_next_line(tmp_path: Path) -> None:
    log = _log(tmp_path, 5)
    lines = _lines(log)
    lines[2] = lines[2].replace(b'"operator":"op2"', b'"operator":"eve"')
    _write(log, lines)
    err = _refusal(log.path)
    assert (err.rule, err.line) == ("AUDIT-LINK", 4)
    assert "is not the sha256 of line 3" in err.message and "line 3 was edited or replaced" in err.message


def test_deleted_line_is_refused(tmp_path: Path) -> None:
    log = _log(tmp_path, 5)
    lines = _lines(log)
    del lines[2]
    _write(log, lines)
    err = _refusal(log.path)
    assert (err.rule, err.line) == ("AUDIT-SEQ", 3)
    assert "seq 3, expected 2: record(s) 2..2 are missing here" in err.message


def test_deleted_first_line_is_refused(tmp_path: Path) -> None:
    log = _log(tmp_path, 3)
    _write(log, _lines(log)[1:])
    err = _refusal(log.path)
    assert (err.rule, err.line) == ("AUDIT-START", 1)


def test_reordered_lines_are_refused(tmp_path: Path) -> None:
    log = _log(tmp_path, 5)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    err = _refusal(log.path)
    assert (err.rule, err.line) == ("AUDIT-SEQ", 2)


def test_spliced_line_from_another_log_is_refused(tmp_path: Path) -> None:
    ours = _log(tmp_path / "a", 5)
    theirs = AuditLog(tmp_path / "b" / "audit.jsonl")
    for i in range(5):
        theirs.append({"event": "run", "i": i, "operator": "mallory"})
    lines = _lines(ours)
    lines[3] = _lines(theirs)[3]  # same seq, another chain
    _write(ours, lines)
    err = _refusal(ours.path)
    assert (err.rule, err.line) == ("AUDIT-LINK", 4)
    assert "line 3 was edited or replaced" in err.message
    # a foreign line spliced in as an extra line
    fresh = _log(tmp_path / "c", 5)
    lines = _lines(fresh)
    lines.insert(2, _lines(theirs)[2])
    _write(fresh, lines)
    err = _refusal(fresh.path)
    assert (err.rule, err.line) == ("AUDIT-LINK", 3)


def test_garbage_line_is_refused(tmp_path: Path) -> None:
    log = _log(tmp_path, 3)
    lines = _lines(log)
    lines.insert(1, b"not json\n")
    _write(log, lines)
    err = _refusal(log.path)
    assert (err.rule, err.line) == ("AUDIT-FORMAT", 2)


def test_rewritten_chain_is_caught_by_the_signed_checkpoint(tmp_path: Path, key: tuple[Path, Path]) -> None:
    """An attacker edits line 2 and recomputes every later prev: only the signature can tell."""
    private, public = key
    log = _log(tmp_path, 6, key=private, checkpoint_every=3)
    docs = [json.loads(x) for x in _lines(log)]
    assert [d["event"] for d in docs].count("checkpoint") == 2  # after seq 2 and after seq 5
    docs[1]["operator"] = "eve"
    out: list[bytes] = []
    prev = GENESIS
    for d in docs:
        d["prev"] = prev
        line = (json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        out.append(line)
        prev = hashlib.sha256(line).hexdigest()
    _write(log, out)
    verify_log(log.path)  # without the key the rewrite is internally consistent...
    err = _refusal(log.path, public)  # ...but the signed head says otherwise
    assert (err.rule, err.line) == ("AUDIT-CHECKPOINT", 4)
    assert "records before it were rewritten" in err.message


def test_truncation_before_the_last_signed_head_is_refused(tmp_path: Path, key: tuple[Path, Path]) -> None:
    private, public = key
    log = _log(tmp_path, 6, key=private, checkpoint_every=3)  # seq: r0 r1 r2 cp3 r4 r5 cp6
    assert len(_lines(log)) == 8
    report = verify_log(log.path, public)
    assert report.checkpoints == 2 and report.signed_head is not None and report.signed_head.seq == 5
    _write(log, _lines(log)[:5])
    err = _refusal(log.path, public)
    assert (err.rule, err.line) == ("AUDIT-TRUNCATED", 5)
    assert "the log ends at seq 4, but the last signed head (audit.jsonl.head.json) is seq 5: 1 record(s) were cut off" in err.message


def test_signed_head_mismatch_and_forged_checkpoint(tmp_path: Path, key: tuple[Path, Path]) -> None:
    private, public = key
    log = _log(tmp_path, 3, key=private, checkpoint_every=3)
    lines = _lines(log)
    doc = json.loads(lines[3])
    sig = doc["bundle"]["dsseEnvelope"]["signatures"][0]
    sig["sig"] = ("A" if sig["sig"][0] != "A" else "B") + sig["sig"][1:]
    lines[3] = (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()
    _write(log, lines)
    err = _refusal(log.path, public)
    assert (err.rule, err.line) == ("AUDIT-CHECKPOINT", 4) and "does not verify" in err.message
    other = generate_key(tmp_path / "other.pem")
    log2 = _log(tmp_path / "two", 3, key=private, checkpoint_every=3)
    err = _refusal(log2.path, other.public)
    assert err.rule == "AUDIT-CHECKPOINT" and "SIG-KEY-HINT" in err.message


def test_rotation_continues_the_chain_across_files(tmp_path: Path) -> None:
    log = _log(tmp_path, 30, max_bytes=1024)
    files = log.files()
    assert len(files) >= 4 and files[-1] == log.path
    first_new = json.loads(files[1].read_bytes().splitlines()[0])
    assert first_new["prev"] == line_sha256(files[0].read_bytes().splitlines(keepends=True)[-1])
    assert files[0].name == f"audit.jsonl.{first_new['seq'] - 1:012d}"
    report = verify_log(log.path)
    assert report.records == 30 and len(report.files) == len(files)
    assert [r["i"] for r in log.records()] == list(range(30))
    # a rotated file removed from the middle of the chain
    gone = files[1]
    first_after = json.loads(files[2].read_bytes().splitlines()[0])["seq"]
    gone.unlink()
    err = _refusal(log.path)
    assert err.rule == "AUDIT-SEQ" and err.file == files[2] and err.line == 1
    assert f"seq {first_after}, expected" in err.message


def test_oldest_rotated_file_removed_is_refused(tmp_path: Path) -> None:
    log = _log(tmp_path, 15, max_bytes=1024)
    log.files()[0].unlink()
    err = _refusal(log.path)
    assert err.rule == "AUDIT-START" and err.line == 1


def test_chain_continues_after_the_current_file_was_rotated_away_and_is_empty(tmp_path: Path) -> None:
    log = _log(tmp_path, 3)
    log.path.rename(log.path.with_name("audit.jsonl.000000000002"))
    log.append({"event": "run", "i": 3})
    assert json.loads(_lines(log)[0])["seq"] == 3
    assert verify_log(log.path).records == 4


def test_legacy_unchained_prefix_is_reported_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"event":"run","schema":1}\n{"event":"run","schema":1}\n')
    path.chmod(0o600)
    log = AuditLog(path)
    log.append({"event": "run"})
    assert json.loads(_lines(log)[2])["prev"] == line_sha256(_lines(log)[1])
    report = verify_log(path)
    assert (report.legacy, report.records) == (2, 1)
    lines = _lines(log)
    lines[1] = b'{"event":"edited","schema":1}\n'
    _write(log, lines)
    assert (_refusal(path).rule, _refusal(path).line) == ("AUDIT-LINK", 3)


def _writer(path: str, key: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path), key=Path(key), checkpoint_every=16, max_bytes=16 * 1024)
    for i in range(count):
        log.append({"event": "run", "worker": worker, "i": i, "pad": "x" * (10 + 7 * i)})


def test_concurrent_writers_keep_one_valid_chain(tmp_path: Path, key: tuple[Path, Path]) -> None:
    """4 processes x 50 appends, with signed checkpoints and rotations happening under contention."""
    private, public = key
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), str(private), w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    report = verify_log(path, public)
    log = AuditLog(path)
    runs = [r for r in log.records() if r["event"] == "run"]
    assert len(runs) == 200 and len(log.files()) > 2
    checkpoints = [r for r in log.records() if r["event"] == "checkpoint"]
    assert report.checkpoints == len(checkpoints) >= 12 and report.records == 200 + report.checkpoints
    for w in range(4):
        assert [r["i"] for r in runs if r["worker"] == w] == list(range(50))


def test_an_auditors_copy_can_be_verified(tmp_path: Path) -> None:
    """verify reads a copy that is not private to the auditor (evidence), but never follows a link."""
    log = _log(tmp_path, 3)
    copy = tmp_path / "evidence" / "audit.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(log.path.read_bytes())
    copy.chmod(0o644)
    assert verify_log(copy).records == 3
    link = tmp_path / "evidence" / "link.jsonl"
    link.symlink_to(copy)
    with pytest.raises(StateFileError, match="is a symlink"):
        verify_log(link)


def test_a_carriage_return_inside_a_line_stays_in_that_line(tmp_path: Path) -> None:
    log = _log(tmp_path, 3)
    lines = _lines(log)
    assert lines[1].startswith(b"{")
    lines[1] = b"{\r" + lines[1][1:]  # a raw CR byte (JSON whitespace), as an editor could leave
    _write(log, lines)
    err = _refusal(log.path)
    assert (err.rule, err.line) == ("AUDIT-LINK", 3)  # not shifted by the CR


def test_a_crash_between_link_and_rename_leaves_a_readable_chain(tmp_path: Path) -> None:
    """Rotation links the old file to its rotated name, then renames the new file over the path;
    a crash in between leaves two names for one file, which is read once."""
    log = _log(tmp_path, 3)
    os.link(log.path, log.path.with_name("audit.jsonl.000000000002"))
    assert verify_log(log.path).records == 3
    log.append({"event": "run", "i": 3})
    assert verify_log(log.path).records == 4 and log.files() == [log.path]


@pytest.mark.parametrize("bad", [b"[" * 100_000 + b"]" * 100_000, b'{"seq": 1, "seq": 2}', b'{"seq": NaN}'],
                         ids=["nested-100k", "duplicate-key", "nan"])
def test_hostile_lines_are_refused_with_a_rule_not_a_traceback(tmp_path: Path, bad: bytes) -> None:
    # a line 100,000 brackets deep crashed the plain json.loads with RecursionError; duplicate keys
    # and NaN were accepted: the audit log is read with the one strict loader
    log = _log(tmp_path, 3)
    lines = _lines(log)
    _write(log, [lines[0], bad + b"\n", *lines[1:]])
    err = _refusal(log.path)
    assert err.rule and ":2" in err.message
    with pytest.raises(StateFileError) as info:
        log.records()
    assert info.value.rule == "state.format" and ":2: not a JSON object" in info.value.message
    log.append({"event": "after"})  # appending after a hostile line still works (the chain reads it strictly)
