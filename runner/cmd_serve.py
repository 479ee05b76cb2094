"""``secure-run serve``: the gate once, one warm sandboxed worker, an OpenAI-compatible API.

    $ secure-run serve                                     # the embedded demo on 127.0.0.1:8000
    $ secure-run serve --model DIR --policy FILE --gpu --sandbox namespace --socket /run/sr.sock
    $ secure-run serve --host 0.0.0.0 --port 8000 --api-key-file key.txt

Listens on 127.0.0.1 (or a unix socket, created 0600) unless told otherwise; any other address
needs ``--api-key-file`` (exit 2 without it). SIGTERM or SIGINT: stop accepting, let in-flight
requests finish for ``--shutdown-grace`` seconds, cancel the rest (each one audited), close the
worker's sandbox, exit.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import click

from secure_run.runner.options import json_option, run_options, trust_options
from secure_run.runner.progress import hashing_progress

#: shortest API key accepted (``openssl rand -hex 32`` gives 64 characters)
MIN_KEY_CHARS = 16


@click.command("serve")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Model folder (default: the embedded demo model).")
@click.option("--policy", "policy", metavar="FILE",
              help="Policy file or builtin:NAME (default for the demo: builtin:demo; required otherwise).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port, printed on stderr).")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Listen on a unix socket (created 0600) instead of TCP.")
@click.option("--api-key-file", "api_key_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="File holding the bearer token every request must send (not readable by group/others).")
@click.option("--max-queue", "max_queue", type=click.IntRange(0), default=8, show_default=True,
              help="Requests that may wait for the worker; past that a request gets 429.")
@click.option("--max-concurrent", "max_concurrent", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Requests handed to the worker at once; their decode steps run as one batch "
                   "(continuous batching, up to 16 per step).")
@click.option("--shutdown-grace", "shutdown_grace", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds in-flight requests may finish after SIGTERM before they are cancelled.")
@run_options
@trust_options
@json_option
def serve_cmd(**kw: Any) -> None:
    """Serve a verified model over an OpenAI-compatible HTTP API (one warm sandboxed worker)."""
    from secure_run.errors import UsageError
    from secure_run.manifests import load_trust
    from secure_run.runner.pipeline import GenerateOptions

    socket_path: str | None = kw["socket_path"]
    host: str = kw["host"]
    source = click.get_current_context().get_parameter_source
    if socket_path and (source("host") != click.core.ParameterSource.DEFAULT
                        or source("port") != click.core.ParameterSource.DEFAULT):
        raise UsageError("give either --socket PATH or --host/--port, not both", rule="serve.usage")
    api_key = read_api_key(Path(kw["api_key_file"])) if kw["api_key_file"] else None
    check_binding(host, socket_path, api_key)
    listener = bind(host, kw["port"], socket_path)  # before the gate: a busy port costs nothing
    try:
        trust = load_trust(public_key=kw["public_key"], cert_root=kw["cert_root"], identity=kw["identity"],
                           sigstore=kw["sigstore"], issuer=kw["issuer"], trusted_root=kw["trusted_root"])
        options = GenerateOptions(
            model_dir=Path(kw["model_dir"]) if kw["model_dir"] else None, policy=kw["policy"],
            lock=Path(kw["lock"]) if kw["lock"] else None, trust=trust,
            signature=Path(kw["signature"]) if kw["signature"] else None,
            sandbox=kw["sandbox"], gpu=kw["gpu"], dtype=kw["dtype"], memory_mib=kw["memory_mib"],
            build_image=not kw["no_build"], declared_use=kw["declared_use"], operator=kw["operator"],
            accept_license=kw["accept_license"], acknowledgements=tuple(kw["acknowledgements"]),
            audit_log=Path(kw["audit_log"]) if kw["audit_log"] else None,
        )
        _serve(options, listener, kw, api_key, socket_path)
    finally:
        listener.close()
        if socket_path:
            _unlink_quietly(Path(socket_path))


def _serve(options: Any, listener: socket.socket, kw: dict[str, Any], api_key: str | None,
           socket_path: str | None) -> None:
    from secure_run.runner.cmd_generate import interrupts_raise
    from secure_run.runner.serve import ServeSettings, create_app, server
    from secure_run.runner.warm import WarmSession

    def status(stage: str, message: str) -> None:
        if kw["as_json"]:  # JSON lines on stdout, like generate --json (errors: one JSON error line)
            click.echo(json.dumps({"type": "status", "stage": stage, "message": message}), nl=True)
        else:
            click.secho(f"[{stage}] {message}", err=True, dim=True)

    # SIGTERM/SIGINT raise Interrupted (exit 143 / 130) while the session opens. While serving,
    # uvicorn holds them: it runs the app's shutdown (grace, cancel what is left, wait for the
    # audit records, close the worker), restores these handlers and re-raises the signal. The
    # finally closes the session (idempotent) also when a second Ctrl-C made uvicorn skip that.
    with interrupts_raise():
        status("verify", "verifying the model folder and starting one sandboxed worker (loaded once)")
        session = WarmSession.open(options, progress=hashing_progress(False, "verifying"))
        try:
            app = create_app(session, ServeSettings(api_key=api_key, max_concurrent=kw["max_concurrent"],
                                                    max_queue=kw["max_queue"]))
            if socket_path:
                where = f"unix:{socket_path}"
            else:
                addr = listener.getsockname()
                where = f"http://{_url_host(addr[0])}:{addr[1]}"
            status("serve", f"model {session.model_id!r} at {where}/v1 (API key {'required' if api_key else 'off'}); "
                   "SIGTERM or Ctrl-C stops")
            server(app, grace_s=kw["shutdown_grace"], log_level="warning", access_log=False,
                   server_header=False).run(sockets=[listener])
        finally:
            session.close()


def read_api_key(path: Path) -> str:
    """Read the bearer token from ``path``: one line, at least 16 characters, private to its owner.

    Raises:
        UsageError: rule ``serve.api-key``.
    """
    from secure_run.errors import UsageError

    hint = "write a key with `openssl rand -hex 32 > FILE && chmod 600 FILE`"
    try:
        st = path.stat()
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read the API key file {path}: {err}", rule="serve.api-key", path=str(path),
                         hint=hint) from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"the API key file {path} is not a regular file", rule="serve.api-key", path=str(path),
                         hint=hint)
    if st.st_mode & 0o077:
        raise UsageError(f"the API key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o})",
                         rule="serve.api-key", path=str(path), hint=f"chmod 600 {path}")
    key = raw.strip()
    if len(key) < MIN_KEY_CHARS or any(c.isspace() or not c.isprintable() for c in key):
        raise UsageError(f"the API key in {path} must be one line of at least {MIN_KEY_CHARS} printable "
                         "characters without spaces", rule="serve.api-key", path=str(path), hint=hint)
    return key


def check_binding(host: str, socket_path: str | None, api_key: str | None) -> None:
    """Refuse (exit 2) to listen on a non-loopback address without an API key.

    Raises:
        UsageError: rule ``serve.bind-needs-key``.
    """
    from secure_run.errors import UsageError
    from secure_run.runner.serve import is_loopback

    if socket_path is None and not is_loopback(host) and api_key is None:
        raise UsageError(f"--host {host} is reachable from other machines; serving there needs an API key",
                         rule="serve.bind-needs-key",
                         hint="pass --api-key-file FILE, or listen on 127.0.0.1 or a --socket PATH")


#: connections the kernel queues while the gate runs and before uvicorn accepts
LISTEN_BACKLOG = 128


def bind(host: str, port: int, socket_path: str | None) -> socket.socket:
    """The listening socket (a unix socket is created with mode 0600, never over an existing file).

    It listens at once: a client that connects as soon as the address is announced waits in the
    kernel's queue until uvicorn accepts, instead of being refused.

    Raises:
        EnvironmentProblem: rule ``serve.bind``.
    """
    from secure_run.errors import EnvironmentProblem

    try:
        if socket_path:
            path = Path(socket_path)
            if path.exists() or path.is_symlink():
                raise EnvironmentProblem(f"{path} already exists", rule="serve.bind", path=str(path),
                                         hint="remove the stale socket or choose another --socket PATH")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(LISTEN_BACKLOG)
            return sock
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(LISTEN_BACKLOG)
        return sock
    except OSError as err:
        where = socket_path or f"{host}:{port}"
        raise EnvironmentProblem(f"cannot listen on {where}: {err.strerror or err}", rule="serve.bind",
                                 hint="choose another --port / --socket, or stop what uses it") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _unlink_quietly(path: Path) -> None:
    try:
        if path.is_socket():
            path.unlink()
    except OSError as err:  # pragma: no cover - best effort
        print(f"secure-run: could not remove {path}: {err}", file=sys.stderr)


def register(group: click.Group) -> None:
    """Add ``serve`` to the CLI."""
    group.add_command(serve_cmd)
