"""A listening socket in the reactor.

Accepts at most ``max_per_turn`` connections per readiness event so that a
connect flood cannot starve the clients already connected. When the process
runs out of descriptors (EMFILE/ENFILE) the listener stops accepting for
``backoff`` seconds instead of spinning on a socket that stays readable.
"""

from __future__ import annotations

import logging
import selectors
import socket
from typing import Callable

from selchat.reactor.transport import is_descriptor_exhaustion

log = logging.getLogger("selchat.reactor")


class Listener:
    __slots__ = ("loop", "sock", "on_accept", "max_per_turn", "backoff", "_registered", "_closed")

    def __init__(
        self,
        loop,
        sock: socket.socket,
        on_accept: Callable[[socket.socket, tuple], None],
        max_per_turn: int = 64,
        backoff: float = 1.0,
    ):
        sock.setblocking(False)
        self.loop = loop
        self.sock = sock
        self.on_accept = on_accept
        self.max_per_turn = max_per_turn
        self.backoff = backoff
        self._closed = False
        self._registered = False
        self._register()

    @property
    def address(self) -> tuple:
        return self.sock.getsockname()

    def _register(self) -> None:
        if not self._registered and not self._closed:
            self.loop.selector.register(self.sock, selectors.EVENT_READ, self)
            self._registered = True

    def _unregister(self) -> None:
        if self._registered:
            self.loop.selector.unregister(self.sock)
            self._registered = False

    def on_readable(self) -> None:
        for _ in range(self.max_per_turn):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if is_descriptor_exhaustion(exc):
                    log.warning("accept failed (%s); not accepting for %.1f s", exc.strerror, self.backoff)
                    self._unregister()
                    self.loop.call_later(self.backoff, self._register)
                else:
                    log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.on_accept(conn, addr)
            except Exception:
                log.exception("error setting up connection from %s", addr)
                conn.close()

    def on_writable(self) -> None:  # never registered for writing
        pass

    def on_error(self, exc: BaseException) -> None:
        pass

    def close(self) -> None:
        self._unregister()
        self._closed = True
        self.sock.close()


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket with SO_REUSEADDR (so a restart rebinds at once)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
