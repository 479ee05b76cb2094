"""Loading a policy file: hardened YAML -> strict schema -> resolved rails -> :class:`Policy`.

    >>> from secure_run.policies.policy import default_policy
    >>> policy = default_policy("demo")
    >>> policy.mode, len(policy.sha256)
    ('enforce', 64)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from . import _files
from ._patterns import PatternError, parse_blocklist
from ._state import resolve_state_path
from ._yaml import load_yaml
from .errors import PolicyFileError, StateFileError
from .guardrails import InputGuard, Limits, PatternSet, StreamGuard
from .schema import Filter, KeywordFilter, RunPolicy, Spec

DefaultName = Literal["demo", "superlinear-exp-v0.1"]
DEFAULT_POLICIES: dict[str, str] = {
    "demo": "demo.policy.yaml",
    "superlinear-exp-v0.1": "superlinear-exp-v0.1.policy.yaml",
}
AUDIT_LOG_NAME = "audit.jsonl"
ACCEPTANCE_STORE_NAME = "licenses.jsonl"


def policy_sha256(document: RunPolicy) -> str:
    """Canonical hash: sha256 of the sorted, compact JSON of the validated model dump."""
    canonical = json.dumps(
        document.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Policy:
    """A validated policy with its hash and compiled rails.

    Attributes:
        document: the validated schema object.
        sha256: :func:`policy_sha256` of ``document`` (recorded in every decision).
        source: where it was loaded from (display only).
        input_patterns / output_patterns: compiled keyword rails (None when the filter is not a
            keyword filter or is absent).
    """

    document: RunPolicy
    sha256: str
    source: str
    input_patterns: PatternSet | None
    output_patterns: PatternSet | None

    @property
    def spec(self) -> Spec:
        """``document.spec``."""
        return self.document.spec

    @property
    def name(self) -> str:
        """``metadata.name``."""
        return self.document.metadata.name

    @property
    def mode(self) -> str:
        """``spec.mode``."""
        return self.document.spec.mode

    def limits(self) -> Limits:
        """The limits the runner enforces (G4)."""
        spec = self.spec.guardrails.limits
        return Limits(spec.max_new_tokens, spec.max_input_tokens, spec.max_prompt_chars, float(spec.timeout_s))

    def input_guard(self) -> InputGuard:
        """The prompt filter (limits + keyword patterns)."""
        return InputGuard(self.input_patterns, self.limits())

    def output_guard(self) -> StreamGuard:
        """A fresh streaming filter for one completion."""
        return StreamGuard(self.output_patterns, stage="output")

    def banner(self) -> str | None:
        """Attribution text to show at the start of a run (A4), or None when display is ``never``."""
        display = self.spec.notices.display
        return display.banner if display.when == "session_start" else None

    def audit_log_path(self) -> Path:
        """Where audit records go (policy ``guardrails.audit_log`` or the state-dir default)."""
        return resolve_state_path(self.spec.guardrails.audit_log, AUDIT_LOG_NAME)

    def acceptance_store_path(self) -> Path:
        """Where licence acceptances are recorded (policy ``acceptance.store`` or the default)."""
        return resolve_state_path(self.spec.acceptance.store, ACCEPTANCE_STORE_NAME)


def _schema_error(err: ValidationError, source: str) -> PolicyFileError:
    details: list[str] = []
    rule = "policy.schema"
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(document)"
        msg = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field (not in the schema; check the spelling)"
        details.append(f"{loc}: {msg}")
        if msg.startswith("[P") and "]" in msg and rule == "policy.schema":
            rule = msg[1 : msg.index("]")]
    return PolicyFileError(
        f"{source}: policy refused: {details[0]}" + (f" (+{len(details) - 1} more)" if len(details) > 1 else ""),
        details=details,
        path=source,
        rule=rule,
        hint="fix the policy file; the rules are documented in secure_run.policies.schema",
    )


def _to_json_data(value: object) -> object:
    """YAML plain data -> JSON-compatible data (dates become ISO strings) for strict JSON validation."""
    return json.loads(json.dumps(value, default=str))


def _keyword_patterns(flt: Filter | None, base_dir: Path | None, source: str, where: str) -> PatternSet | None:
    if not isinstance(flt, KeywordFilter):
        return None
    specs = [p.as_pair() for p in flt.patterns]
    if flt.blocklist is not None:
        if base_dir is None:
            raise PolicyFileError(f"{source}: {where}.blocklist needs a policy file location", path=source, rule="P9")
        try:
            data = _files.read_bytes(base_dir, flt.blocklist)
        except (_files.UnsafeFile, OSError) as err:
            reason = err.reason if isinstance(err, _files.UnsafeFile) else str(err)
            raise PolicyFileError(
                f"{source}: {where}.blocklist {flt.blocklist!r}: {reason}", path=source, rule="P9",
                hint="the blocklist is read next to the policy file; copy it there, or create the policy with "
                "`secure-run policy init --from builtin:NAME DIR` (writes both)",
            ) from None
        got = hashlib.sha256(data).hexdigest()
        if got != flt.blocklist_sha256:
            raise PolicyFileError(
                f"{source}: {where}.blocklist {flt.blocklist!r} does not match blocklist_sha256",
                details=[f"expected {flt.blocklist_sha256}", f"got      {got}"],
                path=source,
                rule="P9",
                hint="the blocklist changed since it was pinned: review it and update blocklist_sha256",
            )
        try:
            specs += parse_blocklist(data.decode("utf-8"), source=flt.blocklist)
        except (PatternError, UnicodeDecodeError) as err:
            raise PolicyFileError(f"{source}: {where}.blocklist: {err}", path=source, rule="P9") from None
    try:
        return PatternSet.build(specs, action=flt.action)
    except PatternError as err:
        raise PolicyFileError(f"{source}: {where}: {err}", path=source, rule="P9") from None


def parse_policy(data: bytes, *, source: str, base_dir: Path | None = None) -> Policy:
    """Validate policy bytes; ``base_dir`` resolves relative blocklist files.

    Raises:
        PolicyFileError: unsafe YAML, schema violations (unknown fields, floor waivers, rule
            P1-P11), an unpinned or changed blocklist, an unsafe pattern.
    """
    raw = load_yaml(data, source=source)
    if not isinstance(raw, dict):
        raise PolicyFileError(f"{source}: a policy is a YAML mapping", path=source, rule="policy.schema")
    try:
        document = RunPolicy.model_validate_json(json.dumps(_to_json_data(raw)))
    except ValidationError as err:
        raise _schema_error(err, source) from None
    rails = document.spec.guardrails
    policy = Policy(
        document=document,
        sha256=policy_sha256(document),
        source=source,
        input_patterns=_keyword_patterns(rails.input_filter, base_dir, source, "guardrails.input_filter"),
        output_patterns=_keyword_patterns(rails.output_filter, base_dir, source, "guardrails.output_filter"),
    )
    try:
        policy.audit_log_path()
        policy.acceptance_store_path()
    except StateFileError as err:
        raise PolicyFileError(f"{source}: {err.message}", path=source, rule="policy.paths", hint=err.hint) from None
    return policy


def load_policy(path: Path | str) -> Policy:
    """Load and validate a policy file (``builtin:NAME`` selects a default policy).

    Raises:
        PolicyFileError: see :func:`parse_policy`; also a missing, linked or oversized file.
    """
    text = str(path)
    if text.startswith("builtin:"):
        return default_policy(text.removeprefix("builtin:"))
    file = Path(path)
    try:
        data = _files.read_bytes(file.parent, file.name, limit=256 * 1024)
    except _files.UnsafeFile as err:
        raise PolicyFileError(f"{file}: {err.reason}", path=str(file), rule="policy.file") from None
    except (OSError, ValueError) as err:
        raise PolicyFileError(f"{file}: cannot be read ({err})", path=str(file), rule="policy.file") from None
    return parse_policy(data, source=str(file), base_dir=file.parent)


def default_policy_path(name: str) -> Path:
    """Path of a default policy shipped as package data.

    Raises:
        PolicyFileError: unknown name.
    """
    if name not in DEFAULT_POLICIES:
        raise PolicyFileError(
            f"no default policy {name!r}", hint=f"choose one of {sorted(DEFAULT_POLICIES)}", rule="policy.file"
        )
    return Path(str(resources.files("secure_run.policies").joinpath("data", DEFAULT_POLICIES[name])))


def default_policy(name: str) -> Policy:
    """Load a default policy (``demo`` or ``superlinear-exp-v0.1``)."""
    return load_policy(default_policy_path(name))
