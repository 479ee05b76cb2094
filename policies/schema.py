"""The policy file schema (``apiVersion: secure-run/v1alpha1``, ``kind: RunPolicy``).

Every object is frozen, strict and closed (unknown fields are errors). Cross-field rules carry an id
quoted in the error (``[P1]`` ... ``[P11]``); the ones marked *floor* exist so that a policy cannot
waive a non-waivable check (DESIGN.md, spec/policy.md section 8):

* P1  a missing filter, ``allow_disable: true`` or a dropped ``forbid_overrides`` item is a disabled
      guardrail and needs ``compensating_guardrail`` (name + approver) (OML section 2.1) -- floor
* P2  ``licenses.weights_expression`` parses as SPDX and every licence in it is catalogued,
      allowed and not denied
* P3  a weights licence with ``preserve_guardrails`` needs ``guardrails.pinned_integrity``
* P4  ``remote_code`` is not supported: ``.py`` files are refused everywhere -- floor
* P5  ``sandbox.network`` must be ``none`` -- floor
* P6  ``files.deny`` must list ``*.py``, ``*.pyc``, ``__pycache__/**``; ``files.allow`` must not
      admit code or pickle files -- floor
* P7  ``signatures.required`` must be true (an unsigned model is a floor violation) -- floor
* P8  a licence with ``trustworthy_ai_terms`` needs the Trustworthy AI prohibited-use categories
* P9  keyword filter patterns must be in the safe subset (see ``_patterns``)
* P10 declared uses: the default and the allowed list must not contain a prohibited use
* P11 a ``revocable`` licence needs ``acceptance.required: true``
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ._base import GitSha, HfRepo, Ident, LicenseId, Name, RelPath, Sha256, Strict, Text
from ._files import glob_match
from ._patterns import PatternError, compile_literal, compile_regex
from ._spdx import SpdxError, license_symbols
from .licenses import LicenseEntry, builtin_catalog

API_VERSION = "secure-run/v1alpha1"

#: patterns that every policy's ``files.deny`` must contain (P6) and that are always applied
FLOOR_DENY_REQUIRED: tuple[str, ...] = ("*.py", "*.pyc", "__pycache__/**")
#: everything the floor denies in a model folder, whatever the policy says (code and pickle formats)
FLOOR_DENY: tuple[str, ...] = (
    *FLOOR_DENY_REQUIRED,
    "*.pyo",
    "*.pyd",
    "*.so",
    "*.dll",
    "*.dylib",
    "*.exe",
    "*.sh",
    "*.ipynb",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pkl",
    "*.pickle",
    "*.joblib",
    "*.npy",
    "*.npz",
    "*.h5",
    "*.keras",
    "*.msgpack",
)
#: sample names that ``files.allow`` must not admit (P6)
_CODE_SAMPLES = ("x.py", "x.pyc", "__pycache__/x", "x.so", "x.pkl", "x.bin", "x.pt", "x.pth", "x.sh")

Override = Literal["chat_template", "strip_system_prompt", "logit_bias_on_refusal", "steering_vectors", "adapters"]
ALL_OVERRIDES: tuple[Override, ...] = (
    "chat_template",
    "strip_system_prompt",
    "logit_bias_on_refusal",
    "steering_vectors",
    "adapters",
)
#: NVIDIA Trustworthy AI terms, prohibited uses (spec/policy.md section 2.1)
TRUSTWORTHY_AI_PROHIBITED: tuple[str, ...] = (
    "illegal_surveillance",
    "illegal_biometric_processing",
    "harassment_or_deception",
    "unlawful_use",
)
DEFAULT_FORBIDDEN_TAGS: tuple[str, ...] = ("abliterated", "uncensored", "reduced-refusal", "jailbreak", "refusal-ablat*")
Acknowledgement = Literal[
    "no_ip_litigation", "export_compliance", "revocable_terms", "research_only_model", "trustworthy_ai_terms"
]


# ---------------------------------------------------------------------------------------------
# metadata and artifact


class Metadata(Strict):
    """Who the policy is for and until when it is valid (in-toto style ``expires``)."""

    name: Name
    expires: date | None = None
    description: Text | None = None


class Source(Strict):
    """Where the reviewed snapshot came from (a pinned commit, never a branch or tag)."""

    hf_repo: HfRepo
    revision: GitSha


class Files(Strict):
    """File rules for the model folder (patterns: see ``_files.glob_match``)."""

    allow: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = Field(min_length=1)
    deny: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...]
    #: file -> sha256 of its bytes; ``null`` = to be pinned at review (check S7 denies until pinned)
    pinned: dict[RelPath, Sha256 | None] = {}

    @model_validator(mode="after")
    def _floor_patterns(self) -> Files:
        missing = [p for p in FLOOR_DENY_REQUIRED if p not in self.deny]
        if missing:
            raise ValueError(
                f"[P6] files.deny must include {list(FLOOR_DENY_REQUIRED)}; missing {missing} "
                "(code files are a non-waivable floor check)"
            )
        for pattern in self.allow:
            if pattern[-1] in "*?]":
                raise ValueError(
                    f"[P6] files.allow pattern {pattern!r} ends in a wildcard and so admits code files "
                    "(e.g. *.py); end each pattern in a literal name or extension"
                )
            last = pattern.rsplit("/", 1)[-1]
            admitted = [s for s in _CODE_SAMPLES if glob_match(pattern, s) or glob_match(last, s.rsplit("/", 1)[-1])]
            if admitted:
                raise ValueError(
                    f"[P6] files.allow pattern {pattern!r} admits code or pickle files (e.g. {admitted[0]!r}); "
                    "list the allowed file kinds explicitly (.py files are refused everywhere)"
                )
        return self


class Card(Strict):
    """Expected model-card (README front matter) values (check A3)."""

    license: Name
    license_name: Name | None = None
    license_link: Name | None = None
    base_model: Name | tuple[Name, ...] | None = None


class Artifact(Strict):
    """The one model folder this policy governs."""

    name: Name
    source: Source | None = None
    root_digest: Sha256 | None = None
    files: Files
    card: Card | None = None
    research_only: bool = False

    #: accepted only to refuse it with a clear message (P4); never part of a valid policy
    remote_code: Any = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _no_remote_code(self) -> Artifact:
        if self.remote_code is not None:
            raise ValueError(
                "[P4] remote_code is not supported: .py files are refused everywhere, reviewed or not; "
                "`secure-run import` drops them and the vendored model runs instead"
            )
        return self


# ---------------------------------------------------------------------------------------------
# licences and notices


class Licenses(Strict):
    """Which licences are acceptable, how LICENSE is identified (checks A1, L1)."""

    weights_expression: Annotated[str, Field(min_length=1, max_length=1000)]
    code_expression: Annotated[str, Field(min_length=1, max_length=1000)] | None = None
    catalog: tuple[LicenseEntry, ...] = ()
    fingerprints: dict[LicenseId, tuple[Sha256, ...]] = {}
    allowed: tuple[LicenseId, ...] = Field(min_length=1)
    denied: tuple[LicenseId, ...] = ()
    on_unknown: Literal["deny", "warn"] = "deny"
    on_near_match: Literal["deny", "warn"] = "deny"
    similarity_threshold: Annotated[float, Field(ge=0.9, le=1.0)] = 0.98

    def entries(self) -> tuple[LicenseEntry, ...]:
        """The effective catalogue: the policy's own entries, then the built-in ones."""
        return (*self.catalog, *builtin_catalog())

    def entry(self, license_id: str) -> LicenseEntry | None:
        """Catalogue entry by id or alias."""
        for e in self.entries():
            if e.id == license_id or license_id in e.aliases:
                return e
        return None

    def weights_licenses(self) -> list[str]:
        """Licence ids named by ``weights_expression`` (validated by P2)."""
        return license_symbols(self.weights_expression)

    @model_validator(mode="after")
    def _expressions(self) -> Licenses:
        builtin_ids = {e.id for e in builtin_catalog()}
        clash = [e.id for e in self.catalog if e.id in builtin_ids]
        if clash:
            raise ValueError(
                f"[P2] licenses.catalog redefines built-in entries {clash}; pin extra fingerprints in "
                "licenses.fingerprints instead"
            )
        both = sorted(set(self.allowed) & set(self.denied))
        if both:
            raise ValueError(f"[P2] licences both allowed and denied: {both}")
        known = {e.id for e in self.entries()}
        unknown_pins = sorted(set(self.fingerprints) - known)
        if unknown_pins:
            raise ValueError(f"[P2] licenses.fingerprints names licences not in the catalogue: {unknown_pins}")
        for field_name, expr in (("weights_expression", self.weights_expression), ("code_expression", self.code_expression)):
            if expr is None:
                continue
            try:
                symbols = license_symbols(expr)
            except SpdxError as err:
                raise ValueError(f"[P2] licenses.{field_name}: {err}") from None
            if field_name == "code_expression":
                continue
            for sym in symbols:
                if sym not in known:
                    raise ValueError(f"[P2] licenses.weights_expression: {sym!r} is not in the licence catalogue")
                if sym not in self.allowed or sym in self.denied:
                    raise ValueError(f"[P2] licenses.weights_expression: {sym!r} is not in licenses.allowed")
        return self


class RequiredString(Strict):
    """A string a notice file must contain (check A2)."""

    file: RelPath
    text: Text
    match: Literal["normalized", "exact"] = "normalized"


class Display(Strict):
    """The attribution banner shown at the start of a run (check A4)."""

    when: Literal["session_start", "never"] = "session_start"
    banner: Text | None = None


class PatentNotice(Strict):
    """An IP notice that must be found in the model card and is surfaced to the operator (A5)."""

    file: RelPath = "README.md"
    text: Text


class Notices(Strict):
    """Notice files and attribution (checks A2, A4, A5)."""

    required_files: tuple[RelPath, ...] = ("LICENSE",)
    required_strings: tuple[RequiredString, ...] = ()
    display: Display = Display()
    patent_notice: PatentNotice | None = None
    bundle_on_export: tuple[RelPath, ...] = ("LICENSE",)


class Acceptance(Strict):
    """Licence acceptance, like a gated repository but recorded locally (checks L1, L2)."""

    required: bool = True
    acknowledgements: tuple[Acknowledgement, ...] = ()
    store: Annotated[str, Field(min_length=1, max_length=1000)] | None = None


# ---------------------------------------------------------------------------------------------
# guardrails


class PatternSpec(Strict):
    """One inline pattern: exactly one of ``literal`` / ``regex``."""

    literal: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    regex: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    @model_validator(mode="after")
    def _one(self) -> PatternSpec:
        if (self.literal is None) == (self.regex is None):
            raise ValueError("[P9] a pattern has exactly one of 'literal' or 'regex'")
        try:
            if self.literal is not None:
                compile_literal(self.literal)
            if self.regex is not None:
                compile_regex(self.regex)
        except PatternError as err:
            raise ValueError(f"[P9] {err}") from None
        return self

    def as_pair(self) -> tuple[str, str]:
        """``(kind, value)`` as used by ``PatternSet.build``."""
        if self.literal is not None:
            return ("literal", self.literal)
        assert self.regex is not None
        return ("regex", self.regex)


FilterAction = Literal["refuse", "redact", "flag"]


class KeywordFilter(Strict):
    """Built-in rail: literal / safe-regex patterns inline and/or from a pinned blocklist file."""

    engine: Literal["keyword"]
    patterns: tuple[PatternSpec, ...] = ()
    blocklist: RelPath | None = None
    blocklist_sha256: Sha256 | None = None
    action: FilterAction = "refuse"

    @model_validator(mode="after")
    def _source(self) -> KeywordFilter:
        if (self.blocklist is None) != (self.blocklist_sha256 is None):
            raise ValueError("[P9] blocklist and blocklist_sha256 go together (the blocklist file must be pinned)")
        if self.blocklist is None and not self.patterns:
            raise ValueError("[P9] a keyword filter needs patterns or a blocklist")
        return self


class ClassifierFilter(Strict):
    """Model-based rail (guard model), hook only: needs a rail the runner reports as available."""

    engine: Literal["classifier"]
    model_dir: Name
    model_sha256: Sha256
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    action: FilterAction = "refuse"


class NemoFilter(Strict):
    """NeMo Guardrails config, hook only: needs a rail the runner reports as available."""

    engine: Literal["nemoguardrails"]
    config_dir: Name
    config_sha256: Sha256
    action: FilterAction = "refuse"


Filter = Annotated[KeywordFilter | ClassifierFilter | NemoFilter, Field(discriminator="engine")]


class LimitsSpec(Strict):
    """Token, size and time limits (check G4)."""

    max_new_tokens: Annotated[int, Field(ge=1, le=1_048_576)]
    max_input_tokens: Annotated[int, Field(ge=1, le=16_777_216)]
    max_prompt_chars: Annotated[int, Field(ge=1, le=100_000_000)] = 1_000_000
    timeout_s: Annotated[float, Field(gt=0, le=7 * 86400)]


class DeclaredUse(Strict):
    """What the operator must say the run is for (check G5)."""

    required: bool = True
    allowed: tuple[Ident, ...] = ()
    default: Ident | None = None

    @model_validator(mode="after")
    def _default_allowed(self) -> DeclaredUse:
        if self.default is not None and self.allowed and self.default not in self.allowed:
            raise ValueError(f"[P10] declared_use.default {self.default!r} is not in declared_use.allowed")
        return self


class CompensatingGuardrail(Strict):
    """The substitute guardrail (OML section 2.1) that makes disabling a built-in one acceptable."""

    name: Name
    approver: Name
    approved_on: date | None = None
    description: Text | None = None


class Guardrails(Strict):
    """Guardrail integrity, rails, limits, declared use, disabling rules (checks G1-G7)."""

    #: guardrail file -> sha256; ``null`` = to be pinned at review (check G1 denies until pinned)
    pinned_integrity: dict[RelPath, Sha256 | None] = {}
    forbid_overrides: tuple[Override, ...] = ALL_OVERRIDES
    forbid_model_tags: tuple[Annotated[str, Field(min_length=1, max_length=100)], ...] = DEFAULT_FORBIDDEN_TAGS
    input_filter: Filter | None = None
    output_filter: Filter | None = None
    limits: LimitsSpec
    declared_use: DeclaredUse = DeclaredUse()
    prohibited_uses: tuple[Ident, ...] = TRUSTWORTHY_AI_PROHIBITED
    allow_disable: bool = False
    compensating_guardrail: CompensatingGuardrail | None = None
    audit_log: Annotated[str, Field(min_length=1, max_length=1000)] | None = None

    def disabled_by_policy(self) -> list[str]:
        """Guardrails this policy itself leaves off (each needs the compensating guardrail)."""
        off = [name for name in ("input_filter", "output_filter") if getattr(self, name) is None]
        off += [f"forbid_overrides:{o}" for o in ALL_OVERRIDES if o not in self.forbid_overrides]
        return off

    @model_validator(mode="after")
    def _disable_needs_compensation(self) -> Guardrails:
        off = self.disabled_by_policy()
        if (self.allow_disable or off) and self.compensating_guardrail is None:
            what = "allow_disable: true" if self.allow_disable else f"guardrails left off ({', '.join(off)})"
            raise ValueError(
                f"[P1] {what} requires compensating_guardrail with name and approver (OML section 2.1: "
                "a guardrail may only be removed with a substantially similar one in its place)"
            )
        bad = sorted({self.declared_use.default} & set(self.prohibited_uses)) if self.declared_use.default else []
        bad += sorted(set(self.declared_use.allowed) & set(self.prohibited_uses))
        if bad:
            raise ValueError(f"[P10] declared uses {bad} are also prohibited_uses")
        return self


# ---------------------------------------------------------------------------------------------
# sandbox, signatures, the whole document


class Sandbox(Strict):
    """What the policy requires of the launch (checks S5, S6); the sandbox package enforces it."""

    network: str = "none"
    required: bool = True
    read_only_model: bool = True

    @model_validator(mode="after")
    def _network(self) -> Sandbox:
        if self.network != "none":
            raise ValueError(
                f"[P5] sandbox.network is {self.network!r}; only 'none' is accepted (network access is a "
                "non-waivable floor check)"
            )
        return self


class Signatures(Strict):
    """Signature requirements (check S1/S2); trust anchors live in manifests/trusted/."""

    required: bool = True
    signers: tuple[Name, ...] = ()

    @model_validator(mode="after")
    def _required(self) -> Signatures:
        if not self.required:
            raise ValueError(
                "[P7] signatures.required: false is refused: an unsigned model is a non-waivable floor check; "
                "sign the reviewed snapshot with `secure-run sign`"
            )
        return self


class AuditSpec(Strict):
    """What each run's audit record keeps (issue 14.2).

    The rendered prompt and the released output are always recorded as sha256 digests;
    ``store_text: true`` keeps the texts themselves in the record too (off by default: the log
    then holds no user or model text).
    """

    store_text: bool = False


class Spec(Strict):
    """Everything the policy decides."""

    mode: Literal["enforce", "warn", "audit"]
    artifact: Artifact
    licenses: Licenses
    notices: Notices = Notices()
    acceptance: Acceptance = Acceptance()
    guardrails: Guardrails
    sandbox: Sandbox = Sandbox()
    signatures: Signatures = Signatures()
    audit: AuditSpec = AuditSpec()

    def weights_entries(self) -> list[LicenseEntry]:
        """Catalogue entries of the weights licence(s)."""
        out = []
        for sym in self.licenses.weights_licenses():
            entry = self.licenses.entry(sym)
            if entry is not None:
                out.append(entry)
        return out

    @model_validator(mode="after")
    def _licence_driven(self) -> Spec:
        obligations = {o for e in self.weights_entries() for o in e.obligations}
        if "preserve_guardrails" in obligations and not self.guardrails.pinned_integrity:
            raise ValueError(
                "[P3] the weights licence requires preserving guardrails: pin the chat template, generation "
                "config and tokenizer files in guardrails.pinned_integrity"
            )
        if "trustworthy_ai_terms" in obligations:
            missing = [u for u in TRUSTWORTHY_AI_PROHIBITED if u not in self.guardrails.prohibited_uses]
            if missing:
                raise ValueError(
                    f"[P8] the weights licence incorporates NVIDIA's Trustworthy AI terms: "
                    f"guardrails.prohibited_uses must include {missing}"
                )
        if "revocable" in obligations and not self.acceptance.required:
            raise ValueError(
                "[P11] the weights licence is revocable: acceptance.required must be true (record which text was accepted)"
            )
        return self


class RunPolicy(Strict):
    """The whole policy document."""

    apiVersion: Literal["secure-run/v1alpha1"]  # Kubernetes-style key
    kind: Literal["RunPolicy"]
    metadata: Metadata
    spec: Spec
