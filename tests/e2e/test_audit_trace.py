"""The README's "Auditing a run" walk-through, command for command, on a REAL demo run in Docker.

Marker ``docker``: one ``secure-run generate --json`` on the embedded demo, then the README's
commands as an auditor runs them (``attest``, ``audit checkpoint``, ``audit verify``, ``audit verify
--attestation``, the output digest from the released text, ``audit show``, ``verify`` of the
weights, ``audit code``, the image id in Docker), each result checked against the others; and a
tampered log (one line edited) is refused with its line number. The README's
``jq -j 'select(.type == "text") | .text' run.jsonl | sha256sum`` is computed here in Python (the
same selection and concatenation), so the test does not depend on jq.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from secure_run.manifests import Lock, default_lock_path
from secure_run.model.demo import demo_model_dir

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CLI = [sys.executable, "-m", "secure_run.runner.cli"]
DEMO_PUB = Path(__file__).resolve().parents[2] / "manifests" / "trusted" / "keys" / "demo-superlinear.pub.pem"


def _run(args: list[str], state: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def _statement(path: Path) -> dict[str, Any]:
    bundle = json.loads(path.read_text())
    doc: dict[str, Any] = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    return doc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """README steps 1-4: keygen, a real generate --json, attest, checkpoint."""
    work = tmp_path_factory.mktemp("audit-trace")
    state = work / "state"
    _ok(_run(["audit", "keygen"], state))
    gen = _run(["generate", "--prompt", "Tell me about secure model loading.", "--max-new-tokens", "12", "--json"],
               state)
    stdout = _ok(gen)
    (work / "run.jsonl").write_text(stdout)
    attestation = work / "run.intoto.json"
    _ok(_run(["attest", "--out", str(attestation)], state))
    _ok(_run(["audit", "checkpoint"], state))
    return {"work": work, "state": state, "run": work / "run.jsonl", "attestation": attestation,
            "pub": state / "secure-run" / "audit-key.pub.pem", "log": state / "secure-run" / "audit.jsonl"}


def test_readme_walkthrough_traces_the_output_to_signed_weights_code_and_record(demo_run: dict[str, Any]) -> None:
    state, pub, att = demo_run["state"], demo_run["pub"], demo_run["attestation"]
    events = [json.loads(line) for line in demo_run["run"].read_text().splitlines() if line.strip()]
    assert events[-1]["type"] == "final" and events[-1]["stats"]["backend"] == "docker"

    # audit verify --public-key: whole chain, checkpoints, signed head
    out = _ok(_run(["audit", "verify", "--public-key", str(pub)], state))
    assert "audit log OK" in out and "1 signed checkpoint(s) verified" in out

    # audit verify --attestation: the signed statement matches its record
    out = _ok(_run(["audit", "verify", "--public-key", str(pub), "--attestation", str(att)], state))
    doc = _statement(att)
    subject = doc["subject"][0]["digest"]["sha256"]
    assert f"attestation OK: output sha256 {subject}" in out

    # the released text (README: jq ... | sha256sum) is the attestation's subject
    released = "".join(e["text"] for e in events if e["type"] == "text")
    assert released and hashlib.sha256(released.encode()).hexdigest() == subject

    # the audit record behind it states the whole identity
    pred = doc["predicate"]
    record = [json.loads(line) for line in demo_run["log"].read_text().splitlines()][pred["audit"]["seq"]]
    assert record["event"] == "finished" and record["output_sha256"] == subject
    assert record["prompt_sha256"] == pred["prompt_sha256"] and len(record["prompt_sha256"]) == 64
    assert "output_text" not in record  # the demo policy does not ask for texts
    assert record["host_measured"]["source"] == "host"
    assert record["worker_reported"]["source"].startswith("worker-reported")
    assert record["host_measured"]["generated_tokens"] == events[-1]["stats"]["generated_tokens"]

    # audit show: the run is listed
    out = _ok(_run(["audit", "show", "--model", "demo", "--since", "7d"], state))
    assert "superlinear-demo" in out and "finished" in out

    # verify the weights: root digest and signer = the predicate's
    v = json.loads(_ok(_run(["verify", str(demo_model_dir()), "--public-key", str(DEMO_PUB), "--json"], state)))
    assert v["model"]["root_digest"] == pred["model"]["root_digest"] == record["model_root_digest"]
    assert v["signer"] == pred["signer"] == record["signer"]
    pinned = Lock.load(default_lock_path()).get("superlinear-demo")
    assert pinned is not None and pred["model"]["root_digest"].removeprefix("sha256:") == \
        pinned.root_digest.removeprefix("sha256:")

    # audit code on the same install = the predicate's code digest
    out = _ok(_run(["audit", "code"], state))
    assert f"code {pred['code']['digest']}" in out

    # the sandbox image: Docker knows that content id
    image = pred["sandbox"]["image_digest"]
    assert pred["sandbox"]["backend"] == "docker" and str(image).startswith("sha256:")
    import docker  # README: docker image inspect --format '{{.Id}}' IMAGE_DIGEST (same API call)

    assert docker.from_env().images.get(image).id == image


def test_an_edited_audit_line_is_refused_with_its_line_number(demo_run: dict[str, Any], tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(demo_run["state"], state)
    log = state / "secure-run" / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    assert first["event"] == "started"
    lines[0] = lines[0].replace(f'"operator":{json.dumps(first["operator"])}', '"operator":"mallory"')
    assert "mallory" in lines[0]
    log.write_text("".join(lines))
    proc = _run(["audit", "verify", "--public-key", str(state / "secure-run" / "audit-key.pub.pem"), "--json"], state)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    err = json.loads(proc.stdout.splitlines()[-1])["error"]
    assert err["rule"] == "AUDIT-LINK" and err["line"] == 2  # reported at the next line, whose prev no longer matches
    assert f"{log}:2:" in err["message"] and "line 1 was edited" in err["message"]
    # the attestation no longer verifies against the edited log either
    proc = _run(["audit", "verify", "--public-key", str(state / "secure-run" / "audit-key.pub.pem"),
                 "--attestation", str(demo_run["attestation"]), "--json"], state)
    assert proc.returncode == 1, proc.stderr + proc.stdout
