"""The HTTP layer of ``secure-run serve`` (runner/serve.py) over a scripted session, with the
official ``openai`` client and raw httpx against uvicorn on loopback. Fast; no sandbox.

The same behaviours against the real warm worker in Docker are in test_serve_docker.py.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from serve_fakes import FakeSession, ThreadServer

from secure_run.runner.serve import MAX_BODY_BYTES, ServeSettings, create_app, parse_metrics

KEY = "k" * 20 + "-test-key"


def _settings(**kw: Any) -> ServeSettings:
    return ServeSettings(**kw)  # the real runner.warm.CompletionRequest is built


@pytest.fixture
def fake() -> FakeSession:
    return FakeSession()


@pytest.fixture
def server(fake: FakeSession) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(fake, _settings())) as srv:
        yield srv


def _client(srv: ThreadServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=10)


def _chat(text: str = "hello") -> list[Any]:
    return [{"role": "user", "content": text}]


def test_non_streaming_chat_uses_the_verified_defaults_and_passes_id_and_client(
        server: ThreadServer, fake: FakeSession) -> None:
    r = _client(server).chat.completions.create(model="fake-model", messages=_chat(), user="alice")
    assert r.choices[0].message.content == "alpha beta gamma delta epsilon "
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (7, 5)
    req = fake.requests[-1]
    assert req.request_id == r.id and r.id.startswith("chatcmpl-")
    assert req.sampling == fake.generation_defaults  # nothing given: all from generation_config
    assert req.client.startswith("alice@127.0.0.1:")
    assert req.messages == ({"role": "user", "content": "hello"},) and req.prompt is None
    assert [rec["request_id"] for rec in fake.records] == [r.id]


def test_the_audited_client_cannot_be_spoofed_with_forwarding_headers(server: ThreadServer, fake: FakeSession) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": "fake-model", "prompt": "p", "max_tokens": 1},
                   headers={"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9"})
    assert r.status_code == 200
    assert fake.requests[-1].client.startswith("127.0.0.1:")


def test_sampling_fields_reach_the_session(server: ThreadServer, fake: FakeSession) -> None:
    _client(server).chat.completions.create(model="fake-model", messages=_chat(), temperature=0.0, top_p=0.5,
                                            seed=42, max_tokens=3, stop=["x"], extra_body={"top_k": 4})
    s = fake.requests[-1].sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.max_tokens, s.stop) == (0.0, 0.5, 4, 42, 3, ("x",))


def test_session_id_extension_reaches_the_session(server: ThreadServer, fake: FakeSession) -> None:
    client = _client(server)
    client.chat.completions.create(model="fake-model", messages=_chat(), extra_body={"session_id": "conv-1"})
    assert fake.requests[-1].session_id == "conv-1"
    client.chat.completions.create(model="fake-model", messages=_chat())
    assert fake.requests[-1].session_id is None
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="fake-model", messages=_chat(), extra_body={"session_id": "../x"})
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "session_id"


def test_streaming_chat_sends_role_then_deltas_then_finish(server: ThreadServer, fake: FakeSession) -> None:
    stream = _client(server).chat.completions.create(model="fake-model", messages=_chat(), stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "alpha beta gamma delta epsilon "
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert len({c.id for c in chunks}) == 1 and fake.records[-1]["request_id"] == chunks[0].id


def test_stop_strings_end_the_completion(server: ThreadServer) -> None:
    client = _client(server)
    r = client.chat.completions.create(model="fake-model", messages=_chat(), stop="mma")
    assert r.choices[0].message.content == "alpha beta ga" and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="fake-model", prompt="p", stop=["delta"], stream=True)
    assert "".join(c.choices[0].text for c in stream) == "alpha beta gamma "


def test_plain_completions(server: ThreadServer, fake: FakeSession) -> None:
    r = _client(server).completions.create(model="fake-model", prompt="once upon", max_tokens=2)
    assert r.object == "text_completion" and r.choices[0].text == "alpha beta "
    assert r.id.startswith("cmpl-") and fake.requests[-1].prompt == "once upon"
    assert fake.requests[-1].messages is None


def test_a_guardrail_block_mid_stream_is_content_filter(fake: FakeSession) -> None:
    fake.words = ["fine ", "BLOCKME ", "never "]
    with ThreadServer(create_app(fake, _settings())) as srv:
        chunks = list(_client(srv).chat.completions.create(model="fake-model", messages=_chat(), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "fine " and chunks[-1].choices[0].finish_reason == "content_filter"
    assert fake.records[-1]["finish_reason"] == "blocked"


def test_refusal_is_an_openai_error_with_the_rule_id(server: ThreadServer, fake: FakeSession) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="fake-model", messages=_chat("a forbidden prompt"))
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "G3" and body["type"] == "policy_refused"
    assert "rephrase" in body["message"]
    assert fake.records[-1]["rule"] == "G3"
    # the stream form refuses the same way, before any event is sent
    with pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(model="fake-model", messages=_chat("forbidden"), stream=True)


def test_bad_requests_get_openai_error_bodies(server: ThreadServer) -> None:
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, json={"model": "fake-model", "messages": _chat(), "temperature": 5})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "temperature" and r.json()["error"]["code"] == "serve.invalid-request"
    r = httpx.post(url, json={"model": "other", "messages": _chat()})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url, json={"model": "fake-model", "messages": _chat(), "stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = httpx.post(url, json={"model": "fake-model", "messages": _chat(), "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(url, content=b"x" * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "serve.body-too-large"
    chunked = httpx.post(url, content=iter([b"x" * 65536] * (MAX_BODY_BYTES // 65536 + 1)),
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "serve.body-too-large"
    r = httpx.get(server.url + "/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_models_health_and_metrics(server: ThreadServer) -> None:
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    _client(server).completions.create(model="fake-model", prompt="p")
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m = parse_metrics(r.text)
    assert m["secure_run_worker_loads_total"] == 1.0 and m["secure_run_worker_requests_total"] == 1.0
    assert 'secure_run_http_requests_total{endpoint="/v1/completions",status="200"} 1' in r.text


def test_api_key_is_required_everywhere_but_health(fake: FakeSession) -> None:
    with ThreadServer(create_app(fake, _settings(api_key=KEY))) as srv:
        with pytest.raises(openai.AuthenticationError) as err:
            _client(srv, key="wrong-key-wrong-key").chat.completions.create(model="fake-model", messages=_chat())
        assert isinstance(err.value.body, dict) and err.value.body["code"] == "serve.unauthorized"
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": KEY}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        r = _client(srv, key=KEY).chat.completions.create(model="fake-model", messages=_chat())
        assert r.choices[0].message.content
    assert len(fake.records) == 1  # the refused requests never reached the session


def test_a_client_sending_requests_one_after_another_is_never_refused(
        fake: FakeSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one slot and no queue, the next request sent on receiving an answer must not get 429.

    The pool thread is held up right after it hands over the end of the stream (as a busy host's
    scheduler can do; CI saw it): the slot must already be free, released when the turn was audited
    (its Final), not only when the pool thread gets round to it."""
    import secure_run.runner.serve as serve

    real = serve._Run._deliver

    def deliver_then_stall(run: Any, item: object) -> None:
        real(run, item)
        if item is serve._END:
            time.sleep(0.4)

    monkeypatch.setattr(serve._Run, "_deliver", deliver_then_stall)
    with ThreadServer(create_app(fake, _settings(max_concurrent=1, max_queue=0))) as srv:
        client = _client(srv)
        for i in range(2):
            r = client.chat.completions.create(model="fake-model", messages=_chat(f"one {i}"), max_tokens=2)
            assert r.choices[0].message.content
            chunks = list(client.chat.completions.create(model="fake-model", messages=_chat(f"two {i}"),
                                                         max_tokens=2, stream=True))
            assert chunks
        time.sleep(0.5)
        assert httpx.get(srv.url + "/health").json()["in_flight"] == 0
    assert len(fake.records) == 4


def test_queue_full_is_429_and_frees_up_afterwards(fake: FakeSession) -> None:
    fake.delay = 0.2
    with ThreadServer(create_app(fake, _settings(max_concurrent=1, max_queue=1))) as srv:
        client = _client(srv)
        results: list[Any] = []
        threads = [threading.Thread(target=lambda: results.append(
            client.chat.completions.create(model="fake-model", messages=_chat(), max_tokens=3))) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while httpx.get(srv.url + "/health").json()["in_flight"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="fake-model", messages=_chat())
        assert isinstance(err.value.body, dict) and err.value.body["code"] == "serve.queue-full"
        for t in threads:
            t.join()
        assert len(results) == 2
        assert client.chat.completions.create(model="fake-model", messages=_chat(), max_tokens=1)
        assert parse_metrics(httpx.get(srv.url + "/metrics").text)["secure_run_queue_rejected_total"] == 1
    assert len(fake.records) == 3  # the 429 never reached the session


def test_client_disconnect_mid_stream_cancels_the_request(fake: FakeSession) -> None:
    fake.delay = 0.2
    fake.words = [f"w{i} " for i in range(50)]
    with ThreadServer(create_app(fake, _settings())) as srv:
        stream = _client(srv).chat.completions.create(model="fake-model", messages=_chat(), stream=True,
                                                      max_tokens=50)
        got = [next(stream), next(stream)]
        assert got[1].choices[0].delta.content == "w0 "
        stream.close()  # the client goes away
        deadline = time.monotonic() + 5
        while not fake.records:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.02)
        assert fake.records[0]["finish_reason"] == "cancelled" and fake.records[0]["completion_tokens"] < 10
        assert parse_metrics(httpx.get(srv.url + "/metrics").text)["secure_run_client_cancelled_total"] == 1
        while httpx.get(srv.url + "/health").json()["in_flight"] != 0:  # the slot frees when the run ends
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_non_streamed_request_is_cancelled_when_the_client_goes_away(fake: FakeSession) -> None:
    fake.delay = 0.2
    fake.words = [f"w{i} " for i in range(50)]
    with ThreadServer(create_app(fake, _settings())) as srv:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json={"model": "fake-model", "prompt": "p", "max_tokens": 50},
                       timeout=0.6)
        deadline = time.monotonic() + 5
        while not fake.records:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.02)
    assert fake.records[0]["finish_reason"] == "cancelled" and fake.records[0]["completion_tokens"] < 10


def test_a_queued_request_whose_client_leaves_is_cancelled_and_audited(fake: FakeSession) -> None:
    fake.delay = 0.2
    fake.words = [f"w{i} " for i in range(10)]
    with ThreadServer(create_app(fake, _settings(max_concurrent=1, max_queue=4))) as srv:
        first = threading.Thread(target=lambda: httpx.post(
            srv.url + "/v1/completions", json={"model": "fake-model", "prompt": "p", "max_tokens": 10}, timeout=10))
        first.start()
        assert fake.started.wait(5)
        with pytest.raises(httpx.TimeoutException):  # waits behind the first, then gives up
            httpx.post(srv.url + "/v1/completions", json={"model": "fake-model", "prompt": "q"}, timeout=0.5)
        first.join()
        deadline = time.monotonic() + 5
        while len(fake.records) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert [(r["finish_reason"], r["completion_tokens"]) for r in fake.records] == [("length", 10), ("cancelled", 0)]


def test_shutdown_cancels_in_flight_requests_audits_them_then_closes_the_session(fake: FakeSession) -> None:
    fake.delay = 0.2
    fake.words = [f"w{i} " for i in range(200)]
    srv = ThreadServer(create_app(fake, _settings()), grace_s=1.0)
    srv.__enter__()
    stream = _client(srv).chat.completions.create(model="fake-model", messages=_chat(), stream=True, max_tokens=200)
    next(stream)
    t0 = time.monotonic()
    srv.server.should_exit = True  # what SIGTERM does; the grace (1 s) is shorter than the request (40 s)
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "serve.cancelled"
    srv.thread.join(timeout=20)
    assert not srv.thread.is_alive() and time.monotonic() - t0 < 10
    assert [r["finish_reason"] for r in fake.records] == ["cancelled"]
    assert fake.closed


def test_shutdown_cancels_a_non_streamed_request_with_503(fake: FakeSession) -> None:
    fake.delay = 0.2
    fake.words = [f"w{i} " for i in range(200)]
    srv = ThreadServer(create_app(fake, _settings()), grace_s=0.5)
    srv.__enter__()
    result: list[Any] = []

    def ask() -> None:
        try:
            _client(srv).completions.create(model="fake-model", prompt="p", max_tokens=200)
        except openai.APIStatusError as err:
            result.append(err)

    t = threading.Thread(target=ask)
    t.start()
    assert fake.started.wait(5)
    srv.server.should_exit = True
    t.join(timeout=20)
    srv.thread.join(timeout=20)
    assert result and result[0].status_code == 503
    assert isinstance(result[0].body, dict) and result[0].body["code"] == "serve.cancelled"
    assert [r["finish_reason"] for r in fake.records] == ["cancelled"] and fake.closed


def test_shutdown_lets_a_request_finish_within_the_grace(fake: FakeSession) -> None:
    fake.delay = 0.2
    srv = ThreadServer(create_app(fake, _settings()), grace_s=5.0)
    srv.__enter__()
    stream = _client(srv).chat.completions.create(model="fake-model", messages=_chat(), stream=True, max_tokens=5)
    next(stream)
    srv.server.should_exit = True
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    srv.thread.join(timeout=20)
    assert text == "alpha beta gamma delta epsilon "
    assert [r["finish_reason"] for r in fake.records] == ["length"] and fake.closed


# --- the command's checks -------------------------------------------------------------------------


def _cli(*args: str) -> Any:
    from secure_run.runner.cli import cli

    return CliRunner().invoke(cli, ["serve", *args])


def test_binding_beyond_loopback_without_a_key_is_refused() -> None:
    result = _cli("--host", "0.0.0.0", "--port", "0")
    assert result.exit_code == 2, result.output
    assert "needs an API key" in result.output and "--api-key-file" in result.output


def test_api_key_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    from secure_run.errors import UsageError
    from secure_run.runner.cmd_serve import read_api_key

    f = tmp_path / "key"
    f.write_text(KEY + "\n")
    os.chmod(f, 0o644)
    with pytest.raises(UsageError) as err:
        read_api_key(f)
    assert err.value.rule == "serve.api-key" and "chmod 600" in (err.value.hint or "")
    os.chmod(f, 0o600)
    assert read_api_key(f) == KEY
    f.write_text("short")
    with pytest.raises(UsageError):
        read_api_key(f)
    assert _cli("--host", "0.0.0.0", "--api-key-file", str(tmp_path / "missing")).exit_code == 2


def test_loopback_and_unix_socket_need_no_key_and_the_socket_is_private(tmp_path: Path) -> None:
    from secure_run.errors import EnvironmentProblem
    from secure_run.runner.cmd_serve import bind, check_binding

    check_binding("127.0.0.1", None, None)
    check_binding("::1", None, None)
    check_binding("0.0.0.0", str(tmp_path / "s"), None)
    sock = bind("127.0.0.1", 0, str(tmp_path / "s"))
    try:
        assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o600
        with pytest.raises(EnvironmentProblem):  # never over an existing file
            bind("127.0.0.1", 0, str(tmp_path / "s"))
    finally:
        sock.close()


def test_serving_on_a_unix_socket(fake: FakeSession, tmp_path: Path) -> None:
    from secure_run.runner.cmd_serve import bind
    from secure_run.runner.serve import server

    path = tmp_path / "serve.sock"
    sock = bind("127.0.0.1", 0, str(path))
    srv = server(create_app(fake, _settings()), grace_s=1.0, log_level="warning")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.01)
        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://localhost")
        client = openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http, max_retries=0)
        r = client.chat.completions.create(model="fake-model", messages=_chat(), max_tokens=2)
        assert r.choices[0].message.content == "alpha beta "
        assert fake.requests[-1].client == "unix-socket"
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        sock.close()
    assert fake.closed


def test_a_refused_model_is_refused_before_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    result = _cli("--model", str(folder), "--policy", "builtin:demo", "--port", "0")
    assert result.exit_code == 1, result.output  # unsigned: verification refuses, nothing listens


def test_socket_and_host_together_is_a_usage_error(tmp_path: Path) -> None:
    result = _cli("--socket", str(tmp_path / "s"), "--port", "9")
    assert result.exit_code == 2 and "not both" in result.output


def test_sse_lines_are_plain_json(server: ThreadServer) -> None:
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": "fake-model", "prompt": "p", "stream": True, "max_tokens": 2}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    docs = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(d["choices"][0]["text"] for d in docs) == "alpha beta "
    assert docs[-1]["choices"][0]["text"] == "" and docs[-1]["choices"][0]["finish_reason"] == "length"


def test_text_streams_event_by_event_and_coalesces_only_what_waits(fake: FakeSession) -> None:
    fake.delay = 0.05  # a client that keeps up gets one chunk per released text
    with ThreadServer(create_app(fake, _settings())) as srv:
        chunks = list(_client(srv).completions.create(model="fake-model", prompt="p", stream=True))
    assert [c.choices[0].text for c in chunks] == ["alpha ", "beta ", "gamma ", "delta ", "epsilon ", ""]
    fake.delay = 0.0  # texts already queued when the loop gets to them go out as one chunk
    with ThreadServer(create_app(fake, _settings())) as srv:
        chunks = list(_client(srv).completions.create(model="fake-model", prompt="p", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "alpha beta gamma delta epsilon "


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_the_announced_address_accepts_connections_before_uvicorn_runs(tmp_path: Path, unix: bool) -> None:
    # regression: bind() did not listen, so a client connecting right after the "[serve] ... at URL"
    # line (printed before uvicorn starts) was refused (ECONNREFUSED in the concurrent-requests test)
    import socket as _socket

    from secure_run.runner.cmd_serve import bind

    path = tmp_path / "s.sock"
    sock = bind("127.0.0.1", 0, str(path) if unix else None)
    try:
        family = _socket.AF_UNIX if unix else _socket.AF_INET
        with _socket.socket(family, _socket.SOCK_STREAM) as client:
            client.settimeout(2)
            client.connect(str(path) if unix else sock.getsockname())  # queued by the kernel
    finally:
        sock.close()
