"""Entry point of the ``secure-run`` console script, and the one place errors are rendered.

The exit-code contract (README, "Errors and exit codes"): 0 ok, 1 refused (verification, policy,
declined confirmation), 2 usage or environment error (click usage errors included), 130
interrupted (SIGINT). Under ``--json`` every failure is ONE JSON line on stdout::

    {"schema_version": 1, "ok": false, "type": "error", "error": {"kind", "message", "details",
     "hint", "path", "rule", "exit_code"}}

Group options (before the command): ``-q/--quiet``, ``-v/--verbose``, ``--no-color`` (or
``NO_COLOR=1``), ``--version``. Shell completion is click's: ``_SECURE_RUN_COMPLETE=bash_source``.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import Any

import click

from secure_run import __version__
from secure_run.errors import SecureRunError
from secure_run.runner.output import (
    SETTINGS,
    emit_line,
    error_document,
    error_object,
    no_color_requested,
)

EXIT_INTERRUPTED = 130


class _SIGINT:
    """The CLI's SIGINT handler: remember the signal, then interrupt like Python's default handler."""

    seen = False

    @classmethod
    def handle(cls, signum: int, frame: FrameType | None) -> None:
        cls.seen = True
        raise KeyboardInterrupt


def _wants_json(args: Sequence[str]) -> bool:
    # Decided from argv: a click usage error happens before any option callback has run.
    return "--json" in args or any(a.startswith("--format=json") for a in args) or (
        "--format" in args and args.index("--format") + 1 < len(args) and args[args.index("--format") + 1] == "json")


def _render(error: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    if as_json:
        emit_line(error_document(error))
        return
    click.secho(f"secure-run: {error['kind']}: ", fg="red", bold=True, err=True, nl=False, color=SETTINGS.color)
    click.echo(text if text is not None else error["message"], err=True)


class _Group(click.Group):
    """click group whose ``main`` keeps the exit-code and JSON contract for every failure."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        code = self._run(argv, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, argv: list[str], prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        as_json = _wants_json(argv)
        _SIGINT.seen = False
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_DFL):
            # Ctrl-C -> exit 130, also where click turns the KeyboardInterrupt into Abort (prompts)
            signal.signal(signal.SIGINT, _SIGINT.handle)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except SecureRunError as err:
            _render(err.to_json(), as_json, err.diagnostics())
            return err.exit_code
        except click.exceptions.Abort as abort:
            if _SIGINT.seen or isinstance(abort.__cause__, KeyboardInterrupt):
                return self._interrupted(as_json)
            _render(error_object("aborted", "aborted: the confirmation was declined", exit_code=1,
                                 hint="answer 'y', or pass --yes"), as_json)
            return 1
        except KeyboardInterrupt:
            return self._interrupted(as_json)
        except click.ClickException as exc:
            if as_json:
                code = 2 if isinstance(exc, click.UsageError) else exc.exit_code
                ctx: click.Context | None = getattr(exc, "ctx", None)
                path = ctx.command_path.split(" ", 1) if ctx is not None else []
                sub = f" {path[1]}" if len(path) == 2 else ""
                emit_line(error_document(error_object(
                    "usage", exc.format_message(), exit_code=code, rule="CLI-USAGE",
                    hint=f"see `secure-run{sub} --help`")))
                return code
            exc.show()
            return 2 if isinstance(exc, click.UsageError) else exc.exit_code
        except BrokenPipeError:
            return 1
        except Exception as exc:  # a bug or an unexpected library error: still the contract, exit 2
            if SETTINGS.verbosity > 0:
                traceback.print_exc()
            _render(error_object("internal", f"internal error: {type(exc).__name__}: {exc}", exit_code=2,
                                 hint="run again with `secure-run -v ...` for the traceback and report it"), as_json)
            return 2
        return rv if isinstance(rv, int) else 0

    @staticmethod
    def _interrupted(as_json: bool) -> int:
        _render(error_object("interrupted", "interrupted (SIGINT)", exit_code=EXIT_INTERRUPTED,
                             hint="run the command again; nothing was written half-way"), as_json)
        return EXIT_INTERRUPTED


def _set_manners(ctx: click.Context, quiet: bool, verbose: int, no_color: bool) -> None:
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other", ctx=ctx)
    SETTINGS.verbosity = -1 if quiet else min(verbose, 2)
    SETTINGS.color = False if (no_color or no_color_requested()) else None
    if SETTINGS.color is False:
        ctx.color = False


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="secure-run")
@click.option("-q", "--quiet", is_flag=True, help="No progress or status lines on stderr (results, errors, licence notices).")
@click.option("-v", "--verbose", count=True, help="More detail: tracebacks of internal errors.")
@click.option("--no-color", "no_color", is_flag=True, help="No colour (also NO_COLOR=1).")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, verbose: int, no_color: bool) -> None:
    """Verify, sign, inspect and run open-weights models without trusting their files.

    Exit codes: 0 ok, 1 refused, 2 usage or environment error, 130 interrupted.
    Shell completion: eval "$(_SECURE_RUN_COMPLETE=bash_source secure-run)" (zsh_source, fish_source).
    """
    _set_manners(ctx, quiet, verbose, no_color)


# Each command family lives in its own module runner/cmd_<family>.py exposing
# ``register(group: click.Group) -> None``; one import + call per module, kept sorted.
from secure_run.runner.cmd_audit import register as _register_audit  # noqa: E402
from secure_run.runner.cmd_ci import register as _register_ci  # noqa: E402
from secure_run.runner.cmd_generate import register as _register_generate  # noqa: E402
from secure_run.runner.cmd_lock import register as _register_lock  # noqa: E402
from secure_run.runner.cmd_manifests import register as _register_manifests  # noqa: E402
from secure_run.runner.cmd_policy import register as _register_policy  # noqa: E402
from secure_run.runner.cmd_sandbox import register as _register_sandbox  # noqa: E402
from secure_run.runner.cmd_serve import register as _register_serve  # noqa: E402

_register_audit(cli)
_register_ci(cli)
_register_generate(cli)
_register_lock(cli)
_register_manifests(cli)
_register_policy(cli)
_register_sandbox(cli)
_register_serve(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="secure-run")


if __name__ == "__main__":  # pragma: no cover
    main()
