"""``secure-run lock add``: pin a reviewed, signed model folder in a lock file.

    $ secure-run lock add DIR --lock models.lock.json --public-key org.pub.pem [--name NAME] [--policy REF]

The folder is verified first with the given trust (exactly as ``verify``); then its root digest and
signer are written to the lock entry ``NAME`` (default: the folder's name), with the trust file,
the folder and the policy recorded relative to the lock file's folder so that ``verify --lock``,
``generate --lock`` and ``ci-check --lock`` work from the lock alone. Updating an entry is how a
reviewed weight update lands; an older signed version is refused afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from secure_run.runner.options import json_option, trust_options
from secure_run.runner.output import emit_json
from secure_run.runner.progress import hashing_progress


@click.group("lock")
def lock_group() -> None:
    """Manage lock files (model name -> root digest + signer)."""


@lock_group.command("add")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--name", "name", metavar="NAME", help="Entry name (default: the folder's name).")
@click.option("--policy", "policy", metavar="REF", help="builtin:NAME or a policy file, recorded for ci-check.")
@click.option("--note", "note", metavar="TEXT", help="Free text, e.g. who reviewed it.")
@trust_options
@json_option
def lock_add_cmd(model_dir: str, name: str | None, policy: str | None, note: str | None, public_key: str | None,
                 cert_root: str | None, identity: str | None, sigstore: bool, issuer: str | None,
                 trusted_root: str | None, signature: str | None, lock: str | None, as_json: bool) -> None:
    """Verify MODEL_DIR with the given trust and pin it in --lock FILE."""
    from secure_run.errors import UsageError
    from secure_run.manifests import load_trust, pin_model, verify_model

    if lock is None:
        raise UsageError("--lock FILE is required: the lock file to add the entry to",
                         hint="use your organisation's lock file (the shipped one holds the demo only)")
    trust = load_trust(public_key=public_key, cert_root=cert_root, identity=identity, sigstore=sigstore,
                       issuer=issuer, trusted_root=trusted_root)
    if trust is None:
        raise UsageError("lock add needs the signer's trust: --public-key, --cert-root + --identity, or --sigstore")
    base = Path(lock).resolve().parent

    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), base)

    result = verify_model(model_dir, trust, signature=signature, progress=hashing_progress(as_json, "verifying"))
    if policy is not None and not policy.startswith("builtin:"):
        policy = rel(policy)
    entry = pin_model(lock, name or Path(model_dir).resolve().name, root_digest=result.root_digest,
                      signer=result.signer, public_key=rel(public_key), root=rel(cert_root),
                      trusted_root=rel(trusted_root), path=rel(model_dir), note=note, policy=policy)
    if as_json:
        emit_json({"ok": True, "command": "lock add", "lock": str(lock), "name": entry.name, **entry.to_json()})
        return
    click.echo(f"pinned {entry.name} = {entry.root_digest} ({result.signer.method} signer) in {lock}")


def register(group: click.Group) -> None:
    """Add the ``lock`` command group to the CLI."""
    group.add_command(lock_group)
