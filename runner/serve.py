"""``secure-run serve`` as a library: an OpenAI-compatible ASGI app over one warm verified worker.

    >>> from secure_run.runner.serve import ServeSettings, create_app   # doctest: +SKIP
    >>> app = create_app(WarmSession.open(GenerateOptions()), ServeSettings())
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)

The app (FastAPI on Starlette, served by uvicorn; nothing here speaks HTTP itself) exposes

* ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed (server-sent events, ending
  with ``data: [DONE]``) or not; sampling: ``temperature``, ``top_p``, ``top_k`` (an extension),
  ``seed``, ``max_tokens`` (or ``max_completion_tokens``), ``stop``; what a request leaves out comes
  from the model's verified ``generation_config.json`` (:attr:`WarmSession.generation_defaults`);
* ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text format: the HTTP
  layer's counters and the worker's, ``secure_run_worker_loads_total`` among them).

Every completion goes through :meth:`WarmSession.complete`, which applies the input and output
guardrails, the policy limits and the stop strings, and writes the request's one audit record; the
HTTP layer hands it the request id (the response's ``id``) and the client (peer address, plus the
request's ``user`` field when given). A refusal is an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}`` whose ``code`` is the rule id.

Requests run on a pool of ``max_concurrent`` threads with at most ``max_queue`` more waiting; past
that a request gets 429 at once. A client that disconnects (or a shutdown that outlives its grace)
sets the request's cancel event; the session then stops the request and audits it ``cancelled``.
With an API key, every endpoint but ``/health`` needs ``Authorization: Bearer KEY`` (401 otherwise,
compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from secure_run.errors import EnvironmentProblem, Refusal, SecureRunError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CompletionBackend", "ServeSettings", "create_app", "finish_reason"]

#: largest request body accepted (the policy's prompt limits are far smaller; this bounds memory first)
MAX_BODY_BYTES = 4 * 1024 * 1024
#: OpenAI allows at most four stop sequences
MAX_STOP = 4


class CompletionBackend(Protocol):
    """What the app needs from :class:`secure_run.runner.warm.WarmSession` (tests pass a fake)."""

    model_id: str

    @property
    def generation_defaults(self) -> Any: ...  # runner.warm.SamplingParams

    def complete(self, req: Any, cancel: threading.Event) -> Iterator[Any]: ...

    def metrics(self) -> Mapping[str, float]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServeSettings:
    """The HTTP layer's knobs (the CLI's options)."""

    api_key: str | None = None
    max_concurrent: int = 1
    max_queue: int = 8


# --- request bodies ---------------------------------------------------------------------------------


class _Sampling(BaseModel):
    """The sampling fields shared by both completion endpoints (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    user: Annotated[str, Field(max_length=256)] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Sampling):
    messages: Annotated[list[_Message], Field(min_length=1)]
    #: extension: a conversation kept warm in the worker (its cache), so that the next turn with the
    #: same id prefills only the new messages
    session_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")] | None = None


class CompletionBody(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# --- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type_: str, code: str | None, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error_of(err: SecureRunError) -> ApiError:
    """Map a secure-run refusal or environment problem to an HTTP error (``code`` = the rule id)."""
    message = err.message + (f" (fix: {err.hint})" if err.hint else "")
    if isinstance(err, Refusal):
        return ApiError(400, message, type_=f"{err.kind}_refused", code=err.rule or err.kind)
    if isinstance(err, EnvironmentProblem):
        return ApiError(503, message, type_="server_error", code=err.rule or err.kind)
    return ApiError(400, message, type_="invalid_request_error", code=err.rule or err.kind)


def finish_reason(reason: object) -> str:
    """The OpenAI ``finish_reason`` for a :class:`~secure_run.runner.pipeline.Final`'s reason."""
    return {"stop": "stop", "length": "length", "blocked": "content_filter"}.get(str(reason), str(reason))


# --- API key and request counting (pure ASGI: streaming and disconnects pass through untouched) -------


class _Guard:
    def __init__(self, app: ASGIApp, api_key: str | None, state: _State) -> None:
        self.app, self.state = app, state
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if self.expected is not None and path != "/health" and not self._authorized(scope):
            _count(self.state, path, 401)
            denied = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (the key of "
                              "--api-key-file)", type_="authentication_error", code="serve.unauthorized",
                              headers={"WWW-Authenticate": "Bearer"})
            await denied.response()(scope, receive, send)
            return

        length = _header(scope, b"content-length")
        if length and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            _count(self.state, path, 413)
            too_big = ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes",
                               type_="invalid_request_error", code="serve.body-too-large")
            await too_big.response()(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                _count(self.state, path, int(message["status"]))
            await send(message)

        seen = 0

        async def limited_receive() -> Message:  # a chunked body has no content-length to check
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY_BYTES:  # FastAPI passes HTTPException through its body parsing
                    raise StarletteHTTPException(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            return message

        await self.app(scope, limited_receive, counting_send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.expected is not None
        header = _header(scope, b"authorization")
        scheme, _, token = header.partition(b" ")
        # compare_digest on every request, also for a missing or malformed header (no early exit)
        same = hmac.compare_digest(token.strip(), self.expected)
        return scheme.lower() == b"bearer" and same


# --- the app --------------------------------------------------------------------------------------


_END = object()
_NONE = object()


@dataclass
class _State:
    session: CompletionBackend
    settings: ServeSettings
    executor: ThreadPoolExecutor
    admitted: int = 0
    cancels: set[threading.Event] = field(default_factory=set)
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    rejected_queue_full: int = 0
    cancelled_by_client: int = 0
    started: float = field(default_factory=time.time)


def create_app(session: CompletionBackend, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The ASGI app over ``session``; closing the app (lifespan shutdown) cancels what still runs,
    waits for every request's audit record and closes the session."""
    executor = ThreadPoolExecutor(max_workers=settings.max_concurrent, thread_name_prefix="secure-run-serve")
    state = _State(session=session, settings=settings, executor=executor)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for cancel in list(state.cancels):
                cancel.set()
            await asyncio.to_thread(executor.shutdown, wait=True)  # every request audited
            session.close()

    app = FastAPI(title="secure-run", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serve = state
    _install_errors(app)
    _routes(app, state)
    app.add_middleware(_Guard, api_key=settings.api_key, state=state)
    return app


def _install_errors(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def invalid(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid request')}" if param else str(first.get("msg", "invalid request"))
        return ApiError(400, msg, type_="invalid_request_error", code="serve.invalid-request", param=param).response()

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "serve.not-found", 413: "serve.body-too-large"}.get(exc.status_code, f"serve.http-{exc.status_code}")
        return ApiError(exc.status_code, str(exc.detail), type_="invalid_request_error", code=code).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _header(scope: Scope, name: bytes) -> bytes:
    found = b""
    for key, value in scope.get("headers", ()):
        if key == name:
            found = value
    return found


def _count(state: _State, path: str, status: int) -> None:
    endpoint = path if path in _ENDPOINTS else "other"
    state.requests[(endpoint, status)] = state.requests.get((endpoint, status), 0) + 1


_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def _routes(app: FastAPI, state: _State) -> None:
    session = state.session

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": session.model_id, "in_flight": state.admitted}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": session.model_id, "object": "model",
                                            "created": int(state.started), "owned_by": "secure-run"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_prometheus(state), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody, request: Request) -> Response:
        messages = tuple({"role": m.role, "content": m.text()} for m in body.messages)
        return await _complete(state, request, body, messages=messages, prompt=None, kind="chat")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, request: Request) -> Response:
        return await _complete(state, request, body, messages=None, prompt=body.prompt_text(), kind="text")


# --- one completion ---------------------------------------------------------------------------------


def _client(request: Request, user: str | None) -> str:
    peer = request.client
    where = f"{peer.host}:{peer.port}" if peer is not None and peer.host else "unix-socket"
    return f"{user}@{where}" if user else where


def _sampling(defaults: Any, body: _Sampling) -> Any:
    changes: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(body, name)
        if value is not None:
            changes[name] = value
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    stops = body.stop_tuple()
    if stops:
        changes["stop"] = stops
    return replace(defaults, **changes)


class _Run:
    """One request running on the pool; its events cross to the event loop through an asyncio queue."""

    def __init__(self, state: _State, request: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.state, self.request, self.loop = state, request, loop
        self.cancel = threading.Event()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.pending: object = _NONE
        self.done = False

    def start(self) -> None:
        self.state.admitted += 1
        self.state.cancels.add(self.cancel)
        self.state.executor.submit(self._pump)

    def _deliver(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown): stop generating, the session still audits
            self.cancel.set()

    def _pump(self) -> None:
        from secure_run.runner.pipeline import Final

        released = False
        try:
            for event in self.state.session.complete(self.request, self.cancel):
                if isinstance(event, Final) and not released:
                    # the turn is over and audited: free the slot before the handler answers, so a
                    # client that sends its next request on receiving this answer is not refused
                    released = self._release()
                self._deliver(event)
        except BaseException as err:  # delivered to the handler, which answers with it
            self._deliver(err)
        finally:
            self._deliver(_END)
            if not released:  # otherwise the slot is free only now: the bound counts what the pool holds
                self._release()

    def _release(self) -> bool:
        try:
            self.loop.call_soon_threadsafe(self._released)
        except RuntimeError:
            pass  # the loop is gone (shutdown)
        return True

    def _released(self) -> None:
        self.state.admitted -= 1
        self.state.cancels.discard(self.cancel)

    def finish(self) -> None:
        """Called once on the loop when the handler is done with this run (normally or not)."""
        self.done = True

    def abandon(self) -> None:
        """The client is gone: cancel the request (the session writes its ``cancelled`` record)."""
        if not self.done and not self.cancel.is_set():
            self.cancel.set()
            self.state.cancelled_by_client += 1
        self.finish()

    async def next(self) -> object:
        if self.pending is not _NONE:
            item, self.pending = self.pending, _NONE
            return item
        return await self.queue.get()

    def more_text(self, text_type: type) -> str:
        """The text of the Text events already waiting (a client slower than the worker gets them as one
        chunk, instead of paying one SSE event per token); the first other event is kept for next()."""
        parts: list[str] = []
        while self.pending is _NONE and not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, text_type):
                parts.append(item.text)  # type: ignore[attr-defined]
            else:
                self.pending = item
        return "".join(parts)


async def _complete(state: _State, request: Request, body: _Sampling, *, messages: tuple[dict[str, str], ...] | None,
                    prompt: str | None, kind: Literal["chat", "text"]) -> Response:
    from secure_run.runner.pipeline import Final, Text

    session = state.session
    if body.model != session.model_id:
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves {session.model_id!r} "
                       "(GET /v1/models)", type_="invalid_request_error", code="model_not_found", param="model")
    capacity = state.settings.max_concurrent + state.settings.max_queue
    if state.admitted >= capacity:
        state.rejected_queue_full += 1
        raise ApiError(429, f"the server is busy: {state.admitted} requests running or queued (at most "
                       f"{capacity}); retry later", type_="rate_limit_exceeded", code="serve.queue-full",
                       headers={"Retry-After": "1"})
    request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    from secure_run.runner.warm import CompletionRequest

    req = CompletionRequest(request_id=request_id, messages=messages, prompt=prompt,
                            sampling=_sampling(session.generation_defaults, body), client=_client(request, body.user),
                            session_id=getattr(body, "session_id", None))
    run = _Run(state, req, asyncio.get_running_loop())
    run.start()
    created = int(time.time())
    watcher = asyncio.ensure_future(_watch_disconnect(request.receive))
    try:
        first = await _next_or_disconnect(run, watcher)  # queued: a client that leaves cancels it too
    except _Disconnected:
        run.abandon()
        return Response(status_code=499)  # nobody reads it; the request was cancelled and audited
    except BaseException:
        watcher.cancel()
        run.abandon()
        raise
    if body.stream or isinstance(first, BaseException):
        watcher.cancel()  # StreamingResponse listens for the disconnect itself
    if isinstance(first, BaseException):  # refused before any output (input guardrail, limits, ...)
        run.finish()
        if isinstance(first, SecureRunError):
            raise api_error_of(first)
        raise first
    if body.stream:
        stream = _sse(run, first, request_id, created, session.model_id, kind, body.include_usage(), Text, Final)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"x-request-id": request_id,
                                                                                 "Cache-Control": "no-cache"})
    return await _whole(run, first, watcher, request_id, created, session.model_id, kind, Text, Final)


def _usage(stats: Mapping[str, object]) -> dict[str, int]:
    p = int(str(stats.get("prompt_tokens", 0) or 0))
    c = int(str(stats.get("completion_tokens", 0) or 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _whole(run: _Run, first: object, watcher: asyncio.Task[None], request_id: str, created: int, model: str,
                 kind: str, text_type: type, final_type: type) -> Response:
    parts: list[str] = []
    final: Any = None
    item = first
    try:
        while item is not _END:
            if isinstance(item, BaseException):
                if isinstance(item, SecureRunError):
                    raise api_error_of(item)
                raise item
            if isinstance(item, text_type):
                parts.append(item.text)  # type: ignore[attr-defined]
            elif isinstance(item, final_type):
                final = item
            item = await _next_or_disconnect(run, watcher)
    except _Disconnected:
        return Response(status_code=499)  # nobody reads it; the request was cancelled and audited
    finally:
        watcher.cancel()
        if item is _END or isinstance(item, BaseException):  # ended (or failed) by itself
            run.finish()
        else:
            run.abandon()
    if final is None:
        raise ApiError(500, "the worker ended without a final event", type_="server_error", code="serve.no-final")
    reason = finish_reason(final.stats.get("finish_reason"))
    if reason == "cancelled":  # the client is still here, so the server cancelled it (shutdown)
        raise ApiError(503, "the request was cancelled: the server is shutting down", type_="server_error",
                       code="serve.cancelled")
    text = "".join(parts)
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                               "finish_reason": reason} if kind == "chat" else
                              {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    doc = {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
           "created": created, "model": model, "choices": [choice], "usage": _usage(final.stats)}
    return JSONResponse(doc, headers={"x-request-id": request_id})


class _Disconnected(Exception):
    pass


async def _watch_disconnect(receive: Receive) -> None:
    """Return when the client goes away (the body is already read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next_or_disconnect(run: _Run, watcher: asyncio.Task[None]) -> object:
    """The next event; a client that went away while a non-streamed answer was being made cancels it."""
    getter = asyncio.ensure_future(run.next())
    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    raise _Disconnected()


def _sse_data(doc: object) -> str:
    import json

    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


async def _sse(run: _Run, first: object, request_id: str, created: int, model: str, kind: str,
               include_usage: bool, text_type: type, final_type: type) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, reason: str | None, *, role: bool = False) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        doc: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": model,
                               "choices": [choice]}
        if include_usage:
            doc["usage"] = None
        return doc

    item = first
    try:
        if kind == "chat":
            yield _sse_data(chunk(None, None, role=True))
        while item is not _END:
            if isinstance(item, BaseException):
                err = api_error_of(item) if isinstance(item, SecureRunError) else ApiError(
                    500, f"the completion failed: {type(item).__name__}", type_="server_error", code="serve.failed")
                yield _sse_data(err.body())
            elif isinstance(item, text_type):
                yield _sse_data(chunk(item.text + run.more_text(text_type), None))  # type: ignore[attr-defined]
            elif isinstance(item, final_type):
                stats: Mapping[str, object] = item.stats  # type: ignore[attr-defined]
                reason = str(stats.get("finish_reason"))
                if reason == "cancelled":  # stopped by the server (shutdown): say so, not "stop"
                    yield _sse_data(ApiError(503, "the request was cancelled: the server is shutting down",
                                             type_="server_error", code="serve.cancelled").body())
                else:
                    yield _sse_data(chunk(None, finish_reason(reason)))
                if include_usage:
                    doc = chunk(None, None)
                    doc["choices"], doc["usage"] = [], _usage(stats)
                    yield _sse_data(doc)
            item = await run.next()
        yield "data: [DONE]\n\n"
    finally:
        if item is _END:
            run.finish()
        else:  # the client went away mid-stream (or the server cancelled the task at shutdown)
            run.abandon()


# --- /metrics -------------------------------------------------------------------------------------


def _metric_name(key: str) -> str:
    safe = "".join(c if c.isalnum() or c == "_" else "_" for c in key.removeprefix("worker_"))
    return f"secure_run_worker_{safe}"


def _prometheus(state: _State) -> str:
    lines = [
        "# HELP secure_run_http_requests_total HTTP requests answered, by endpoint and status.",
        "# TYPE secure_run_http_requests_total counter",
    ]
    for (endpoint, status), n in sorted(state.requests.items()):
        lines.append(f'secure_run_http_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    lines += [
        "# HELP secure_run_queue_rejected_total Completions refused with 429 because the queue was full.",
        "# TYPE secure_run_queue_rejected_total counter",
        f"secure_run_queue_rejected_total {state.rejected_queue_full}",
        "# HELP secure_run_client_cancelled_total Completions cancelled because the client went away.",
        "# TYPE secure_run_client_cancelled_total counter",
        f"secure_run_client_cancelled_total {state.cancelled_by_client}",
        "# HELP secure_run_requests_in_flight Completions running or queued.",
        "# TYPE secure_run_requests_in_flight gauge",
        f"secure_run_requests_in_flight {state.admitted}",
    ]
    for key, value in sorted(state.session.metrics().items()):
        name = _metric_name(key)
        kind = "counter" if key.endswith("_total") else "gauge"
        lines += [f"# HELP {name} Worker metric {key} (WarmSession.metrics).", f"# TYPE {name} {kind}",
                  f"{name} {float(value)!r}"]
    return "\n".join(lines) + "\n"


def cancel_in_flight(app: FastAPI) -> int:
    """Set the cancel event of every request still running or queued; how many there were."""
    state: _State = app.state.serve
    cancels = list(state.cancels)
    for cancel in cancels:
        cancel.set()
    return len(cancels)


def server(app: FastAPI, *, grace_s: float, **config: Any) -> Any:
    """A uvicorn server for ``app`` whose shutdown (SIGTERM, SIGINT) lets in-flight requests run for
    ``grace_s`` seconds, then cancels them: their streams end with an error event and ``[DONE]``,
    each request is audited ``cancelled``, and the app's shutdown closes the session."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            timer = asyncio.get_running_loop().call_later(grace_s, cancel_in_flight, app)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    # uvicorn's own grace is a backstop: it cancels the connection tasks only if the cancelled
    # requests did not end by themselves
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1, and any
    # local client could write another address into the audit record's client field
    cfg = uvicorn.Config(app, timeout_graceful_shutdown=int(grace_s) + 15, lifespan="on", proxy_headers=False,
                         **config)
    return _Server(cfg)


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text document (tests and the benchmark read /metrics)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (no API key needed there)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
