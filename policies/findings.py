"""Findings (one per check outcome) and the Decision that collects them; text and JSON rendering.

Check ids follow spec/policy.md section 5 (G1-G7, A1-A5, L1-L2) plus the artifact and sandbox
checks S1-S9 (see ``evaluate``). A finding's ``result`` is ``pass``, ``deny``, ``warn`` or
``info``; ``floor`` marks a non-waivable check, whose ``deny`` no mode can downgrade.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from secure_run.errors import PolicyViolation

Result = Literal["pass", "deny", "warn", "info"]
Mode = Literal["enforce", "warn", "audit"]
Stage = Literal["check", "run"]


@dataclass(frozen=True)
class Finding:
    """The outcome of one check.

    Attributes:
        check: check id (``A1``, ``G3``, ``S4`` ...).
        result: ``pass`` | ``deny`` | ``warn`` | ``info`` (after the mode was applied).
        message: one readable line: what was found, what was expected.
        evidence: plain data backing the message (paths, digests, fingerprints ...).
        floor: a non-waivable check: its ``deny`` stands in every mode.
        downgraded: a ``deny`` turned into ``warn`` by the ``warn`` / ``audit`` mode.
        hint: what to do about a deny / warn.
    """

    check: str
    result: Result
    message: str
    evidence: Mapping[str, object] = field(default_factory=dict)
    floor: bool = False
    downgraded: bool = False
    hint: str | None = None

    def to_json(self) -> dict[str, object]:
        """Stable plain-data form (``--json`` output and the audit log)."""
        return {
            "check": self.check,
            "result": self.result,
            "message": self.message,
            "evidence": dict(self.evidence),
            "floor": self.floor,
            "downgraded": self.downgraded,
            "hint": self.hint,
        }


_ORDER = {"deny": 0, "warn": 1, "info": 2, "pass": 3}


@dataclass(frozen=True)
class Decision:
    """What the policy decided about one model folder and run.

    Attributes:
        allowed: True when no ``deny`` finding remains after the mode was applied.
        mode: the policy mode.
        stage: ``check`` (``secure-run policy check``) or ``run`` (before generation).
        policy_name: ``metadata.name``.
        policy_sha256: canonical hash of the validated policy.
        findings: every finding, in check order.
        model_dir: the folder evaluated.
        model_root_digest: from the signature facts, when known.
        license: the LICENSE classification (plain data), when a LICENSE was read.
        banner: attribution text to show at the start of a run (A4), if any.
        patent_notice: IP notice sentences surfaced (A5).
        limits: the limits the runner must enforce (G4).
        declared_use / operator: as evaluated.
        timestamp: ISO-8601 UTC time of the evaluation.
    """

    allowed: bool
    mode: Mode
    stage: Stage
    policy_name: str
    policy_sha256: str
    findings: tuple[Finding, ...]
    model_dir: str
    model_root_digest: str | None
    license: Mapping[str, object] | None
    banner: str | None
    patent_notice: tuple[str, ...]
    limits: Mapping[str, object]
    declared_use: str | None
    operator: str | None
    timestamp: str

    def denials(self) -> list[Finding]:
        """The findings that stop the run."""
        return [f for f in self.findings if f.result == "deny"]

    def visible_findings(self) -> list[Finding]:
        """What the operator sees: everything, except in ``audit`` mode, where only the denials are
        shown (the rest goes to the audit log only)."""
        if self.mode == "audit":
            return self.denials()
        return list(self.findings)

    def to_json(self) -> dict[str, object]:
        """Stable plain-data form (``--json`` output and the audit record)."""
        return {
            "allowed": self.allowed,
            "mode": self.mode,
            "stage": self.stage,
            "policy": {"name": self.policy_name, "sha256": self.policy_sha256},
            "model_dir": self.model_dir,
            "model_root_digest": self.model_root_digest,
            "license": dict(self.license) if self.license is not None else None,
            "banner": self.banner,
            "patent_notice": list(self.patent_notice),
            "limits": dict(self.limits),
            "declared_use": self.declared_use,
            "operator": self.operator,
            "timestamp": self.timestamp,
            "findings": [f.to_json() for f in self.findings],
        }

    def render_text(self, *, verbose: bool = False) -> str:
        """Readable report: header, one line per finding (denials first), then the verdict."""
        lines = [
            f"policy {self.policy_name} (sha256 {self.policy_sha256[:16]}...) mode={self.mode} stage={self.stage}",
            f"model  {self.model_dir}",
        ]
        shown = sorted(self.visible_findings(), key=lambda f: _ORDER[f.result])
        for f in shown:
            lines.append(f"  {f.result.upper():<5} {f.check:<3} {f.message}")
            if f.downgraded or (f.floor and f.result == "deny"):
                lines[-1] += "  [" + ("non-waivable floor" if f.floor else "downgraded by mode " + self.mode) + "]"
            if f.hint and f.result in ("deny", "warn"):
                lines.append(f"              fix: {f.hint}")
            if verbose and f.evidence:
                for key, value in f.evidence.items():
                    lines.append(f"              {key}: {value}")
        denials = self.denials()
        floor = sum(1 for f in denials if f.floor)
        if self.allowed:
            warned = sum(1 for f in self.findings if f.result == "warn")
            lines.append(f"decision: ALLOWED ({warned} warning(s))")
        else:
            lines.append(f"decision: DENIED ({len(denials)} deny finding(s), {floor} non-waivable)")
        return "\n".join(lines)

    def raise_if_denied(self) -> None:
        """Raise :class:`PolicyViolation` naming every deny finding (exit code 1)."""
        denials = self.denials()
        if not denials:
            return
        first = denials[0]
        raise PolicyViolation(
            f"policy {self.policy_name} denies the run ({len(denials)} finding(s); first: {first.check})",
            details=[f"{f.check}: {f.message}" + (" [floor]" if f.floor else "") for f in denials],
            hint=first.hint,
            path=self.model_dir,
            rule=first.check,
        )
