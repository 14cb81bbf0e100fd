"""A Redis connection driven by the reactor itself: hiredis.Reader parses, the socket is ours.

Two classes of link, each one TCP connection that reconnects by itself:

* ``RedisLink`` sends commands: ``link.command("INCR", key, callback=cb)``.
  Commands are pipelined, replies are matched to callbacks in order (Redis
  answers a connection's commands in the order it sent them), and everything
  written in one loop turn leaves in one ``send()``: the link writes through
  a ``reactor.transport.Transport``, which asks the reactor to flush it at the
  end of the turn like every socket of the server.
* ``PubSubLink`` holds subscriptions: ``sub.subscribe("presence",
  on_message=handler)`` calls ``handler(channel, data)`` for each message.
  A subscribed connection can send nothing but (un)subscriptions and PING in
  RESP2, so publishing goes through a ``RedisLink``. The link remembers what
  it is subscribed to and subscribes again after a reconnect.

In short::

    link = RedisLink(reactor, "redis://:pw@10.0.0.5:6379/0", on_up=up, on_down=down, name="node1")
    link.command("HSET", "presence", "alice", "node1", callback=cb)  # cb(reply or a RedisError)
    link.up, link.state, link.pending, link.buffered, link.failures, link.last_error
    link.close()

    sub = PubSubLink(reactor, url, on_up=..., on_down=..., name="node1-sub")
    sub.subscribe("node.node1", on_message=handler)  # handler(channel, data), both bytes
    sub.psubscribe("presence.*", on_message=handler, callback=cb)  # cb(count) once confirmed
    sub.unsubscribe("node.node1"); sub.punsubscribe("presence.*")

All methods are for the loop thread only (or before ``reactor.run()``), as
everything else on the reactor. Nothing here blocks and nothing raises into
the loop: a user callback that raises is logged and the link goes on.

Replies
-------
A callback gets exactly one argument, exactly once:

* the reply, as hiredis gives it (RESP2): ``bytes`` for simple and bulk
  strings, ``int``, ``None`` for nil, ``list`` for arrays (nested as sent);
  no decoding is done;
* a ``ReplyError`` (a subclass of both ``RedisError`` and
  ``hiredis.ReplyError``) for an error reply (``-ERR ...``): returned, not
  raised, and the link keeps working;
* a ``LinkDown`` if the connection was lost (or timed out, or the link was
  closed) before the reply came: the command may or may not have run;
* a ``BufferFull`` if the output buffer was over ``max_buffer``: the command
  was not sent.

``isinstance(reply, RedisError)`` tells any failure from a reply. A
``callback`` may be None when nobody cares (its reply is dropped, as are its
errors). A callback never runs inside the ``command()`` call that set it
up: failures known at once are delivered on the next loop turn.

Up and down
-----------
A link is *up* once connected and the handshake is answered: AUTH (if the
URL has a password), SELECT (if the database is not 0; command links only),
CLIENT SETNAME (if ``name``; its failure is ignored), PING, and on a pub/sub
link the SUBSCRIBE/PSUBSCRIBE that restore its subscriptions. Then ``on_up()``
fires. ``command()`` works only while up; at any other time its callback gets
``LinkDown`` (next turn), so wait for ``on_up`` before the first command and
after every ``on_down``. (Subscriptions are different: ``subscribe()`` always
records the wish, and it is carried out now if connected, else at the next
connection.)

The link is lost when the socket fails or closes, when the stream is not
valid RESP, or when nothing arrives for ``timeout`` seconds while anything
is pending (a command, a subscription, the handshake, the connect itself): a
SIGSTOPped or unreachable Redis keeps the TCP connection open, so only the
timeout notices it. Blocking commands (BLPOP...) would trip it and would
stall the pipeline anyway: do not send them on a link. While nothing is
pending the link sends a PING every ``ping_interval`` seconds, so a silent
Redis is noticed within ``ping_interval + timeout`` even on an idle link
(and a pub/sub link, which otherwise only ever receives).

On loss, in this order: the socket is closed; every pending callback gets
the same ``LinkDown`` (exactly once, in the order sent); ``on_down(exc)``
fires if the link was up (so ``on_up``/``on_down`` alternate, ``on_up``
first); a reconnect is scheduled after a capped exponential backoff with
jitter (``backoff`` doubling to ``backoff_max``, times a random factor in
[0.5, 1), reset once up), on the reactor's timer wheel. A failed attempt
(refused, AUTH rejected, timed out) is retried the same way, logged once per
distinct reason. ``close()`` ends all that for good.

Name lookup
-----------
The loop must never block, and ``getaddrinfo`` can (DNS). An IP literal
(``redis://10.0.0.5:6379``) is used as it is. Any other host name is looked
up on every connection attempt with ``reactor.run_in_thread`` (the reactor's
worker pool, shared with password hashing, so a lookup may wait behind a
hash) and each address it gives is tried in turn; not caching the answer
means a failover that moves the name is followed. The lookup has no timeout
of its own (the resolver's applies); the connect that follows does.

The split
---------
``CommandProtocol`` and ``PubSubProtocol`` are the sans-I/O part (as h11 and
``selchat.protocol``): commands in, bytes out; bytes in, a list of calls to
make out; ``fail(exc)`` ends every pending callback. They know no socket,
timer or reactor, and the tests feed them bytes split anywhere. The link
classes are the glue: connect, handshake, timers, reconnect.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import random
import selectors
import socket
from typing import Any, Callable

import hiredis

from selchat.cluster.resp import RedisConfig, encode, parse_url
from selchat.reactor.loop import Handler
from selchat.reactor.transport import Transport

__all__ = [
    "BufferFull", "CommandProtocol", "LinkDown", "PubSubLink", "PubSubProtocol",
    "RedisError", "RedisLink", "ReplyError",
]

log = logging.getLogger("selchat.cluster")

Callback = Callable[[Any], None]
OnMessage = Callable[[bytes, bytes], None]

MAX_BUFFER = 8 * 1024 * 1024


# -- errors, delivered as replies -------------------------------------------------------

class RedisError(Exception):
    """Base of everything a callback may get instead of a reply."""


class ReplyError(RedisError, hiredis.ReplyError):
    """An error reply from Redis (``-ERR ...``, ``-WRONGTYPE ...``); ``str()`` is its text."""


class LinkDown(RedisError):
    """The connection was lost, timed out or closed before the reply came.

    The command may or may not have run. ``str()`` says why."""


class BufferFull(RedisError):
    """The link's output buffer was over ``max_buffer`` bytes: the command was not sent."""


class ProtocolViolation(RedisError):
    """The stream is not what Redis sends (not RESP, or a reply nobody asked for)."""


_NEED = object()  # hiredis's "not enough data" (its default, False, is a RESP3 value)


# -- the sans-I/O part --------------------------------------------------------------------

class _Protocol:
    __slots__ = ("_reader", "_pending", "error")

    def __init__(self) -> None:
        self._pending: collections.deque = collections.deque()
        self._reader = self._new_reader()
        #: Set when the stream went wrong (a ``ProtocolViolation``); the
        #: connection must then be dropped, and ``fail()`` resets it.
        self.error: RedisError | None = None

    @staticmethod
    def _new_reader() -> hiredis.Reader:
        return hiredis.Reader(replyError=ReplyError, notEnoughData=_NEED)

    @property
    def pending(self) -> int:
        """Replies still expected (a SUBSCRIBE of three channels counts as one)."""
        return len(self._pending)

    def fail(self, exc: BaseException) -> list[tuple[Callable, tuple]]:
        """Forget the connection: every pending callback, in order, with ``exc``
        (None callbacks skipped); the parser starts afresh for the next one."""
        calls = [(entry[0] if type(entry) is list else entry, (exc,))
                 for entry in self._pending]
        self._pending.clear()
        self._reader = self._new_reader()
        self.error = None
        return [call for call in calls if call[0] is not None]

    def _violation(self, message: str) -> None:
        self.error = ProtocolViolation(message)


class CommandProtocol(_Protocol):
    """FIFO reply matching for a command connection.

    ``send(args, callback) -> bytes`` encodes a command and remembers its
    callback; ``receive(data)`` parses what it can and returns the calls to
    make, ``[(callback, (reply,)), ...]``, in order. Bytes may be split
    anywhere: a partial reply waits in the parser for the rest. A stream
    that is not RESP, or a reply with no command waiting for it, sets
    ``error``; the replies before it are still returned.
    """

    __slots__ = ()

    def send(self, args: tuple, callback: Callback | None = None) -> bytes:
        data = encode(*args)
        self._pending.append(callback)
        return data

    def expect(self, callback: Callback | None) -> None:
        """Count on one more reply, for a command written by other means."""
        self._pending.append(callback)

    def receive(self, data: bytes) -> list[tuple[Callable, tuple]]:
        if self.error is not None:
            return []
        reader, pending = self._reader, self._pending
        gets, popleft = reader.gets, pending.popleft
        calls = []
        try:
            reader.feed(data)
            while (reply := gets()) is not _NEED:
                if not pending:
                    self._violation(f"a reply nobody asked for: {reply!r:.80}")
                    break
                callback = popleft()
                if callback is not None:
                    calls.append((callback, (reply,)))
        except hiredis.ProtocolError as exc:
            self._violation(f"not RESP: {exc}")
        return calls


_MESSAGE, _PMESSAGE, _PONG = b"message", b"pmessage", b"pong"
_CONFIRMS = frozenset((b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe"))


class PubSubProtocol(_Protocol):
    """Message routing and confirmation matching for a subscribed connection.

    ``channels`` and ``patterns`` map names (bytes) to ``on_message``
    handlers; they are the link's wishes and outlive connections.
    ``receive(data)`` returns ``[(handler, (channel, data)), ...]`` for
    messages (a message for a name no longer in the maps is dropped: it was
    in flight when we unsubscribed) and ``[(callback, (reply,))]`` when the
    last confirmation of a (P)(UN)SUBSCRIBE arrives (``reply`` is the number
    of subscriptions the connection then has), or a plain command's reply
    (the handshake). Each pending entry is ``[callback, kind, remaining]``:
    ``kind`` None takes any one reply, else that many confirmations of that
    kind; an error reply completes the entry at the head.
    """

    __slots__ = ("channels", "patterns")

    def __init__(self) -> None:
        super().__init__()
        self.channels: dict[bytes, OnMessage] = {}
        self.patterns: dict[bytes, OnMessage] = {}

    def send(self, args: tuple, callback: Callback | None = None, kind: bytes | None = None,
             count: int = 1) -> bytes:
        """``args`` encoded; its reply (``kind`` None) or its ``count``
        confirmations of ``kind`` (b"subscribe", ..., b"pong") will go to ``callback``."""
        data = encode(*args)
        self._pending.append([callback, kind, count])
        return data

    def receive(self, data: bytes) -> list[tuple[Callable, tuple]]:
        if self.error is not None:
            return []
        reader, pending = self._reader, self._pending
        calls = []
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not _NEED:
                if type(reply) is list and reply:
                    kind = reply[0]
                    if kind == _MESSAGE and len(reply) == 3:
                        handler = self.channels.get(reply[1])
                        if handler is not None:
                            calls.append((handler, (reply[1], reply[2])))
                        continue
                    if kind == _PMESSAGE and len(reply) == 4:
                        handler = self.patterns.get(reply[1])
                        if handler is not None:
                            calls.append((handler, (reply[2], reply[3])))
                        continue
                if not pending:
                    self._violation(f"a reply nobody asked for: {reply!r:.80}")
                    break
                entry = pending[0]
                callback, want = entry[0], entry[1]
                if isinstance(reply, ReplyError) or want is None:
                    value = reply
                elif want == _PONG and (reply == b"PONG" or (type(reply) is list and reply and reply[0] == _PONG)):
                    value = b"PONG"  # PING answers +PONG, or [pong, ""] once subscribed
                elif (type(reply) is list and len(reply) == 3 and reply[0] == want
                      and want in _CONFIRMS):
                    entry[2] -= 1
                    if entry[2] > 0:
                        continue
                    value = reply[2]
                else:
                    self._violation(f"expected {want!r}, got {reply!r:.80}")
                    break
                pending.popleft()
                if callback is not None:
                    calls.append((callback, (value,)))
        except hiredis.ProtocolError as exc:
            self._violation(f"not RESP: {exc}")
        return calls


# -- the glue -------------------------------------------------------------------------------

CONNECTING, HANDSHAKE, UP, WAITING, CLOSED = "connecting", "handshake", "up", "waiting", "closed"
_IN_PROGRESS = {0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR}


class _Conn(Handler):
    """One connection attempt. While connecting it is the selector's handler
    (EVENT_WRITE says the connect finished); once connected it is the
    ``Transport``'s protocol. The link only listens to its current ``_Conn``,
    so a late event of an attempt it gave up (a ``connection_lost`` the
    transport queued, a name lookup finishing) changes nothing."""

    __slots__ = ("link", "sock", "transport", "addresses", "last_error", "timer", "ping_timer",
                 "waiting", "registered")

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.sock: socket.socket | None = None
        self.transport: Transport | None = None
        self.addresses: collections.deque = collections.deque()
        self.last_error: BaseException | None = None
        self.timer = None       # no progress while pending -> lost
        self.ping_timer = None  # PING while idle
        self.waiting = 0        # handshake replies still to come
        self.registered = False

    # Handler, while connecting
    def on_readable(self) -> None:  # pragma: no cover - registered for EVENT_WRITE only
        pass

    def on_writable(self) -> None:
        self.link._connect_done(self)

    def on_error(self, exc: BaseException) -> None:
        self.link._lost(self, LinkDown(f"internal error: {exc!r}"))

    # Transport protocol, once connected
    def data_received(self, data: bytes) -> None:
        self.link._data(self, data)

    def eof_received(self) -> None:
        self.link._lost(self, LinkDown("Redis closed the connection"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.link._lost(self, LinkDown(f"connection lost: {exc}" if exc else "connection lost"))

    def pause_writing(self) -> None:
        self.link._congestion(self, True)  # the hard bound is checked by RedisLink.command itself

    def resume_writing(self) -> None:
        self.link._congestion(self, False)


def _safely(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("error in Redis link callback %r", fn)


class _Link:
    """What both kinds of link share: connecting, the handshake, loss, backoff."""

    _uses_db = True  # SELECT in the handshake (pub/sub is not per database)

    def __init__(
        self,
        reactor,
        url_or_config: str | RedisConfig,
        on_up: Callable[[], None] | None = None,
        on_down: Callable[[LinkDown], None] | None = None,
        *,
        name: str | None = "selchat",
        timeout: float = 5.0,
        ping_interval: float = 2.0,
        backoff: float = 0.1,
        backoff_max: float = 2.0,
        max_buffer: int = MAX_BUFFER,
    ) -> None:
        self.reactor = reactor
        self.config = url_or_config if isinstance(url_or_config, RedisConfig) else parse_url(url_or_config)
        if name is not None and (not name or any(c.isspace() for c in name) or not name.isprintable()):
            raise ValueError(f"a Redis client name has no spaces: {name!r}")
        if not timeout > 0 or not ping_interval > 0 or not 0 < backoff <= backoff_max:
            raise ValueError("timeout, ping_interval and backoff must be > 0, backoff <= backoff_max")
        self.name = name
        self._label = name or "redis"  # for the log
        self.on_up = on_up
        self.on_down = on_down
        self.timeout = timeout
        self.ping_interval = ping_interval
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.max_buffer = max_buffer
        self._core = self._new_core()
        self._conn: _Conn | None = None
        self._state = CONNECTING
        self._failures = 0        # failed attempts since the link was last up
        self._last_reason = None  # to log a repeated failure only once
        self._was_up = False
        self._refusing = False    # BufferFull logged for the current overflow
        #: The ``LinkDown`` of the latest loss or failed attempt (None so far):
        #: why the link is not up, for logs and status pages.
        self.last_error: LinkDown | None = None
        #: True while the socket's output is over the transport's high-water
        #: mark (Redis reads slower than we write): a caller that can slow its
        #: own sources down should, until ``on_drain()`` fires.
        self.congested = False
        self.on_drain: Callable[[], None] | None = None
        self._retry = reactor.call_later(0, self._connect)

    # -- public ---------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Connected, handshake answered; ``on_up`` has fired."""
        return self._state == UP

    @property
    def state(self) -> str:
        """``connecting``, ``handshake``, ``up``, ``waiting`` (to retry) or ``closed``."""
        return self._state

    @property
    def failures(self) -> int:
        """Failed connection attempts since the link was last up."""
        return self._failures

    @property
    def pending(self) -> int:
        """Replies awaited on the current connection."""
        return self._core.pending

    @property
    def buffered(self) -> int:
        """Bytes written and not yet taken by the kernel."""
        transport = self._conn.transport if self._conn is not None else None
        return transport.buffered if transport is not None else 0

    def close(self) -> None:
        """Close for good: the socket at once (buffered writes are dropped),
        every pending callback gets ``LinkDown`` before this returns, no
        ``on_down``, no reconnect. Idempotent. To be sure a last command
        ran, close from its callback."""
        if self._state == CLOSED:
            return
        self._state = CLOSED
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._conn is not None:
            self._drop(self._conn)
        for callback, args in self._core.fail(LinkDown("the link was closed")):
            _safely(callback, *args)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._label} {self.config} {self._state} pending={self.pending}>"

    # -- connecting ----------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self._state == CLOSED:
            return
        self._state = CONNECTING
        conn = self._conn = _Conn(self)
        cfg = self.config
        if cfg.numeric_host:
            family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
            conn.addresses.append((family, (cfg.host, cfg.port)))
            self._next_address(conn)
        else:
            self.reactor.run_in_thread(
                socket.getaddrinfo, cfg.host, cfg.port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                done=lambda future: self._resolved(conn, future))

    def _resolved(self, conn: _Conn, future) -> None:
        if conn is not self._conn:
            return
        exc = future.exception()
        if exc is not None:
            self._lost(conn, LinkDown(f"cannot resolve {self.config.host!r}: {exc}"))
            return
        seen = set()
        for family, _type, _proto, _canon, sockaddr in future.result():
            if (family, sockaddr) not in seen:
                seen.add((family, sockaddr))
                conn.addresses.append((family, sockaddr))
        self._next_address(conn)

    def _next_address(self, conn: _Conn) -> None:
        """Start a non-blocking connect to the next address; when none is left, the attempt failed."""
        while conn.addresses:
            family, address = conn.addresses.popleft()
            sock = None
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = sock.connect_ex(address)
            except OSError as exc:
                if sock is not None:
                    sock.close()
                conn.last_error = exc
                continue
            if err not in _IN_PROGRESS:
                sock.close()
                conn.last_error = OSError(err, f"{os.strerror(err)} ({address[0]}:{address[1]})")
                continue
            conn.sock = sock
            self.reactor.selector.register(sock, selectors.EVENT_WRITE, conn)
            conn.registered = True
            if conn.timer is None:
                conn.timer = self.reactor.call_later(self.timeout, self._timed_out, conn)
            else:
                conn.timer.reset(self.timeout)
            return
        self._lost(conn, LinkDown(f"cannot connect to {self.config}: {conn.last_error}"))

    def _connect_done(self, conn: _Conn) -> None:
        if conn is not self._conn or conn.sock is None:
            return
        sock = conn.sock
        self.reactor.selector.unregister(sock)
        conn.registered = False
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            conn.sock = None
            conn.last_error = OSError(err, os.strerror(err))
            self._next_address(conn)
            return
        # Congested (``congested``, ``on_drain``) well before the hard bound.
        conn.transport = Transport(self.reactor, sock, conn, high_water=self.max_buffer // 8,
                                   low_water=self.max_buffer // 32)
        self._state = HANDSHAKE
        # Nothing is pending between connections (``_lost`` failed it all);
        # this gives the new connection a fresh parser.
        for callback, args in self._core.fail(LinkDown("stale connection")):
            _safely(callback, *args)
        out = []
        cfg = self.config
        if cfg.password is not None:
            auth = ("AUTH", cfg.username, cfg.password) if cfg.username else ("AUTH", cfg.password)
            out.append(self._send_internal(auth, self._handshake_reply(conn, "AUTH")))
        if cfg.db and self._uses_db:
            out.append(self._send_internal(("SELECT", cfg.db), self._handshake_reply(conn, f"SELECT {cfg.db}")))
        if self.name:
            out.append(self._send_internal(("CLIENT", "SETNAME", self.name), None))
        out.append(self._send_internal(("PING",), self._handshake_reply(conn, "PING"), kind=b"pong"))
        out.extend(self._restore(conn))
        conn.transport.write(b"".join(out))
        conn.timer.reset(self.timeout)

    def _send_internal(self, args: tuple, callback, kind: bytes | None = None) -> bytes:
        return self._core.send(args, callback)

    def _restore(self, conn: _Conn) -> list[bytes]:
        """Extra handshake commands (a pub/sub link's subscriptions)."""
        return []

    def _handshake_reply(self, conn: _Conn, what: str, fatal: bool = True) -> Callback:
        conn.waiting += 1

        def reply(value) -> None:
            if conn is not self._conn or isinstance(value, LinkDown):
                return
            if isinstance(value, RedisError):
                if fatal:
                    self._lost(conn, LinkDown(f"{what} failed: {value}"))
                    return
                log.error("Redis link %s: %s failed: %s", self._label, what, value)
            conn.waiting -= 1
            if conn.waiting == 0:
                self._ready(conn)

        return reply

    def _ready(self, conn: _Conn) -> None:
        self._state = UP
        self._failures = 0
        self._last_reason = None
        peer = conn.transport.peername
        log.info("Redis link %s %s: %s (%s)", self._label, "up again" if self._was_up else "up",
                 self.config, peer[0] if peer else "?")
        self._was_up = True
        conn.ping_timer = self.reactor.call_later(self.ping_interval, self._ping, conn)
        if self.on_up is not None:
            _safely(self.on_up)

    # -- running --------------------------------------------------------------------------

    def _data(self, conn: _Conn, data: bytes) -> None:
        if conn is not self._conn:
            return
        core = self._core
        calls = core.receive(data)
        if core.pending:
            conn.timer.reset(self.timeout)  # progress: the clock starts again
        else:
            conn.timer.cancel()
        for callback, args in calls:
            try:
                callback(*args)
            except Exception:
                log.exception("error in Redis link callback %r", callback)
        if core.error is not None and conn is self._conn:
            self._lost(conn, LinkDown(str(core.error)))

    def _write(self, conn: _Conn, data: bytes) -> None:
        conn.transport.write(data)
        if not conn.timer.active:
            conn.timer.reset(self.timeout)

    def _ping(self, conn: _Conn) -> None:
        if conn is not self._conn or self._state != UP:
            return
        if not self._core.pending:
            self._write(conn, self._send_internal(("PING",), None, kind=b"pong"))
        conn.ping_timer.reset(self.ping_interval)

    def _timed_out(self, conn: _Conn) -> None:
        if conn is not self._conn:
            return
        if self._state == CONNECTING:
            if conn.sock is not None:
                self.reactor.selector.unregister(conn.sock)
                conn.registered = False
                conn.sock.close()
                conn.sock = None
            conn.last_error = TimeoutError(f"no answer within {self.timeout} s")
            self._next_address(conn)
            return
        self._lost(conn, LinkDown(f"no reply from Redis within {self.timeout} s"))

    # -- losing ---------------------------------------------------------------------------

    def _drop(self, conn: _Conn) -> None:
        """Stop listening to ``conn`` and close its socket."""
        if conn is self._conn:
            self._conn = None
        for timer in (conn.timer, conn.ping_timer):
            if timer is not None:
                timer.cancel()
        if conn.transport is not None:
            conn.transport.abort()  # its connection_lost comes next turn, to a stale _Conn
        elif conn.sock is not None:
            if conn.registered:
                self.reactor.selector.unregister(conn.sock)
                conn.registered = False
            conn.sock.close()
        conn.sock = None

    def _congestion(self, conn: _Conn, on: bool) -> None:
        if conn is not self._conn:
            return
        self.congested = on
        if not on and self.on_drain is not None:
            _safely(self.on_drain)

    def _lost(self, conn: _Conn, exc: LinkDown) -> None:
        if conn is not self._conn or self._state == CLOSED:
            return
        self.congested = False
        was_up = self._state == UP
        self._drop(conn)
        self._state = WAITING
        delay = min(self.backoff_max, self.backoff * 2 ** min(self._failures, 30)) * random.uniform(0.5, 1.0)
        self._failures += 1
        self._retry = self.reactor.call_later(delay, self._connect)
        self.last_error = exc
        reason = str(exc)
        if was_up:
            log.warning("Redis link %s down: %s; reconnecting", self._label, reason)
        elif reason != self._last_reason:
            log.warning("Redis link %s: %s; retrying", self._label, reason)
        else:
            log.debug("Redis link %s: %s; retrying in %.2f s", self._label, reason, delay)
        self._last_reason = reason
        for callback, args in self._core.fail(exc):
            _safely(callback, *args)
        if was_up and self.on_down is not None:
            _safely(self.on_down, exc)

    def _new_core(self):  # pragma: no cover - interface
        raise NotImplementedError


class RedisLink(_Link):
    """A pipelined command connection to Redis; see the module docstring.

    ``RedisLink(reactor, "redis://:secret@10.0.0.5:6379/2", on_up=..., on_down=...,
    name="selchat-node1", timeout=5.0, ping_interval=2.0, backoff=0.1,
    backoff_max=2.0, max_buffer=8 MiB)``. It starts connecting on the
    reactor's next turn.
    """

    def _new_core(self) -> CommandProtocol:
        return CommandProtocol()

    def command(self, *args, callback: Callback | None = None) -> None:
        """Send one command (``bytes``/``str``/``int``/``float`` arguments).

        ``callback(reply)`` gets its reply, a ``ReplyError``, a ``LinkDown``
        (not up, or lost before the reply) or a ``BufferFull`` (over
        ``max_buffer``; the command was not sent), exactly once and never
        before this returns. A bad argument type raises ``TypeError`` here.
        """
        data = encode(*args)  # a bad argument is the caller's bug, up or not
        conn = self._conn
        if self._state != UP:
            if callback is not None:
                self.reactor.call_soon(callback, LinkDown(f"the Redis link is {self._state}"))
            return
        if conn.transport.buffered + len(data) > self.max_buffer:
            if not self._refusing:  # once per overflow, not once per command
                self._refusing = True
                log.warning("Redis link %s: output buffer over %d bytes; refusing commands until it drains",
                            self._label, self.max_buffer)
            if callback is not None:
                self.reactor.call_soon(callback, BufferFull(
                    f"output buffer over {self.max_buffer} bytes ({conn.transport.buffered} unsent)"))
            return
        self._refusing = False
        self._core.expect(callback)
        self._write(conn, data)


class PubSubLink(_Link):
    """A subscriber connection to Redis; see the module docstring.

    Same constructor as ``RedisLink`` (the database number is ignored:
    Redis pub/sub is not per database). Names are ``str`` (UTF-8) or
    ``bytes``; handlers get ``(channel, data)`` as ``bytes``, for a pattern
    subscription the channel the message was published to.
    """

    _uses_db = False

    def _new_core(self) -> PubSubProtocol:
        return PubSubProtocol()

    @property
    def channels(self) -> frozenset[bytes]:
        """Channels subscribed to (wished for: restored at every connection)."""
        return frozenset(self._core.channels)

    @property
    def patterns(self) -> frozenset[bytes]:
        return frozenset(self._core.patterns)

    def subscribe(self, *channels: str | bytes, on_message: OnMessage, callback: Callback | None = None) -> None:
        """Call ``on_message(channel, data)`` for every message on ``channels``,
        from now on and after every reconnect, until ``unsubscribe``.

        One handler per channel: subscribing again replaces it. ``callback``
        gets the connection's subscription count once Redis confirmed all of
        ``channels``, or an error (``LinkDown`` if not connected now or lost
        before; the wish stands and is carried out at the next connection,
        before ``on_up``)."""
        self._change(b"subscribe", channels, on_message, callback)

    def psubscribe(self, *patterns: str | bytes, on_message: OnMessage, callback: Callback | None = None) -> None:
        """``subscribe`` for glob-style patterns (``presence.*``)."""
        self._change(b"psubscribe", patterns, on_message, callback)

    def unsubscribe(self, *channels: str | bytes, callback: Callback | None = None) -> None:
        """Stop delivering ``channels`` (at once: a message already in flight is dropped)."""
        self._change(b"unsubscribe", channels, None, callback)

    def punsubscribe(self, *patterns: str | bytes, callback: Callback | None = None) -> None:
        self._change(b"punsubscribe", patterns, None, callback)

    def _change(self, kind: bytes, names, on_message, callback) -> None:
        if not names:
            raise ValueError(f"{kind.decode()} needs at least one name")
        keys = [name.encode("utf-8") if isinstance(name, str) else bytes(name) for name in names]
        table = self._core.patterns if kind.startswith(b"p") else self._core.channels
        for key in keys:
            if on_message is not None:
                table[key] = on_message
            else:
                table.pop(key, None)
        conn = self._conn
        if self._state in (HANDSHAKE, UP) and conn is not None:
            self._write(conn, self._core.send((kind.decode().upper(), *keys), callback, kind, len(keys)))
        elif callback is not None:
            self.reactor.call_soon(callback, LinkDown(f"the Redis link is {self._state}; "
                                                      "kept for the next connection"))

    def _send_internal(self, args: tuple, callback, kind: bytes | None = None) -> bytes:
        return self._core.send(args, callback, kind)

    def _restore(self, conn: _Conn) -> list[bytes]:
        out = []
        for kind, table in ((b"subscribe", self._core.channels), (b"psubscribe", self._core.patterns)):
            if table:
                names = list(table)
                callback = self._handshake_reply(conn, f"{kind.decode().upper()} {len(names)}", fatal=False)
                out.append(self._core.send((kind.decode().upper(), *names), callback, kind, len(names)))
        return out
