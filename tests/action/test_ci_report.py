"""``ci-check --format text|json|github|junit`` and the renderers in runner/ci_report.py."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from secure_run import manifests
from secure_run.model.demo import demo_model_dir
from secure_run.runner import ci_report
from secure_run.runner.cli import cli


@pytest.fixture
def locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(a lock whose model passes, a lock whose model has a tampered NOTICE)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    out = []
    for name, tamper in (("good", False), ("bad", True)):
        root = tmp_path / name / "m"
        shutil.copytree(demo_model_dir(), root, ignore=shutil.ignore_patterns("model.sig"))
        keys = manifests.generate_key(tmp_path / name / "k.pem")
        manifests.sign_model(root, keys.private)
        result = manifests.verify_model(root, manifests.KeyTrust.from_file(keys.public))
        lock = tmp_path / name / "lock.json"
        manifests.pin_model(lock, "m", root_digest=result.root_digest, signer=result.signer,
                            public_key=keys.public.name, path="m", policy="builtin:demo")
        if tamper:
            (root / "NOTICE").write_text((root / "NOTICE").read_text() + "x\n")
        out.append(lock)
    return out[0], out[1]


def ci(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, ["ci-check", *args], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def test_github_format_annotates_the_file_and_writes_the_summary(locks: tuple[Path, Path], tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    code, out, _ = ci("--lock", str(locks[1]), "--format", "github", "--summary", str(summary))
    assert code == 1
    assert out.splitlines()[0].startswith("::error file=bad/m/NOTICE,title=secure-run DIGEST-MISMATCH (m)::")
    assert "REFUSED" in out  # the readable report follows the annotations in the log
    assert "| m | ❌ refused |" in summary.read_text()
    code, out, _ = ci("--lock", str(locks[0]), "--format", "github", "--summary", str(summary))
    assert code == 0 and "::error" not in out and "| m | ✅ ok |" in summary.read_text()


def test_junit_format_and_file(locks: tuple[Path, Path], tmp_path: Path) -> None:
    code, out, _ = ci("--lock", str(locks[1]), "--format", "junit", "--junit-xml", str(tmp_path / "j.xml"))
    assert code == 1
    root = ET.fromstring(out)
    assert root.tag == "testsuites" and root.get("failures") == "1"
    failure = root.find("./testsuite/testcase[@name='m']/failure")
    assert failure is not None and failure.get("type") == "DIGEST-MISMATCH" and "bad/m/NOTICE" in (failure.text or "")
    assert ET.parse(tmp_path / "j.xml").getroot().get("failures") == "1"


def test_json_format_equals_json_flag_and_they_cannot_mix(locks: tuple[Path, Path], tmp_path: Path) -> None:
    code, out, _ = ci("--lock", str(locks[1]), "--format", "json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["error"]["rule"] == "CI-FAILED"
    assert doc["models"][0]["error"]["rule"] == "DIGEST-MISMATCH"
    code, out, _ = ci("--lock", str(locks[1]), "--json", "--format", "github")
    assert code == 2 and json.loads(out)["error"]["kind"] == "usage"


def test_a_saved_report_renders_again(locks: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ci("--lock", str(locks[1]), "--json-out", str(tmp_path / "r.json"))
    assert ci_report.main(["--format", "github", str(tmp_path / "r.json")]) == 0
    assert "::error file=bad/m/NOTICE," in capsys.readouterr().out
    assert ci_report.main(["--format", "junit", str(tmp_path / "r.json")]) == 0
    assert ET.fromstring(capsys.readouterr().out).get("failures") == "1"


def test_annotation_text_is_escaped() -> None:
    doc = {"ok": False, "lock": "l", "models": [{"name": "m", "status": "refused", "path": "p", "findings": [],
           "error": {"kind": "refused", "rule": "R", "message": "50%\nsecond line", "hint": None,
                     "findings": [{"path": "a,b:c.json", "rule": "R", "message": "x", "hint": None}]}}]}
    lines = ci_report.github_annotations(doc, root=".")
    assert lines[0].startswith("::error file=p/a%2Cb%3Ac.json,")
    assert ci_report.summary_markdown(doc).count("\n| m |") == 1
