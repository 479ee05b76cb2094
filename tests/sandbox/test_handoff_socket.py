"""The hand-off socket (sandbox/handoff.py): private to the sandbox, one connection, strict messages."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sealed_support import sealed

from secure_run.manifests.folder import FolderError
from secure_run.model.demo import demo_model_dir
from secure_run.sandbox.handoff import HandoffServer, receive_sealed


def _pins(folder: object) -> dict[str, tuple[str, object]]:
    return {c.name: (c.sha256, c.identity) for c in folder.copies()}  # type: ignore[attr-defined]


def test_the_socket_is_reachable_only_through_the_sandbox_mount() -> None:
    with sealed(Path(demo_model_dir())) as folder, HandoffServer([(c.name, c.fd) for c in folder.copies()]) as server:
        private = server.mount_dir.parent
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o700  # other host users cannot reach the socket
        assert stat.S_IMODE(os.stat(server.mount_dir).st_mode) == 0o755
        sock = server.mount_dir / "sealed.sock"
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        got = receive_sealed(_pins(folder), str(sock))  # type: ignore[arg-type]
        assert got.digests() == folder.digests() and server.sent.wait(5)
        got.close()
        # one connection only: a second client gets nothing
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as again:
            again.settimeout(2)
            try:
                again.connect(str(sock))
                assert again.recv(100) == b""
            except OSError:
                pass  # refused outright: just as good
    assert not private.exists()  # removed on close


def _fake_server(tmp_path: Path, send: Callable[[socket.socket], None]) -> tuple[str, threading.Thread]:
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            send(conn)
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return path, t


def _msg(body: object) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.parametrize("case", ["not json", "no count", "count too big", "two fds in one message",
                                  "duplicate name", "closed early", "fd in the header"])
def test_a_malformed_hand_off_is_refused_and_leaks_nothing(tmp_path: Path, case: str) -> None:
    with sealed(Path(demo_model_dir())) as folder:
        copies = folder.copies()
        a, b = copies[0], copies[1]

        def send(conn: socket.socket) -> None:
            if case == "not json":
                conn.sendmsg([b"\xff{"])
            elif case == "no count":
                conn.sendmsg([_msg({"files": 1})])
            elif case == "count too big":
                conn.sendmsg([_msg({"count": 10**6})])
            elif case == "two fds in one message":
                conn.sendmsg([_msg({"count": 1})])
                socket.send_fds(conn, [_msg({"name": a.name})], [a.fd, b.fd])
            elif case == "duplicate name":
                conn.sendmsg([_msg({"count": 2})])
                socket.send_fds(conn, [_msg({"name": a.name})], [a.fd])
                socket.send_fds(conn, [_msg({"name": a.name})], [b.fd])
            elif case == "closed early":
                conn.sendmsg([_msg({"count": 3})])
                socket.send_fds(conn, [_msg({"name": a.name})], [a.fd])
            else:
                socket.send_fds(conn, [_msg({"count": 1})], [a.fd])

        path, t = _fake_server(tmp_path, send)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(FolderError) as info:
            receive_sealed(_pins(folder), path)  # type: ignore[arg-type]
        t.join(5)
        assert info.value.rule == "folder.handoff" and "sealed hand-off" in info.value.message
        assert len(os.listdir("/proc/self/fd")) <= before  # every received descriptor was closed


def test_a_server_without_a_client_stops_cleanly() -> None:
    with sealed(Path(demo_model_dir())) as folder:
        server = HandoffServer([(c.name, c.fd) for c in folder.copies()], accept_timeout_s=0.5)
        server._thread.join(5)
        assert server.error == "the worker did not connect in time" and not server.sent.is_set()
        server.close()
        assert not server.mount_dir.exists()


def test_a_socket_that_cannot_be_created_is_a_clear_error_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_run.errors import SandboxError

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)

    def refuse_bind(self: socket.socket, address: object) -> None:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", refuse_bind)
    with pytest.raises(SandboxError) as info:
        HandoffServer([])
    assert info.value.rule == "sandbox.handoff" and "Permission denied" in info.value.message
    assert list(tmp_path.iterdir()) == []  # the private folder was removed
