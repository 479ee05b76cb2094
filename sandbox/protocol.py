"""The worker protocol: one JSON request on stdin, JSON lines out, validated by the host.

The worker inside the sandbox reads one :data:`Request` (``selftest`` or ``generate``) from stdin
and writes one JSON object per line on stdout: ``token`` and ``text`` events while it runs, one
``stats`` event at the end, or an ``error`` event. The host treats every byte as hostile: lines are
length-capped, the number of lines and the total size are capped, each line must be strict JSON
(no NaN, no duplicate keys) and a known event type with no extra fields, and all text is stripped
of escape sequences and control characters before anything can reach a terminal.

Persistent mode (``secure-run serve``, ``generate --chat``): the first line is a
:class:`LoadRequest` (the same pins as ``generate``); the worker answers :class:`LoadedEvent` and
then reads one :data:`PersistentRequest` per line (``turn``, ``cancel``, ``session``) until stdin
ends. Every event then carries the ``request`` id it belongs to; a one-shot run refuses events
that do.

    >>> req = SelftestRequest(task="selftest", seed=7, steps=3)
    >>> parse_request(encode_request(req)).seed
    7
    >>> reader = EventReader(StreamLimits(max_line_bytes=256))
    >>> ev = reader.parse_line(b'{"type": "text", "text": "hi \\u001b[31mred\\u001b[0m"}')
    >>> ev.text
    'hi red'
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from secure_run.errors import SandboxError
from secure_run.manifests._jsoncheck import JsonProblem, loads_strict
from secure_run.manifests.folder import PinnedFile
from secure_run.manifests.hashing import FileIdentity

__all__ = [
    "PROTOCOL_VERSION",
    "ChatMessage",
    "ErrorEvent",
    "Event",
    "CancelRequest",
    "EventReader",
    "EventValidator",
    "GenerateRequest",
    "LoadRequest",
    "LoadedEvent",
    "PersistentRequest",
    "PinnedFileModel",
    "ProtocolError",
    "Request",
    "RunBounds",
    "SessionEvent",
    "SessionRequest",
    "TurnRequest",
    "SelftestRequest",
    "StatsEvent",
    "StreamLimits",
    "TextEvent",
    "TokenEvent",
    "WorkerStats",
    "encode_event",
    "encode_request",
    "parse_persistent_request",
    "parse_request",
    "terminal_safe",
]

PROTOCOL_VERSION = 1
#: Largest request the worker accepts on stdin.
MAX_REQUEST_BYTES = 4 * 1024 * 1024

# --- text sanitation ---------------------------------------------------------------------------

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC (ESC P|X|^|_ ... ST), two-byte ESC x.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?"
    r"|\x9d[^\x07\x1b\x9c]*(?:\x07|\x9c)?"
)
# Bidirectional overrides, isolates and marks ("Trojan Source"); all are also format characters (Cf).
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Unicode categories removed: controls, surrogates, format characters (zero-width space/joiners,
#: BOM, soft hyphen, bidi controls, tag characters U+E0001, U+E0020-E007F), line/paragraph
#: separators (U+2028/U+2029, which some terminals and editors break lines on), unassigned code
#: points (U+E0000, U+E0002-E001F ...) and private-use characters.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cs", "Cf", "Zl", "Zp", "Cn", "Co"})


def terminal_safe(text: str) -> str:
    """``text`` without escape sequences, controls (except newline and tab) or invisible characters.

    >>> terminal_safe("a\\x1b]0;title\\x07b\\rc\\x00d\\u202e")
    'abcd'
    >>> terminal_safe("pay\\u200bpal\\ufeff\\U000e0041\\u2028!")
    'paypal!'
    """
    text = _ESCAPES.sub("", text)
    out = []
    for ch in text:
        if ch in "\n\t":
            out.append(ch)
            continue
        if unicodedata.category(ch) in _DROPPED_CATEGORIES or ch in _BIDI:
            continue
        out.append(ch)
    return "".join(out)


SafeText = Annotated[str, AfterValidator(terminal_safe)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


# --- requests (host -> worker) -------------------------------------------------------------------


class PinnedFileModel(_Frozen):
    """What verification proved about one file the worker will open: its sha256 and identity.

    ``identity`` is the one file-identity type of secure-run
    (:class:`secure_run.manifests.hashing.FileIdentity`: dev, ino, size, mtime_ns, ctime_ns); the
    worker compares it with ``fstat`` before and after reading, and hashes small files again.
    """

    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    identity: FileIdentity

    @classmethod
    def of(cls, pin: PinnedFile) -> PinnedFileModel:
        """The wire form of a verified folder's pin."""
        return cls(sha256=pin.sha256, identity=pin.identity)


class ChatMessage(_Frozen):
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1 << 20)


_FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")]


class SelftestRequest(_Frozen):
    """Run the tiny deterministic model built from ``seed`` (used by the sandbox tests).

    ``weights_file`` (a file name in the model mount) loads the weights with safetensors instead of
    generating them; ``triton`` also compiles and runs a tiny Triton kernel (CUDA only);
    ``matmul_size`` > 0 also checks an N x N matmul on the device against float64 on the CPU.
    """

    task: Literal["selftest"]
    version: Literal[1] = 1
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    steps: int = Field(default=8, ge=1, le=256)
    weights_file: _FileName | None = None
    triton: bool = False
    matmul_size: int = Field(default=0, ge=0, le=16384)


class GenerateRequest(_Frozen):
    """Generate text with the verified model mounted at the model mount point."""

    task: Literal["generate"]
    version: Literal[1] = 1
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]{1,2})?)$")] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    messages: tuple[ChatMessage, ...] | None = Field(default=None, max_length=1024)
    prompt: str | None = Field(default=None, max_length=1 << 22)
    max_new_tokens: int = Field(default=64, ge=1, le=1 << 20)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_k: int = Field(default=0, ge=0, le=1 << 20)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    #: the chat template's ``enable_thinking`` (None: rendered with True, the template's usual default)
    enable_thinking: bool | None = None
    #: every file the worker may open, pinned by verification (required: no pins, no load)
    files: dict[_FileName, PinnedFileModel] = Field(min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of messages and prompt must be given")
        return self

    def pins(self) -> list[PinnedFile]:
        """The pins as the verified folder takes them."""
        return [PinnedFile(name, p.sha256, p.identity) for name, p in self.files.items()]


Request = Annotated[SelftestRequest | GenerateRequest, Field(discriminator="task")]

# --- persistent mode (one sandbox, many requests; every message and event carries a request id) ----

_RequestId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
_SessionId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]


class LoadRequest(_Frozen):
    """The first line to a persistent worker: verify the pins, load the model once, then serve.

    The worker checks and loads exactly as for ``generate`` (same pins, same refusals), answers
    with one :class:`LoadedEvent` (or an error event, and exits), then reads one
    :data:`PersistentRequest` per line until stdin ends.
    """

    task: Literal["load"]
    version: Literal[1] = 1
    request: _RequestId
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]{1,2})?)$")] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    #: most tokens one conversation may hold (prompt and replies of all its turns)
    max_context: int = Field(default=8192, ge=16, le=1 << 22)
    #: most conversations kept at once (the least recently used one is dropped beyond it)
    max_sessions: int = Field(default=16, ge=1, le=4096)
    #: most turns decoded together (continuous batching: each in-flight turn owns a cache row)
    max_batch: int = Field(default=16, ge=1, le=256)
    files: dict[_FileName, PinnedFileModel] = Field(min_length=1, max_length=4096)

    def pins(self) -> list[PinnedFile]:
        """The pins as the verified folder takes them."""
        return [PinnedFile(name, p.sha256, p.identity) for name, p in self.files.items()]


class TurnRequest(_Frozen):
    """One completion in a persistent worker.

    With ``session`` the conversation's cache is kept: the part of the rendered conversation the
    session already holds (at the end of an earlier turn) is not prefilled again.
    """

    task: Literal["turn"]
    request: _RequestId
    session: _SessionId | None = None
    messages: tuple[ChatMessage, ...] | None = Field(default=None, max_length=1024)
    #: the chat template's output for ``messages``, rendered (bounded) by the host; saves a render
    rendered: str | None = Field(default=None, max_length=1 << 24)
    prompt: str | None = Field(default=None, max_length=1 << 22)
    max_new_tokens: int = Field(default=64, ge=1, le=1 << 20)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_k: int = Field(default=0, ge=0, le=1 << 20)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _one_input(self) -> TurnRequest:
        if self.rendered is not None and self.messages is None:
            raise ValueError("rendered goes with messages")
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of messages and prompt must be given")
        if self.session is not None and self.messages is None:
            raise ValueError("a session continues a chat: give messages, not prompt")
        return self


class CancelRequest(_Frozen):
    """Stop the in-flight turn ``request`` (it ends with stats whose finish reason is ``cancelled``)."""

    task: Literal["cancel"]
    request: _RequestId


class SessionRequest(_Frozen):
    """Manage a conversation: ``fork`` (copy ``session`` up to ``turn`` into ``target``),
    ``rollback`` (keep only the first ``turn`` turns) or ``drop``."""

    task: Literal["session"]
    request: _RequestId
    op: Literal["fork", "rollback", "drop"]
    session: _SessionId
    target: _SessionId | None = None
    turn: int | None = Field(default=None, ge=0, le=1 << 20)

    @model_validator(mode="after")
    def _fields(self) -> SessionRequest:
        if (self.op == "fork") != (self.target is not None):
            raise ValueError("fork needs target (and only fork takes one)")
        if self.op == "rollback" and self.turn is None:
            raise ValueError("rollback needs turn")
        return self


PersistentRequest = Annotated[TurnRequest | CancelRequest | SessionRequest, Field(discriminator="task")]
_PERSISTENT = TypeAdapter[TurnRequest | CancelRequest | SessionRequest](PersistentRequest)
_FIRST = TypeAdapter[SelftestRequest | GenerateRequest | LoadRequest](
    Annotated[SelftestRequest | GenerateRequest | LoadRequest, Field(discriminator="task")])


def encode_request(request: SelftestRequest | GenerateRequest | LoadRequest | TurnRequest | CancelRequest
                   | SessionRequest) -> bytes:
    """The request as one JSON line (what the host writes to the worker's stdin)."""
    return (json.dumps(request.model_dump(mode="json"), ensure_ascii=True, allow_nan=False) + "\n").encode()


_R = TypeVar("_R")


def _validated_request(adapter: TypeAdapter[_R], data: bytes) -> _R:
    """One request line: size cap, strict JSON (no NaN/Infinity, no duplicate keys), then the schema.

    Raises:
        ProtocolError: rule ``sandbox.protocol.bad_request``.
    """
    if len(data) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request is {len(data)} bytes, more than {MAX_REQUEST_BYTES}", what="bad_request")
    try:
        _strict_json(data)
        return adapter.validate_json(data, strict=True)
    except (ValueError, ValidationError, RecursionError) as err:
        raise ProtocolError(f"invalid request: {_short(err)}", what="bad_request") from None


def parse_request(data: bytes) -> SelftestRequest | GenerateRequest | LoadRequest:
    """Parse and validate the first request (worker side): one-shot ``selftest``/``generate`` or ``load``.

    Raises:
        ProtocolError: rule ``sandbox.protocol.bad_request``.
    """
    return _validated_request(_FIRST, data)


def parse_persistent_request(data: bytes) -> TurnRequest | CancelRequest | SessionRequest:
    """Parse one request line of a persistent worker (after :class:`LoadRequest`).

    Raises:
        ProtocolError: rule ``sandbox.protocol.bad_request``.
    """
    return _validated_request(_PERSISTENT, data)


# --- events (worker -> host) ---------------------------------------------------------------------


class TokenEvent(_Frozen):
    """One generated token id (its text arrives in ``text`` events, whole characters only)."""

    type: Literal["token"]
    request: _RequestId | None = None
    index: int = Field(ge=0)
    token_id: int = Field(ge=0, le=2**31 - 1)


class TextEvent(_Frozen):
    """A piece of generated text, already safe to print."""

    type: Literal["text"]
    request: _RequestId | None = None
    text: SafeText = Field(max_length=16384)


_DetailValue = Annotated[str, AfterValidator(terminal_safe), Field(max_length=512)] | int | float | bool


class StatsEvent(_Frozen):
    """The final summary of a run."""

    type: Literal["stats"]
    request: _RequestId | None = None
    prompt_tokens: int = Field(ge=0)
    generated_tokens: int = Field(ge=0)
    seconds: float = Field(ge=0.0)
    first_token_seconds: float | None = Field(default=None, ge=0.0)
    tokens_per_second: float = Field(ge=0.0)
    device: SafeText = Field(max_length=128)
    detail: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.]{0,63}$")], _DetailValue] = Field(
        default_factory=dict, max_length=64
    )


class ErrorEvent(_Frozen):
    """The worker could not do what was asked.

    ``code``: ``bad_request`` (the request was refused), ``model_refused`` (the model files failed a
    check), ``unavailable`` (e.g. CUDA asked for but absent), ``internal`` (anything else).
    """

    type: Literal["error"]
    request: _RequestId | None = None
    code: Literal["bad_request", "model_refused", "unavailable", "internal"]
    message: SafeText = Field(max_length=4096)
    rule: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,127}$")] | None = None


class LoadedEvent(_Frozen):
    """A persistent worker loaded the model (the answer to :class:`LoadRequest`)."""

    type: Literal["loaded"]
    request: _RequestId
    loads: int = Field(ge=0)
    load_seconds: float = Field(ge=0.0)
    vocab_size: int = Field(ge=1, le=2**31 - 1)
    device: SafeText = Field(max_length=128)
    uid: int = Field(ge=0)


class SessionEvent(_Frozen):
    """The answer to :class:`SessionRequest`: the conversation ``session`` now holds ``turns`` turns."""

    type: Literal["session"]
    request: _RequestId
    session: _SessionId
    turns: int = Field(ge=0)
    tokens: int = Field(ge=0)


AnyEvent = TokenEvent | TextEvent | StatsEvent | ErrorEvent | LoadedEvent | SessionEvent
Event = Annotated[AnyEvent, Field(discriminator="type")]
_EVENT = TypeAdapter[AnyEvent](Event)
_EVENT_TYPES = frozenset({"token", "text", "stats", "error", "loaded", "session"})


def encode_event(event: AnyEvent) -> bytes:
    """One event as a JSON line (ASCII only; what the worker writes)."""
    return (json.dumps(event.model_dump(mode="json"), ensure_ascii=True, allow_nan=False) + "\n").encode()


# --- host-side reading ---------------------------------------------------------------------------


class ProtocolError(SandboxError):
    """The worker's output broke the protocol; the run is stopped (rule ``sandbox.protocol.*``)."""

    kind = "sandbox"

    def __init__(self, message: str, *, what: str, details: tuple[str, ...] = ()) -> None:
        super().__init__(
            message,
            details=details,
            rule=f"sandbox.protocol.{what}",
            hint="the sandboxed worker misbehaved; nothing it printed was trusted. Re-run, and report "
            "the model folder if it happens again",
        )
        self.what = what


@dataclass(frozen=True)
class StreamLimits:
    """Caps on what the host accepts from the worker's stdout."""

    max_line_bytes: int = 64 * 1024
    max_lines: int = 1_000_000
    max_total_bytes: int = 64 * 1024 * 1024


def _strict_json(data: bytes) -> Any:
    """The one strict JSON loader (no NaN/Infinity, no duplicate keys, no BOM, UTF-8 only).

    Raises:
        ValueError: with the loader's reason (callers turn it into a :class:`ProtocolError`).
    """
    try:
        return loads_strict(data, allow_infinity=False)
    except JsonProblem as err:
        raise ValueError(err.message) from None


def _short(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        return terminal_safe(f"{loc}: {first['msg']}")[:300]
    return terminal_safe(str(err))[:300]


class EventReader:
    """Splits the worker's stdout into lines and validates each into an event.

    Feed raw chunks with :meth:`feed` (yields events as lines complete) and call :meth:`close` at
    end of stream. Any violation raises :class:`ProtocolError`; the caller stops the sandbox.
    """

    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.limits = limits or StreamLimits()
        self._buf = bytearray()
        self.lines = 0
        self.total_bytes = 0

    def feed(self, chunk: bytes) -> Iterator[AnyEvent]:
        """Add raw bytes; yield every event completed by them."""
        self.total_bytes += len(chunk)
        if self.total_bytes > self.limits.max_total_bytes:
            raise ProtocolError(
                f"worker wrote more than {self.limits.max_total_bytes} bytes", what="output_too_large"
            )
        self._buf.extend(chunk)
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.limits.max_line_bytes:
                    raise ProtocolError(
                        f"worker line longer than {self.limits.max_line_bytes} bytes", what="line_too_long"
                    )
                return
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            yield self.parse_line(line)

    def close(self) -> None:
        """End of stream: a trailing partial line is an error."""
        if self._buf:
            raise ProtocolError("worker output ends with an incomplete line", what="truncated_line")

    def parse_line(self, line: bytes) -> AnyEvent:
        """Validate one line (without its newline) into an event."""
        if len(line) > self.limits.max_line_bytes:
            raise ProtocolError(f"worker line longer than {self.limits.max_line_bytes} bytes", what="line_too_long")
        self.lines += 1
        if self.lines > self.limits.max_lines:
            raise ProtocolError(f"worker wrote more than {self.limits.max_lines} lines", what="too_many_lines")
        try:
            obj = _strict_json(line)
        except (ValueError, RecursionError) as err:
            raise ProtocolError(f"worker line {self.lines} is not valid JSON: {_short(err)}", what="bad_json") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"worker line {self.lines} is not a JSON object", what="bad_json")
        kind = obj.get("type")
        if kind not in _EVENT_TYPES:
            shown = terminal_safe(str(kind))[:40]
            raise ProtocolError(
                f"worker line {self.lines} has unknown event type {shown!r}",
                what="unknown_event",
                details=(f"known types: {', '.join(sorted(_EVENT_TYPES))}",),
            )
        try:
            return _EVENT.validate_json(line, strict=True)
        except ValidationError as err:
            raise ProtocolError(
                f"worker line {self.lines} is not a valid {kind} event: {_short(err)}", what="invalid_event"
            ) from None


# --- host-side rules over the event stream ---------------------------------------------------------


@dataclass(frozen=True)
class RunBounds:
    """What the host allows one run to produce, fixed from the request before the worker starts.

    Attributes:
        max_tokens: most token events (the request's ``max_new_tokens`` / ``steps``).
        max_chars_per_token: text characters allowed per token event received so far; text that
            runs ahead of the tokens (or arrives without any) is refused.
        vocab_size: token ids must be below this, when known.
        prompt_tokens: the host's own count of prompt tokens, when known (stats must agree).
        expected_uid: the uid the sandbox runs as; a worker reporting another uid is refused.
        max_tokens_per_second: a worker reporting more than this is refused as implausible.
    """

    max_tokens: int
    max_chars_per_token: int = 256
    vocab_size: int | None = None
    prompt_tokens: int | None = None
    expected_uid: int | None = None
    max_tokens_per_second: float = 100_000.0

    @classmethod
    def for_request(cls, request: SelftestRequest | GenerateRequest, *, uid: int | None = None) -> RunBounds:
        """Bounds derived from the request the host itself wrote."""
        most = request.steps if isinstance(request, SelftestRequest) else request.max_new_tokens
        return cls(max_tokens=most, expected_uid=uid)


@dataclass(frozen=True)
class WorkerStats:
    """The worker's final stats, labelled as worker-reported; ``generated_tokens`` is the host's count."""

    generated_tokens: int
    worker_reported: dict[str, Any]

    @classmethod
    def from_event(cls, ev: StatsEvent, *, host_counted_tokens: int) -> WorkerStats:
        """Label a stats event (already checked by :func:`~secure_run.sandbox.run_worker`) for the audit log."""
        return cls(generated_tokens=host_counted_tokens, worker_reported=ev.model_dump(mode="json", exclude={"type"}))

    def as_record(self) -> dict[str, Any]:
        """JSON form for the audit log (``source`` says who measured what)."""
        return {"source": "worker-reported (checked by the host: token count, uid, rate)",
                "host_counted_tokens": self.generated_tokens, **self.worker_reported}


class EventValidator:
    """Checks the *sequence* of validated events against :class:`RunBounds` (host side).

    :class:`EventReader` checks each line; this checks what the lines add up to: tokens numbered
    0, 1, 2 ... and no more than asked for, text no longer than the tokens can account for, and
    final stats that agree with what the host counted. Violations raise :class:`ProtocolError`
    (``sandbox.protocol.too_many_tokens``, ``token_order``, ``token_out_of_vocab``,
    ``text_exceeds_tokens``, ``stats_mismatch``, ``stats_implausible``).
    """

    def __init__(self, bounds: RunBounds) -> None:
        self.bounds = bounds
        self.tokens = 0
        self.text_chars = 0

    def check(self, ev: AnyEvent) -> None:
        """Accept ``ev`` or raise :class:`ProtocolError`."""
        if isinstance(ev, TokenEvent):
            self._token(ev)
        elif isinstance(ev, TextEvent):
            self._text(ev)
        elif isinstance(ev, StatsEvent):
            self.stats(ev)

    def _token(self, ev: TokenEvent) -> None:
        if ev.index != self.tokens:
            raise ProtocolError(f"worker sent token index {ev.index}, expected {self.tokens}", what="token_order")
        if self.tokens >= self.bounds.max_tokens:
            raise ProtocolError(f"worker sent more than the {self.bounds.max_tokens} tokens asked for",
                                what="too_many_tokens")
        vocab = self.bounds.vocab_size
        if vocab is not None and ev.token_id >= vocab:
            raise ProtocolError(f"worker sent token id {ev.token_id}, outside the vocabulary of {vocab}",
                                what="token_out_of_vocab")
        self.tokens += 1

    def _text(self, ev: TextEvent) -> None:
        allowed = self.tokens * self.bounds.max_chars_per_token
        if self.text_chars + len(ev.text) > allowed:
            raise ProtocolError(
                f"worker sent {self.text_chars + len(ev.text)} characters of text for {self.tokens} tokens "
                f"(at most {self.bounds.max_chars_per_token} per token)", what="text_exceeds_tokens")
        self.text_chars += len(ev.text)

    def stats(self, ev: StatsEvent) -> WorkerStats:
        """Check the final stats against the host's counts; return them labelled as worker-reported."""
        problems: list[str] = []
        if ev.generated_tokens != self.tokens:
            problems.append(f"generated_tokens {ev.generated_tokens} but the host counted {self.tokens} token events")
        if self.bounds.prompt_tokens is not None and ev.prompt_tokens != self.bounds.prompt_tokens:
            problems.append(f"prompt_tokens {ev.prompt_tokens} but the host counted {self.bounds.prompt_tokens}")
        if problems:
            raise ProtocolError("worker stats disagree with the host's count", what="stats_mismatch",
                                details=tuple(problems))
        if ev.tokens_per_second > self.bounds.max_tokens_per_second:
            problems.append(f"tokens_per_second {ev.tokens_per_second:g} > {self.bounds.max_tokens_per_second:g}")
        if ev.seconds > 0 and ev.tokens_per_second > 2.0 * ev.generated_tokens / ev.seconds + 1.0:
            problems.append(f"tokens_per_second {ev.tokens_per_second:g} does not match "
                            f"{ev.generated_tokens} tokens in {ev.seconds:g} s")
        uid = ev.detail.get("uid")
        if "uid" in ev.detail and (not isinstance(uid, int) or isinstance(uid, bool)
                                   or (self.bounds.expected_uid is not None and uid != self.bounds.expected_uid)):
            problems.append(f"uid {uid!r}, but the sandbox runs as {self.bounds.expected_uid}")
        if problems:
            raise ProtocolError("worker stats are implausible", what="stats_implausible", details=tuple(problems))
        return WorkerStats.from_event(ev, host_counted_tokens=self.tokens)
