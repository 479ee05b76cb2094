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

Steps 2-4 are the one typed gate of :mod:`secure_run.runner.gate` (shared with ``verify --policy``
and ``ci-check``). The audit log is checked writable before anything else (exit 2 if not), and a
refusal by verification or the architecture check is audited too.

Each turn (:meth:`Session.run_turn`) then: checks the prompt against the input guardrail and the
limits, writes a ``started`` audit record, starts the worker in a fresh sandbox with the pins of
every verified file (sha256 + identity; the worker refuses a file without a pin, re-checks each
identity before and after reading and re-hashes small files), streams tokens through the output
guardrail, enforces the time limit, and appends a ``finished`` record with the run statistics and
guardrail events (``refused`` or ``interrupted`` when the turn does not finish).

Every run record (``started``, ``finished``, ``refused``, ``interrupted``; the warm session's per
request records too) states what ran (:meth:`Session.record`): the signer that verified, the code
identity, the sandbox backend and Docker image content id, the GPU (host ``nvidia-smi``) with
``--gpu``, the sha256 of the rendered prompt and of the released output (the texts only with the
policy's ``audit.store_text``), and host-measured figures apart from worker-reported ones. The log
is opened with :meth:`~secure_run.policies.AuditLog.for_host`, so a host audit key signs its heads.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from secure_run.errors import PolicyViolation, SecureRunError, UsageError
from secure_run.runner.gate import GateResult, RunContext, check_architecture, run_gate, verified_facts

if TYPE_CHECKING:
    from secure_run.manifests import ProgressSink, Trust, VerificationResult
    from secure_run.manifests.sealed import SealedFolder
    from secure_run.model.tokenizer import ModelTokenizer
    from secure_run.policies import AuditLog, Decision, GuardrailEvent, Policy, RunFacts
    from secure_run.sandbox import Backend as SandboxBackend
    from secure_run.sandbox import SandboxPolicy
    from secure_run.sandbox.handoff import HandoffServer
    from secure_run.sandbox.protocol import PinnedFileModel

__all__ = [
    "Event", "Final", "GenerateOptions", "Interrupted", "Sampling", "Session", "Status", "Text", "check_architecture",
    "model_sampling", "policy_check", "prepare", "resolve_sampling", "verified_facts",
]

Backend = Literal["docker", "namespace"]
_T = TypeVar("_T")

#: load time granted on top of the policy's generation timeout before the sandbox is killed
LOAD_ALLOWANCE_S = 120.0


@dataclass(frozen=True)
class GenerateOptions:
    """What the operator asked for (the CLI's options, validated by click)."""

    model_dir: Path | None = None
    policy: str | None = None
    lock: Path | None = None
    trust: Trust | None = None
    signature: Path | None = None
    max_new_tokens: int | None = None
    #: None: the verified generation_config.json's value (greedy / 1.0 / 0 when it has none)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    #: the chat template's ``enable_thinking`` switch; None: the template's default (only with a switch)
    thinking: bool | None = None
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
    #: wall clock of a warm session's sandbox (``generate --chat``, ``serve``); None: 24 h
    session_wall_clock_s: float | None = None


@dataclass(frozen=True)
class Sampling:
    """The sampling a run uses, and where each value came from (``flag``, ``generation_config.json``, ``default``)."""

    temperature: float
    top_p: float
    top_k: int
    sources: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the operator, e.g. ``temperature 0.7 (generation_config.json), top_p 1 (default)``."""
        return ", ".join(f"{k} {getattr(self, k):g} ({self.sources.get(k, 'default')})"
                         for k in ("temperature", "top_p", "top_k"))


def model_sampling(config: Mapping[str, object]) -> dict[str, float | int]:
    """The valid sampling values of a verified ``generation_config.json`` (as read by
    :attr:`ModelTokenizer.generation_defaults <secure_run.model.tokenizer.ModelTokenizer.generation_defaults>`).

    ``do_sample: false`` means greedy (temperature 0). Values of the wrong type or outside the
    worker's ranges (temperature 0..100, top_p in (0, 1], top_k 0..2**20) are left out, so the
    caller's fallback applies.
    """
    out: dict[str, float | int] = {}
    t, p, k = config.get("temperature"), config.get("top_p"), config.get("top_k")
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    elif isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 100.0:
        out["temperature"] = float(t)
    if isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 < p <= 1.0:
        out["top_p"] = float(p)
    if isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= 1 << 20:
        out["top_k"] = k
    return out


#: what a run uses when neither a flag nor generation_config.json sets a value (greedy)
SAMPLING_FALLBACK: Mapping[str, float | int] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


def resolve_sampling(options: GenerateOptions, config: Mapping[str, object]) -> Sampling:
    """Explicit flags win, then the verified ``generation_config.json``, then greedy defaults."""
    model = model_sampling(config)
    flags = {"temperature": options.temperature, "top_p": options.top_p, "top_k": options.top_k}
    values: dict[str, float | int] = {}
    sources: dict[str, str] = {}
    for key, fallback in SAMPLING_FALLBACK.items():
        flag = flags[key]
        if flag is not None:
            values[key], sources[key] = flag, "flag"
        elif key in model:
            values[key], sources[key] = model[key], "generation_config.json"
        else:
            values[key], sources[key] = fallback, "default"
    return Sampling(temperature=float(values["temperature"]), top_p=float(values["top_p"]),
                    top_k=int(values["top_k"]), sources=sources)


def check_thinking(tokenizer: ModelTokenizer, thinking: bool | None) -> None:
    """Refuse ``--thinking/--no-thinking`` for a chat template without an ``enable_thinking`` switch.

    Raises:
        UsageError: rule ``generate.thinking-unsupported``.
    """
    if thinking is None or tokenizer.thinking_switch:
        return
    flag = "--thinking" if thinking else "--no-thinking"
    where = tokenizer.chat_template.path if tokenizer.chat_template is not None else "chat_template.jinja"
    raise UsageError(f"{flag}: the model's chat template ({where}) has no thinking switch (it never reads "
                     "enable_thinking)", rule="generate.thinking-unsupported", path=where,
                     hint=f"leave out {flag}; this model's template decides on its own whether it thinks")


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

    stats: dict[str, object]
    blocked: bool
    audit_path: str


Event = Status | Text | Final


class Interrupted(SecureRunError):
    """The run was stopped by SIGINT (exit 130) or SIGTERM (exit 143); the sandbox was stopped."""

    kind = "interrupted"

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; the sandbox was stopped and the run audited",
                         rule=f"run.interrupted.{name.lower()}", hint="run the command again to generate")
        self.signum = signum
        self.exit_code = 128 + signum


#: the signals a run handles (exit 128 + signal number: 130 for SIGINT, 143 for SIGTERM)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_stop_sandboxes() -> Iterator[None]:
    """While active, SIGINT/SIGTERM stop every sandbox of this process, then raise :class:`Interrupted`.

    The handler first ignores both signals (so that the cleanup is not itself interrupted), then
    kills and removes every running sandbox through the sandbox's stop API
    (:func:`secure_run.sandbox.stop_all`: one-shot workers and a :class:`~secure_run.runner.warm.WarmSession`'s
    persistent worker alike), then raises :class:`Interrupted` so that the turn in progress is
    audited ``interrupted``. The previous handlers are restored when the block is left.
    """

    def handler(signum: int, _frame: object) -> None:
        for s in HANDLED_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        from secure_run.sandbox import stop_all

        stop_all()
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    for s in HANDLED_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


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
    policy: Policy
    verification: VerificationResult
    decision: Decision
    facts: RunFacts
    backend: SandboxBackend
    sandbox_policy: SandboxPolicy
    tokenizer: ModelTokenizer
    max_new_tokens: int
    audit: AuditLog
    sampling: Sampling = field(default_factory=lambda: Sampling(0.0, 1.0, 0))
    notices: list[str] = field(default_factory=list)
    #: called between the ``started`` record and the sandbox launch (tests use it to race the folder)
    before_launch: Callable[[], None] | None = None
    #: what every run record states about the run's identity (:meth:`record_identity`), built once
    _identity: dict[str, object] | None = field(default=None, repr=False)
    #: the turn in progress: run id, rendered prompt, released text (for an ``interrupted`` record)
    _turn: dict[str, object] = field(default_factory=dict, repr=False)

    def close(self) -> None:
        """Close the verified folder and release the sealed copies."""
        self.verification.close()

    # --- the sealed hand-off (sandbox/handoff.py) ------------------------------------------------

    def sealed_pins(self) -> dict[str, PinnedFileModel]:
        """The request's pins: the verified sha256 and the identity of each sealed copy."""
        from secure_run.sandbox.protocol import PinnedFileModel

        return {c.name: PinnedFileModel(sha256=c.sha256, identity=c.identity) for c in self._sealed().copies()}

    def handoff(self) -> HandoffServer:
        """A hand-off of the sealed copies for one sandbox (close it when the sandbox has ended)."""
        from secure_run.sandbox.handoff import HandoffServer

        return HandoffServer([(c.name, c.fd) for c in self._sealed().copies()],
                             accept_timeout_s=self.sandbox_policy.wall_clock_s)

    def handoff_policy(self, handoff: HandoffServer) -> SandboxPolicy:
        """The session's sandbox policy with ``handoff``'s folder mounted (and no model folder)."""
        return self.sandbox_policy.with_overrides(handoff_dir=handoff.mount_dir)

    def release_sealed(self) -> None:
        """Close the host's sealed copies (a persistent worker that has loaded them needs them no more)."""
        self._sealed().close()

    def _sealed(self) -> SealedFolder:
        sealed = self.verification.sealed
        if sealed is None:
            raise UsageError("this session was verified without sealed copies", rule="sandbox.handoff",
                             hint="prepare the session with the runner's gate (it seals what it verifies)")
        return sealed

    @property
    def enable_thinking(self) -> bool:
        """The ``enable_thinking`` value the chat template is rendered with (True unless ``--no-thinking``)."""
        return self.options.thinking is not False

    # --- one turn ---------------------------------------------------------------------------

    def run_turn(self, messages: Sequence[Mapping[str, str]]) -> Generator[Event, None, None]:
        """Run one completion for ``messages`` (chat roles ``system``/``user``/``assistant``)."""
        from secure_run.runner.stops import StopStrings
        from secure_run.sandbox import GenerateRequest, run_worker
        from secure_run.sandbox.protocol import (
            StatsEvent,
            TextEvent,
            TokenEvent,
            WorkerStats,
        )

        run_id = f"run-{uuid.uuid4().hex[:16]}"
        released_text: list[str] = []
        self._turn = {"run_id": run_id, "prompt": None, "output": released_text}

        # 6. input guardrail and limits, on every user message and on the rendered prompt.
        limits = self.policy.limits()
        guard_in = self.policy.input_guard()
        events: list[GuardrailEvent] = []
        checked: list[dict[str, str]] = []
        try:
            for m in messages:
                content = m["content"]
                if m["role"] == "user":
                    verdict = guard_in.enforce(content)
                    events.extend(verdict.events)
                    content = verdict.text
                checked.append({"role": m["role"], "content": content})
            prompt_text = self.tokenizer.render_chat(checked, enable_thinking=self.enable_thinking)
            self._turn["prompt"] = prompt_text
            prompt_tokens = len(self.tokenizer.encode(prompt_text))
            limits.check(prompt_chars=sum(len(m["content"]) for m in checked), prompt_tokens=prompt_tokens,
                         max_new_tokens=self.max_new_tokens)
        except Interrupted:
            raise  # audited once, by whoever stops the turn (Session.audit_interrupt)
        except SecureRunError as err:
            self._audit_refusal(err, events)
            raise

        # 7. the worker, in a fresh sandbox, handed the sealed verified copies (their sha256 + identity pinned).
        pins = self.sealed_pins()
        request = GenerateRequest.model_validate({
            "task": "generate", "device": "cuda" if self.options.gpu else "cpu", "dtype": self.options.dtype,
            "messages": tuple(checked), "max_new_tokens": self.max_new_tokens,
            "temperature": self.sampling.temperature, "top_k": self.sampling.top_k, "top_p": self.sampling.top_p,
            "enable_thinking": self.options.thinking, "seed": self.options.seed, "files": pins,
        }, strict=False)
        params = self.parameters()
        self.audit.append(self.record("started", run_id=run_id, prompt=prompt_text, parameters=params,
                                      run_stats={"backend": self.backend.name}))
        yield Status("sandbox", f"starting the {self.backend.name} sandbox (no network, sealed verified copies "
                                "of the model)")
        try:
            if self.before_launch is not None:
                self.before_launch()
        except Interrupted:
            raise  # audited once, by whoever stops the turn (Session.audit_interrupt)
        except SecureRunError as err:
            self._audit_refusal(err, events)
            raise

        # 8. stream through the output guardrail under the policy's time limit.
        guard_out = self.policy.output_guard()
        stopper = StopStrings(self.options.stop)  # cuts the released text
        early = StopStrings(self.options.stop)  # sees the raw text: ends the worker without the guard's lag
        deadline = limits.deadline()
        started = time.monotonic()
        first_token: float | None = None
        tokens = 0
        worker_stats: dict[str, object] = {}
        reported: WorkerStats | None = None
        blocked = False
        handoff = self.handoff()
        stream = _closing(run_worker(self.backend, self.handoff_policy(handoff), request))
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
                        released_text.append(released)
                        yield Text(released)
                    if guard_out.blocked:
                        blocked = True
                        break
                    if early.stopped or stopper.stopped:
                        break  # closing the stream below ends the worker
                elif isinstance(ev, StatsEvent):
                    worker_stats = ev.model_dump(exclude={"type"})
                    reported = WorkerStats.from_event(ev, host_counted_tokens=tokens)
                deadline.check()
        except Interrupted:
            raise  # the finally below stops the sandbox; Session.audit_interrupt records it
        except SecureRunError as err:
            stream.close()  # kills and removes the sandbox if it is still running
            events.extend(guard_out.events)
            self._audit_refusal(err, events)
            raise
        finally:
            stream.close()  # kills and removes the sandbox if it is still running
            handoff.close()
        if not blocked and not stopper.stopped:
            tail = stopper.feed(guard_out.finish())
            blocked = guard_out.blocked
            tail += stopper.finish()  # text held back as a possible stop-string start
            if tail:
                released_text.append(tail)
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
        host_measured = {"source": "host", "prompt_tokens": prompt_tokens, "generated_tokens": tokens,
                         "seconds": stats["seconds"], "first_token_seconds": stats["first_token_seconds"],
                         "output_blocked": blocked}
        record = self.record("finished", run_id=run_id, prompt=prompt_text, output="".join(released_text),
                             parameters=params, run_stats=stats, guardrail_events=events,
                             host_measured=host_measured,
                             worker_reported=reported.as_record() if reported is not None else None,
                             worker_device=worker_device(worker_stats))
        self.audit.append(record)
        self._turn = {}
        yield Final(stats=stats, blocked=blocked, audit_path=str(self.audit.path))

    def audit_interrupt(self, err: Interrupted) -> None:
        """Record that a turn was interrupted (after its sandbox was stopped)."""
        self._audit_refusal(err, (), event="interrupted")

    def _audit_refusal(self, err: SecureRunError, events: Sequence[GuardrailEvent], *, event: str = "refused") -> None:
        turn, self._turn = self._turn, {}
        output = turn.get("output")
        prompt = turn.get("prompt")
        run_id = turn.get("run_id")
        stats = {"refused": err.to_json()}
        self.audit.append(self.record(
            event, run_id=run_id if isinstance(run_id, str) else None,
            prompt=prompt if isinstance(prompt, str) else None,
            output="".join(output) if isinstance(output, list) and prompt is not None else None,
            parameters=self.parameters(), run_stats=stats, guardrail_events=events))

    # --- what every run record says (issue 14.2) -------------------------------------------------

    def parameters(self) -> dict[str, object]:
        """The generation parameters of this session's turns."""
        o, sp = self.options, self.sampling  # the sampling in effect (flags > generation_config.json > greedy)
        return {"max_new_tokens": self.max_new_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                "top_k": sp.top_k, "sampling_sources": dict(sp.sources), "seed": o.seed, "stop": list(o.stop),
                "enable_thinking": o.thinking, "device": "cuda" if o.gpu else "cpu", "dtype": o.dtype}

    def record_identity(self) -> dict[str, object]:
        """The :func:`~secure_run.policies.audit_record` keywords that identify what ran, built once.

        The signer that verified, :func:`~secure_run.policies.audit.code_identity`, the sandbox
        backend and (Docker) the content id of the image its containers run from, the GPU (host
        ``nvidia-smi``) when ``--gpu``, and whether the policy asks for the texts themselves.
        """
        if self._identity is None:
            from secure_run.policies.audit import code_identity

            self._identity = {
                "signer": self.verification.signer.to_json(),
                "code": code_identity(),
                "sandbox_backend": self.backend.name,
                "image_digest": None,
                "gpu": host_gpu() if self.options.gpu else None,
                "store_text": self.policy.spec.audit.store_text,
            }
        ident = dict(self._identity)
        if ident["image_digest"] is None:
            ident["image_digest"] = self._identity["image_digest"] = self._image_id()
        return ident

    def _image_id(self) -> str | None:
        """The image content id, or None when the engine cannot say now.

        A refusal must still be audited when the engine is down (the launch then fails on its own,
        audited with the engine's error); the id is asked again for the next record.
        """
        try:
            return sandbox_image_id(self.backend, self.sandbox_policy)
        except Exception:  # any engine failure: the record says null, the launch reports it
            return None

    def record(self, event: str, *, worker_device: str | None = None, **fields: object) -> dict[str, object]:
        """An audit record of this session: the decision, :meth:`record_identity`, then ``fields``.

        ``worker_device``: the GPU the worker reported (torch.cuda), added to the record's ``gpu``
        labelled as worker-reported, next to the host's ``nvidia-smi`` answer.
        """
        from secure_run.policies import audit_record

        ident = self.record_identity()
        gpu = ident.get("gpu")
        if isinstance(gpu, dict) and worker_device is not None:
            ident["gpu"] = {**gpu, "worker_reported_device": worker_device,
                            "worker_reported_source": "worker torch.cuda.get_device_name (untrusted)"}
        record: dict[str, object] = audit_record(self.decision, event=event, **ident, **fields)  # type: ignore[arg-type,unused-ignore]
        return record


# --- shared by verify --policy and ci-check --------------------------------------------------------


def policy_check(policy_ref: str, verification: VerificationResult) -> Decision:
    """Evaluate a policy at stage ``check`` for a verified folder (architecture checked first)."""
    from secure_run import policies

    check_architecture(verification)
    return policies.evaluate(policies.load_policy(policy_ref), verified_facts(verification), stage="check")


# --- audit of what happens before a decision exists -------------------------------------------------


def audit_gate_refusal(audit: AuditLog, err: BaseException, *, model_dir: Path, policy: Policy,
                       operator: str, event: str = "refused", sandbox_backend: str | None = None) -> None:
    """Audit a refusal (or interrupt) that came before the policy decided (verification, architecture).

    No signer verified yet (``signer`` is null); the code identity and the chosen backend are stated.
    """
    from secure_run.policies.audit import AUDIT_SCHEMA, code_identity

    error = err.to_json() if isinstance(err, SecureRunError) else {"kind": type(err).__name__, "message": str(err)}
    audit.append({
        "schema": AUDIT_SCHEMA, "ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event,
        "allowed": False, "stage": "verify", "policy_name": policy.name, "policy_sha256": policy.sha256,
        "model_dir": str(model_dir), "operator": operator, "run_stats": {"refused": error},
        "findings": [], "guardrail_events": [], "signer": None, "code": code_identity(),
        "sandbox": {"backend": sandbox_backend, "image_digest": None} if sandbox_backend else None,
    })


# --- the gate ------------------------------------------------------------------------------------


def prepare(options: GenerateOptions, *, progress: ProgressSink | None = None,
            confirm_license: Callable[[str], bool] | None = None) -> Session:
    """Run the pre-run gate (steps 1-5 of the module docstring) and return a ready session.

    Args:
        options: what the operator asked for.
        progress: optional hashing progress sink.
        confirm_license: interactive licence prompt; called with the text to show, returns True when
            the operator accepts (only asked when the policy requires acceptance and none is recorded).

    Raises:
        SecureRunError: any refusal (exit 1) or usage/environment problem (exit 2).
    """
    from secure_run import manifests, policies
    from secure_run.model.tokenizer import ModelTokenizer

    # 1. the model, its policy, the lock; the audit log must be writable before anything runs.
    is_demo = options.model_dir is None
    if options.model_dir is None:
        from secure_run.model.demo import demo_model_dir

        model_dir = Path(demo_model_dir())
    else:
        model_dir = options.model_dir
    policy_ref = options.policy or ("builtin:demo" if is_demo else None)
    if policy_ref is None:
        raise UsageError("--policy is required for models other than the embedded demo",
                         hint="pass --policy FILE (or builtin:superlinear-exp-v0.1) reviewed for this model")
    policy = policies.load_policy(policy_ref)
    lock = manifests.Lock.load(options.lock or manifests.default_lock_path())
    audit = policies.AuditLog.for_host(options.audit_log or policy.audit_log_path())
    check_audit_writable(audit)
    operator = options.operator or _default_operator()

    # 2-4. the one gate: verify, architecture, policy (licence acceptance recorded first when asked).
    backend_name: Backend = options.sandbox
    context = RunContext(
        sandbox=policies.SandboxFacts(enabled=True, backend=backend_name, network_enabled=False, read_only_model=True),
        declared_use=options.declared_use, operator=operator, max_new_tokens=options.max_new_tokens,
    )
    store = policies.AcceptanceStore(policy.acceptance_store_path())

    def decide(pol: Policy, facts: RunFacts) -> Decision:
        if options.accept_license:
            policies.accept_license(pol, facts.model_dir, license_id=options.accept_license,
                                    operator=operator, acknowledgements=options.acknowledgements, store=store)
        decision = policies.evaluate(pol, facts, stage="run", acceptances=store)
        if not decision.allowed and confirm_license is not None and _only_acceptance_missing(decision):
            license_id = (decision.license or {}).get("license_id")
            required = tuple(pol.spec.acceptance.acknowledgements)
            text = (f"The model's licence is {license_id} (fingerprint {(decision.license or {}).get('fingerprint')}).\n"
                    f"Policy {pol.name} requires you to accept it" +
                    (f" and acknowledge: {', '.join(required)}" if required else "") + ".")
            if isinstance(license_id, str) and license_id and confirm_license(text):
                policies.accept_license(pol, facts.model_dir, license_id=license_id, operator=operator,
                                        acknowledgements=required, store=store)
                decision = policies.evaluate(pol, facts, stage="run", acceptances=store)
        return decision

    def refused(err: BaseException, _verification: VerificationResult | None) -> None:
        if isinstance(err, SecureRunError):
            audit_gate_refusal(audit, err, model_dir=model_dir, policy=policy, operator=operator,
                               sandbox_backend=options.sandbox,
                               event="interrupted" if isinstance(err, Interrupted) else "refused")

    gate = run_gate(model_dir, options.trust, lock=lock, signature=options.signature, progress=progress,
                    policy=policy, stage="run", context=context, decide=decide, on_refusal=refused, seal=True)
    try:
        return _session(options, gate, is_demo=is_demo, audit=audit, tokenizer_from=ModelTokenizer.from_folder)
    except BaseException:
        gate.close()
        raise


def _session(options: GenerateOptions, gate: GateResult, *, is_demo: bool, audit: AuditLog,
             tokenizer_from: Callable[..., ModelTokenizer]) -> Session:
    from secure_run import policies
    from secure_run.sandbox import SandboxPolicy, get_backend

    decision, policy = gate.decision, gate.policy
    assert decision is not None and policy is not None  # run_gate was given a policy
    if not decision.allowed:
        from secure_run.policies.audit import code_identity

        audit.append(policies.audit_record(decision, event="refused", signer=gate.verification.signer.to_json(),
                                           code=code_identity(), sandbox_backend=options.sandbox))
    decision.raise_if_denied()

    # 5. the sandbox.
    verification = gate.verification
    limits = policy.limits()
    max_new = options.max_new_tokens if options.max_new_tokens is not None else limits.max_new_tokens
    sandbox_policy = SandboxPolicy(gpu=options.gpu, wall_clock_s=float(limits.timeout_s) + LOAD_ALLOWANCE_S)
    if options.memory_mib is not None:
        sandbox_policy = sandbox_policy.with_overrides(memory_mib=options.memory_mib)
    if options.gpu:  # Triton's compiled launchers need an exec-capable cache
        sandbox_policy = sandbox_policy.with_overrides(jit_cache_mib=512)
    backend = (get_backend("docker", build=options.build_image) if options.sandbox == "docker"
               else get_backend("namespace"))
    # the host reads the tokenizer and template from the same sealed copies the worker gets
    tokenizer = tokenizer_from(verification.sealed if verification.sealed is not None else gate.folder)
    check_thinking(tokenizer, options.thinking)
    session = Session(
        options=options, model_dir=Path(verification.root), is_demo=is_demo, policy=policy,
        verification=verification, decision=decision, facts=gate.facts, backend=backend,
        sandbox_policy=sandbox_policy, tokenizer=tokenizer,
        max_new_tokens=max_new, audit=audit, sampling=resolve_sampling(options, tokenizer.generation_defaults),
    )
    warnings = [f for f in decision.findings if f.result == "warn"]
    session.notices.extend(f"warning {f.check}: {f.message}" for f in warnings)
    return session


def sandbox_image_id(backend: SandboxBackend, policy: SandboxPolicy) -> str | None:
    """The content id (``sha256:...``) of the image the Docker backend's containers run from.

    The Docker backend checks the image by content id and starts containers from that id
    (:func:`~secure_run.sandbox._internal.image.ensure_image_id`); other backends have no image (None).
    """
    image = getattr(backend, "image", None)
    runtime_for = getattr(backend, "runtime_for", None)
    if not callable(image) or not callable(runtime_for):
        return None
    image_id = image(runtime_for(policy))
    return image_id if isinstance(image_id, str) else None


def host_gpu() -> dict[str, object]:
    """The GPU model and driver version as the host's ``nvidia-smi`` reports them (``source`` says so)."""
    import shutil
    import subprocess

    source = "host nvidia-smi"
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"source": source, "name": None, "driver": None, "error": "nvidia-smi not found on the host"}
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return {"source": source, "name": None, "driver": None, "error": str(err)[:200]}
    devices = [{"name": name.strip(), "driver": driver.strip()}
               for name, _, driver in (line.rpartition(",") for line in out.splitlines() if "," in line)]
    if not devices:
        return {"source": source, "name": None, "driver": None, "error": "nvidia-smi listed no GPU"}
    return {"source": source, "name": devices[0]["name"], "driver": devices[0]["driver"], "devices": devices}


def worker_device(worker_stats: Mapping[str, object]) -> str | None:
    """The GPU the worker named in its stats (``detail["cuda.device"]``, torch.cuda; worker-reported)."""
    detail = worker_stats.get("detail")
    device = detail.get("cuda.device") if isinstance(detail, dict) else None
    return device if isinstance(device, str) else None


class _closing(Iterator[_T]):
    """An iterator whose ``close()`` closes the wrapped generator (kills and removes the sandbox)."""

    def __init__(self, inner: Iterator[_T]) -> None:
        self._inner = inner

    def __next__(self) -> _T:
        return next(self._inner)

    def close(self) -> None:
        if isinstance(self._inner, Generator):
            self._inner.close()


def check_audit_writable(audit: AuditLog) -> None:
    """Refuse to start (exit 2) when the audit log cannot be written.

    Raises:
        EnvironmentProblem: rule ``run.audit-unwritable``.
    """
    from secure_run.errors import EnvironmentProblem
    from secure_run.policies import StateFileError

    try:
        audit.check_writable()
    except StateFileError as err:
        raise EnvironmentProblem(f"the audit log {audit.path} cannot be written: {err.message}",
                                 rule="run.audit-unwritable", path=str(audit.path),
                                 hint="fix its folder's permissions or free space, or pass --audit-log FILE; "
                                      "secure-run does not run a model unaudited") from None


def _only_acceptance_missing(decision: Decision) -> bool:
    denied = {f.check for f in decision.findings if f.result == "deny"}
    return bool(denied) and denied <= {"L1", "L2"}
