"""The CLI contract over EVERY command: one JSON line per failure, documented error kinds, exit codes
0/1/2/130, hints that name real commands and flags, NO_COLOR / --quiet / --version / completion.

The command list is walked from the real click tree, so a new command without a failure case here
makes ``test_every_command_has_a_failure_case`` fail.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from secure_run import manifests
from secure_run.model.demo import demo_model_dir
from secure_run.runner.cli import cli
from secure_run.runner.output import ERROR_KINDS

REPO = Path(__file__).resolve().parents[2]
ERROR_KEYS = {"kind", "message", "details", "hint", "path", "rule", "exit_code"}


def _commands(cmd: click.Command = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, (*path, name))
    else:
        yield path


ALL_COMMANDS = sorted(_commands())


def _command(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = cli
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


def _flags(cmd: click.Command) -> set[str]:
    ctx = click.Context(cmd, info_name=cmd.name)
    return {opt for p in cmd.get_params(ctx) for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")}


def invoke(args: list[str], **env: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False, env=env or None)
    return result.exit_code, result.stdout, result.stderr


def the_error_line(stdout: str, code: int) -> dict[str, Any]:
    """Exactly one line on stdout, a failure document with every documented key."""
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {len(lines)}: {stdout[:500]}"
    doc = json.loads(lines[0])
    assert doc["schema_version"] == 1 and doc["ok"] is False, doc
    err = doc["error"]
    assert ERROR_KEYS <= set(err), err
    assert err["kind"] in ERROR_KINDS, f"undocumented error kind {err['kind']!r}"
    assert err["exit_code"] == code == ERROR_KINDS[err["kind"]][0], (err, code)
    assert err["message"]
    return doc


# --------------------------------------------------------------------------------------------
# fixtures: a signed tiny model, a tampered copy, a lock


@dataclass
class World:
    tmp: Path
    model: Path
    tampered: Path
    key: Path
    pub: Path
    lock: Path
    bad_lock: Path
    demo: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    import importlib.util

    spec = importlib.util.spec_from_file_location("mf_helpers_contract", REPO / "tests/manifests/mf_helpers.py")
    assert spec is not None and spec.loader is not None
    helpers = importlib.util.module_from_spec(spec)
    sys.modules["mf_helpers_contract"] = helpers
    spec.loader.exec_module(helpers)
    tmp = tmp_path_factory.mktemp("contract")
    model = helpers.write_model(tmp / "tiny")
    keys = manifests.generate_key(tmp / "org.pem")
    manifests.sign_model(model, keys.private)
    result = manifests.verify_model(model, manifests.KeyTrust.from_file(keys.public))
    tampered = tmp / "tampered"
    shutil.copytree(model, tampered)
    (tampered / "config.json").write_text((tampered / "config.json").read_text() + " ")
    lock = tmp / "org.lock.json"
    manifests.pin_model(lock, "tiny", root_digest=result.root_digest, signer=result.signer,
                        public_key=keys.public.name, path="tiny")
    bad_lock = tmp / "bad.lock.json"
    manifests.pin_model(bad_lock, "tampered", root_digest=result.root_digest, signer=result.signer,
                        public_key=keys.public.name, path="tampered")
    (tmp / "nonempty").mkdir()
    (tmp / "nonempty" / "x.txt").write_text("x\n")
    (tmp / "LICENSE").write_text("MIT License\n")
    (tmp / "LICENSE.link").symlink_to(tmp / "LICENSE")
    (tmp / "code").mkdir()
    (tmp / "code" / "modeling.py").write_text("import os\n")
    (tmp / "bad.jsonl").write_text('{"x": 1}\nnot json\n')  # an audit log with a broken line
    demo = tmp / "demo"
    shutil.copytree(demo_model_dir(), demo, ignore=shutil.ignore_patterns("model.sig"))
    manifests.sign_model(demo, keys.private)
    return World(tmp, model, tampered, keys.private, keys.public, lock, bad_lock, demo)


# Each case: (command path, args builder, expected exit code, expected kind, rule or None).
Case = tuple[tuple[str, ...], Callable[[World], list[str]], int, str, str | None]
CASES: list[Case] = [
    (("ci-check",), lambda w: ["--lock", str(w.bad_lock)], 1, "refused", "CI-FAILED"),
    (("generate",), lambda w: ["--prompt", "hi", "--chat"], 2, "usage", None),
    (("generate",), lambda w: ["--model", str(w.tampered), "--policy", "builtin:demo", "--public-key",
                               str(w.pub), "--prompt", "hi"], 1, "verification", None),
    (("import",), lambda w: [str(w.model), str(w.tmp / "nonempty")], 2, "usage", "IMP-DEST"),
    (("inspect",), lambda w: [str(w.tmp / "code")], 1, "manifest", "INV-CODE"),
    (("keygen",), lambda w: ["--out", str(w.key)], 2, "usage", None),
    (("lock", "add"), lambda w: [str(w.model), "--public-key", str(w.pub)], 2, "usage", None),
    (("lock", "add"), lambda w: [str(w.tampered), "--lock", str(w.tmp / "new.lock.json"), "--public-key",
                                 str(w.pub)], 1, "verification", "DIGEST-MISMATCH"),
    (("policy", "accept-license"), lambda w: ["MIT", str(w.model), "--policy", str(w.tmp / "nope.yaml"),
                                              "--yes"], 2, "policy-file", None),
    (("policy", "check"), lambda w: [str(w.model), "--policy", "builtin:demo"], 1, "policy", None),
    (("policy", "fingerprint"), lambda w: [str(w.tmp / "LICENSE.link")], 2, "usage", None),
    (("policy", "init"), lambda w: ["--from", "builtin:demo", str(w.tmp / "nonempty")], 2, "usage", "POLICY-INIT"),
    (("policy", "init"), lambda w: ["--from", "builtin:nope", str(w.tmp / "p-nope")], 2, "usage", "POLICY-INIT"),
    (("policy", "pin"), lambda w: [str(w.tmp / "code"), "--policy", str(w.tmp / "nope.yaml")], 2, "policy-file", None),
    # the audit commands (branch `audit`, merged into main concurrently): their cases apply wherever
    # the commands exist; the coverage check below is over the commands of the real click tree.
    (("attest",), lambda w: ["--out", str(w.tmp / "a.json"), "--key", str(w.tmp / "no-key.pem")], 2, "usage", None),
    (("audit", "checkpoint"), lambda w: ["--log", str(w.tmp / "bad.jsonl"), "--key", str(w.tmp / "no-key.pem")],
     2, "usage", None),
    (("audit", "code"), lambda w: ["unexpected-argument"], 2, "usage", "CLI-USAGE"),
    (("audit", "keygen"), lambda w: ["--out", str(w.key)], 2, "usage", None),
    (("audit", "show"), lambda w: ["--log", str(w.tmp / "bad.jsonl")], 2, "state-file", None),
    (("audit", "verify"), lambda w: ["--log", str(w.tmp / "bad.jsonl")], 1, "audit", "AUDIT-FORMAT"),
    (("sandbox", "build-image"), lambda w: [], 2, "sandbox", None),  # with DOCKER_HOST unreachable
    (("sandbox", "selftest"), lambda w: ["--triton"], 2, "usage", None),
    (("serve",), lambda w: ["--host", "0.0.0.0"], 2, "usage", "serve.bind-needs-key"),
    (("sign",), lambda w: [str(w.tmp / "code"), "--key", str(w.key)], 1, "manifest", "INV-CODE"),
    (("verify",), lambda w: [str(w.tampered), "--public-key", str(w.pub)], 1, "verification", "DIGEST-MISMATCH"),
    (("verify",), lambda w: [str(w.model)], 2, "usage", None),
    (("verify",), lambda w: [str(w.demo), "--public-key", str(w.pub), "--policy", "builtin:superlinear-exp-v0.1"],
     1, "policy", None),  # the demo (Apache-2.0) under the OML policy: verified, architecture ok, then denied
]


CASES_HERE = [c for c in CASES if c[0] in ALL_COMMANDS]


def test_every_command_has_a_failure_case() -> None:
    covered = {c[0] for c in CASES}
    assert set(ALL_COMMANDS) <= covered, f"commands without a --json failure case: {set(ALL_COMMANDS) - covered}"


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/secure-run-test.sock")


@pytest.mark.parametrize("case", CASES_HERE, ids=lambda c: " ".join(c[0]) + f"->{c[2]}:{c[3]}")
def test_json_failure_contract(case: Case, world: World, isolated: None) -> None:
    path, build, code, kind, rule = case
    got, out, _err = invoke([*path, *build(world), "--json"])
    assert got == code, out
    doc = the_error_line(out, code) if path != ("generate",) else _generate_error(out, code)
    assert doc["error"]["kind"] == kind, doc
    if rule is not None:
        assert doc["error"]["rule"] == rule, doc


def _generate_error(out: str, code: int) -> dict[str, Any]:
    # generate --json is a JSON-lines stream; its LAST line is the failure, with type "error"
    lines = out.splitlines()
    *before, last = lines
    assert all(json.loads(line)["type"] == "status" for line in before)
    doc = the_error_line(last, code)
    assert doc["type"] == "error"
    return doc


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=" ".join)
def test_click_usage_errors_are_json_and_exit_2(path: tuple[str, ...]) -> None:
    code, out, _ = invoke([*path, "--json", "--no-such-option"])
    doc = the_error_line(out, 2)
    assert doc["error"]["kind"] == "usage" and "--no-such-option" in doc["error"]["message"]
    assert doc["error"]["rule"] == "CLI-USAGE" and " ".join(path) in doc["error"]["hint"]


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=" ".join)
def test_click_usage_errors_in_text_exit_2(path: tuple[str, ...]) -> None:
    code, out, err = invoke([*path, "--no-such-option"])
    assert code == 2 and "No such option" in err and out == ""


def test_policy_denial_carries_an_error_object(world: World, isolated: None) -> None:
    code, out, _ = invoke(["policy", "check", str(world.model), "--policy", "builtin:demo", "--json"])
    doc = json.loads(out)
    assert code == 1 and doc["decision"]["allowed"] is False
    denials = [f["check"] for f in doc["decision"]["findings"] if f["result"] == "deny"]
    assert doc["error"]["kind"] == "policy" and doc["error"]["rule"] == denials[0]
    assert len(doc["error"]["details"]) == len(denials)


def test_import_and_keygen_agree_on_existing_outputs(world: World) -> None:
    assert invoke(["import", str(world.model), str(world.tmp / "nonempty")])[0] == 2
    assert invoke(["keygen", "--out", str(world.key)])[0] == 2


def test_every_error_kind_is_documented() -> None:
    """Every SecureRunError subclass's kind is in ERROR_KINDS and in the README's table."""
    import importlib
    import pkgutil

    import secure_run.kernels._checks  # noqa: F401  (kernel-input)

    for package in ("manifests", "policies", "runner"):  # every module: error classes defined anywhere
        pkg = importlib.import_module(f"secure_run.{package}")
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"secure_run.{package}."):
            importlib.import_module(info.name)
    importlib.import_module("secure_run.sandbox")
    from secure_run.errors import SecureRunError

    def subclasses(c: type) -> Iterator[type]:
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    kinds = {SecureRunError.kind} | {c.kind for c in subclasses(SecureRunError)}  # type: ignore[attr-defined]
    assert kinds <= set(ERROR_KINDS), kinds - set(ERROR_KINDS)
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Errors and exit codes"):]
    for kind, (code, _what) in ERROR_KINDS.items():
        assert f"| `{kind}` | {code} |" in table, f"README does not document error kind {kind!r}"


# --------------------------------------------------------------------------------------------
# SIGINT -> 130


def _secure_run() -> list[str]:
    return [sys.executable, "-c", "from secure_run.runner.cli import main; main()"]


def test_sigint_at_a_prompt_exits_130(world: World, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.Popen([*_secure_run(), "policy", "accept-license", "MIT", str(world.model), "--policy",
                             "builtin:demo"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 60
    while "[y/N]" not in seen and time.monotonic() < deadline:  # wait for the confirmation prompt
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
    assert "[y/N]" in seen, seen
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "interrupted" in err


def test_sigint_under_json_is_one_error_line_and_130(tmp_path: Path) -> None:
    # a command that blocks until interrupted, registered on the real group: the handler under
    # test is the group's main(), exactly as for every shipped command.
    script = (
        "import time, click\n"
        "from secure_run.runner.cli import cli\n"
        "@cli.command('block')\n"
        "@click.option('--json', 'as_json', is_flag=True)\n"
        "def block(as_json):\n"
        "    print('ready', flush=True, file=__import__('sys').stderr)\n"
        "    time.sleep(60)\n"
        "cli.main(['block', '--json'], prog_name='secure-run')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    assert proc.stderr.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, _err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    doc = the_error_line(out, 130)
    assert doc["error"]["kind"] == "interrupted"


# --------------------------------------------------------------------------------------------
# hints name real commands and flags


def _hint_strings() -> Iterator[tuple[str, str]]:
    """(where, text) of every hint: ``hint=`` keyword values and the manifests rule remedies."""
    from secure_run.manifests.findings import RULES

    for rule, text in RULES.items():
        yield f"manifests.findings.RULES[{rule}]", text
    for package in ("runner", "manifests", "policies", "sandbox", "model", "kernels"):
        for py in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(py.read_text(encoding="utf-8"))
            constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                         and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                         for t in n.targets if isinstance(t, ast.Name)}
            for node in ast.walk(tree):
                if isinstance(node, ast.keyword) and node.arg == "hint":
                    parts = [n.value if isinstance(n, ast.Constant) else constants[n.id] for n in ast.walk(node.value)
                             if (isinstance(n, ast.Constant) and isinstance(n.value, str))
                             or (isinstance(n, ast.Name) and n.id in constants)]
                    if parts:
                        yield f"{py.relative_to(REPO)}:{node.value.lineno}", "".join(parts)


def test_hints_name_real_commands_and_flags() -> None:
    all_flags = set().union(*(_flags(_command(p)) for p in ALL_COMMANDS)) | _flags(cli)
    groups = {p[0] for p in ALL_COMMANDS if len(p) > 1}
    checked = 0
    problems: list[str] = []
    for where, text in _hint_strings():
        for banned in ("--purpose", "spec/", "DESIGN.md", "huggingface-cli", "pin_model"):
            if banned in text:
                problems.append(f"{where}: names {banned!r}: {text}")
        # `secure-run CMD [SUB] ... --flag`: the command exists and has the flag
        for m in re.finditer(r"`secure-run ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)([^`]*)`", text):
            words = m.group(1).split()
            path = tuple(words[:2]) if words[0] in groups else tuple(words[:1])
            if path not in ALL_COMMANDS:
                problems.append(f"{where}: no command `secure-run {' '.join(path)}`: {text}")
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2)):
                checked += 1
                if flag not in _flags(_command(path)):
                    problems.append(f"{where}: `secure-run {' '.join(path)}` has no {flag}: {text}")
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text):
            checked += 1
            if flag not in all_flags:
                problems.append(f"{where}: no command has {flag}: {text}")
    assert not problems, "\n".join(problems)
    assert checked > 10  # the scan did find flags to check


def test_readme_names_real_commands_and_flags() -> None:
    readme = (REPO / "README.md").read_text()
    assert "huggingface-cli" not in readme and "--purpose" not in readme
    groups = {p[0] for p in ALL_COMMANDS if len(p) > 1}
    for block in re.findall(r"```\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.match(r"\s*secure-run ((?:-\w \S*\s)*)([a-z-]+)(?: ([a-z-]+))?(.*)", line.split("#")[0])
            if not m:
                continue
            path = (m.group(2), m.group(3)) if m.group(2) in groups else (m.group(2),)
            assert path in ALL_COMMANDS, line
            rest = m.group(4) if m.group(2) in groups else f"{m.group(3) or ''} {m.group(4)}"
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                assert flag in _flags(_command(path)), f"{line}: {flag}"


# --------------------------------------------------------------------------------------------
# manners: NO_COLOR, --quiet, --verbose, --version, completion


def test_version() -> None:
    from secure_run import __version__

    code, out, _ = invoke(["--version"])
    assert code == 0 and out.strip() == f"secure-run, version {__version__}"


def test_no_color(world: World) -> None:
    runner = CliRunner()
    args = ["keygen", "--out", str(world.key)]
    coloured = runner.invoke(cli, args, color=True)
    assert coloured.exit_code == 2 and "\x1b[" in coloured.stderr
    plain = runner.invoke(cli, args, color=True, env={"NO_COLOR": "1"})
    assert plain.exit_code == 2 and "\x1b[" not in plain.stderr and "usage:" in plain.stderr
    flag = runner.invoke(cli, ["--no-color", *args], color=True)
    assert "\x1b[" not in flag.stderr


def test_quiet_and_verbose_exclude_each_other() -> None:
    code, _out, err = invoke(["-q", "-v", "inspect", "."])
    assert code == 2 and "exclude each other" in err


def test_quiet_silences_progress(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECURE_RUN_PROGRESS_INTERVAL", "0")
    code, _out, err = invoke(["verify", str(world.model), "--public-key", str(world.pub)])
    assert code == 0 and "verifying: " in err  # progress lines without a terminal
    code, _out, err = invoke(["--quiet", "verify", str(world.model), "--public-key", str(world.pub)])
    assert code == 0 and "verifying" not in err


def test_bash_completion_script() -> None:
    env = {**os.environ, "_SECURE_RUN_COMPLETE": "bash_source"}
    proc = subprocess.run([*_secure_run()], env=env, capture_output=True, text=True, timeout=120)
    # click names the completion function after prog_name; run through main() it is `secure-run`
    assert proc.returncode == 0 and "_secure_run_completion" in proc.stdout, proc.stderr
    env = {**os.environ, "_SECURE_RUN_COMPLETE": "bash_complete", "COMP_WORDS": "secure-run pol", "COMP_CWORD": "1"}
    proc = subprocess.run([*_secure_run()], env=env, capture_output=True, text=True, timeout=120)
    assert "policy" in proc.stdout


# --------------------------------------------------------------------------------------------
# progress without a terminal


def test_line_progress_reports_bytes_rate_and_eta_every_interval() -> None:
    import io

    from secure_run.runner.progress import LineProgress

    now = [100.0]
    out = io.StringIO()
    p = LineProgress("verifying", interval=5.0, stream=out, clock=lambda: now[0])
    p.start(total_bytes=63_300_000_000, total_files=17)
    now[0] += 1.0
    p.advance(1_000_000_000)  # within the first interval: silent
    assert out.getvalue() == ""
    now[0] += 9.0
    p.advance(9_000_000_000)  # 10 GB in 10 s
    now[0] += 1.0
    p.advance(1_000_000_000)  # 1 s after the last line: silent
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[0] == "verifying: 10.00 GB / 63.30 GB (16%), 1.00 GB/s, ETA 0m53s"
    assert lines[1] == "verifying: done, 11.00 GB in 0m11s" and len(lines) == 2


def test_short_work_prints_no_progress() -> None:
    import io

    from secure_run.runner.progress import LineProgress

    out = io.StringIO()
    p = LineProgress("hashing", interval=5.0, stream=out, clock=lambda: 0.0)
    p.start(10, 1)
    p.advance(10)
    p.finish()
    assert out.getvalue() == ""


def test_progress_without_a_tty_for_sign_and_ci_check(world: World, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECURE_RUN_PROGRESS_INTERVAL", "0")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    copy = tmp_path / "copy"
    shutil.copytree(world.model, copy)
    code, _out, err = invoke(["sign", str(copy), "--key", str(world.key), "--json"])
    assert code == 0 and re.search(r"hashing: [\d.]+ (kB|MB|B) / [\d.]+ (kB|MB|B) \(\d+%\), .*/s, ETA", err), err
    code, _out, err = invoke(["ci-check", "--lock", str(world.bad_lock)])
    assert code == 1 and "verifying tampered: " in err


def test_an_unexpected_exception_keeps_the_contract_and_verbose_shows_the_traceback() -> None:
    script = (
        "import sys, click\n"
        "from secure_run.runner.cli import cli\n"
        "@cli.command('boom')\n"
        "@click.option('--json', 'as_json', is_flag=True)\n"
        "def boom(as_json):\n"
        "    raise RuntimeError('library failure')\n"
        "cli.main(sys.argv[1:], prog_name='secure-run')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, "boom", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    doc = the_error_line(proc.stdout, 2)
    assert doc["error"]["kind"] == "internal" and "RuntimeError: library failure" in doc["error"]["message"]
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-c", script, "-v", "boom"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "internal: internal error" in proc.stderr
