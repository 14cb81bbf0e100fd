"""The real ``selchat connect`` process in scripted mode, against a fake server.

The fake server follows docs/protocol.md just far enough for one user: it
greets, logs in, attaches, says READY, answers WHO/EXIT/PING, records every
frame it receives, and lets the test push frames or close sockets. Nothing here
sleeps to synchronise: every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time

import pytest
from click.testing import CliRunner

from selchat.client.command import connect
from tests.support import unique

DEADLINE = 10.0


# --- a fake server -----------------------------------------------------------


class FakeServer:
    """A thread with plain blocking sockets speaking the selchat protocol.

    ``frames`` is every (role, line) received, in order; ``wait_for(pred)``
    waits until ``pred()`` is true under the lock. ``send(role, line)`` writes a
    frame on the current session's socket of that role.
    """

    def __init__(self, listener: socket.socket | None = None, users=None, answer_pings=True,
                 answer_exit=True, motd=()):
        self.listener = listener or socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.users = dict(users or {"alice": "secret"})
        self.answer_pings = answer_pings
        self.answer_exit = answer_exit
        self.motd = tuple(motd)   # MOTD lines, sent with READY as the real server does
        self.cond = threading.Condition()
        self.frames: list[tuple[str, str]] = []
        self.socks: dict[str, socket.socket] = {}
        self.accepted = 0
        self.tokens = {"CHAT": "ctok", "CHECK": "ktok"}
        self._user = None
        self._ready_sent = False
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self) -> "FakeServer":
        self.listener.listen()
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)   # stop listening now, and wake accept()
        except OSError:
            pass
        self.listener.close()
        self.close_all()

    # -- for the tests --

    def wait_for(self, predicate, what: str = "condition"):
        with self.cond:
            if not self.cond.wait_for(predicate, DEADLINE):
                raise AssertionError(f"fake server: no {what} within {DEADLINE} s; frames: {self.frames}")
            return predicate()

    def received(self, role: str, line: str) -> bool:
        return (role, line) in self.frames

    def wait_frame(self, role: str, line: str) -> None:
        self.wait_for(lambda: self.received(role, line), f"{role} frame {line!r}")

    def send(self, role: str, line: str) -> None:
        with self.cond:
            sock = self.socks[role]
        sock.sendall(line.encode() + b"\n")

    def close_all(self) -> None:
        with self.cond:
            socks, self.socks = list(self.socks.values()), {}
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    # -- the server --

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.cond:
                self.accepted += 1
                self.cond.notify_all()
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        role = "fresh"
        try:
            sock.sendall(b"HELLO 1 selchat/fake\n")
            for raw in sock.makefile("rb"):
                line = raw.decode().rstrip("\r\n")
                with self.cond:
                    self.frames.append((role, line))
                    self.cond.notify_all()
                role = self._handle(sock, role, line) or role
        except OSError:
            pass  # reset or closed by close_all(): the end of this connection
        with self.cond:
            self.frames.append((role, "<EOF>"))
            self.cond.notify_all()

    def _handle(self, sock, role, line):
        verb, _, rest = line.partition(" ")
        if role == "fresh" and verb in ("LOGIN", "REGISTER"):
            user, _, password = rest.partition(" ")
            if self.users.get(user) != password:
                sock.sendall(b"ERR LOGIN auth-failed invalid username or password\n")
                return None
            self._user = user
            with self.cond:
                self._ready_sent = False
            self._register("LOGIN", sock)
            sock.sendall(f"WELCOME {user} ctok ktok\n".encode())
            return "LOGIN"
        if role == "fresh" and verb == "ATTACH":
            which, _, token = rest.partition(" ")
            if self.tokens.get(which) != token:
                sock.sendall(b"ERR ATTACH bad-token invalid or expired token\n")
                return None
            self._register(which, sock)
            sock.sendall(f"OK ATTACH {which}\n".encode())
            with self.cond:
                # both attach threads may see both sockets: READY goes out once
                ready = "CHAT" in self.socks and "CHECK" in self.socks and not self._ready_sent
                self._ready_sent = self._ready_sent or ready
            if ready:
                self.send("LOGIN", "\n".join([f"READY {self._user}", *(f"MOTD {m}".rstrip() for m in self.motd)]))
            return which
        if role == "CHAT" and line == "WHO":
            sock.sendall(f"USER {self._user} idle\nOK WHO 1\n".encode())
        elif role == "CHAT" and line == "EXIT" and self.answer_exit:
            sock.sendall(b"OK EXIT\n")
            self.send("LOGIN", "BYE exit goodbye")
            self.close_all()
        elif role == "CHECK" and verb == "PING" and self.answer_pings:
            sock.sendall(f"PONG {rest}".rstrip().encode() + b"\n")
        return None

    def _register(self, role, sock) -> None:
        with self.cond:
            self.socks[role] = sock
            self.cond.notify_all()


@pytest.fixture
def fake():
    server = FakeServer().start()
    yield server
    server.stop()


def _refused_port() -> socket.socket:
    """A socket bound to a free port but not listening: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


# --- tests -----------------------------------------------------------------------


def test_login_then_ready_prints_logged_in(fake, clients):
    client = clients(fake.port)
    client.expect("logged in as alice")
    fake.wait_frame("fresh", "LOGIN alice secret")
    fake.wait_frame("fresh", "ATTACH CHAT ctok")
    fake.wait_frame("fresh", "ATTACH CHECK ktok")


def test_wrong_password_exits_1_with_message_on_stderr(fake, clients):
    client = clients(fake.port, password="wrong")
    assert client.wait() == 1
    assert "login failed: invalid username or password" in client.rest("err")
    assert client.rest("out") == []


def test_scripted_without_password_env_is_a_clear_error(fake, clients):
    client = clients(fake.port, password=None)
    assert client.wait() == 1
    assert any("SELCHAT_PASSWORD" in line for line in client.rest("err"))
    assert fake.accepted == 0


def test_unreachable_exits_2(clients):
    with _refused_port() as closed:
        port = closed.getsockname()[1]
        client = clients(port)
        assert client.wait() == 2
        err = client.rest("err")
    assert len(err) == 1 and err[0].startswith(f"cannot reach 127.0.0.1:{port}: "), err


def test_retry_1_tries_twice_then_exits_2(clients):
    with _refused_port() as closed:
        client = clients(closed.getsockname()[1], "--retry", "1")
        assert client.wait() == 2
        err = client.rest("err")
    assert [line.split(":")[0] for line in err] == ["cannot reach 127.0.0.1", "retrying in 1 s",
                                                    "cannot reach 127.0.0.1"], err


def test_retry_reaches_a_server_that_came_up_in_between(clients):
    listener = _refused_port()
    client = clients(listener.getsockname()[1], "--retry", "1")
    assert client.line("err").startswith("cannot reach")
    assert client.line("err") == "retrying in 1 s"
    server = FakeServer(listener).start()   # the second try finds it listening
    try:
        client.expect("logged in as alice")
    finally:
        server.stop()


def test_eof_on_stdin_sends_exit_and_exits_0(fake, clients):
    client = clients(fake.port)
    client.expect("logged in as alice")
    client.close_stdin()
    assert client.wait() == 0
    fake.wait_frame("CHAT", "EXIT")
    assert client.rest("out") == ["logged out"]


def test_slash_exit_exits_0(fake, clients):
    client = clients(fake.port)
    client.expect("logged in as alice")
    client.write("/exit\n")
    assert client.wait() == 0
    fake.wait_frame("CHAT", "EXIT")


def test_eof_leaves_within_a_bound_when_the_server_never_answers_exit(clients):
    server = FakeServer(answer_exit=False).start()
    try:
        client = clients(server.port)
        client.expect("logged in as alice")
        started = time.monotonic()
        client.close_stdin()
        assert client.wait() == 0
        assert time.monotonic() - started < 5
        assert server.received("CHAT", "EXIT")
        assert client.rest("out") == ["logged out"]
    finally:
        server.stop()


def test_sigterm_logs_out_cleanly(fake, clients):
    client = clients(fake.port)
    client.expect("logged in as alice")
    client.proc.send_signal(signal.SIGTERM)
    assert client.wait() == 0
    assert fake.received("CHAT", "EXIT")


def test_stdin_from_a_regular_file(fake, clients, tmp_path):
    script = tmp_path / "script.txt"
    script.write_text("/who\n")
    with open(script) as stdin:
        client = clients(fake.port, stdin=stdin)
        assert client.wait() == 0
    assert client.rest("out") == ["logged in as alice", "online: alice (idle)", "logged out"]
    assert fake.received("CHAT", "WHO") and fake.received("CHAT", "EXIT")


def test_server_closing_the_sockets_exits_3(fake, clients):
    client = clients(fake.port)
    client.expect("logged in as alice")
    fake.close_all()
    assert client.wait() == 3
    out = client.rest("out")
    assert len(out) == 1 and out[0].startswith("connection lost: the server closed the "), out


def test_bye_is_reported_and_exits_3(fake, clients):
    client = clients(fake.port)
    client.expect("logged in as alice")
    fake.send("LOGIN", "BYE replaced logged in from another client")
    fake.close_all()
    assert client.wait() == 3
    assert client.rest("out") == ["disconnected: logged in from another client"]


def test_answers_server_ping_and_sends_its_own(fake, clients):
    client = clients(fake.port, "--ping-interval", "0.1")
    client.expect("logged in as alice")
    fake.send("CHECK", "PING 7")
    fake.wait_frame("CHECK", "PONG 7")
    fake.wait_frame("CHECK", "PING 1")


def test_silent_server_is_noticed_and_exits_3(clients):
    server = FakeServer(answer_pings=False).start()
    try:
        client = clients(server.port, "--ping-interval", "0.2", "--ping-timeout", "0.3")
        client.expect("logged in as alice")
        assert client.wait() == 3
        assert client.rest("out") == ["connection lost: server not responding"]
        assert server.received("CHECK", "PING 1")
    finally:
        server.stop()


def test_a_whole_chat(fake, clients):
    client = clients(fake.port)
    client.expect("logged in as alice")
    client.write("hello?\n")
    client.expect("not in a chat; /chat NAME to start one")
    fake.send("LOGIN", "REQUEST bob")
    client.expect("chat request from bob (answer yes or no)")
    client.write("yes\n")
    fake.wait_frame("CHAT", "ACCEPT")
    fake.send("CHAT", "OK ACCEPT bob")
    fake.send("LOGIN", "STARTED bob")
    client.expect("chat with bob started")
    client.write("hi bob\n")
    fake.wait_frame("CHAT", "MSG hi bob")
    fake.send("LOGIN", "MSG bob hi alice")
    client.expect("[bob] hi alice")
    client.write("second\n")
    fake.wait_frame("CHAT", "MSG second")
    fake.send("CHAT", "NACK 2 not-in-chat you are not in a chat")
    client.expect("not delivered: 'second' (you are not in a chat)")
    fake.send("LOGIN", "ENDED bob quit bob left the chat")
    client.expect("chat with bob ended (quit): bob left the chat")
    client.write("/nonsense\n")
    client.expect("error: unknown command /nonsense; /help lists the commands")
    assert ("CHAT", "MSG hello?") not in fake.frames


def test_register_sends_register(fake, clients):
    fake.users["carol"] = "pw carol"
    client = clients(fake.port, "--register", user="carol", password="pw carol")
    client.expect("logged in as carol")
    fake.wait_frame("fresh", "REGISTER carol pw carol")


# --- reconnecting (--reconnect) ----------------------------------------------------------

RECONNECTING = re.compile(r"reconnecting in \d+\.\d s \(attempt (\d+)\): (.+)")


def expect_attempt(client, attempt: int) -> str:
    """The next line is reconnect attempt ``attempt``; its reason."""
    line = client.line()
    match = RECONNECTING.fullmatch(line or "")
    assert match and int(match.group(1)) == attempt, f"expected attempt {attempt}, got {line!r}"
    return match.group(2)


def test_without_reconnect_scripted_mode_exits_3_as_before(fake, clients):
    client = clients(fake.port)
    client.expect("logged in as alice")
    fake.send("LOGIN", "STARTED bob")
    client.expect("chat with bob started")
    fake.close_all()
    assert client.wait() == 3
    assert [line.split(":")[0] for line in client.rest()] == ["connection lost"]


def test_reconnect_logs_in_again_and_says_the_chat_was_lost(fake, clients):
    client = clients(fake.port, "--reconnect", "--register")
    client.expect("logged in as alice")
    fake.send("LOGIN", "STARTED bob")
    client.expect("chat with bob started")
    fake.close_all()
    assert client.line().startswith("connection lost: the server closed the ")
    assert client.line() == "chat with bob ended: the connection was lost"
    expect_attempt(client, 1)
    assert client.line() == ("reconnected: logged in as alice; not in a chat (the chat with bob ended when "
                             "the connection was lost; /chat bob asks again)")
    # registered once; the second time it logs in to the account it made
    logins = [line for role, line in fake.frames if role == "fresh" and line.endswith("alice secret")]
    assert logins == ["REGISTER alice secret", "LOGIN alice secret"]
    client.write("/who\n")   # and it is a working session again
    client.expect("online: alice (idle)")


def test_reconnect_tries_again_one_line_per_attempt_until_the_server_is_back(clients):
    first = FakeServer().start()
    port = first.port
    client = clients(port, "--reconnect")
    client.expect("logged in as alice")
    first.stop()   # the port refuses connections from now on
    assert client.line().startswith("connection lost: ")
    expect_attempt(client, 1)
    assert expect_attempt(client, 2) == "Connection refused"
    second = FakeServer(socket.create_server(("127.0.0.1", port))).start()
    try:
        client.expect("reconnected: logged in as alice; not in a chat")
        second.wait_frame("fresh", "LOGIN alice secret")
    finally:
        second.stop()


def test_end_of_input_while_offline_stops_reconnecting_and_exits_3(clients):
    server = FakeServer().start()
    client = clients(server.port, "--reconnect")
    client.expect("logged in as alice")
    server.stop()
    assert client.line().startswith("connection lost: ")
    expect_attempt(client, 1)
    client.close_stdin()
    assert client.wait() == 3
    assert "stopped reconnecting" in client.rest()


def test_a_takeover_is_final_even_with_reconnect(fake, clients):
    client = clients(fake.port, "--reconnect")
    client.expect("logged in as alice")
    fake.send("LOGIN", "BYE replaced logged in from another client")
    fake.close_all()
    assert client.wait() == 3
    assert client.rest() == ["disconnected: logged in from another client"]
    assert [line for role, line in fake.frames if line.startswith("LOGIN")] == ["LOGIN alice secret"]


def test_timestamps_on_request_in_scripted_mode(fake, clients):
    client = clients(fake.port, "--timestamps", "--timestamp-format", "<%H:%M:%S>")
    line = client.line()
    assert re.fullmatch(r"<\d\d:\d\d:\d\d> logged in as alice", line), line


def test_timestamps_can_show_fractions_of_a_second(fake, clients):
    client = clients(fake.port, "--timestamps", "--timestamp-format", "%H:%M:%S.%f")
    line = client.line()
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{6} logged in as alice", line), line


# --- against the real server ------------------------------------------------------------


def test_two_clients_chat_through_the_real_server(server, clients):
    a, b = unique("a"), unique("b")
    alice = clients(server.port, "--register", user=a, password="pw-alice")
    alice.expect(f"logged in as {a}")
    bob = clients(server.port, "--register", user=b, password="pw-bob")
    bob.expect(f"logged in as {b}")
    alice.write(f"/chat {b}\n")
    alice.expect(f"chat request sent to {b}")
    bob.expect(f"chat request from {a} (answer yes or no)")
    bob.write("yes\n")
    bob.expect(f"chat with {a} started")
    alice.expect(f"chat with {b} started")
    alice.write("hello  bob\n")
    bob.expect(f"[{a}] hello  bob")
    bob.close_stdin()
    assert bob.wait() == 0
    assert bob.rest() == ["logged out"]
    assert alice.line().startswith(f"chat with {b} ended (left): ")
    alice.write("/exit\n")
    assert alice.wait() == 0
    assert alice.rest() == ["logged out"]


# --- options and usage, in process ----------------------------------------------------


def test_help_lists_every_option_with_a_metavar():
    result = CliRunner().invoke(connect, ["--help"])
    assert result.exit_code == 0
    for option in ("--host HOST", "--port PORT", "--user NAME", "--register", "--retry N",
                   "--ping-interval SECONDS", "--ping-timeout SECONDS", "--reconnect / --no-reconnect",
                   "--json", "--color / --no-color", "--bell / --no-bell", "--timestamps / --no-timestamps",
                   "--timestamp-format FORMAT", "--config PATH"):
        assert option in result.output, option


def test_bad_usage_exits_1():
    assert CliRunner().invoke(connect, ["--port", "nope"]).exit_code == 1
    assert CliRunner().invoke(connect, ["--bogus"]).exit_code == 1


def test_scripted_mode_requires_a_user():
    result = CliRunner().invoke(connect, [], env={"SELCHAT_USER": None, "SELCHAT_PASSWORD": "x"})
    assert result.exit_code == 1
    assert "--user" in result.output


def test_invalid_user_name_is_refused_before_connecting():
    result = CliRunner().invoke(connect, ["--user", "no spaces"], env={"SELCHAT_PASSWORD": "x"})
    assert result.exit_code == 1
    assert "not a valid user name" in result.output


def test_motd_follows_logged_in_and_notices_arrive_any_time(clients):
    server = FakeServer(motd=["Welcome to the fake server.", "", "Be kind."]).start()
    try:
        client = clients(server.port)
        assert [client.line() for _ in range(4)] == [
            "logged in as alice", "Welcome to the fake server.", "", "Be kind."]
        server.send("LOGIN", "NOTICE the server restarts at 18:00")
        assert client.line() == "notice: the server restarts at 18:00"
        client.close_stdin()
        assert client.wait() == 0
        assert client.rest("out") == ["logged out"]
    finally:
        server.stop()
