"""The docker backend (product path): Docker SDK, locally built image, every control from the policy.

``containers.create`` + ``attach`` + ``start`` (never ``run``: that would pull a missing image),
the request written to the container's stdin, stdout/stderr demultiplexed from the attach stream,
``kill`` at the wall-clock limit, and ``remove(force=True)`` always. The engine keeps no logs of
the run (``log_config=none``). Errors are mapped to clear messages: no engine, image missing, GPU
requested without an NVIDIA runtime, a control the engine cannot apply (see ``allow_missing``).
"""

from __future__ import annotations

import json
import select
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from secure_run.errors import SandboxError

from ..backends import STDERR, STDOUT, Backend, Outcome, SandboxRun
from ..errors import EngineUnavailable, GpuUnavailable, ImageMissing
from ..policy import JIT_CACHE_MOUNT, MODEL_MOUNT, SCRATCH_MOUNT, SandboxPolicy
from .image import PYTHON_IN_IMAGE, SITE_DIR, ensure_image
from .layout import sandbox_env
from .seccomp import load_profile, profile_text

__all__ = ["LABEL", "DockerBackend", "container_kwargs", "connect"]

#: Label put on every sandbox container (tests use it to check that none is left behind).
LABEL = "org.secure-run.sandbox"


def connect(timeout: int = 60) -> Any:
    """A Docker client that has answered a ping.

    Raises:
        EngineUnavailable: no engine reachable (socket missing, refused, DOCKER_HOST wrong, ...).
    """
    import docker
    import requests

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as err:
        raise EngineUnavailable(str(err)[:500]) from None


def _seccomp_opt(policy: SandboxPolicy) -> list[str]:
    if policy.seccomp == "docker-default":
        return []  # the engine applies its built-in default profile
    load_profile()  # refuse a broken profile before the engine sees it
    return [f"seccomp={json.dumps(json.loads(profile_text()), separators=(',', ':'))}"]


def container_kwargs(policy: SandboxPolicy, *, host_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``containers.create`` keyword arguments that enforce ``policy`` (spec/sandbox.md 6.1)."""
    from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

    tmpfs = {SCRATCH_MOUNT: f"rw,noexec,nosuid,nodev,size={policy.scratch_mib}m,mode=1777"}
    if policy.jit_cache_mib:
        tmpfs[JIT_CACHE_MOUNT] = f"rw,exec,nosuid,nodev,size={policy.jit_cache_mib}m,mode=1777"
    kwargs: dict[str, Any] = {
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true", *_seccomp_opt(policy)],
        "user": f"{policy.uid}:{policy.gid}",
        "pids_limit": policy.pids_limit,
        "mem_limit": f"{policy.memory_mib}m",
        "memswap_limit": f"{policy.memory_mib}m",
        "ulimits": [Ulimit(name="nofile", soft=policy.nofile, hard=policy.nofile), Ulimit(name="core", soft=0, hard=0)],
        "tmpfs": tmpfs,
        "mounts": [],
        "ipc_mode": "private",
        "shm_size": f"{policy.shm_mib}m",
        "init": True,
        "environment": sandbox_env(policy, [SITE_DIR], docker_gpu=True, host_env=host_env),
        "working_dir": SCRATCH_MOUNT,
        "hostname": "sandbox",
        "log_config": LogConfig(type="none"),
        "labels": {LABEL: "1"},
        "stdin_open": True,
        "detach": False,
        "tty": False,
    }
    if policy.model_dir is not None:
        kwargs["mounts"].append(Mount(target=MODEL_MOUNT, source=str(policy.model_dir), type="bind", read_only=True))
    if policy.gpu:
        kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return kwargs


def _check_engine(info: dict[str, Any], policy: SandboxPolicy, *, check_gpu_runtime: bool) -> list[str]:
    """Refuse (or, when allowed, report as missing) controls this engine cannot apply."""
    missing: list[str] = []
    checks = (("cgroup_pids", bool(info.get("PidsLimit", True))),
              ("cgroup_memory", bool(info.get("MemoryLimit", True))),
              ("swap_limit", bool(info.get("SwapLimit", True))),
              ("seccomp", any("seccomp" in str(o) for o in info.get("SecurityOptions") or [])))
    for control, ok in checks:
        if ok:
            continue
        if control not in policy.allow_missing:
            raise SandboxError(f"the Docker engine cannot apply {control}", rule=f"sandbox.control.{control}",
                               hint=f"enable it on the engine's host, or (knowingly) add {control!r} to allow_missing")
        missing.append(control)
    if policy.gpu and check_gpu_runtime and "nvidia" not in (info.get("Runtimes") or {}):
        runtimes = ", ".join(sorted(info.get("Runtimes") or {})) or "none"
        raise GpuUnavailable(f"the engine has no 'nvidia' runtime registered (runtimes: {runtimes})", backend="docker")
    return missing


class DockerBackend(Backend):
    """Containers from the locally built runtime image."""

    name = "docker"

    def __init__(self, *, build: bool = False, client: Any = None, check_gpu_runtime: bool = True) -> None:
        self.build = build
        self._client = client
        self.check_gpu_runtime = check_gpu_runtime

    @property
    def client(self) -> Any:
        """The engine client (connects on first use)."""
        if self._client is None:
            self._client = connect()
        return self._client

    def python_argv(self) -> list[str]:
        """The image's interpreter, without ``site``."""
        return [PYTHON_IN_IMAGE, "-S"]

    def image(self) -> str:
        """The runtime image tag (built when missing and ``build`` is true)."""
        return ensure_image(self.client, build=self.build)

    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"") -> SandboxRun:
        """Create, attach, start; write ``stdin`` and close it."""
        import docker

        client = self.client
        try:
            info = client.info()
        except docker.errors.DockerException as err:
            raise EngineUnavailable(str(err)[:500]) from None
        missing = _check_engine(info, policy, check_gpu_runtime=self.check_gpu_runtime)
        tag = self.image()
        try:
            container = client.containers.create(tag, command=list(argv), **container_kwargs(policy))
        except docker.errors.ImageNotFound:
            raise ImageMissing(tag) from None
        except docker.errors.APIError as err:
            raise SandboxError("the Docker engine refused to create the sandbox container",
                               details=(str(err)[:500],), rule="sandbox.docker.create",
                               hint="check the engine's version and the policy values") from None
        try:
            sock = client.api.attach_socket(container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            container.start()
        except docker.errors.APIError as err:
            container.remove(force=True)
            text = str(err)
            if "could not select device driver" in text or "nvidia" in text.lower():
                raise GpuUnavailable(text[:500], backend="docker") from None
            raise SandboxError("the Docker engine could not start the sandbox container", details=(text[:500],),
                               rule="sandbox.docker.start", hint="see the engine's message") from None
        except BaseException:
            container.remove(force=True)
            raise
        return _DockerRun(policy, container, sock, stdin, frozenset(missing))


class _DockerRun(SandboxRun):
    def __init__(self, policy: SandboxPolicy, container: Any, sock: Any, stdin: bytes,
                 missing: frozenset[str]) -> None:
        super().__init__(policy)
        self.container = container
        self._holder = sock  # keeps the HTTP response (and so the connection) alive
        self.sock: socket.socket = getattr(sock, "_sock", sock)
        self.missing = missing
        self._outcome: Outcome | None = None
        self._removed = False
        try:
            if stdin:
                self.sock.sendall(stdin)
            self.sock.shutdown(socket.SHUT_WR)  # EOF on the container's stdin (StdinOnce)
        except OSError:
            pass  # the container already went away; finish() reports how it ended

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        """Demultiplex the attach stream (8-byte frame headers) until it ends or the deadline."""
        buf = bytearray()
        while True:
            left = self.remaining()
            if left <= 0:
                self.timed_out = True
                self.kill()
                return
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                return
            buf.extend(data)
            while len(buf) >= 8:
                stream, size = buf[0], struct.unpack(">I", bytes(buf[4:8]))[0]
                if len(buf) < 8 + size:
                    break
                payload = bytes(buf[8:8 + size])
                del buf[:8 + size]
                if stream in (STDOUT, STDERR) and payload:
                    yield stream, payload

    def kill(self) -> None:
        """Kill the container (its whole process tree)."""
        import docker

        if self._removed:
            return
        try:
            self.container.kill()
        except docker.errors.APIError:
            pass  # not running any more

    def finish(self) -> Outcome:
        """Wait (killing at the deadline), read the exit status and OOM flag, remove the container."""
        import docker
        import requests

        if self._outcome is not None:
            return self._outcome
        try:
            try:
                status = self.container.wait(timeout=max(self.remaining(), 0.0) + 1.0)
            except (requests.exceptions.RequestException, docker.errors.APIError):
                self.timed_out = True
                self.kill()
                status = self.container.wait(timeout=30)
            self.container.reload()
            state = self.container.attrs.get("State", {})
            self._outcome = Outcome(exit_code=int(status.get("StatusCode", -1)), timed_out=self.timed_out,
                                    oom_killed=bool(state.get("OOMKilled")), missing_controls=self.missing)
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            try:
                self.container.remove(force=True)
            except docker.errors.NotFound:
                pass
            self._removed = True
        return self._outcome
