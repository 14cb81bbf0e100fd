"""sd_notify: the datagrams systemd would get, on a real AF_UNIX socket."""

from __future__ import annotations

import os
import signal
import socket
import tempfile

import pytest

from selchat.server import systemd
from tests.support import DEADLINE, ServerProcess


class NotifySocket:
    """What systemd listens on: a Unix datagram socket at a path or an abstract "@name"."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.dir = None
        if abstract:
            name = f"selchat-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # Not under tmp_path: a Unix socket path must stay under 108 bytes.
            self.dir = tempfile.mkdtemp(prefix="sdn-")
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(DEADLINE)

    def receive(self) -> list[str]:
        """The next datagram, as its lines."""
        return self.sock.recv(4096).decode().split("\n")

    def close(self) -> None:
        self.sock.close()
        if self.dir:
            os.unlink(self.address)
            os.rmdir(self.dir)


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def notify_socket(request, monkeypatch):
    sock = NotifySocket(abstract=request.param)
    monkeypatch.setenv("NOTIFY_SOCKET", sock.address)
    yield sock
    sock.close()


def test_notify_sends_the_states_in_one_datagram(notify_socket):
    assert systemd.notify("READY=1", "STATUS=listening on 127.0.0.1:7117") is True
    assert notify_socket.receive() == ["READY=1", "STATUS=listening on 127.0.0.1:7117"]
    assert systemd.notify("STOPPING=1") is True
    assert notify_socket.receive() == ["STOPPING=1"]


def test_reloading_carries_the_monotonic_time_systemd_wants(notify_socket):
    import time

    before = time.monotonic_ns() // 1000
    assert systemd.notify("RELOADING=1")
    reloading, stamp = notify_socket.receive()
    assert reloading == "RELOADING=1"
    key, _, usec = stamp.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= time.monotonic_ns() // 1000


def test_without_systemd_notify_does_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False            # never raises
    monkeypatch.setenv("NOTIFY_SOCKET", "@selchat-nobody-listens-here")
    assert systemd.notify("READY=1") is False


def test_serve_tells_systemd_ready_reloading_and_stopping(tmp_path, notify_socket):
    server = ServerProcess(tmp_path)        # inherits NOTIFY_SOCKET
    try:
        lines = notify_socket.receive()
        assert lines == ["READY=1", f"STATUS=listening on 127.0.0.1:{server.port}"]
        server.connect().close()            # and it really does accept connections
        server.proc.send_signal(signal.SIGHUP)
        assert notify_socket.receive()[0] == "RELOADING=1"
        assert notify_socket.receive() == ["READY=1"]
        server.proc.send_signal(signal.SIGTERM)
        assert notify_socket.receive() == ["STOPPING=1"]
    finally:
        assert server.stop() == 0
