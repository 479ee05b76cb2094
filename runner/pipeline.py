"""``secure-run generate`` as a library: the pre-run gate as a numbered checklist, then the run.

    >>> from secure_run.runner.pipeline import GenerateOptions, prepare   # doctest: +SKIP
    >>> session = prepare(GenerateOptions())          # the embedded demo, Docker sandbox
    >>> for out in session.run_turn([{"role": "user", "content": "hello"}]):
    ...     print(out)

The gate (:func:`prepare`) runs every check before a single weight is loaded, in this order:

1. resolve the model folder (``--model`` or the embedded demo), its policy and the lock;
2. verify the folder: inventory (no code, pickles, links, unknown files), signature against the
   pinned trust, every file's sha256, exact file-set equality, root digest equal to the lock;
3. compare the checkpoint's tensor table (from the verified safetensors headers) with the
   vendored architecture's expected names, shapes and dtypes;
4. evaluate the licence and guardrail policy with the facts established above (licence
   acceptance recorded first when asked for); a denial stops here and is written to the audit log;
5. choose the sandbox backend and its policy (no network, read-only root and model, no
   capabilities, seccomp, non-root, pids/memory/wall-clock limits, GPU only when asked).

Each turn (:meth:`Session.run_turn`) then: checks the prompt against the input guardrail and the
limits, starts the worker in a fresh sandbox with the verified file identities (the worker
re-checks them before and after reading), streams tokens through the output guardrail, enforces
the time limit, and appends an audit record with the run statistics and guardrail events.
"""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from secure_run.errors import PolicyViolation, SecureRunError, UsageError

Backend = Literal["docker", "namespace"]

#: load time granted on top of the policy's generation timeout before the sandbox is killed
LOAD_ALLOWANCE_S = 120.0


@dataclass(frozen=True)
class GenerateOptions:
    """What the operator asked for (the CLI's options, validated by click)."""

    model_dir: Path | None = None
    policy: str | None = None
    lock: Path | None = None
    trust: Any = None  # secure_run.manifests.Trust | None
    signature: Path | None = None
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    sandbox: Backend = "docker"
    gpu: bool = False
    dtype: str | None = None
    stop: tuple[str, ...] = ()  # stop strings, applied on the host to the guardrail-checked text
    memory_mib: int | None = None
    build_image: bool = True
    declared_use: str | None = None
    operator: str | None = None
    accept_license: str | None = None
    acknowledgements: tuple[str, ...] = ()
    audit_log: Path | None = None


@dataclass(frozen=True)
class Status:
    """A progress line for the operator (stage name + text)."""

    stage: str
    message: str


@dataclass(frozen=True)
class Text:
    """Released (guardrail-checked) completion text."""

    text: str


@dataclass(frozen=True)
class Final:
    """End of one turn: statistics and the audit record that was written."""

    stats: dict[str, Any]
    blocked: bool
    audit_path: str


Event = Status | Text | Final


def _default_operator() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): fall back to the uid
        return f"uid-{os.getuid()}"


@dataclass
class Session:
    """A verified, policy-approved model ready to run turns in fresh sandboxes."""

    options: GenerateOptions
    model_dir: Path
    is_demo: bool
    policy: Any  # secure_run.policies.Policy
    verification: Any  # secure_run.manifests.VerificationResult
    decision: Any  # secure_run.policies.Decision
    facts: Any  # secure_run.policies.RunFacts
    backend: Any  # secure_run.sandbox.Backend
    sandbox_policy: Any  # secure_run.sandbox.SandboxPolicy
    tokenizer: Any  # secure_run.model.tokenizer.ModelTokenizer
    max_new_tokens: int
    audit: Any  # secure_run.policies.AuditLog
    notices: list[str] = field(default_factory=list)

    # --- one turn ---------------------------------------------------------------------------

    def run_turn(self, messages: Sequence[Mapping[str, str]]) -> Iterator[Event]:
        """Run one completion for ``messages`` (chat roles ``system``/``user``/``assistant``)."""
        from secure_run.policies import audit_record
        from secure_run.runner.stops import StopStrings
        from secure_run.sandbox import GenerateRequest, run_worker
        from secure_run.sandbox.protocol import FileIdentityModel, StatsEvent, TextEvent, TokenEvent

        # 6. input guardrail and limits, on every user message and on the rendered prompt.
        limits = self.policy.limits()
        guard_in = self.policy.input_guard()
        events: list[Any] = []
        checked: list[dict[str, str]] = []
        try:
            for m in messages:
                content = m["content"]
                if m["role"] == "user":
                    verdict = guard_in.enforce(content)
                    events.extend(verdict.events)
                    content = verdict.text
                checked.append({"role": m["role"], "content": content})
            prompt_text = self.tokenizer.render_chat(checked)
            prompt_tokens = len(self.tokenizer.encode(prompt_text))
            limits.check(prompt_chars=sum(len(m["content"]) for m in checked), prompt_tokens=prompt_tokens,
                         max_new_tokens=self.max_new_tokens)
        except SecureRunError as err:
            self._audit_refusal(err, events)
            raise

        # 7. the worker, in a fresh sandbox, with the verified identities of the weight files.
        identities = {
            f.name: FileIdentityModel(st_dev=f.identity.dev, st_ino=f.identity.ino, st_size=f.identity.size,
                                      st_mtime_ns=f.identity.mtime_ns)
            for f in self.verification.files if f.name.endswith(".safetensors")
        }
        request = GenerateRequest(
            task="generate", device="cuda" if self.options.gpu else "cpu", dtype=self.options.dtype,
            messages=tuple(checked), max_new_tokens=self.max_new_tokens, temperature=self.options.temperature,
            top_k=self.options.top_k, top_p=self.options.top_p, seed=self.options.seed, file_identities=identities,
        )
        yield Status("sandbox", f"starting the {self.backend.name} sandbox (no network, read-only model)")

        # 8. stream through the output guardrail under the policy's time limit.
        guard_out = self.policy.output_guard()
        stopper = StopStrings(self.options.stop)  # cuts the released text
        early = StopStrings(self.options.stop)  # sees the raw text: ends the worker without the guard's lag
        deadline = limits.deadline()
        started = time.monotonic()
        first_token: float | None = None
        tokens = 0
        worker_stats: dict[str, Any] = {}
        blocked = False
        stream = run_worker(self.backend, self.sandbox_policy, request)
        try:
            for ev in stream:
                if isinstance(ev, TokenEvent):
                    tokens += 1
                    if first_token is None:
                        first_token = time.monotonic() - started
                    if tokens > self.max_new_tokens:
                        raise PolicyViolation(f"the worker produced more than {self.max_new_tokens} tokens (G4)",
                                              rule="G4", hint="the sandboxed worker broke its limit; report this")
                elif isinstance(ev, TextEvent):
                    released = stopper.feed(guard_out.feed(ev.text))
                    early.feed(ev.text)
                    if released:
                        yield Text(released)
                    if guard_out.blocked:
                        blocked = True
                        break
                    if early.stopped or stopper.stopped:
                        break  # closing the stream below ends the worker
                elif isinstance(ev, StatsEvent):
                    worker_stats = ev.model_dump(exclude={"type"})
                deadline.check()
        except SecureRunError as err:
            events.extend(guard_out.events)
            self._audit_refusal(err, events)
            raise
        finally:
            stream.close()  # kills and removes the sandbox if it is still running
        if not blocked and not stopper.stopped:
            tail = stopper.feed(guard_out.finish())
            blocked = guard_out.blocked
            tail += stopper.finish()  # text held back as a possible stop-string start
            if tail:
                yield Text(tail)
        events.extend(guard_out.events)

        # 9. audit record.
        seconds = time.monotonic() - started
        stats = {
            "backend": self.backend.name,
            "prompt_tokens": worker_stats.get("prompt_tokens", prompt_tokens),
            "generated_tokens": tokens,
            "seconds": round(seconds, 4),
            "first_token_seconds": None if first_token is None else round(first_token, 4),
            "tokens_per_second": worker_stats.get("tokens_per_second"),
            "worker": worker_stats,
            "output_blocked": blocked,
            "stop": stopper.matched,
        }
        record = audit_record(self.decision, event="run", run_stats=stats, guardrail_events=events)
        self.audit.append(record)
        yield Final(stats=stats, blocked=blocked, audit_path=str(self.audit.path))

    def _audit_refusal(self, err: SecureRunError, events: Sequence[Any]) -> None:
        from secure_run.policies import audit_record

        stats = {"refused": err.to_json()}
        self.audit.append(audit_record(self.decision, event="refused", run_stats=stats, guardrail_events=events))


# --- shared by generate, verify --policy and ci-check ----------------------------------------------


def verified_facts(verification: Any, *, sandbox: Any = None, declared_use: str | None = None,
                   operator: str | None = None, max_new_tokens: int | None = None) -> Any:
    """The policy facts a successful verification establishes (``secure_run.policies.RunFacts``)."""
    from secure_run import policies

    signer = verification.signer
    return policies.RunFacts(
        model_dir=Path(verification.root),
        signature=policies.SignatureFacts(
            verified=True, digests_matched=True, root_digest=f"sha256:{verification.root_digest}",
            signer=signer.key_sha256 if signer.method == "key" else signer.identity,
            lock_matched=True if verification.lock_name is not None else None,  # None: no lock compared
        ),
        code_files=(),  # verification's inventory refuses every code or pickle-capable file
        sandbox=sandbox,
        declared_use=declared_use,
        operator=operator,
        max_new_tokens=max_new_tokens,
    )


def check_architecture(verification: Any) -> None:
    """Refuse unless the verified tensor tables equal the vendored architecture's (no torch)."""
    from secure_run.model import checkpoint
    from secure_run.model.config import load_config

    config = load_config(verification.root)
    found = {
        name: checkpoint.HeaderEntry(shard, info.dtype, tuple(info.shape), info)
        for shard, header in verification.headers.items()
        for name, info in header.tensors.items()
    }
    checkpoint.check_table(config, checkpoint.name_map_for(config), found)


def policy_check(policy_ref: str, verification: Any) -> Any:
    """Evaluate a policy at stage ``check`` for a verified folder; returns the Decision."""
    from secure_run import policies

    return policies.evaluate(policies.load_policy(policy_ref), verified_facts(verification), stage="check")


# --- the gate ------------------------------------------------------------------------------------


def prepare(options: GenerateOptions, *, progress: Any = None,
            confirm_license: Callable[[str], bool] | None = None) -> Session:
    """Run the pre-run gate (steps 1-5 of the module docstring) and return a ready session.

    Args:
        options: what the operator asked for.
        progress: optional hashing progress sink (``secure_run.manifests.ProgressSink``).
        confirm_license: interactive licence prompt; called with the text to show, returns True when
            the operator accepts (only asked when the policy requires acceptance and none is recorded).

    Raises:
        SecureRunError: any refusal (exit 1) or usage/environment problem (exit 2).
    """
    from secure_run import manifests, policies
    from secure_run.model.tokenizer import ModelTokenizer

    # 1. the model, its policy, the lock.
    is_demo = options.model_dir is None
    if is_demo:
        from secure_run.model.demo import demo_model_dir

        model_dir = demo_model_dir()
    else:
        assert options.model_dir is not None
        model_dir = options.model_dir
    policy_ref = options.policy or ("builtin:demo" if is_demo else None)
    if policy_ref is None:
        raise UsageError("--policy is required for models other than the embedded demo",
                         hint="pass --policy FILE (or builtin:superlinear-exp-v0.1) reviewed for this model")
    policy = policies.load_policy(policy_ref)
    lock = manifests.Lock.load(options.lock or manifests.default_lock_path())
    audit = policies.AuditLog(options.audit_log or policy.audit_log_path())
    operator = options.operator or _default_operator()

    # 2. verify the folder against the pinned trust and the lock (raises on any refusal).
    verification = manifests.verify_model(model_dir, options.trust, signature=options.signature, lock=lock,
                                          progress=progress)

    # 3. the tensor table must be exactly the vendored architecture's.
    check_architecture(verification)

    # 4. licence and guardrail policy.
    backend_name: Backend = options.sandbox
    facts = verified_facts(
        verification,
        sandbox=policies.SandboxFacts(enabled=True, backend=backend_name, network_enabled=False,
                                      read_only_model=True),
        declared_use=options.declared_use, operator=operator, max_new_tokens=options.max_new_tokens,
    )
    store = policies.AcceptanceStore(policy.acceptance_store_path())
    if options.accept_license:
        policies.accept_license(policy, Path(verification.root), license_id=options.accept_license,
                                operator=operator, acknowledgements=options.acknowledgements, store=store)
    decision = policies.evaluate(policy, facts, stage="run", acceptances=store)
    if not decision.allowed and confirm_license is not None and _only_acceptance_missing(decision):
        license_id = (decision.license or {}).get("license_id")
        required = tuple(policy.spec.acceptance.acknowledgements)
        text = (f"The model's licence is {license_id} (fingerprint {(decision.license or {}).get('fingerprint')}).\n"
                f"Policy {policy.name} requires you to accept it" +
                (f" and acknowledge: {', '.join(required)}" if required else "") + ".")
        if license_id and confirm_license(text):
            policies.accept_license(policy, Path(verification.root), license_id=license_id, operator=operator,
                                    acknowledgements=required, store=store)
            decision = policies.evaluate(policy, facts, stage="run", acceptances=store)
    if not decision.allowed:
        audit.append(policies.audit_record(decision, event="refused"))
    decision.raise_if_denied()

    # 5. the sandbox.
    from secure_run.sandbox import SandboxPolicy, get_backend

    limits = policy.limits()
    max_new = options.max_new_tokens if options.max_new_tokens is not None else limits.max_new_tokens
    sb_kwargs: dict[str, Any] = {"model_dir": Path(verification.root).resolve(), "gpu": options.gpu,
                                 "wall_clock_s": float(limits.timeout_s) + LOAD_ALLOWANCE_S}
    if options.memory_mib is not None:
        sb_kwargs["memory_mib"] = options.memory_mib
    if options.gpu:
        sb_kwargs["jit_cache_mib"] = 512  # Triton's compiled launchers need an exec-capable cache
    sandbox_policy = SandboxPolicy(**sb_kwargs)
    backend = get_backend(backend_name, build=options.build_image) if backend_name == "docker" else get_backend(
        "namespace")

    session = Session(
        options=options, model_dir=Path(verification.root), is_demo=is_demo, policy=policy,
        verification=verification, decision=decision, facts=facts, backend=backend,
        sandbox_policy=sandbox_policy, tokenizer=ModelTokenizer.from_dir(verification.root),
        max_new_tokens=max_new, audit=audit,
    )
    warnings = [f for f in decision.findings if f.result == "warn"]
    session.notices.extend(f"warning {f.check}: {f.message}" for f in warnings)
    return session


def _only_acceptance_missing(decision: Any) -> bool:
    denied = {f.check for f in decision.findings if f.result == "deny"}
    return bool(denied) and denied <= {"L1", "L2"}
