"""Options shared by several commands, declared once (STYLE.md habit 13)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    # ctx.meta is shared by the whole context chain: the group's error handler reads it to render
    # refusals as JSON too.
    if value:
        ctx.meta["secure_run.json"] = True
    return value


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    callback=_remember_json,
    help="Print one JSON document (stable schema) instead of text.",
)


def existing_dir(name: str, **kwargs: Any) -> Callable[[F], F]:
    """A positional argument that must be an existing directory (not followed if a symlink is refused later)."""
    return click.argument(name, type=click.Path(exists=True, file_okay=False, dir_okay=True), **kwargs)
