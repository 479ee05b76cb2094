"""The persistent worker through the real backends (docker and namespace): one sandbox, one load.

Each backend gets one worker for the module (sandbox start and model load are the slow part);
the tests then run requests against it: many requests and one load, a chat turn that prefills only
the new tokens, rollback and fork giving the same greedy tokens as the original turn, cancel in
the middle of a stream. Separate sandboxes prove that a killed worker gives a clear error and is
cleaned up, and that the pins are still enforced at load.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sealed_support import handed_off, pins_of, sealed

from secure_run.errors import SandboxError
from secure_run.model.demo import demo_model_dir
from secure_run.model.tokenizer import ModelTokenizer
from secure_run.sandbox import SandboxPolicy
from secure_run.sandbox.backends import Backend, WorkerFailure, WorkerRefusal
from secure_run.sandbox.handoff import HandoffServer
from secure_run.sandbox.persistent import PersistentWorker
from secure_run.sandbox.protocol import (
    LoadRequest,
    SessionRequest,
    StatsEvent,
    TextEvent,
    TokenEvent,
    TurnRequest,
)

pytestmark = [pytest.mark.slow]


def start(backend: Backend, root: Path) -> PersistentWorker:
    with handed_off(root, SandboxPolicy(wall_clock_s=900, memory_mib=2048)) as (policy, pins):
        return PersistentWorker.start(backend, policy, LoadRequest(task="load", request="load", files=pins))


@pytest.fixture(scope="module", params=[pytest.param("namespace", marks=pytest.mark.namespace),
                                        pytest.param("docker", marks=pytest.mark.docker)])
def warm(request: pytest.FixtureRequest) -> Iterator[PersistentWorker]:
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    worker = start(backend, Path(demo_model_dir()))
    yield worker
    worker.close()


_N = iter(range(1_000_000))


def turn(worker: PersistentWorker, *, session: str | None = None, messages: list[dict[str, str]] | None = None,
         prompt: str | None = None, max_new_tokens: int = 8,
         cancel: threading.Event | None = None, cancel_after: int = 0) -> tuple[list[int], str, StatsEvent]:
    req = TurnRequest.model_validate({"task": "turn", "request": f"r{next(_N)}", "session": session,
                                      "messages": messages, "prompt": prompt, "max_new_tokens": max_new_tokens},
                                     strict=False)
    ids: list[int] = []
    text = ""
    stats = None
    for ev in worker.turn(req, cancel=cancel):
        if isinstance(ev, TokenEvent):
            ids.append(ev.token_id)
            if cancel is not None and len(ids) == cancel_after:
                cancel.set()
        elif isinstance(ev, TextEvent):
            text += ev.text
        else:
            stats = ev
    assert stats is not None
    return ids, text, stats


def test_many_requests_one_load(warm: PersistentWorker) -> None:
    assert warm.loaded is not None and warm.loaded.loads == 1
    for i in range(4):
        ids, _, stats = turn(warm, prompt=f"hello {i}", max_new_tokens=4)
        assert 1 <= len(ids) <= 4 and stats.generated_tokens == len(ids)
        assert stats.detail["loads"] == 1  # the worker never loaded the weights again


def test_second_chat_turn_prefills_only_the_new_tokens(warm: PersistentWorker) -> None:
    u1 = {"role": "user", "content": "Tell me about verified loading."}
    _, reply, s1 = turn(warm, session="chat-a", messages=[u1], max_new_tokens=6)
    assert s1.detail["reused_tokens"] == 0 and s1.detail["prefilled_tokens"] == s1.prompt_tokens
    held = s1.detail["session_tokens"]
    assert isinstance(held, int) and held > s1.prompt_tokens  # prompt + reply + closing are held
    u2 = {"role": "user", "content": "And then?"}
    history = [u1, {"role": "assistant", "content": reply}, u2]
    _, _, s2 = turn(warm, session="chat-a", messages=history, max_new_tokens=6)
    assert s2.detail["reused_tokens"] == held
    # exactly the tokens of what the template adds for the new message (host-side oracle)
    tok = ModelTokenizer.from_dir(demo_model_dir())
    before = tok.render_chat(history[:2], add_generation_prompt=False)
    after = tok.render_chat(history)
    assert after.startswith(before)
    assert s2.detail["prefilled_tokens"] == len(tok.encode(after[len(before):]))
    assert s2.prompt_tokens == held + s2.detail["prefilled_tokens"] and s2.detail["session_turns"] == 2
    # a fresh conversation with the same messages prefills all of them
    _, _, fresh = turn(warm, messages=history, max_new_tokens=1)
    assert fresh.detail["prefilled_tokens"] == len(tok.encode(after)) > 2 * s2.detail["prefilled_tokens"]


def test_rollback_and_fork_give_the_same_greedy_tokens(warm: PersistentWorker) -> None:
    u1 = {"role": "user", "content": "first question"}
    _, reply, _ = turn(warm, session="chat-b", messages=[u1], max_new_tokens=5)
    history = [u1, {"role": "assistant", "content": reply}, {"role": "user", "content": "second question"}]
    original, _, s2 = turn(warm, session="chat-b", messages=history, max_new_tokens=8)
    assert s2.detail["session_turns"] == 2
    ev = warm.session(SessionRequest(task="session", request="rb1", op="rollback", session="chat-b", turn=1))
    assert ev.turns == 1
    again, _, s3 = turn(warm, session="chat-b", messages=history, max_new_tokens=8)
    assert again == original and s3.detail["reused_tokens"] == s2.detail["reused_tokens"]
    fork = warm.session(SessionRequest(task="session", request="fk1", op="fork", session="chat-b",
                                       target="chat-b2", turn=1))
    assert fork.session == "chat-b2" and fork.turns == 1
    forked, _, s4 = turn(warm, session="chat-b2", messages=history, max_new_tokens=8)
    assert forked == original and s4.detail["prefilled_tokens"] == s2.detail["prefilled_tokens"]
    # a different continuation of the fork leaves the original session as it was
    turn(warm, session="chat-b2", messages=[u1, history[1], {"role": "user", "content": "other"}], max_new_tokens=3)
    third, _, _ = turn(warm, session="chat-b", messages=history, max_new_tokens=8)
    assert third == original
    with pytest.raises(WorkerFailure) as err:
        warm.session(SessionRequest(task="session", request="rb2", op="rollback", session="nope", turn=0))
    assert err.value.rule == "sandbox.worker.no_session"
    assert warm.alive  # a failed request does not end the worker


def test_cancel_stops_a_stream_and_the_worker_goes_on(warm: PersistentWorker) -> None:
    cancel = threading.Event()
    ids, _, stats = turn(warm, prompt="a long story", max_new_tokens=400, cancel=cancel, cancel_after=3)
    assert stats.detail["finish_reason"] == "cancelled"
    assert 3 <= len(ids) < 400
    ids2, _, stats2 = turn(warm, prompt="next", max_new_tokens=3)
    assert stats2.detail["loads"] == 1 and len(ids2) >= 1


def _descendants_with(root_pid: int, marker: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker not in f.read():
                    continue
        except OSError:
            continue
        p = pid
        while p > 1:
            if p == root_pid:
                found.append(pid)
                break
            try:
                with open(f"/proc/{p}/stat") as f:
                    p = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
    return found


def _sandbox_root_pid(worker: PersistentWorker) -> tuple[int, Any]:
    run: Any = worker._sandbox
    if hasattr(run, "container"):
        run.container.reload()
        return int(run.container.attrs["State"]["Pid"]), run
    return int(run.proc.pid), run


@pytest.mark.parametrize("backend_name", [pytest.param("namespace", marks=pytest.mark.namespace),
                                          pytest.param("docker", marks=pytest.mark.docker)])
def test_a_worker_killed_mid_session_gives_a_clear_error_and_is_cleaned_up(
        backend_name: str, request: pytest.FixtureRequest) -> None:
    backend: Backend = request.getfixturevalue(f"{backend_name}_backend")
    worker = start(backend, Path(demo_model_dir()))
    try:
        turn(worker, prompt="warm up", max_new_tokens=2)
        root_pid, run = _sandbox_root_pid(worker)
        pids = _descendants_with(root_pid, b"secure_run.sandbox.worker")
        assert pids, "the worker process was not found below the sandbox"
        req = TurnRequest(task="turn", request="doomed", prompt="a long story", max_new_tokens=2000)
        stream = worker.turn(req)
        with pytest.raises(SandboxError) as err:
            for n, _ev in enumerate(stream):
                if n == 4:
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
        assert err.value.rule == "sandbox.worker.died"
        assert "ended unexpectedly" in err.value.message
        assert not worker.alive
        with pytest.raises(SandboxError):  # later requests are refused, not hung
            turn(worker, prompt="again", max_new_tokens=2)
        # the sandbox is gone
        if hasattr(run, "container"):
            import docker

            with pytest.raises(docker.errors.NotFound):
                run.client.containers.get(run.container.id)
        else:
            assert run.proc.poll() is not None and not os.path.exists(run.root)
        assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
    finally:
        worker.close()


@pytest.mark.parametrize("backend_name", [pytest.param("namespace", marks=pytest.mark.namespace),
                                          pytest.param("docker", marks=pytest.mark.docker)])
def test_the_persistent_worker_refuses_a_descriptor_that_is_not_the_pinned_sealed_copy(
        backend_name: str, request: pytest.FixtureRequest) -> None:
    """Through the real sandbox: a sealed copy with the same bytes but not the one pinned is refused at load."""
    backend: Backend = request.getfixturevalue(f"{backend_name}_backend")
    root = Path(demo_model_dir())
    t0 = time.monotonic()
    with sealed(root) as pinned, sealed(root) as other:
        pins = pins_of(pinned)  # what the host hashed
        with HandoffServer([(c.name, c.fd) for c in other.copies()]) as server, pytest.raises(WorkerRefusal) as err:
            policy = SandboxPolicy(wall_clock_s=900, memory_mib=2048, handoff_dir=server.mount_dir)
            PersistentWorker.start(backend, policy, LoadRequest(task="load", request="load", files=pins))
    assert err.value.rule == "folder.unsealed" and err.value.kind == "worker-refused"
    assert "is not the pinned sealed copy" in err.value.message
    assert time.monotonic() - t0 < 300
