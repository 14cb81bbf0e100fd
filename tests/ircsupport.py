"""A selchat server with its IRC front end, and a raw IRC client: no sleeps, only deadlines."""

from __future__ import annotations

import base64
import collections
import socket
import threading
import time

from selchat.irc.protocol import Message, parse
from tests.support import DEADLINE, ServerProcess, unique


class IrcServer(ServerProcess):
    """``selchat serve --irc-port 0``: ``irc_port`` is the port it printed
    (and ``irc_tls_port`` with ``--irc-tls-port 0`` among ``args``)."""

    def __init__(self, tmp_path, *args: str, **kwargs):
        super().__init__(tmp_path, "--irc-port", "0", *args, **kwargs)
        ports = {}
        try:
            for _ in range(1 + ("--irc-tls-port" in args)):
                line = next_stdout_line(self.proc.stdout)
                assert line and line.startswith("IRC clients: "), line
                ports[line.split()[3]] = int(line.split()[2].rsplit(":", 1)[1])  # (plaintext) or (TLS)
        except BaseException:
            self.stop()  # nothing left running
            raise
        self.irc_port = ports["(plaintext)"]
        self.irc_tls_port = ports.get("(TLS)")

    def irc(self) -> "IrcClient":
        return IrcClient(self.host, self.irc_port)


def next_stdout_line(stream) -> str:
    """The next line of the server's stdout. ``read_line_from`` would wait on
    the pipe, but the line may already sit in the stream's buffer (it came
    with the "listening on" line), so read it on a thread, with a deadline."""
    box: list = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(DEADLINE)
    assert box, f"no line from the server within {DEADLINE} s"
    return box[0].rstrip("\n")


def irc_user_asks(client: "IrcClient", nick: str, raw) -> None:
    """The IRC user (nick ``nick``) asks ``raw`` (a selchat-protocol user)
    through the service; ``raw`` accepts; both are told the chat started."""
    client.send(f"PRIVMSG selchat :chat {raw.name}")
    assert client.notice().startswith(f"chat request sent to {raw.name}")
    raw.login.expect(f"REQUEST {nick}")
    raw.chat.send("ACCEPT")
    raw.chat.expect(f"OK ACCEPT {nick}")
    raw.login.expect(f"STARTED {nick}")
    assert client.notice().startswith(f"chat with {raw.name} started")


def make_account(server: ServerProcess, name: str | None = None, password: str = "pw secret") -> str:
    """Create an account (REGISTER, then let the half-made session go)."""
    name = name or unique("i")
    login = server.connect()
    login.send(f"REGISTER {name} {password}")
    login.expect(f"WELCOME {name} ")
    login.close()
    return name


class IrcClient:
    """One IRC connection spoken line by line; ``msg()`` parses the next line."""

    def __init__(self, host: str, port: int, tls=None):
        self.sock = socket.create_connection((host, port), timeout=DEADLINE)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""
        self.lines: collections.deque[bytes] = collections.deque()
        self.eof = False
        self.nick = "*"

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(line + "\r\n" for line in lines).encode())

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def raw(self, timeout: float = DEADLINE) -> bytes | None:
        """The next line's bytes (CR LF stripped), or None once the server closed."""
        deadline = time.monotonic() + timeout
        while not self.lines:
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line within {timeout} s (have {self.buf!r})")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                continue
            *complete, self.buf = (self.buf + data).split(b"\r\n")
            self.lines.extend(complete)
        return self.lines.popleft()

    def msg(self, timeout: float = DEADLINE) -> Message | None:
        line = self.raw(timeout)
        if line is None:
            return None
        assert len(line) + 2 <= 512, f"line over 512 bytes: {line!r}"
        return parse(line.decode("utf-8"))

    def expect(self, command: str, *params: str, timeout: float = DEADLINE) -> Message:
        """The next message: its command, and its first params if given."""
        msg = self.msg(timeout)
        assert msg is not None, f"closed; expected {command} {params}"
        assert msg.command == command and msg.params[:len(params)] == params, \
            f"expected {command} {params}, got {msg}"
        return msg

    def until(self, command: str, *params: str, timeout: float = DEADLINE) -> tuple[Message, list[Message]]:
        """Skip to the next message with this command (and first params);
        returns it and the messages skipped on the way."""
        skipped = []
        while True:
            msg = self.msg(timeout)
            assert msg is not None, f"closed before {command} {params}; saw {skipped}"
            if msg.command == command and msg.params[:len(params)] == params:
                return msg, skipped
            skipped.append(msg)

    def notice(self, timeout: float = DEADLINE) -> str:
        """The next message, which must be a NOTICE from the service; its text."""
        msg = self.expect("NOTICE", timeout=timeout)
        assert msg.source == "selchat!service@irc.selchat", msg
        return msg.params[1]

    def expect_closed(self, timeout: float = DEADLINE) -> list[Message]:
        seen = []
        while (msg := self.msg(timeout)) is not None:
            seen.append(msg)
        return seen

    def register(self, nick: str, password: str | None = "pw secret") -> list[Message]:
        """PASS, NICK, USER; returns the burst up to the service's greeting."""
        if password is not None:
            self.send(f"PASS :{password}")
        self.send(f"NICK {nick}", f"USER {nick} 0 * :{nick} real")
        return self.welcome()

    def register_sasl(self, account: str, password: str = "pw secret", nick: str | None = None) -> list[Message]:
        self.send("CAP LS 302", f"NICK {nick or account}", f"USER {account} 0 * :real")
        assert self.expect("CAP").params[1:] == ("LS", "sasl=PLAIN")
        self.send("CAP REQ :sasl")
        assert self.expect("CAP").params[1:] == ("ACK", "sasl")
        self.send("AUTHENTICATE PLAIN")
        self.expect("AUTHENTICATE", "+")
        self.send("AUTHENTICATE " + base64.b64encode(f"{account}\0{account}\0{password}".encode()).decode())
        self.expect("900")
        self.expect("903")
        self.send("CAP END")
        return self.welcome()

    def welcome(self) -> list[Message]:
        first, skipped = self.until("001")
        assert not skipped, skipped
        self.nick = first.params[0]
        burst = [first]
        while True:
            msg = self.msg()
            assert msg is not None, burst
            burst.append(msg)
            if msg.command == "NOTICE" and msg.params[1].startswith("logged in as "):
                return burst

    def close(self) -> None:
        self.sock.close()
