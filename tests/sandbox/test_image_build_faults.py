"""Faults while building the sandbox image end in an exit-2 error that says what to do, never a
traceback (issue 10 item 18): the engine refusing the build (its disk full), and the build context
that cannot be written to the local temporary folder. No Docker engine needed (a fake client)."""

from __future__ import annotations

import errno
from typing import Any

import docker
import pytest

from secure_run.errors import EnvironmentProblem, SandboxError
from secure_run.sandbox._internal import image


class _Images:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    def get(self, tag: str) -> Any:
        raise docker.errors.ImageNotFound(f"no such image: {tag}")

    def build(self, **kw: Any) -> Any:
        assert self.exc is not None
        raise self.exc


class _Client:
    def __init__(self, exc: BaseException | None) -> None:
        self.images = _Images(exc)


def test_engine_refusing_the_build_is_a_sandbox_error() -> None:
    client = _Client(docker.errors.APIError("500 Server Error", explanation="no space left on device"))
    with pytest.raises(SandboxError) as info:
        image.ensure_image_id(client, build=True)
    assert info.value.exit_code == 2 and info.value.rule == "sandbox.image.build"
    assert "no space left on device" in info.value.message and "docker system df" in (info.value.hint or "")


def test_build_context_on_a_full_disk_is_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(plan: Any, out: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image, "_write_context", full)
    with pytest.raises(EnvironmentProblem) as info:
        image.ensure_image_id(_Client(None), build=True)
    assert info.value.exit_code == 2 and info.value.rule == "io.write"
    assert "build context" in info.value.message and "free disk space" in (info.value.hint or "")
