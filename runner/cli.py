"""Entry point of the ``secure-run`` console script.

Errors derived from :class:`secure_run.errors.SecureRunError` are caught once here and rendered
(text on stderr, or a JSON document on stdout under ``--json``); their ``exit_code`` decides the
process status: 0 ok, 1 refused (verification or policy), 2 usage or environment error.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from secure_run import __version__
from secure_run.errors import SecureRunError
from secure_run.runner.output import SCHEMA_VERSION, emit_line


class _Group(click.Group):
    """click group that turns SecureRunError into the documented exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SecureRunError as err:
            as_json = "--json" in sys.argv[1:] or bool(ctx.meta.get("secure_run.json"))
            if as_json:
                # one line, so that it also ends a JSON-lines stream (generate --json)
                emit_line({"schema_version": SCHEMA_VERSION, "ok": False, "error": err.to_json()})
            else:
                click.secho(f"secure-run: {err.kind}: ", fg="red", bold=True, err=True, nl=False)
                click.echo(err.diagnostics(), err=True)
            ctx.exit(err.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="secure-run")
def cli() -> None:
    """Verify, sign, inspect and run open-weights models without trusting their files."""


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
