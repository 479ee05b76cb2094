"""The one pre-run gate: verify -> architecture -> policy, with a typed result.

``secure-run generate``, ``secure-run verify --policy`` and ``secure-run ci-check`` all pass a model
folder through :func:`run_gate`; none of them assembles its own sequence of checks.

1. :func:`secure_run.manifests.verify_model`: inventory, signature against the pinned trust, every
   file's sha256 and identity, lock. The result carries the open verified folder.
2. :func:`check_architecture`: ``config.json`` (read through the verified folder, re-hashed) and the
   verified safetensors headers must be exactly the vendored architecture's tensor table.
3. the policy, when one is given, evaluated with the facts verification established, including the
   verified digests (policy pins are compared with them; nothing is hashed again from disk).

Any refusal closes the verified folder and raises; a denial by the policy is returned in the
:class:`GateResult` (the caller audits it, then calls ``decision.raise_if_denied()``).

    >>> from secure_run.runner.gate import run_gate   # doctest: +SKIP
    >>> with run_gate(folder, trust, lock=lock, policy=load_policy("builtin:demo")) as gate:
    ...     gate.decision.allowed, gate.config.model_type
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from secure_run.manifests import Lock, LockEntry, ProgressSink, Trust, VerificationResult
    from secure_run.manifests.folder import VerifiedFolder
    from secure_run.model.config import ModelConfig
    from secure_run.policies import Decision, Policy, RunFacts, SandboxFacts
    from secure_run.policies.findings import Stage

__all__ = ["Decide", "GateResult", "RunContext", "check_architecture", "run_gate", "verified_facts"]


@dataclass(frozen=True)
class RunContext:
    """What the caller knows about the run beyond the folder (all optional at stage ``check``)."""

    sandbox: SandboxFacts | None = None
    declared_use: str | None = None
    operator: str | None = None
    max_new_tokens: int | None = None


#: How the policy step decides (generate passes one that records a licence acceptance first).
Decide = Callable[["Policy", "RunFacts"], "Decision"]


@dataclass(frozen=True)
class GateResult:
    """What the gate proved: the verified folder, its validated config, and the policy decision."""

    verification: VerificationResult
    config: ModelConfig
    facts: RunFacts
    policy: Policy | None
    decision: Decision | None

    @property
    def folder(self) -> VerifiedFolder:
        """The open verified folder (the only way to read the model after the gate)."""
        return self.verification.verified

    def close(self) -> None:
        """Close the verified folder."""
        self.verification.close()

    def __enter__(self) -> GateResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verified_facts(verification: VerificationResult, context: RunContext = RunContext()) -> RunFacts:
    """The policy facts a successful verification establishes, plus the run context."""
    from secure_run import policies

    signer = verification.signer
    return policies.RunFacts(
        model_dir=Path(verification.root),
        signature=policies.SignatureFacts(
            verified=True, digests_matched=True, root_digest=f"sha256:{verification.root_digest}",
            signer=signer.key_sha256 if signer.method == "key" else signer.identity,
            lock_matched=True if verification.lock_name is not None else None,  # None: no lock compared
        ),
        verified_digests=verification.digests(),
        code_files=(),  # verification's inventory refuses every code or pickle-capable file
        sandbox=context.sandbox,
        declared_use=context.declared_use,
        operator=context.operator,
        max_new_tokens=context.max_new_tokens,
    )


def check_architecture(verification: VerificationResult) -> ModelConfig:
    """Refuse unless the verified tensor tables equal the vendored architecture's (no torch).

    ``config.json`` is read through the verified folder (identity checked, sha256 re-checked).

    Raises:
        ModelError: ``config.*`` or ``loader.*`` rules; FolderError: ``folder.*``.
    """
    from secure_run.model import checkpoint
    from secure_run.model.config import parse_config_json

    config = parse_config_json(verification.read_bytes("config.json"), path="config.json")
    found = {
        name: checkpoint.HeaderEntry(shard, info.dtype, tuple(info.shape), info)
        for shard, header in verification.headers.items()
        for name, info in header.tensors.items()
    }
    checkpoint.check_table(config, checkpoint.name_map_for(config), found)
    return config


def run_gate(
    model_dir: Path,
    trust: Trust | None,
    *,
    lock: Lock | LockEntry | None,
    signature: Path | None = None,
    progress: ProgressSink | None = None,
    policy: Policy | None = None,
    stage: Stage = "check",
    context: RunContext = RunContext(),
    decide: Decide | None = None,
    on_refusal: Callable[[BaseException, VerificationResult | None], None] | None = None,
    seal: bool = False,
) -> GateResult:
    """Verify ``model_dir``, check its architecture, evaluate ``policy``; return what was proved.

    Args:
        model_dir: the model folder.
        trust: pinned trust (None when ``lock`` is a :class:`Lock` that supplies it).
        lock: the lock, or the one entry expected.
        signature: the bundle (default ``model_dir/model.sig``).
        progress: hashing progress sink.
        policy: the policy to evaluate (None: verification and architecture only).
        stage: ``check`` or ``run``.
        context: run facts beyond the folder.
        decide: replaces ``policies.evaluate(policy, facts, stage=stage)``.
        on_refusal: called with the error (and the verification, when that step passed) when a
            step refuses, before the error is raised (the pipeline audits it; ci-check reports the
            verified root digest).
        seal: verify into sealed memory copies (``verify_model(..., seal=True)``) for a worker hand-off.

    Raises:
        SecureRunError: any refusal of steps 1-2 (exit 1) or usage/environment error (exit 2).
    """
    from secure_run import manifests, policies

    try:
        verification = manifests.verify_model(model_dir, trust, signature=signature, lock=lock, progress=progress,
                                             seal=seal)
    except Exception as err:
        if on_refusal is not None:
            on_refusal(err, None)
        raise
    try:
        config = check_architecture(verification)
        facts = verified_facts(verification, context)
        decision = None
        if policy is not None:
            decision = decide(policy, facts) if decide is not None else policies.evaluate(policy, facts, stage=stage)
    except Exception as err:
        verification.close()
        if on_refusal is not None:
            on_refusal(err, verification)
        raise
    return GateResult(verification=verification, config=config, facts=facts, policy=policy, decision=decision)
