"""Errors of the sandbox package, each with its own rule id (all are SandboxError, exit code 2).

    >>> err = SandboxTimeout(12.0)
    >>> err.rule, err.exit_code
    ('sandbox.timeout', 2)
"""

from __future__ import annotations

from secure_run.errors import SandboxError

__all__ = ["EngineUnavailable", "GpuUnavailable", "ImageMissing", "SandboxOOM", "SandboxTimeout"]


class EngineUnavailable(SandboxError):
    """No Docker engine answered."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            "no Docker engine is reachable",
            details=(reason,),
            rule="sandbox.docker.engine_unavailable",
            hint="start one (as root: scripts/start-dockerd), check DOCKER_HOST, or use --sandbox namespace",
        )


class ImageMissing(SandboxError):
    """The runtime image is not in the engine, and building was not allowed."""

    def __init__(self, tag: str) -> None:
        super().__init__(
            f"the sandbox image {tag} is not present in the Docker engine",
            rule="sandbox.docker.image_missing",
            hint="build it locally (no registry is used): run `secure-run sandbox build-image`, or leave out --no-build",
        )


class GpuUnavailable(SandboxError):
    """A GPU was requested but cannot be passed into the sandbox."""

    def __init__(self, reason: str, *, backend: str) -> None:
        super().__init__(
            "a GPU was requested but the sandbox cannot use one",
            details=(reason,),
            rule=f"sandbox.{backend}.gpu_unavailable",
            hint="on Docker, install and register a patched NVIDIA Container Toolkit (runtime 'nvidia'); "
            "otherwise run without --gpu or use --sandbox namespace on a host with /dev/nvidia* devices",
        )


class SandboxTimeout(SandboxError):
    """The wall-clock limit was reached; the sandbox was killed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the sandbox ran past its wall-clock limit of {seconds:g} s and was killed",
            rule="sandbox.timeout",
            hint="raise wall_clock_s in the sandbox policy, or ask for fewer tokens",
        )


class SandboxOOM(SandboxError):
    """The memory limit was reached; the kernel killed the process."""

    def __init__(self, memory_mib: int) -> None:
        super().__init__(
            f"the sandbox exceeded its memory limit of {memory_mib} MiB and was killed (OOM)",
            rule="sandbox.oom",
            hint="raise memory_mib in the sandbox policy, or use a smaller model / dtype / context",
        )
