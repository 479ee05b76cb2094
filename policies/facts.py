"""Facts about a run that other parts of secure-run establish, handed to the policy evaluation.

The runner fills these in (manifests: signature, digests, inventory; sandbox: network and mounts;
CLI: declared use, operator, prompt). ``None`` means "not established": at stage ``check``
(``secure-run policy check``) such checks are reported as ``info``; at stage ``run`` a missing fact
is a ``deny`` (the floor cannot be satisfied by omission).

    >>> from pathlib import Path
    >>> facts = RunFacts(model_dir=Path("."), declared_use="research")
    >>> facts.signature is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class _Facts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=True)


class SignatureFacts(_Facts):
    """Outcome of ``secure-run verify`` (manifests) for the model folder.

    Attributes:
        verified: the signature verified against the pinned trust.
        signer: key fingerprint or identity of the signer.
        digests_matched: every file's sha256 equals the signed manifest and the file sets are equal.
        root_digest: the manifest's root digest (recorded in the audit log).
        lock_matched: the root digest equals the lock entry (None: no lock entry was compared).
    """

    verified: bool
    signer: str | None = None
    digests_matched: bool
    root_digest: str | None = None
    lock_matched: bool | None = None


class SandboxFacts(_Facts):
    """How the run will be launched.

    Attributes:
        enabled: the model runs inside a sandbox backend.
        backend: ``docker`` / ``namespace``.
        network_enabled: the sandbox has any network access.
        read_only_model: the model folder is mounted read-only.
    """

    enabled: bool
    backend: str | None = None
    network_enabled: bool
    read_only_model: bool = True


class GuardrailFacts(_Facts):
    """Guardrail settings in effect for this run.

    Attributes:
        disabled: guardrails the operator asked to turn off (``input_filter``, ``output_filter``, ...).
        overrides: run-time overrides in effect (``chat_template``, ``adapters``, ...; see check G1).
        available_rails: model-based rails / engines available offline (for ``classifier`` /
            ``nemoguardrails`` filters and for a compensating guardrail).
    """

    disabled: frozenset[str] = frozenset()
    overrides: frozenset[str] = frozenset()
    available_rails: frozenset[str] = frozenset()


class RunFacts(_Facts):
    """Everything the evaluation knows about the run besides the policy and the folder itself.

    ``verified_digests`` (relative name -> sha256 hex) are the digests verification computed; when
    given, pinned files (checks S7 and G1) are compared with them and never hashed again from disk,
    so a file changed after verification cannot have a fresh hash accepted. A pinned name that is
    not among them is a mismatch.
    """

    model_dir: Path
    signature: SignatureFacts | None = None
    verified_digests: Mapping[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] | None = None
    code_files: tuple[str, ...] | None = None
    sandbox: SandboxFacts | None = None
    guardrails: GuardrailFacts = GuardrailFacts()
    declared_use: str | None = None
    operator: str | None = None
    prompt: str | None = None
    prompt_tokens: Annotated[int, Field(ge=0)] | None = None
    max_new_tokens: Annotated[int, Field(ge=0)] | None = None
