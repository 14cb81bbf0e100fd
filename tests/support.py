"""Real servers and line-based sockets for the tests: no sleeps, only deadlines."""

from __future__ import annotations

import collections
import itertools
import os
import queue
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEADLINE = 10.0  # seconds any single expectation may take before the test fails
_names = itertools.count(1)
REPO_ROOT = Path(__file__).resolve().parent.parent
_EMPTY_CONFIG_HOME = tempfile.mkdtemp(prefix="selchat-test-config-")
CLIENT = [sys.executable, "-m", "selchat.cli", "connect"]


def unique(prefix: str = "u") -> str:
    return f"{prefix}{os.getpid() % 10000}x{next(_names)}"


def wait_for(condition, what: str, timeout: float = DEADLINE):
    """Poll ``condition`` until it returns something true (for state without
    an event to wait on), within the deadline; returns what it returned."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)  # polling interval; the condition ends the wait
    return result


def read_line_from(stream, timeout: float) -> str | None:
    """One line from a pipe, or None at EOF; AssertionError past the deadline."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no line within {timeout} s")
    finally:
        sel.close()
    line = stream.readline()
    return line.rstrip("\n") if line else None


class ServerProcess:
    """``selchat serve`` on a free port, as a real process."""

    def __init__(self, tmp_path, *args: str, db: str | None = None, preexec_fn=None):
        self.db = db or str(tmp_path / "accounts.db")
        cmd = [sys.executable, "-m", "selchat.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--db", self.db, "--scrypt-n", "16",
               # every test registers its users from 127.0.0.1: a test of the limit sets its own
               "--registrations-per-hour", "0", *args]
        self.log_path = tmp_path / f"server-{next(_names)}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
                                     preexec_fn=preexec_fn)
        line = read_line_from(self.proc.stdout, DEADLINE)
        if not line or "listening on" not in line:
            log = self.log()
            self.stop()
            raise AssertionError(f"server did not start: {line!r}\n{log}")
        self.host, port = line.split("listening on ")[1].split()[0].rsplit(":", 1)
        self.port = int(port)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = DEADLINE) -> str:
        """The log once it contains ``text``: a background thread writes it,
        so a line may land a moment after the event it tells of."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{log}"
            assert time.monotonic() < deadline, f"{text!r} not in the log:\n{log}"
            time.sleep(0.02)  # polling interval; the condition ends the wait
        return log

    def wait_for_log_count(self, text: str, count: int, timeout: float = DEADLINE) -> str:
        """The log once ``text`` is in it ``count`` times (see wait_for_log)."""
        deadline = time.monotonic() + timeout
        while (log := self.log()).count(text) < count:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{log}"
            assert time.monotonic() < deadline, f"{text!r} {log.count(text)} times, not {count}, in the log"
            time.sleep(0.02)  # polling interval; the condition ends the wait
        return log

    client_tls = None  # an ssl.SSLContext when the server speaks TLS

    def connect(self) -> "LineSocket":
        return LineSocket(self.host, self.port, tls=self.client_tls)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("server did not stop in time")
        finally:
            self._log.close()


class LineSocket:
    """A client socket speaking frames by hand, like nc."""

    def __init__(self, host: str, port: int, hello: bool = True, tls=None, source: str | None = None):
        # ``source``: connect from this local address (127.0.0.2 ... are all
        # loopback on Linux), to look like another client machine.
        self.sock = socket.create_connection((host, port), timeout=DEADLINE,
                                             source_address=(source, 0) if source else None)
        # Frames go out at once, as a chat client's should (Nagle would hold
        # a small write until the previous one is acknowledged: up to 40 ms).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""
        self.lines: collections.deque[str] = collections.deque()
        self.eof = False
        if hello:
            greeting = self.line()
            assert greeting.startswith("HELLO 2 selchat/"), greeting

    @classmethod
    def wrap(cls, sock: socket.socket) -> "LineSocket":
        """A LineSocket over an already connected socket (nothing read yet)."""
        self = cls.__new__(cls)
        self.sock, self.buf, self.eof = sock, b"", False
        self.lines = collections.deque()
        return self

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(line + "\n" for line in lines).encode())

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, timeout: float = DEADLINE) -> str | None:
        """The next frame, or None if the server closed the socket."""
        deadline = time.monotonic() + timeout
        while not self.lines:
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no frame within {timeout} s (have {self.buf!r})")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(262144)
            except socket.timeout:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                if self.buf:
                    self.lines.append(self.buf.decode())
                    self.buf = b""
                continue
            *complete, self.buf = (self.buf + data).split(b"\n")
            self.lines.extend(line.decode() for line in complete)
        return self.lines.popleft()

    def expect(self, prefix: str, timeout: float = DEADLINE) -> str:
        line = self.line(timeout)
        assert line is not None and line.startswith(prefix), f"expected {prefix!r}, got {line!r}"
        return line

    def expect_closed(self, timeout: float = DEADLINE) -> list[str]:
        """Read until the server closes; returns the frames seen on the way."""
        seen = []
        while (line := self.line(timeout)) is not None:
            seen.append(line)
        return seen

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        """Close with a reset (RST), as a lost network or a killed host does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class RawUser:
    """One user's three sockets, driven frame by frame."""

    def __init__(self, server: ServerProcess, name: str | None = None, password: str = "pw secret",
                 register: bool = True, check: bool = True):
        self.name = name or unique()
        self.login = server.connect()
        self.login.send(f"{'REGISTER' if register else 'LOGIN'} {self.name} {password}")
        welcome = self.login.expect("WELCOME ")
        _, self.name, self.chat_token, self.check_token = welcome.split()
        self.chat = server.connect()
        self.chat.send(f"ATTACH CHAT {self.chat_token}")
        self.chat.expect("OK ATTACH CHAT")
        self.check = None
        if check:
            self.check = server.connect()
            self.check.send(f"ATTACH CHECK {self.check_token}")
            self.check.expect("OK ATTACH CHECK")
            self.login.expect(f"READY {self.name}")

    def expect(self, prefix: str, timeout: float = DEADLINE) -> str:
        """The next login-socket frame, which must start with ``prefix`` (as ``V2User.expect``)."""
        return self.login.expect(prefix, timeout)

    def sockets(self):
        return [s for s in (self.login, self.chat, self.check) if s is not None]

    def close(self) -> None:
        for s in self.sockets():
            s.close()


def start_chat(a: "RawUser | V2User", b: "RawUser | V2User") -> None:
    """``a`` asks ``b`` for a chat, which accepts (either may speak version 1 or 2)."""
    a.chat.send(f"CHAT {b.name}")
    a.chat.expect(f"OK CHAT {b.name}")
    b.expect(f"REQUEST {a.name}")
    b.chat.send("ACCEPT")
    b.chat.expect(f"OK ACCEPT {a.name}")
    a.expect(f"STARTED {b.name}")
    b.expect(f"STARTED {a.name}")


class V2User:
    """One user's three sockets speaking protocol version 2, frame by frame.

    ``event()`` reads the next login-socket frame and counts its id
    (``last_id``), as a v2 client must; ``ack()`` acknowledges them all on the
    check socket. ``cut()`` resets all three sockets (a dropped connection);
    ``resume()`` opens new ones with RESUME. ``connect`` opens a LineSocket
    (the server's, or a fault proxy's).
    """

    def __init__(self, connect, name: str | None = None, password: str = "pw secret", register: bool = True):
        self.connect = connect
        self.name = name or unique()
        self.last_id = 0
        self.login = connect()
        self.login.send("VERSION 2", f"{'REGISTER' if register else 'LOGIN'} {self.name} {password}")
        self.login.expect("OK VERSION 2")
        _, self.name, chat_token, check_token, self.token = self.login.expect("WELCOME ").split()
        self._attach(chat_token, check_token)
        assert self.event() == f"READY {self.name}"

    def _attach(self, chat_token: str, check_token: str) -> None:
        self.chat = self.connect()
        self.chat.send(f"ATTACH CHAT {chat_token}")
        self.chat.expect("OK ATTACH CHAT")
        self.check = self.connect()
        self.check.send(f"ATTACH CHECK {check_token}")
        self.check.expect("OK ATTACH CHECK")

    def event(self, timeout: float = DEADLINE) -> str | None:
        line = self.login.line(timeout)
        if line is not None and not line.startswith("BYE "):
            self.last_id += 1
        return line

    def expect(self, prefix: str, timeout: float = DEADLINE) -> str:
        line = self.event(timeout)
        assert line is not None and line.startswith(prefix), f"expected {prefix!r}, got {line!r}"
        return line

    def ack(self) -> None:
        self.check.send(f"ACK {self.last_id}")

    def cut(self) -> None:
        """Reset all three sockets, as a lost network does."""
        for s in (self.login, self.chat, self.check):
            s.abort()

    def resume(self, last_id: int | None = None, messages: int | None = None) -> int:
        """RESUME on new sockets (saying how many chat messages arrived, if
        ``messages`` is given); returns the server's accepted seq."""
        self.login = self.connect()
        count = "" if messages is None else f" {messages}"
        self.login.send(f"RESUME {self.token} {self.last_id if last_id is None else last_id}{count}")
        _, user, accepted, last, chat_token, check_token = self.login.expect("RESUMED ").split()
        assert user == self.name
        self.last_id = int(last)
        self._attach(chat_token, check_token)
        return int(accepted)


class Canary:
    """Two users chatting; ``check()`` proves the chat still works, in order."""

    def __init__(self, server):
        self.alice, self.bob = RawUser(server), RawUser(server)
        start_chat(self.alice, self.bob)
        self.sent = 0

    def check(self, count: int = 3) -> None:
        first = self.sent
        self.alice.chat.send(*[f"MSG canary {first + i}" for i in range(count)])
        self.sent += count
        for i in range(count):
            assert self.bob.login.line() == f"MSG {self.alice.name} canary {first + i}"


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class ClientProcess:
    """``selchat connect`` as a child process; its output read line by line with deadlines."""

    def __init__(self, port: int, *args: str, password: str | None = "secret", stdin=subprocess.PIPE,
                 user: str = "alice"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SELCHAT_")}
        env["XDG_CONFIG_HOME"] = _EMPTY_CONFIG_HOME  # a developer's own config must not leak in
        if password is not None:
            env["SELCHAT_PASSWORD"] = password
        cmd = [*CLIENT, "--port", str(port), *args]
        if user:
            cmd += ["--user", user]
        self.proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, cwd=REPO_ROOT, text=True)
        self.out: queue.Queue = queue.Queue()
        self.err: queue.Queue = queue.Queue()
        self.seen = {"out": [], "err": []}
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream, q) -> None:
        for line in stream:
            q.put(line.rstrip("\n"))
        stream.close()  # here, not in kill(): closing it under this loop makes it fail
        q.put(None)

    def line(self, which: str = "out") -> str | None:
        """The next line of stdout (or stderr); None at EOF; fails after the deadline."""
        q = self.out if which == "out" else self.err
        try:
            line = q.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no line on std{which} within {DEADLINE} s; seen: {self.seen}") from None
        self.seen[which].append(line)
        return line

    def expect(self, wanted: str, which: str = "out") -> None:
        """Read lines until ``wanted``; fail if the stream ends first."""
        while True:
            line = self.line(which)
            if line == wanted:
                return
            if line is None:
                raise AssertionError(f"std{which} ended without {wanted!r}; seen: {self.seen}")

    def rest(self, which: str = "out") -> list[str]:
        """All remaining lines of a stream, up to its EOF."""
        lines = []
        while (line := self.line(which)) is not None:
            lines.append(line)
        return lines

    def write(self, text: str) -> None:
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def wait(self) -> int:
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"client did not exit within {DEADLINE} s; seen: {self.seen}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin:  # stdout and stderr are closed by their pumps, at EOF
            try:
                self.proc.stdin.close()
            except OSError:
                pass
