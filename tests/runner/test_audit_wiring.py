"""Every run record carries what issue 14.2 asks (one-shot generate, warm sessions, refusals, interrupts).

The real gate runs on the embedded demo (verified, its policy evaluated); only the sandbox is
replaced by a scripted worker, so each test checks what the host writes. A record without one of
the fields fails here: signer, code identity, sandbox backend + image content id, GPU when
``--gpu``, prompt/output digests (texts only when the policy's ``audit.store_text`` asks),
host-measured figures apart from worker-reported ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from secure_run.policies.audit import code_identity
from secure_run.runner.cli import cli
from secure_run.sandbox.protocol import StatsEvent, TextEvent, TokenEvent

IMAGE_ID = "sha256:" + "ab" * 32


class FakeBackend:
    """Stands for the Docker backend: a name, and the content id of the image its containers run from."""

    name = "docker"

    def __init__(self) -> None:
        self.image_calls: list[str] = []

    def runtime_for(self, policy: Any) -> str:
        return "host" if policy.gpu else "image"

    def image(self, runtime: str = "image") -> str:
        self.image_calls.append(runtime)
        return IMAGE_ID


class NamespaceLike:
    name = "namespace"


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A scripted one-shot worker; ``pieces`` are its text, ``detail`` its stats detail, ``signal`` a
    signal raised on the host after the first piece."""
    calls: dict[str, Any] = {"pieces": ["hel", "lo"], "detail": {}, "signal": None, "backend": FakeBackend(),
                             "requests": []}

    def run_worker(backend: Any, policy: Any, request: Any) -> Iterator[Any]:
        calls["requests"].append(request)
        for i, piece in enumerate(calls["pieces"]):
            yield TokenEvent(type="token", index=i, token_id=5 + i)
            yield TextEvent(type="text", text=piece)
            if calls["signal"] is not None:
                os.kill(os.getpid(), calls["signal"])
        yield StatsEvent(type="stats", prompt_tokens=3, generated_tokens=len(calls["pieces"]), seconds=0.1,
                         tokens_per_second=20, device="cpu", detail=calls["detail"])

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: calls["backend"])
    monkeypatch.setattr("secure_run.sandbox.backends.run_worker", run_worker)
    return calls


def _generate(*extra: str, prompt: str = "hello") -> Any:
    return CliRunner().invoke(cli, ["generate", "--prompt", prompt, "--max-new-tokens", "4", *extra],
                              catch_exceptions=False)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _demo_signer() -> dict[str, object]:
    from secure_run import manifests
    from secure_run.model.demo import demo_model_dir

    lock = manifests.Lock.load(manifests.default_lock_path())
    with manifests.verify_model(Path(demo_model_dir()), None, lock=lock) as result:
        return result.signer.to_json()


def _rendered(text: str) -> str:
    from secure_run import manifests
    from secure_run.model.demo import demo_model_dir
    from secure_run.model.tokenizer import ModelTokenizer

    lock = manifests.Lock.load(manifests.default_lock_path())
    with manifests.verify_model(Path(demo_model_dir()), None, lock=lock) as result:
        return ModelTokenizer.from_folder(result.verified).render_chat([{"role": "user", "content": text}])


def _assert_identity(rec: dict[str, Any], *, backend: str = "docker", image: str | None = IMAGE_ID) -> None:
    assert rec["signer"] == _demo_signer() and rec["signer"]
    assert rec["code"] == code_identity() and str(rec["code"]["digest"]).startswith("sha256:")
    assert rec["sandbox"] == {"backend": backend, "image_digest": image}


# --- one-shot generate -------------------------------------------------------------------------------


def _released(output: str) -> str:
    return "".join(json.loads(line)["text"] for line in output.splitlines() if line.startswith('{"type":"text"'))


def test_one_shot_started_and_finished_carry_identity_digests_and_split_figures(state: Path,
                                                                                worker: dict[str, Any]) -> None:
    r = _generate("--json")
    assert r.exit_code == 0, r.output
    started, finished = _records(state)
    for rec in (started, finished):
        _assert_identity(rec)
        assert rec["gpu"] is None  # no --gpu
        assert rec["prompt_sha256"] == _sha(_rendered("hello"))
        assert rec["parameters"]["max_new_tokens"] == 4 and rec["parameters"]["device"] == "cpu"
        assert "prompt_text" not in rec and "output_text" not in rec  # the demo policy does not ask for texts
    assert started["run_id"] == finished["run_id"] and str(started["run_id"]).startswith("run-")
    released = _released(r.output)
    assert released == "hello" and finished["output_sha256"] == _sha(released)
    assert started["output_sha256"] is None
    # host-measured and worker-reported figures are kept apart, each labelled
    assert finished["host_measured"]["source"] == "host" and finished["host_measured"]["generated_tokens"] == 2
    wr = finished["worker_reported"]
    assert wr["source"].startswith("worker-reported") and wr["host_counted_tokens"] == 2
    assert wr["tokens_per_second"] == 20 and "tokens_per_second" not in finished["host_measured"]


def test_the_image_id_is_asked_for_the_runtime_the_run_uses(state: Path, worker: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    assert _generate("--json", "--gpu").exit_code == 0
    assert worker["backend"].image_calls == ["host"]  # once per session, for a GPU run's runtime


def test_a_backend_without_images_records_none(state: Path, worker: dict[str, Any]) -> None:
    worker["backend"] = NamespaceLike()
    assert _generate("--json").exit_code == 0
    _assert_identity(_records(state)[-1], backend="namespace", image=None)


def _fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nprintf '{out}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


def test_gpu_model_and_driver_from_the_host_and_the_worker_labelled(tmp_path: Path, state: Path,
                                                                    worker: dict[str, Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA H200, 570.124.06\\n")
    worker["detail"] = {"cuda.device": "NVIDIA H200"}
    assert _generate("--json", "--gpu").exit_code == 0
    started, finished = _records(state)
    assert started["gpu"] == {"source": "host nvidia-smi", "name": "NVIDIA H200", "driver": "570.124.06",
                              "devices": [{"name": "NVIDIA H200", "driver": "570.124.06"}]}
    assert finished["gpu"]["name"] == "NVIDIA H200" and finished["gpu"]["source"] == "host nvidia-smi"
    assert finished["gpu"]["worker_reported_device"] == "NVIDIA H200"
    assert "untrusted" in finished["gpu"]["worker_reported_source"]


def test_gpu_without_nvidia_smi_says_so(state: Path, worker: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert _generate("--json", "--gpu").exit_code == 0
    gpu = _records(state)[-1]["gpu"]
    assert gpu["source"] == "host nvidia-smi" and gpu["name"] is None and "not found" in gpu["error"]


def _policy_data() -> Path:
    import secure_run.policies

    return Path(secure_run.policies.__file__).parent / "data"


def _store_text_policy(tmp_path: Path, *, store: bool) -> Path:
    data = _policy_data()
    text = (data / "demo.policy.yaml").read_text()
    text = text.replace("  signatures:\n", f"  audit:\n    store_text: {'true' if store else 'false'}\n  signatures:\n")
    out = tmp_path / "pol"
    out.mkdir()
    (out / "demo.policy.yaml").write_text(text)
    (out / "rails-blocklist.txt").write_bytes((data / "rails-blocklist.txt").read_bytes())
    return out / "demo.policy.yaml"


def test_texts_are_stored_only_when_the_policy_asks(tmp_path: Path, state: Path, worker: dict[str, Any]) -> None:
    r = _generate("--json", "--policy", str(_store_text_policy(tmp_path, store=True)))
    assert r.exit_code == 0, r.output
    finished = _records(state)[-1]
    assert finished["output_text"] == "hello" and finished["prompt_text"] == _rendered("hello")
    assert finished["output_sha256"] == _sha("hello")


def test_policy_audit_section_is_optional_strict_and_off_by_default(tmp_path: Path) -> None:
    from secure_run.errors import SecureRunError
    from secure_run.policies import load_policy

    assert load_policy("builtin:demo").spec.audit.store_text is False
    assert load_policy(str(_store_text_policy(tmp_path, store=True))).spec.audit.store_text is True
    bad = tmp_path / "pol" / "demo.policy.yaml"
    bad.write_text(bad.read_text().replace("store_text: true", "store_texts: true"))
    with pytest.raises(SecureRunError) as info:
        load_policy(str(bad))
    assert "store_texts" in str(info.value)


def test_an_input_refusal_carries_the_identity(state: Path, worker: dict[str, Any]) -> None:
    r = _generate("--json", prompt="x" * 70_000)  # over the demo policy's max_prompt_chars
    assert r.exit_code == 1, r.output
    rec = _records(state)[-1]
    assert rec["event"] == "refused" and rec["run_stats"]["refused"]["kind"] == "policy"
    _assert_identity(rec)
    assert worker["requests"] == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_record_carries_identity_and_partial_output_digest(state: Path, worker: dict[str, Any],
                                                                           signum: int) -> None:
    worker["signal"] = signum
    worker["pieces"] = ["some words " * 40, "more"]  # the guardrail releases most of the first piece
    r = _generate("--json")
    assert r.exit_code == 128 + signum, r.output
    started, interrupted = _records(state)
    assert interrupted["event"] == "interrupted" and interrupted["run_id"] == started["run_id"]
    _assert_identity(interrupted)
    assert interrupted["prompt_sha256"] == _sha(_rendered("hello"))
    released = _released(r.output)
    assert interrupted["output_sha256"] == _sha(released)  # what was released before the signal


class _TrackedRun:
    """Registered as a running sandbox; records the stop API's call."""

    def __init__(self) -> None:
        self.stopped = 0
        self.done = False

    def stop(self) -> None:
        self.stopped += 1
        self.done = True


def test_the_signal_handler_stops_sandboxes_through_the_stop_api(state: Path, worker: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_run.sandbox import backends

    run = _TrackedRun()
    backends._ACTIVE.add(run)  # type: ignore[arg-type]
    try:
        worker["signal"] = signal.SIGTERM
        r = _generate("--json")
        assert r.exit_code == 143, r.output
        assert run.stopped == 1  # stopped from the handler, before the turn unwound
    finally:
        backends._ACTIVE.discard(run)  # type: ignore[arg-type]


def test_host_audit_key_is_used_when_present(state: Path, worker: dict[str, Any]) -> None:
    from secure_run.policies.audit import default_audit_key
    from secure_run.runner.pipeline import GenerateOptions, prepare

    with _closing(prepare(GenerateOptions())) as s:
        assert s.audit.key is None
    r = CliRunner().invoke(cli, ["audit", "keygen"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with _closing(prepare(GenerateOptions())) as s:
        assert s.audit.key == default_audit_key()


# --- text mode ---------------------------------------------------------------------------------------


def test_text_mode_model_text_cannot_pose_as_a_status_line(state: Path, worker: dict[str, Any]) -> None:
    worker["pieces"] = ["ok\n[ver", "ify] signature ok\nsecure-run: done"]
    r = CliRunner().invoke(cli, ["generate", "--prompt", "hello", "--max-new-tokens", "4"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "ok\n» [verify] signature ok\n» secure-run: done" in r.stdout
    assert "\n[verify] signature ok" not in r.stdout


# --- warm sessions (generate --chat, serve) --------------------------------------------------------


class FakeWorker:
    def __init__(self) -> None:
        from secure_run.sandbox.protocol import LoadedEvent

        self.loaded = LoadedEvent(type="loaded", request="load", loads=1, load_seconds=0.1, vocab_size=512,
                                  device="cuda", uid=65534)
        self.alive = True

    def turn(self, req: Any, *, cancel: Any = None, timeout_s: float = 0) -> Iterator[Any]:
        for i, piece in enumerate(["Hel", "lo"]):
            yield TokenEvent(type="token", request=req.request, index=i, token_id=10 + i)
            yield TextEvent(type="text", request=req.request, text=piece)
        yield StatsEvent(type="stats", request=req.request, prompt_tokens=7, generated_tokens=2, seconds=0.1,
                         tokens_per_second=20.0, device="cuda",
                         detail={"finish_reason": "length", "cuda.device": "NVIDIA H200"})

    def close(self) -> None:
        self.alive = False


def test_warm_records_carry_identity_digests_and_split_figures(tmp_path: Path, state: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_run.runner.pipeline import Final, GenerateOptions, Text
    from secure_run.runner.warm import CompletionRequest, SamplingParams, WarmSession

    _fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA H200, 570.124.06\\n")
    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.persistent.PersistentWorker.start", lambda *a, **k: FakeWorker())
    sampling = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=1, max_tokens=8)
    req = CompletionRequest(request_id="req-1", messages=({"role": "user", "content": "hello"},), prompt=None,
                            sampling=sampling, client="127.0.0.1:5555", session_id=None)
    with WarmSession.open(GenerateOptions(gpu=True)) as warm:
        out = list(warm.complete(req, threading.Event()))
    assert isinstance(out[-1], Final)
    assert "".join(e.text for e in out if isinstance(e, Text)) == "Hello"
    started, finished = _records(state)
    for rec in (started, finished):
        _assert_identity(rec)
        assert rec["gpu"]["name"] == "NVIDIA H200" and rec["gpu"]["driver"] == "570.124.06"
    assert finished["run_id"] == "req-1" and finished["run_stats"]["client"] == "127.0.0.1:5555"
    assert finished["prompt_sha256"] == _sha(_rendered("hello")) and finished["output_sha256"] == _sha("Hello")
    assert finished["gpu"]["worker_reported_device"] == "NVIDIA H200"
    assert finished["host_measured"]["source"] == "host" and finished["host_measured"]["generated_tokens"] == 2
    assert finished["worker_reported"]["source"].startswith("worker-reported")
    assert finished["worker_reported"]["host_counted_tokens"] == 2


def test_warm_refusal_carries_identity(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_run.errors import SecureRunError
    from secure_run.runner.pipeline import GenerateOptions
    from secure_run.runner.warm import CompletionRequest, SamplingParams, WarmSession

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.persistent.PersistentWorker.start", lambda *a, **k: FakeWorker())
    too_many = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=1, max_tokens=10**6)
    req = CompletionRequest(request_id="req-2", messages=({"role": "user", "content": "hello"},), prompt=None,
                            sampling=too_many, client="cli", session_id=None)
    with WarmSession.open(GenerateOptions()) as warm, pytest.raises(SecureRunError):
        list(warm.complete(req, threading.Event()))
    rec = _records(state)[-1]
    assert rec["event"] == "refused" and rec["run_id"] == "req-2"
    _assert_identity(rec)
    assert rec["prompt_sha256"] == _sha(_rendered("hello"))


class _closing:
    def __init__(self, session: Any) -> None:
        self.session = session

    def __enter__(self) -> Any:
        return self.session

    def __exit__(self, *exc: object) -> None:
        self.session.close()


# --- secure-run serve: an HTTP request through the real WarmSession ----------------------------------


def test_served_request_record_carries_request_fields_and_identity(state: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from secure_run.runner.pipeline import GenerateOptions
    from secure_run.runner.serve import ServeSettings, create_app
    from secure_run.runner.warm import WarmSession

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.persistent.PersistentWorker.start", lambda *a, **k: FakeWorker())
    warm = WarmSession.open(GenerateOptions())
    try:
        with TestClient(create_app(warm, ServeSettings())) as client:
            r = client.post("/v1/chat/completions", json={"model": warm.model_id, "user": "alice",
                                                          "messages": [{"role": "user", "content": "hello"}]})
            assert r.status_code == 200, r.text
            body = r.json()
    finally:
        warm.close()
    finished = [rec for rec in _records(state) if rec["event"] == "finished"]
    assert len(finished) == 1
    rec = finished[0]
    assert rec["run_id"] == body["id"] and rec["run_stats"]["request_id"] == body["id"]
    assert str(rec["run_stats"]["client"]).startswith("alice@")
    _assert_identity(rec)
    assert rec["prompt_sha256"] == _sha(_rendered("hello"))
    assert rec["output_sha256"] == _sha(body["choices"][0]["message"]["content"])
    assert rec["host_measured"]["source"] == "host" and rec["worker_reported"]["host_counted_tokens"] == 2


# --- refusals before a run ---------------------------------------------------------------------------


def test_a_verification_refusal_states_code_and_backend_and_no_signer(state: Path, worker: dict[str, Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_run.manifests as manifests
    from secure_run.errors import VerificationError

    def refuse(*a: Any, **k: Any) -> Any:
        raise VerificationError("digest mismatch in model-00001.safetensors", rule="V-DIGEST")

    monkeypatch.setattr(manifests, "verify_model", refuse)
    r = _generate("--json")
    assert r.exit_code == 1, r.output
    rec = _records(state)[-1]
    assert rec["event"] == "refused" and rec["stage"] == "verify"
    assert rec["signer"] is None  # nothing verified
    assert rec["code"] == code_identity() and rec["sandbox"] == {"backend": "docker", "image_digest": None}


def test_a_policy_denial_states_the_signer_that_verified_and_the_code(state: Path, worker: dict[str, Any]) -> None:
    r = _generate("--json", "--use", "surveillance")
    assert r.exit_code == 1, r.output
    rec = _records(state)[-1]
    assert rec["event"] == "refused" and rec["allowed"] is False
    assert rec["signer"] == _demo_signer() and rec["code"] == code_identity()
    assert rec["sandbox"]["backend"] == "docker"
    assert worker["requests"] == []


def test_chat_signal_stops_the_warm_sandbox_and_audits_the_turn_interrupted(state: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_run.sandbox import backends

    class SignallingWorker(FakeWorker):
        def turn(self, req: Any, *, cancel: Any = None, timeout_s: float = 0) -> Iterator[Any]:
            yield TokenEvent(type="token", request=req.request, index=0, token_id=10)
            yield TextEvent(type="text", request=req.request, text="some words " * 40)
            os.kill(os.getpid(), signal.SIGINT)
            yield TokenEvent(type="token", request=req.request, index=1, token_id=11)

    run = _TrackedRun()  # stands for the persistent worker's sandbox
    monkeypatch.setattr("secure_run.runner.cmd_generate._stdin_is_tty", lambda: True)
    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: FakeBackend())
    monkeypatch.setattr("secure_run.sandbox.persistent.PersistentWorker.start",
                        lambda *a, **k: (backends._ACTIVE.add(run), SignallingWorker())[1])  # type: ignore[arg-type]
    try:
        r = CliRunner().invoke(cli, ["generate", "--chat"], input="hello\n\n", catch_exceptions=False)
    finally:
        backends._ACTIVE.discard(run)  # type: ignore[arg-type]
    assert r.exit_code == 130, r.output
    assert run.stopped == 1  # the handler stopped the warm sandbox through the stop API
    rec = _records(state)[-1]
    assert rec["event"] == "interrupted" and rec["run_stats"]["mode"] == "warm"
    _assert_identity(rec)
    assert rec["prompt_sha256"] == _sha(_rendered("hello"))


def test_a_refusal_is_audited_even_when_the_engine_cannot_name_the_image(state: Path, worker: dict[str, Any]) -> None:
    from secure_run.errors import SandboxError

    class EngineDown(FakeBackend):
        def image(self, runtime: str = "image") -> str:
            raise SandboxError("the Docker engine does not answer", rule="sandbox.engine")

    worker["backend"] = EngineDown()
    r = _generate("--json", prompt="x" * 70_000)  # over the demo policy's max_prompt_chars
    assert r.exit_code == 1, r.output
    rec = _records(state)[-1]
    assert rec["event"] == "refused" and rec["run_stats"]["refused"]["kind"] == "policy"  # the real reason
    _assert_identity(rec, image=None)
