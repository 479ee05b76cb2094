"""Errors raised by the policies package, all inside the project's one hierarchy.

    >>> from secure_run.policies.errors import PolicyFileError
    >>> PolicyFileError("policy.yaml: bad", rule="P0").exit_code
    2
"""

from __future__ import annotations

from secure_run.errors import EnvironmentProblem, UsageError


class PolicyFileError(UsageError):
    """A policy file (or the licence catalogue) cannot be read or is refused by the schema (exit 2).

    A policy that tries to waive a floor check is refused here, at load time, so it never reaches
    evaluation.
    """

    kind = "policy-file"


class StateFileError(EnvironmentProblem):
    """The audit log or the licence-acceptance store cannot be written or read safely (exit 2)."""

    kind = "state-file"
