"""A scripted stand-in for runner.warm.WarmSession (with its real request types) (the HTTP layer's unit tests) and a thread server.

The fake keeps to WarmSession's contract: ``complete`` yields Text events then one Final whose
stats carry prompt_tokens, completion_tokens and finish_reason in {stop, length, blocked,
cancelled}; it honours the cancel event, the stop strings and max_tokens; and it records exactly
one "audit record" per request (in ``records``), whatever happens to the request.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from secure_run.errors import PolicyViolation
from secure_run.runner.pipeline import Final, Text
from secure_run.runner.warm import CompletionRequest as FakeRequest
from secure_run.runner.warm import SamplingParams as FakeSampling


class FakeSession:
    """Streams ``words`` (one per token, ``delay`` s apart); "BLOCKME" in the output blocks the rest."""

    model_id = "fake-model"

    def __init__(self, words: list[str] | None = None, delay: float = 0.0) -> None:
        self.words = words or ["alpha ", "beta ", "gamma ", "delta ", "epsilon "]
        self.delay = delay
        self.generation_defaults = FakeSampling(temperature=0.7, top_p=0.9, top_k=20, seed=None, max_tokens=5)
        self.records: list[dict[str, Any]] = []
        self.requests: list[FakeRequest] = []
        self.closed = False
        self.lock = threading.Lock()
        self.started = threading.Event()

    def complete(self, req: FakeRequest, cancel: threading.Event) -> Iterator[Any]:
        self.requests.append(req)
        text = " ".join(m["content"] for m in req.messages) if req.messages else (req.prompt or "")
        if "forbidden" in text:
            self._audit(req, "refused", 0, rule="G3")
            raise PolicyViolation("the prompt matches the input guardrail", rule="G3", hint="rephrase")
        self.started.set()
        out, n, reason = "", 0, "length"
        for word in self.words[: req.sampling.max_tokens]:
            if cancel.is_set():
                reason = "cancelled"
                break
            if self.delay:
                cancel.wait(self.delay)
                if cancel.is_set():
                    reason = "cancelled"
                    break
            n += 1
            if word.startswith("BLOCKME"):
                reason = "blocked"
                break
            candidate = out + word
            hit = min((candidate.find(s) for s in req.sampling.stop if s in candidate), default=-1)
            if hit >= 0:
                if hit > len(out):
                    yield Text(candidate[len(out):hit])
                reason = "stop"
                break
            out = candidate
            yield Text(word)
        else:
            reason = "length" if n >= req.sampling.max_tokens else "stop"
        self._audit(req, reason, n)
        yield Final(stats={"prompt_tokens": 7, "completion_tokens": n, "finish_reason": reason},
                    blocked=reason == "blocked", audit_path="fake")

    def _audit(self, req: FakeRequest, reason: str, n: int, rule: str | None = None) -> None:
        with self.lock:
            self.records.append({"request_id": req.request_id, "client": req.client, "finish_reason": reason,
                                 "completion_tokens": n, "rule": rule})

    def metrics(self) -> Mapping[str, float]:
        return {"worker_loads_total": 1.0, "requests_total": float(len(self.records))}

    def close(self) -> None:
        self.closed = True


class ThreadServer:
    """uvicorn in a thread on a free loopback port (what ``secure-run serve`` runs, minus the gate)."""

    def __init__(self, app: Any, grace_s: float = 1.0) -> None:
        from secure_run.runner.serve import server

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = server(app, grace_s=grace_s, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
