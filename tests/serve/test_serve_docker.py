"""A real ``secure-run serve`` (the embedded demo, one warm worker in the Docker sandbox) on
loopback, driven by the official ``openai`` client (marker ``docker``; required in CI).

One server process for the whole module (the gate and the worker start once), started with an
API key, ``--max-concurrent 1 --max-queue 0`` (a second request while one runs gets 429), a 1 s
shutdown grace, and the demo policy with one extra output-blocklist phrase that the greedy demo
writes for PROMPT_BLOCKED after a few tokens (the guardrail block mid-stream). Every case checks
the request's one audit record; the last test sends SIGTERM during a request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from secure_run.runner.serve import parse_metrics

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CLI = [sys.executable, "-m", "secure_run.runner.cli"]
KEY = "serve-test-key-" + "0123456789abcdef"
MODEL = "superlinear-demo"
#: the greedy demo's reply to this prompt (a fixed, signed model) is " shipv>\ufffd the \ufffdt writor came
#: ... boatore\ufffdmp with haveoken thele...": "haveoken" (at character 146, past the ~60 characters the
#: output guardrail holds back) is added to the policy's blocklist, so its stream is blocked mid-way
PROMPT_BLOCKED = "Tell me about secure model loading."
BLOCKED_WORD = "haveoken"


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    audit: Path
    stderr: list[str]

    def client(self, key: str = KEY) -> openai.OpenAI:  # a server without a key ignores it
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        r = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        return parse_metrics(r.text)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def record(self, request_id: str, timeout: float = 30) -> dict[str, Any]:
        """The one audit record of ``request_id`` (waits for it: a cancelled request is audited when it stops)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records() if r.get("run_id") == request_id]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"{len(found)} audit records for {request_id}"
                assert found[0]["run_stats"]["request_id"] == request_id
                assert found[0]["run_stats"]["client"].startswith("127.0.0.1:")
                # audited before its slot is released: wait for that too (the next test may need it)
                while self.proc.poll() is None and time.monotonic() < deadline + 10:
                    if not httpx.get(self.url + "/health").json()["in_flight"]:
                        break
                    time.sleep(0.05)
                return found[0]
            time.sleep(0.1)


def _policy(tmp: Path) -> Path:
    from secure_run.policies import default_policy_path

    src = default_policy_path("demo")
    rails = (src.parent / "rails-blocklist.txt").read_bytes()
    ours = rails + f"\n# test: a phrase the greedy demo writes\n{BLOCKED_WORD}\n".encode()
    text = src.read_text().replace(hashlib.sha256(rails).hexdigest(), hashlib.sha256(ours).hexdigest())
    text = text.replace("blocklist: rails-blocklist.txt", "blocklist: serve-rails.txt")
    assert text.count("serve-rails.txt") == 2
    (tmp / "serve-rails.txt").write_bytes(ours)
    dst = tmp / "serve.policy.yaml"
    dst.write_text(text)
    return dst


def _start(tmp: Path, *args: str) -> Served:
    """``secure-run serve --port 0 ARGS`` with its own state folder; returns once it listens."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state")}
    proc = subprocess.Popen([*CLI, "serve", "--port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    stderr: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                url.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not (ready.wait(300) and url):
        proc.kill()
        raise AssertionError("serve did not start:\n" + "".join(stderr))
    return Served(proc, url[0], tmp / "state" / "secure-run" / "audit.jsonl", stderr)


def _stop(srv: Served) -> None:
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    key = tmp / "api-key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    srv = _start(tmp, "--policy", str(_policy(tmp)), "--api-key-file", str(key), "--max-concurrent", "1",
                 "--max-queue", "0", "--shutdown-grace", "1")
    try:
        yield srv
    finally:
        _stop(srv)


def _chat(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_non_streaming_chat_is_served_and_audited(served: Served) -> None:
    r = served.client().chat.completions.create(model=MODEL, messages=_chat("hello"), max_tokens=6,
                                                temperature=0.0, seed=1)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 6
    rec = served.record(r.id)
    assert rec["event"] == "finished" and rec["run_stats"]["completion_tokens"] == r.usage.completion_tokens
    assert rec["run_stats"]["prompt_tokens"] == r.usage.prompt_tokens
    assert rec["parameters"]["temperature"] == 0.0 and rec["parameters"]["max_tokens"] == 6


def test_streaming_chat_matches_the_non_streamed_answer(served: Served) -> None:
    client = served.client()
    whole = client.chat.completions.create(model=MODEL, messages=_chat("stream me"), max_tokens=8, temperature=0.0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=_chat("stream me"), max_tokens=8,
                                                 temperature=0.0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same tokens both ways
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    rec = served.record(chunks[0].id)
    assert rec["run_stats"]["finish_reason"] == whole.choices[0].finish_reason


def test_a_conversation_kept_warm_prefills_only_the_new_turn(served: Served) -> None:
    client = served.client()
    history = _chat("first turn of a kept conversation")
    one = client.chat.completions.create(model=MODEL, messages=history, max_tokens=4, temperature=0.0,
                                         extra_body={"session_id": "serve-conv-1"})
    history += [{"role": "assistant", "content": one.choices[0].message.content}, *_chat("and the second turn")]
    two = client.chat.completions.create(model=MODEL, messages=history, max_tokens=4, temperature=0.0,
                                         extra_body={"session_id": "serve-conv-1"})
    first, second = served.record(one.id)["run_stats"], served.record(two.id)["run_stats"]
    assert first["session_id"] == second["session_id"] == "serve-conv-1"
    assert second["reused_tokens"] > 0 and second["prefilled_tokens"] < second["prompt_tokens"]


def test_stop_strings_cut_the_completion(served: Served) -> None:
    client = served.client()
    full = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=10, temperature=0.0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert len(text) >= 4 and stop.strip(), text
    cut = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=10, temperature=0.0,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert served.record(cut.id)["run_stats"]["finish_reason"] == "stop"


def test_requests_without_the_key_get_401_and_reach_nothing(served: Served) -> None:
    before = len(served.records())
    with pytest.raises(openai.AuthenticationError) as err:
        served.client(key="not-the-key").chat.completions.create(model=MODEL, messages=_chat("hi"))
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "serve.unauthorized"
    r = httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert len(served.records()) == before  # nothing was run, so nothing to audit


def test_guardrail_block_mid_stream(served: Served) -> None:
    chunks = list(served.client().chat.completions.create(model=MODEL, messages=_chat(PROMPT_BLOCKED),
                                                          max_tokens=160, temperature=0.0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert BLOCKED_WORD not in text
    assert text.strip(), "nothing was released before the block: not mid-stream"
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    rec = served.record(chunks[0].id)
    assert rec["run_stats"]["finish_reason"] == "blocked" and rec["run_stats"]["output_blocked"] is True
    assert len(text) >= 20 and rec["run_stats"]["completion_tokens"] < 160  # released a good part first
    assert any(e["stage"] == "output" for e in rec["guardrail_events"])


def test_a_request_while_the_worker_is_busy_gets_429(served: Served) -> None:
    client = served.client()
    stream = client.completions.create(model=MODEL, prompt="a long one", max_tokens=300, temperature=0.0,
                                       stream=True)
    first = next(stream)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=MODEL, prompt="me too", max_tokens=2)
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "serve.queue-full"
    stream.close()  # the client goes away: the running request is cancelled and audited
    rec = served.record(first.id)
    assert rec["run_stats"]["finish_reason"] == "cancelled" and rec["run_stats"]["completion_tokens"] < 300
    assert served.metrics()["secure_run_queue_rejected_total"] == 1


def test_client_disconnect_mid_stream_cancels_the_request(served: Served) -> None:
    stream = served.client().chat.completions.create(model=MODEL, messages=_chat("go on and on"), max_tokens=300,
                                                     temperature=0.0, stream=True)
    ids = {c.id for c, _ in zip(stream, range(3))}
    stream.close()
    t0 = time.monotonic()
    (rid,) = ids
    rec = served.record(rid)
    assert rec["run_stats"]["finish_reason"] == "cancelled"
    assert rec["run_stats"]["completion_tokens"] < 300
    assert time.monotonic() - t0 < 30
    # the worker is free again at once
    r = served.client().completions.create(model=MODEL, prompt="after", max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_the_worker_was_loaded_once_for_all_requests(served: Served) -> None:
    m = served.metrics()
    assert m["secure_run_worker_loads_total"] == 1
    finished = [x for x in served.records() if x.get("run_id")]
    assert m["secure_run_worker_requests_total"] == len(finished) >= 8
    started = [x for x in served.records() if x["event"] == "started"]
    assert len(started) == 1 and started[0]["run_stats"]["worker_loads"] == 1
    assert {x["run_stats"].get("worker_loads") for x in finished if x["event"] == "finished"} <= {1, None}


def test_sigterm_during_a_request_cancels_it_audits_it_and_stops_the_worker(served: Served) -> None:
    stream = served.client().completions.create(model=MODEL, prompt="until shutdown", max_tokens=400,
                                                temperature=0.0, stream=True)
    first = next(stream)
    assert len(_containers_of(served.proc.pid)) == 1  # the one warm worker
    served.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError) as err:  # after the 1 s grace: an error event, then the end
        for _ in stream:
            pass
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "serve.cancelled"
    rc = served.proc.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM, "".join(served.stderr)  # like generate: 143, the run audited
    rec = served.record(first.id, timeout=1)
    assert rec["run_stats"]["finish_reason"] == "cancelled" and rec["run_stats"]["completion_tokens"] < 400
    assert "Traceback" not in "".join(served.stderr)
    assert not _containers_of(served.proc.pid)


def test_several_requests_in_flight_are_each_answered_correctly(tmp_path: Path) -> None:
    """A second server without a key and with a queue: 4 concurrent greedy requests get exactly the
    answers they get one at a time, each with its own audit record, from the same single worker."""
    srv = _start(tmp_path, "--max-queue", "8")
    try:
        client = srv.client(key="unused")
        prompts = [f"question number {i}" for i in range(4)]

        def ask(p: str) -> Any:
            return client.chat.completions.create(model=MODEL, messages=_chat(p), max_tokens=8, temperature=0.0)

        alone = [ask(p).choices[0].message.content for p in prompts]
        results: dict[str, Any] = {}
        threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, ask(p))) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [results[p].choices[0].message.content for p in prompts] == alone
        for p in prompts:
            assert srv.record(results[p].id)["run_stats"]["finish_reason"] in ("length", "stop")
        assert srv.metrics()["secure_run_worker_loads_total"] == 1
    finally:
        _stop(srv)


def _containers_of(pid: int) -> list[str]:
    """Running sandbox containers created by process ``pid`` (the owner label is boot-id:pid:start)."""
    out = subprocess.run(["docker", "ps", "--filter", "label=org.secure-run.sandbox",
                          "--format", '{{.ID}} {{.Label "org.secure-run.owner"}}'],
                         capture_output=True, text=True, check=True)
    found = [line.split() for line in out.stdout.splitlines() if line.strip()]
    return [f[0] for f in found if len(f) == 2 and f[1].split(":")[1:2] == [str(pid)]]
