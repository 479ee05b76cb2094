"""Fixtures for the sandbox tests: the two real backends, a host listener, a small model folder.

The docker image is built once per test session (its content-hash tag makes later sessions
instant). Backends are parametrized with the ``docker`` / ``namespace`` markers, so the shared
conftest skips them where the capability is missing, or fails them in CI (SECURE_RUN_REQUIRE).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sb_helpers import Listener, required

from secure_run.sandbox import SandboxPolicy
from secure_run.sandbox.backends import Backend


@pytest.fixture(scope="session")
def docker_backend() -> Backend:
    """The docker backend with the runtime image built (once) for this session."""
    from secure_run.sandbox._internal.docker_backend import DockerBackend, connect
    from secure_run.sandbox._internal.image import ensure_image

    client = connect()
    ensure_image(client, build=True)
    return DockerBackend(client=client, build=False)


@pytest.fixture(scope="session")
def namespace_backend() -> Backend:
    """The namespace backend (needs root: it maps ids and creates cgroups)."""
    from secure_run.sandbox._internal.namespace_backend import NamespaceBackend

    if os.geteuid() != 0:
        if required("namespace"):
            pytest.fail("the namespace backend needs root, and SECURE_RUN_REQUIRE lists namespace")
        pytest.skip("the namespace backend needs root")
    return NamespaceBackend()


@pytest.fixture(params=[pytest.param("namespace", marks=pytest.mark.namespace),
                        pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each real backend in turn."""
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


@pytest.fixture
def policy() -> SandboxPolicy:
    """A small policy for probes (limits low enough to hit quickly)."""
    return SandboxPolicy(memory_mib=512, pids_limit=64, wall_clock_s=60, scratch_mib=16, shm_mib=16)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model folder with one file, readable by the sandbox user (like a real deployed model)."""
    d = tmp_path / "model"
    d.mkdir(mode=0o755)
    (d / "weights.bin").write_text("weights-v1")
    (d / "weights.bin").chmod(0o644)
    return d


@pytest.fixture
def listener() -> Iterator[Listener]:
    """A listener on the host loopback (a control connection from the host must succeed)."""
    lst = Listener()
    try:
        yield lst
    finally:
        lst.close()
