"""The docker backend (product path): Docker SDK, locally built image, every control from the policy.

``containers.create`` + ``attach`` + ``start`` (never ``run``: that would pull a missing image),
the request written to the container's stdin, stdout/stderr demultiplexed from the attach stream,
``kill`` at the wall-clock limit, and ``remove(force=True)`` always. The engine keeps no logs of
the run (``log_config=none``). Errors are mapped to clear messages: no engine, image missing, GPU
requested without an NVIDIA runtime and no device nodes, a control the engine cannot apply (see
``allow_missing``).

Cleanup does not depend on the engine answering in time: the attach socket is closed first (a
worker flooding its output otherwise stalls the engine's kill), kill and remove go through a
separate low-level client with a short timeout and are retried, and ``docker rm -f`` is the last
resort. Every container is labelled with its owner (boot id, pid, start time) and a deadline, and
runs under ``deadline.py``, its own wall clock; :func:`reap_containers` (called before every
start) removes the containers of owners that are gone or past their deadline.

Without an NVIDIA container runtime, ``policy.gpu`` passes the ``/dev/nvidia*`` nodes as devices
and binds the driver's user-space libraries read-only (the namespace backend's discovery).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from secure_run.errors import SandboxError

from ..backends import STDERR, STDOUT, Backend, Outcome, SandboxRun
from ..errors import EngineUnavailable, GpuUnavailable, ImageMissing
from ..policy import HANDOFF_MOUNT, JIT_CACHE_MOUNT, MODEL_MOUNT, SCRATCH_MOUNT, SandboxPolicy
from .image import PYTHON_IN_IMAGE, SITE_DIR, ensure_image_id
from .layout import CODE_DIR, OPT, sandbox_env
from .owner import owner_alive, owner_token
from .seccomp import load_profile, profile_text

__all__ = ["DEADLINE_LABEL", "LABEL", "OWNER_LABEL", "DockerBackend", "connect", "container_kwargs",
           "reap_containers"]

#: Label put on every sandbox container (tests use it to check that none is left behind).
LABEL = "org.secure-run.sandbox"
#: ``<boot id>:<pid>:<start ticks>`` of the host process that created the container.
OWNER_LABEL = "org.secure-run.owner"
#: Unix time after which the container is past its wall clock (and reaped by anyone).
DEADLINE_LABEL = "org.secure-run.deadline"
#: The in-container wall clock (standard library only, run by path).
DEADLINE_WRAPPER = f"{CODE_DIR}/secure_run/sandbox/_internal/deadline.py"
#: Seconds the cleanup client waits for each engine call.
CLEANUP_TIMEOUT_S = 10
#: Extra seconds past the deadline before a container of a live owner counts as abandoned.
REAP_GRACE_S = 60.0


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


def container_kwargs(policy: SandboxPolicy, *, host_env: dict[str, str] | None = None,
                     gpu_mode: str = "runtime") -> dict[str, Any]:
    """The ``containers.create`` keyword arguments that enforce ``policy`` (spec/sandbox.md 6.1).

    ``gpu_mode`` (with ``policy.gpu``): ``"runtime"`` asks the NVIDIA runtime for every GPU;
    ``"devices"`` passes ``/dev/nvidia*`` and binds the driver libraries itself.
    """
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
        "nano_cpus": int(policy.cpus * 1e9),
        "environment": sandbox_env(policy, [SITE_DIR], docker_gpu=True, host_env=host_env),
        "working_dir": SCRATCH_MOUNT,
        "hostname": "sandbox",
        "log_config": LogConfig(type="none"),
        "labels": {LABEL: "1", OWNER_LABEL: owner_token(),
                   DEADLINE_LABEL: str(int(time.time() + policy.wall_clock_s) + 1)},
        "stdin_open": True,
        "detach": False,
        "tty": False,
    }
    if policy.model_dir is not None:
        kwargs["mounts"].append(Mount(target=MODEL_MOUNT, source=str(policy.model_dir), type="bind", read_only=True))
    if policy.handoff_dir is not None:
        kwargs["mounts"].append(Mount(target=HANDOFF_MOUNT, source=str(policy.handoff_dir), type="bind", read_only=True))
    if policy.gpu and gpu_mode == "runtime":
        kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    elif policy.gpu:
        nodes, libdirs = _manual_gpu()
        kwargs["devices"] = [f"{n}:{n}:rwm" for n in nodes]
        for d in libdirs:
            kwargs["mounts"].append(Mount(target=d, source=d, type="bind", read_only=True))
        kwargs["environment"].update({"LD_LIBRARY_PATH": ":".join(libdirs), "TRITON_LIBCUDA_PATH": libdirs[0]})
    return kwargs


def _manual_gpu() -> tuple[list[str], list[str]]:
    """The GPU device nodes and driver library folders of this host (no NVIDIA container runtime)."""
    from .namespace_backend import _gpu_library_dirs, _gpu_nodes

    nodes = _gpu_nodes()
    if not any(n.startswith("/dev/nvidia") and n[11:].isdigit() for n in nodes):
        raise GpuUnavailable("the engine has no 'nvidia' runtime and this host has no /dev/nvidia<N> device node",
                             backend="docker")
    libdirs = _gpu_library_dirs()
    if not libdirs:
        raise GpuUnavailable("the engine has no 'nvidia' runtime and the NVIDIA driver library libcuda.so was "
                             "not found on this host", backend="docker")
    return nodes, libdirs


def _check_engine(info: dict[str, Any], policy: SandboxPolicy, *, check_gpu_runtime: bool) -> list[str]:
    """Refuse (or, when allowed, report as missing) controls this engine cannot apply (GPU: see _gpu_mode)."""
    missing: list[str] = []
    checks = (("cgroup_pids", bool(info.get("PidsLimit", True))),
              ("cgroup_memory", bool(info.get("MemoryLimit", True))),
              ("cgroup_cpu", bool(info.get("CpuCfsQuota", True))),
              ("swap_limit", bool(info.get("SwapLimit", True)) or _local_engine_without_swap()),
              ("seccomp", any("seccomp" in str(o) for o in info.get("SecurityOptions") or [])))
    for control, ok in checks:
        if ok:
            continue
        if control not in policy.allow_missing:
            raise SandboxError(f"the Docker engine cannot apply {control}", rule=f"sandbox.control.{control}",
                               hint=f"enable it on the engine's host, or (knowingly) add {control!r} to allow_missing")
        missing.append(control)
    return missing


def _local_engine_without_swap() -> bool:
    """True when the engine runs on this host and this host has no active swap (nothing to limit)."""
    host = os.environ.get("DOCKER_HOST", "unix://")
    if not host.startswith("unix://"):
        return False
    try:
        return len(Path("/proc/swaps").read_text(encoding="ascii").splitlines()) <= 1
    except OSError:
        return False


def _gpu_mode(info: dict[str, Any], *, check_gpu_runtime: bool) -> str:
    """``runtime`` when the engine has the NVIDIA runtime (or the check is off), else ``devices``."""
    if not check_gpu_runtime or "nvidia" in (info.get("Runtimes") or {}):
        return "runtime"
    try:
        _manual_gpu()
    except GpuUnavailable as err:
        runtimes = ", ".join(sorted(info.get("Runtimes") or {})) or "none"
        raise GpuUnavailable(f"the engine has no 'nvidia' runtime registered (runtimes: {runtimes}), and "
                             f"{err.details[0] if err.details else err.message}", backend="docker") from None
    return "devices"


def _cleanup_api(client: Any) -> Any:
    """A separate low-level client with a short timeout, used only to kill and remove."""
    import docker

    kwargs = docker.utils.kwargs_from_env()  # the same engine as connect() (DOCKER_HOST, TLS settings)
    return docker.APIClient(version=client.api.api_version, timeout=CLEANUP_TIMEOUT_S, **kwargs)


def _force_remove(client: Any, cid: str, *, attempts: int = 3) -> bool:
    """Remove container ``cid`` (running or not): engine API with retries, then ``docker rm -f``."""
    import docker
    import requests

    api = None
    for i in range(attempts):
        try:
            api = api or _cleanup_api(client)
            api.remove_container(cid, force=True)
            return True
        except docker.errors.NotFound:
            return True
        except (docker.errors.APIError, requests.exceptions.RequestException, OSError):
            time.sleep(0.2 * (i + 1))
    cli = shutil.which("docker")
    if cli is None:
        return False
    try:
        res = subprocess.run([cli, "rm", "-f", cid], capture_output=True, timeout=60, check=False,
                             env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 or b"No such container" in res.stderr


def reap_containers(client: Any, *, now: float | None = None) -> list[str]:
    """Remove sandbox containers whose owner process is gone, or that are past deadline + grace.

    Returns the ids removed. Containers of live owners within their deadline are never touched
    (concurrent runs from other processes are safe).
    """
    import docker
    import requests

    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        listed = _cleanup_api(client).containers(all=True, filters={"label": LABEL})
    except (docker.errors.APIError, requests.exceptions.RequestException, OSError):
        return removed
    for c in listed:
        labels = c.get("Labels") or {}
        owner = labels.get(OWNER_LABEL, "")
        try:
            deadline = float(labels.get(DEADLINE_LABEL, "0"))
        except ValueError:
            deadline = 0.0
        if owner and owner_alive(owner) and now < deadline + REAP_GRACE_S:
            continue
        if _force_remove(client, str(c["Id"])):
            removed.append(str(c["Id"]))
    return removed


def host_runtime_mounts(*, gpu: bool) -> tuple[list[Any], list[str], dict[str, str]]:
    """Mounts, sandbox site paths and environment of the ``host`` runtime (see ``plan_host_image``).

    The host's interpreter is bound at the image's interpreter path, so the command line is the
    same in both runtimes; ``PYTHONHOME`` points it at its standard library.
    """
    from docker.types import Mount

    from .namespace_backend import runtime_layout, worker_site_dirs

    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    binds, _symlinks = runtime_layout(python, [], gpu=gpu)  # the image carries the same symlinks
    mounts = [Mount(target=b["dst"], source=b["src"], type="bind", read_only=True) for b in binds
              if b["dst"] != python]
    mounts.append(Mount(target=PYTHON_IN_IMAGE, source=python, type="bind", read_only=True))
    sites = worker_site_dirs(gpu=gpu)
    paths = [f"{OPT}/site{i}" for i in range(len(sites))]
    mounts += [Mount(target=dst, source=src, type="bind", read_only=True) for src, dst in zip(sites, paths)]
    return mounts, paths, {"PYTHONHOME": os.path.realpath(sys.base_prefix)}


class DockerBackend(Backend):
    """Containers from a locally built image.

    ``runtime``: ``"image"`` (a self-contained image holding the interpreter, torch and the worker),
    ``"host"`` (a minimal image; the host's runtime bound read-only, as in the namespace backend),
    or ``"auto"`` (default): ``host`` for GPU runs (the CUDA stack, the driver and Triton's C
    toolchain stay on the host), ``image`` otherwise.
    """

    name = "docker"

    def __init__(self, *, build: bool = False, client: Any = None, check_gpu_runtime: bool = True,
                 runtime: str = "auto") -> None:
        if runtime not in ("auto", "image", "host"):
            raise SandboxError(f"unknown docker runtime {runtime!r}", rule="sandbox.docker.runtime",
                               hint="use auto, image or host")
        self.build = build
        self._client = client
        self.check_gpu_runtime = check_gpu_runtime
        self.runtime = runtime

    def runtime_for(self, policy: SandboxPolicy) -> str:
        """The runtime a run with ``policy`` uses."""
        if self.runtime != "auto":
            return self.runtime
        return "host" if policy.gpu else "image"

    @property
    def client(self) -> Any:
        """The engine client (connects on first use)."""
        if self._client is None:
            self._client = connect()
        return self._client

    def python_argv(self) -> list[str]:
        """The image's interpreter, without ``site``."""
        return [PYTHON_IN_IMAGE, "-S"]

    def image(self, runtime: str = "image") -> str:
        """The runtime image's content id (built when missing and ``build`` is true; checked by content id)."""
        return ensure_image_id(self.client, build=self.build, runtime=runtime)

    def start(self, argv: Sequence[str], policy: SandboxPolicy, *, stdin: bytes = b"",
              keep_stdin_open: bool = False) -> SandboxRun:
        """Create, attach, start; write ``stdin`` and close it (unless ``keep_stdin_open``).

        An engine that does not answer in time is a :class:`SandboxError` (exit 2), never a raw
        ``requests`` exception; a container created before the engine stopped answering is removed
        (or reaped by the next start once this process is gone).
        """
        import docker
        import requests

        from .namespace_backend import covered

        client = self.client
        try:
            info = client.info()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
            raise EngineUnavailable(str(err)[:500]) from None
        missing = _check_engine(info, policy, check_gpu_runtime=self.check_gpu_runtime)
        gpu_mode = _gpu_mode(info, check_gpu_runtime=self.check_gpu_runtime) if policy.gpu else "runtime"
        reap_containers(client)
        runtime = self.runtime_for(policy)
        try:
            tag = self.image(runtime)
        except requests.exceptions.RequestException as err:
            raise EngineUnavailable(str(err)[:500]) from None
        command = [PYTHON_IN_IMAGE, "-S", DEADLINE_WRAPPER, f"{policy.wall_clock_s:.3f}", "--", *argv]
        kwargs = container_kwargs(policy, gpu_mode=gpu_mode)
        libdirs = _manual_gpu()[1] if policy.gpu and gpu_mode == "devices" else []
        if runtime == "host":
            mounts, paths, env = host_runtime_mounts(gpu=policy.gpu)
            targets = [str(m["Target"]) for m in mounts]
            # a driver library folder the runtime already shows (e.g. under /usr/lib) is not mounted twice
            kwargs["mounts"] = [m for m in kwargs["mounts"]
                                if not (str(m["Target"]) in libdirs and covered(str(m["Target"]), targets))]
            kwargs["mounts"].extend(mounts)
            kwargs["environment"]["PYTHONPATH"] = ":".join([CODE_DIR, *paths])
            kwargs["environment"].update(env)
        try:
            container = client.containers.create(tag, command=command, **kwargs)
        except docker.errors.ImageNotFound:
            raise ImageMissing(tag) from None
        except docker.errors.APIError as err:
            raise SandboxError("the Docker engine refused to create the sandbox container",
                               details=(str(err)[:500],), rule="sandbox.docker.create",
                               hint="check the engine's version and the policy values") from None
        except requests.exceptions.RequestException as err:
            raise SandboxError("the Docker engine did not answer while creating the sandbox container",
                               details=(str(err)[:500],), rule="sandbox.docker.create",
                               hint="check the engine (docker info); a half-created container is reaped by the "
                               "next run") from None
        try:
            sock = client.api.attach_socket(container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            container.start()
        except docker.errors.APIError as err:
            _force_remove(client, container.id)
            text = str(err)
            if "could not select device driver" in text or "nvidia" in text.lower():
                raise GpuUnavailable(text[:500], backend="docker") from None
            raise SandboxError("the Docker engine could not start the sandbox container", details=(text[:500],),
                               rule="sandbox.docker.start", hint="see the engine's message") from None
        except requests.exceptions.RequestException as err:
            _force_remove(client, container.id)
            raise SandboxError("the Docker engine did not answer while starting the sandbox container",
                               details=(str(err)[:500],), rule="sandbox.docker.start",
                               hint="check the engine (docker info)") from None
        except BaseException:
            _force_remove(client, container.id)
            raise
        return _DockerRun(policy, container, sock, stdin, frozenset(missing), client, keep_stdin_open=keep_stdin_open)


class _DockerRun(SandboxRun):
    def __init__(self, policy: SandboxPolicy, container: Any, sock: Any, stdin: bytes,
                 missing: frozenset[str], client: Any, *, keep_stdin_open: bool = False) -> None:
        super().__init__(policy)
        self.container = container
        self.client = client
        self._holder = sock  # keeps the HTTP response (and so the connection) alive
        self.sock: socket.socket = getattr(sock, "_sock", sock)
        self.missing = missing
        self._outcome = None
        self._removed = False
        self._sock_closed = False
        self._stdin_open = True
        self._stdin_lock = threading.Lock()
        try:
            if stdin:
                self.sock.sendall(stdin)
        except OSError:
            pass  # the container already went away; finish() reports how it ended
        if not keep_stdin_open:
            self.close_stdin()

    def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the container's stdin over the attach socket."""
        with self._stdin_lock:
            if not self._stdin_open or self._sock_closed:
                raise SandboxError("the sandbox's stdin is closed", rule="sandbox.stdin",
                                   hint="the sandbox has ended; start a new one")
            try:
                self.sock.sendall(data)
            except OSError as err:
                raise SandboxError(f"could not write to the sandbox: {err}", rule="sandbox.stdin",
                                   hint="the sandbox has ended; start a new one") from None

    def close_stdin(self) -> None:
        """EOF on the container's stdin (StdinOnce)."""
        with self._stdin_lock:
            if not self._stdin_open:
                return
            self._stdin_open = False
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        """Demultiplex the attach stream (8-byte frame headers) until it ends or the deadline."""
        buf = bytearray()
        while True:
            left = self.remaining()
            if left <= 0:
                self.timed_out = True
                self.kill()
                return
            if self._sock_closed:
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

    def _close_sock(self) -> None:
        if self._sock_closed:
            return
        self._sock_closed = True
        for closable in (self.sock, self._holder):
            try:
                closable.close()
            except (OSError, AttributeError):
                pass

    def kill(self) -> None:
        """Kill the container (its whole process tree), whatever the engine's state.

        The attach stream is closed first: with a flooding worker the engine blocks on it, and a
        kill sent while it is blocked does not return. Kill goes through the cleanup client
        (short timeout, retried); if that still fails, :meth:`finish` force-removes.
        """
        import docker
        import requests

        if self._removed:
            return
        self._close_sock()
        for i in range(2):
            try:
                _cleanup_api(self.client).kill(self.container.id)
                return
            except docker.errors.APIError:
                return  # not running any more (or gone)
            except (requests.exceptions.RequestException, OSError):
                time.sleep(0.2 * (i + 1))

    def finish(self) -> Outcome:
        """Wait (killing at the deadline), read the exit status and OOM flag, remove the container.

        The container is removed in every case (engine timeouts included); if even ``docker rm -f``
        fails, :class:`SandboxError` (rule ``sandbox.docker.cleanup``) names the container.
        """
        import docker
        import requests

        if self._outcome is not None:
            return self._outcome
        exit_code: int | None = None
        oom = False
        try:
            try:
                api = _cleanup_api(self.client)
                api.timeout = max(self.remaining(), 0.0) + 2.0
                status = api.wait(self.container.id)
            except (requests.exceptions.RequestException, docker.errors.APIError, OSError):
                self.timed_out = self.timed_out or self.remaining() <= 0
                self.kill()
                try:
                    status = _cleanup_api(self.client).wait(self.container.id)
                except (requests.exceptions.RequestException, docker.errors.APIError, OSError):
                    status = {}
            code = status.get("StatusCode") if isinstance(status, dict) else None
            exit_code = int(code) if isinstance(code, int) else None
            try:
                state = _cleanup_api(self.client).inspect_container(self.container.id).get("State", {})
                oom = bool(state.get("OOMKilled"))
            except (requests.exceptions.RequestException, docker.errors.APIError, OSError):
                pass
        finally:
            self._close_sock()
            removed = _force_remove(self.client, self.container.id)
            self._removed = True
        if not removed:
            raise SandboxError("the sandbox container could not be removed", details=(f"container {self.container.id}",),
                               rule="sandbox.docker.cleanup",
                               hint=f"remove it by hand: docker rm -f {self.container.id}; it stops on its own at "
                               "its wall-clock limit")
        if exit_code == 124 and not self.timed_out:
            self.timed_out = True  # the in-container wall clock fired (deadline.py)
        self._outcome = Outcome(exit_code=exit_code, timed_out=self.timed_out, oom_killed=oom,
                                missing_controls=self.missing)
        return self._outcome
