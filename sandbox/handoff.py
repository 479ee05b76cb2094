"""Handing the sealed, verified copies of a model folder to the sandboxed worker.

The worker gets no view of the model folder at all. The host verifies the folder into sealed
memory copies (:mod:`secure_run.manifests.sealed`) and passes their descriptors over a unix
socket (``SCM_RIGHTS``) that only this sandbox can reach:

* the host makes a private folder (``0700``) holding a folder (``0755``) with one
  ``SOCK_SEQPACKET`` socket, and mounts that inner folder read-only at :data:`HANDOFF_MOUNT`;
* the worker connects to :data:`HANDOFF_SOCKET` and receives one header message
  (``{"count": N}``) and then N messages of one descriptor each, named by a JSON body
  (``{"name": ...}``); the host closes the connection after the last one and accepts no other;
* the worker adopts them with :meth:`SealedFolder.adopt`: each must be a fully sealed regular
  memory file with exactly the identity (device, inode, size, times) the request pinned, so it is
  the copy whose bytes the host hashed; the pinned set and the received set must be equal.

Errors are :class:`~secure_run.errors.SandboxError` on the host (``sandbox.handoff``) and
:class:`~secure_run.manifests.folder.FolderError` in the worker (``folder.handoff``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from secure_run.errors import SandboxError
from secure_run.manifests.folder import FolderError
from secure_run.manifests.hashing import FileIdentity
from secure_run.manifests.sealed import SealedFolder

from .policy import HANDOFF_MOUNT

__all__ = ["HANDOFF_MOUNT", "HANDOFF_SOCKET", "HandoffServer", "receive_sealed"]

#: The socket the worker connects to.
HANDOFF_SOCKET = f"{HANDOFF_MOUNT}/sealed.sock"
_SOCKET_NAME = "sealed.sock"
#: Largest JSON body of one message.
_MAX_BODY = 4096
#: Most files one hand-off carries (the request's pin limit).
MAX_FILES = 4096


class HandoffServer:
    """The host's end: serves the sealed copies to the first (and only) connection.

    Use as a context manager; :attr:`mount_dir` is what the sandbox mounts at :data:`HANDOFF_MOUNT`.
    Descriptors in flight keep the copies alive, so the host may close its own once :attr:`sent`.
    """

    def __init__(self, files: Sequence[tuple[str, int]], *, accept_timeout_s: float = 600.0) -> None:
        if len(files) > MAX_FILES:
            raise SandboxError(f"{len(files)} files are more than the {MAX_FILES} one hand-off carries",
                               rule="sandbox.handoff", hint="the model folder has too many files")
        self._files = list(files)
        self._private = Path(tempfile.mkdtemp(prefix="secure-run-handoff-"))  # 0700: other users stay out
        self.mount_dir = self._private / "h"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.mount_dir.mkdir(mode=0o755)
            os.chmod(self.mount_dir, 0o755)
            path = str(self.mount_dir / _SOCKET_NAME)
            self._sock.bind(path)
            os.chmod(path, 0o666)  # the sandbox's unprivileged uid connects; the private parent keeps others out
            self._sock.listen(1)
            self._sock.settimeout(0.2)
        except OSError as exc:
            self._sock.close()
            shutil.rmtree(self._private, ignore_errors=True)
            raise SandboxError(f"cannot create the hand-off socket in {self._private}: {exc.strerror}",
                               rule="sandbox.handoff", hint="check that the temporary folder is writable") from None
        self._stop = threading.Event()
        self._deadline = accept_timeout_s
        self.sent = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._serve, name="secure-run-handoff", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        waited = 0.0
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                waited += 0.2
                if waited >= self._deadline:
                    self.error = "the worker did not connect in time"
                    return
                continue
            except OSError as exc:  # closed by close()
                self.error = f"accept failed: {exc.strerror}"
                return
            with conn:
                conn.settimeout(30.0)
                try:
                    _send(conn, self._files)
                    self.sent.set()
                except OSError as exc:
                    self.error = f"sending the sealed files failed: {exc.strerror or exc}"
            return  # one connection only

    def close(self) -> None:
        """Stop serving, remove the socket and its folders (idempotent)."""
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5.0)
        shutil.rmtree(self._private, ignore_errors=True)

    def __enter__(self) -> HandoffServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _send(conn: socket.socket, files: Sequence[tuple[str, int]]) -> None:
    conn.sendmsg([json.dumps({"count": len(files)}).encode()])
    for name, fd in files:
        socket.send_fds(conn, [json.dumps({"name": name}).encode()], [fd])


def _refuse(message: str) -> FolderError:
    return FolderError(f"sealed hand-off: {message}", rule="folder.handoff",
                       hint="the host hands over the verified copies itself; run the command again")


def _message(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    data, fds, flags, _ = socket.recv_fds(conn, _MAX_BODY, 1)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise _refuse("a message or its descriptors were truncated")
    try:
        body = json.loads(data.decode("utf-8")) if data else None
    except (UnicodeDecodeError, ValueError):
        body = None
    if not isinstance(body, dict):
        for fd in fds:
            os.close(fd)
        raise _refuse("a message is not a JSON object" if data else "the host closed the connection early")
    return body, fds


def receive_sealed(pins: Mapping[str, tuple[str, FileIdentity]], socket_path: str = HANDOFF_SOCKET) -> SealedFolder:
    """The worker's end: receive every sealed copy and adopt them against ``pins``.

    Raises:
        FolderError: ``folder.handoff`` (no socket, a malformed or short stream) or what
        :meth:`SealedFolder.adopt` raises (``folder.unpinned``, ``folder.unsealed``).
    """
    received: dict[str, int] = {}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
            conn.settimeout(60.0)
            try:
                conn.connect(socket_path)
            except OSError as exc:
                raise _refuse(f"cannot connect to {socket_path} ({exc.strerror})") from None
            head, fds = _message(conn)
            count = head.get("count")
            if fds or not isinstance(count, int) or not 0 < count <= MAX_FILES:
                for fd in fds:
                    os.close(fd)
                raise _refuse(f"bad header {head!r}")
            for _ in range(count):
                body, fds = _message(conn)
                name = body.get("name")
                if len(fds) != 1 or not isinstance(name, str) or name in received:
                    for fd in fds:
                        os.close(fd)
                    raise _refuse(f"bad file message {body!r} with {len(fds)} descriptor(s)")
                received[name] = fds[0]
    except BaseException:
        for fd in received.values():
            os.close(fd)
        raise
    return SealedFolder.adopt(received, pins)
