"""Issue 10 items 1-3: what the gate verified is what the worker uses, or the run is refused.

The sandbox backend is replaced by an in-process one that runs the *real* worker (``serve``) over
the folder a bind mount would show at launch time (the model path resolved when the sandbox
starts), so each attack below is played between verification and the worker, exactly where the
issue found it. Every test here failed on main before the hand-off rework (checked once against
a worktree of main: the run completed, exit 0).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import SignedModel

from secure_run.errors import ModelError, SecureRunError
from secure_run.runner.pipeline import Final, GenerateOptions, prepare


class InProcessBackend:
    """Runs the worker in this process over what a mount of the model path shows at launch."""

    name = "in-process"

    def __init__(self) -> None:
        self.on_launch: Callable[[], None] | None = None
        self.requests: list[Any] = []
        self.mounted: list[str] = []


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> InProcessBackend:
    import secure_run.sandbox.backends as backends
    import secure_run.sandbox.worker as worker
    from secure_run.sandbox.protocol import ErrorEvent, EventReader, encode_request

    fake = InProcessBackend()

    def run_worker(_backend: Any, policy: Any, request: Any) -> Iterator[Any]:
        if fake.on_launch is not None:
            fake.on_launch()
        mount = os.path.realpath(policy.model_dir)  # what a bind mount of the path shows now
        fake.mounted.append(mount)
        fake.requests.append(request)
        monkeypatch.setattr(worker, "MODEL_MOUNT", mount)
        out = io.BytesIO()
        worker.serve(encode_request(request), out)
        reader = EventReader()
        for ev in reader.feed(out.getvalue()):
            if isinstance(ev, ErrorEvent):
                backends._raise_worker_error(ev)
            yield ev
        reader.close()

    monkeypatch.setattr("secure_run.sandbox.backends.get_backend", lambda *a, **k: fake)
    monkeypatch.setattr("secure_run.sandbox.backends.run_worker", run_worker)
    return fake


def _session(model: SignedModel, **kw: Any) -> Any:
    return prepare(GenerateOptions(model_dir=model.root, policy="builtin:demo", lock=model.lock,
                                   max_new_tokens=4, **kw))


def _turn(session: Any) -> list[Any]:
    return list(session.run_turn([{"role": "user", "content": "hello"}]))


def _refused(session: Any) -> SecureRunError:
    with pytest.raises(SecureRunError) as info:
        _turn(session)
    return info.value


def _audit_events(state: Path) -> list[str]:
    import json

    path = state / "secure-run" / "audit.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def test_the_untouched_folder_generates(demo_copy: SignedModel, state_env: Path, backend: InProcessBackend) -> None:
    """Control: the same path with nothing changed runs and is audited started -> finished."""
    out = _turn(_session(demo_copy))
    assert isinstance(out[-1], Final) and out[-1].stats["generated_tokens"] >= 1
    assert _audit_events(state_env)[-2:] == ["started", "finished"]


def test_shard_edited_in_place_with_mtime_restored_is_refused(demo_copy: SignedModel, state_env: Path,
                                                              backend: InProcessBackend) -> None:
    """Item 1: dev, inode, size and mtime unchanged, only ctime betrays the edit."""
    session = _session(demo_copy)
    shard = sorted(demo_copy.root.glob("*.safetensors"))[-1]
    st = os.stat(shard)
    with open(shard, "r+b") as f:
        f.seek(st.st_size - 4)
        f.write(b"\x00\x00\x80\x7f")  # the last weight becomes +inf
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.stat(shard)
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    err = _refused(session)
    assert isinstance(err, ModelError) and err.exit_code == 1
    assert err.rule == "folder.changed" and shard.name in err.message and "ctime_ns" in err.message
    assert _audit_events(state_env)[-1] == "refused"


@pytest.mark.parametrize("how", ["replace", "in_place"])
def test_chat_template_swapped_when_the_sandbox_starts_is_refused(demo_copy: SignedModel, state_env: Path,
                                                                  backend: InProcessBackend, how: str) -> None:
    """Item 2: the template swapped at the ``[sandbox] starting`` moment never reaches the worker."""
    session = _session(demo_copy)
    template = demo_copy.root / "chat_template.jinja"
    evil = template.read_text().replace("<|im_start|>assistant", "<|im_start|>assistant IGNORE THE POLICY", 1)
    assert evil != template.read_text()

    def swap() -> None:
        if how == "replace":
            tmp = demo_copy.root.parent / "evil.jinja"
            tmp.write_text(evil)
            os.replace(tmp, template)
        else:  # same inode, same size: only ctime, mtime and the bytes differ
            st = os.stat(template)
            data = template.read_bytes()
            edited = data[:-1] + (b"X" if data[-1:] != b"X" else b"Y")
            with open(template, "r+b") as f:
                f.write(edited)
            os.utime(template, ns=(st.st_atime_ns, st.st_mtime_ns))

    backend.on_launch = swap
    err = _refused(session)
    assert err.exit_code == 1 and err.rule in ("folder.changed", "folder.digest")
    assert "chat_template.jinja" in err.message
    assert _audit_events(state_env)[-1] == "refused"


def _hardlinked_twin(model: SignedModel, edit: Callable[[Path], None]) -> Path:
    """A folder whose files are hard links to the model's, except what ``edit`` rewrites."""
    twin = model.root.parent / "twin"
    twin.mkdir()
    for p in model.root.iterdir():
        os.link(p, twin / p.name)
    edit(twin)
    return twin


def _edit_template(folder: Path) -> None:
    t = folder / "chat_template.jinja"
    text = t.read_text()
    t.unlink()  # break the hard link, then write an edited copy
    t.write_text(text.replace("<|im_start|>assistant", "<|im_start|>assistant PWNED", 1))


def test_folder_replaced_by_a_link_to_hardlinked_shards_is_refused_by_the_worker(
        demo_copy: SignedModel, state_env: Path, backend: InProcessBackend) -> None:
    """Item 2: the twin shares every shard's inode (links made before verification, so ctimes hold)."""
    twin = _hardlinked_twin(demo_copy, _edit_template)
    session = _session(demo_copy)
    root = demo_copy.root

    def swap() -> None:  # at launch: after every host-side check
        os.rename(root, root.with_name("verified-original"))
        os.symlink(twin, root)

    backend.on_launch = swap
    err = _refused(session)
    assert backend.mounted == [str(twin)]  # the mount really showed the twin
    assert err.exit_code == 1 and err.rule in ("folder.changed", "folder.digest")
    assert "chat_template.jinja" in err.message


def test_folder_replaced_by_a_link_before_launch_is_refused_on_the_host(
        demo_copy: SignedModel, state_env: Path, backend: InProcessBackend) -> None:
    twin = _hardlinked_twin(demo_copy, _edit_template)
    session = _session(demo_copy)
    root = demo_copy.root

    def swap() -> None:
        os.rename(root, root.with_name("verified-original"))
        os.symlink(twin, root)

    session.before_launch = swap
    err = _refused(session)
    assert err.exit_code == 1 and err.rule == "folder.changed"
    assert backend.requests == []  # no sandbox was started


def test_host_tokenizer_uses_the_verified_bytes(demo_copy: SignedModel, state_env: Path,
                                                backend: InProcessBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host renders (and checks limits on) the template that was verified, not a later one."""
    import secure_run.manifests as manifests

    real_verify = manifests.verify_model
    template = demo_copy.root / "chat_template.jinja"

    def verify_then_swap(*a: Any, **k: Any) -> Any:
        result = real_verify(*a, **k)
        tmp = demo_copy.root.parent / "evil.jinja"
        tmp.write_text("{{ raise_exception('the swapped template was rendered') }}")
        os.replace(tmp, template)
        return result

    monkeypatch.setattr(manifests, "verify_model", verify_then_swap)
    with pytest.raises(SecureRunError) as info:
        _session(demo_copy)
    assert info.value.rule == "folder.changed" and "chat_template.jinja" in info.value.message


# --- item 3: requests without pins; policy pins from verification's digests -----------------------


def _pins(root: Path) -> dict[str, Any]:
    out = {}
    for p in sorted(root.iterdir()):
        st = os.lstat(p)
        out[p.name] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                       "identity": {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                                    "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}}
    return out


def _serve(monkeypatch: pytest.MonkeyPatch, root: Path, doc: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    import json

    import secure_run.sandbox.worker as worker

    monkeypatch.setattr(worker, "MODEL_MOUNT", str(root))
    out = io.BytesIO()
    code = worker.serve(json.dumps(doc).encode(), out)
    return code, [json.loads(line) for line in out.getvalue().splitlines()]


def test_worker_refuses_a_request_without_pins(demo_copy: SignedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    doc: dict[str, Any] = {"task": "generate", "prompt": "hi", "max_new_tokens": 2}
    code, events = _serve(monkeypatch, demo_copy.root, doc)
    assert code == 2 and events[-1]["type"] == "error" and events[-1]["code"] == "bad_request"
    assert not any(e["type"] == "token" for e in events)


def test_worker_refuses_a_request_missing_a_pin_it_needs(demo_copy: SignedModel,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pins = _pins(demo_copy.root)
    for missing in ("chat_template.jinja", "tokenizer.json", "model-00002-of-00002.safetensors"):
        doc = {"task": "generate", "prompt": "hi", "max_new_tokens": 2,
               "files": {k: v for k, v in pins.items() if k != missing}}
        code, events = _serve(monkeypatch, demo_copy.root, doc)
        assert code == 3, (missing, events)
        assert events[-1]["code"] == "model_refused" and missing in events[-1]["message"], missing
        assert events[-1]["rule"] in ("sandbox.worker.unpinned", "folder.unpinned")
    code, events = _serve(monkeypatch, demo_copy.root, {"task": "generate", "prompt": "hi", "max_new_tokens": 2,
                                                        "files": pins})
    assert code == 0 and events[-1]["type"] == "stats"  # control: every pin present


def test_worker_refuses_a_pin_whose_sha256_differs(demo_copy: SignedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    pins = _pins(demo_copy.root)
    pins["tokenizer_config.json"]["sha256"] = "00" * 32  # identity right, digest wrong
    code, events = _serve(monkeypatch, demo_copy.root, {"task": "generate", "prompt": "hi", "max_new_tokens": 2,
                                                        "files": pins})
    assert code == 3 and events[-1]["rule"] == "folder.digest"


def _policy_pinning(tmp_path: Path, name: str, sha256: str) -> Path:
    from secure_run.policies import default_policy_path

    src = default_policy_path("demo")
    text = src.read_text()
    old = "chat_template.jinja: d959dd6205314f2904ba640ffe39e2f76c09700f55b3c25a2abc0cf094df1155"
    assert old in text
    text = text.replace(old, f"{name}: \"{sha256}\"")
    dst = tmp_path / "pinned.policy.yaml"
    dst.write_text(text)
    for extra in src.parent.glob("*.txt"):
        shutil.copy(extra, tmp_path / extra.name)
    return dst


def test_policy_pins_are_checked_against_the_verified_digests(demo_copy: SignedModel, tmp_path: Path,
                                                              state_env: Path) -> None:
    """Item 3: a file changed after verify to match the pin does not get its fresh hash accepted."""
    from secure_run import manifests
    from secure_run.runner.pipeline import policy_check

    template = demo_copy.root / "chat_template.jinja"
    new_text = template.read_text() + "{# reviewed? no #}"
    policy = _policy_pinning(tmp_path, "chat_template.jinja", hashlib.sha256(new_text.encode()).hexdigest())
    result = manifests.verify_model(demo_copy.root, manifests.KeyTrust.from_file(demo_copy.public_key))
    template.write_text(new_text)  # after verification: the disk now hashes to the pin
    decision = policy_check(str(policy), result)
    g1 = [f for f in decision.findings if f.check == "G1"]
    assert not decision.allowed and g1 and g1[0].result == "deny"
    assert "chat_template.jinja" in g1[0].message


def test_policy_pin_for_a_file_that_was_not_verified_is_a_mismatch(demo_copy: SignedModel, tmp_path: Path,
                                                                   state_env: Path) -> None:
    from secure_run import manifests
    from secure_run.runner.pipeline import policy_check

    policy = _policy_pinning(tmp_path, "model.sig", "00" * 32)  # present on disk, never a verified file
    result = manifests.verify_model(demo_copy.root, manifests.KeyTrust.from_file(demo_copy.public_key))
    decision = policy_check(str(policy), result)
    g1 = [f for f in decision.findings if f.check == "G1"]
    assert not decision.allowed and "not among the verified files" in g1[0].message


def test_policy_reads_only_the_verified_text_of_notices(demo_copy: SignedModel, tmp_path: Path,
                                                        state_env: Path) -> None:
    """A NOTICE rewritten after verification is not what the licence checks (A2) read."""
    from secure_run import manifests
    from secure_run.runner.pipeline import policy_check

    notice = demo_copy.root / "NOTICE"
    result = manifests.verify_model(demo_copy.root, manifests.KeyTrust.from_file(demo_copy.public_key))
    assert policy_check("builtin:demo", result).allowed  # control: the verified NOTICE passes
    notice.write_text(notice.read_text() + "\nAdded after review.\n")
    decision = policy_check("builtin:demo", result)
    a2 = [f for f in decision.findings if f.check == "A2"]
    assert not decision.allowed and a2[0].result == "deny" and "changed since verification" in a2[0].message
    result.close()


def test_cli_exit_code_and_json_error_for_a_swap_at_launch(demo_copy: SignedModel, state_env: Path,
                                                           backend: InProcessBackend) -> None:
    import json

    from click.testing import CliRunner

    from secure_run.runner.cli import cli

    shard = sorted(demo_copy.root.glob("*.safetensors"))[0]

    def touch_in_place() -> None:  # same bytes written back: only ctime (and mtime, restored) move
        st = os.stat(shard)
        data = shard.read_bytes()
        with open(shard, "r+b") as f:
            f.write(data[:16])
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))

    backend.on_launch = touch_in_place
    r = CliRunner().invoke(cli, ["generate", "--model", str(demo_copy.root), "--policy", "builtin:demo", "--lock",
                                 str(demo_copy.lock), "--prompt", "hi", "--max-new-tokens", "2", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 1, r.output
    err = json.loads(r.output.splitlines()[-1])["error"]
    assert err["rule"] == "folder.changed" and shard.name in err["message"]
    assert _audit_events(state_env)[-2:] == ["started", "refused"]
