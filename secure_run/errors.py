"""One error hierarchy for the whole project, caught once by the CLI.

Every error carries a one-line summary plus optional detail lines (what was found, what was
expected, what to do). The CLI maps :class:`Refusal` subclasses to exit code 1 and
:class:`UsageError` / :class:`EnvironmentProblem` to exit code 2.

    >>> err = ManifestError("model.sig is missing", hint="sign the folder with `secure-run sign`")
    >>> err.exit_code, err.diagnostics().splitlines()[0]
    (1, 'model.sig is missing')
"""

from __future__ import annotations

from collections.abc import Sequence


class SecureRunError(Exception):
    """Base class of every error secure-run raises on purpose."""

    exit_code: int = 2
    #: short machine-readable category, used in ``--json`` output
    kind: str = "error"

    def __init__(
        self,
        message: str,
        *,
        details: Sequence[str] = (),
        hint: str | None = None,
        path: str | None = None,
        rule: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = tuple(details)
        self.hint = hint
        self.path = path
        self.rule = rule

    def diagnostics(self) -> str:
        """Human-readable multi-line text: summary, details, then what to do."""
        lines = [self.message]
        lines.extend(f"  - {d}" for d in self.details)
        if self.hint:
            lines.append(f"  fix: {self.hint}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        """Stable JSON form used by ``--json`` output."""
        return {
            "kind": self.kind,
            "message": self.message,
            "details": list(self.details),
            "hint": self.hint,
            "path": self.path,
            "rule": self.rule,
            "exit_code": self.exit_code,
        }


class Refusal(SecureRunError):
    """Something about the model, its signature or the policy is not acceptable (exit 1)."""

    exit_code = 1
    kind = "refused"


class UsageError(SecureRunError):
    """Bad arguments or option combinations (exit 2)."""

    exit_code = 2
    kind = "usage"


class EnvironmentProblem(SecureRunError):
    """Something missing on this host: engine, GPU, file, permission (exit 2)."""

    exit_code = 2
    kind = "environment"


class ManifestError(Refusal):
    """The folder inventory, a file's content, or a safetensors header is refused."""

    kind = "manifest"


class VerificationError(Refusal):
    """Signature, digest, signer or lock verification failed."""

    kind = "verification"


class PolicyViolation(Refusal):
    """The licence / guardrail policy denies the run."""

    kind = "policy"


class ModelError(Refusal):
    """The model config or weights do not match the vendored architecture."""

    kind = "model"


class SandboxError(EnvironmentProblem):
    """The sandbox could not be set up, or the sandboxed run failed."""

    kind = "sandbox"


class KernelUnavailable(EnvironmentProblem):
    """A requested kernel backend (Triton/CUDA) is not available here."""

    kind = "kernel"
