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


def trust_options(func: F) -> F:
    """The pinned-trust options shared by ``verify``, ``generate`` and ``ci-check``."""
    options = [
        click.option("--public-key", "public_key", type=click.Path(dir_okay=False), metavar="PUB.pem",
                     help="Pinned signer public key."),
        click.option("--cert-root", "cert_root", type=click.Path(dir_okay=False), metavar="ROOT.pem",
                     help="Pinned root certificate(s)."),
        click.option("--identity", "identity", metavar="ID",
                     help="Signer identity: certificate SAN (or sha256:LEAF) / keyless identity."),
        click.option("--sigstore", "sigstore", is_flag=True, help="Keyless Sigstore bundle, verified offline."),
        click.option("--issuer", "issuer", metavar="URL", help="OIDC issuer of the keyless identity."),
        click.option("--trusted-root", "trusted_root", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Sigstore trusted_root.json (default: the pinned production root)."),
        click.option("--signature", "signature", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Signature bundle (default DIR/model.sig)."),
        click.option("--lock", "lock", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Lock file: the root digest and signer must equal the pinned entry."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def run_options(func: F) -> F:
    """The sandbox, licence and audit options shared by ``generate`` and ``serve``."""
    options = [
        click.option("--sandbox", "sandbox", type=click.Choice(["docker", "namespace"]), default="docker",
                     show_default=True),
        click.option("--gpu", is_flag=True, help="Run on the GPU (NVIDIA), Triton kernels."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Compute dtype (default: the checkpoint's)."),
        click.option("--memory-mib", "memory_mib", type=click.IntRange(64), help="Sandbox memory limit."),
        click.option("--no-build", "no_build", is_flag=True, help="Refuse instead of building a missing sandbox image."),
        click.option("--use", "declared_use", metavar="USE", help="Declared use, checked against the policy."),
        click.option("--operator", metavar="ID", help="Operator id for licence acceptance and audit (default: $USER)."),
        click.option("--accept-license", "accept_license", metavar="ID",
                     help="Accept the model's licence (its exact text, under this policy) before the model runs."),
        click.option("--acknowledge", "acknowledgements", multiple=True, metavar="ITEM",
                     help="Acknowledgement required by the policy for --accept-license (repeatable)."),
        click.option("--audit-log", "audit_log", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Audit log (default: the policy's, under $XDG_STATE_HOME/secure-run)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
