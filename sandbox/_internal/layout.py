"""What the sandbox contains, shared by both backends: our code, the environment, fixed paths.

Inside every sandbox our code lives under :data:`CODE_DIR` (a copy: only ``.py`` files of the
packages the worker may import; never the CLI), third-party packages under ``/opt/secure-run/site*``,
and Python runs with ``-S`` (no ``site``: only ``PYTHONPATH`` and the standard library are on
``sys.path``, no ``.pth`` files are executed).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..policy import JIT_CACHE_MOUNT, SCRATCH_MOUNT, SandboxPolicy

__all__ = ["CODE_DIR", "CodePackage", "code_packages", "sandbox_env"]

OPT = "/opt/secure-run"
CODE_DIR = f"{OPT}/code"
#: secure_run packages copied into the sandbox (the worker's import closure; never ``runner``).
WORKER_PACKAGES = ("secure_run", "secure_run.sandbox", "secure_run.model", "secure_run.kernels",
                   "secure_run.manifests", "secure_run.policies")
#: Only these files are copied.
CODE_SUFFIXES = (".py",)


@dataclass(frozen=True)
class CodePackage:
    """One package directory on the host and where it goes inside the sandbox."""

    name: str
    src: Path
    dst: str
    recursive: bool


def code_packages() -> list[CodePackage]:
    """Host directories of :data:`WORKER_PACKAGES` (editable or installed) and their sandbox paths."""
    out = []
    for name in WORKER_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue  # a package not installed here (e.g. another part of the project) is not copied
        src = Path(next(iter(spec.submodule_search_locations))).resolve()
        dst = CODE_DIR + "/" + name.replace(".", "/")
        out.append(CodePackage(name=name, src=src, dst=dst, recursive=name != "secure_run"))
    return out


def code_files() -> list[tuple[Path, str]]:
    """Every (host file, sandbox path) of our code, sorted."""
    files: list[tuple[Path, str]] = []
    for pkg in code_packages():
        pattern = "**/*" if pkg.recursive else "*"
        for path in sorted(pkg.src.glob(pattern)):
            if not path.is_file() or path.suffix not in CODE_SUFFIXES or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(pkg.src).as_posix()
            files.append((path, f"{pkg.dst}/{rel}"))
    return files


def sandbox_env(policy: SandboxPolicy, pythonpath: list[str], *, docker_gpu: bool = False,
                host_env: dict[str, str] | None = None, backend_env: dict[str, str] | None = None) -> dict[str, str]:
    """The complete environment of the sandboxed program (nothing else leaks in from the host).

    ``backend_env`` carries values the backend itself determined (e.g. where the GPU driver's
    libraries are); the policy cannot set those names.
    """
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": SCRATCH_MOUNT,
        "TMPDIR": SCRATCH_MOUNT,
        "LANG": "C.UTF-8",
        "PYTHONPATH": ":".join([CODE_DIR, *pythonpath]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONNOUSERSITE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if policy.jit_cache_mib:
        env["TRITON_CACHE_DIR"] = f"{JIT_CACHE_MOUNT}/triton"
    if policy.gpu and docker_gpu:
        env["NVIDIA_DRIVER_CAPABILITIES"] = "compute,utility"
    env.update(backend_env or {})
    env.update(policy.env)
    env.update(policy.passthrough_env(host_env))
    return env
