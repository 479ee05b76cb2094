"""Shared pytest setup: markers, --skip-* flags, and "required" capabilities for CI.

Markers: ``gpu``, ``docker``, ``namespace``, ``interop``, ``slow``. A marked test is skipped when
its capability is missing, unless the capability is listed in the environment variable
``SECURE_RUN_REQUIRE`` (comma separated, e.g. ``docker,namespace`` in ``.ci/run``): then the
missing capability is a test *failure*, so CI can never go green by skipping.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

# The Triton interpreter must be switched on before any kernel module is imported (the
# @triton.jit decorator reads it), so CPU runs set it here unless a GPU is present.
if os.environ.get("SECURE_RUN_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")

_CAPS = ("gpu", "docker", "namespace", "interop")


def pytest_addoption(parser: pytest.Parser) -> None:
    for cap in _CAPS:
        parser.addoption(f"--skip-{cap}", action="store_true", default=False, help=f"skip tests marked {cap}")
    parser.addoption("--update-goldens", action="store_true", default=False, help="rewrite golden files")


def _required() -> set[str]:
    return {c.strip() for c in os.environ.get("SECURE_RUN_REQUIRE", "").split(",") if c.strip()}


def gpu_missing_reason() -> str | None:
    """Why the ``gpu`` tests cannot run here (None: they can), stated truthfully.

    On a CUDA host the Triton interpreter (TRITON_INTERPRET=1, set above unless
    SECURE_RUN_TEST_GPU=1) forces every kernel onto the CPU, so the GPU suite is skipped for that
    reason, not for a missing GPU.
    """
    try:
        import torch
    except Exception:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this host"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("TRITON_INTERPRET=1 forces the Triton CPU interpreter although a CUDA GPU is present "
                "(run with SECURE_RUN_TEST_GPU=1 and without TRITON_INTERPRET to use the GPU)")
    return None


@functools.cache
def _have_gpu() -> bool:
    return gpu_missing_reason() is None


@functools.cache
def _have_docker() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
        return True
    except Exception:
        return False


@functools.cache
def _have_namespace() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "true"], capture_output=True, timeout=10)
        return r.returncode == 0
    except Exception:
        return False


@functools.cache
def _have_interop() -> bool:
    try:
        import model_signing  # noqa: F401

        return True
    except Exception:
        return False


_PROBES = {"gpu": _have_gpu, "docker": _have_docker, "namespace": _have_namespace, "interop": _have_interop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    required = _required()
    for item in items:
        for cap in _CAPS:
            if cap not in item.keywords:
                continue
            if config.getoption(f"--skip-{cap}"):
                if cap in required:
                    raise pytest.UsageError(f"--skip-{cap} conflicts with SECURE_RUN_REQUIRE={cap}")
                item.add_marker(pytest.mark.skip(reason=f"--skip-{cap} given"))
            elif not _PROBES[cap]():
                if cap in required:
                    # required but missing: the test fails in setup instead of being skipped
                    item.user_properties.append(("missing_required", cap))
                else:
                    reason = (gpu_missing_reason() if cap == "gpu" else None) or f"{cap} not available on this host"
                    item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for key, cap in item.user_properties:
        if key == "missing_required":
            why = (gpu_missing_reason() if cap == "gpu" else None) or "not available on this host"
            pytest.fail(f"{cap} is required (SECURE_RUN_REQUIRE) but {why}")
