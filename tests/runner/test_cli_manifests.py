"""CLI: keygen, sign, verify, inspect, import -- exit codes 0/1/2, text and --json documents."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from secure_run.runner.cli import cli

_spec = importlib.util.spec_from_file_location("mf_helpers_cli", Path(__file__).parents[1] / "manifests" / "mf_helpers.py")
assert _spec is not None and _spec.loader is not None
helpers = importlib.util.module_from_spec(_spec)
sys.modules["mf_helpers_cli"] = helpers
_spec.loader.exec_module(helpers)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(*args, "--json")
    return code, json.loads(out)


@pytest.fixture
def key(tmp_path: Path) -> tuple[str, str]:
    code, doc = run_json("keygen", "--out", str(tmp_path / "org.pem"))
    assert code == 0 and doc["ok"] is True and doc["command"] == "keygen"
    assert len(doc["key_sha256"]) == 64 and doc["public_key"].endswith("org.pub.pem")
    return doc["private_key"], doc["public_key"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return helpers.write_model(tmp_path / "tiny")  # type: ignore[no-any-return]


def test_keygen_text_modes_and_no_overwrite(tmp_path: Path) -> None:
    code, out, _ = run("keygen", "--out", str(tmp_path / "k.pem"))
    assert code == 0 and "key sha256:" in out
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    code, doc = run_json("keygen", "--out", str(tmp_path / "k.pem"))
    assert code == 2 and doc["ok"] is False and doc["error"]["kind"] == "usage"


def test_sign_verify_json(model: Path, key: tuple[str, str]) -> None:
    code, doc = run_json("sign", str(model), "--key", key[0])
    assert code == 0 and doc["command"] == "sign" and doc["files"] == 12 and doc["signature"].endswith("model.sig")
    code, doc = run_json("verify", str(model), "--public-key", key[1])
    assert code == 0 and doc["schema_version"] == 1 and doc["ok"] is True and doc["command"] == "verify"
    assert set(doc) >= {"model", "signature", "signer", "files", "bytes", "hash_seconds", "throughput_gbps", "lock"}
    assert doc["model"]["root_digest"].startswith("sha256:") and doc["signer"]["method"] == "key"
    assert {"name", "size", "sha256"} == set(doc["files"][0])
    assert doc["lock"] is None


def test_verify_text_output(model: Path, key: tuple[str, str]) -> None:
    run("sign", str(model), "--key", key[0])
    code, out, _ = run("verify", str(model), "--public-key", key[1])
    assert code == 0 and out.startswith(f"verified {model}: 12 files") and "root digest: sha256:" in out


def test_verify_refusal_exit_1_json(model: Path, key: tuple[str, str]) -> None:
    run("sign", str(model), "--key", key[0])
    (model / "evil.pyc").write_bytes(b"\xa7\x0d\x0d\x0a" + bytes(12))
    (model / "x.py").write_text("")
    before = helpers.snapshot(model)
    code, doc = run_json("verify", str(model), "--public-key", key[1])
    assert helpers.snapshot(model) == before
    assert code == 1 and doc["ok"] is False
    err = doc["error"]
    assert err["kind"] == "manifest" and err["exit_code"] == 1
    assert [(f["path"], f["rule"]) for f in err["findings"]] == [("evil.pyc", "INV-PYC"), ("x.py", "INV-CODE")]


def test_verify_digest_mismatch_json_lists_files(model: Path, key: tuple[str, str]) -> None:
    run("sign", str(model), "--key", key[0])
    (model / "README.md").write_text("# changed\n")
    code, doc = run_json("verify", str(model), "--public-key", key[1])
    assert code == 1 and doc["error"]["kind"] == "verification" and doc["error"]["rule"] == "DIGEST-MISMATCH"
    assert doc["error"]["mismatched"] == ["README.md"] and doc["error"]["extra"] == [] and doc["error"]["missing"] == []


def test_verify_refusal_text_on_stderr(model: Path, key: tuple[str, str]) -> None:
    run("sign", str(model), "--key", key[0])
    os.symlink("/etc/passwd", model / "p.txt")
    code, out, err = run("verify", str(model), "--public-key", key[1])
    assert code == 1 and out == ""
    assert "p.txt: [INV-SYMLINK]" in err and "outside the folder" in err and "fix:" in err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "no trust given"),
        (["--cert-root", "ROOT"], "--cert-root needs --identity"),
        (["--trusted-root", "T"], "--trusted-root only applies with --sigstore"),
        (["--public-key", "PUB", "--sigstore", "--identity", "a", "--issuer", "b"], "choose one of"),
        (["--sigstore", "--identity", "a"], "--sigstore needs --identity and --issuer"),
        (["--identity", "a"], "--identity needs --cert-root or --sigstore"),
        (["--public-key", "missing.pem"], "cannot read public key"),
    ],
)
def test_verify_usage_errors_exit_2(model: Path, key: tuple[str, str], tmp_path: Path, args: list[str], fragment: str) -> None:
    args = [key[1] if a == "PUB" else str(tmp_path / "ca.pem") if a == "ROOT" else a for a in args]
    (tmp_path / "ca.pem").write_bytes(b"")
    code, doc = run_json("verify", str(model), *args)
    assert code == 2 and doc["error"]["kind"] == "usage" and fragment in doc["error"]["message"]


def test_verify_missing_folder_exit_2(tmp_path: Path, key: tuple[str, str]) -> None:
    code, doc = run_json("verify", str(tmp_path / "nope"), "--public-key", key[1])
    assert code == 2 and doc["error"]["rule"] == "INV-ROOT"


def test_verify_with_lock_only(model: Path, key: tuple[str, str], tmp_path: Path) -> None:
    from secure_run.manifests import KeyTrust, pin_model, verify_model

    run("sign", str(model), "--key", key[0])
    result = verify_model(model, KeyTrust.from_file(key[1]))
    lock = tmp_path / "models.lock.json"
    pin_model(lock, "tiny", root_digest=result.root_digest, signer=result.signer, public_key="org.pub.pem", path="tiny")
    code, doc = run_json("verify", str(model), "--lock", str(lock))
    assert code == 0 and doc["lock"] == {"name": "tiny", "root_digest": "sha256:" + result.root_digest}
    # a validly signed but different version is refused by the lock
    (model / "README.md").write_text("# v2\n")
    run("sign", str(model), "--key", key[0])
    code, doc = run_json("verify", str(model), "--public-key", key[1], "--lock", str(lock))
    assert code == 1 and doc["error"]["rule"] == "LOCK-DIGEST"


def test_verify_sigstore_fixture(tmp_path: Path) -> None:
    fixtures = Path(helpers.FIXTURES)
    model = tmp_path / "m"
    shutil.copytree(fixtures / "model-transparency" / "v1.1.0-certificate", model)
    bundle = fixtures / "model-signing-spec" / "test-vectors" / "v1.0" / "valid" / "sigstore.bundle.json"
    code, doc = run_json(
        "verify", str(model), "--sigstore", "--identity", "stefanb@us.ibm.com",
        "--issuer", "https://sigstore.verify.ibm.com/oauth2", "--signature", str(bundle),
    )  # fmt: skip
    # the fixture's extension-less test files are not model files: secure-run refuses the folder
    assert code == 1 and {f["rule"] for f in doc["error"]["findings"]} == {"INV-KIND"}


def test_inspect_clean_and_dirty(model: Path) -> None:
    code, doc = run_json("inspect", str(model))
    assert code == 0 and doc["ok"] is True and doc["command"] == "inspect"
    report = doc["report"]
    assert report["tensors"]["count"] == 4 and report["config"]["model_type"] == "superlinear-exp"
    assert report["findings"] == [] and "error" not in doc
    code, out, _ = run("inspect", str(model))
    assert code == 0 and "tensors: 4" in out and "findings: 0" in out
    (model / "config.json").write_text('{"model_type": "x", "auto_map": {"AutoModel": "m.M"}}')
    (model / "run.py").write_text("")
    code, doc = run_json("inspect", str(model))
    assert code == 1 and doc["ok"] is False and doc["error"]["rule"] in ("JSON-REMOTE-CODE", "INV-CODE")
    assert {f["rule"] for f in doc["report"]["findings"]} == {"JSON-REMOTE-CODE", "INV-CODE"}
    assert doc["report"]["config"]["remote_code"][0]["pointer"] == "/auto_map"
    code, out, err = run("inspect", str(model))
    assert code == 1 and "remote-code pointer config.json#/auto_map" in out and "run.py: [INV-CODE]" in err


def test_import_cli(tmp_path: Path, key: tuple[str, str]) -> None:
    src = helpers.write_model(tmp_path / "snap")
    (src / "modeling.py").write_text("import os\n")
    (src / "config.json").write_text('{"model_type": "x",\n "auto_map": {"AutoModel": "modeling.M"}}\n')
    code, doc = run_json("import", str(src), str(tmp_path / "clean"))
    assert code == 0 and doc["command"] == "import"
    assert [d["name"] for d in doc["report"]["dropped"]] == ["modeling.py"]
    assert [s["pointer"] for s in doc["report"]["stripped_keys"]] == ["/auto_map"]
    assert doc["next_steps"][0].startswith("secure-run inspect") and any("secure-run sign" in s for s in doc["next_steps"])
    code, doc = run_json("import", str(src), str(tmp_path / "clean"))
    assert code == 2 and doc["error"]["rule"] == "IMP-DEST"  # like keygen over an existing file
    code, out, _ = run("import", str(src), str(tmp_path / "clean2"))
    assert code == 0 and "dropped modeling.py: [INV-CODE]" in out and "next steps:" in out
    assert run("sign", str(tmp_path / "clean2"), "--key", key[0])[0] == 0
    assert run("verify", str(tmp_path / "clean2"), "--public-key", key[1])[0] == 0


def test_certificate_cli(model: Path, tmp_path: Path) -> None:
    ca = helpers.make_ca(tmp_path / "ca")
    code, doc = run_json("sign", str(model), "--key", str(ca.leaf_key), "--cert", str(ca.leaf), "--chain", str(ca.chain))
    assert code == 0 and doc["signer"]["method"] == "certificate"
    code, doc = run_json("verify", str(model), "--cert-root", str(ca.root), "--identity", "signer@example.com")
    assert code == 0 and doc["signer"]["identity"] == "signer@example.com"
    code, doc = run_json("verify", str(model), "--cert-root", str(ca.root), "--identity", "mallory@example.com")
    assert code == 1 and doc["error"]["rule"] == "CERT-IDENTITY"
