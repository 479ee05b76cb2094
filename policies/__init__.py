"""Licence and guardrail policies: schema, licence catalogue, guardrails, evaluation, audit log.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from secure_run.policies import RunFacts, default_policy, evaluate
    >>> policy = default_policy("demo")                  # or load_policy("my.policy.yaml")
    >>> decision = evaluate(policy, RunFacts(model_dir=Path(tempfile.mkdtemp())), stage="check")
    >>> decision.allowed, decision.policy_sha256 == policy.sha256
    (False, True)
    >>> guard = policy.output_guard()                    # streaming output filter
    >>> guard.feed("-----BEGIN RSA PRIV") + guard.feed("ATE KEY-----") + guard.finish()
    ''
    >>> guard.blocked
    True

Public surface: :func:`load_policy` / :func:`default_policy` -> :class:`Policy`;
:class:`RunFacts` (+ :class:`SignatureFacts`, :class:`SandboxFacts`, :class:`GuardrailFacts`);
:func:`evaluate` -> :class:`Decision` of :class:`Finding`; guardrails (:class:`StreamGuard`,
:class:`InputGuard`, :class:`Limits`, :class:`ModelRail`); :class:`AuditLog` + :func:`audit_record`;
:class:`AcceptanceStore` + :func:`accept_license`; :func:`license_fingerprint`.
"""

from .acceptance import AcceptanceRecord, AcceptanceStore, accept_license
from .audit import AuditLog, audit_record
from .errors import PolicyFileError, StateFileError
from .evaluate import FLOOR_CHECKS, evaluate
from .facts import GuardrailFacts, RunFacts, SandboxFacts, SignatureFacts
from .findings import Decision, Finding
from .guardrails import (
    GuardrailEvent,
    InputGuard,
    InputVerdict,
    Limits,
    ModelRail,
    RailVerdict,
    StreamGuard,
)
from .licenses import LicenseMatch, classify_license, license_fingerprint
from .policy import Policy, default_policy, default_policy_path, load_policy, parse_policy

__all__ = [
    "FLOOR_CHECKS",
    "AcceptanceRecord",
    "AcceptanceStore",
    "AuditLog",
    "Decision",
    "Finding",
    "GuardrailEvent",
    "GuardrailFacts",
    "InputGuard",
    "InputVerdict",
    "LicenseMatch",
    "Limits",
    "ModelRail",
    "Policy",
    "PolicyFileError",
    "RailVerdict",
    "RunFacts",
    "SandboxFacts",
    "SignatureFacts",
    "StateFileError",
    "StreamGuard",
    "accept_license",
    "audit_record",
    "classify_license",
    "default_policy",
    "default_policy_path",
    "evaluate",
    "license_fingerprint",
    "load_policy",
    "parse_policy",
]
