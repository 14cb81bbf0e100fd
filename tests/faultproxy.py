"""A fault-injecting TCP proxy for the tests: it sits between clients and the
server and breaks connections the way real networks do (resets, stalls,
half-closes, a network that swallows new connections), on command or at random.

One background thread runs a ``selectors`` loop over non-blocking sockets, so
a thousand clients with three sockets each cost no threads. The test thread
never touches a proxied socket: every command is queued, the loop is woken
through a socketpair, and the caller waits (with a deadline) until the loop
has carried it out. So when ``link.cut()`` returns, the sockets really are
closed, and a test can go on to look at what the client noticed.

    with FaultProxy(server.host, server.port) as proxy:
        client = connect(proxy.address)
        link = proxy.wait_for_links(1)[0]
        link.cut()                      # the client sees ECONNRESET
        proxy.chaos(random.Random(1), every=0.05)

Every fault, whether commanded or random, is recorded in ``proxy.faults`` as
``(time.monotonic(), link id or None, kind)`` so a failing test can print the
story of what was done to it.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import queue
import random
import selectors
import socket
import struct
import threading
import time
from typing import Callable

COMMAND_DEADLINE = 5.0  # seconds a command may wait for the proxy thread
BUFFER_SIZE = 256 * 1024  # per direction; past it the sending side is not read
_RECV_SIZE = 65536
_LINGER_ABORT = struct.pack("ii", 1, 0)  # close() then sends RST, not FIN
_DIRECTIONS = ("up", "down")


def _abort_socket(sock: socket.socket) -> None:
    """Close with RST: the peer gets ECONNRESET, as when a host vanishes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass
    sock.close()


class _Direction:
    """One way through a link: bytes read from ``src`` wait in ``buf`` until
    written to ``dst``. ``eof`` once ``src`` said EOF; ``shut`` once ``dst``'s
    write side was shut down (nothing more goes this way)."""

    def __init__(self, name: str):
        self.name = name
        self.src: socket.socket | None = None
        self.dst: socket.socket | None = None
        self.buf = bytearray()
        self.eof = False
        self.half_closed = False  # shut dst after the buffer, discard the rest
        self.shut = False
        self.cut_after: int | None = None  # bytes still to forward before a cut
        self.forwarded = 0


class Link:
    """One proxied connection: the accepted client socket and the socket to
    the target. Fault methods may be called from any thread; they return once
    the proxy thread has carried them out.

    ``state`` is "held" (accepted while the network is down, not yet sent on),
    "connecting", "open" or "closed"; ``closed_how`` tells why it closed
    ("eof", "cut", "cut_after", "error", "refused by target", "proxy closed").
    """

    def __init__(self, proxy: "FaultProxy", link_id: int, client: socket.socket, peer):
        self.proxy = proxy
        self.id = link_id
        self.client_address = peer
        self.client = client
        self.server: socket.socket | None = None
        self.up = _Direction("up")
        self.down = _Direction("down")
        self.state = "held"
        self.closed_how: str | None = None
        self.stalled = False
        self._stall_token = 0  # a chaos stall only ends the stall it began
        self._masks: dict[socket.socket, int] = {}
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return (f"<Link {self.id} {self.state}{' stalled' if self.stalled else ''} "
                f"up={self.bytes_up} down={self.bytes_down} closed_how={self.closed_how}>")

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded client -> server so far."""
        return self.up.forwarded

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded server -> client so far."""
        return self.down.forwarded

    @property
    def open(self) -> bool:
        return not self._closed.is_set()

    def wait_closed(self, timeout: float = COMMAND_DEADLINE) -> bool:
        """True once the link is closed (by a fault, an EOF or an error)."""
        return self._closed.wait(timeout)

    # -- faults, callable from any thread --

    def cut(self) -> None:
        """Reset both sides (RST): a killed socket, Wi-Fi gone."""
        self.proxy._call(self._cut, "cut")

    def stall(self) -> None:
        """Forward nothing either way but keep both sockets open: bytes pile
        up in the kernel's buffers, as when the network is pulled away."""
        self.proxy._call(self._stall)

    def unstall(self) -> None:
        """Forward again, starting with what piled up."""
        self.proxy._call(self._unstall)

    def half_close(self, direction: str) -> None:
        """Shut down the write side towards the receiver of ``direction``
        ("up": client -> server, "down": server -> client) once the proxy's
        buffer for it is flushed; forward nothing more that way."""
        self._direction(direction)
        self.proxy._call(self._half_close, direction)

    def cut_after(self, direction: str, nbytes: int) -> None:
        """Cut the link once ``nbytes`` more bytes were forwarded in
        ``direction``, exactly there (even in the middle of a line)."""
        self._direction(direction)
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self.proxy._call(self._set_cut_after, direction, nbytes)

    def _direction(self, name: str) -> _Direction:
        if name not in _DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', not {name!r}")
        return self.up if name == "up" else self.down

    # -- the rest runs in the proxy thread only --

    def _cut(self, kind: str) -> None:
        if self.open:
            self.proxy._record(self.id, kind)
            self._abort(kind)

    def _stall(self) -> int:
        if self.open:
            self.proxy._record(self.id, "stall")
        self.stalled = True
        self._stall_token += 1
        self._update()
        return self._stall_token

    def _unstall(self, token: int | None = None) -> None:
        if not self.stalled or (token is not None and token != self._stall_token):
            return
        if self.open:
            self.proxy._record(self.id, "unstall")
        self.stalled = False
        self._update()
        self._pump(self.up)
        self._pump(self.down)

    def _half_close(self, name: str) -> None:
        direction = self._direction(name)
        if self.open and not direction.half_closed:
            self.proxy._record(self.id, f"half_close:{name}")
            direction.half_closed = True
            self._pump(direction)

    def _set_cut_after(self, name: str, nbytes: int) -> None:
        direction = self._direction(name)
        direction.cut_after = nbytes
        if nbytes == 0:
            self._cut(f"cut_after:{name}")

    def _forwarding(self) -> bool:
        """Bytes may move: the target connection is up and nothing stalls us."""
        return self.state == "open" and not self.stalled and not self.proxy._network_is_down

    def _connect(self) -> None:
        """Start the non-blocking connect to the target (a held link waits)."""
        self.state = "connecting"
        self.server = socket.socket(self.proxy._family, socket.SOCK_STREAM)
        self.server.setblocking(False)
        self.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = self.server.connect_ex(self.proxy.target)
        if err not in (0, errno.EINPROGRESS):
            self._abort("refused by target")
            return
        self.up.src = self.down.dst = self.client
        self.up.dst = self.down.src = self.server
        self._update()

    def _connected(self) -> None:
        err = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:  # refused, or reset already: the target may have been quick
            self._abort("refused by target" if err == errno.ECONNREFUSED else "error")
            return
        self.state = "open"
        self._update()
        self._pump(self.up)  # a half-close may have been asked for meanwhile
        self._pump(self.down)

    def _on_event(self, sock: socket.socket, mask: int) -> None:
        if self.state == "connecting":
            if sock is self.server and mask & selectors.EVENT_WRITE:
                self._connected()
            return
        if not self._forwarding():
            return
        reading = self.up if sock is self.client else self.down
        writing = self.down if sock is self.client else self.up
        if mask & selectors.EVENT_WRITE:
            self._pump(writing)
        if mask & selectors.EVENT_READ and self.open:
            self._read(reading)

    def _read(self, direction: _Direction) -> None:
        room = _RECV_SIZE if direction.half_closed else min(_RECV_SIZE, self.proxy.buffer_size - len(direction.buf))
        if room <= 0:
            return
        try:
            data = direction.src.recv(room)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort("error")
            return
        if not data:
            direction.eof = True
        elif not direction.half_closed:  # a half-closed way discards what still comes
            direction.buf += data
        self._pump(direction)

    def _pump(self, direction: _Direction) -> None:
        """Write what the buffer holds (at most up to a cut_after point), pass
        on an EOF or a half-close once it is empty, then close the link if
        both ways are done."""
        if not self.open or not self._forwarding():
            return
        if direction.buf and not direction.shut:
            chunk = direction.buf if direction.cut_after is None else direction.buf[:direction.cut_after]
            try:
                sent = direction.dst.send(chunk)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._abort("error")
                return
            del direction.buf[:sent]
            direction.forwarded += sent
            if direction.cut_after is not None:
                direction.cut_after -= sent
                if direction.cut_after == 0:
                    self._cut(f"cut_after:{direction.name}")
                    return
        if not direction.buf and (direction.eof or direction.half_closed) and not direction.shut:
            direction.shut = True
            try:
                direction.dst.shutdown(socket.SHUT_WR)
            except OSError:
                self._abort("error")
                return
        if self.up.shut and self.down.shut and self.up.eof and self.down.eof:
            self._close("eof")
            return
        self._update()

    def _update(self) -> None:
        """Register each socket for just the events it should wait for now:
        not read while stalled or while its buffer is full (backpressure),
        written only while bytes wait for it."""
        if not self.open:
            return
        if self.state == "held":
            return
        if self.state == "connecting":
            self._set_mask(self.server, selectors.EVENT_WRITE)
            return
        for sock, reading, writing in ((self.client, self.up, self.down), (self.server, self.down, self.up)):
            mask = 0
            if self._forwarding():
                if not reading.eof and (reading.half_closed or len(reading.buf) < self.proxy.buffer_size):
                    mask |= selectors.EVENT_READ
                if writing.buf and not writing.shut:
                    mask |= selectors.EVENT_WRITE
            self._set_mask(sock, mask)

    def _set_mask(self, sock: socket.socket, mask: int) -> None:
        old = self._masks.get(sock, 0)
        if mask == old:
            return
        sel = self.proxy._selector
        if not old:
            sel.register(sock, mask, self)
        elif not mask:
            sel.unregister(sock)
        else:
            sel.modify(sock, mask, self)
        self._masks[sock] = mask

    def _release(self) -> list[socket.socket]:
        for sock, mask in self._masks.items():
            if mask:
                self.proxy._selector.unregister(sock)
        self._masks.clear()
        self.state = "closed"
        self._closed.set()
        return [s for s in (self.client, self.server) if s is not None]

    def _abort(self, how: str) -> None:
        if self.open:
            self.closed_how = how
            for sock in self._release():
                _abort_socket(sock)

    def _close(self, how: str) -> None:
        if self.open:
            self.closed_how = how
            for sock in self._release():
                sock.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (``proxy.address``) to ``target``, with faults.

    ``links`` lists every accepted connection in accept order. Proxy-wide
    faults: ``cut_all``, ``stall_all``/``unstall_all``, ``network_down``/
    ``network_up`` (existing links stall and new ones are accepted but held,
    never reaching the target, until the network is up), ``refuse_new`` (new
    connections are reset at once) and ``chaos`` (random faults on a timer in
    the proxy's own loop).
    """

    def __init__(self, target_host: str, target_port: int, *, buffer_size: int = BUFFER_SIZE,
                 command_deadline: float = COMMAND_DEADLINE):
        self.target = (target_host, target_port)
        self._family = socket.AF_INET6 if ":" in target_host else socket.AF_INET
        self.buffer_size = buffer_size
        self.command_deadline = command_deadline
        self.links: list[Link] = []
        self.faults: list[tuple[float, int | None, str]] = []
        self.refused = 0  # connections reset at once by refuse_new
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=socket.SOMAXCONN)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._commands: queue.Queue = queue.Queue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._ids = itertools.count(1)
        self._network_is_down = False
        self._refusing = False
        self._chaos_generation = 0
        self._accepted = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"faultproxy:{self.port}", daemon=True)
        self._started = False
        self.crash: BaseException | None = None  # what killed the proxy thread, if anything

    def __repr__(self) -> str:
        return f"<FaultProxy {self.address} -> {self.target} links={len(self.links)}>"

    # -- life cycle --

    def start(self) -> "FaultProxy":
        if not self._started:
            self._started = True
            self._selector.register(self._listener, selectors.EVENT_READ, "accept")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._thread.start()
        return self

    def close(self) -> None:
        """Reset every link, stop the thread and free the port."""
        if self._started and self._thread.is_alive():
            try:
                self._call(self._stop)
            finally:
                self._thread.join(self.command_deadline)
        if not self._thread.is_alive():
            self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- waiting, from the test thread --

    def wait_for_links(self, count: int, timeout: float = COMMAND_DEADLINE) -> list[Link]:
        """The first ``count`` links, once that many were accepted."""
        with self._accepted:
            if not self._accepted.wait_for(lambda: len(self.links) >= count, timeout):
                raise AssertionError(f"{len(self.links)} links accepted within {timeout} s, wanted {count}")
            return self.links[:count]

    def open_links(self) -> list[Link]:
        return [link for link in list(self.links) if link.open]

    # -- proxy-wide faults, callable from any thread --

    def cut_all(self) -> None:
        self._call(self._each_open_link, lambda link: link._cut("cut"))

    def stall_all(self) -> None:
        self._call(self._each_open_link, Link._stall)

    def unstall_all(self) -> None:
        self._call(self._each_open_link, Link._unstall)

    def network_down(self) -> None:
        """Existing links stall; new connections are accepted (the client's
        connect succeeds) but go nowhere until ``network_up``."""
        self._call(self._set_network, True)

    def network_up(self) -> None:
        """Forward again, and send on the connections held meanwhile."""
        self._call(self._set_network, False)

    def refuse_new(self, refuse: bool = True) -> None:
        """While on, new connections are reset (RST) as soon as accepted."""
        self._call(setattr, self, "_refusing", bool(refuse))

    def chaos(self, rng: random.Random, every: float, faults=("cut", "stall", "half_close"),
              stall_for: tuple[float, float] = (0.05, 0.5)) -> None:
        """Inject a random fault (one of ``faults``) on a random open link
        roughly every ``every`` seconds, timed by the proxy's own loop. Chaos
        stalls end by themselves after ``uniform(*stall_for)`` seconds, even
        after ``stop_chaos``."""
        unknown = set(faults) - {"cut", "stall", "half_close"}
        if unknown or not faults:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        if every <= 0:
            raise ValueError("every must be > 0")
        self._call(self._start_chaos, rng, every, tuple(faults), stall_for)

    def stop_chaos(self) -> None:
        self._call(self._stop_chaos)

    # -- commands: the test thread asks, the proxy thread does --

    def _call(self, fn: Callable, *args):
        """Run ``fn(*args)`` in the proxy thread; wait until it has run and
        return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        if not self._started or not self._thread.is_alive():
            raise RuntimeError(f"{self!r} is not running") from self.crash
        done = threading.Event()
        outcome: list = []
        self._commands.put((fn, args, done, outcome))
        try:
            self._wake_w.send(b"!")
        except BlockingIOError:
            pass  # the wake-up pipe is full: the loop is woken already
        if not done.wait(self.command_deadline):
            raise TimeoutError(f"the proxy thread did not run {fn.__name__} within {self.command_deadline} s")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _run_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn, args, done, outcome = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                outcome.append((True, fn(*args)))
            except BaseException as exc:  # handed to the caller, who raises it
                outcome.append((False, exc))
            done.set()

    # -- the proxy thread --

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # kept for the test thread, whose next command raises it
            self.crash = exc
            raise

    def _loop(self) -> None:
        while not self._stopping:
            events = self._selector.select(self._timeout())
            for key, mask in events:
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._run_commands()
                elif key.fileobj.fileno() != -1 and key.data.open:
                    key.data._on_event(key.fileobj, mask)
            self._run_timers()
        for link in list(self.links):
            link._abort("proxy closed")

    def _stop(self) -> None:
        self._stopping = True
        self._chaos_generation += 1

    def _accept(self) -> None:
        for _ in range(256):  # a burst of connects, but the loop still turns
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. EMFILE: leave it in the backlog
                return
            if self._refusing:
                self.refused += 1
                self._record(None, "refused")
                _abort_socket(sock)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = Link(self, next(self._ids), sock, peer)
            with self._accepted:
                self.links.append(link)
                self._accepted.notify_all()
            if not self._network_is_down:
                link._connect()

    def _each_open_link(self, action: Callable[[Link], None]) -> None:
        for link in list(self.links):
            if link.open:
                action(link)

    def _set_network(self, down: bool) -> None:
        if down == self._network_is_down:
            return
        self._record(None, "network_down" if down else "network_up")
        self._network_is_down = down
        for link in list(self.links):
            if not link.open:
                continue
            if not down and link.state == "held":
                link._connect()
            else:
                link._update()
                link._pump(link.up)
                link._pump(link.down)

    def _record(self, link_id: int | None, kind: str) -> None:
        self.faults.append((time.monotonic(), link_id, kind))

    # -- timers inside the loop --

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))

    def _timeout(self) -> float | None:
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()

    # -- chaos --

    def _start_chaos(self, rng: random.Random, every: float, faults: tuple, stall_for) -> None:
        self._chaos_generation += 1
        generation = self._chaos_generation

        def tick() -> None:
            if generation != self._chaos_generation:
                return
            self._inject_random_fault(rng, faults, stall_for)
            self._after(rng.uniform(0.5 * every, 1.5 * every), tick)

        self._after(rng.uniform(0.5 * every, 1.5 * every), tick)

    def _stop_chaos(self) -> None:
        self._chaos_generation += 1

    def _inject_random_fault(self, rng: random.Random, faults: tuple, stall_for) -> None:
        candidates = [link for link in self.links if link.open and link.state != "held"]
        if not candidates:
            return
        link = rng.choice(candidates)
        kind = rng.choice(faults)
        if kind == "cut":
            link._cut("cut")
        elif kind == "stall":
            if not link.stalled:
                token = link._stall()
                self._after(rng.uniform(*stall_for), lambda: link._unstall(token))
        else:
            link._half_close(rng.choice(_DIRECTIONS))
