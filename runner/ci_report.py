"""Renderings of a ``ci-check`` result for CI systems: GitHub annotations, a job summary, JUnit XML.

Input is the plain ``ci-check --json`` document (``{"ok", "lock", "models": [...]}``), so a saved
report can be rendered again (``python -m secure_run.runner.ci_report --format junit FILE``).

    >>> doc = {"ok": False, "lock": "org.lock.json", "models": [{"name": "m", "status": "refused",
    ...   "path": "models/m", "root_digest": None, "policy": None, "policy_allowed": None, "findings": [],
    ...   "error": {"kind": "verification", "rule": "DIGEST-MISMATCH", "message": "1 file differs",
    ...   "hint": "restore it", "findings": [{"path": "a.safetensors", "rule": "DIGEST-MISMATCH",
    ...   "message": "sha256 differs", "hint": "restore it"}]}}]}
    >>> github_annotations(doc, root=".")[0]
    '::error file=models/m/a.safetensors,title=secure-run DIGEST-MISMATCH (m)::sha256 differs%0Afix: restore it'
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

Doc = dict[str, Any]


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_prop(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _rel(path: str, root: str) -> str:
    """``path`` relative to ``root`` (the repository checkout) when inside it, POSIX form."""
    p = Path(path)
    try:
        rel = os.path.relpath(p.resolve() if p.is_absolute() else (Path.cwd() / p).resolve(), Path(root).resolve())
    except ValueError:
        return p.as_posix()
    return Path(rel).as_posix() if not rel.startswith("..") else p.as_posix()


def _file_of(model: Doc, finding_path: str | None, root: str) -> str | None:
    """The annotated file: the finding's file inside the model folder, else the folder itself."""
    folder = model.get("path")
    if finding_path and folder and finding_path not in (".", ""):
        name = finding_path.split("#", 1)[0]
        candidate = Path(name)
        if not candidate.is_absolute():
            candidate = Path(folder) / name
        return _rel(str(candidate), root)
    if folder:
        return _rel(folder, root)
    return None


def _problems(model: Doc) -> list[tuple[str | None, str, str, str | None]]:
    """(file inside the folder, rule, message, hint) for every reason a model was refused."""
    out: list[tuple[str | None, str, str, str | None]] = []
    err = model.get("error")
    if err:
        findings = err.get("findings") or []
        for f in findings:
            out.append((f.get("path"), f.get("rule") or err.get("rule") or err.get("kind", "error"),
                        f.get("message", ""), f.get("hint")))
        if not findings:
            out.append((None, err.get("rule") or err.get("kind", "error"), err.get("message", ""), err.get("hint")))
    for f in model.get("findings") or []:  # policy findings (deny/warn)
        if f.get("result") == "deny" and not err:
            out.append((None, f.get("check", "policy"), f.get("message", ""), f.get("hint")))
    if model.get("status") == "not_checked":
        out.append((None, "CI-UNLOCATED", "the lock entry records no path; nothing was verified",
                    "record the folder with `secure-run lock add DIR --lock FILE`"))
    return out


def github_annotations(doc: Doc, *, root: str = ".") -> list[str]:
    """``::error file=...::`` workflow commands, one per finding of every refused model."""
    lines: list[str] = []
    for model in doc.get("models", []):
        for fpath, rule, message, hint in _problems(model):
            file = _file_of(model, fpath, root)
            text = message + (f"\nfix: {hint}" if hint else "")
            title = f"secure-run {rule} ({model.get('name')})"
            props = ([f"file={_escape_prop(file)}"] if file else []) + [f"title={_escape_prop(title)}"]
            lines.append(f"::error {','.join(props)}::{_escape_data(text)}")
        for f in model.get("findings") or []:
            if f.get("result") == "warn":
                lines.append(f"::warning title={_escape_prop('secure-run ' + str(f.get('check')))}::"
                             f"{_escape_data(str(f.get('message')))}")
    return lines


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(doc: Doc) -> str:
    """The job summary: one table row per locked model."""
    models = doc.get("models", [])
    passed = sum(1 for m in models if m.get("status") == "ok")
    verdict = "passed" if doc.get("ok") else "FAILED"
    rows = ["## secure-run ci-check: " + verdict, "",
            f"Lock: `{doc.get('lock')}` — {passed}/{len(models)} locked models pass.", "",
            "| model | status | root digest | policy | problem |", "|---|---|---|---|---|"]
    for m in models:
        probs = _problems(m)
        problem = "; ".join(f"{rule}: {msg}" for _f, rule, msg, _h in probs[:3]) + (" …" if len(probs) > 3 else "")
        policy = "-" if not m.get("policy") else (
            f"{m['policy']}: " + ("allowed" if m.get("policy_allowed") else
                                 "denied" if m.get("policy_allowed") is False else "not evaluated"))
        status = {"ok": "✅ ok", "refused": "❌ refused", "not_checked": "⚠️ not checked"}.get(
            m.get("status", ""), str(m.get("status")))
        digest = m.get("root_digest") or "-"
        rows.append(f"| {_cell(m.get('name'))} | {status} | `{_cell(digest)}` | {_cell(policy)} | {_cell(problem or '-')} |")
    return "\n".join(rows) + "\n"


def junit_xml(doc: Doc) -> str:
    """JUnit XML: one testsuite ``secure-run ci-check``, one testcase per locked model."""
    models = doc.get("models", [])
    failures = sum(1 for m in models if m.get("status") != "ok")
    suite = ET.Element("testsuite", name="secure-run ci-check", tests=str(len(models)),
                       failures=str(failures), errors="0", skipped="0")
    for m in models:
        case = ET.SubElement(suite, "testcase", classname="secure-run.ci-check", name=str(m.get("name")))
        if m.get("status") != "ok":
            probs = _problems(m)
            first = probs[0] if probs else (None, "refused", "refused", None)
            failure = ET.SubElement(case, "failure", type=str(first[1]), message=str(first[2]))
            failure.text = "\n".join(
                f"{(_file_of(m, f, '.') or '-')}: [{rule}] {msg}" + (f" (fix: {hint})" if hint else "")
                for f, rule, msg, hint in probs)
    suites = ET.Element("testsuites", name="secure-run", tests=str(len(models)), failures=str(failures))
    suites.append(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Render a saved ``ci-check --json`` document: ``--format github|summary|junit FILE``."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m secure_run.runner.ci_report")
    parser.add_argument("--format", choices=["github", "summary", "junit"], required=True)
    parser.add_argument("--root", default=".")
    parser.add_argument("report")
    ns = parser.parse_args(argv)
    doc = json.loads(Path(ns.report).read_text(encoding="utf-8"))
    if ns.format == "github":
        sys.stdout.write("".join(line + "\n" for line in github_annotations(doc, root=ns.root)))
    elif ns.format == "summary":
        sys.stdout.write(summary_markdown(doc))
    else:
        sys.stdout.write(junit_xml(doc))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
