"""Which server to connect to: the ``--host`` list, and the failover policy (no I/O).

``--host`` (``SELCHAT_HOST``, ``host`` in the config file) is one server or a
comma-separated list of them, each ``HOST``, ``HOST:PORT`` or
``[IPv6]:PORT`` (``parse``); an entry without a port takes ``--port``. A bare
IPv6 address (``::1``) is a host without a port: with a port it must be in
brackets. One server behaves exactly as before there were lists.

``Failover`` decides, from what happened, which server the next login socket
goes to and whether to wait first. The loop (``app.py``) opens the sockets;
the session (``core.py``) tells the policy what became of them and turns its
answers into ``Reconnect`` effects. The chat and check sockets of a session
always go where its login socket went (the loop connects them to that
socket's peer address), so they are no concern of this module.

The policy
----------
A **round** tries every server once, one after the other, each as soon as
the previous one has failed (refused, timed out, reset, TLS failure; or, when
reconnecting, lost before the session was back). Waiting happens only
between rounds: ``--retry``'s schedule for the first connection, the
session's ``Backoff`` when reconnecting.

- **The first connection**: rounds in the given order, from the first server.
- **Sticky**: the server whose login socket opened last is the *current*
  one. Rounds after the first start from it, then go on in list order,
  wrapping around (servers ``a,b,c``, current ``b``: ``b, c, a``).
- **A connection lost** after the session was online again starts a round
  at the current server, **at once**: a passing glitch costs one connect,
  and a dead node (refused) is left for the next server within
  milliseconds, with no backoff in between. Two exceptions wait the backoff
  first, as a single server always did: there is only one server (nowhere
  else to go, and the jitter spreads the clients of a restarted server), or
  the lost connection was online for less than ``STABLE_AFTER`` seconds (a
  node that accepts, logs in and drops at once would otherwise be hammered
  in a loop without pause).
- A failure within a round moves to the next server at once; the last
  failure of a round asks for the backoff, and the next round starts again
  at the current server.

Time enters only through the ``clock`` passed in (the loop's monotonic
clock), as chance enters ``Backoff`` through its ``rng``: tests pass their own.
"""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Callable, NamedTuple, Sequence

#: A lost connection is retried on the same server at once only if it was
#: online at least this long (seconds); else the backoff is waited first.
STABLE_AFTER = 5.0

_BRACKETED = re.compile(r"\[([^\[\]]*)\](?::(.*))?")


class Server(NamedTuple):
    """One entry of the list: a host name or address, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return address(self.host, self.port)


def address(host: str, port: int) -> str:
    """``HOST:PORT``, or ``[IPv6]:PORT`` for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServerListError(ValueError):
    """The ``--host`` value cannot be read; the message says which entry and why."""


def parse(text: str, default_port: int) -> tuple[Server, ...]:
    """The servers of a ``--host`` value, in order; ``ServerListError`` if one is wrong."""
    out = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            raise ServerListError(f"an empty entry in {text!r}" if "," in text else "no server given")
        out.append(_entry(entry, default_port))
    return tuple(out)


def _entry(entry: str, default_port: int) -> Server:
    bracketed = _BRACKETED.fullmatch(entry)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
        if not _is_ipv6(host):
            raise ServerListError(f"{entry!r}: not an IPv6 address in the brackets")
    elif entry.count(":") > 1:
        if not _is_ipv6(entry):
            raise ServerListError(f"{entry!r}: not HOST, HOST:PORT or [IPv6]:PORT")
        host, port = entry, None   # a bare IPv6 address: no port
    else:
        host, _, port = entry.partition(":")
        port = port if ":" in entry else None
    if not host or any(c.isspace() for c in host) or "[" in host or "]" in host:
        raise ServerListError(f"{entry!r}: not a host name or address")
    return Server(host, default_port if port is None else _port(entry, port))


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _port(entry: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ServerListError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(text)


class Failover:
    """Where the next login socket goes, and whether to wait before it.

    ``target`` is the server to try next (or being tried). The loop calls
    ``failed()`` when it could not open a login socket there; the session
    calls ``connected()`` when one opened (``start()``), ``online()`` when the
    user is back online (READY, or a resumed session attached) and
    ``lost()`` when an online connection is lost; and ``failed()`` too when a
    connection is lost before it was online again, or the server said "not
    now". ``failed()`` and ``lost()`` say whether to wait the backoff before
    trying ``target``.
    """

    def __init__(self, servers: Sequence[Server], clock: Callable[[], float] = time.monotonic):
        if not servers:
            raise ValueError("no servers")
        self.servers = tuple(servers)
        self.clock = clock
        self.current = 0           # index of the server in use (or whose socket opened last)
        self._start = 0            # index where this round started
        self._tried = 0            # servers of this round that have failed
        self._online_since: float | None = None

    @property
    def several(self) -> bool:
        return len(self.servers) > 1

    @property
    def target(self) -> Server:
        return self.servers[self._index()]

    @property
    def server(self) -> Server:
        """The current server: the one in use, or used last."""
        return self.servers[self.current]

    def _index(self) -> int:
        return (self._start + self._tried) % len(self.servers)

    def connected(self) -> None:
        """A login socket opened on ``target``: it is the current server now."""
        self.current = self._index()

    def online(self) -> None:
        """The session is online (again) on the current server: the round is over."""
        self._new_round()
        self._online_since = self.clock()

    def lost(self) -> bool:
        """The online connection was lost: a round from the current server.
        True if it should be tried at once (else wait the backoff first)."""
        since, self._online_since = self._online_since, None
        self._new_round()
        return self.several and since is not None and self.clock() - since >= STABLE_AFTER

    def failed(self) -> bool:
        """No session on ``target`` this time: move on. True if that ended
        the round, so wait the backoff (the next round starts at the current
        server); False to try the next ``target`` at once."""
        self._online_since = None
        self._tried += 1
        if self._tried < len(self.servers):
            return False
        self._new_round()
        return True

    def _new_round(self) -> None:
        self._start, self._tried = self.current, 0
