"""``import --source-repo ID --source-revision SHA`` (issue 14.4): a provenance statement inside the
folder, covered by its signature, shown by ``inspect``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner
from test_import_snapshot import UPSTREAM_CONFIG, upstream_snapshot

from secure_run.manifests import KeyTrust, generate_key, sign_model, verify_model
from secure_run.manifests.findings import VerificationFailed
from secure_run.manifests.provenance import PROVENANCE_FILE, SLSA_PROVENANCE_TYPE
from secure_run.runner.cli import cli

REPO = "org/Superlinear-Exp-v0.1"
REV = "0123456789abcdef0123456789abcdef01234567"


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_import_writes_provenance_from_upstream_to_result(tmp_path: Path) -> None:
    src = upstream_snapshot(tmp_path / "snap")
    (src / PROVENANCE_FILE).write_text('{"forged": "by upstream"}')  # never trusted, never kept
    dest = tmp_path / "clean"
    code, out = run("import", str(src), str(dest), "--source-repo", REPO, "--source-revision", REV, "--json")
    assert code == 0, out
    doc = json.loads((dest / PROVENANCE_FILE).read_text())
    assert doc["_type"] == "https://in-toto.io/Statement/v1" and doc["predicateType"] == SLSA_PROVENANCE_TYPE
    build = doc["predicate"]["buildDefinition"]
    assert build["externalParameters"]["source"] == {"repository": REPO, "revision": REV}
    deps = build["resolvedDependencies"]
    assert deps[0] == {"uri": f"https://huggingface.co/{REPO}", "digest": {"gitCommit": REV}}
    upstream = {d["name"]: d["digest"]["sha256"] for d in deps[1:]}
    assert upstream["config.json"] == hashlib.sha256(UPSTREAM_CONFIG.encode()).hexdigest()
    # resulting digests: every kept file, as written
    subjects = {s["name"]: s["digest"]["sha256"] for s in doc["subject"]}
    kept_files = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {"import-report.json", PROVENANCE_FILE}
    assert set(subjects) == kept_files
    assert all(subjects[n] == _sha(dest / n) for n in subjects)
    internal = build["internalParameters"]
    rewritten = {r["name"]: r for r in internal["rewritten"]}
    assert rewritten["config.json"]["removed_pointers"] == ["/auto_map"]
    assert rewritten["config.json"]["upstream_sha256"] == upstream["config.json"] != subjects["config.json"]
    dropped = {d["name"]: d["rule"] for d in internal["dropped"]}
    assert dropped["modeling_superlinear_exp.py"] == "INV-CODE" and dropped[PROVENANCE_FILE] == "IMP-STALE"
    assert "forged" not in (dest / PROVENANCE_FILE).read_text()


def test_provenance_is_signed_with_the_folder_and_shown_by_inspect(tmp_path: Path) -> None:
    src = upstream_snapshot(tmp_path / "snap")
    dest = tmp_path / "clean"
    assert run("import", str(src), str(dest), "--source-repo", REPO, "--source-revision", REV)[0] == 0
    keys = generate_key(tmp_path / "org.pem")
    sign_model(dest, keys.private)
    result = verify_model(dest, KeyTrust.from_file(keys.public))
    assert PROVENANCE_FILE in [f.name for f in result.files]
    code, out = run("inspect", str(dest))
    assert code == 0, out
    assert f"provenance ({PROVENANCE_FILE}, covered by the signature once signed): '{REPO}' at '{REV}'" in out
    code, out = run("inspect", str(dest), "--json")
    prov = json.loads(out)["report"]["provenance"]
    assert prov["source_revision"] == REV and "config.json" in prov["rewritten"]
    # an edited provenance no longer verifies
    path = dest / PROVENANCE_FILE
    path.write_text(path.read_text().replace(REV, "f" * 40))
    try:
        verify_model(dest, KeyTrust.from_file(keys.public))
    except VerificationFailed as err:
        assert PROVENANCE_FILE in err.message or any(PROVENANCE_FILE in f.path for f in err.findings)
    else:
        raise AssertionError("an edited provenance statement verified")


def test_source_options_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    src = upstream_snapshot(tmp_path / "snap")
    for extra, needle in (
        (["--source-repo", REPO], "go together"),
        (["--source-repo", REPO, "--source-revision", "main"], "is not a full commit hash"),
        (["--source-repo", "../etc", "--source-revision", REV], "is not a repository id"),
    ):
        dest = tmp_path / f"d{len(extra)}{needle[:3]}"
        code, out = run("import", str(src), str(dest), *extra, "--json")
        assert code == 2, out
        err = json.loads(out)["error"]
        assert err["rule"] == "IMP-SOURCE" and needle in err["message"]
        assert not dest.exists()


def test_import_without_source_writes_no_provenance(tmp_path: Path) -> None:
    src = upstream_snapshot(tmp_path / "snap")
    dest = tmp_path / "clean"
    assert run("import", str(src), str(dest))[0] == 0
    assert not (dest / PROVENANCE_FILE).exists()
    code, out = run("inspect", str(dest), "--json")
    assert json.loads(out)["report"]["provenance"] is None
