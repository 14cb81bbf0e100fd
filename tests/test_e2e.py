"""Users as they are: the real server and real ``selchat connect`` processes
in scripted mode, talking over loopback."""

from __future__ import annotations

import os
import signal

import pytest

from tests.support import unique


@pytest.fixture
def pair(server, clients):
    """Two logged-in users (registered now) with their client processes."""

    def start():
        a, b = unique("alice"), unique("bob")
        alice = clients(server.port, "--register", user=a, password="pw alice")
        alice.expect(f"logged in as {a}")
        bob = clients(server.port, "--register", user=b, password="pw bob")
        bob.expect(f"logged in as {b}")
        return a, alice, b, bob

    return start


def chat(a, alice, b, bob):
    alice.write(f"/chat {b}\n")
    alice.expect(f"chat request sent to {b}")
    bob.expect(f"chat request from {a} (answer yes or no)")
    bob.write("yes\n")
    bob.expect(f"chat with {a} started")
    alice.expect(f"chat with {b} started")


def test_register_then_log_in_again_with_the_password(server, clients):
    name = unique("carol")
    first = clients(server.port, "--register", user=name, password="s3cret pass")
    first.expect(f"logged in as {name}")
    first.write("/exit\n")
    assert first.wait() == 0
    again = clients(server.port, user=name.upper(), password="s3cret pass")
    again.expect(f"logged in as {name}")  # the registered spelling comes back
    again.close_stdin()
    assert again.wait() == 0


def test_wrong_password_fails_with_exit_1(server, clients):
    name = unique("dave")
    clients(server.port, "--register", user=name, password="right").expect(f"logged in as {name}")
    wrong = clients(server.port, user=name, password="wrong")
    assert wrong.wait() == 1
    assert "invalid username or password" in "\n".join(wrong.rest("err"))


def test_who_request_accept_messages_both_ways_quit_exit(pair):
    a, alice, b, bob = pair()
    alice.write("/who\n")
    line = alice.line()
    assert line.startswith("online: ") and f"{a} (idle)" in line and f"{b} (idle)" in line
    chat(a, alice, b, bob)
    alice.write("".join(f"from alice {i}\n" for i in range(50)))
    bob.write("".join(f"from bob {i}\n" for i in range(50)))
    assert [bob.line() for _ in range(50)] == [f"[{a}] from alice {i}" for i in range(50)]
    assert [alice.line() for _ in range(50)] == [f"[{b}] from bob {i}" for i in range(50)]
    alice.write("/who\n")
    line = alice.line()
    assert f"{a} (busy)" in line and f"{b} (busy)" in line
    bob.write("/quit\n")
    bob.expect(f"you left the chat with {a}")
    alice.expect(f"chat with {b} ended (quit): {b} ended the chat")
    alice.write("not in a chat now\n")
    alice.expect("not in a chat; /chat NAME to start one")
    alice.write("/exit\n")
    assert alice.wait() == 0
    bob.close_stdin()
    assert bob.wait() == 0


def test_decline(pair):
    a, alice, b, bob = pair()
    alice.write(f"/chat {b}\n")
    bob.expect(f"chat request from {a} (answer yes or no)")
    bob.write("no\n")
    bob.expect(f"you declined {a}'s chat request")
    alice.expect(f"{b} declined your chat request")


def test_busy_offline_unknown_and_self(server, pair, clients):
    a, alice, b, bob = pair()
    chat(a, alice, b, bob)
    gone = unique("gone")
    leaver = clients(server.port, "--register", user=gone, password="pw")
    leaver.expect(f"logged in as {gone}")
    leaver.write("/exit\n")
    assert leaver.wait() == 0
    c = unique("carol")
    carol = clients(server.port, "--register", user=c, password="pw")
    carol.expect(f"logged in as {c}")
    carol.write(f"/chat {a}\n/chat {gone}\n/chat nobody_by_this_name\n/chat {c}\n")
    assert carol.line() == f"error: {a} is busy"
    assert carol.line() == f"error: {gone} is not online"
    assert carol.line() == "error: there is no user nobody_by_this_name"
    assert carol.line() == "error: you cannot chat with yourself"


def test_request_expires(make_server, clients):
    srv = make_server("--request-timeout", "0.5")
    a, b = unique("alice"), unique("bob")
    alice = clients(srv.port, "--register", user=a, password="pw")
    alice.expect(f"logged in as {a}")
    bob = clients(srv.port, "--register", user=b, password="pw")
    bob.expect(f"logged in as {b}")
    alice.write(f"/chat {b}\n")
    bob.expect(f"chat request from {a} (answer yes or no)")
    alice.expect(f"chat request with {b} expired")
    bob.expect(f"chat request with {a} expired")


def test_partner_killed_mid_chat_is_reported(pair):
    a, alice, b, bob = pair()
    chat(a, alice, b, bob)
    bob.proc.send_signal(signal.SIGKILL)
    line = alice.line()
    assert line == f"chat with {b} ended (dropped): {b} lost connection"
    alice.write("/who\n")
    assert b not in alice.line()


def test_client_that_stops_answering_pings_is_dropped(make_server, clients):
    srv = make_server("--ping-interval", "0.4", "--ping-timeout", "0.4")
    a, b = unique("alice"), unique("bob")
    alice = clients(srv.port, "--register", "--ping-interval", "0.2", user=a, password="pw")
    alice.expect(f"logged in as {a}")
    # bob's client pings only every 60 s and is then frozen, so it answers nothing
    bob = clients(srv.port, "--register", "--ping-interval", "60", user=b, password="pw")
    bob.expect(f"logged in as {b}")
    chat(a, alice, b, bob)
    os.kill(bob.proc.pid, signal.SIGSTOP)
    try:
        assert alice.line() == f"chat with {b} ended (dropped): {b} stopped answering heartbeats"
    finally:
        os.kill(bob.proc.pid, signal.SIGCONT)
    # bob, woken up, learns why: the server said so before closing
    assert bob.wait() == 3
    assert "disconnected: no answer to PING within 0.4 seconds" in bob.rest()


def test_client_notices_a_dead_server(make_server, clients):
    srv = make_server()
    a = unique("alice")
    alice = clients(srv.port, "--register", "--ping-interval", "0.3", "--ping-timeout", "0.3",
                    user=a, password="pw")
    alice.expect(f"logged in as {a}")
    os.kill(srv.proc.pid, signal.SIGSTOP)  # alive for TCP, answers nothing
    try:
        assert alice.wait() == 3
        assert "connection lost: server not responding" in alice.rest()
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)


def test_server_shutdown_is_reported(make_server, clients):
    srv = make_server()
    a = unique("alice")
    alice = clients(srv.port, "--register", user=a, password="pw")
    alice.expect(f"logged in as {a}")
    assert srv.stop() == 0
    assert alice.wait() == 3
    rest = alice.rest()
    assert "server: the server is shutting down" in rest
    assert "disconnected: the server is shutting down" in rest


def test_shutdown_mid_chat_tells_both_partners_the_same(make_server, clients):
    srv = make_server()
    a, b = unique("alice"), unique("bob")
    alice = clients(srv.port, "--register", user=a, password="pw alice")
    alice.expect(f"logged in as {a}")
    bob = clients(srv.port, "--register", user=b, password="pw bob")
    bob.expect(f"logged in as {b}")
    chat(a, alice, b, bob)
    assert srv.stop() == 0
    assert alice.wait() == bob.wait() == 3
    alice_saw = [line.replace(b, "OTHER") for line in alice.rest()]
    bob_saw = [line.replace(a, "OTHER") for line in bob.rest()]
    assert alice_saw == bob_saw
    assert "chat with OTHER ended (shutdown): the server is shutting down" in alice_saw
    assert not any("connection lost" in line for line in alice_saw), alice_saw
