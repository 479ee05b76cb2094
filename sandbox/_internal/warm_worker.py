"""The persistent worker's request loop (inside the sandbox): one model, many requests, sessions.

:meth:`WarmWorker.load` verifies the pins and loads the model exactly as the one-shot ``generate``
task does (same folder checks, same refusals) and reports :class:`LoadedEvent` with the load
counter. :meth:`WarmWorker.serve` then runs the requests: ``turn`` (a completion, optionally in a
session whose cache is kept), ``session`` (fork / rollback / drop) and ``cancel`` (stops that turn
after its next token). A reader thread takes stdin lines while the model runs. Every event carries
the request id. A bad line or a failing request gets an error event; the worker goes on.

Turns run concurrently, continuous-batching style (at most ``LoadRequest.max_batch`` at once):
each loop iteration prefills one chunk of the oldest turn still prefilling (in its conversation's
own cache), and then runs one decode step for every turn that is decoding, each in its own row of a
:class:`~secure_run.model.cache.SlotPool` at its own position
(:class:`~secure_run.model.model.BatchDecoder`; on CUDA one graph per batch size, captured once for
the worker's life). A turn whose prefill is done emits its first token and joins the batch (its
cache is copied into a free row); when it ends (stop id, ``max_new_tokens``, cancel) its row is
copied back into its conversation (sessions) and freed. Turns of one session run in order; a
session request waits until every earlier request has ended (it sees the state a serial worker
would show).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
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
from .conversations import Conversation, Conversations, Point, as_messages, check_context

if TYPE_CHECKING:
    import torch

    from secure_run.model.cache import SlotPool
    from secure_run.model.generate import GenerationConfig
    from secure_run.model.inference import InferenceModel
    from secure_run.model.model import BatchDecoder
    from secure_run.model.tokenizer import IncrementalDecoder

__all__ = ["WarmWorker"]

Emit = Callable[[AnyEvent], None]
#: positions kept free after a reply for the template's closing of it (e.g. ``<|im_end|>\n``)
CLOSE_SLACK = 32

#: positions each pool row starts with (rows grow by doubling up to ``max_context``)
POOL_START_LEN = 256

#: how many times this process loaded weights (reported to the host; one per persistent worker)
_LOADS = 0

Parse = Callable[[bytes], "TurnRequest | CancelRequest | SessionRequest"]
ErrorOf = Callable[[BaseException, "str | None"], ErrorEvent]


def _no_error_event(err: BaseException, request: str | None) -> ErrorEvent:  # pragma: no cover - replaced by serve
    raise err


@dataclass
class _Turn:
    """One turn in flight: prefill progress, its pool row while decoding, what it has sent."""

    req: TurnRequest
    conv: Conversation
    msgs: tuple[tuple[str, str], ...]
    new_ids: list[int]
    reused: int
    cfg: GenerationConfig
    gen: torch.Generator
    text: IncrementalDecoder
    t0: float
    chunk: int
    prefilled: int = 0  # of new_ids
    logits: torch.Tensor | None = None  # [V] after the prefill
    row: int = -1  # pool row while decoding
    joined_len: int = 0  # positions the conversation's own cache holds (the row holds more)
    generated: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    first: float | None = None
    finish: str = "length"
    cancelled: bool = False
    done: bool = False


class WarmWorker:
    """A loaded model and its conversations."""

    def __init__(self, model: InferenceModel, load: LoadRequest, load_seconds: float) -> None:
        self.model = model
        self.load_request = load
        self.load_seconds = load_seconds
        self.conversations = Conversations(model.model, max_sessions=load.max_sessions, max_context=load.max_context)
        self.requests = 0
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._eof = False
        self._backlog: deque[TurnRequest | SessionRequest] = deque()  # arrived, not started
        self._prefilling: deque[_Turn] = deque()
        self._decoding: dict[int, _Turn] = {}  # pool row -> turn
        self._cancels: set[str] = set()  # cancelled request ids not yet started
        self._pool: SlotPool | None = None
        self._decoder: BatchDecoder | None = None
        self._error_event: ErrorOf = _no_error_event

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

    def serve(self, stdin: IO[bytes], emit: Emit, *, parse: Parse, error_event: ErrorOf) -> None:
        """Handle request lines until stdin ends and every request has ended."""
        self._error_event = error_event
        reader = threading.Thread(target=self._read_lines, args=(stdin,), daemon=True)
        reader.start()
        while True:
            running = bool(self._prefilling or self._decoding)
            for line in self._take_lines(block=not running):
                self._arrive(line, emit, parse, error_event)
            self._start_ready(emit, error_event)
            if self._prefilling:
                self._prefill_step(emit, error_event)
            if self._decoding:
                self._decode_step(emit, error_event)
            if self._eof and not (self._backlog or self._prefilling or self._decoding):
                return

    def _read_lines(self, stdin: IO[bytes]) -> None:
        try:
            while True:
                line = stdin.readline(MAX_REQUEST_BYTES + 1)
                if not line:
                    break
                self._lines.put(line)
        finally:
            self._lines.put(None)

    def _take_lines(self, *, block: bool) -> list[bytes]:
        """The lines that have arrived (waiting for one when ``block`` and stdin is still open)."""
        out: list[bytes] = []
        while not self._eof:
            try:
                line = self._lines.get(block=block and not out and not self._backlog)
            except queue.Empty:
                break
            if line is None:
                self._eof = True
            else:
                out.append(line)
        return out

    def _arrive(self, line: bytes, emit: Emit, parse: Parse, error_event: ErrorOf) -> None:
        try:
            req = parse(line)
        except ProtocolError as err:
            emit(error_event(err, None))
            return
        if isinstance(req, CancelRequest):  # stops that turn after its next token; unknown ids: ignored
            for job in (*self._prefilling, *self._decoding.values()):
                if job.req.request == req.request:
                    job.cancelled = True
            if any(isinstance(r, TurnRequest) and r.request == req.request for r in self._backlog):
                self._cancels.add(req.request)
            return
        self._backlog.append(req)

    def _busy_sessions(self) -> set[str]:
        return {j.req.session for j in (*self._prefilling, *self._decoding.values()) if j.req.session is not None}

    def _start_ready(self, emit: Emit, error_event: ErrorOf) -> None:
        """Start what may start, in arrival order: a session request once nothing earlier is in
        flight or waiting; a turn when a row is free and its session is idle."""
        rows = self.load_request.max_batch
        busy = self._busy_sessions()
        blocked: set[str] = set()
        kept: deque[TurnRequest | SessionRequest] = deque()
        barrier = False
        while self._backlog:
            req = self._backlog.popleft()
            if barrier:
                kept.append(req)
                continue
            if isinstance(req, SessionRequest):
                if kept or self._prefilling or self._decoding:
                    barrier = True
                    kept.append(req)
                    continue
                try:
                    emit(self.session_op(req))
                except Exception as err:  # one failing request does not end the worker
                    emit(error_event(err, req.request))
                continue
            s = req.session
            full = len(self._prefilling) + len(self._decoding) >= rows
            if full or (s is not None and (s in busy or s in blocked)):
                if s is not None:
                    blocked.add(s)
                kept.append(req)
                continue
            self.requests += 1
            try:
                job = self._begin(req)
            except Exception as err:
                self._cancels.discard(req.request)
                emit(error_event(err, req.request))
                continue
            job.cancelled = req.request in self._cancels
            self._cancels.discard(req.request)
            self._prefilling.append(job)
            if s is not None:
                busy.add(s)
        self._backlog = kept

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

    # --- turns ----------------------------------------------------------------------------------

    def _begin(self, req: TurnRequest) -> _Turn:
        """Tokenize what the session does not hold yet and put its cache at the matching point."""
        import torch

        from secure_run.model.generate import GenerationConfig, choose_prefill_chunk
        from secure_run.model.tokenizer import IncrementalDecoder

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
            # without a session the reply lives only in the pool row: the own cache holds the prompt
            own = len(new_ids) + (req.max_new_tokens + slack if req.session is not None else 0)
            conv = self.conversations.new(own)
        else:
            conv.go_back(start)
        reused = conv.cache.filled
        need = reused + len(new_ids) + req.max_new_tokens + slack
        check_context(need, self.conversations.max_context)
        conv.ensure_room(m.model, need if req.session is not None else reused + len(new_ids),
                         self.conversations.max_context)
        cfg = GenerationConfig(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                               top_p=req.top_p, seed=req.seed)
        return _Turn(req=req, conv=conv, msgs=msgs, new_ids=new_ids, reused=reused, cfg=cfg,
                     gen=torch.Generator().manual_seed(cfg.seed),
                     text=IncrementalDecoder(m.tokenizer, skip_special_tokens=True), t0=t0,
                     chunk=cfg.prefill_chunk or choose_prefill_chunk(m.model, len(new_ids)))  # from free memory

    def _prefill_step(self, emit: Emit, error_event: ErrorOf) -> None:
        """One prefill chunk of the oldest prefilling turn; at its end, the first token and the join."""
        import torch

        from secure_run.model.generate import sample_next

        job = self._prefilling[0]
        m = self.model.model
        try:
            ids = torch.tensor([job.new_ids[job.prefilled:job.prefilled + job.chunk]], dtype=torch.long,
                               device=m.device)
            with torch.no_grad():
                job.logits = m(ids, job.conv.cache, logits_to_keep=1)[0, -1]  # [V]
            job.prefilled += ids.shape[1]
            if job.prefilled < len(job.new_ids):
                return
            self._prefilling.popleft()
            self._token(job, sample_next(job.logits, job.cfg, job.gen), emit)
            if job.done:
                self._end(job, emit)
                return
            self._join(job)
        except Exception as err:
            if self._prefilling and self._prefilling[0] is job:
                self._prefilling.popleft()
            emit(error_event(err, job.req.request))

    def _join(self, job: _Turn) -> None:
        """Give ``job`` a pool row holding its conversation's cache."""
        from secure_run.model.cache import SlotPool
        from secure_run.model.model import BatchDecoder

        m = self.model.model
        if self._pool is None:
            self._pool = SlotPool(m.config, self.load_request.max_batch,
                                  min(POOL_START_LEN, self.conversations.max_context), device=m.device,
                                  dtype=m.dtype, max_len_limit=self.conversations.max_context)
            self._decoder = BatchDecoder(m, self._pool)
        row = self._pool.acquire()
        try:
            self._pool.load(row, job.conv.cache)
        except BaseException:
            self._pool.release(row)
            raise
        job.row, job.joined_len = row, job.conv.cache.filled
        self._decoding[row] = job

    def _decode_step(self, emit: Emit, error_event: ErrorOf) -> None:
        """One token for every decoding turn (cancelled ones end first)."""
        from secure_run.model.generate import sample_rows

        for job in [j for j in self._decoding.values() if j.cancelled]:
            job.finish = "cancelled"
            self._end(job, emit)
        if not self._decoding:
            return
        assert self._decoder is not None
        rows = sorted(self._decoding)
        jobs = [self._decoding[r] for r in rows]
        try:
            logits = self._decoder.step({r: j.generated[-1] for r, j in zip(rows, jobs, strict=True)})
            nxt = sample_rows(logits, rows, [j.cfg for j in jobs], [j.gen for j in jobs])
        except Exception as err:  # the whole batch failed: every turn in it gets the error
            for job in jobs:
                self._drop(job)
                emit(error_event(err, job.req.request))
            return
        for job, tok in zip(jobs, nxt, strict=True):
            self._token(job, tok, emit)
            if job.done:
                self._end(job, emit)

    def _token(self, job: _Turn, tok: int, emit: Emit) -> None:
        """Send one generated token (and any text it completes); decide whether the turn is done."""
        if job.first is None:
            job.first = time.perf_counter() - job.t0
        emit(TokenEvent(type="token", request=job.req.request, index=len(job.generated), token_id=int(tok)))
        job.generated.append(int(tok))
        piece = job.text.feed(tok)
        if piece:
            self._text(job, piece, emit)
        if tok in self.model.tokenizer.stop_ids:
            job.finish, job.done = "stop", True
        elif job.cancelled:
            job.finish, job.done = "cancelled", True
        elif len(job.generated) >= job.cfg.max_new_tokens:
            job.done = True

    def _text(self, job: _Turn, piece: str, emit: Emit) -> None:
        event = TextEvent(type="text", request=job.req.request, text=piece)
        job.pieces.append(event.text)  # the reply as sent (sanitized): what a client sends back
        emit(event)

    def _release(self, job: _Turn) -> None:
        """Free ``job``'s row, copying it back into the conversation's cache first (sessions)."""
        if job.row < 0:
            return
        assert self._pool is not None
        if job.req.session is not None:
            self._pool.store(job.row, job.conv.cache, start=job.joined_len)
        self._pool.release(job.row)
        del self._decoding[job.row]
        job.row = -1

    def _drop(self, job: _Turn) -> None:
        """Free ``job``'s row without copying it back (the turn failed)."""
        if job.row >= 0 and self._pool is not None:
            self._pool.release(job.row)
            self._decoding.pop(job.row, None)
            job.row = -1

    def _end(self, job: _Turn, emit: Emit) -> None:
        """Flush the text, give the row back, keep the session's new point, send the stats (or the
        error that stopped that)."""
        try:
            self._finish(job, emit)
        except Exception as err:  # one failing request does not end the worker
            self._drop(job)
            emit(self._error_event(err, job.req.request))

    def _finish(self, job: _Turn, emit: Emit) -> None:
        piece = job.text.flush()
        if piece:
            self._text(job, piece, emit)
        self._release(job)
        seconds = time.perf_counter() - job.t0
        n = len(job.generated)
        if job.req.session is not None:
            self._close_turn(job.req.session, job.conv, job.msgs, "".join(job.pieces), job.generated)
        emit(StatsEvent(
            type="stats", request=job.req.request, prompt_tokens=job.reused + len(job.new_ids), generated_tokens=n,
            seconds=seconds, first_token_seconds=job.first, tokens_per_second=n / max(seconds, 1e-9),
            device=self.load_request.device,
            detail={"finish_reason": job.finish, "prefilled_tokens": len(job.new_ids), "reused_tokens": job.reused,
                    "loads": _LOADS, "requests": self.requests, "uid": os.getuid(),
                    "session_turns": job.conv.turns, "session_tokens": job.conv.cache.filled}))

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
