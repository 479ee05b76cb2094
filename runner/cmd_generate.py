"""``secure-run generate``: verify -> policy -> sandbox -> worker -> streamed tokens.

    $ secure-run generate --prompt "hello"                 # the embedded demo, Docker sandbox
    $ secure-run generate --model DIR --policy FILE --gpu --sandbox namespace --chat

Text mode streams the completion on stdout and status lines on stderr, ending with a line of
statistics (tokens/s). ``--json`` prints JSON lines on stdout: ``{"type": "status"|"text"|"final"
|"error", ...}`` (schema in the README, "JSON output").

Model text is printed through :class:`~secure_run.runner.output.ModelTextWriter` in text mode, so a
line of model output cannot pose as a status line (``[verify] ...``, ``secure-run: ...``).

SIGINT and SIGTERM stop the run cleanly: every sandbox of the process is stopped through the
sandbox's stop API (:func:`secure_run.sandbox.stop_all`, the warm worker of ``--chat`` included),
an ``interrupted`` audit record is written, and the command exits 130 (SIGINT) or 143 (SIGTERM), with a JSON error line under
``--json``. Further signals are ignored while that cleanup runs (so a second Ctrl-C cannot leave a
container behind); SIGKILL still ends the process, and the sandbox's own wall clock bounds it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from secure_run.runner.options import json_option, run_options, trust_options
from secure_run.runner.output import SETTINGS, ModelTextWriter, emit_line
from secure_run.runner.progress import hashing_progress

if TYPE_CHECKING:
    from secure_run.runner.pipeline import Final, GenerateOptions, Sampling

#: the signals generate handles (exit 128 + signal number: 130 for SIGINT, 143 for SIGTERM)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While active, SIGINT/SIGTERM stop every sandbox and raise :class:`~secure_run.runner.pipeline.Interrupted`.

    See :func:`~secure_run.runner.pipeline.interrupts_stop_sandboxes` (imported lazily: the CLI
    starts without the pipeline's imports).
    """
    from secure_run.runner.pipeline import interrupts_stop_sandboxes

    with interrupts_stop_sandboxes():
        yield


@click.command("generate")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Model folder (default: the embedded demo model).")
@click.option("--policy", "policy", metavar="FILE",
              help="Policy file or builtin:NAME (default for the demo: builtin:demo; required otherwise).")
@click.option("--prompt", "prompt", metavar="TEXT", help="One user message; prints the completion and exits.")
@click.option("--system", "system", metavar="TEXT", help="Optional system message.")
@click.option("--chat", is_flag=True, help="Interactive chat on the terminal: one warm sandbox for the whole chat (weights loaded once; each turn prefills only its new tokens).")
@click.option("--max-new-tokens", "max_new_tokens", type=click.IntRange(1), metavar="N",
              help="Most tokens to generate (default: the policy's limit, guardrails.limits.max_new_tokens).")
@click.option("--stop", "stop", multiple=True, metavar="TEXT",
              help="End the completion at the first TEXT (repeatable); TEXT itself is not printed.")
@click.option("--temperature", type=click.FloatRange(0.0, 100.0),
              help="0 = greedy (default: the verified generation_config.json's, else 0).")
@click.option("--top-p", "top_p", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Nucleus sampling (default: generation_config.json's, else 1).")
@click.option("--top-k", "top_k", type=click.IntRange(0, 1 << 20),
              help="0 = off (default: generation_config.json's, else 0).")
@click.option("--thinking/--no-thinking", "thinking", default=None,
              help="Turn the chat template's thinking switch (enable_thinking) on or off; refused for a "
                   "template without one (default: the template's).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@run_options
@trust_options
@json_option
def generate_cmd(**kw: Any) -> None:
    """Run a verified, policy-approved model inside the sandbox and stream its tokens."""
    from secure_run.errors import UsageError
    from secure_run.manifests import load_trust
    from secure_run.runner.pipeline import GenerateOptions

    as_json: bool = kw["as_json"]
    if kw["chat"] == (kw["prompt"] is not None):
        raise UsageError("give exactly one of --prompt TEXT and --chat")
    if kw["chat"] and (as_json or not _stdin_is_tty()):
        raise UsageError("--chat needs an interactive terminal and no --json", hint="use --prompt TEXT instead")
    trust = load_trust(public_key=kw["public_key"], cert_root=kw["cert_root"], identity=kw["identity"],
                       sigstore=kw["sigstore"], issuer=kw["issuer"], trusted_root=kw["trusted_root"])
    options = GenerateOptions(
        model_dir=Path(kw["model_dir"]) if kw["model_dir"] else None, policy=kw["policy"],
        lock=Path(kw["lock"]) if kw["lock"] else None, trust=trust,
        signature=Path(kw["signature"]) if kw["signature"] else None, max_new_tokens=kw["max_new_tokens"],
        temperature=kw["temperature"], top_p=kw["top_p"], top_k=kw["top_k"], seed=kw["seed"], thinking=kw["thinking"],
        sandbox=kw["sandbox"], gpu=kw["gpu"], dtype=kw["dtype"], memory_mib=kw["memory_mib"],
        build_image=not kw["no_build"], declared_use=kw["declared_use"], operator=kw["operator"],
        accept_license=kw["accept_license"], acknowledgements=tuple(kw["acknowledgements"]),
        audit_log=Path(kw["audit_log"]) if kw["audit_log"] else None, stop=tuple(kw["stop"]),
    )

    with interrupts_raise():
        _run(options, kw, as_json)


def _run(options: GenerateOptions, kw: dict[str, Any], as_json: bool) -> None:
    from secure_run.runner.pipeline import Final, Interrupted, Status, Text, prepare

    def status(stage: str, message: str) -> None:
        if as_json:
            emit_line({"type": "status", "stage": stage, "message": message})
        elif SETTINGS.verbosity >= 0 or stage == "licence":  # -q keeps the licence notice (policy A4)
            click.secho(f"[{stage}] {message}", err=True, dim=True)

    interactive = _stdin_is_tty() and not as_json
    if kw["chat"]:
        _chat(options, kw, status, confirm=_confirm if interactive else None)
        return
    status("verify", "verifying the model folder (inventory, signature, sha256 of every file, lock)")
    session = prepare(options, progress=hashing_progress(as_json, "verifying"),
                      confirm_license=_confirm if interactive else None)
    v = session.verification
    status("verify", f"verified {v.root}: {len(v.files)} files, root sha256:{v.root_digest}"
           + (f" = lock entry {v.lock_name!r}" if v.lock_name else ""))
    status("policy", f"policy {session.policy.name} ({session.policy.mode}): allowed")
    for note in session.notices:
        status("policy", note)
    if session.decision.banner:
        status("licence", session.decision.banner)
    status("sampling", _sampling_line(session.sampling, options.thinking))

    def one_turn(messages: list[dict[str, str]]) -> str:
        reply: list[str] = []
        writer = ModelTextWriter()  # model text cannot pose as a status line
        turn = session.run_turn(messages)
        try:
            for ev in turn:
                if isinstance(ev, Status):
                    status(ev.stage, ev.message)
                elif isinstance(ev, Text):
                    reply.append(ev.text)
                    if as_json:
                        emit_line({"type": "text", "text": ev.text})
                    else:
                        click.echo(writer.render(ev.text), nl=False)
                elif isinstance(ev, Final):
                    if not as_json:
                        click.echo(writer.flush(), nl=False)
                    _final(ev, as_json)
        except Interrupted as err:
            turn.close()  # stops and removes the sandbox if it is running
            session.audit_interrupt(err)
            raise
        return "".join(reply)

    try:
        _turns(kw, one_turn)
    finally:
        session.close()


def _chat(options: GenerateOptions, kw: dict[str, Any], status: Callable[[str, str], None], *,
          confirm: Callable[[str], bool] | None) -> None:
    """``--chat``: one warm session (the gate once, one sandbox, the weights loaded once); each turn
    prefills only the new messages."""
    import threading
    import uuid

    from secure_run.runner.pipeline import Final, Text
    from secure_run.runner.warm import CompletionRequest, SamplingParams, WarmSession

    status("verify", "verifying the model folder (inventory, signature, sha256 of every file, lock)")
    warm = WarmSession.open(options, progress=hashing_progress(False, "verifying"), confirm_license=confirm)
    try:
        v = warm.session.verification
        status("verify", f"verified {v.root}: {len(v.files)} files, root sha256:{v.root_digest}"
               + (f" = lock entry {v.lock_name!r}" if v.lock_name else ""))
        status("policy", f"policy {warm.session.policy.name} ({warm.session.policy.mode}): allowed")
        for note in warm.notices:
            status("policy", note)
        if warm.session.decision.banner:
            status("licence", warm.session.decision.banner)
        status("sampling", _sampling_line(warm.session.sampling, options.thinking))
        status("sandbox", f"model loaded once in a {warm.session.backend.name} sandbox (no network, read-only "
                          "model); the conversation stays warm")
        chosen = warm.session.sampling  # flags, else the verified generation_config.json, else greedy
        sampling = SamplingParams(temperature=chosen.temperature, top_p=chosen.top_p, top_k=chosen.top_k,
                                  seed=options.seed, max_tokens=warm.session.max_new_tokens)
        chat_id = f"chat-{uuid.uuid4().hex[:12]}"
        turn_no = 0

        def one_turn(messages: list[dict[str, str]]) -> str:
            nonlocal turn_no
            turn_no += 1
            reply: list[str] = []
            req = CompletionRequest(request_id=f"{chat_id}-{turn_no}", messages=tuple(messages), prompt=None,
                                    sampling=sampling, client="cli", session_id=chat_id)
            # an Interrupted (Ctrl-C) propagates: complete() cancels the turn in the worker and audits it
            writer = ModelTextWriter()  # model text cannot pose as a status line
            for ev in warm.complete(req, threading.Event()):
                if isinstance(ev, Text):
                    reply.append(ev.text)
                    click.echo(writer.render(ev.text), nl=False)
                elif isinstance(ev, Final):
                    click.echo(writer.flush(), nl=False)
                    _final(ev, False)
            return "".join(reply)

        _turns(kw, one_turn)
    finally:
        warm.close()


def _turns(kw: dict[str, Any], one_turn: Callable[[list[dict[str, str]]], str]) -> None:
    history: list[dict[str, str]] = [{"role": "system", "content": kw["system"]}] if kw["system"] else []
    if not kw["chat"]:
        one_turn([*history, {"role": "user", "content": kw["prompt"]}])
        return
    click.echo("chat: empty line or Ctrl-D ends the session", err=True)
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False, err=True)
        except (EOFError, click.Abort):
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = one_turn(history)
        history.append({"role": "assistant", "content": reply})


def _sampling_line(sampling: Sampling, thinking: bool | None) -> str:
    think = "" if thinking is None else f"; thinking {'on' if thinking else 'off'} (flag)"
    return f"sampling: {sampling.describe()}{think}"


def _stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def _confirm(text: str) -> bool:
    click.echo(text, err=True)
    return click.confirm("Accept?", default=False, err=True)


def _final(ev: Final, as_json: bool) -> None:
    s = ev.stats
    if as_json:
        emit_line({"type": "final", "blocked": ev.blocked, "audit_log": ev.audit_path, "stats": s})
        return
    click.echo("")
    if ev.blocked:
        click.secho("[guardrail] the rest of the completion was blocked by the output guardrail", err=True, fg="yellow")
    tps = s.get("tokens_per_second")
    first = s.get("first_token_seconds")
    click.secho(
        f"[done] {s['generated_tokens']} tokens"
        + (f", {tps:.1f} tokens/s" if tps else "")
        + (f", first token after {first:.2f} s" if first is not None else "")
        + f", {s['seconds']:.2f} s in the {s['backend']} sandbox; audit: {ev.audit_path}",
        err=True,
    )


def register(group: click.Group) -> None:
    """Add ``generate`` to the CLI."""
    group.add_command(generate_cmd)
