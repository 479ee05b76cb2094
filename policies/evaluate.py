"""Pre-run policy evaluation: a numbered checklist over the policy, the folder and the run facts.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from secure_run.policies import RunFacts, default_policy, evaluate
    >>> decision = evaluate(default_policy("demo"), RunFacts(model_dir=Path(tempfile.mkdtemp())), stage="check")
    >>> decision.allowed
    False

Checks (ids from spec/policy.md section 5; ``floor`` = non-waivable, denies in every mode):

======  =============================================================================  =====
id      passes when                                                                    floor
======  =============================================================================  =====
S1      the signature verified against the pinned trust                                yes
S2      the signer is one the policy names (any pinned signer if none named)           yes
S3      every digest matched; root digest equals the policy pin and the lock           yes
S4      no code / pickle-capable file in the folder (own scan + inventory facts)       yes
S5      the sandbox has no network                                                     yes
S6      the sandbox is used and mounts the model read-only                             no
S7      every ``files.pinned`` file has its pinned sha256                              yes
S8      the policy has not expired (``metadata.expires``)                              no
S9      every file matches ``files.allow``, none matches ``files.deny``, no links      no
S10     with ``artifact.source``: the signed provenance statement names that repo + rev no
A1      LICENSE identified exactly, allowed, and the expected weights licence          no
A2      required notice files and strings present (normalised match)                   no
A3      README front matter equals the policy's ``card`` values                        no
A4      the attribution banner is shown at session start (carries the attribution)     no
A5      the patent / IP notice is found and surfaced                                   no
L1      an acceptance record binds licence text, incorporated docs, policy, operator   no
L2      the acceptance carries every acknowledgement the policy requires               no
G1      chat template / generation config / tokenizer files match their pins; no       yes
        forbidden run-time override
G2      card tags and base_model carry no abliterated / uncensored ... lineage         no
G3      input and output rails configured and runnable here                            yes
G4      prompt size, prompt tokens and max_new_tokens within the limits               no
G5      declared use present, allowed, not prohibited                                  no
G6      no guardrail disabled unless the policy's compensating guardrail is active     yes
G7      the audit log is writable safely                                               no
======  =============================================================================  =====

Mode (section 8): ``enforce`` keeps every deny; ``warn`` and ``audit`` turn the deny of a
non-floor check into ``warn`` (``audit`` also hides everything but denials from the operator).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from . import _files
from .acceptance import AcceptanceStore, classify_model_license, incorporated_ids
from .card import CardError, as_list, front_matter, sentences_with
from .errors import StateFileError
from .facts import RunFacts
from .findings import Decision, Finding, Result, Stage
from .licenses import LicenseEntry, LicenseMatch, normalise_notice_text
from .policy import Policy
from .schema import FLOOR_DENY, ClassifierFilter, KeywordFilter, NemoFilter

FLOOR_CHECKS = frozenset({"S1", "S2", "S3", "S4", "S5", "S7", "G1", "G3", "G6"})
PRODUCTION_USES = frozenset({"production", "commercial_production", "prod"})
_MAX_LISTED = 10
_HASH_LIMIT = 256 * 1024 * 1024


@dataclass
class _Ctx:
    """Everything the checks share while one evaluation runs."""

    policy: Policy
    facts: RunFacts
    stage: Stage
    now: datetime
    store: AcceptanceStore | None
    findings: list[Finding] = field(default_factory=list)
    license: LicenseMatch | None = None
    card: dict[str, object] | None = None
    card_problem: str | None = None
    patent: list[str] = field(default_factory=list)

    def add(
        self, check: str, result: Result, message: str, *, hint: str | None = None, **evidence: object
    ) -> None:
        self.add_ev(check, result, message, evidence, hint=hint)

    def add_ev(
        self, check: str, result: Result, message: str, evidence: Mapping[str, object], *, hint: str | None = None
    ) -> None:
        self.findings.append(Finding(check, result, message, dict(evidence), check in FLOOR_CHECKS, hint=hint))

    def unknown(self, check: str, what: str, hint: str) -> None:
        """A fact this stage does not have: info at ``check``, deny at ``run``."""
        if self.stage == "check":
            self.add(check, "info", f"not evaluated at stage 'check': {what} is established at run time")
        else:
            self.add(check, "deny", f"{what} was not established for this run", hint=hint)

    @property
    def folder(self) -> Path:
        return self.facts.model_dir

    def read_bytes(self, name: str) -> bytes:
        """A small file of the folder; with verified digests, only the verified content is accepted.

        Raises:
            _files.UnsafeFile: missing, unsafe, or (given ``facts.verified_digests``) not among the
                verified files or different from what verification hashed.
        """
        data = _files.read_bytes(self.folder, name)
        verified = self.facts.verified_digests
        if verified is not None:
            if name not in verified:
                raise _files.UnsafeFile("not among the verified files")
            if hashlib.sha256(data).hexdigest() != verified[name]:
                raise _files.UnsafeFile("changed since verification (sha256 differs from the verified digest)")
        return data

    def read_text(self, name: str) -> str:
        """:meth:`read_bytes` decoded as strict UTF-8 (a BOM is dropped)."""
        try:
            return self.read_bytes(name).decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            raise _files.UnsafeFile("not valid UTF-8 text") from None


def _sha256_file(folder: Path, name: str) -> str:
    return hashlib.sha256(_files.read_bytes(folder, name, limit=_HASH_LIMIT)).hexdigest()


def _listed(items: list[str]) -> str:
    head = ", ".join(items[:_MAX_LISTED])
    return head + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


# ------------------------------------------------------------------------------------------------
# 1. policy validity


#: S8 warns this many days before ``metadata.expires`` (a scheduled CI run shows it in time).
EXPIRY_WARNING_DAYS = 30


def _check_expiry(ctx: _Ctx) -> None:
    expires = ctx.policy.document.metadata.expires
    if expires is not None and ctx.now.date() > expires:
        ctx.add("S8", "deny", f"policy expired on {expires.isoformat()}", expires=expires.isoformat(),
                hint="re-review the model and the policy, then move metadata.expires")
    elif expires is not None and (expires - ctx.now.date()).days <= EXPIRY_WARNING_DAYS:
        days = (expires - ctx.now.date()).days
        ctx.add("S8", "warn", f"policy expires on {expires.isoformat()} (in {days} day(s)); every run is "
                "denied after that", expires=expires.isoformat(), days_left=days,
                hint="re-review the model and the policy, then move metadata.expires")
    else:
        ctx.add("S8", "pass", "policy is within its validity period",
                expires=expires.isoformat() if expires else None)


# ------------------------------------------------------------------------------------------------
# 2. artifact integrity


def _check_signature(ctx: _Ctx) -> None:
    sig = ctx.facts.signature
    if sig is None:
        ctx.unknown("S1", "the signature verification", "run `secure-run verify` first (signatures are required)")
        ctx.unknown("S2", "the signer", "verify the signature against the pinned trust")
        ctx.unknown("S3", "digest verification", "verify the folder against its signed manifest")
        return
    if sig.verified:
        ctx.add("S1", "pass", "signature verified against the pinned trust", signer=sig.signer)
    else:
        ctx.add("S1", "deny", "model is unsigned or its signature did not verify", signer=sig.signer,
                hint="sign the reviewed snapshot with `secure-run sign` and verify with the pinned key")
    signers = ctx.policy.spec.signatures.signers
    if not signers:
        ctx.add("S2", "pass" if sig.verified else "deny",
                "any signer pinned in manifests/trusted is accepted" if sig.verified else "no verified signer",
                signer=sig.signer)
    elif sig.verified and sig.signer in signers:
        ctx.add("S2", "pass", f"signer {sig.signer} is named by the policy", signer=sig.signer)
    else:
        ctx.add("S2", "deny", f"signer {sig.signer!r} is not one of the policy's signers", signer=sig.signer,
                expected=list(signers), hint="have the model signed by a signer listed in spec.signatures.signers")
    problems: list[str] = []
    if not sig.digests_matched:
        problems.append("file digests do not match the signed manifest")
    pin = ctx.policy.spec.artifact.root_digest
    if pin is not None and sig.root_digest != pin:
        problems.append(f"root digest {sig.root_digest} != policy pin {pin}")
    if sig.lock_matched is False:
        problems.append("root digest does not match the lock entry (an older or different signed version?)")
    if problems:
        ctx.add("S3", "deny", "; ".join(problems), root_digest=sig.root_digest, pinned=pin,
                hint="re-verify the folder; restore the reviewed files or update the lock after review")
    elif sig.lock_matched is None and pin is None:
        ctx.add("S3", "warn", "digests matched, but the root digest was compared with no lock entry or pin",
                root_digest=sig.root_digest, hint="pin the reviewed model with `secure-run lock add DIR --lock FILE` and pass --lock FILE")
    else:
        ctx.add("S3", "pass", "digests matched; root digest equals the lock / policy pin", root_digest=sig.root_digest)


def _check_folder(ctx: _Ctx) -> None:
    files = ctx.policy.spec.artifact.files
    try:
        entries, truncated = _files.scan_folder(ctx.folder)
    except OSError as err:
        ctx.add("S4", "deny", f"model folder cannot be listed: {err.strerror}", hint="check the --model path")
        return
    floor_hits: list[str] = list(ctx.facts.code_files or ())
    extra_deny: list[str] = []
    not_allowed: list[str] = []
    links: list[str] = []
    for entry in entries:
        probe = entry.path + "/_" if entry.kind == "dir" else entry.path
        if any(_files.glob_match(p, probe) for p in FLOOR_DENY):
            floor_hits.append(entry.path + "/" if entry.kind == "dir" else entry.path)
            continue
        if entry.kind in ("symlink", "other"):
            links.append(f"{entry.path} ({entry.kind})")
        elif entry.kind == "file":
            if any(_files.glob_match(p, entry.path) for p in files.deny):
                extra_deny.append(entry.path)
            elif not any(_files.glob_match(p, entry.path) for p in files.allow):
                not_allowed.append(entry.path)
    # a code folder (__pycache__/) is listed only when it holds nothing that is listed itself
    hits = set(floor_hits)
    floor_hits = sorted(h for h in hits if not (h.endswith("/") and any(o.startswith(h) and o != h for o in hits)))
    if floor_hits:
        ctx.add("S4", "deny", f"code or pickle-capable files present: {_listed(floor_hits)}", files=floor_hits,
                hint="re-import the upstream snapshot with `secure-run import` (it drops them); never run them")
    elif truncated:
        ctx.add("S4", "deny", f"folder has more than {_files.MAX_SCAN_ENTRIES} entries; not scanned completely")
    else:
        ctx.add("S4", "pass", "no code or pickle-capable files", scanned=len(entries))
    problems = []
    if links:
        problems.append(f"links / special files: {_listed(links)}")
    if extra_deny:
        problems.append(f"denied by files.deny: {_listed(extra_deny)}")
    if not_allowed:
        problems.append(f"not in files.allow: {_listed(not_allowed)}")
    if problems:
        ctx.add("S9", "deny", "; ".join(problems), links=links, denied=extra_deny, not_allowed=not_allowed,
                hint="remove the files or extend spec.artifact.files.allow after review")
    else:
        ctx.add("S9", "pass", "every file is allowed by the policy's file rules")


def _check_pins(ctx: _Ctx, pins: Mapping[str, str | None]) -> list[str]:
    bad: list[str] = []
    verified = ctx.facts.verified_digests
    for name, expected in sorted(pins.items()):
        if verified is not None:  # the digests verification computed: never a fresh hash from disk
            if name not in verified:
                bad.append(f"{name}: not among the verified files")
                continue
            got = verified[name]
        else:
            try:
                got = _sha256_file(ctx.folder, name)
            except _files.UnsafeFile as err:
                bad.append(f"{name}: {err.reason}")
                continue
        if expected is None:
            bad.append(f"{name}: not pinned yet (review it, then pin sha256 {got})")
        elif got != expected:
            bad.append(f"{name}: sha256 {got} != pinned {expected}")
    return bad


def _check_pinned_files(ctx: _Ctx) -> None:
    pins = ctx.policy.spec.artifact.files.pinned
    bad = _check_pins(ctx, pins)
    if bad:
        ctx.add("S7", "deny", f"pinned files differ: {_listed(bad)}", mismatches=bad,
                hint="restore the reviewed files; on first review, pin the sha256 values shown in spec.artifact.files.pinned")
    else:
        ctx.add("S7", "pass", f"{len(pins)} pinned file(s) match", files=sorted(pins))


# ------------------------------------------------------------------------------------------------
# 3. licence and notices


def _check_provenance(ctx: _Ctx) -> None:
    """S10: the policy's ``artifact.source`` (a reviewed upstream repository and commit) must be the
    source named by the folder's provenance statement, which the folder's signature covers."""
    from secure_run.manifests.provenance import PROVENANCE_FILE, provenance_source

    src = ctx.policy.spec.artifact.source
    if src is None:
        ctx.add("S10", "info", "the policy names no source; import provenance is not required")
        return
    remedy = (f"re-import the reviewed snapshot with 'secure-run import SRC DEST --source-repo {src.hf_repo} "
              f"--source-revision {src.revision}', then sign it again")
    try:
        repo, revision = provenance_source(ctx.read_bytes(PROVENANCE_FILE))
    except _files.UnsafeFile as err:
        ctx.add("S10", "deny", f"the policy requires a provenance statement from {src.hf_repo}@{src.revision}, "
                f"but {PROVENANCE_FILE} is {err.reason}", hint=remedy)
        return
    except ValueError as err:
        ctx.add("S10", "deny", f"{PROVENANCE_FILE} is {err}", hint=remedy)
        return
    if (repo, revision) != (src.hf_repo, src.revision):
        ctx.add("S10", "deny", f"the model was imported from {repo}@{revision}; the policy requires "
                f"{src.hf_repo}@{src.revision}", source=f"{repo}@{revision}", hint=remedy)
    else:
        ctx.add("S10", "pass", f"imported from {repo}@{revision}, as the policy requires", source=f"{repo}@{revision}")


def _check_license(ctx: _Ctx) -> None:
    lic = ctx.policy.spec.licenses
    match, problem = classify_model_license(ctx.policy, ctx.folder)
    if match is None:
        ctx.add("A1", "deny", f"licence file problem: {problem}", hint="the model folder must ship its LICENSE")
        return
    ctx.license = match
    expected = lic.weights_licenses()
    ev = match.to_json()
    if match.kind == "exact":
        assert match.license_id is not None
        if match.license_id in lic.denied or match.license_id not in lic.allowed:
            ctx.add_ev("A1", "deny", f"LICENSE is {match.license_id}, which the policy does not allow", ev,
                    hint="this model cannot be run under this policy")
        elif match.license_id not in expected:
            ctx.add_ev("A1", "deny", f"LICENSE is {match.license_id}; the policy expects {' / '.join(expected)}", ev,
                    hint="check that the policy belongs to this model")
        else:
            ctx.add_ev("A1", "pass", f"LICENSE identified as {match.license_id} (normalised fingerprint {match.fingerprint[:16]}...)", ev)
        return
    if match.kind in ("near", "mismatch"):
        result: Result = "deny" if lic.on_near_match == "deny" else "warn"
        changes = "; ".join(match.differences[:3]) or "wording differs"
        ctx.add_ev("A1", result, f"LICENSE resembles {match.license_id} but its text differs from every reviewed copy "
                f"(fingerprint mismatch): {changes}", ev,
                hint="a clause may have been changed: compare with the reviewed text; pin it only after review")
        return
    if match.kind == "structural":
        result = "deny" if lic.on_unknown == "deny" else "warn"
        ctx.add_ev("A1", result, f"LICENSE has the structure of {match.license_id} but no reviewed fingerprint is pinned",
                ev, hint=f"review LICENSE, then pin {match.fingerprint} under licenses.fingerprints.{match.license_id}")
        return
    result = "deny" if lic.on_unknown == "deny" else "warn"
    closest = f" (closest: {match.closest}, similarity {match.similarity})" if match.closest else ""
    ctx.add_ev("A1", result, f"LICENSE is not a known licence text{closest}", ev,
            hint="add the licence to the policy's catalogue after legal review")


def _license_entry(ctx: _Ctx) -> LicenseEntry | None:
    if ctx.license is None or ctx.license.license_id is None or ctx.license.kind != "exact":
        return None
    return ctx.policy.spec.licenses.entry(ctx.license.license_id)


def _check_notices(ctx: _Ctx) -> None:
    notices = ctx.policy.spec.notices
    problems: list[str] = []
    found: list[str] = []
    for name in notices.required_files:
        try:
            ctx.read_bytes(name)
        except _files.UnsafeFile as err:
            problems.append(f"required file {name}: {err.reason}")
    wanted = [(r.file, r.text, r.match) for r in notices.required_strings]
    entry = _license_entry(ctx) or (
        ctx.policy.spec.licenses.entry(ctx.license.license_id) if ctx.license and ctx.license.license_id else None
    )
    if entry is not None and entry.attribution:
        if "attribution_on_redistribution" in entry.obligations:
            wanted.append(("NOTICE", entry.attribution, "normalized"))
        elif "attribution_if_notice_present" in entry.obligations and os.path.lexists(ctx.folder / "NOTICE"):
            wanted.append(("NOTICE", entry.attribution, "normalized"))
    for name, text, how in dict.fromkeys(wanted):
        try:
            content = ctx.read_text(name)
        except _files.UnsafeFile as err:
            problems.append(f"{name} ({err.reason}) cannot carry {text!r}")
            continue
        ok = text in content if how == "exact" else normalise_notice_text(text) in normalise_notice_text(content)
        (found if ok else problems).append(f"{name} contains {text!r}" if ok else f"{name} lacks {text!r}")
    if problems:
        ctx.add("A2", "deny", "; ".join(problems), missing=problems, found=found,
                hint="the model folder must ship the notices its licence requires (redistribution duty)")
    else:
        ctx.add("A2", "pass", "required notices present" + (f": {'; '.join(found)}" if found else ""), found=found)


def _load_card(ctx: _Ctx) -> None:
    try:
        readme = ctx.read_text("README.md")
    except _files.UnsafeFile as err:
        ctx.card_problem = f"README.md: {err.reason}"
        return
    ctx.patent = sentences_with(readme, "patent")
    try:
        ctx.card = front_matter(readme)
    except CardError as err:
        ctx.card_problem = str(err)


def _check_card(ctx: _Ctx) -> None:
    expected = ctx.policy.spec.artifact.card
    if expected is None:
        ctx.add("A3", "info", "the policy pins no model-card values")
        return
    if ctx.card is None:
        ctx.add("A3", "deny", f"model card cannot be checked: {ctx.card_problem}",
                hint="the folder needs README.md with YAML front matter")
        return
    mismatches = []
    for key, want in expected.model_dump(exclude_none=True).items():
        got = ctx.card.get(key)
        if as_list(got) != as_list(want):
            mismatches.append(f"{key}: card has {got!r}, policy expects {want!r}")
    if mismatches:
        ctx.add("A3", "deny", "model card front matter disagrees with the policy: " + "; ".join(mismatches),
                mismatches=mismatches, hint="the folder is not the model this policy was written for, or the card changed")
    else:
        ctx.add_ev("A3", "pass", "model card front matter matches the policy",
                   {k: ctx.card.get(k) for k in expected.model_dump(exclude_none=True)})


def _check_lineage(ctx: _Ctx) -> None:
    forbidden = ctx.policy.spec.guardrails.forbid_model_tags
    if ctx.card is None:
        ctx.add("G2", "info", f"no front matter to check lineage tags ({ctx.card_problem})")
        return
    values = [v.lower() for key in ("tags", "base_model", "model_name", "name") for v in as_list(ctx.card.get(key))]
    hits = sorted({v for v in values for pat in forbidden if fnmatch.fnmatchcase(v, f"*{pat.lower()}*")})
    if hits:
        ctx.add("G2", "deny", f"model lineage suggests removed safety training: {_listed(hits)}", hits=hits,
                hint="use the original model; a guardrail-stripped derivative breaks OML section 2.1")
    else:
        ctx.add("G2", "pass", "no abliterated / uncensored lineage in tags or base_model")


def _check_attribution(ctx: _Ctx) -> None:
    banner = ctx.policy.banner()
    entry = _license_entry(ctx)
    if banner is None:
        ctx.add("A4", "info", "attribution banner display is off (notices.display.when: never)")
        return
    if entry is not None and entry.attribution and normalise_notice_text(entry.attribution) not in normalise_notice_text(banner):
        ctx.add("A4", "warn", f"banner does not carry the licence attribution {entry.attribution!r}", banner=banner,
                hint="add the attribution sentence to notices.display.banner")
        return
    ctx.add("A4", "pass", "attribution banner is shown at session start", banner=banner,
            bundle_on_export=list(ctx.policy.spec.notices.bundle_on_export))


def _check_patent(ctx: _Ctx) -> None:
    want = ctx.policy.spec.notices.patent_notice
    if want is None:
        ctx.add("A5", "info", "IP notices in the model card: " + (" | ".join(ctx.patent) or "none"), sentences=ctx.patent)
        return
    try:
        content = ctx.read_text(want.file)
    except _files.UnsafeFile as err:
        ctx.add("A5", "warn", f"{want.file}: {err.reason}; cannot surface the patent notice",
                hint="restore the model card")
        return
    if normalise_notice_text(want.text) in normalise_notice_text(content):
        ctx.patent = [want.text]
        ctx.add("A5", "info", f"patent notice: {want.text}", notice=want.text, file=want.file)
    else:
        ctx.add("A5", "warn", f"{want.file} lacks the expected patent notice {want.text!r}", file=want.file,
                hint="the model card changed: re-review it")


# ------------------------------------------------------------------------------------------------
# 4. acceptance


def _check_acceptance(ctx: _Ctx) -> None:
    acc = ctx.policy.spec.acceptance
    if not acc.required:
        ctx.add("L1", "pass", "the policy requires no licence acceptance")
        ctx.add("L2", "pass", "no acknowledgements required")
        return
    match = ctx.license
    if match is None or match.kind != "exact" or match.license_id is None:
        ctx.add("L1", "deny", "no exactly identified licence text to accept (see A1)",
                hint="fix A1 first; acceptance binds the exact licence text")
        ctx.add("L2", "deny", "acknowledgements need an accepted licence (see L1)")
        return
    if ctx.facts.operator is None or ctx.store is None:
        ctx.unknown("L1", "the operator's licence acceptance", "accept with `secure-run policy accept-license`")
        ctx.unknown("L2", "the operator's acknowledgements", "accept with `secure-run policy accept-license`")
        return
    incorporated = incorporated_ids(ctx.policy.spec.licenses.entry(match.license_id))
    try:
        record = ctx.store.find(license_id=match.license_id, fingerprint=match.fingerprint, incorporated=incorporated,
                                policy_sha256=ctx.policy.sha256, operator=ctx.facts.operator)
    except StateFileError as err:
        ctx.add("L1", "deny", f"acceptance store unreadable: {err.message}", store=str(ctx.store.path), hint=err.hint)
        ctx.add("L2", "deny", "acknowledgements unreadable (see L1)")
        return
    hint = (f"secure-run policy accept-license {match.license_id} {ctx.folder} --policy {ctx.policy.source} "
            + " ".join(f"--acknowledge {a}" for a in acc.acknowledgements))
    if record is None:
        ctx.add("L1", "deny", f"operator {ctx.facts.operator!r} has not accepted {match.license_id} "
                f"(text {match.fingerprint[:16]}...) under this policy", store=str(ctx.store.path), hint=hint.strip())
        ctx.add("L2", "deny", "no acknowledgements recorded (see L1)")
        return
    ctx.add("L1", "pass", f"accepted by {record.operator} at {record.accepted_at}", accepted_at=record.accepted_at,
            license_fingerprint=record.license_fingerprint)
    missing = sorted(set(acc.acknowledgements) - set(record.acknowledgements))
    if missing:
        ctx.add("L2", "deny", f"acknowledgements missing: {missing}", missing=missing, hint=hint.strip())
    else:
        ctx.add("L2", "pass", "all required acknowledgements recorded", acknowledged=list(record.acknowledgements))


# ------------------------------------------------------------------------------------------------
# 5. guardrails


def _check_integrity(ctx: _Ctx) -> None:
    rails = ctx.policy.spec.guardrails
    bad = _check_pins(ctx, rails.pinned_integrity)
    overrides = sorted(set(ctx.facts.guardrails.overrides) & set(rails.forbid_overrides))
    if overrides:
        bad.append(f"forbidden run-time overrides in effect: {overrides}")
    if bad:
        ctx.add("G1", "deny", f"guardrail integrity broken: {_listed(bad)}", problems=bad,
                hint="restore the reviewed chat template / generation config / tokenizer files and drop forbidden "
                "overrides; on first review, pin the sha256 values shown in spec.guardrails.pinned_integrity")
    else:
        allowed = sorted(set(ctx.facts.guardrails.overrides) - set(rails.forbid_overrides))
        ctx.add("G1", "pass", f"{len(rails.pinned_integrity)} guardrail file(s) match their pins; no forbidden override",
                files=sorted(rails.pinned_integrity), allowed_overrides=allowed)


def _check_rails(ctx: _Ctx) -> None:
    rails = ctx.policy.spec.guardrails
    available = ctx.facts.guardrails.available_rails
    problems: list[str] = []
    notes: list[str] = []
    for name in ("input_filter", "output_filter"):
        flt = getattr(rails, name)
        if name in ctx.facts.guardrails.disabled:
            notes.append(f"{name} disabled for this run (see G6)")
        elif flt is None:
            assert rails.compensating_guardrail is not None  # P1
            notes.append(f"{name} not configured; compensating guardrail {rails.compensating_guardrail.name!r}")
        elif isinstance(flt, KeywordFilter):
            patterns = ctx.policy.input_patterns if name == "input_filter" else ctx.policy.output_patterns
            count = len(patterns.patterns) if patterns else 0
            notes.append(f"{name}: keyword, {count} pattern(s), action {flt.action}")
        elif isinstance(flt, ClassifierFilter | NemoFilter):
            if flt.engine in available:
                notes.append(f"{name}: {flt.engine} rail available")
            else:
                problems.append(f"{name} uses engine {flt.engine!r}, which is not available on this host")
    if problems:
        ctx.add("G3", "deny", "; ".join(problems), problems=problems,
                hint="install the rail offline (pinned by hash) or use the built-in keyword engine")
    else:
        ctx.add("G3", "pass", "; ".join(notes), rails=notes)


def _check_limits(ctx: _Ctx) -> None:
    limits = ctx.policy.limits()
    prompt_chars = len(ctx.facts.prompt) if ctx.facts.prompt is not None else None
    problems = limits.problems(prompt_chars=prompt_chars, prompt_tokens=ctx.facts.prompt_tokens,
                               max_new_tokens=ctx.facts.max_new_tokens)
    ev = {"max_new_tokens": limits.max_new_tokens, "max_input_tokens": limits.max_input_tokens,
          "max_prompt_chars": limits.max_prompt_chars, "timeout_s": limits.timeout_s}
    if problems:
        ctx.add_ev("G4", "deny", "; ".join(problems), ev, hint="shorten the prompt or lower --max-new-tokens")
    else:
        ctx.add_ev("G4", "pass", f"within limits (max_new_tokens {limits.max_new_tokens}, max_input_tokens "
                   f"{limits.max_input_tokens}, timeout {limits.timeout_s:g} s)", ev)


def _declared_use(ctx: _Ctx) -> str | None:
    return ctx.facts.declared_use or ctx.policy.spec.guardrails.declared_use.default


def _check_use(ctx: _Ctx) -> None:
    rails = ctx.policy.spec.guardrails
    use = _declared_use(ctx)
    if use is None:
        if not rails.declared_use.required:
            ctx.add("G5", "pass", "no declared use required")
        elif ctx.stage == "check":
            ctx.add("G5", "info", "no declared use given (required at run time: --use USE)")
        else:
            ctx.add("G5", "deny", "a declared use is required and none was given",
                    hint=f"declare the purpose of the run, one of {list(rails.declared_use.allowed)}")
        return
    norm = use.strip().lower().replace(" ", "_").replace("-", "_")
    prohibited = {p.replace("-", "_") for p in rails.prohibited_uses}
    if norm in prohibited:
        ctx.add("G5", "deny", f"declared use {use!r} is prohibited (NVIDIA Trustworthy AI terms / organisation list)",
                declared_use=use, prohibited=sorted(prohibited), hint="this model may not be used for that purpose")
        return
    allowed = {a.replace("-", "_") for a in rails.declared_use.allowed}
    if allowed and norm not in allowed:
        ctx.add("G5", "deny", f"declared use {use!r} is not one of the allowed uses {sorted(allowed)}",
                declared_use=use, hint="declare an allowed purpose or extend declared_use.allowed after review")
        return
    if ctx.policy.spec.artifact.research_only and norm in PRODUCTION_USES:
        ctx.add("G5", "warn", f"declared use {use!r}, but the model card describes a research-only release",
                declared_use=use, hint="the release is not meant for production use")
        return
    ctx.add("G5", "pass", f"declared use {use!r} is allowed", declared_use=use)


def _check_disable(ctx: _Ctx) -> None:
    rails = ctx.policy.spec.guardrails
    disabled = sorted(ctx.facts.guardrails.disabled)
    if not disabled:
        ctx.add("G6", "pass", "no guardrail disabled for this run")
        return
    comp = rails.compensating_guardrail
    if not rails.allow_disable or comp is None:
        ctx.add("G6", "deny", f"guardrails turned off ({', '.join(disabled)}) but the policy does not allow disabling "
                "them (allow_disable with a compensating guardrail)", disabled=disabled,
                hint="keep the guardrails on; OML section 2.1 forbids removing them without a substitute")
    elif comp.name not in ctx.facts.guardrails.available_rails:
        ctx.add("G6", "deny", f"guardrails turned off ({', '.join(disabled)}); the compensating guardrail "
                f"{comp.name!r} is not active on this host", disabled=disabled, compensating=comp.name,
                hint=f"start the compensating guardrail {comp.name!r} or keep the built-in rails on")
    else:
        ctx.add("G6", "pass", f"guardrails off ({', '.join(disabled)}) with compensating guardrail {comp.name!r} "
                f"approved by {comp.approver}", disabled=disabled, compensating=comp.name, approver=comp.approver)


def _check_audit(ctx: _Ctx) -> None:
    path = ctx.policy.audit_log_path()
    if os.path.islink(path):
        ctx.add("G7", "deny", f"audit log {path} is a symlink", path=str(path), hint="remove the link")
    elif os.path.lexists(path) and not os.path.isfile(path):
        ctx.add("G7", "deny", f"audit log {path} is not a regular file", path=str(path))
    else:
        ctx.add("G7", "pass", f"decisions and guardrail events are logged to {path}", path=str(path))


# ------------------------------------------------------------------------------------------------
# 6. sandbox


def _check_sandbox(ctx: _Ctx) -> None:
    sb = ctx.facts.sandbox
    want = ctx.policy.spec.sandbox
    if sb is None:
        ctx.unknown("S5", "the sandbox network setting", "launch through a sandbox backend with network none")
        ctx.unknown("S6", "the sandbox configuration", "launch through a sandbox backend")
        return
    if sb.network_enabled:
        ctx.add("S5", "deny", "the sandbox has network access", backend=sb.backend,
                hint="run with network 'none' (non-waivable)")
    else:
        ctx.add("S5", "pass", "no network in the sandbox", backend=sb.backend)
    problems = []
    if want.required and not sb.enabled:
        problems.append("the run is not sandboxed")
    if want.read_only_model and not sb.read_only_model:
        problems.append("the model folder is mounted writable")
    if problems:
        ctx.add("S6", "deny", "; ".join(problems), backend=sb.backend, hint="use --sandbox docker or namespace")
    else:
        ctx.add("S6", "pass", f"sandboxed ({sb.backend}), model mounted read-only", backend=sb.backend)


# ------------------------------------------------------------------------------------------------
# 7. decide


def _apply_mode(findings: list[Finding], mode: str) -> list[Finding]:
    if mode == "enforce":
        return findings
    return [replace(f, result="warn", downgraded=True) if f.result == "deny" and not f.floor else f for f in findings]


_CHECKLIST: tuple[Callable[[_Ctx], None], ...] = (
    _check_expiry,  # 1. policy validity
    _check_signature,  # 2. artifact integrity
    _check_folder,
    _check_pinned_files,
    _check_provenance,
    _check_license,  # 3. licence and notices
    _check_notices,
    _load_card,
    _check_card,
    _check_attribution,
    _check_patent,
    _check_acceptance,  # 4. acceptance
    _check_integrity,  # 5. guardrails
    _check_lineage,
    _check_rails,
    _check_limits,
    _check_use,
    _check_disable,
    _check_audit,
    _check_sandbox,  # 6. sandbox
)


def evaluate(
    policy: Policy,
    facts: RunFacts,
    *,
    stage: Stage = "run",
    acceptances: AcceptanceStore | None = None,
    now: datetime | None = None,
) -> Decision:
    """Evaluate ``policy`` for ``facts`` and the model folder; never raises for a denial.

    Args:
        policy: a loaded policy.
        facts: what the runner established (``None`` fields: not established).
        stage: ``run`` (missing facts deny) or ``check`` (missing facts are ``info``).
        acceptances: the acceptance store (default: the policy's store when ``facts.operator`` is set).
        now: evaluation time (tests pin it).

    Returns:
        The :class:`Decision`; call ``raise_if_denied()`` to turn a denial into exit code 1.
    """
    moment = now or datetime.now(UTC)
    store = acceptances
    if store is None and facts.operator is not None:
        store = AcceptanceStore(policy.acceptance_store_path())
    ctx = _Ctx(policy, facts, stage, moment, store)
    if not facts.model_dir.is_dir() or facts.model_dir.is_symlink():
        ctx.add("S4", "deny", f"{facts.model_dir} is not a folder (or is a symlink)", hint="pass the model folder")
    else:
        for check in _CHECKLIST:
            check(ctx)
    findings = _apply_mode(ctx.findings, policy.mode)
    sig = facts.signature
    return Decision(
        allowed=not any(f.result == "deny" for f in findings),
        mode=policy.document.spec.mode,
        stage=stage,
        policy_name=policy.name,
        policy_sha256=policy.sha256,
        findings=tuple(findings),
        model_dir=str(facts.model_dir),
        model_root_digest=sig.root_digest if sig is not None else None,
        license=ctx.license.to_json() if ctx.license is not None else None,
        banner=policy.banner(),
        patent_notice=tuple(ctx.patent),
        limits={k: v for k, v in vars(policy.limits()).items()},
        declared_use=_declared_use(ctx),
        operator=facts.operator,
        timestamp=moment.isoformat(timespec="seconds"),
    )
