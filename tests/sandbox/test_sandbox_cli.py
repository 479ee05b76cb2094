"""``secure-run sandbox selftest`` / ``build-image`` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from secure_run.runner.cli import cli


@pytest.mark.namespace
def test_selftest_namespace_text_and_json(namespace_backend: object) -> None:
    res = CliRunner().invoke(cli, ["sandbox", "selftest", "--sandbox", "namespace", "--seed", "4"])
    assert res.exit_code == 0, res.output
    assert "sandbox selftest (namespace, cpu): ok" in res.output and "uid 65534" in res.output
    res = CliRunner().invoke(cli, ["sandbox", "selftest", "--sandbox", "namespace", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ok"] is True and doc["backend"] == "namespace" and len(doc["tokens"]) == 8
    assert doc["stats"]["detail"]["uid"] == 65534


@pytest.mark.docker
def test_selftest_docker_and_build_image(docker_backend: object) -> None:
    from secure_run.sandbox._internal.image import plan_image

    res = CliRunner().invoke(cli, ["sandbox", "build-image", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["image"] == plan_image().tag
    res = CliRunner().invoke(cli, ["sandbox", "selftest", "--no-build"])
    assert res.exit_code == 0, res.output
    assert "sandbox selftest (docker, cpu): ok" in res.output


def test_usage_and_environment_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    res = CliRunner().invoke(cli, ["sandbox", "selftest", "--triton"])
    assert res.exit_code == 2 and "--triton needs --gpu" in res.output
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/secure-run.sock")
    res = CliRunner().invoke(cli, ["sandbox", "selftest", "--json"])
    assert res.exit_code == 2
    err = json.loads(res.output)["error"]
    assert err["rule"] == "sandbox.docker.engine_unavailable" and err["kind"] == "sandbox"
