"""The one sandbox policy object both launch backends enforce (spec/sandbox.md sections 4 and 6.1).

    >>> p = SandboxPolicy(memory_mib=2048, pids_limit=128, wall_clock_s=60)
    >>> p.network, p.read_only_root, p.capabilities, p.no_new_privileges
    ('none', True, 'none', True)
    >>> p.with_overrides(gpu=True).gpu
    True

Controls that are not configurable are still fields (with a single allowed value), so that a
serialized policy describes the whole sandbox: no network, read-only root, no capabilities,
no-new-privileges. Controls a backend is allowed to miss are listed explicitly in
``allow_missing`` (default: none); a backend that cannot apply any other control refuses to start.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from secure_run.errors import UsageError

__all__ = [
    "JIT_CACHE_MOUNT",
    "HANDOFF_MOUNT",
    "MODEL_MOUNT",
    "SCRATCH_MOUNT",
    "ControlName",
    "SandboxPolicy",
    "policy_from_mapping",
]

#: Where the model folder appears inside the sandbox (read-only, fixed).
MODEL_MOUNT = "/model"
#: Where the worker reaches the host's hand-off socket of sealed, verified files (sandbox/handoff.py).
HANDOFF_MOUNT = "/handoff"
#: The small tmpfs scratch directory (noexec, nosuid, nodev); also HOME and TMPDIR.
SCRATCH_MOUNT = "/tmp"
#: Optional tmpfs for JIT caches (Triton); the only writable place where mapping code is allowed.
JIT_CACHE_MOUNT = "/var/cache/jit"

#: Controls a backend may be allowed to miss (nothing else can ever be waived).
ControlName = Literal["cgroup_pids", "cgroup_memory", "cgroup_cpu", "swap_limit", "seccomp"]

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
#: Variables the backends set themselves; a policy may not override them.
_RESERVED_ENV = frozenset(
    {"HOME", "PATH", "TMPDIR", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
     "TRITON_CACHE_DIR", "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_VISIBLE_DEVICES"}
)
#: Prefixes that change how programs load code; never accepted from a policy.
_FORBIDDEN_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHONINSPECT", "PYTHONBREAKPOINT", "BASH_FUNC_")
_SYSTEM_DIRS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/root", "/run",
                          "/sbin", "/sys", "/usr", "/var", "/home", "/tmp"})


class SandboxPolicy(BaseModel):
    """Everything the sandbox enforces, validated once at construction (frozen, no extra keys).

    Attributes:
        network: always ``"none"``: no interface but loopback, nothing reachable.
        read_only_root: always true: the root filesystem is mounted read-only.
        capabilities: always ``"none"``: every Linux capability dropped (bounding set too).
        no_new_privileges: always true (``PR_SET_NO_NEW_PRIVS``; setuid binaries gain nothing).
        model_dir: host folder mounted read-only at :data:`MODEL_MOUNT`; ``None`` mounts nothing.
            The runner mounts no model folder: it hands the worker sealed copies instead.
        handoff_dir: host folder (holding only the hand-off socket) mounted read-only, no exec, at
            :data:`HANDOFF_MOUNT`; ``None`` mounts nothing.
        uid: non-root user id the sandboxed process runs as.
        gid: non-root group id (supplementary groups are cleared).
        scratch_mib: size of the tmpfs at :data:`SCRATCH_MOUNT` (noexec, nosuid, nodev).
        jit_cache_mib: size of an extra tmpfs at :data:`JIT_CACHE_MOUNT` that allows mapping code
            (needed by Triton's compiled launchers); 0 (default) means no such mount.
        shm_mib: size of the private ``/dev/shm`` (never the host's IPC namespace).
        pids_limit: most processes + threads at once (cgroup pids controller).
        memory_mib: memory limit (cgroup); swap is limited to the same value (no swap).
        cpus: CPU quota in cores (docker ``nano_cpus``; cgroup ``cpu.max`` / CFS quota); the default
            is every core of this host, so a sandbox cannot take more than the machine has.
        wall_clock_s: the sandbox is killed (the whole process tree) after this many seconds.
        nofile: open-file limit (soft = hard).
        gpu: pass NVIDIA GPUs through (docker: ``device_requests``; namespace: ``/dev/nvidia*``).
        seccomp: ``"secure-run"`` (our allowlist profile, shipped as ``seccomp.json``) or
            ``"docker-default"`` (the engine's built-in profile; docker backend only).
        env: extra environment variables (names ``[A-Z_][A-Z0-9_]*``; loader and reserved
            variables refused).
        env_passthrough: names of host variables copied in when set (e.g. CUDA_VISIBLE_DEVICES).
        allow_missing: controls a backend may skip when the host cannot provide them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    network: Literal["none"] = "none"
    read_only_root: Literal[True] = True
    capabilities: Literal["none"] = "none"
    no_new_privileges: Literal[True] = True
    model_dir: Path | None = None
    handoff_dir: Path | None = None
    uid: int = Field(default=65534, ge=1, le=2**31 - 2)
    gid: int = Field(default=65534, ge=1, le=2**31 - 2)
    scratch_mib: int = Field(default=256, ge=1, le=65536)
    jit_cache_mib: int = Field(default=0, ge=0, le=16384)
    shm_mib: int = Field(default=64, ge=1, le=65536)
    pids_limit: int = Field(default=256, ge=8, le=65536)
    memory_mib: int = Field(default=8192, ge=32, le=4 * 1024 * 1024)
    cpus: float = Field(default_factory=lambda: float(os.cpu_count() or 1), ge=0.01, le=4096.0)
    wall_clock_s: float = Field(default=1800.0, gt=0.0, le=7 * 24 * 3600.0)
    nofile: int = Field(default=1024, ge=16, le=1 << 20)
    gpu: bool = False
    seccomp: Literal["secure-run", "docker-default"] = "secure-run"
    env: Mapping[str, str] = Field(default_factory=lambda: MappingProxyType({}))
    env_passthrough: tuple[str, ...] = ("CUDA_VISIBLE_DEVICES",)
    allow_missing: frozenset[ControlName] = frozenset()

    @field_validator("model_dir", "handoff_dir")
    @classmethod
    def _check_mounted_dir(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        field = info.field_name
        if not value.is_absolute():
            raise ValueError(f"{field} must be an absolute path, got {str(value)!r}")
        if not value.is_dir():
            raise ValueError(f"{field} {str(value)!r} is not an existing directory")
        resolved = value.resolve(strict=True)
        if str(resolved) in _SYSTEM_DIRS:
            raise ValueError(f"{field} {str(resolved)!r} is a system directory; mount only the folder it names")
        return resolved

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: Mapping[str, str]) -> Mapping[str, str]:
        for name, val in value.items():
            _check_env_name(name)
            if "\x00" in val or len(val) > 4096:
                raise ValueError(f"env value of {name} contains NUL or is longer than 4096 characters")
        return MappingProxyType(dict(value))  # read-only, like the rest of the frozen policy

    @field_serializer("env")
    def _dump_env(self, value: Mapping[str, str]) -> dict[str, str]:
        return dict(value)

    @field_validator("env_passthrough")
    @classmethod
    def _check_passthrough(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            _check_env_name(name)
        return value

    @model_validator(mode="after")
    def _check_sizes(self) -> SandboxPolicy:
        if self.scratch_mib + self.jit_cache_mib + self.shm_mib > self.memory_mib * 4:
            raise ValueError("scratch_mib + jit_cache_mib + shm_mib must not exceed 4 x memory_mib")
        return self

    def with_overrides(self, **changes: Any) -> SandboxPolicy:
        """A copy with some fields changed, validated again (``model_copy`` does not validate)."""
        data = self.model_dump()
        data.update(changes)
        return policy_from_mapping(data)

    def passthrough_env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """The host variables named in ``env_passthrough`` that are set (``environ`` defaults to os.environ)."""
        source = os.environ if environ is None else environ
        return {name: source[name] for name in self.env_passthrough if name in source and "\x00" not in source[name]}


def _check_env_name(name: str) -> None:
    if not _ENV_NAME.match(name):
        raise ValueError(f"environment variable name {name!r} must match [A-Z_][A-Z0-9_]* (at most 64 characters)")
    if name in _RESERVED_ENV:
        raise ValueError(f"environment variable {name} is set by the sandbox itself and cannot be overridden")
    if name.startswith(_FORBIDDEN_ENV_PREFIXES):
        raise ValueError(f"environment variable {name} changes how code is loaded and is refused")


def policy_from_mapping(data: dict[str, Any]) -> SandboxPolicy:
    """Build a policy from plain data (e.g. a YAML/JSON document), with JSON-style coercions.

    Raises:
        UsageError: naming the field and the rule that failed (rule ``sandbox.policy``).
    """
    try:
        return SandboxPolicy.model_validate(data, strict=False)
    except ValidationError as err:
        details = [f"{'.'.join(str(p) for p in e['loc']) or '(policy)'}: {e['msg']}" for e in err.errors()]
        raise UsageError(
            "invalid sandbox policy",
            details=details,
            rule="sandbox.policy",
            hint="fix the named fields; see secure_run.sandbox.policy.SandboxPolicy for the allowed values",
        ) from None
