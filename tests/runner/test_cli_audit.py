"""``secure-run audit verify|show|keygen|checkpoint`` and ``secure-run attest`` through CliRunner."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_run.manifests import generate_key
from secure_run.policies import AuditLog, audit_record
from secure_run.policies.audit import code_identity, content_sha256
from secure_run.policies.findings import Decision
from secure_run.runner.cli import cli


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _decision(model: str = "/models/demo-tiny", allowed: bool = True, operator: str = "alice",
              root_digest: str = "ab" * 32) -> Decision:
    return Decision(
        allowed=allowed, mode="enforce", stage="run", policy_name="demo", policy_sha256="cd" * 32, findings=(),
        model_dir=model, model_root_digest=root_digest, license={"license_id": "Apache-2.0", "fingerprint": "ef" * 32},
        banner=None, patent_notice=(), limits={}, declared_use="research", operator=operator,
        timestamp="2026-01-01T00:00:00Z",
    )


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[AuditLog, Path, Path]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    keys = generate_key(tmp_path / "audit-key.pem")
    log = AuditLog(tmp_path / "audit.jsonl", key=keys.private, checkpoint_every=3)  # r0 r1 r2 cp3
    old = datetime.now(UTC) - timedelta(days=10)
    log.append(audit_record(_decision("/models/other", operator="bob"), event="refused", now=old,
                            run_stats={"refused": {"rule": "G1"}}))
    log.append(audit_record(_decision(), event="started", run_id="r1", parameters={"max_new_tokens": 8}))
    log.append(audit_record(
        _decision(), event="finished", run_id="r1", signer={"method": "key", "key_sha256": "12" * 32},
        code=code_identity(), sandbox_backend="docker", image_digest="sha256:" + "34" * 32,
        gpu={"name": "NVIDIA H200", "driver": "570.1"}, prompt="<|user|>hi", output="Hello there.",
        parameters={"max_new_tokens": 8, "temperature": 0.0, "seed": 1},
        host_measured={"generated_tokens": 3, "seconds": 0.5, "output_blocked": False},
        worker_reported={"tokens_per_second": 1e9},
    ))
    return log, keys.private, keys.public


def test_record_fields_keep_host_and_worker_figures_apart(setup: tuple[AuditLog, Path, Path]) -> None:
    log, _, _ = setup
    rec = log.read()[2]
    assert rec["output_sha256"] == hashlib.sha256(b"Hello there.").hexdigest() == content_sha256("Hello there.")
    assert rec["prompt_sha256"] == content_sha256("<|user|>hi")
    assert "output_text" not in rec and "prompt_text" not in rec  # text only when the policy asks
    assert rec["host_measured"] == {"generated_tokens": 3, "seconds": 0.5, "output_blocked": False}
    assert rec["worker_reported"] == {"tokens_per_second": 1e9}
    assert rec["sandbox"] == {"backend": "docker", "image_digest": "sha256:" + "34" * 32}
    code = rec["code"]
    assert isinstance(code, dict) and code["digest"].startswith("sha256:") and set(code["packages"]) == {"model", "kernels", "sandbox"}
    kept = audit_record(_decision(), event="finished", prompt="p", output="o", store_text=True)
    assert kept["prompt_text"] == "p" and kept["output_text"] == "o"


def test_code_identity_changes_when_code_changes(tmp_path: Path) -> None:
    from secure_run.policies.audit import _package_digest

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.pyc").write_bytes(b"junk")
    before = _package_digest(pkg)
    (pkg / "__pycache__" / "a.pyc").write_bytes(b"other junk")
    assert _package_digest(pkg) == before
    (pkg / "a.py").write_text("x = 2\n")
    assert _package_digest(pkg) != before


def test_audit_verify_ok_text_and_json(setup: tuple[AuditLog, Path, Path]) -> None:
    log, _, public = setup
    res = run("audit", "verify", "--log", str(log.path), "--public-key", str(public))
    assert res.exit_code == 0, res.output
    assert "audit log OK: 4 chained record(s) in 1 file(s), head seq 3" in res.output
    assert "1 signed checkpoint(s) verified; signed head seq 2 present" in res.output
    doc = json.loads(run("audit", "verify", "--log", str(log.path), "--public-key", str(public), "--json").output)
    assert doc["ok"] is True and doc["records"] == 4 and doc["checkpoints_verified"] == 1
    res = run("audit", "verify", "--log", str(log.path))
    assert res.exit_code == 0 and "NOT checked (no --public-key)" in res.output


def test_audit_verify_tampered_exit_1_with_line(setup: tuple[AuditLog, Path, Path]) -> None:
    log, _, public = setup
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"operator":"alice"', b'"operator":"mallory"')
    log.path.write_bytes(b"".join(lines))
    res = run("audit", "verify", "--log", str(log.path), "--public-key", str(public), "--json")
    assert res.exit_code == 1
    err = json.loads(res.output)["error"]
    assert err["rule"] == "AUDIT-LINK" and err["line"] == 3 and err["kind"] == "audit"
    res = run("audit", "verify", "--log", str(log.path))
    assert res.exit_code == 1 and "audit.jsonl:3: prev" in res.output and "line 2 was edited" in res.output


def test_audit_verify_missing_log_exit_2(tmp_path: Path) -> None:
    res = run("audit", "verify", "--log", str(tmp_path / "none.jsonl"))
    assert res.exit_code == 2 and "no audit log at" in res.output


def test_audit_show_table_filters_and_json(setup: tuple[AuditLog, Path, Path]) -> None:
    log, _, _ = setup
    res = run("audit", "show", "--log", str(log.path))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["seq", "time", "operator", "model", "event", "decision", "tokens", "blocked"]
    assert lines[1].split()[2:] == ["bob", "other", "refused", "refused", "-", "-"]
    assert lines[3].split()[2:] == ["alice", "demo-tiny", "finished", "allowed", "3", "False"]
    assert lines[-1] == "3 record(s)"  # the checkpoint is left out
    assert "4 record(s)" in run("audit", "show", "--log", str(log.path), "--all").output
    assert run("audit", "show", "--log", str(log.path), "--since", "1d").output.endswith("2 record(s)\n")
    assert run("audit", "show", "--log", str(log.path), "--decision", "refused").output.endswith("1 record(s)\n")
    assert run("audit", "show", "--log", str(log.path), "--model", "other").output.endswith("1 record(s)\n")
    doc = json.loads(run("audit", "show", "--log", str(log.path), "--decision", "allowed", "--json").output)
    assert [r["seq"] for r in doc["rows"]] == [1, 2] and doc["rows"][1]["tokens"] == 3
    bad = run("audit", "show", "--log", str(log.path), "--since", "yesterday")
    assert bad.exit_code == 2 and "not an ISO date/time or a duration" in bad.output


def test_audit_show_strips_terminal_escapes(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append(audit_record(_decision(operator="ev\x1b]0;pwned\x07il"), event="run"))
    out = run("audit", "show", "--log", str(log.path)).output
    assert "\x1b" not in out and "\x07" not in out and "evil" in out


def test_keygen_and_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    res = run("audit", "keygen")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "state" / "secure-run" / "audit-key.pem").is_file()
    assert run("audit", "keygen").exit_code == 2  # never overwrites
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"event": "run"})
    res = run("audit", "checkpoint", "--log", str(log.path), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["head"]["seq"] == 0
    # the default public key in the state folder is picked up
    res = run("audit", "verify", "--log", str(log.path))
    assert res.exit_code == 0 and "1 signed checkpoint(s) verified; signed head seq 0 present" in res.output


# --- attestations ---------------------------------------------------------------------------------


def test_attest_then_verify(setup: tuple[AuditLog, Path, Path], tmp_path: Path) -> None:
    log, private, public = setup
    out = tmp_path / "run.intoto.json"
    res = run("attest", "--log", str(log.path), "--key", str(private), "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)["statement"]
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["subject"] == [{"name": "output", "digest": {"sha256": content_sha256("Hello there.")}}]
    pred = st["predicate"]
    assert pred["audit"]["seq"] == 2 and pred["model"]["root_digest"] == "ab" * 32
    assert pred["timestamps"]["started"] == log.read()[1]["ts"] and pred["code"]["digest"] == code_identity()["digest"]
    assert pred["sandbox"]["image_digest"] == "sha256:" + "34" * 32
    res = run("audit", "verify", "--log", str(log.path), "--public-key", str(public), "--attestation", str(out))
    assert res.exit_code == 0, res.output
    assert f"attestation OK: output sha256 {content_sha256('Hello there.')} = audit record seq 2" in res.output
    assert run("attest", "--log", str(log.path), "--key", str(private), "--out", str(out)).exit_code == 2


def test_attestation_verifies_with_plain_cryptography(setup: tuple[AuditLog, Path, Path], tmp_path: Path) -> None:
    """A generic DSSE verifier: PAE + ECDSA P-256/SHA-256 over the envelope, no secure-run code."""
    log, private, public = setup
    out = tmp_path / "run.intoto.json"
    assert run("attest", "--log", str(log.path), "--key", str(private), "--out", str(out)).exit_code == 0
    env = json.loads(out.read_bytes())["dsseEnvelope"]
    payload = base64.b64decode(env["payload"])
    ptype = env["payloadType"].encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(payload), payload)
    key = serialization.load_pem_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(base64.b64decode(env["signatures"][0]["sig"]), pae, ec.ECDSA(hashes.SHA256()))
    assert env["payloadType"] == "application/vnd.in-toto+json"
    assert json.loads(payload)["predicateType"] == "https://secure-run.dev/run/v1"


def _forge(out: Path, private: Path, mutate: object) -> None:
    """Re-sign a modified statement with the given key (a forger who holds *some* key)."""
    from secure_run.manifests.provenance import sign_statement

    doc = json.loads(base64.b64decode(json.loads(out.read_bytes())["dsseEnvelope"]["payload"]))
    mutate(doc)  # type: ignore[operator]
    out.write_bytes(sign_statement(doc, private))


def test_forged_attestations_are_refused(setup: tuple[AuditLog, Path, Path], tmp_path: Path) -> None:
    log, private, public = setup
    good = tmp_path / "good.json"
    assert run("attest", "--log", str(log.path), "--key", str(private), "--out", str(good)).exit_code == 0

    def verify(path: Path) -> dict[str, object]:
        res = run("audit", "verify", "--log", str(log.path), "--public-key", str(public), "--attestation",
                  str(path), "--json")
        assert res.exit_code == 1, res.output
        return json.loads(res.output)["error"]  # type: ignore[no-any-return]

    # 1. payload edited, signature kept
    bundle = json.loads(good.read_bytes())
    doc = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    doc["subject"][0]["digest"]["sha256"] = "00" * 32
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(doc).encode()).decode()
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(bundle))
    err = verify(edited)
    assert err["rule"] == "ATTEST-SIGNATURE" and "SIG-INVALID" in str(err["message"])
    # 2. signed by another key
    other = generate_key(tmp_path / "other.pem")
    stranger = tmp_path / "stranger.json"
    stranger.write_bytes(good.read_bytes())
    _forge(stranger, other.private, lambda d: None)
    err = verify(stranger)
    assert err["rule"] == "ATTEST-SIGNATURE" and "SIG-KEY-HINT" in str(err["message"])
    # 3. validly signed (stolen key) but claims another output than the record
    claims = tmp_path / "claims.json"
    claims.write_bytes(good.read_bytes())
    _forge(claims, private, lambda d: d["subject"][0]["digest"].update(sha256="11" * 32))
    err = verify(claims)
    assert err["rule"] == "ATTEST-MISMATCH" and "subject (output sha256)" in str(err["message"])
    # 4. validly signed but names a record that is not in the log
    ghost = tmp_path / "ghost.json"
    ghost.write_bytes(good.read_bytes())
    _forge(ghost, private, lambda d: d["predicate"]["audit"].update(seq=99))
    err = verify(ghost)
    assert err["rule"] == "ATTEST-RECORD" and "the log ends at seq 3" in str(err["message"])
    # 5. the attested record (seq 2, line 3) edited in the log
    lines = log.path.read_bytes().splitlines(keepends=True)
    assert json.loads(lines[2])["seq"] == 2
    lines[2] = lines[2].replace(b'"generated_tokens":3', b'"generated_tokens":4')
    log.path.write_bytes(b"".join(lines))
    err = verify(good)
    assert err["rule"] == "AUDIT-LINK" and err["line"] == 4


def test_attest_needs_a_finished_run(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append(audit_record(_decision(), event="refused"))
    keys = generate_key(tmp_path / "k.pem")
    res = run("attest", "--log", str(log.path), "--key", str(keys.private), "--out", str(tmp_path / "a.json"))
    assert res.exit_code == 2 and "no finished run with an output digest" in res.output


def test_audit_code_prints_the_code_identity() -> None:
    res = run("audit", "code", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["digest"] == code_identity()["digest"] and doc["version"] == code_identity()["version"]
    text = run("audit", "code").output
    assert f"code {code_identity()['digest']}" in text and "  kernels  sha256:" in text


def test_demo_output_traces_offline_to_signed_weights_code_and_record(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's auditor walk-through, command by command, on the signed demo model. The run
    record is written here with the API the pipeline calls (audit_record + AuditLog.append)."""
    from secure_run import manifests
    from secure_run.model.demo import demo_model_dir

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert run("audit", "keygen").exit_code == 0
    demo = demo_model_dir()
    lock = manifests.default_lock_path()
    verified = manifests.verify_model(demo, None, lock=manifests.Lock.load(lock))
    output = "gibberish from random weights"
    log = AuditLog.for_host(tmp_path / "state" / "secure-run" / "audit.jsonl")
    log.check_writable()
    decision = _decision(str(demo), root_digest=f"sha256:{verified.root_digest}")
    log.append(audit_record(decision, event="started", run_id="demo-1"))
    log.append(audit_record(decision, event="finished", run_id="demo-1", signer=verified.signer.to_json(),
                            code=code_identity(), sandbox_backend="namespace", output=output,
                            parameters={"max_new_tokens": 8}, host_measured={"generated_tokens": 8}))
    # the operator attests the run
    att = tmp_path / "run.intoto.json"
    assert run("attest", "--out", str(att)).exit_code == 0
    # the auditor, offline:
    pub = tmp_path / "state" / "secure-run" / "audit-key.pub.pem"
    res = run("audit", "verify", "--public-key", str(pub), "--attestation", str(att), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)["attestation"]
    assert summary["output_sha256"] == hashlib.sha256(output.encode()).hexdigest()
    res = run("verify", str(demo), "--lock", str(lock), "--json")
    assert res.exit_code == 0, res.output
    model = json.loads(res.output)
    assert summary["model"]["root_digest"] == model["model"]["root_digest"]  # the signed demo weights
    assert summary["signer"] == model["signer"]
    assert summary["code"] == json.loads(run("audit", "code", "--json").output)["digest"]
    assert summary["audit"]["seq"] == 1
