"""Docker backend specifics against the real engine: error mapping, HostConfig, image, cleanup."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sb_helpers import Listener, probe, py

from secure_run.errors import SandboxError
from secure_run.sandbox import EngineUnavailable, GpuUnavailable, ImageMissing, SandboxPolicy
from secure_run.sandbox._internal import image as image_mod
from secure_run.sandbox._internal.docker_backend import LABEL, DockerBackend, connect, container_kwargs
from secure_run.sandbox._internal.image import IMAGE_REPO, ImagePlan, ensure_image, plan_image
from secure_run.sandbox.backends import Backend, get_backend

pytestmark = pytest.mark.docker


class _Recording(DockerBackend):
    """Remembers the id of every container it starts (other processes may run sandboxes concurrently)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.ids: list[str] = []

    def start(self, argv, policy, *, stdin=b""):  # type: ignore[no-untyped-def]
        run = super().start(argv, policy, stdin=stdin)
        self.ids.append(run.container.id)  # type: ignore[attr-defined]
        return run


def _gone(client: object, ids: list[str]) -> bool:
    import docker

    for cid in ids:
        try:
            client.containers.get(cid)  # type: ignore[attr-defined]
            return False
        except docker.errors.NotFound:
            continue
    return True


@pytest.mark.parametrize("docker_host", ["unix:///nonexistent/secure-run-docker.sock", "tcp://127.0.0.1:1"])
def test_no_engine_is_a_clear_environment_error(monkeypatch: pytest.MonkeyPatch, docker_host: str,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_host)
    with pytest.raises(EngineUnavailable) as info:
        connect(timeout=5)
    assert info.value.rule == "sandbox.docker.engine_unavailable" and info.value.exit_code == 2
    assert "scripts/start-dockerd" in (info.value.hint or "")
    with pytest.raises(EngineUnavailable):
        get_backend("docker").run(["/usr/local/bin/python3", "-c", "pass"], SandboxPolicy())


def test_dead_socket_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # a socket file nobody listens on
    s.close()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    with pytest.raises(EngineUnavailable) as info:
        connect(timeout=5)
    assert "refused" in " ".join(info.value.details).lower()


def test_missing_image_is_refused_without_any_pull(docker_backend: DockerBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    client = docker_backend.client
    real = plan_image()
    other = ImagePlan(dockerfile=real.dockerfile + b"# another input\n", entries=real.entries)
    assert other.tag != real.tag
    monkeypatch.setattr(image_mod, "plan_image", lambda: other)
    backend = _Recording(client=client, build=False)
    with pytest.raises(ImageMissing) as info:
        backend.run(["true"], SandboxPolicy())
    assert info.value.rule == "sandbox.docker.image_missing"
    assert other.tag in info.value.message and "--build" in (info.value.hint or "")
    assert not client.images.list(name=other.tag)  # nothing was pulled or built
    assert backend.ids == []  # no container was created


def test_gpu_requested_without_nvidia_runtime(docker_backend: DockerBackend) -> None:
    client = docker_backend.client
    if "nvidia" in (client.info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime")
    gpu = SandboxPolicy(gpu=True)
    backend = _Recording(client=client)
    with pytest.raises(GpuUnavailable) as info:  # refused before anything is created
        backend.run(["true"], gpu)
    assert info.value.rule == "sandbox.docker.gpu_unavailable" and "nvidia" in " ".join(info.value.details)
    assert backend.ids == []
    # without the pre-check the engine's own refusal at start is mapped the same way, and the
    # container it had created is removed
    before = {c.id for c in client.containers.list(all=True, filters={"label": LABEL})}
    with pytest.raises(GpuUnavailable) as info:
        DockerBackend(client=client, check_gpu_runtime=False).run(["true"], gpu)
    assert "could not select device driver" in " ".join(info.value.details)
    assert {c.id for c in client.containers.list(all=True, filters={"label": LABEL,
                                                                     "status": "created"})} <= before


def test_host_config_carries_every_control(docker_backend: DockerBackend, tmp_path: Path) -> None:
    client = docker_backend.client
    policy = SandboxPolicy(model_dir=tmp_path, pids_limit=77, memory_mib=333, shm_mib=12, scratch_mib=21,
                           jit_cache_mib=5, nofile=99)
    c = client.containers.create(docker_backend.image(), command=["true"], **container_kwargs(policy))
    try:
        hc = c.attrs["HostConfig"]
        assert hc["NetworkMode"] == "none"
        assert hc["ReadonlyRootfs"] is True
        assert hc["CapDrop"] == ["ALL"] and not hc.get("CapAdd")
        assert hc["Privileged"] is False
        assert "no-new-privileges:true" in hc["SecurityOpt"]
        seccomp_opt = next(o for o in hc["SecurityOpt"] if o.startswith("seccomp="))
        assert json.loads(seccomp_opt[len("seccomp="):])["defaultAction"] == "SCMP_ACT_ERRNO"
        assert hc["PidsLimit"] == 77
        assert hc["Memory"] == hc["MemorySwap"] == 333 * 1024 * 1024
        assert hc["IpcMode"] == "private" and hc["ShmSize"] == 12 * 1024 * 1024
        assert hc["Init"] is True
        assert hc["Tmpfs"]["/tmp"].startswith("rw,noexec,nosuid,nodev,size=21m")
        assert hc["Tmpfs"]["/var/cache/jit"].startswith("rw,exec,nosuid,nodev,size=5m")
        assert hc["Mounts"] == [{"Type": "bind", "Source": str(tmp_path), "Target": "/model", "ReadOnly": True}]
        assert not hc.get("Binds") and hc.get("PortBindings") in (None, {})
        assert hc["LogConfig"]["Type"] == "none"
        assert {u["Name"]: (u["Soft"], u["Hard"]) for u in hc["Ulimits"]} == {"nofile": (99, 99), "core": (0, 0)}
        assert not hc.get("DeviceRequests")
        assert c.attrs["Config"]["User"] == "65534:65534"
        env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
        assert env["HOME"] == "/tmp" and env["TRITON_CACHE_DIR"] == "/var/cache/jit/triton"
        assert "NVIDIA_DRIVER_CAPABILITIES" not in env
    finally:
        c.remove(force=True)


def test_gpu_host_config_is_limited_to_compute() -> None:
    kw = container_kwargs(SandboxPolicy(gpu=True))
    (req,) = kw["device_requests"]
    assert req["Count"] == -1 and req["Capabilities"] == [["gpu"]] and req["Driver"] == ""
    assert kw["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert kw["ipc_mode"] == "private" and "privileged" not in kw


def test_docker_default_seccomp_profile_still_isolates_the_network(docker_backend: Backend, listener: Listener) -> None:
    """With the engine's default profile (sockets allowed) the network namespace alone stops the connection."""
    r = probe(docker_backend, SandboxPolicy(seccomp="docker-default", memory_mib=512), listener.port)
    assert r["seccomp"] == "2"
    assert r["interfaces"] == ["lo"]
    assert r["connect_host_loopback"] == "ECONNREFUSED"  # own loopback, nobody listening there
    assert r["connect_other_address"] == "ENETUNREACH"
    assert listener.accepted == 0


def test_image_holds_only_the_worker_runtime(docker_backend: Backend) -> None:
    code = ("import importlib.util as u, json, os\n"
            "print(json.dumps({m: u.find_spec(m) is not None for m in "
            "['torch', 'numpy', 'safetensors', 'tokenizers', 'jinja2', 'pydantic', 'secure_run.model', "
            "'triton', 'transformers', 'pytest', 'click', 'docker', 'secure_run.runner', 'pip']} | "
            "{'root': sorted(os.listdir('/'))}))")
    res = py(docker_backend, SandboxPolicy(memory_mib=512), code)
    assert res.exit_code == 0, res.stderr
    found = json.loads(res.stdout)
    assert all(found[m] for m in ['torch', 'numpy', 'safetensors', 'tokenizers', 'jinja2', 'pydantic',
                                  'secure_run.model'])
    assert not any(found[m] for m in ['triton', 'transformers', 'pytest', 'click', 'docker', 'secure_run.runner',
                                      'pip'])
    # .dockerenv and /sbin/docker-init (init=True) come from the engine; the rest is the image
    assert found["root"] == [".dockerenv", "dev", "etc", "lib64", "model", "opt", "proc", "sbin", "sys", "tmp", "usr",
                             "var"]


def test_image_tag_is_a_content_digest() -> None:
    plan = plan_image()
    assert plan.tag == f"{IMAGE_REPO}:{plan.digest[:16]}" and plan_image().tag == plan.tag
    entries = list(plan.entries)
    code = next(i for i, e in enumerate(entries) if e.hash_content)
    changed = ImagePlan(dockerfile=plan.dockerfile, entries=(
        *entries[:code], entries[code].__class__(dst=entries[code].dst, mode=entries[code].mode,
                                                 data=b"# edited\n"), *entries[code + 1:]))
    assert changed.digest != plan.digest
    assert plan.dockerfile.startswith(b"#") and b"\nFROM scratch\n" in plan.dockerfile
    assert not any(line.startswith((b"FROM ", b"RUN ", b"ADD ")) and line != b"FROM scratch"
                   for line in plan.dockerfile.splitlines())
    assert not any("transformers" in e.dst or "/triton/" in e.dst for e in plan.entries)


def test_build_is_reused(docker_backend: DockerBackend) -> None:
    client = docker_backend.client
    tag = ensure_image(client, build=True)  # already built this session: must not rebuild
    img = client.images.get(tag)
    assert img.labels["org.secure-run.digest"] == plan_image().digest
    assert ensure_image(client, build=False) == tag


def test_no_container_is_left_behind(docker_backend: DockerBackend) -> None:
    client = docker_backend.client
    backend = _Recording(client=client)
    marker = uuid.uuid4().hex
    res = py(backend, SandboxPolicy(wall_clock_s=1.5, memory_mib=256), f"import time; time.sleep(60)  # {marker}")
    assert res.timed_out
    assert py(backend, SandboxPolicy(memory_mib=256), "print('ok')").stdout == b"ok\n"
    assert len(backend.ids) == 2 and _gone(client, backend.ids)


def test_engine_refusal_at_create_is_mapped(docker_backend: DockerBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_run.sandbox._internal.docker_backend as db

    real = db.container_kwargs
    monkeypatch.setattr(db, "container_kwargs", lambda p, **k: {**real(p, **k), "mem_limit": "1k"})
    with pytest.raises(SandboxError) as info:
        docker_backend.run(["true"], SandboxPolicy())
    assert info.value.rule in ("sandbox.docker.create", "sandbox.docker.start")


def test_prune_removes_only_old_builds_of_its_repository(docker_backend: DockerBackend) -> None:
    import io
    import tarfile

    client = docker_backend.client
    repo = f"secure-run-prune-test-{uuid.uuid4().hex[:8]}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("Dockerfile", b"FROM scratch\nCOPY a /a\n"), ("a", uuid.uuid4().bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=f"{repo}:old", pull=False, rm=True)
    try:
        assert image_mod.prune_images(client, keep=f"{repo}:new", repo=repo) == []  # too young
        assert image_mod.prune_images(client, keep=f"{repo}:old", min_age_s=0, repo=repo) == []  # kept
        assert image_mod.prune_images(client, keep=f"{repo}:new", min_age_s=0, repo=repo) == [f"{repo}:old"]
        assert not client.images.list(name=repo)
    finally:
        for img in client.images.list(name=repo):
            client.images.remove(img.id, force=True)


def test_gpu_without_nvidia_runtime_passes_devices_and_driver_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 8: no NVIDIA container runtime -> the backend passes /dev/nvidia* and the driver itself."""
    from secure_run.sandbox._internal import docker_backend as db

    monkeypatch.setattr(db, "_manual_gpu", lambda: (["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"],
                                                    ["/usr/local/nvidia/lib64"]))
    kw = container_kwargs(SandboxPolicy(gpu=True), gpu_mode="devices")
    assert "device_requests" not in kw
    assert kw["devices"] == ["/dev/nvidia0:/dev/nvidia0:rwm", "/dev/nvidiactl:/dev/nvidiactl:rwm",
                             "/dev/nvidia-uvm:/dev/nvidia-uvm:rwm"]
    lib = [m for m in kw["mounts"] if m["Target"] == "/usr/local/nvidia/lib64"]
    assert lib and lib[0]["ReadOnly"] is True and lib[0]["Type"] == "bind"
    assert kw["environment"]["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64"
    assert kw["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert kw["cap_drop"] == ["ALL"] and "privileged" not in kw
    info = {"Runtimes": {"runc": {}}}
    assert db._gpu_mode(info, check_gpu_runtime=True) == "devices"
    assert db._gpu_mode({"Runtimes": {"nvidia": {}}}, check_gpu_runtime=True) == "runtime"
