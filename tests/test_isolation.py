"""One client's failure never stops the loop or harms anyone else."""

from __future__ import annotations

import threading

import pytest

from selchat.server.app import Server
from selchat.server.config import ServerConfig
from tests.support import LineSocket, RawUser, start_chat


class InProcessServer:
    """A Server on a reactor thread, so a test can break a piece of it."""

    def __init__(self, tmp_path):
        self.server = Server(ServerConfig(port=0, db=str(tmp_path / "a.db"), scrypt_n=16))
        self.host, self.port = self.server.listen()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def connect(self):
        return LineSocket(self.host, self.port)

    def stop(self):
        self.server.reactor.call_soon_threadsafe(self.server.shutdown)
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def inproc(tmp_path):
    srv = InProcessServer(tmp_path)
    yield srv
    srv.stop()


def test_exception_in_one_handler_drops_only_that_client(inproc):
    alice, bob, mallory = RawUser(inproc), RawUser(inproc), RawUser(inproc)
    start_chat(alice, bob)
    hub = inproc.server.hub
    real_who = hub.who

    def who():
        raise RuntimeError("boom")  # stands for any bug reached by one client's input

    hub.who = who
    mallory.chat.send("WHO")
    assert mallory.chat.expect_closed() == []
    assert mallory.login.expect_closed() == []
    hub.who = real_who
    # everyone else carries on, in order, and the loop still accepts newcomers
    alice.chat.send("MSG still fine")
    assert bob.login.line() == f"MSG {alice.name} still fine"
    carol = RawUser(inproc)
    carol.chat.send("WHO")
    lines = []
    while not (line := carol.chat.line()).startswith("OK WHO"):
        lines.append(line)
    assert sorted(entry.split()[1] for entry in lines) == sorted([alice.name, bob.name, carol.name])
