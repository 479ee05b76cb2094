"""The in-sandbox worker: one JSON request on stdin, JSON-line events on stdout.

Run inside the sandbox as ``python -S -m secure_run.sandbox.worker``. Tasks:

* ``selftest``: a tiny deterministic torch model built from a seed (or loaded from a safetensors
  file in the read-only model mount), greedy-decoded on CPU or CUDA, optionally with a CUDA matmul
  check and a tiny Triton kernel; streams its tokens and a final ``stats`` event.
* ``generate``: receives the sealed copies the host verified over the hand-off socket
  (:mod:`secure_run.sandbox.handoff`; the worker sees no model folder), adopts them against the
  pins in the request (sha256 + the identity of each sealed copy; a missing pin is refused),
  loads the weights, tokenizer and chat template from them (small files re-hashed), renders the
  chat template, and streams ``token`` / ``text`` events and final ``stats``.

* ``load`` (persistent mode): the same checks and load as ``generate``, once; then one request per
  stdin line (``turn``, ``cancel``, ``session``) with conversations kept in the worker
  (:mod:`secure_run.sandbox._internal.warm_worker`), until stdin ends.

Anything else a library prints on file descriptor 1 is diverted to stderr, so stdout carries only
protocol lines. Exit status: 0 ok, 2 bad request, 3 model refused, 4 unavailable, 1 internal error.

    >>> import io
    >>> out = io.BytesIO()
    >>> serve(b'{"task": "selftest", "seed": 1, "steps": 2}', out)
    0
    >>> [line.split(b",")[0] for line in out.getvalue().splitlines()]
    [b'{"type": "token"', b'{"type": "text"', b'{"type": "token"', b'{"type": "text"', b'{"type": "stats"']
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING

from secure_run.errors import EnvironmentProblem, Refusal, SecureRunError, UsageError

from .handoff import HANDOFF_SOCKET
from .policy import MODEL_MOUNT
from .protocol import (
    MAX_REQUEST_BYTES,
    AnyEvent,
    ErrorEvent,
    GenerateRequest,
    LoadRequest,
    ProtocolError,
    SelftestRequest,
    StatsEvent,
    TextEvent,
    TokenEvent,
    encode_event,
    parse_persistent_request,
    parse_request,
)

if TYPE_CHECKING:
    import torch

    from secure_run.manifests.sealed import SealedFolder

__all__ = ["main", "serve", "serve_persistent"]

Emit = Callable[[AnyEvent], None]
_EXIT = {"bad_request": 2, "model_refused": 3, "unavailable": 4, "internal": 1}


def _require_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EnvironmentProblem(
            "CUDA was requested but torch sees no GPU inside the sandbox",
            rule="sandbox.worker.no_cuda",
            hint="run with --gpu on a host whose GPU is passed through, or use device cpu",
        )


def _load_selftest_weights(name: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from ._internal.selftest import check_weights

    path = os.path.join(MODEL_MOUNT, name)
    weights: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            weights[key] = f.get_tensor(key)
    check_weights(weights)
    return weights


def run_selftest(req: SelftestRequest, emit: Emit) -> None:
    """The ``selftest`` task."""
    import torch

    from ._internal import selftest as st

    t0 = time.perf_counter()
    _require_device(req.device)
    try:
        weights = _load_selftest_weights(req.weights_file) if req.weights_file else st.build_weights(req.seed)
    except (OSError, ValueError) as err:
        raise Refusal(f"selftest weights refused: {err}", rule="sandbox.worker.selftest_weights") from None
    tokens = st.greedy_tokens(weights, steps=req.steps, seed=req.seed, device=req.device)
    first = time.perf_counter() - t0
    for i, tok in enumerate(tokens):
        emit(TokenEvent(type="token", index=i, token_id=tok))
        emit(TextEvent(type="text", text=st.token_text(tok)))
    detail: dict[str, str | int | float | bool] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "threads": torch.get_num_threads(),
        "weights": "file" if req.weights_file else "seed",
    }
    if req.device == "cuda":
        detail["cuda.device"] = torch.cuda.get_device_name(0)
        detail["cuda.capability"] = ".".join(str(v) for v in torch.cuda.get_device_capability(0))
    if req.matmul_size:
        detail["matmul.n"] = req.matmul_size
        detail["matmul.max_rel_err"] = st.matmul_check(req.matmul_size, req.device, req.seed)
    if req.triton:
        import triton

        from ._internal.selftest_triton import triton_add_check

        detail["triton"] = triton.__version__
        detail["triton.max_abs_err"] = triton_add_check(req.device)
    seconds = time.perf_counter() - t0
    emit(StatsEvent(type="stats", prompt_tokens=st.PROMPT_LEN, generated_tokens=len(tokens), seconds=seconds,
                    first_token_seconds=first, tokens_per_second=len(tokens) / max(seconds, 1e-9),
                    device=req.device, detail=detail))


#: Files the worker cannot do without.
REQUIRED_FILES = ("config.json", "tokenizer.json")


def open_pinned_folder(req: GenerateRequest | LoadRequest, socket_path: str | None = None) -> SealedFolder:
    """The sealed, verified copies the host hands over, adopted against the request's pins.

    The worker sees no model folder: it receives a descriptor of each sealed copy over the hand-off
    socket, and each must be sealed and carry exactly the identity its pin names (the copy the host
    hashed). Refuses (``sandbox.worker.unpinned``) a request that does not pin the files the worker
    cannot do without; shards named by the index are checked when the loader opens them
    (``folder.unpinned``).
    """
    from .handoff import receive_sealed

    missing = [n for n in REQUIRED_FILES if n not in req.files]
    if not ({"model.safetensors.index.json", "model.safetensors"} & set(req.files)):
        missing.append("model.safetensors.index.json or model.safetensors")
    if missing:
        raise Refusal(
            "the request does not pin every file the worker needs (no pin for " + ", ".join(missing) + ")",
            rule="sandbox.worker.unpinned",
            details=tuple(f"no pin for {n}" for n in missing),
            hint="the host must send the verified sha256 and identity of every model file it verified",
        )
    return receive_sealed({n: (p.sha256, p.identity) for n, p in req.files.items()}, socket_path or HANDOFF_SOCKET)


def run_generate(req: GenerateRequest, emit: Emit) -> None:
    """The ``generate`` task: every file read through the verified folder built from the request's pins.

    Every file is a sealed copy the host verified (:func:`open_pinned_folder`): the config, index,
    tokenizer, token configs and chat template are read whole and their sha256 compared with the
    pins again; the shards are read straight from their sealed copies.
    """
    import torch

    from secure_run.model import GenerationConfig
    from secure_run.model.inference import InferenceModel
    from secure_run.model.loader import load_model
    from secure_run.model.tokenizer import ModelTokenizer

    t0 = time.perf_counter()
    _require_device(req.device)
    with open_pinned_folder(req) as folder:
        dtype = None if req.dtype is None else getattr(torch, req.dtype)
        model = InferenceModel(model=load_model(folder, device=req.device, dtype=dtype),
                               tokenizer=ModelTokenizer.from_folder(folder))
    load_s = time.perf_counter() - t0
    if req.messages is not None:
        text = model.render_chat([m.model_dump() for m in req.messages],
                                 enable_thinking=req.enable_thinking is not False)
    else:
        text = req.prompt or ""
    prompt_ids = model.tokenizer.encode(text)
    cfg = GenerationConfig(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                           top_p=req.top_p, seed=req.seed)
    t1 = time.perf_counter()
    first: list[float] = []
    count = 0

    def ids() -> Iterator[int]:
        nonlocal count
        for tok in model.generate(prompt_ids, cfg):
            if not first:
                first.append(time.perf_counter() - t1)
            emit(TokenEvent(type="token", index=count, token_id=int(tok)))
            count += 1
            yield tok

    for piece in model.decode_stream(ids()):
        emit(TextEvent(type="text", text=piece))
    seconds = time.perf_counter() - t1
    emit(StatsEvent(type="stats", prompt_tokens=len(prompt_ids), generated_tokens=count, seconds=seconds,
                    first_token_seconds=first[0] if first else None,
                    tokens_per_second=count / max(seconds, 1e-9), device=req.device,
                    detail={"load_seconds": load_s, "uid": os.getuid()}))


def _error_code(err: BaseException) -> str:
    if isinstance(err, (ProtocolError, UsageError)):
        return "bad_request"
    if isinstance(err, Refusal):
        return "model_refused"
    if isinstance(err, EnvironmentProblem):
        return "unavailable"
    return "internal"


def serve(data: bytes, out: IO[bytes]) -> int:
    """Handle one request given as bytes, writing events to ``out``; returns the exit status."""

    def emit(event: AnyEvent) -> None:
        out.write(encode_event(event))
        out.flush()

    try:
        req = parse_request(data)
        if isinstance(req, SelftestRequest):
            run_selftest(req, emit)
        elif isinstance(req, GenerateRequest):
            run_generate(req, emit)
        else:
            raise ProtocolError("a load request starts a persistent worker; it needs a stdin that stays open",
                                what="bad_request")
        return 0
    except Exception as err:  # every failure becomes one error event
        code = _error_code(err)
        emit(_error_event(err, None))
        return _EXIT[code]


def _error_event(err: BaseException, request: str | None) -> ErrorEvent:
    code = _error_code(err)
    if isinstance(err, SecureRunError):
        message, rule = err.message, err.rule
    else:
        message, rule = f"{type(err).__name__}: {err}", None
    return ErrorEvent(type="error", request=request, code=code, message=message[:4000],  # type: ignore[arg-type]
                      rule=rule)


def serve_persistent(load: LoadRequest, stdin: IO[bytes], out: IO[bytes]) -> int:
    """The persistent worker: verify and load once (``load``), then one request per stdin line until EOF.

    Returns the exit status: 0 at the end of stdin, or the load failure's status.
    """
    from ._internal.warm_worker import WarmWorker

    def emit(event: AnyEvent) -> None:
        out.write(encode_event(event))
        out.flush()

    try:
        worker = WarmWorker.load(load, emit)
    except Exception as err:  # the model was not loaded: report and end
        emit(_error_event(err, load.request))
        return _EXIT[_error_code(err)]
    worker.serve(stdin, emit, parse=parse_persistent_request, error_event=_error_event)
    return 0


def _no_jit_code() -> None:
    """Turn off oneDNN: its CPU JIT writes machine code into W+X memory, which the sandbox's seccomp refuses."""
    import torch

    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a module-level flag property


def main() -> int:
    """Entry point inside the sandbox: divert fd 1 to stderr, keep a private fd for events."""
    events_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from libraries (Python or C) go to stderr, not into the protocol
    sys.stdout = sys.stderr
    data = sys.stdin.buffer.readline(MAX_REQUEST_BYTES + 1)  # one line: the request (or ``load``)
    _no_jit_code()
    with os.fdopen(events_fd, "wb", buffering=0) as out:
        try:
            first = parse_request(data)
        except ProtocolError:
            first = None  # serve() reports it
        if isinstance(first, LoadRequest):
            return serve_persistent(first, sys.stdin.buffer, out)
        return serve(data, out)


if __name__ == "__main__":
    sys.exit(main())
