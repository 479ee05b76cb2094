"""``secure-run keygen | sign | verify | inspect | import``: signed, verified, clean model folders.

    $ secure-run keygen --out KEY.pem
    $ secure-run import SRC DEST [--dereference] [--json]
    $ secure-run inspect DIR [--json]
    $ secure-run sign DIR --key KEY.pem [--cert LEAF.pem --chain CHAIN.pem] [--signature DIR/model.sig]
    $ secure-run verify DIR (--public-key PUB.pem | --cert-root ROOT.pem --identity ID
                             | --sigstore --identity ID --issuer URL [--trusted-root FILE] | --lock FILE)
                            [--signature FILE] [--lock FILE] [--json]

Each command body is one library call (:mod:`secure_run.manifests`) plus rendering. A progress bar
(rich, on stderr) is shown only when stderr is a terminal and ``--json`` is off. The ``--json``
documents are described in ``manifests/README.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from secure_run.runner.options import json_option, trust_options
from secure_run.runner.output import denial_error, emit_json
from secure_run.runner.progress import hashing_progress

if TYPE_CHECKING:
    from secure_run.policies import Decision


def _json_mode(as_json: bool) -> None:
    click.get_current_context().meta["secure_run.json"] = as_json


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n} bytes"


def _passphrase_options(fn: Any) -> Any:
    fn = click.option("--key-passphrase-file", "pass_file", type=click.Path(dir_okay=False), metavar="FILE",
                      help="Read the private key's passphrase (or the --pkcs11-uri token PIN) from FILE.")(fn)
    return click.option("--key-passphrase-env", "pass_env", metavar="VAR",
                        help="Read the private key's passphrase (or the --pkcs11-uri token PIN) from environment variable VAR.")(fn)


def _stdin_is_terminal() -> bool:
    import sys

    return sys.stdin.isatty()


def _prompt(confirm: bool) -> Any:
    if not _stdin_is_terminal():
        return None
    return lambda: click.prompt("key passphrase", hide_input=True, confirmation_prompt=confirm, err=True)


@click.command("keygen")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), metavar="KEY.pem", help="Private key file to create (0600); KEY.pub.pem is written beside it.")
@click.option("--encrypt", is_flag=True, help="Encrypt the private key (PKCS#8); the passphrase is prompted for unless given by --key-passphrase-env/-file.")
@_passphrase_options
@json_option
def keygen_cmd(out: str, encrypt: bool, pass_env: str | None, pass_file: str | None, as_json: bool) -> None:
    """Create an EC P-256 signing key pair (never overwrites)."""
    _json_mode(as_json)
    from secure_run.errors import UsageError
    from secure_run.manifests import generate_key
    from secure_run.manifests._keys import passphrase_from

    source = passphrase_from(env=pass_env, file=pass_file, prompt=_prompt(True) if encrypt else None)
    if encrypt and source is None:
        raise UsageError("--encrypt needs a passphrase: --key-passphrase-env VAR, --key-passphrase-file FILE, or a terminal to prompt on")
    keys = generate_key(out, passphrase=source() if source else None)
    if as_json:
        emit_json({"ok": True, "command": "keygen", "private_key": str(keys.private), "public_key": str(keys.public), "key_sha256": keys.fingerprint})
        return
    click.echo(f"private key: {keys.private} (mode 0600; keep it secret)")
    click.echo(f"public key:  {keys.public}")
    click.echo(f"key sha256:  {keys.fingerprint}")


@click.command("sign")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--key", "key", type=click.Path(dir_okay=False), metavar="KEY.pem", help="EC private key (PEM, plain or encrypted PKCS#8).")
@click.option("--pkcs11-uri", "pkcs11_uri", metavar="URI", help="Sign with a key on a PKCS#11 token (RFC 7512 URI, see manifests/README.md) instead of --key.")
@_passphrase_options
@click.option("--cert", "cert", type=click.Path(dir_okay=False), metavar="LEAF.pem", help="Signing certificate (certificate method).")
@click.option("--chain", "chain", type=click.Path(dir_okay=False), metavar="CHAIN.pem", help="Intermediate certificate(s), without the root.")
@click.option("--signature", "signature", type=click.Path(dir_okay=False), metavar="FILE", help="Output (default DIR/model.sig).")
@json_option
def sign_cmd(model_dir: str, key: str | None, pkcs11_uri: str | None, pass_env: str | None, pass_file: str | None,
             cert: str | None, chain: str | None, signature: str | None, as_json: bool) -> None:
    """Sign a reviewed model folder (OpenSSF Model Signing v1.0, key or certificate method)."""
    _json_mode(as_json)
    from contextlib import nullcontext

    from secure_run.errors import UsageError
    from secure_run.manifests import sign_model
    from secure_run.manifests._keys import passphrase_from
    from secure_run.manifests.pkcs11 import Pkcs11Signer

    if (key is None) == (pkcs11_uri is None):
        raise UsageError("give exactly one of --key KEY.pem and --pkcs11-uri URI")
    source = passphrase_from(env=pass_env, file=pass_file, prompt=_prompt(False))
    token = Pkcs11Signer(pkcs11_uri, pin=source) if pkcs11_uri else None
    with token if token is not None else nullcontext():
        result = sign_model(model_dir, key, passphrase=source, signer=token, certificate=cert, chain=chain,
                            signature=signature, progress=hashing_progress(as_json, "hashing"))
    if as_json:
        emit_json({"ok": True, "command": "sign", **result.to_json()})
        return
    click.echo(f"signed {result.files} files ({_gb(result.total_bytes)}) -> {result.signature}")
    click.echo(f"root digest: sha256:{result.root_digest}")
    click.echo(f"method: {result.signer.method}, key sha256: {result.signer.key_sha256}")


@click.command("verify")
@click.argument("model_dir", type=click.Path(file_okay=False))
@trust_options
@click.option("--policy", "policy", metavar="FILE",
              help="Also evaluate this licence/guardrail policy (file or builtin:NAME) for the verified folder.")
@json_option
def verify_cmd(
    model_dir: str,
    public_key: str | None,
    cert_root: str | None,
    identity: str | None,
    sigstore: bool,
    issuer: str | None,
    trusted_root: str | None,
    signature: str | None,
    lock: str | None,
    policy: str | None,
    as_json: bool,
) -> None:
    """Verify a model folder: inventory, signature, manifest, lock, every file's sha256 (and a policy).

    With ``--policy`` the folder goes through the same gate as ``generate`` and ``ci-check``
    (:func:`secure_run.runner.gate.run_gate`: verify -> architecture -> policy at stage ``check``).
    """
    _json_mode(as_json)
    from secure_run.manifests import Lock, load_trust, verify_model

    trust = load_trust(public_key=public_key, cert_root=cert_root, identity=identity, sigstore=sigstore, issuer=issuer, trusted_root=trusted_root)
    lock_obj = Lock.load(lock) if lock else None
    if trust is None and lock_obj is None:
        from secure_run.errors import UsageError

        raise UsageError(
            "no trust given: pass --public-key, --cert-root + --identity, --sigstore + --identity + --issuer, or --lock",
            hint="verification needs pinned trust material",
        )
    progress = hashing_progress(as_json, "verifying")
    sig_path = Path(signature) if signature else None
    decision: Decision | None = None
    if policy is not None:  # the policy stack is imported only when asked for (verify alone starts faster)
        from secure_run.policies import load_policy
        from secure_run.runner.gate import run_gate

        gate = run_gate(Path(model_dir), trust, lock=lock_obj, signature=sig_path, progress=progress,
                        policy=load_policy(policy), stage="check")
        result, decision = gate.verification, gate.decision
    else:
        result = verify_model(model_dir, trust, signature=sig_path, lock=lock_obj, progress=progress)
    result.close()  # nothing below reads the folder
    if as_json:
        doc = {"ok": decision is None or decision.allowed, "command": "verify", **result.to_json()}
        if decision is not None:
            doc["policy"] = decision.to_json()
            if not decision.allowed:
                doc["error"] = denial_error(decision)
        emit_json(doc)
        if decision is not None and not decision.allowed:
            click.get_current_context().exit(1)
        return
    speed = f", {result.total_bytes / result.hash_seconds / 1e9:.2f} GB/s" if result.hash_seconds > 0 and result.total_bytes > 1e8 else ""
    click.echo(f"verified {result.root}: {len(result.files)} files, {_gb(result.total_bytes)} hashed in {result.hash_seconds:.2f} s{speed}")
    signer = result.signer
    who = signer.key_sha256 if signer.method == "key" else f"{signer.identity}" + (f" ({signer.issuer})" if signer.issuer else "")
    click.echo(f"signer: {signer.method} {who}")
    click.echo(f"root digest: sha256:{result.root_digest}" + (f" (matches lock entry {result.lock_name!r})" if result.lock_name else ""))
    if decision is not None:
        click.echo(decision.render_text())
        decision.raise_if_denied()


def _render_inspect(doc: dict[str, Any]) -> None:
    click.echo(f"{doc['path']}: {len(doc['files'])} files, {_gb(doc['total_bytes'])}")
    for f in doc["files"]:
        mark = "REFUSED" if f["refused"] else f["kind"]
        click.echo(f"  {f['size']:>15,d}  {mark:<18} {f['name']}")
    t = doc["tensors"]
    if t["count"]:
        click.echo(f"tensors: {t['count']} ({_gb(t['bytes'])})")
        for dtype, v in t["by_dtype"].items():
            click.echo(f"  {dtype:<8} {v['count']:>7} tensors {v['elements']:>16,d} elements {_gb(v['bytes']):>12}")
    for section in ("config", "tokenizer"):
        data = doc[section]
        if data:
            summary = ", ".join(f"{k}={v!r}" for k, v in data.items() if k != "remote_code")
            click.echo(f"{section}: {summary}")
            for p in data["remote_code"]:
                click.echo(f"  remote-code pointer {p['file']}#{p['pointer']}: {p['reason']}")
    if doc["licence_files"]:
        click.echo(f"licence files: {', '.join(doc['licence_files'])}")
    sig = doc["signature"]
    if sig:
        detail = sig.get("error") or f"{sig['method']} method, subject {sig['subject_name']!r}, {sig['root_digest']}, {sig['resources']} files"
        click.echo(f"signature (not verified by inspect): {detail}")
    prov = doc.get("provenance")
    if prov:
        detail = repr(prov["error"]) if "error" in prov else (
            f"{prov['source_repository']!r} at {prov['source_revision']!r}, {prov['files']} files "
            f"({prov['kept']} kept as is, rewritten {prov['rewritten']!r}, dropped {prov['dropped']!r})")
        click.echo(f"provenance ({prov['file']}, covered by the signature once signed): {detail}")
    click.echo(f"findings: {len(doc['findings'])}")


@click.command("inspect")
@click.argument("model_dir", type=click.Path(file_okay=False))
@json_option
def inspect_cmd(model_dir: str, as_json: bool) -> None:
    """Show files, sizes, kinds, tensors by dtype, config, licence files and findings (exit 1 if any finding)."""
    _json_mode(as_json)
    from secure_run.manifests import FindingsError, inspect_model

    report = inspect_model(model_dir)
    doc = report.to_json()
    error = FindingsError(report.findings, root=str(report.root)) if report.findings else None
    if as_json:
        out: dict[str, Any] = {"ok": error is None, "command": "inspect", "report": doc}
        if error is not None:
            out["error"] = error.to_json()
        emit_json(out)
        if error is not None:
            click.get_current_context().exit(error.exit_code)
        return
    _render_inspect(doc)
    if error is not None:
        raise error


@click.command("import")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--dereference", is_flag=True, help="Copy the targets of symbolic links (Hugging Face cache snapshots).")
@click.option("--source-repo", "source_repo", metavar="ID", help="Upstream repository id (writes DEST/provenance.intoto.json).")
@click.option("--source-revision", "source_revision", metavar="SHA", help="Full commit hash the snapshot was downloaded at.")
@json_option
def import_cmd(src: str, dest: str, dereference: bool, source_repo: str | None, source_revision: str | None,
               as_json: bool) -> None:
    """Clean copy of an upstream snapshot: allowlisted files only, remote-code keys stripped."""
    _json_mode(as_json)
    from secure_run.manifests import import_snapshot

    report = import_snapshot(src, dest, dereference=dereference, progress=hashing_progress(as_json, "copying"),
                             source_repo=source_repo, source_revision=source_revision)
    steps = [
        f"secure-run inspect {dest}",
        f"review {Path(dest) / 'import-report.json'} and the files (licence, config, chat template)",
        f"secure-run sign {dest} --key KEY.pem",
        f"secure-run verify {dest} --public-key KEY.pub.pem",
    ]
    if as_json:
        emit_json({"ok": True, "command": "import", "dest": str(report.dest), "report": report.to_json(), "next_steps": steps})
        return
    click.echo(f"imported {len(report.kept)} files into {dest}")
    for d in report.dropped:
        click.echo(f"  dropped {d.name}: [{d.rule}] {d.reason}")
    for s in report.stripped:
        click.echo(f"  stripped {s.file}#{s.pointer}: {s.reason}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    click.echo("next steps:")
    for i, step in enumerate(steps, 1):
        click.echo(f"  {i}. {step}")


def register(group: click.Group) -> None:
    """Add keygen, sign, verify, inspect and import to the ``secure-run`` group."""
    for command in (keygen_cmd, sign_cmd, verify_cmd, inspect_cmd, import_cmd):
        group.add_command(command)
