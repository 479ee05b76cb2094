"""``secure-run sandbox ...``: check that this host's sandbox works, and build its image.

    $ secure-run sandbox selftest [--sandbox docker|namespace] [--gpu] [--triton] [--no-build] [--json]
    $ secure-run sandbox build-image [--json]

``selftest`` runs the worker's tiny deterministic model inside a fresh sandbox (with the full
hardening of the default policy) and compares its tokens with the same model run here, outside
the sandbox; then it probes every control from inside fresh sandboxes (:mod:`secure_run.sandbox.probes`:
network, read-only root and model, noexec scratch, seccomp, capabilities, uid, pids, memfd/W+X,
CPU quota, wall clock) and prints them as a table. It exits 1 (rule ``sandbox.selftest.control``)
when any control does not hold. ``build-image`` builds the docker backend's runtime image locally (never pulls).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import click

from secure_run.runner.options import json_option
from secure_run.runner.output import emit_json

if TYPE_CHECKING:
    from secure_run.sandbox.probes import Control


def _json_errors(as_json: bool) -> None:
    if as_json:
        click.get_current_context().find_root().meta["secure_run.json"] = True


@click.group("sandbox")
def sandbox_group() -> None:
    """The hardened sandbox: self-test it on this host, build its image."""


@sandbox_group.command("selftest")
@click.option("--sandbox", "backend_name", type=click.Choice(["docker", "namespace"]), default="docker",
              show_default=True)
@click.option("--gpu", is_flag=True, help="Run on the GPU (CUDA matmul check) inside the sandbox.")
@click.option("--triton", is_flag=True, help="Also compile and run a tiny Triton kernel (with --gpu).")
@click.option("--no-build", "no_build", is_flag=True, help="Refuse instead of building a missing image.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True)
@json_option
def selftest_cmd(backend_name: str, gpu: bool, triton: bool, no_build: bool, seed: int, as_json: bool) -> None:
    """Run the tiny selftest model in a sandbox, check its tokens, then probe and print every control."""
    from secure_run.errors import Refusal, SandboxError, UsageError
    from secure_run.sandbox import (
        SandboxPolicy,
        SelftestRequest,
        StatsEvent,
        TokenEvent,
        get_backend,
        run_worker,
    )
    from secure_run.sandbox._internal import selftest
    from secure_run.sandbox.probes import run_probes

    _json_errors(as_json)
    if triton and not gpu:
        raise UsageError("--triton needs --gpu", rule="sandbox.cli", hint="add --gpu (Triton runs on CUDA)")
    device: Literal["cpu", "cuda"] = "cuda" if gpu else "cpu"
    policy = SandboxPolicy(gpu=gpu, jit_cache_mib=512 if gpu else 0, memory_mib=16384 if gpu else 2048,
                           pids_limit=1024 if gpu else 256, wall_clock_s=300.0)
    backend = (get_backend("docker", build=not no_build) if backend_name == "docker"
               else get_backend("namespace"))
    req = SelftestRequest(task="selftest", device=device, seed=seed, steps=8, triton=triton,
                          matmul_size=1024 if gpu else 64)
    events = list(run_worker(backend, policy, req))
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    stats = events[-1]
    if not isinstance(stats, StatsEvent):  # run_worker raises before this; kept for the type checker
        raise SandboxError("the selftest ended without statistics", rule="sandbox.worker.failed")
    expected = selftest.greedy_tokens(selftest.build_weights(seed), steps=8, seed=seed, device=device)
    if tokens != expected:
        raise SandboxError("the sandboxed selftest produced different tokens than the same model outside it",
                           details=(f"inside: {tokens}", f"outside: {expected}"), rule="sandbox.selftest.mismatch",
                           hint="the sandbox's runtime differs from this host's; rebuild the image")
    report = run_probes(backend, gpu=gpu)
    failed = [c for c in report.controls if not c.holds]
    doc: dict[str, Any] = {"ok": not failed, "backend": backend.name, "device": device, "tokens": tokens,
                           "stats": stats.model_dump(mode="json", exclude={"type"}),
                           "controls": [c.to_json() for c in report.controls]}
    if not as_json:
        text = "".join(selftest.token_text(t) for t in tokens)
        click.echo(f"sandbox selftest ({backend.name}, {device}): {len(tokens)} tokens {text!r} match the "
                   f"reference; uid {stats.detail.get('uid')}, {stats.seconds:.2f} s")
        for key in ("cuda.device", "matmul.max_rel_err", "triton", "triton.max_abs_err"):
            if key in stats.detail:
                click.echo(f"  {key}: {stats.detail[key]}")
        click.echo(control_table(report.controls))
    if failed:
        raise Refusal(f"{len(failed)} of {len(report.controls)} sandbox controls do not hold on this host "
                      f"({backend.name}): {', '.join(c.name for c in failed)}",
                      details=tuple(f"{c.name}: expected {c.expected}; observed {c.observed}" for c in failed),
                      rule="sandbox.selftest.control",
                      hint="do not run models in this sandbox until every control holds; check the host's "
                           "kernel (seccomp, cgroups v2, user namespaces) or Docker setup")
    if as_json:
        emit_json(doc)
        return
    click.echo(f"sandbox selftest ({backend.name}, {device}): ok — all {len(report.controls)} controls hold")


def control_table(controls: Sequence[Control]) -> str:
    """The controls as a text table: control, ok/FAIL, what was observed inside."""
    width = max(len(c.name) for c in controls)
    lines = [f"  {'control':<{width}}  {'result':<6}  observed inside the sandbox"]
    lines += [f"  {c.name:<{width}}  {'ok' if c.holds else 'FAIL':<6}  {c.observed}" for c in controls]
    return "\n".join(lines)


@sandbox_group.command("build-image")
@json_option
def build_image_cmd(as_json: bool) -> None:
    """Build the docker backend's runtime image (FROM scratch; no registry); reuse it when current."""
    from secure_run.sandbox._internal.docker_backend import connect
    from secure_run.sandbox._internal.image import ensure_image

    _json_errors(as_json)
    tag = ensure_image(connect(), build=True)
    if as_json:
        emit_json({"ok": True, "image": tag})
    else:
        click.echo(f"sandbox image: {tag}")


def register(group: click.Group) -> None:
    """Add the ``sandbox`` command family to the CLI."""
    group.add_command(sandbox_group)
