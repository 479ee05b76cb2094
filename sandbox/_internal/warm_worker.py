"""The persistent worker's request loop (inside the sandbox): one model, many requests, sessions.

:meth:`WarmWorker.load` verifies the pins and loads the model exactly as the one-shot ``generate``
task does (same folder checks, same refusals) and reports :class:`LoadedEvent` with the load
counter. :meth:`WarmWorker.serve` then handles one request line at a time: ``turn`` (a completion,
optionally in a session whose cache is kept), ``session`` (fork / rollback / drop) and ``cancel``
(stops the turn in flight: a reader thread takes stdin lines while the model runs). Every event
carries the request id. A bad line or a failing request gets an error event; the worker goes on.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING

from secure_run.errors import UsageError

from ..protocol import (
    MAX_REQUEST_BYTES,
    AnyEvent,
    CancelRequest,
    ErrorEvent,
    LoadedEvent,
    LoadRequest,
    ProtocolError,
    SessionEvent,
    SessionRequest,
    StatsEvent,
    TextEvent,
    TokenEvent,
    TurnRequest,
)
from .conversations import Conversation, Conversations, Point, as_messages

if TYPE_CHECKING:
    import torch

    from secure_run.model.inference import InferenceModel

__all__ = ["WarmWorker"]

Emit = Callable[[AnyEvent], None]
#: positions kept free after a reply for the template's closing of it (e.g. ``<|im_end|>\n``)
CLOSE_SLACK = 32

#: how many times this process loaded weights (reported to the host; one per persistent worker)
_LOADS = 0


class WarmWorker:
    """A loaded model and its conversations."""

    def __init__(self, model: InferenceModel, load: LoadRequest, load_seconds: float) -> None:
        self.model = model
        self.load_request = load
        self.load_seconds = load_seconds
        self.conversations = Conversations(model.model, max_sessions=load.max_sessions, max_context=load.max_context)
        self.requests = 0
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._pending: deque[bytes | None] = deque()

    @classmethod
    def load(cls, req: LoadRequest, emit: Emit) -> WarmWorker:
        """Verify the pinned folder, load weights and tokenizer once, report :class:`LoadedEvent`."""
        global _LOADS
        import torch

        from secure_run.model.inference import InferenceModel
        from secure_run.model.loader import load_model
        from secure_run.model.tokenizer import ModelTokenizer

        from ..worker import _require_device, open_pinned_folder

        t0 = time.perf_counter()
        _require_device(req.device)
        with open_pinned_folder(req) as folder:
            dtype = None if req.dtype is None else getattr(torch, req.dtype)
            model = InferenceModel(model=load_model(folder, device=req.device, dtype=dtype),
                                   tokenizer=ModelTokenizer.from_folder(folder))
        _LOADS += 1
        seconds = time.perf_counter() - t0
        emit(LoadedEvent(type="loaded", request=req.request, loads=_LOADS, load_seconds=seconds,
                         vocab_size=model.model.config.vocab_size, device=req.device, uid=os.getuid()))
        return cls(model, req, seconds)

    # --- the request loop ---------------------------------------------------------------------

    def serve(self, stdin: IO[bytes], emit: Emit, *,
              parse: Callable[[bytes], TurnRequest | CancelRequest | SessionRequest],
              error_event: Callable[[BaseException, str | None], ErrorEvent]) -> None:
        """Handle request lines until stdin ends."""
        reader = threading.Thread(target=self._read_lines, args=(stdin,), daemon=True)
        reader.start()
        while True:
            line = self._pending.popleft() if self._pending else self._lines.get()
            if line is None:
                return
            try:
                req = parse(line)
            except ProtocolError as err:
                emit(error_event(err, None))
                continue
            if isinstance(req, CancelRequest):
                continue  # nothing in flight (the turn it named has ended already)
            try:
                if isinstance(req, TurnRequest):
                    self.requests += 1
                    self.turn(req, emit)
                else:
                    emit(self.session_op(req))
            except Exception as err:  # one failing request does not end the worker
                emit(error_event(err, req.request))

    def _read_lines(self, stdin: IO[bytes]) -> None:
        try:
            while True:
                line = stdin.readline(MAX_REQUEST_BYTES + 1)
                if not line:
                    break
                self._lines.put(line)
        finally:
            self._lines.put(None)

    def _cancelled(self, request: str, parse: Callable[[bytes], object]) -> bool:
        """Whether a cancel for ``request`` arrived (other lines are kept for later)."""
        found = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return found
            if line is not None:
                try:
                    req = parse(line)
                except ProtocolError:
                    req = None
                if isinstance(req, CancelRequest) and req.request == request:
                    found = True
                    continue
            self._pending.append(line)

    # --- sessions -------------------------------------------------------------------------------

    def session_op(self, req: SessionRequest) -> SessionEvent:
        """Fork, roll back or drop a conversation."""
        convs = self.conversations
        if req.op == "drop":
            convs.drop(req.session)
            return SessionEvent(type="session", request=req.request, session=req.session, turns=0, tokens=0)
        if req.op == "fork":
            assert req.target is not None  # the protocol requires it for fork
            conv = convs.fork(req.session, req.target, req.turn)
            name = req.target
        else:
            assert req.turn is not None  # the protocol requires it for rollback
            conv = convs.rollback(req.session, req.turn)
            name = req.session
        return SessionEvent(type="session", request=req.request, session=name, turns=conv.turns,
                            tokens=conv.cache.filled)

    # --- one turn -------------------------------------------------------------------------------

    def turn(self, req: TurnRequest, emit: Emit) -> None:
        """Prefill what the session does not hold yet, stream the reply, keep the session's new point."""
        import torch

        from secure_run.model.generate import GenerationConfig, choose_prefill_chunk, sample_next, use_graph
        from secure_run.model.model import DecodeGraph

        from .. import protocol

        m = self.model
        t0 = time.perf_counter()
        msgs = as_messages([msg.model_dump() for msg in req.messages]) if req.messages is not None else ()
        conv: Conversation | None = None
        if req.session is not None and req.session in self.conversations:
            conv = self.conversations.get(req.session)
        if req.messages is not None:
            full = req.rendered if req.rendered is not None else m.render_chat(
                [{"role": r, "content": c} for r, c in msgs])
            start = 0
            if conv is not None:
                start = conv.match(msgs)
                base = conv.points[start].rendered
                if not full.startswith(base):
                    start, base = 0, ""
            else:
                base = ""
            new_ids = m.tokenizer.encode(full[len(base):])
        else:
            new_ids = m.tokenizer.encode(req.prompt or "")
        if not new_ids:
            raise UsageError("the prompt is empty after tokenization", rule="sandbox.worker.empty_prompt")
        slack = CLOSE_SLACK if req.session is not None else 0  # room to close the reply in a session
        if conv is None:
            conv = self.conversations.new(len(new_ids) + req.max_new_tokens + slack)
        else:
            conv.go_back(start)
        reused = conv.cache.filled
        conv.ensure_room(m.model, reused + len(new_ids) + req.max_new_tokens + slack,
                         self.conversations.max_context)
        cfg = GenerationConfig(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                               top_p=req.top_p, seed=req.seed)
        device = m.model.device
        gen = torch.Generator().manual_seed(cfg.seed)
        ids = torch.tensor([new_ids], dtype=torch.long, device=device)
        logits: torch.Tensor | None = None
        chunk = cfg.prefill_chunk or choose_prefill_chunk(m.model, ids.shape[1])  # from free memory
        with torch.no_grad():
            for s in range(0, ids.shape[1], chunk):
                logits = m.model(ids[:, s:s + chunk], conv.cache, logits_to_keep=1)
        assert logits is not None
        # CUDA: the decode step replayed as a graph bound to this conversation's cache (as generate())
        graph = DecodeGraph(m.model, conv.cache) if use_graph(m.model, cfg) else None
        first: list[float] = []
        generated: list[int] = []
        finish = "length"
        stops = m.tokenizer.stop_ids

        def stream() -> Iterator[int]:
            nonlocal logits, finish
            for step in range(cfg.max_new_tokens):
                assert logits is not None
                nxt = sample_next(logits[0, -1], cfg, gen)
                if not first:
                    first.append(time.perf_counter() - t0)
                emit(TokenEvent(type="token", request=req.request, index=len(generated), token_id=int(nxt)))
                generated.append(nxt)
                yield nxt
                if nxt in stops:
                    finish = "stop"
                    return
                if self._cancelled(req.request, protocol.parse_persistent_request):
                    finish = "cancelled"
                    return
                if step == cfg.max_new_tokens - 1:
                    return
                if graph is not None:
                    logits = graph(nxt)
                else:
                    with torch.no_grad():
                        logits = m.model(torch.tensor([[nxt]], dtype=torch.long, device=device), conv.cache,
                                         check_ids=False)  # a sampled id: always inside the vocabulary

        pieces: list[str] = []
        for piece in m.decode_stream(stream()):
            event = TextEvent(type="text", request=req.request, text=piece)
            pieces.append(event.text)  # the reply as sent (sanitized): what a client sends back
            emit(event)
        seconds = time.perf_counter() - t0
        n = len(generated)
        if req.session is not None:
            self._close_turn(req.session, conv, msgs, "".join(pieces), generated)
        emit(StatsEvent(
            type="stats", request=req.request, prompt_tokens=reused + len(new_ids), generated_tokens=n,
            seconds=seconds, first_token_seconds=first[0] if first else None,
            tokens_per_second=n / max(seconds, 1e-9), device=self.load_request.device,
            detail={"finish_reason": finish, "prefilled_tokens": len(new_ids), "reused_tokens": reused,
                    "loads": _LOADS, "requests": self.requests, "uid": os.getuid(),
                    "session_turns": conv.turns, "session_tokens": conv.cache.filled}))


    def _close_turn(self, session: str, conv: Conversation, msgs: tuple[tuple[str, str], ...], reply: str,
                    generated: list[int]) -> None:
        """Feed the last token and the template's closing of the reply; keep the turn's point.

        The point is only kept when the closing can be told from the template (the reply is not
        empty and appears in the rendered conversation); otherwise the next turn starts from an
        earlier point.
        """
        import torch

        m = self.model
        self.conversations.put(session, conv)
        if not reply or not generated:
            return
        messages = (*msgs, ("assistant", reply))
        rendered = m.render_chat([{"role": r, "content": c} for r, c in messages], add_generation_prompt=False)
        at = rendered.rfind(reply)
        if at < 0:
            return
        closing = rendered[at + len(reply):]
        last = generated[-1]
        if last in m.tokenizer.stop_ids:
            stop_text = m.tokenizer.decode([last], skip_special_tokens=False)
            if closing.startswith(stop_text):
                closing = closing[len(stop_text):]
        tail = [last, *m.tokenizer.encode(closing)] if closing else [last]
        if conv.cache.filled + len(tail) > conv.cache.max_len:
            return
        with torch.no_grad():
            m.model(torch.tensor([tail], dtype=torch.long, device=m.model.device), conv.cache, logits_to_keep=1)
        conv.points.append(Point(messages=messages, snap=conv.cache.snapshot(), rendered=rendered))
