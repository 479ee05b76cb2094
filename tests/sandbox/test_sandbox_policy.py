"""SandboxPolicy: defaults, one test per validation rule, immutability."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from secure_run.errors import UsageError
from secure_run.sandbox import SandboxPolicy, policy_from_mapping


def test_defaults_are_the_hardened_set() -> None:
    p = SandboxPolicy()
    assert (p.network, p.read_only_root, p.capabilities, p.no_new_privileges) == ("none", True, "none", True)
    assert p.uid == p.gid == 65534
    assert p.seccomp == "secure-run"
    assert p.gpu is False and p.jit_cache_mib == 0 and p.model_dir is None
    assert p.allow_missing == frozenset()
    assert p.env_passthrough == ("CUDA_VISIBLE_DEVICES",)


@pytest.mark.parametrize("field, value", [
    ("network", "bridge"), ("network", "host"), ("read_only_root", False), ("capabilities", "all"),
    ("no_new_privileges", False),
])
def test_fixed_controls_cannot_be_weakened(field: str, value: object) -> None:
    with pytest.raises(UsageError) as info:
        policy_from_mapping({field: value})
    assert info.value.rule == "sandbox.policy"
    assert any(d.startswith(f"{field}:") for d in info.value.details)


@pytest.mark.parametrize("field, value, needle", [
    ("uid", 0, "uid"), ("gid", 0, "gid"), ("pids_limit", 2, "pids_limit"), ("memory_mib", 8, "memory_mib"),
    ("wall_clock_s", 0, "wall_clock_s"), ("wall_clock_s", -1.0, "wall_clock_s"), ("scratch_mib", 0, "scratch_mib"),
    ("seccomp", "unconfined", "seccomp"), ("allow_missing", ["network"], "allow_missing"),
    ("allow_missing", ["read_only_root"], "allow_missing"), ("unknown_field", 1, "unknown_field"),
])
def test_each_rule_names_its_field(field: str, value: object, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        policy_from_mapping({field: value})
    assert any(d.startswith(needle) for d in info.value.details), info.value.details
    assert info.value.exit_code == 2


def test_model_dir_rules(tmp_path: Path) -> None:
    assert SandboxPolicy(model_dir=tmp_path).model_dir == tmp_path.resolve()
    with pytest.raises(ValidationError, match="absolute path"):
        SandboxPolicy(model_dir=Path("relative/model"))
    with pytest.raises(ValidationError, match="not an existing directory"):
        SandboxPolicy(model_dir=tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValidationError, match="not an existing directory"):
        SandboxPolicy(model_dir=tmp_path / "file")
    for system_dir in ("/", "/etc", "/usr"):
        with pytest.raises(ValidationError, match="system directory"):
            SandboxPolicy(model_dir=Path(system_dir))


def test_model_dir_symlink_is_resolved(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert SandboxPolicy(model_dir=tmp_path / "link").model_dir == (tmp_path / "real").resolve()
    (tmp_path / "etc-link").symlink_to("/etc")
    with pytest.raises(ValidationError, match="system directory"):
        SandboxPolicy(model_dir=tmp_path / "etc-link")


@pytest.mark.parametrize("name, message", [
    ("LD_PRELOAD", "changes how code is loaded"), ("LD_LIBRARY_PATH", "changes how code is loaded"),
    ("PYTHONPATH", "set by the sandbox itself"), ("HOME", "set by the sandbox itself"),
    ("PATH", "set by the sandbox itself"), ("lower_case", "must match"), ("A-B", "must match"),
    ("PYTHONINSPECT", "changes how code is loaded"),
])
def test_env_names_are_checked(name: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SandboxPolicy(env={name: "x"})
    with pytest.raises(ValidationError, match=message):
        SandboxPolicy(env_passthrough=(name,))


def test_env_values_are_checked() -> None:
    assert SandboxPolicy(env={"OMP_NUM_THREADS": "4"}).env == {"OMP_NUM_THREADS": "4"}
    with pytest.raises(ValidationError, match="NUL"):
        SandboxPolicy(env={"X": "a\x00b"})


def test_tmpfs_sizes_bounded_by_memory() -> None:
    with pytest.raises(ValidationError, match="must not exceed"):
        SandboxPolicy(memory_mib=64, scratch_mib=200, shm_mib=64)


def test_frozen_and_with_overrides_revalidates() -> None:
    p = SandboxPolicy(env={"OMP_NUM_THREADS": "2"})
    with pytest.raises(ValidationError):
        p.gpu = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.env["LD_PRELOAD"] = "/tmp/evil.so"  # type: ignore[index]
    assert p.with_overrides(gpu=True, pids_limit=64).pids_limit == 64
    with pytest.raises(UsageError):
        p.with_overrides(uid=0)


def test_passthrough_copies_only_named_set_variables() -> None:
    p = SandboxPolicy(env_passthrough=("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"))
    env = {"CUDA_VISIBLE_DEVICES": "1", "HF_TOKEN": "secret", "AWS_SECRET_ACCESS_KEY": "x"}
    assert p.passthrough_env(env) == {"CUDA_VISIBLE_DEVICES": "1"}


def test_json_round_trip() -> None:
    p = SandboxPolicy(memory_mib=1024, allow_missing=frozenset({"swap_limit"}), env={"A": "b"})
    assert policy_from_mapping(p.model_dump(mode="json")) == p
