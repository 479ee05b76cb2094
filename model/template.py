"""Bounded chat-template rendering: untrusted Jinja runs in a child process with hard limits.

Chat templates ship with the weights and are untrusted. Jinja's sandbox stops attribute escapes,
but not a template that divides by zero, builds a terabyte string, recurses 2,000 levels deep in
the parser or makes the compiler fold ``10 ** (10 ** 9)``. So the template is parsed, compiled and
rendered in a fresh interpreter (``python -I``; torch is blocked from importing there) under
``RLIMIT_AS``, ``RLIMIT_CPU``, a recursion limit, an output cap and a wall-clock timeout enforced
by the parent, which kills the child's whole process group. Whatever goes wrong ends in a
:class:`~secure_run.errors.ModelError` with a rule id, within :attr:`TemplateLimits.wall_s`:

* ``chat-template.limit``: time, CPU, memory or recursion limit hit (or the child crashed);
* ``chat-template.render``: the template raised (``1/0``, ``raise_exception``, a type error ...);
* ``chat-template.unsafe``: it touched an unsafe attribute (Jinja sandbox);
* ``chat-template.syntax``: it does not parse;
* ``chat-template.size``: the template or its output is too large.

    >>> render_chat_template("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    ...                      [{"role": "user", "content": "Hi"}])
    '<user>Hi'
    >>> render_chat_template("{{ 1/0 }}", []).rule        # doctest: +SKIP
    Traceback (most recent call last):
    secure_run.errors.ModelError: chat_template.jinja failed to render: division by zero

This module imports only the standard library and ``secure_run.errors`` in the parent; the child
imports only ``jinja2``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from secure_run.errors import ModelError

__all__ = ["MAX_RENDER_CHARS", "MAX_TEMPLATE_CHARS", "TemplateLimits", "check_chat_template", "render_chat_template"]

MAX_TEMPLATE_CHARS = 256 * 1024
MAX_RENDER_CHARS = 16 * 1024 * 1024


@dataclass(frozen=True)
class TemplateLimits:
    """Limits on one render (the child is killed at ``wall_s``, whatever it is doing)."""

    wall_s: float = 1.5
    cpu_s: int = 1
    memory_mib: int = 1024
    recursion: int = 400
    max_output_chars: int = MAX_RENDER_CHARS


DEFAULT_LIMITS = TemplateLimits()

_HINT_LIMIT = ("the chat template is untrusted and exceeded its time/memory/recursion limits; review it (it may be "
               "malicious) or use a plain prompt")


def _refuse(message: str, *, rule: str, path: str, hint: str | None = None) -> ModelError:
    return ModelError(message, rule=rule, path=path, hint=hint or "fix or remove the chat template, or use a plain "
                      "prompt instead of a chat")


def check_chat_template(source: str, *, path: str = "chat_template.jinja",
                        limits: TemplateLimits = DEFAULT_LIMITS) -> None:
    """Parse and compile ``source`` in the bounded child (refuses syntax errors and hostile compiles)."""
    _run_child(source, None, path=path, limits=limits)


def render_chat_template(source: str, messages: Sequence[Mapping[str, Any]], *, path: str = "chat_template.jinja",
                         limits: TemplateLimits = DEFAULT_LIMITS, **variables: Any) -> str:
    """Render ``source`` with ``messages`` and ``variables`` (JSON values only) in the bounded child.

    Raises:
        ModelError: rule ``chat-template.limit|render|unsafe|syntax|size`` (see the module docstring).
    """
    payload = {"messages": [dict(m) for m in messages], **variables}
    text = _run_child(source, payload, path=path, limits=limits)
    assert text is not None
    return text


def _run_child(source: str, variables: dict[str, Any] | None, *, path: str, limits: TemplateLimits) -> str | None:
    if len(source) > MAX_TEMPLATE_CHARS:
        raise _refuse(f"{path} is {len(source)} characters (limit {MAX_TEMPLATE_CHARS})", rule="chat-template.size",
                      path=path)
    try:
        request = json.dumps({"source": source, "variables": variables, "recursion": limits.recursion,
                              "max_output": limits.max_output_chars}, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise _refuse(f"chat template variables are not plain JSON values: {err}", rule="chat-template.render",
                      path=path) from None
    argv = [sys.executable, "-I", "-S", "-B", "-c", _CHILD_BOOT, str(limits.cpu_s), str(limits.memory_mib),
            *_jinja_path()]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={"LANG": "C.UTF-8"}, start_new_session=True, close_fds=True)
    try:
        out, _ = proc.communicate(request.encode(), timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise _refuse(f"{path} did not finish rendering within {limits.wall_s:g} s (killed)",
                      rule="chat-template.limit", path=path, hint=_HINT_LIMIT) from None
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc)  # nothing may outlive the render
    return _parse_reply(out, proc.returncode, path=path, limits=limits, seconds=time.monotonic() - started)


@functools.cache
def _jinja_path() -> tuple[str, ...]:
    """The folders holding jinja2 and markupsafe: the child's whole ``sys.path`` beyond the standard library."""
    out: list[str] = []
    for name in ("jinja2", "markupsafe"):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModelError(f"the chat template renderer needs {name}, which is not installed",
                             rule="chat-template.limit", hint="install secure-run with its dependencies")
        folder = os.path.dirname(os.path.dirname(spec.origin))
        if folder not in out:
            out.append(folder)
    return tuple(out)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _parse_reply(out: bytes, returncode: int, *, path: str, limits: TemplateLimits, seconds: float) -> str | None:
    try:
        reply = json.loads(out.decode("utf-8"))
        if not isinstance(reply, dict):
            raise ValueError("not an object")
    except ValueError:
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            what = f"exceeded its CPU limit of {limits.cpu_s} s"
        else:
            what = "crashed the renderer"
        raise _refuse(f"{path} {what} ({how}, after {seconds:.2f} s)", rule="chat-template.limit", path=path,
                      hint=_HINT_LIMIT) from None
    if "text" in reply:
        text = reply["text"]
        if not isinstance(text, str):
            raise _refuse(f"{path}: the renderer returned no text", rule="chat-template.render", path=path)
        return text
    if reply.get("ok") is True:
        return None
    kind = str(reply.get("error", "render"))
    message = str(reply.get("message", ""))[:500]
    if kind == "limit":
        raise _refuse(f"{path} exceeded a limit: {message}", rule="chat-template.limit", path=path, hint=_HINT_LIMIT)
    if kind == "unsafe":
        raise _refuse(f"{path} tried an unsafe operation: {message}", rule="chat-template.unsafe", path=path,
                      hint="the chat template is untrusted; review it, it may be malicious")
    if kind == "syntax":
        raise _refuse(f"{path} is not a valid template: {message}", rule="chat-template.syntax", path=path)
    if kind == "size":
        raise _refuse(f"{path} produced more than {limits.max_output_chars} characters", rule="chat-template.size",
                      path=path)
    raise _refuse(f"{path} failed to render: {message}", rule="chat-template.render", path=path)


# --- the child ------------------------------------------------------------------------------------
# Runs as ``python -I -S -B -c _CHILD_BOOT CPU_S MEMORY_MIB PATH...`` with one JSON request on stdin
# and one JSON reply on stdout; PATH... (the folders of jinja2 and markupsafe) is its only sys.path
# beyond the standard library. Self-contained: nothing of secure_run, no torch.

_CHILD_BOOT = r'''
import sys, resource
cpu, mem = int(sys.argv[1]), int(sys.argv[2]) * 1024 * 1024
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
for name in ("torch", "numpy", "triton", "secure_run"):
    sys.modules[name] = None  # any import of these fails
sys.path[:0] = sys.argv[3:]
import json

def reply(obj):
    sys.stdout.write(json.dumps(obj, ensure_ascii=True))
    sys.stdout.flush()
    sys.exit(0)

try:
    req = json.loads(sys.stdin.read())
    from jinja2 import TemplateError, TemplateSyntaxError, ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except MemoryError:
    reply({"error": "limit", "message": "out of memory while starting"})

class Env(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

def raise_exception(message):
    raise TemplateError(str(message))

def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

class OutputTooLarge(Exception):
    pass

sys.setrecursionlimit(int(req["recursion"]))
try:
    env = Env(trim_blocks=True, lstrip_blocks=True, autoescape=False, extensions=[ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals = {"raise_exception": raise_exception, "range": env.globals["range"],
                   "namespace": env.globals["namespace"], "dict": dict}
    try:
        template = env.from_string(req["source"])
    except TemplateSyntaxError as err:
        reply({"error": "syntax", "message": f"{err.message} (line {err.lineno})"})
    if req["variables"] is None:
        reply({"ok": True})
    pieces, size, cap = [], 0, int(req["max_output"])
    for piece in template.generate(**req["variables"]):
        size += len(piece)
        if size > cap:
            raise OutputTooLarge()
        pieces.append(piece)
    reply({"text": "".join(pieces)})
except OutputTooLarge:
    reply({"error": "size", "message": "output too large"})
except (MemoryError, RecursionError) as err:
    reply({"error": "limit", "message": type(err).__name__})
except SecurityError as err:
    reply({"error": "unsafe", "message": str(err)[:500]})
except Exception as err:
    reply({"error": "render", "message": f"{type(err).__name__}: {str(err)[:500]}"})
'''
