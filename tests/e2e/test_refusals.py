"""`secure-run generate` refuses tampered or substituted models before any sandbox starts.

The sandbox backend is replaced by one that fails the test if it is ever asked for: every refusal
below must happen in the pre-run gate (verify -> tensor table -> policy), i.e. before a single
weight is loaded anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from e2e_helpers import SignedModel, sign_and_pin

from secure_run import manifests
from secure_run.runner.cli import cli


@pytest.fixture(autouse=True)
def _no_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the sandbox must not be started for a refused model")

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", forbidden)
    monkeypatch.setattr("secure_run.sandbox.backends.run_worker", forbidden)


def _generate(model: SignedModel, *extra: str) -> Any:
    args = ["generate", "--model", str(model.root), "--policy", "builtin:demo", "--lock", str(model.lock),
            "--prompt", "hello", "--json", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _error(result: Any) -> dict[str, Any]:
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    docs = [d for d in lines if "error" in d]
    assert docs, result.output
    return docs[-1]["error"]  # type: ignore[no-any-return]


def _shard(model: SignedModel) -> Path:
    return sorted(model.root.glob("*.safetensors"))[-1]


def test_one_flipped_byte_in_a_shard(demo_copy: SignedModel, state_env: Path) -> None:
    shard = _shard(demo_copy)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # a weight byte: the header stays valid, only the digest changes
    shard.write_bytes(bytes(data))
    result = _generate(demo_copy)
    assert result.exit_code == 1
    err = _error(result)
    assert err["kind"] == "verification"
    assert err["mismatched"] == [shard.name]
    assert err["message"] == "1 file(s) differ from the signed content"


def test_an_added_pyc(demo_copy: SignedModel, state_env: Path) -> None:
    cache = demo_copy.root / "__pycache__"
    cache.mkdir()
    (cache / "modeling.cpython-311.pyc").write_bytes(b"\xa7\x0d\x0d\x0a" + b"\x00" * 12 + b"\xe3payload")
    result = _generate(demo_copy)
    assert result.exit_code == 1
    err = _error(result)
    assert err["kind"] == "manifest"
    assert "__pycache__" in json.dumps(err)


def test_a_pickle_renamed_to_safetensors(demo_copy: SignedModel, state_env: Path) -> None:
    (demo_copy.root / "extra.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    result = _generate(demo_copy)
    assert result.exit_code == 1
    assert "extra.safetensors" in json.dumps(_error(result))


def test_a_validly_signed_but_different_version(demo_copy: SignedModel, state_env: Path, tmp_path: Path) -> None:
    # The lock pins version 1. Version 2 (one weight byte changed) is re-signed with the SAME key:
    # its signature is valid, but it is not the reviewed version, so it must be refused.
    shard = _shard(demo_copy)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    v2 = sign_and_pin(demo_copy.root, tmp_path, demo_copy.name, key=demo_copy.key, pin=False)
    assert v2.root_digest != demo_copy.root_digest
    manifests.verify_model(demo_copy.root, manifests.KeyTrust.from_file(demo_copy.public_key))  # valid signature
    result = _generate(demo_copy)
    assert result.exit_code == 1
    err = _error(result)
    assert err["kind"] == "verification"
    assert "LOCK-DIGEST" in json.dumps(err)
    assert demo_copy.root_digest in json.dumps(err)


def test_unlocked_model_is_refused(demo_copy: SignedModel, state_env: Path, tmp_path: Path) -> None:
    empty_lock = tmp_path / "empty.lock.json"
    empty_lock.write_text('{"schema": "secure-run/lock/v1", "models": {}}\n')
    args = ["generate", "--model", str(demo_copy.root), "--policy", "builtin:demo", "--lock", str(empty_lock),
            "--public-key", str(demo_copy.public_key), "--prompt", "hello", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 1
    assert "lock" in _error(result)["message"].lower()


def test_wrong_key(demo_copy: SignedModel, state_env: Path, tmp_path: Path) -> None:
    other = manifests.generate_key(tmp_path / "other.pem")
    result = _generate(demo_copy, "--public-key", str(other.public))
    assert result.exit_code == 1
    assert _error(result)["kind"] == "verification"


def test_modified_chat_template_is_a_policy_refusal(demo_copy: SignedModel, state_env: Path,
                                                     tmp_path: Path) -> None:
    # Re-signed after the edit, so the signature and lock hold; the policy's pinned hash (G1) refuses.
    tpl = demo_copy.root / "chat_template.jinja"
    tpl.write_text(tpl.read_text() + "{# injected #}")
    resigned = sign_and_pin(demo_copy.root, tmp_path, demo_copy.name, key=demo_copy.key)
    result = _generate(resigned)
    assert result.exit_code == 1
    err = _error(result)
    assert err["kind"] == "policy"
    assert "G1" in json.dumps(err)
    audit = state_env / "secure-run" / "audit.jsonl"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert records[-1]["event"] == "refused" and records[-1]["allowed"] is False


def test_no_policy_for_a_non_demo_model_is_a_usage_error(demo_copy: SignedModel, state_env: Path) -> None:
    args = ["generate", "--model", str(demo_copy.root), "--prompt", "hi", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 2
    assert "--policy" in _error(result)["message"]


def test_prompt_and_chat_are_exclusive(state_env: Path) -> None:
    result = CliRunner().invoke(cli, ["generate", "--json"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "exactly one of --prompt" in _error(result)["message"]
