"""Issue 10 items 12, 16 and 17 (sandbox side): cleanup that does not depend on the engine or the host.

* a worker flooding its output is killed and removed promptly (it used to block ``kill()`` until
  ``requests.ReadTimeout`` escaped, leaving the container behind);
* containers are labelled with their owner and removed on the next start once the owner is gone;
* a container bounds its own wall clock (the host may be dead);
* a different image under the expected tag is refused by content id.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
from sb_helpers import py

from secure_run.errors import SandboxError
from secure_run.sandbox import SandboxPolicy, SelftestRequest
from secure_run.sandbox._internal import image as image_mod
from secure_run.sandbox._internal.docker_backend import (
    DEADLINE_LABEL,
    DEADLINE_WRAPPER,
    LABEL,
    OWNER_LABEL,
    DockerBackend,
    container_kwargs,
    reap_containers,
)
from secure_run.sandbox._internal.image import DIGEST_LABEL, ImagePlan, plan_image
from secure_run.sandbox._internal.owner import owner_alive, owner_token
from secure_run.sandbox.backends import Backend, run_worker
from secure_run.sandbox.protocol import ProtocolError

POLICY = SandboxPolicy(memory_mib=512, pids_limit=64, wall_clock_s=60, scratch_mib=16, shm_mib=16)
FLOOD = "import sys\nwhile True: sys.stdout.write('x' * 65536)\n"


def _ours(client: object) -> set[str]:
    return {c.id for c in client.containers.list(all=True, filters={"label": LABEL})}  # type: ignore[attr-defined]


class _Flooding(Backend):
    def __init__(self, inner: Backend) -> None:
        self.inner, self.name = inner, inner.name

    def python_argv(self) -> list[str]:
        return self.inner.python_argv()

    def worker_argv(self) -> list[str]:
        return [*self.python_argv(), "-c", FLOOD]

    def start(self, argv, policy, *, stdin=b""):  # type: ignore[no-untyped-def]
        run = self.inner.start(argv, policy, stdin=stdin)
        self.run = run
        return run


@pytest.mark.docker
def test_flooding_worker_is_killed_and_removed(docker_backend: DockerBackend) -> None:
    client = docker_backend.client
    backend = _Flooding(docker_backend)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError) as info:
        for _ in run_worker(backend, POLICY, SelftestRequest(task="selftest")):
            pass
    assert info.value.rule == "sandbox.protocol.line_too_long"
    assert time.monotonic() - t0 < 20
    cid = backend.run.container.id  # type: ignore[attr-defined]
    assert cid not in _ours(client)


@pytest.mark.docker
def test_flood_unread_then_kill_is_prompt(docker_backend: DockerBackend) -> None:
    """The exact shape of the report: the host stops reading, then kills (the engine's attach is full)."""
    client = docker_backend.client
    run = docker_backend.start([*docker_backend.python_argv(), "-c", FLOOD], POLICY)
    next(iter(run.chunks()))
    time.sleep(2)  # let every buffer between the worker and us fill up
    t0 = time.monotonic()
    run.kill()
    outcome = run.finish()
    assert time.monotonic() - t0 < 15
    assert outcome.exit_code == 137
    assert run.container.id not in _ours(client)  # type: ignore[attr-defined]


@pytest.mark.docker
def test_containers_are_labelled_with_owner_and_deadline() -> None:
    kw = container_kwargs(POLICY)
    labels = kw["labels"]
    assert labels[LABEL] == "1" and owner_alive(labels[OWNER_LABEL]) and labels[OWNER_LABEL] == owner_token()
    assert time.time() + 55 < float(labels[DEADLINE_LABEL]) < time.time() + 65
    assert kw["nano_cpus"] == int(POLICY.cpus * 1e9) and POLICY.cpus >= 1


def test_owner_tokens() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    tok = owner_token(proc.pid)
    proc.wait()
    assert not owner_alive(tok)  # exited
    assert owner_alive(owner_token())
    assert not owner_alive("garbage") and not owner_alive("x:1:2")


def _orphan(client: object, image: str, *, owner: str, deadline: float) -> str:
    kw = container_kwargs(POLICY)
    kw["labels"] = {LABEL: "1", OWNER_LABEL: owner, DEADLINE_LABEL: str(int(deadline))}
    c = client.containers.create(image, command=["/usr/local/bin/python3", "-S", "-c",  # type: ignore[attr-defined]
                                                 "import time; time.sleep(600)"], **kw)
    c.start()
    return str(c.id)


@pytest.mark.docker
def test_orphans_of_a_dead_owner_are_reaped_on_the_next_start(docker_backend: DockerBackend) -> None:
    client = docker_backend.client
    image = docker_backend.image()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = owner_token(proc.pid)
    proc.wait()
    orphan = _orphan(client, image, owner=dead, deadline=time.time() + 3600)
    mine = _orphan(client, image, owner=owner_token(), deadline=time.time() + 3600)
    expired = _orphan(client, image, owner=owner_token(), deadline=time.time() - 3600)
    try:
        res = py(docker_backend, POLICY, "print('ok')")  # the next start reaps
        assert res.exit_code == 0
        left = _ours(client)
        assert orphan not in left and expired not in left
        assert mine in left  # a live owner's container within its deadline is never touched
        assert mine not in reap_containers(client)
    finally:
        client.api.remove_container(mine, force=True)


@pytest.mark.docker
def test_container_bounds_its_own_wall_clock(docker_backend: DockerBackend) -> None:
    """The host starts a container and never looks at it again: it still ends at its deadline."""
    client = docker_backend.client
    pol = POLICY.with_overrides(wall_clock_s=2.0)
    run = docker_backend.start([*docker_backend.python_argv(), "-c", "import time; time.sleep(600)"], pol)
    cid = run.container.id  # type: ignore[attr-defined]
    try:
        c = client.containers.get(cid)
        assert c.attrs["Config"]["Cmd"][:3] == ["/usr/local/bin/python3", "-S", DEADLINE_WRAPPER]
        status = c.wait(timeout=30)  # no kill from the host
        assert status["StatusCode"] == 124
    finally:
        run.finish()
    assert cid not in _ours(client)


@pytest.mark.docker
def test_a_retagged_image_is_refused(docker_backend: DockerBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 17: another image under the expected tag, even with the right label, is refused."""
    import io
    import tarfile

    client = docker_backend.client
    real = plan_image()
    other = ImagePlan(dockerfile=real.dockerfile + b"# retag test " + uuid.uuid4().hex.encode() + b"\n",
                      entries=real.entries)
    monkeypatch.setattr(image_mod, "plan_image", lambda: other)
    ctx = io.BytesIO()
    with tarfile.open(fileobj=ctx, mode="w") as tar:
        data = b"FROM scratch\nCOPY x /x\n"
        for name, body in (("Dockerfile", data), ("x", b"not the sandbox\n")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    ctx.seek(0)
    client.images.build(fileobj=ctx, custom_context=True, tag=other.tag, labels={DIGEST_LABEL: other.digest},
                        pull=False, network_mode="none", rm=True)
    before = _ours(client)
    try:
        with pytest.raises(SandboxError) as info:
            DockerBackend(client=client, build=False).run(["/x"], POLICY)
        assert info.value.rule == "sandbox.image.digest"
        assert any("no build of these inputs is recorded" in d for d in info.value.details)
        assert _ours(client) <= before  # nothing was created from it
        # a recorded id for these inputs that is not this image's id: refused too
        monkeypatch.setattr(image_mod, "_recorded", lambda: {other.digest: "sha256:" + "0" * 64})
        with pytest.raises(SandboxError) as info:
            DockerBackend(client=client, build=False).run(["/x"], POLICY)
        assert any("content id" in d for d in info.value.details)
    finally:
        client.images.remove(other.tag, force=True)


@pytest.mark.docker
def test_containers_are_created_from_the_checked_id(docker_backend: DockerBackend) -> None:
    run = docker_backend.start([*docker_backend.python_argv(), "-c", "pass"], POLICY)
    try:
        assert run.container.attrs["Image"] == docker_backend.image()  # type: ignore[attr-defined]
        assert docker_backend.image().startswith("sha256:")
    finally:
        run.kill()
        run.finish()


@pytest.mark.parametrize("backend_name", [pytest.param("docker", marks=pytest.mark.docker),
                                          pytest.param("namespace", marks=pytest.mark.namespace)])
def test_jit_tmpfs_is_world_writable_and_sticky(backend_name: str, request: pytest.FixtureRequest) -> None:
    """Issue 10 item 12: the jit tmpfs lost its mode=1777 in docker (the image's 0755 was copied up)."""
    backend = request.getfixturevalue(f"{backend_name}_backend")
    pol = POLICY.with_overrides(jit_cache_mib=8)
    res = py(backend, pol, "import os, stat; m = os.stat('/var/cache/jit').st_mode; print(oct(stat.S_IMODE(m)));"
             "open('/var/cache/jit/probe', 'w').write('1'); print('written')")
    assert res.exit_code == 0, res.stderr.decode(errors="replace")[-2000:]
    assert res.stdout.decode().split() == ["0o1777", "written"]
