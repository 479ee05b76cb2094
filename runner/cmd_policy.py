"""``secure-run policy ...``: check a model folder against a policy, fingerprint a licence, accept it.

    $ secure-run policy check DIR --policy FILE [--use PURPOSE] [--operator NAME] [--json]
    $ secure-run policy fingerprint DIR/LICENSE [--policy FILE] [--json]
    $ secure-run policy accept-license ID DIR --policy FILE --acknowledge ITEM ... [--operator NAME]
    $ secure-run policy init --from builtin:NAME DIR [--expires YYYY-MM-DD] [--json]
    $ secure-run policy pin DIR --policy FILE [--yes] [--json]

``--policy`` takes a file or ``builtin:demo`` / ``builtin:superlinear-exp-v0.1``.
"""

from __future__ import annotations

import getpass
from datetime import datetime
from pathlib import Path

import click

from secure_run.errors import UsageError
from secure_run.runner.options import existing_dir, json_option
from secure_run.runner.output import denial_error, emit_json

policy_option = click.option(
    "--policy",
    "policy_path",
    required=True,
    metavar="FILE",
    help="Policy file, or builtin:demo / builtin:superlinear-exp-v0.1.",
)


def _json_errors(as_json: bool) -> None:
    """Tell the CLI's error handler to render errors as JSON for this invocation."""
    if as_json:
        click.get_current_context().find_root().meta["secure_run.json"] = True


@click.group("policy")
def policy_group() -> None:
    """Licence and guardrail policy: check a folder, fingerprint a licence, record acceptance."""


@policy_group.command("check")
@existing_dir("model_dir")
@policy_option
@click.option("--use", "declared_use", metavar="PURPOSE", help="Declared use of the run (check G5).")
@click.option("--operator", metavar="NAME", help="Look up this operator's licence acceptance (checks L1/L2).")
@click.option("--acceptances", "store_path", type=click.Path(dir_okay=False), help="Acceptance store file.")
@click.option("-v", "--verbose", is_flag=True, help="Show the evidence of every finding.")
@json_option
def check_cmd(
    model_dir: str,
    policy_path: str,
    declared_use: str | None,
    operator: str | None,
    store_path: str | None,
    verbose: bool,
    as_json: bool,
) -> None:
    """Evaluate the policy for MODEL_DIR (stage 'check'; exit 0 allowed, 1 denied, 2 usage).

    Facts established only at run time (signature, sandbox) are reported as info here;
    `secure-run generate` evaluates them.
    """
    from secure_run.policies import AcceptanceStore, RunFacts, evaluate, load_policy
    _json_errors(as_json)
    policy = load_policy(policy_path)
    store = AcceptanceStore(Path(store_path)) if store_path else None
    facts = RunFacts(model_dir=Path(model_dir), declared_use=declared_use, operator=operator)
    decision = evaluate(policy, facts, stage="check", acceptances=store)
    if as_json:
        doc = {"ok": decision.allowed, "command": "policy check", "decision": decision.to_json()}
        error = denial_error(decision)
        if error is not None:
            doc["error"] = error
        emit_json(doc)
    else:
        click.echo(decision.render_text(verbose=verbose))
    if not decision.allowed:
        click.get_current_context().exit(1)


@policy_group.command("fingerprint")
@click.argument("license_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--policy", "policy_path", metavar="FILE", help="Use this policy's catalogue and pins.")
@json_option
def fingerprint_cmd(license_file: str, policy_path: str | None, as_json: bool) -> None:
    """Print the normalised fingerprint of LICENSE_FILE and what it is identified as."""
    from secure_run.policies import classify_license, load_policy
    from secure_run.policies.licenses import builtin_catalog
    _json_errors(as_json)
    path = Path(license_file)
    if path.is_symlink():
        raise UsageError(f"{path} is a symlink", hint="point at the file itself", path=str(path))
    data = path.read_bytes()
    if policy_path:
        lic = load_policy(policy_path).spec.licenses
        match = classify_license(data, lic.entries(), extra_fingerprints=lic.fingerprints,
                                 threshold=lic.similarity_threshold)
    else:
        match = classify_license(data, builtin_catalog())
    if as_json:
        emit_json({"ok": True, "license": match.to_json()})
        return
    click.echo(f"fingerprint  {match.fingerprint}  (normalised-v1)")
    click.echo(f"file sha256  {match.file_sha256}")
    named = match.license_id or match.closest or "-"
    click.echo(f"identified   {match.kind}: {named}" + (f" (similarity {match.similarity})" if match.similarity else ""))
    for line in match.differences:
        click.echo(f"  {line}")


@policy_group.command("accept-license")
@click.argument("license_id")
@existing_dir("model_dir")
@policy_option
@click.option("--operator", metavar="NAME", help="Who accepts (default: the current user).")
@click.option("--acknowledge", "acks", multiple=True, metavar="ITEM", help="An acknowledgement the policy requires (repeat).")
@click.option("--acceptances", "store_path", type=click.Path(dir_okay=False), help="Acceptance store file.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def accept_cmd(
    license_id: str,
    model_dir: str,
    policy_path: str,
    operator: str | None,
    acks: tuple[str, ...],
    store_path: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Record that you accept LICENSE_ID as shipped in MODEL_DIR, under the given policy."""
    from secure_run.policies import AcceptanceStore, accept_license, load_policy
    _json_errors(as_json)
    policy = load_policy(policy_path)
    store = AcceptanceStore(Path(store_path) if store_path else policy.acceptance_store_path())
    who = operator or getpass.getuser()
    if not yes and not as_json:
        banner = policy.banner()
        if banner:
            click.echo(banner, err=True)
        click.confirm(
            f"{who}: accept {license_id} as shipped in {model_dir} under policy {policy.name}"
            f" (acknowledging {', '.join(acks) or 'nothing'})?",
            abort=True,
            err=True,
        )
    record = accept_license(
        policy, Path(model_dir), license_id=license_id, operator=who, acknowledgements=acks, store=store
    )
    if as_json:
        emit_json({"ok": True, "acceptance": record.model_dump(mode="json"), "store": str(store.path)})
    else:
        click.echo(f"accepted {record.license_id} (text {record.license_fingerprint[:16]}...) for {record.operator}; "
                   f"recorded in {store.path}")


@policy_group.command("init")
@click.option("--from", "source", required=True, metavar="builtin:NAME",
              help="Template: builtin:demo or builtin:superlinear-exp-v0.1.")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--expires", type=click.DateTime(formats=["%Y-%m-%d"]), metavar="YYYY-MM-DD",
              help="metadata.expires of the new policy (default: one year from today).")
@json_option
def init_cmd(source: str, dest: str, expires: datetime | None, as_json: bool) -> None:
    """Write a self-contained policy (DEST/policy.yaml + its blocklist) from a built-in template."""
    from secure_run.policies.adopt import init_policy
    _json_errors(as_json)
    result = init_policy(source, Path(dest), expires=expires.date() if expires else None)
    if as_json:
        emit_json({"ok": True, "command": "policy init", "policy": str(result.policy),
                   "files": [str(f) for f in result.files], "expires": result.expires.isoformat(),
                   "template": result.template})
        return
    click.echo(f"wrote {result.policy} from {result.template} (expires {result.expires.isoformat()})")
    for f in result.files[1:]:
        click.echo(f"  + {f}")
    click.echo(f"next: review the model folder, then `secure-run policy pin DIR --policy {result.policy}`")


@policy_group.command("pin")
@existing_dir("model_dir")
@policy_option
@click.option("--yes", is_flag=True, help="Write the changes (without it: show the diff only).")
@json_option
def pin_cmd(model_dir: str, policy_path: str, yes: bool, as_json: bool) -> None:
    """Fill every pin of the policy FILE from the reviewed MODEL_DIR: show the diff, write it on --yes."""
    from secure_run.policies import load_policy
    from secure_run.policies.adopt import apply_pins, plan_pins, unified_diff, write_atomically
    _json_errors(as_json)
    if policy_path.startswith("builtin:"):
        raise UsageError(f"{policy_path} is built in and cannot be edited", rule="POLICY-PIN",
                         hint=f"make your own copy first: `secure-run policy init --from {policy_path} DIR`")
    policy_file = Path(policy_path)
    plan = plan_pins(load_policy(policy_file), Path(model_dir))
    old, new = apply_pins(policy_file, plan)
    diff = unified_diff(old, new, policy_file.name)
    written = bool(yes and plan.changes)
    if written:
        write_atomically(policy_file, new)
    if as_json:
        emit_json({"ok": True, "command": "policy pin", "policy": str(policy_file), "written": written,
                   "changes": [c.to_json() for c in plan.changes], "unresolved": list(plan.unresolved),
                   "notes": list(plan.notes), "diff": diff})
        return
    if not plan.changes:
        click.echo(f"{policy_file}: every pin already matches {model_dir}")
    else:
        click.echo(diff, nl=False)
        click.echo(f"{len(plan.changes)} pin(s) " + ("written to " + str(policy_file) if written
                                                       else "NOT written: review the diff, then add --yes"))
    for line in plan.notes:
        click.echo(f"note: {line}", err=True)
    for line in plan.unresolved:
        click.echo(f"not pinned: {line}", err=True)


def register(group: click.Group) -> None:
    """Add the ``policy`` command family to the CLI."""
    group.add_command(policy_group)

