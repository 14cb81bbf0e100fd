"""``selchat connect --host a,b``: real client processes failing over between
real servers. Two ``selchat serve`` processes on one SQLite file stand in for
the nodes of a cluster: an account made on one logs in on the other, but a
session is not shared (the RESUME is refused, and the client logs in afresh).
Nothing sleeps to synchronise: every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import socket
import time
from datetime import datetime

from selchat.client.servers import STABLE_AFTER
from tests.support import RawUser, unique
from tests.test_client_json import JsonClient
from tests.test_client_tls import ca, ca_pem, cert_files, expect_start  # noqa: F401 (ca, ca_pem: fixtures)

OPEN = ("--conn-rate", "0", "--max-per-address", "0", "--throttle-after", "0")
FAILOVER_LIMIT = 10.0   # generous: the machine is shared; the measured time is printed


def dead_port() -> socket.socket:
    """A socket bound to a free port and not listening: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def account(server) -> str:
    user = RawUser(server, unique("fo"))
    user.close()
    return user.name


def test_a_dead_server_in_the_list_is_passed_over_at_once(server, clients):
    name = account(server)
    with dead_port() as dead:
        port = dead.getsockname()[1]
        started = time.monotonic()
        client = clients(server.port, "--host", f"127.0.0.1:{port},127.0.0.1:{server.port}",
                         user=name, password="pw secret")
        client.expect(f"logged in as {name}")
        took = time.monotonic() - started
        assert client.line("err") == f"cannot reach 127.0.0.1:{port}: Connection refused"
        assert client.line("err") == f"connected to 127.0.0.1:{server.port}"
        client.write("/who\n")
        line = client.line()
        assert line.startswith("online: ") and f"{name} (idle)" in line
        client.close_stdin()
        assert client.rest() == ["logged out"]
        assert client.wait() == 0
        assert client.rest("err") == []
    print(f"\nlogged in past a dead server in {took:.3f} s (process start included)")


def test_when_its_node_dies_the_client_goes_on_on_the_next(make_server, clients):
    a = make_server(*OPEN)
    b = make_server(*OPEN, db=a.db)   # the same accounts
    name = account(a)
    client = JsonClient(clients(a.port, "--host", f"127.0.0.1:{a.port},127.0.0.1:{b.port}", "--json",
                                "--reconnect", user=name, password="pw secret"))
    assert client.expect("connected")["server"] == f"127.0.0.1:{a.port}"
    assert client.expect("ready")["user"] == name
    # The same node is retried at once only after a connection that lasted
    # (STABLE_AFTER): this is how long the client stays on A, not a synchronisation.
    time.sleep(STABLE_AFTER + 0.2)
    killed = time.monotonic()
    a.proc.kill()
    a.proc.wait()
    lost = client.expect("lost")
    first = client.next()
    assert (first["type"], first["attempt"], first["delay"]) == ("reconnecting", 1, 0.0), first
    second = client.next()   # A refuses: B, at once
    assert (second["type"], second["attempt"], second["delay"]) == ("reconnecting", 2, 0.0), second
    assert second["text"].startswith(f"127.0.0.1:{a.port}: "), second
    connected = client.next()
    assert (connected["type"], connected["server"]) == ("connected", f"127.0.0.1:{b.port}"), connected
    back = client.expect("reconnected")
    took = time.monotonic() - killed
    in_client = (datetime.fromisoformat(back["time"]) - datetime.fromisoformat(lost["time"])).total_seconds()
    print(f"\nfailover: node killed -> logged in on the next node in {took:.3f} s "
          f"(the client's own clock, connection lost -> reconnected: {in_client:.3f} s)")
    assert back["user"] == name and back["lost_chat"] == ""
    assert took < FAILOVER_LIMIT
    # It is B that has the session now: someone on B sees it online, and it answers.
    bob = RawUser(b, unique("fob"))
    bob.chat.send("WHO")
    seen = []
    while not (line := bob.chat.line()).startswith("OK WHO"):
        seen.append(line)
    assert f"USER {name} idle" in seen, seen
    client.process.write("/who\n")
    assert {"name": bob.name, "status": "idle"} in client.expect("who")["users"]
    client.process.close_stdin()
    assert [e["type"] for e in client.rest()] == ["logged-out"]
    assert client.process.wait() == 0
    bob.close()


def test_tls_checks_the_name_of_the_entry_in_use(ca, ca_pem, make_server, clients, tmp_path):  # noqa: F811
    """A's certificate names only localhost, B's only 127.0.0.1: each entry
    must be checked for its own host, on all three sockets, also after a
    failover."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    chain_a, key_a = cert_files(ca, tmp_path / "a", "localhost")
    a = make_server(*OPEN, "--tls-cert", chain_a, "--tls-key", key_a)
    chain_b, key_b = cert_files(ca, tmp_path / "b", "127.0.0.1")
    b = make_server(*OPEN, "--tls-cert", chain_b, "--tls-key", key_b, db=a.db)
    name = unique("fot")
    client = clients(a.port, "--host", f"localhost:{a.port},127.0.0.1:{b.port}", "--ca", ca_pem, "--register",
                     "--reconnect", user=name, password="pw secret")
    client.expect(f"logged in as {name}")
    assert client.line("err") == f"connected to localhost:{a.port}"
    a.proc.kill()
    a.proc.wait()
    assert client.line().startswith("connection lost: ")
    expect_start(client, f"reconnected: logged in as {name}; not in a chat")
    assert client.line("err") == f"connected to 127.0.0.1:{b.port}"
    client.write("/who\n")
    assert expect_start(client, "online: ") == f"online: {name} (idle)"
