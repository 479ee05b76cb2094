#!/usr/bin/env python3
"""Trust step of the secure-run GitHub Action: trust comes from the base branch, never from the PR.

    $ python gate.py trust --repo . --trust-dir .secure-run --lock .secure-run/models.lock.json \\
          [--base BASE_SHA | --trust-source /protected/dir] [--extra-trust .github/workflows ...]

1. ``--base``: list the files the PR changes (``git diff --name-only BASE HEAD``). Trust files are
   the ones under ``--trust-dir`` (keys, lock, policies, blocklists) and ``--extra-trust`` (e.g. the
   workflow and CODEOWNERS); weight files are the ones inside a locked model folder (base or head
   lock) or with a weight suffix. A PR that changes both is refused (exit 1) with an annotation on
   every trust file.
2. The trust directory of the checkout is replaced by the base branch's (read with ``git ls-tree`` /
   ``git show BASE:path`` into a temporary folder first), or by ``--trust-source`` (a protected path
   the caller provides, e.g. a checkout of a separate trust repository at a pinned commit).
3. Every file the lock refers to (keys, certificate roots, Sigstore roots, policies) must lie
   inside the trust directory (exit 2 otherwise): nothing outside it can widen the trust.
4. Weight files (by suffix) outside every model folder of the trusted lock are refused (exit 1,
   ``UNLOCKED-WEIGHTS``): ci-check verifies locked folders only, so they would land unverified.

Without ``--base`` and ``--trust-source`` (push to the default branch, schedule) the commit's own
trust is used: it was reviewed when it landed. Exit codes: 0 ok, 1 refused, 2 usage/setup error.
Standard library only; git is the only external command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5")
SIGNER_FILE_KEYS = ("public_key", "root", "trusted_root")


class GateError(Exception):
    """A refusal (exit 1) or a setup problem (exit 2), with the files to annotate."""

    def __init__(self, message: str, *, exit_code: int, files: tuple[str, ...] = (), title: str = "secure-run") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.files = files
        self.title = title


def _escape(text: str, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def annotate(level: str, message: str, *, file: str | None = None, title: str = "secure-run") -> None:
    props = ([f"file={_escape(file, True)}"] if file else []) + [f"title={_escape(title, True)}"]
    print(f"::{level} {','.join(props)}::{_escape(message)}", flush=True)


def git(repo: Path, *args: str, binary: bool = False) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False)
    if proc.returncode != 0:
        raise GateError(f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace').strip()}", exit_code=2,
                        title="secure-run setup")
    return proc.stdout.decode("utf-8", errors="surrogateescape")


def _norm(path: str) -> str:
    return str(PurePosixPath(os.path.normpath(path)))


def _inside(path: str, folder: str) -> bool:
    folder = _norm(folder)
    return folder == "." or path == folder or path.startswith(folder.rstrip("/") + "/")


def changed_files(repo: Path, base: str) -> list[str]:
    """Paths changed between ``base`` and HEAD (renames as delete + add, so both sides count)."""
    out = git(repo, "diff", "--name-only", "--no-renames", "-z", base, "HEAD")
    return sorted(p for p in out.split("\0") if p)


def _lock_doc(text: str, source: str) -> dict[str, object]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise GateError(f"{source}: not JSON ({err})", exit_code=2, files=(source,)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise GateError(f"{source}: not a secure-run lock (no 'models' mapping)", exit_code=2, files=(source,))
    return doc


def lock_model_folders(lock_text: str, lock_rel: str) -> list[str]:
    """Repository-relative model folders recorded in a lock (entries' ``path``)."""
    doc = _lock_doc(lock_text, lock_rel)
    base = PurePosixPath(lock_rel).parent
    models = doc["models"]
    assert isinstance(models, dict)
    return sorted({_norm(str(base / str(e["path"]))) for e in models.values()
                   if isinstance(e, dict) and isinstance(e.get("path"), str)})


def lock_trust_files(lock_text: str, lock_rel: str) -> list[tuple[str, str]]:
    """(entry name, repository-relative file) for every file a lock entry trusts."""
    doc = _lock_doc(lock_text, lock_rel)
    base = PurePosixPath(lock_rel).parent
    out: list[tuple[str, str]] = []
    models = doc["models"]
    assert isinstance(models, dict)
    for name, entry in sorted(models.items()):
        if not isinstance(entry, dict):
            continue
        signer = entry.get("signer") if isinstance(entry.get("signer"), dict) else {}
        assert isinstance(signer, dict)
        refs = [signer.get(k) for k in SIGNER_FILE_KEYS]
        policy = entry.get("policy")
        if isinstance(policy, str) and not policy.startswith("builtin:"):
            refs.append(policy)
        out.extend((str(name), _norm(str(base / r))) for r in refs if isinstance(r, str))
    return out


def classify(changed: list[str], trust_roots: list[str], model_folders: list[str]) -> tuple[list[str], list[str]]:
    """(trust files, weight files) among ``changed``."""
    trust = [p for p in changed if any(_inside(p, r) for r in trust_roots)]
    weights = [p for p in changed if p not in trust and (
        any(_inside(p, m) for m in model_folders) or p.lower().endswith(WEIGHT_SUFFIXES))]
    return trust, weights


def materialize(repo: Path, base: str, trust_dir: str, into: Path) -> Path:
    """Copy ``trust_dir`` as it is at ``base`` into ``into`` (git ls-tree + git show, no checkout)."""
    listing = git(repo, "ls-tree", "-r", "-z", "--full-tree", base, "--", trust_dir)
    entries = [e for e in listing.split("\0") if e]
    if not entries:
        raise GateError(f"the base branch ({base[:12]}) has no trust directory {trust_dir!r}: add it (keys, lock, "
                        "policies) in a pull request without weights first", exit_code=2, title="secure-run trust")
    root = into / trust_dir
    root.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        meta, path = entry.split("\t", 1)
        mode, kind, obj = meta.split()
        if kind != "blob" or mode not in ("100644", "100755"):
            raise GateError(f"{path} in the base trust directory is a {kind} (mode {mode}); only plain files "
                            "are trusted", exit_code=2, files=(path,), title="secure-run trust")
        target = into / path
        target.parent.mkdir(parents=True, exist_ok=True)
        data = subprocess.run(["git", "-C", str(repo), "cat-file", "blob", obj], capture_output=True, check=True).stdout
        target.write_bytes(data)
    return root


def install_trust(repo: Path, trust_dir: str, source: Path) -> None:
    """Replace the checkout's trust directory by ``source`` (a complete trust directory)."""
    target = repo / trust_dir
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, symlinks=False)


def check_lock_confined(repo: Path, lock_rel: str, trust_dir: str) -> None:
    lock = repo / lock_rel
    if not _inside(_norm(lock_rel), trust_dir):
        raise GateError(f"the lock {lock_rel} is not inside the trust directory {trust_dir}", exit_code=2,
                        files=(lock_rel,), title="secure-run trust")
    if not lock.is_file():
        raise GateError(f"the lock {lock_rel} does not exist in the trust directory", exit_code=2,
                        title="secure-run trust")
    outside = [(n, f) for n, f in lock_trust_files(lock.read_text(encoding="utf-8"), lock_rel)
               if not _inside(f, trust_dir)]
    if outside:
        raise GateError("the lock trusts files outside the trust directory " + trust_dir + ": "
                        + ", ".join(f"{n}: {f}" for n, f in outside)
                        + " (move them into it so that they are read from the base branch)",
                        exit_code=2, files=(lock_rel,), title="secure-run trust")


def refuse_unlocked(weight_files: list[str], locked_folders: list[str]) -> None:
    """Weight files outside every locked model folder would land unverified: refuse them (exit 1)."""
    unlocked = [p for p in weight_files if not any(_inside(p, m) for m in locked_folders)]
    if unlocked:
        for f in unlocked:
            annotate("error", "weight file outside every model folder of the (trusted) lock: it would not be "
                     "verified; pin its folder first (`secure-run lock add DIR --lock FILE`) in a trust pull "
                     "request", file=f, title="secure-run UNLOCKED-WEIGHTS")
        raise GateError(f"refused: {len(unlocked)} weight file(s) outside every locked model folder "
                        f"({', '.join(unlocked[:5])}{' ...' if len(unlocked) > 5 else ''}) [UNLOCKED-WEIGHTS]",
                        exit_code=1, title="secure-run UNLOCKED-WEIGHTS")


def run_trust(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve()
    trust_dir = _norm(args.trust_dir)
    lock_rel = _norm(args.lock)
    if args.base and args.trust_source:
        raise GateError("give --base or --trust-source, not both", exit_code=2)
    if args.base:
        changed = changed_files(repo, args.base)
        head_lock = (repo / lock_rel).read_text(encoding="utf-8") if (repo / lock_rel).is_file() else None
        try:
            base_lock: str | None = git(repo, "show", f"{args.base}:{lock_rel}")
        except GateError:
            base_lock = None
        folders = sorted({*(lock_model_folders(base_lock, lock_rel) if base_lock else []),
                          *(lock_model_folders(head_lock, lock_rel) if head_lock else [])})
        trust, weights = classify(changed, [trust_dir, *map(_norm, args.extra_trust)], folders)
        if trust and weights:
            for f in trust:
                annotate("error", "this pull request changes trust material and model weights together; trust "
                         "is read from the base branch, so land this trust change first in its own pull request "
                         "(reviewed by the CODEOWNERS of the trust directory), then the weights", file=f,
                         title="secure-run TRUST-AND-WEIGHTS")
            raise GateError(f"refused: the pull request changes trust files ({', '.join(trust[:5])}"
                            f"{' ...' if len(trust) > 5 else ''}) and weights ({', '.join(weights[:5])}"
                            f"{' ...' if len(weights) > 5 else ''}) together [TRUST-AND-WEIGHTS]; split it: trust "
                            "first (CODEOWNERS review), weights second", exit_code=1, title="secure-run TRUST-AND-WEIGHTS")
        base_folders = lock_model_folders(base_lock, lock_rel) if base_lock else []
        refuse_unlocked([p for p in weights if p.lower().endswith(WEIGHT_SUFFIXES)], base_folders)
        if trust:
            annotate("warning", f"this pull request changes trust files ({', '.join(trust[:5])}); the check below "
                     "uses the base branch's trust; the change takes effect once merged", title="secure-run trust")
        with tempfile.TemporaryDirectory(prefix="secure-run-trust-") as tmp:
            source = materialize(repo, args.base, trust_dir, Path(tmp))
            install_trust(repo, trust_dir, source)
        print(f"secure-run: trust {trust_dir} read from the base branch {args.base[:12]}; "
              f"{len(changed)} changed file(s): {len(trust)} trust, {len(weights)} weight", file=sys.stderr)
    elif args.trust_source:
        source = Path(args.trust_source).resolve()
        if not source.is_dir():
            raise GateError(f"--trust-source {source} is not a directory", exit_code=2)
        install_trust(repo, trust_dir, source)
        print(f"secure-run: trust {trust_dir} read from {source}", file=sys.stderr)
    else:
        print(f"secure-run: trust {trust_dir} of the checked-out commit (no base: push or schedule)", file=sys.stderr)
    check_lock_confined(repo, lock_rel, trust_dir)
    if not args.base:
        tracked = [p for p in git(repo, "ls-files", "-z").split("\0") if p.lower().endswith(WEIGHT_SUFFIXES)]
        refuse_unlocked(tracked, lock_model_folders((repo / lock_rel).read_text(encoding="utf-8"), lock_rel))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gate.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trust", help="refuse trust+weights PRs; install the base branch's trust")
    t.add_argument("--repo", default=".")
    t.add_argument("--trust-dir", required=True)
    t.add_argument("--lock", required=True)
    t.add_argument("--base", default="")
    t.add_argument("--trust-source", default="")
    t.add_argument("--extra-trust", nargs="*", default=[])
    args = parser.parse_args(argv)
    try:
        return run_trust(args)
    except GateError as err:
        for f in err.files:
            annotate("error", err.message, file=f, title=err.title)
        if not err.files:
            annotate("error", err.message, title=err.title)
        print(f"secure-run: {err.message}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
