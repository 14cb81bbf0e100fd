"""Virtual users, and getting them ready before any clock starts.

A selchat virtual user opens its login socket, logs in (``LOGIN`` or
``REGISTER``; with protocol version 2, ``VERSION 2`` pipelined before it, as
the selchat client does), opens its chat and check sockets and attaches them, and waits
for ``READY``; a pair then asks and accepts its chat (``CHAT`` / ``REQUEST``
/ ``ACCEPT`` / ``STARTED`` on both sides, and every command's ``OK``). A
baseline user opens one socket and sends ``LOGIN <name>``. All of it runs on
one selector, at most ``concurrency`` users logging in at a time; the check
sockets answer the server's ``PING`` all along.

Setup speed is not measured (except by the idle and login-storm modes, which
time it), so this code is written for clarity, with text lines.
"""

from __future__ import annotations

import selectors
import socket
import time

from selchat.bench import sysinfo
from selchat.bench import BenchError

LOGIN, CHAT, CHECK = "login", "chat", "check"


class SetupError(BenchError):
    pass


def open_socket(address: tuple[str, int], source: str | None) -> socket.socket:
    """A connected TCP socket, bound first to ``source`` (a loopback address) if given.
    IP_BIND_ADDRESS_NO_PORT lets connect() pick the port per 4-tuple, so each
    source address has the whole ephemeral range to itself."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            sock.setsockopt(socket.SOL_IP, sysinfo.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        sock.settimeout(30)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class LineConn:
    """One socket of a virtual user, read as text lines."""

    __slots__ = ("sock", "user", "role", "buf")

    def __init__(self, sock: socket.socket, user: "VUser", role: str):
        self.sock, self.user, self.role = sock, user, role
        self.buf = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def read_lines(self) -> list[str] | None:
        """The complete lines that arrived; None at EOF (or reset)."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        *lines, self.buf = (self.buf + data).split(b"\n")
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]

    def close(self) -> None:
        self.sock.close()


class VUser:
    """One virtual user: its sockets, its partner, and when it got ready."""

    __slots__ = ("name", "partner", "initiator", "login", "chat", "check", "pending", "started",
                 "t_start", "t_ready", "pings", "dropped", "busy", "wire_id", "acked", "counting", "address")

    def __init__(self, name: str, partner: "VUser | None" = None, initiator: bool = False):
        self.name = name
        self.partner, self.initiator = partner, initiator
        self.login = self.chat = self.check = None
        self.pending = 0          # commands sent on the chat socket still waiting for their OK
        self.started = False      # STARTED seen on the login socket
        self.t_start = self.t_ready = 0.0
        self.pings = 0
        self.dropped: str | None = None
        self.busy = 0             # logins refused as busy (sent again)
        self.counting = False     # version 2: WELCOME seen, the login socket's frames are numbered
        self.wire_id = 0          # version 2: frames the login socket got after WELCOME
        self.acked = 0            # version 2: the id in the last ACK sent
        self.address = None       # a cluster: the node this user logs in to (else the Setup's address)

    def conns(self) -> list[LineConn]:
        return [c for c in (self.login, self.chat, self.check) if c is not None]

    @property
    def paired(self) -> bool:
        return self.started and not self.pending

    def close(self) -> None:
        for conn in self.conns():
            conn.close()


def make_pairs(names: list[tuple[str, str]]) -> list[VUser]:
    """Users for pairs ``[(a, b), ...]``, as ``[a0, b0, a1, b1, ...]``; ``a`` asks ``b``."""
    users = []
    for a_name, b_name in names:
        a, b = VUser(a_name, initiator=True), VUser(b_name)
        a.partner, b.partner = b, a
        users += [a, b]
    return users


#: The server queues at most 8 password checks per client address and answers
#: the next login ``ERR LOGIN busy`` (``HASHES_PER_ADDRESS`` in the server).
#: Callers spread their logins over enough source addresses to stay well under
#: it (``sources_for``); a login refused all the same is sent again after
#: ``RETRY_DELAY``, doubling, on the same socket (which the server keeps open),
#: or on a new one every ``RETRIES_PER_SOCKET`` tries (the server closes a
#: socket after 10 frames before login).
LOGINS_PER_SOURCE = 4
RETRY_DELAY = 0.05
RETRIES_PER_SOCKET = 5


def sources_for(concurrency: int, at_least: int = 1) -> int:
    """Source addresses for ``concurrency`` logins at once, none of them busy."""
    return max(at_least, -(-concurrency // LOGINS_PER_SOURCE))


class Setup:
    """Log virtual users in (and pair them) on one selector.

    ``protocol`` is "selchat" or "baseline"; ``verb`` LOGIN or REGISTER;
    ``version`` the selchat protocol version (2: ``VERSION 2`` before the
    login, a resume token in WELCOME, and every frame the login socket gets
    after WELCOME acknowledged with ``ACK <id>`` on the check socket, once
    per read that brought some, as the selchat client does).
    ``run`` returns when every user is ready (and paired, with ``pair=True``);
    afterwards ``poll`` keeps the sockets served (PINGs answered, drops noted)."""

    def __init__(self, protocol: str, address: tuple[str, int], *, password: str = "", verb: str = "LOGIN",
                 sources: list[str | None] = (None,), concurrency: int = 128, strict: bool = True,
                 version: int = 1):
        self.protocol, self.address = protocol, address
        self.version = version if protocol == "selchat" else 1
        self.password, self.verb = password, verb
        self.sources = list(sources)
        self.concurrency = concurrency
        self.strict = strict        # raise on anything unexpected (during setup), else count it
        self.selector = selectors.DefaultSelector()
        self.problems: list[str] = []
        self.pings = 0
        self._opened = 0
        self._logins = 0            # login sockets opened: they take the sources in turn
        self._waiting: list[VUser] = []
        self._in_flight = 0
        self._pair = False
        self._retries: list[tuple[float, VUser]] = []  # (when, user): logins to send again
        self.busy = 0               # logins the server asked us to retry ("ERR LOGIN busy")

    # -- driving --------------------------------------------------------------------

    def run(self, users: list[VUser], pair: bool = False, timeout: float = 120.0) -> None:
        self._pair = pair
        self._waiting = list(reversed(users))
        deadline = time.monotonic() + timeout
        self._launch()
        while not self._done(users):
            if time.monotonic() > deadline:
                ready = sum(1 for u in users if u.t_ready)
                raise SetupError(f"setup took over {timeout:.0f} s: {ready}/{len(users)} users ready")
            self.poll(1.0)

    def _done(self, users: list[VUser]) -> bool:
        if self._waiting or self._in_flight:
            return False
        return not self._pair or all(u.paired for u in users)

    def poll(self, timeout: float) -> None:
        """Serve whatever arrived within ``timeout``."""
        if self._retries:
            timeout = max(0.0, min(timeout, self._retries[0][0] - time.monotonic()))
        for key, _ in self.selector.select(timeout):
            conn = key.data
            lines = conn.read_lines()
            if lines is None:
                self.selector.unregister(conn.sock)
                self._problem(conn, "connection closed")
                continue
            for line in lines:
                self._on_line(conn, line)
            user = conn.user
            if conn.role == LOGIN and user.wire_id > user.acked and user.check is not None:
                # Version 2, during setup: every read acknowledged at once (the
                # timed windows batch them as the client does, flows.py). The
                # check socket's ATTACH went first on it, so the server has it.
                user.acked = user.wire_id
                user.check.send(f"ACK {user.wire_id}")
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            _, user = self._retries.pop(0)
            if user.busy % RETRIES_PER_SOCKET == 0:
                self.selector.unregister(user.login.sock)
                user.login.close()
                user.login = self._open(user, LOGIN)
                self._send_login(user, fresh=True)
            else:
                self._send_login(user)

    def release(self) -> None:
        """Stop serving these sockets here (another loop takes them over)."""
        self.selector.close()

    # -- users ------------------------------------------------------------------------

    def _launch(self) -> None:
        while self._waiting and self._in_flight < self.concurrency:
            user = self._waiting.pop()
            self._in_flight += 1
            user.t_start = time.monotonic()
            user.login = self._open(user, LOGIN)
            self._send_login(user, fresh=True)

    def _send_login(self, user: VUser, fresh: bool = False) -> None:
        """The login frame; on a ``fresh`` socket with version 2, ``VERSION 2``
        pipelined before it (one send: the server answers VERSION first)."""
        if self.protocol == "baseline":
            user.login.send(f"LOGIN {user.name}")
        elif fresh and self.version >= 2:
            user.login.send(f"VERSION {self.version}\n{self.verb} {user.name} {self.password}")
        else:
            user.login.send(f"{self.verb} {user.name} {self.password}")

    def _open(self, user: VUser, role: str) -> LineConn:
        if role == LOGIN:  # logins spread evenly, whatever else is opened in between
            source = self.sources[self._logins % len(self.sources)]
            self._logins += 1
        else:
            source = self.sources[self._opened % len(self.sources)]
            self._opened += 1
        conn = LineConn(open_socket(user.address or self.address, source), user, role)
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        return conn

    def _ready(self, user: VUser) -> None:
        user.t_ready = time.monotonic()
        self._in_flight -= 1
        self._launch()
        partner = user.partner
        if self._pair and partner is not None and partner.t_ready and self.protocol == "selchat":
            asker, target = (user, partner) if user.initiator else (partner, user)
            asker.pending += 1
            asker.chat.send(f"CHAT {target.name}")
        elif self._pair and self.protocol == "baseline":
            user.started = True  # a bare relay has no chats: logged in is paired

    # -- frames -----------------------------------------------------------------------

    def _on_line(self, conn: LineConn, line: str) -> None:
        user = conn.user
        verb, _, rest = line.partition(" ")
        if verb == "HELLO" or not line:
            return
        if conn.role == LOGIN and user.counting and verb != "BYE":
            user.wire_id += 1  # version 2: every frame after WELCOME has an id
        if conn.role == CHECK:
            if verb == "PING":
                conn.send(f"PONG {rest}".rstrip())
                user.pings += 1
                self.pings += 1
                return
            if line == "OK ATTACH CHECK":
                user.pending -= 1
                return
        elif conn.role == CHAT:
            if verb == "OK":
                user.pending -= 1
                return
        elif self.protocol == "baseline":
            if verb == "WELCOME":
                self._ready(user)
                return
        elif line == f"OK VERSION {self.version}" and self.version >= 2:
            return
        elif verb == "WELCOME":
            fields = line.split()
            if self.version >= 2:
                if len(fields) != 5:
                    self._problem(conn, f"no resume token in {line[:120]!r}")
                    return
                user.counting = True
            _, user.name, chat_token, check_token = fields[:4]
            user.chat = self._open(user, CHAT)
            user.check = self._open(user, CHECK)
            user.pending += 2
            user.chat.send(f"ATTACH CHAT {chat_token}")
            user.check.send(f"ATTACH CHECK {check_token}")
            return
        elif verb == "READY":
            self._ready(user)
            return
        elif line.startswith(f"ERR {self.verb} busy "):
            # The server's password queue for this address is full: it keeps
            # the socket open and asks us to try again in a moment.
            self.busy += 1
            user.busy += 1
            self._retries.append((time.monotonic() + RETRY_DELAY * 2 ** min(user.busy - 1, 5), user))
            self._retries.sort(key=lambda retry: retry[0])
            return
        elif verb == "REQUEST" and user.partner is not None and rest == user.partner.name:
            user.pending += 1
            user.chat.send("ACCEPT")
            return
        elif verb == "STARTED":
            user.started = True
            return
        self._problem(conn, f"unexpected {line[:120]!r}")

    def _problem(self, conn: LineConn, what: str) -> None:
        user = conn.user
        text = f"{user.name} ({conn.role} socket): {what}"
        if self.strict:
            raise SetupError(text)
        if user.dropped is None:
            user.dropped = text
        if len(self.problems) < 20:
            self.problems.append(text)
