"""The client loop: one thread, asyncio, three sockets, one ``ClientSession``.

asyncio is used as a plain single-threaded reactor (prompt_toolkit runs on it):
each socket is a non-blocking ``Transport`` registered with ``loop.add_reader``
that writes through its own buffer, asking for ``add_writer`` only while
something is buffered. Everything the session decides comes back as effects
(``core.Send``, ``Connect``, ``Close``, ``Notice``) which ``Client.apply`` carries
out; the UI (``ui.py``) shows notices and feeds typed lines back in.

Timers: the heartbeat (one ``call_at`` re-armed at ``Heartbeat.deadline()``);
once EXIT is sent, a grace period after which we leave without waiting; and
a short hold on the EOF of the chat or check socket. The server says why it
ends a session (``BYE``) on the login socket and then closes all three, but
three TCP connections are read in no particular order: handing over such an
EOF at once would often report "connection lost" instead of the reason.

Protocol version 2 needs nothing of its own here: ACKs are ``Send`` effects
on the check socket, and resuming is a ``Reconnect`` whose ``start()`` sends
``RESUME`` instead of ``LOGIN`` (``core.py`` says how).

The *link* is what belongs to one connection: the three transports, the
heartbeat, the EOF holds and the tasks opening the chat and check sockets.
On ``core.Reconnect`` the link is dropped whole (its generation number goes up,
so a late callback of the old link knows it is stale), and after the delay a
new login socket is opened on the loop, without blocking it: the user can
still type ``/help`` or leave meanwhile, and the countdown is shown.

Connecting the login socket the first time happens before the loop starts,
blocking, with retries: nothing else can happen until it is open, and a plain
loop with ``time.sleep`` is the simplest honest way to back off (and to ask
"retry?").

Several servers (``--host a,b``): which one a login socket goes to is
``servers.Failover``'s decision (the first connection here, each
``Reconnect`` names its server); this module only opens the sockets. The
chat and check sockets go to the address the login socket reached, and over
TLS every socket checks the host name of the server in use (``Client.server``).

TLS (``--tls``, ``tls.py``): every socket is an ``ssl.SSLSocket``. The first
login socket's handshake is blocking too, right after its connect and bounded
like it (CONNECT_TIMEOUT); the chat and check sockets and reconnects shake
hands on the loop. ``Transport`` handles what a non-blocking ``SSLSocket``
adds: ``SSLWantReadError``/``SSLWantWriteError`` on either side, and draining
what OpenSSL has already decrypted, which ``select`` cannot see. A failure
that retrying cannot mend (the certificate is not trusted, the server does not
speak TLS) exits 2 at once, without ``--retry``'s tries.

A first login socket that the server closes (or resets) before sending a
single byte never reached a selchat server we can talk to; it also exits 2,
and without ``--tls`` the message suggests it (a TLS server drops a plaintext
client that way).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable

from selchat.client import core
from selchat.client import servers as serverlist
from selchat.client import tls as clienttls
from selchat.client.core import (
    CHECK, LOGIN, AckLater, ClientSession, Close, Connect, Heartbeat, Phase, Reconnect, Role, Roster, Send,
)
from selchat.client.notices import Notice

CONNECT_TIMEOUT = 10.0   # seconds for one TCP connect
EXIT_GRACE = 2.0         # seconds to wait for the server to confirm EXIT
EOF_GRACE = 1.0          # seconds a chat/check socket's EOF waits for the login socket's BYE
RETRY_FIRST, RETRY_MAX = 1.0, 8.0
READ_SIZE = 65536
HIGH_WATER, LOW_WATER = 64 * 1024, 16 * 1024   # pause / resume reading input
MAX_WRITE_BUFFER = 1024 * 1024                  # beyond this the server is not reading
TICK = 0.5               # seconds between redraws of the reconnect countdown


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    register: bool = False
    retry: int = 0
    ping_interval: float = 30.0
    ping_timeout: float = 30.0
    reconnect: bool = False
    tls: bool = False            # all three sockets over TLS
    ca: str | None = None        # PEM file of the CAs to trust (else the system store)
    servers: tuple[serverlist.Server, ...] = ()   # from --host (parsed); empty: host and port

    def server_list(self) -> tuple[serverlist.Server, ...]:
        return self.servers or serverlist.parse(self.host, self.port)


def describe(err: BaseException) -> str:
    """A short human reason for a socket error."""
    if isinstance(err, (ssl.SSLError, clienttls.HandshakeTimeout)):
        return clienttls.describe(err)
    if isinstance(err, (socket.timeout, asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(err, OSError) and err.errno and not isinstance(err, socket.gaierror):
        return os.strerror(err.errno)   # asyncio's own text names the address again
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def run(settings: Settings, ui, ask_retry: Callable[[], bool] | None = None) -> int:
    """Connect, run the session until it ends, and return the exit code."""
    tls = clienttls.client_context(settings.ca) if settings.tls else None
    failover = serverlist.Failover(settings.server_list())
    sock = open_login_socket(failover, settings.retry, ui.show, ask_retry, tls=tls)
    if sock is None:
        return core.EXIT_UNREACHABLE
    session = ClientSession(settings.user, settings.password, settings.register, reconnect=settings.reconnect,
                            servers=failover)
    client = Client(session, ui, sock.getpeername(), settings.ping_interval, settings.ping_timeout,
                    server=failover.target, tls=tls)
    return asyncio.run(client.run(sock))


def open_login_socket(failover: serverlist.Failover, retries: int, show: Callable[[Notice], None],
                      ask_retry: Callable[[], bool] | None = None,
                      sleep: Callable[[float], None] = time.sleep,
                      tls: ssl.SSLContext | None = None) -> socket.socket | None:
    """A socket connected to ``failover.target``, or None.

    One round tries every server in turn, each as soon as the one before has
    failed; after a round that failed, up to ``retries`` more rounds, 1 s
    apart, doubling to 8 s. When they are used up ``ask_retry`` (interactive
    mode) may ask for one more. With ``tls`` the socket is an ``SSLSocket``
    that has shaken hands, the certificate checked for the server's host.
    None if no server can be reached; at once (no more rounds) if every
    server of the round failed TLS in a way no retry mends.
    """
    delay = RETRY_FIRST
    mendable = False   # a failure in this round that trying again may mend
    while True:
        server = failover.target
        try:
            sock = socket.create_connection(server, timeout=CONNECT_TIMEOUT)
            if tls is not None:
                sock = clienttls.handshake(sock, tls, server.host, CONNECT_TIMEOUT)
            return sock
        except OSError as err:
            show(Notice("unreachable", text=str(server), detail=describe(err)))
            mendable = mendable or not clienttls.is_fatal(err)
        if not failover.failed():
            continue   # the next server of the round, at once
        if not mendable:
            return None
        mendable = False
        if retries > 0:
            retries -= 1
            show(Notice("retrying", detail=f"{delay:g}"))
            sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        elif ask_retry is None or not ask_retry():
            return None


class Transport:
    """One non-blocking TCP socket on the loop, with our own write buffer.

    Reads: one ``recv`` per readiness, handed to ``on_read(role, data)``
    (``b""`` at EOF). Writes: sent at once when possible; only the rest is
    buffered, and EVENT_WRITE is watched only while the buffer is not empty.
    Bytes written before ``start()`` (the socket is still connecting) wait.

    Over TLS (an ``ssl.SSLSocket``) three things differ:

    - A read goes on until OpenSSL wants more from the network (or READ_SIZE
      is reached): a record read whole may leave decrypted bytes inside the SSL
      object (``pending()``) where ``select`` cannot see them. If some are
      left at READ_SIZE, another read is scheduled with ``call_soon``.
    - ``SSLWantReadError`` on a read means a partial record: wait. On a send,
      ``SSLWantWriteError`` is the socket being full: the buffer stays as it is
      (it is trimmed only after a ``send`` succeeds), so the retry passes the
      same bytes and maybe more, as OpenSSL requires.
    - The crossed cases (a read that must write first, a send that must read
      first: key updates, renegotiation, which our server refuses) swap the
      event watched until the other side is ready, so nothing spins.
    """

    def __init__(self, loop, role: Role, on_read, on_error, on_flow):
        self.loop, self.role = loop, role
        self.sock: socket.socket | None = None
        self._out = bytearray()
        self._reading = self._writing = False   # EVENT_READ / EVENT_WRITE watched
        self._tls = False
        self._read_wants_write = self._write_wants_read = False
        self.eof = False
        self.received = 0   # bytes read so far
        self._on_read, self._on_error, self._on_flow = on_read, on_error, on_flow

    @property
    def buffered(self) -> int:
        return len(self._out)

    def start(self, sock: socket.socket) -> None:
        """The socket is connected: start reading and send what waited.

        Nagle's algorithm is off: the frames are small and each is wanted at
        once (an ACK held back until the previous segment's TCP ACK, up to
        40 ms with delayed ACKs, holds back the partner's receipt too)."""
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass   # not TCP (a test's socketpair): nothing to turn off
        self.sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._watch()
        self._flush()

    def write(self, data: bytes) -> None:
        self._out += data
        if self.sock is not None and not (self._writing or self._write_wants_read):
            self._flush()
        if len(self._out) > MAX_WRITE_BUFFER:
            self._on_error(self.role, OSError("the server is not reading"))

    def close(self) -> None:
        if self.sock is None:
            return
        if self._reading:
            self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self._reading = self._writing = False
        self.sock.close()   # over TLS without close_notify: the server reads a plain EOF
        self.sock = None

    def _watch(self) -> None:
        """Watch EVENT_READ and EVENT_WRITE exactly while they are needed."""
        if self.sock is None:
            return
        read = (not self.eof and not self._read_wants_write) or self._write_wants_read
        write = (bool(self._out) and not self._write_wants_read) or self._read_wants_write
        fd = self.sock.fileno()
        if read != self._reading:
            self._reading = read
            if read:
                self.loop.add_reader(fd, self._readable)
            else:
                self.loop.remove_reader(fd)
        if write != self._writing:
            self._writing = write
            if write:
                self.loop.add_writer(fd, self._writable)
            else:
                self.loop.remove_writer(fd)

    def _readable(self) -> None:
        if self._write_wants_read:   # a TLS send was waiting for this
            self._write_wants_read = False
            self._flush()
        if self.sock is not None and not self.eof and not self._read_wants_write:
            self._read()

    def _writable(self) -> None:
        if self._read_wants_write:   # a TLS read was waiting for this
            self._read_wants_write = False
            self._read()
        if self.sock is not None:
            self._flush()

    def _read(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return
        except ssl.SSLWantWriteError:
            self._read_wants_write = True
            self._watch()
            return
        except OSError as err:
            self._on_error(self.role, err)
            return
        if data and self._tls:
            data = self._drain(data)
        if not data:
            self.eof = True
            self._watch()
        self.received += len(data)
        self._on_read(self.role, data)
        if self._tls and self.sock is not None and not self.eof and self.sock.pending():
            self.loop.call_soon(self._readable)   # READ_SIZE reached with bytes still decrypted

    def _drain(self, data: bytes) -> bytes:
        """More of what is readable over TLS without waiting, up to READ_SIZE in all."""
        chunks, size = [data], len(data)
        while size < READ_SIZE:
            try:
                more = self.sock.recv(READ_SIZE - size)
            except OSError:   # wants more (the usual end), or an error the next read reports
                break
            if not more:
                break   # EOF: the next read says so
            chunks.append(more)
            size += len(more)
        return b"".join(chunks) if len(chunks) > 1 else data

    def _flush(self) -> None:
        try:
            while self._out:
                sent = self.sock.send(self._out)
                del self._out[:sent]
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLWantReadError:
            self._write_wants_read = True
        except OSError as err:
            self._on_error(self.role, err)
            return
        self._watch()
        self._on_flow()


class Client:
    """Drives one ``ClientSession`` on the running asyncio loop.

    The UI calls ``typed(line)``, ``end_of_input()``, ``interrupt()`` and
    ``refresh_names()``; the UI is told ``show(notice)``, ``refresh()`` (the
    phase may have changed), ``start_input(client)`` once the user is online,
    ``pause_input()`` / ``resume_input()`` for flow control and
    ``stop_input()`` when no more input is wanted. ``reconnect_in()`` is the
    countdown to the next reconnection attempt, for the status line.
    """

    def __init__(self, session: ClientSession, ui, address, ping_interval: float, ping_timeout: float,
                 server: tuple[str, int] | None = None, tls: ssl.SSLContext | None = None):
        self.session, self.ui, self.address = session, ui, address
        # The server in use: where the login socket went (by name, resolved
        # again on a reconnect), and the name TLS checks on every socket.
        self.server = serverlist.Server(*(server or address[:2]))
        self._target = self.server             # where the next reconnect goes
        self.tls = tls                         # every socket over TLS, checked for server.host
        self._links = 0                        # links started (the first, then reconnects)
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done: asyncio.Future | None = None
        self.heartbeat: Heartbeat | None = None
        self.reconnect_at: float | None = None   # loop time of the next attempt
        self._gen = 0                              # the link's generation
        self._transports: dict[Role, Transport] = {}
        self._link_tasks: set[asyncio.Task] = set()
        self._link_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._roster_waiters: list[asyncio.Future] = []
        self._input = "waiting"   # waiting -> running <-> paused -> stopped

    async def run(self, login_sock: socket.socket) -> int:
        """Run the session over ``login_sock`` until it ends; the exit code."""
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self._install_signals()
        with self.ui.output():
            try:
                self._start_link(login_sock)
                return await self.done
            finally:
                self._teardown()
                await self.ui.aclose()

    # -- from the UI ---------------------------------------------------------------

    def typed(self, line: str) -> None:
        self.apply(self.session.typed(line))

    def change_password(self, old: str, new: str) -> None:
        self.apply(self.session.change_password(old, new))

    def delete_account(self, password: str) -> None:
        self.apply(self.session.delete_account(password))

    def end_of_input(self) -> None:
        self.apply(self.session.exit())

    def interrupt(self) -> None:
        self.apply(self.session.interrupt())

    def refresh_names(self) -> asyncio.Future:
        """Ask who is online without showing it; the future is done (with the
        names) when the answer is in, or at once if none can be asked for."""
        waiter = self.loop.create_future()
        self._roster_waiters.append(waiter)
        self.apply(self.session.refresh_names())
        if not self.session.refreshing:
            self._wake_roster_waiters()
        return waiter

    def reconnect_in(self) -> float | None:
        """Seconds until the next reconnection attempt, or None."""
        if self.reconnect_at is None:
            return None
        return max(0.0, self.reconnect_at - self.loop.time())

    # -- effects -------------------------------------------------------------------

    def apply(self, effects: list) -> None:
        """Carry out the session's effects, in order, then follow its phase."""
        for effect in effects:
            kind = type(effect)
            if kind is Send:
                transport = self._transports.get(effect.role)
                if transport is not None:
                    transport.write(effect.data)
            elif kind is Connect:
                self._connect(effect.role)
            elif kind is Close:
                self._finish(effect.code)
            elif kind is Reconnect:
                self._reconnect_later(effect.delay, effect.server)
            elif kind is Roster:
                self._wake_roster_waiters()
            elif kind is AckLater:
                if effect.confirm:
                    self._link_timers["ack-confirm"] = self.loop.call_later(effect.delay, self._ack_confirm)
                else:
                    self._link_timers["ack"] = self.loop.call_later(effect.delay, self._ack_now)
            else:
                self.ui.show(effect)
        self._follow_phase()

    def _follow_phase(self) -> None:
        session = self.session
        if self.done.done():
            return
        if session.leaving:
            self._stop_input()
            if "exit" not in self._timers:
                self._timers["exit"] = self.loop.call_later(EXIT_GRACE, self._exit_grace_over)
        elif session.online and self._input == "waiting":
            self._input = "running"
            self.ui.start_input(self)
        self.ui.refresh()

    def _finish(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)
        self._stop_input()

    def _stop_input(self) -> None:
        if self._input != "stopped":
            self._input = "stopped"
            self.ui.stop_input()

    def _ack_now(self) -> None:
        self._link_timers.pop("ack", None)
        self.apply(self.session.ack_now())

    def _ack_confirm(self) -> None:
        self._link_timers.pop("ack-confirm", None)
        self.apply(self.session.ack_confirm())

    def _wake_roster_waiters(self) -> None:
        waiters, self._roster_waiters = self._roster_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(self.session.known_users)

    # -- the link: one connection's sockets and timers --------------------------------

    def _start_link(self, login_sock: socket.socket) -> None:
        """A login socket is open: start a new link on it and log in."""
        self.address = login_sock.getpeername()
        self._links += 1
        self.heartbeat = Heartbeat(self.ping_interval, self.ping_timeout, self.loop.time())
        self._transports[LOGIN] = self._transport(LOGIN)
        self._transports[LOGIN].start(login_sock)
        self.apply(self.session.start())
        if not self.done.done():
            self._arm_heartbeat()

    def _drop_link(self) -> None:
        """Close everything of the current connection; late callbacks find a new generation."""
        self._gen += 1
        for timer in self._link_timers.values():
            timer.cancel()
        self._link_timers.clear()
        for task in list(self._link_tasks):
            task.cancel()
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()
        self._wake_roster_waiters()

    def _transport(self, role: Role) -> Transport:
        gen = self._gen

        def on_read(role: Role, data: bytes) -> None:
            if gen == self._gen:
                self._on_read(role, data)

        def on_error(role: Role, err: OSError) -> None:
            if gen == self._gen:
                self._on_socket_error(role, err)

        return Transport(self.loop, role, on_read, on_error, self._on_flow)

    def _connect(self, role: Role) -> None:
        """Open the socket of ``role``; writes to it wait in its buffer meanwhile."""
        self._transports[role] = self._transport(role)
        task = self.loop.create_task(self._finish_connect(role, self._gen))
        self._link_tasks.add(task)
        task.add_done_callback(self._link_tasks.discard)

    async def _finish_connect(self, role: Role, gen: int) -> None:
        family = socket.AF_INET6 if len(self.address) == 4 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, self.address), CONNECT_TIMEOUT)
            if self.tls is not None:
                sock = await clienttls.handshake_async(self.loop, sock, self.tls, self.server.host,
                                                       CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:
            sock.close()
            if gen == self._gen:
                self.apply(self.session.lost(f"cannot open the {role.value.lower()} socket: {describe(err)}"))
            return
        except BaseException:
            sock.close()
            raise
        if self.done.done() or gen != self._gen:
            sock.close()
        else:
            self._transports[role].start(sock)

    def _on_read(self, role: Role, data: bytes) -> None:
        # After READY only the check socket proves the server alive; before
        # it, any answer to the handshake does.
        if role is CHECK or not self.session.online:
            self.heartbeat.seen(self.loop.time())
        if role is LOGIN and not data and self._never_heard():
            why = "the server closed the connection without sending HELLO"
            self.apply(self.session.unreachable(self._server_text(), self._before_hello(why)))
            return
        if not data and role is not LOGIN and not self._transports[LOGIN].eof and not self.session.leaving:
            self._hold_eof(role)
        else:
            self.apply(self.session.receive(role, data))

    def _hold_eof(self, role: Role) -> None:
        """Give the login socket a moment to deliver the BYE that explains this EOF."""
        def deliver() -> None:
            self.apply(self.session.receive(role, b""))

        self._link_timers[f"eof-{role.value}"] = self.loop.call_later(EOF_GRACE, deliver)

    def _on_socket_error(self, role: Role, err: OSError) -> None:
        if role is LOGIN and self._never_heard():
            why = f"{describe(err)} (the server sent no HELLO)"
            self.apply(self.session.unreachable(self._server_text(), self._before_hello(why)))
            return
        self.apply(self.session.lost(f"{role.value.lower()} socket: {describe(err)}"))

    def _never_heard(self) -> bool:
        """The first login socket, and not a byte has come from the server on it."""
        login = self._transports.get(LOGIN)
        return self._links == 1 and login is not None and login.received == 0

    def _server_text(self) -> str:
        return str(self.server)

    def _before_hello(self, text: str) -> str:
        if self.tls is None:
            text += " (if it serves TLS, connect with --tls)"
        return text

    def _on_flow(self) -> None:
        """Pause reading input while the server is slow to take what we send."""
        buffered = max((t.buffered for t in self._transports.values()), default=0)
        if self._input == "running" and buffered > HIGH_WATER:
            self._input = "paused"
            self.ui.pause_input()
        elif self._input == "paused" and buffered < LOW_WATER:
            self._input = "running"
            self.ui.resume_input()

    # -- reconnecting --------------------------------------------------------------------

    def _reconnect_later(self, delay: float, server: serverlist.Server | None = None) -> None:
        self._drop_link()
        self._target = server or self.server
        if self._input == "paused":   # nothing is buffered any more
            self._input = "running"
            self.ui.resume_input()
        self.reconnect_at = self.loop.time() + delay
        self._timers["reconnect"] = self.loop.call_later(delay, self._reconnect_now)
        self._tick()

    def _tick(self) -> None:
        """Redraw the countdown while it runs."""
        self.ui.refresh()
        if self.reconnect_at is not None and not self.done.done():
            self._timers["tick"] = self.loop.call_later(TICK, self._tick)

    def _reconnect_now(self) -> None:
        task = self.loop.create_task(self._reconnect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconnect(self) -> None:
        self.reconnect_at = None
        self.ui.refresh()
        target = self._target
        try:
            sock = await open_socket(self.loop, *target, tls=self.tls)
        except (OSError, asyncio.TimeoutError) as err:
            self.apply(self.session.reconnect_failed(describe(err)))
            return
        if self.done.done() or self.session.phase is not Phase.RECONNECTING:
            sock.close()   # the user left meanwhile
            return
        self.server = target
        self._start_link(sock)

    # -- timers and signals --------------------------------------------------------

    def _arm_heartbeat(self) -> None:
        gen = self._gen

        def fire() -> None:
            if gen == self._gen:
                self._on_heartbeat()

        self._link_timers["heartbeat"] = self.loop.call_at(self.heartbeat.deadline(), fire)

    def _on_heartbeat(self) -> None:
        gen = self._gen
        due = self.heartbeat.due(self.loop.time())
        if due == Heartbeat.DEAD:
            self.apply(self.session.not_responding())
        elif due == Heartbeat.PING:
            self.apply(self.session.ping())
        if not self.done.done() and gen == self._gen:
            self._arm_heartbeat()

    def _exit_grace_over(self) -> None:
        self.apply(self.session.exit_timed_out())

    def _install_signals(self) -> None:
        """SIGINT acts like Ctrl-C; SIGTERM and SIGHUP log out cleanly."""
        handlers = {signal.SIGINT: self.interrupt, signal.SIGTERM: self.end_of_input,
                    signal.SIGHUP: self.end_of_input}
        for signum, handler in handlers.items():
            try:
                self.loop.add_signal_handler(signum, handler)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests), or not supported here

    def _teardown(self) -> None:
        self._drop_link()
        self.reconnect_at = None
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                self.loop.remove_signal_handler(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass


async def open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int,
                      tls: ssl.SSLContext | None = None) -> socket.socket:
    """A connected non-blocking TCP socket to ``host:port``, without blocking the loop.

    Each address the name resolves to is tried in turn, each within
    CONNECT_TIMEOUT; the last error is raised if none answers. With ``tls``
    the socket that answered then shakes hands (within CONNECT_TIMEOUT too,
    the certificate checked for ``host``) and is returned as an ``SSLSocket``;
    a failed handshake is raised, not passed over for another address.
    """
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: BaseException = OSError(f"no address for {host}")
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:
            sock.close()
            error = err
            continue
        except BaseException:
            sock.close()
            raise
        if tls is not None:
            sock = await clienttls.handshake_async(loop, sock, tls, host, CONNECT_TIMEOUT)
        return sock
    raise error
