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

Connecting the login socket happens before the loop starts, blocking, with
retries: nothing else can happen until it is open, and a plain loop with
``time.sleep`` is the simplest honest way to back off (and to ask "retry?").
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from selchat.client import core
from selchat.client.core import CHECK, LOGIN, ClientSession, Close, Connect, Heartbeat, Notice, Role, Send

CONNECT_TIMEOUT = 10.0   # seconds for one TCP connect
EXIT_GRACE = 2.0         # seconds to wait for the server to confirm EXIT
EOF_GRACE = 1.0          # seconds a chat/check socket's EOF waits for the login socket's BYE
RETRY_FIRST, RETRY_MAX = 1.0, 8.0
READ_SIZE = 65536
HIGH_WATER, LOW_WATER = 64 * 1024, 16 * 1024   # pause / resume reading input
MAX_WRITE_BUFFER = 1024 * 1024                  # beyond this the server is not reading


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


def describe(err: BaseException) -> str:
    """A short human reason for a socket error."""
    if isinstance(err, (socket.timeout, asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def run(settings: Settings, ui, ask_retry: Callable[[], bool] | None = None) -> int:
    """Connect, run the session until it ends, and return the exit code."""
    sock = open_login_socket(settings.host, settings.port, settings.retry, ui.show, ask_retry)
    if sock is None:
        return core.EXIT_UNREACHABLE
    session = ClientSession(settings.user, settings.password, settings.register)
    client = Client(session, ui, sock.getpeername(), settings.ping_interval, settings.ping_timeout)
    return asyncio.run(client.run(sock))


def open_login_socket(host: str, port: int, retries: int, show: Callable[[Notice], None],
                      ask_retry: Callable[[], bool] | None = None,
                      sleep: Callable[[float], None] = time.sleep) -> socket.socket | None:
    """A connected socket, after up to ``retries`` more tries (1 s apart, doubling to 8 s).

    When the tries are used up ``ask_retry`` (interactive mode) may ask for one
    more. None if the server stays unreachable.
    """
    delay = RETRY_FIRST
    while True:
        try:
            return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as err:
            show(Notice("unreachable", text=f"{host}:{port}", detail=describe(err)))
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
    """

    def __init__(self, loop, role: Role, on_read, on_error, on_flow):
        self.loop, self.role = loop, role
        self.sock: socket.socket | None = None
        self._out = bytearray()
        self._writing = False
        self.eof = False
        self._on_read, self._on_error, self._on_flow = on_read, on_error, on_flow

    @property
    def buffered(self) -> int:
        return len(self._out)

    def start(self, sock: socket.socket) -> None:
        """The socket is connected: start reading and send what waited."""
        sock.setblocking(False)
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._readable)
        self._flush()

    def write(self, data: bytes) -> None:
        self._out += data
        if self.sock is not None and not self._writing:
            self._flush()
        if len(self._out) > MAX_WRITE_BUFFER:
            self._on_error(self.role, OSError("the server is not reading"))

    def close(self) -> None:
        if self.sock is None:
            return
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self.sock = None

    def _readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._on_error(self.role, err)
            return
        if not data:
            self.loop.remove_reader(self.sock.fileno())
            self.eof = True
        self._on_read(self.role, data)

    def _flush(self) -> None:
        try:
            while self._out:
                sent = self.sock.send(self._out)
                del self._out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as err:
            self._on_error(self.role, err)
            return
        want = bool(self._out)
        if want != self._writing:
            self._writing = want
            if want:
                self.loop.add_writer(self.sock.fileno(), self._flush)
            else:
                self.loop.remove_writer(self.sock.fileno())
        self._on_flow()


class Client:
    """Drives one ``ClientSession`` on the running asyncio loop.

    The UI calls ``typed(line)``, ``end_of_input()`` and ``interrupt()``; the
    UI is told ``show(notice)``, ``refresh()`` (the phase may have changed),
    ``start_input(client)`` once the user is online, ``pause_input()`` /
    ``resume_input()`` for flow control and ``stop_input()`` when no more
    input is wanted.
    """

    def __init__(self, session: ClientSession, ui, address, ping_interval: float, ping_timeout: float):
        self.session, self.ui, self.address = session, ui, address
        self.family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done: asyncio.Future | None = None
        self.heartbeat: Heartbeat | None = None
        self._transports: dict[Role, Transport] = {}
        self._tasks: set[asyncio.Task] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._input = "waiting"   # waiting -> running <-> paused -> stopped

    async def run(self, login_sock: socket.socket) -> int:
        """Run the session over ``login_sock`` until it ends; the exit code."""
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.heartbeat = Heartbeat(self.ping_interval, self.ping_timeout, self.loop.time())
        self._install_signals()
        with self.ui.output():
            try:
                self._transports[LOGIN] = self._transport(LOGIN)
                self._transports[LOGIN].start(login_sock)
                self.apply(self.session.start())
                self._arm_heartbeat()
                return await self.done
            finally:
                self._teardown()
                await self.ui.aclose()

    # -- from the UI ---------------------------------------------------------------

    def typed(self, line: str) -> None:
        self.apply(self.session.typed(line))

    def end_of_input(self) -> None:
        self.apply(self.session.exit())

    def interrupt(self) -> None:
        self.apply(self.session.interrupt())

    # -- effects -------------------------------------------------------------------

    def apply(self, effects: list) -> None:
        """Carry out the session's effects, in order, then follow its phase."""
        for effect in effects:
            if type(effect) is Send:
                self._transports[effect.role].write(effect.data)
            elif type(effect) is Connect:
                self._connect(effect.role)
            elif type(effect) is Close:
                self._finish(effect.code)
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

    # -- sockets ---------------------------------------------------------------------

    def _transport(self, role: Role) -> Transport:
        return Transport(self.loop, role, self._on_read, self._on_socket_error, self._on_flow)

    def _connect(self, role: Role) -> None:
        """Open the socket of ``role``; writes to it wait in its buffer meanwhile."""
        self._transports[role] = self._transport(role)
        task = self.loop.create_task(self._finish_connect(role))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_connect(self, role: Role) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, self.address), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:
            sock.close()
            self.apply(self.session.lost(f"cannot open the {role.value.lower()} socket: {describe(err)}"))
            return
        except BaseException:
            sock.close()
            raise
        if self.done.done():
            sock.close()
        else:
            self._transports[role].start(sock)

    def _on_read(self, role: Role, data: bytes) -> None:
        # After READY only the check socket proves the server alive; before
        # it, any answer to the handshake does.
        if role is CHECK or not self.session.online:
            self.heartbeat.seen(self.loop.time())
        if not data and role is not LOGIN and not self._transports[LOGIN].eof and not self.session.leaving:
            self._hold_eof(role)
        else:
            self.apply(self.session.receive(role, data))

    def _hold_eof(self, role: Role) -> None:
        """Give the login socket a moment to deliver the BYE that explains this EOF."""
        def deliver() -> None:
            self.apply(self.session.receive(role, b""))

        self._timers[f"eof-{role.value}"] = self.loop.call_later(EOF_GRACE, deliver)

    def _on_socket_error(self, role: Role, err: OSError) -> None:
        self.apply(self.session.lost(f"{role.value.lower()} socket: {describe(err)}"))

    def _on_flow(self) -> None:
        """Pause reading input while the server is slow to take what we send."""
        buffered = max(t.buffered for t in self._transports.values())
        if self._input == "running" and buffered > HIGH_WATER:
            self._input = "paused"
            self.ui.pause_input()
        elif self._input == "paused" and buffered < LOW_WATER:
            self._input = "running"
            self.ui.resume_input()

    # -- timers and signals --------------------------------------------------------

    def _arm_heartbeat(self) -> None:
        self._timers["heartbeat"] = self.loop.call_at(self.heartbeat.deadline(), self._on_heartbeat)

    def _on_heartbeat(self) -> None:
        due = self.heartbeat.due(self.loop.time())
        if due == Heartbeat.DEAD:
            self.apply(self.session.not_responding())
        elif due == Heartbeat.PING:
            self.apply(self.session.ping())
        if not self.done.done():
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
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for transport in self._transports.values():
            transport.close()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                self.loop.remove_signal_handler(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
