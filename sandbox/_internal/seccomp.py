"""Our seccomp profile: parsed from the shipped Docker-format JSON, and compiled to classic BPF.

One file, ``sandbox/seccomp.json``, is the single source of truth: the docker backend hands its
text to the engine (``security_opt=["seccomp=<json>"]``) and the namespace backend compiles it
here to a BPF program that ``seccomp_exec.py`` loads with ``prctl(PR_SET_SECCOMP)``.

The compiler accepts only what the profile needs (and refuses everything else, loudly):
x86_64 only, a deny-by-default action, per-syscall ALLOW / ERRNO / KILL_PROCESS actions, and
argument conditions ``SCMP_CMP_EQ`` and ``SCMP_CMP_MASKED_EQ`` (ANDed within a rule).

    >>> prof = load_profile()
    >>> prof.action_for("read"), prof.action_for("ptrace"), prof.action_for("clone3")
    ('allow', 'errno:1', 'errno:38')
    >>> len(compile_bpf(prof)) % 8
    0
"""

from __future__ import annotations

import functools
import json
import struct
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from secure_run.errors import SandboxError

from .syscalls_x86_64 import AUDIT_ARCH_X86_64, SYSCALLS_X86_64

__all__ = ["SeccompProfile", "compile_bpf", "load_profile", "profile_text"]

# seccomp return values (linux/seccomp.h)
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
ENOSYS = 38

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_AND_K = 0x54
_RET_K = 0x06

# struct seccomp_data offsets
_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARGS = 16

_Action = Literal["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL_PROCESS"]


class _Profile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ArgCondition(_Profile):
    """One argument comparison (Docker JSON ``args`` entry)."""

    index: int = Field(ge=0, le=5)
    value: int = Field(ge=0, lt=2**64)
    valueTwo: int = Field(default=0, ge=0, lt=2**64)
    op: Literal["SCMP_CMP_EQ", "SCMP_CMP_MASKED_EQ"]


class SyscallRule(_Profile):
    """One rule: some syscall names, an action, optional argument conditions."""

    names: tuple[str, ...] = Field(min_length=1)
    action: _Action
    errnoRet: int | None = Field(default=None, ge=1, le=4095)
    args: tuple[ArgCondition, ...] = ()
    comment: str = ""

    @model_validator(mode="after")
    def _check(self) -> SyscallRule:
        unknown = [n for n in self.names if n not in SYSCALLS_X86_64]
        if unknown:
            raise ValueError(f"unknown x86_64 syscall names: {', '.join(unknown)}")
        if self.action == "SCMP_ACT_ERRNO" and self.errnoRet is None:
            raise ValueError("SCMP_ACT_ERRNO needs errnoRet")
        if self.action != "SCMP_ACT_ERRNO" and self.errnoRet is not None:
            raise ValueError("errnoRet is only meaningful with SCMP_ACT_ERRNO")
        return self


class SeccompProfile(_Profile):
    """The subset of Docker's seccomp JSON format our compiler understands."""

    comment: str = ""
    defaultAction: Literal["SCMP_ACT_ERRNO", "SCMP_ACT_KILL_PROCESS"]
    defaultErrnoRet: int | None = Field(default=None, ge=1, le=4095)
    architectures: tuple[Literal["SCMP_ARCH_X86_64"], ...] = Field(min_length=1, max_length=1)
    syscalls: tuple[SyscallRule, ...]

    @model_validator(mode="after")
    def _check(self) -> SeccompProfile:
        if self.defaultAction == "SCMP_ACT_ERRNO" and self.defaultErrnoRet is None:
            raise ValueError("defaultAction SCMP_ACT_ERRNO needs defaultErrnoRet")
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.syscalls):
            for name in rule.names:
                if name in seen:
                    first = self.syscalls[seen[name]]
                    # several rules for one name are alternatives (ORed, as in Docker's format):
                    # allowed only when each has argument conditions and all share one action
                    if not (rule.args and first.args and rule.action == first.action):
                        raise ValueError(f"syscall {name} appears in rules {seen[name]} and {i}; several rules for "
                                         "one name must all have argument conditions and the same action")
                    continue
                seen[name] = i
        return self

    def rule_for(self, name: str) -> SyscallRule | None:
        """The (first) rule naming ``name``, if any."""
        for rule in self.syscalls:
            if name in rule.names:
                return rule
        return None

    def rules_for(self, name: str) -> tuple[SyscallRule, ...]:
        """Every rule naming ``name`` (alternatives: the action applies when any one's conditions hold)."""
        return tuple(rule for rule in self.syscalls if name in rule.names)

    def default_ret(self) -> int:
        """The seccomp return value of the default action."""
        if self.defaultAction == "SCMP_ACT_KILL_PROCESS":
            return RET_KILL_PROCESS
        return RET_ERRNO | int(self.defaultErrnoRet or 1)

    def action_for(self, name: str) -> str:
        """A short description of what happens to ``name`` when its arguments pass (``allow``, ``errno:N``, ``kill``)."""
        rule = self.rule_for(name)
        return _describe(_ret_of(rule) if rule else self.default_ret())  # alternatives share one action


def _describe(ret: int) -> str:
    if ret == RET_ALLOW:
        return "allow"
    if ret == RET_KILL_PROCESS:
        return "kill"
    return f"errno:{ret & 0xFFFF}"


def _ret_of(rule: SyscallRule) -> int:
    if rule.action == "SCMP_ACT_ALLOW":
        return RET_ALLOW
    if rule.action == "SCMP_ACT_KILL_PROCESS":
        return RET_KILL_PROCESS
    return RET_ERRNO | int(rule.errnoRet or 1)


@functools.cache
def profile_text() -> str:
    """The shipped profile's JSON text, exactly as packaged."""
    return resources.files("secure_run.sandbox").joinpath("seccomp.json").read_text(encoding="utf-8")


def parse_profile(text: str) -> SeccompProfile:
    """Parse and check a profile.

    Raises:
        SandboxError: rule ``sandbox.seccomp.profile``, naming the offending entry.
    """
    try:
        return SeccompProfile.model_validate(json.loads(text), strict=False)
    except (ValueError, ValidationError) as err:
        raise SandboxError(
            "the seccomp profile is not usable",
            details=[str(err).splitlines()[0] if isinstance(err, ValidationError) else str(err)]
            + ([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5]]
               if isinstance(err, ValidationError) else []),
            rule="sandbox.seccomp.profile",
            hint="the shipped sandbox/seccomp.json was changed; restore it from the release",
        ) from None


@functools.cache
def load_profile() -> SeccompProfile:
    """The shipped profile, parsed and checked."""
    return parse_profile(profile_text())


# --- BPF -----------------------------------------------------------------------------------------


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    if not (0 <= jt <= 255 and 0 <= jf <= 255):
        raise SandboxError("seccomp rule too long for a BPF jump", rule="sandbox.seccomp.compile")
    return (code, jt, jf, k & 0xFFFFFFFF)


def _cond_block(cond: ArgCondition, fail: int) -> list[tuple[int, int, int, int]]:
    """Instructions testing one condition; on failure jump ``fail`` instructions past the block's end."""
    lo_off = _OFF_ARGS + 8 * cond.index
    hi_off = lo_off + 4
    if cond.op == "SCMP_CMP_EQ":
        mask, want = 0xFFFFFFFFFFFFFFFF, cond.value
    else:
        mask, want = cond.value, cond.valueTwo
    parts: list[tuple[int, int, int]] = []  # (offset, mask, want) per 32-bit half
    for off, shift in ((lo_off, 0), (hi_off, 32)):
        m, w = (mask >> shift) & 0xFFFFFFFF, (want >> shift) & 0xFFFFFFFF
        if m == 0 and w == 0:
            continue  # this half is not compared
        parts.append((off, m, w))
    out: list[tuple[int, int, int, int]] = []
    for i, (off, m, w) in enumerate(parts):
        rest = sum(3 if pm != 0xFFFFFFFF else 2 for _, pm, _ in parts[i + 1:])
        out.append(_insn(_LD_W_ABS, off))
        if m != 0xFFFFFFFF:
            out.append(_insn(_AND_K, m))
        out.append(_insn(_JEQ_K, w, 0, rest + fail))
    return out


def _rule_block(rules: tuple[SyscallRule, ...], default_ret: int) -> list[tuple[int, int, int, int]]:
    """Instructions for one syscall's rules, entered with A = nr; always ends in a return.

    Each rule is its conditions followed by its action's return; a failed condition jumps to the
    next rule's first instruction, and after the last rule comes the default action.
    """
    if len(rules) == 1 and not rules[0].args:
        return [_insn(_RET_K, _ret_of(rules[0]))]
    out: list[tuple[int, int, int, int]] = []
    for rule in rules:
        sizes = [len(_cond_block(c, 0)) for c in rule.args]
        for i, cond in enumerate(rule.args):
            after = sum(sizes[i + 1:]) + 1  # remaining condition instructions + the success return
            out.extend(_cond_block(cond, after))
        out.append(_insn(_RET_K, _ret_of(rule)))
    out.append(_insn(_RET_K, default_ret))
    return out


def compile_bpf(profile: SeccompProfile) -> bytes:
    """The profile as a classic BPF program (``struct sock_filter[]``, native byte order).

    Layout: wrong architecture -> kill; numbers beyond the table (newer calls, and every x32
    number) -> ENOSYS, as runc does, so libc falls back; then, for each named syscall in number
    order, ``if nr == N: <its rule>``; finally the default action.
    """
    default_ret = profile.default_ret()
    prog: list[tuple[int, int, int, int]] = [
        _insn(_LD_W_ABS, _OFF_ARCH),
        _insn(_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _insn(_RET_K, RET_KILL_PROCESS),
        _insn(_LD_W_ABS, _OFF_NR),
        _insn(_JGE_K, max(SYSCALLS_X86_64.values()) + 1, 0, 1),
        _insn(_RET_K, RET_ERRNO | ENOSYS),
    ]
    names = {name for rule in profile.syscalls for name in rule.names}
    named = sorted((SYSCALLS_X86_64[name], profile.rules_for(name)) for name in names)
    for nr, rules in named:
        block = _rule_block(rules, default_ret)
        prog.append(_insn(_JEQ_K, nr, 0, len(block)))
        prog.extend(block)
    prog.append(_insn(_RET_K, default_ret))
    if len(prog) > 4096:
        raise SandboxError(f"seccomp program has {len(prog)} instructions (max 4096)", rule="sandbox.seccomp.compile")
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in prog)
