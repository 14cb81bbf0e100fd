"""A small HTTP/1.1 server in the reactor, for endpoints like ``/metrics``.

It knows nothing about chat: it is given a ``handler(method, target) ->
(status, headers, body)`` and answers each request with what the handler
returns. The parsing is h11's, a sans-I/O HTTP/1.1 state machine, so this
module only moves bytes between a ``Transport`` and an ``h11.Connection``,
exactly as ``server/peer.py`` does with our own protocol core. It runs on the
chat server's loop, without a thread, so it must never block and no client
may cost the loop more than a bounded amount of work:

- at most ``max_connections`` connections at once; one more is answered
  ``503`` and closed at once, before any state is made;
- a request's head may be at most ``max_request`` bytes (h11's
  ``max_incomplete_event_size``: ``431``), and its body too (``413``);
- each request must arrive complete within ``timeout`` seconds of the
  connection opening or of the previous response, so an idle keep-alive
  connection and a client trickling a byte at a time are both closed;
- while a client does not read its responses (the transport's buffer is over
  its high-water mark), its further pipelined requests are neither read nor
  answered.

Anything h11 cannot parse is answered with the status it suggests (``400``
mostly) and the connection is closed. Keep-alive and pipelining work as h11
allows: HTTP/1.0 or ``Connection: close`` closes after the response.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable

import h11

from selchat.reactor.listener import Listener
from selchat.reactor.transport import Transport

log = logging.getLogger("selchat.reactor.httpd")

#: ``handler(method, target)`` with both decoded as ASCII, e.g. ("GET", "/metrics").
RequestHandler = Callable[[str, str], "tuple[int, list[tuple[str, str]], bytes]"]

_BUSY_TEXT = b"too many connections\n"
#: The whole answer to a connection over the limit; sent without reading anything.
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT))


class HTTPServer:
    """Accepts HTTP connections on ``sock`` and answers them with ``handler``."""

    def __init__(self, loop, sock: socket.socket, handler: RequestHandler, *, max_connections: int = 16,
                 max_request: int = 8192, timeout: float = 10.0):
        self.loop = loop
        self.handler = handler
        self.max_connections = max_connections
        self.max_request = max_request
        self.timeout = timeout
        self.connections: set[HTTPConnection] = set()
        self.listener = Listener(loop, sock, self._accept)

    @property
    def address(self) -> tuple:
        return self.listener.address

    def _accept(self, sock: socket.socket, address) -> None:
        if len(self.connections) >= self.max_connections:
            try:
                sock.send(BUSY)
            except OSError:
                pass
            sock.close()
            return
        self.connections.add(HTTPConnection(self, sock))

    def close(self) -> None:
        """Stop accepting; let each open connection finish sending, then close it."""
        self.listener.close()
        for conn in list(self.connections):
            conn.transport.close()


class HTTPConnection:
    """One HTTP client: the Transport's protocol object, driving an h11.Connection."""

    __slots__ = ("server", "h11", "transport", "timer", "body_size", "request", "paused")

    def __init__(self, server: HTTPServer, sock: socket.socket):
        self.server = server
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_request)
        self.request: h11.Request | None = None
        self.body_size = 0
        self.paused = False  # the client is not reading its responses
        self.transport = Transport(server.loop, sock, self)
        self.timer = server.loop.call_later(server.timeout, self._timed_out)

    # -- the Transport's protocol interface ---------------------------------------

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._process()

    def eof_received(self) -> None:
        self.h11.receive_data(b"")
        self._process()

    def connection_lost(self, exc) -> None:
        self.timer.cancel()
        self.server.connections.discard(self)

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self.transport.resume_reading()
        self._process()  # requests already buffered wait for this

    # -- requests -----------------------------------------------------------------

    def _process(self) -> None:
        """Handle every complete event h11 has, until it needs more bytes."""
        conn = self.h11
        while not self.paused and not self.transport.closing:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, str(exc))
                return
            kind = type(event)
            if kind is h11.Request:
                self.request, self.body_size = event, 0
            elif kind is h11.Data:
                # Bodies are not used, only counted: a GET should have none.
                self.body_size += len(event.data)
                if self.body_size > self.server.max_request:
                    self._fail(413, "request body too large")
                    return
            elif kind is h11.EndOfMessage:
                self._respond(self.request)
            elif kind is h11.ConnectionClosed:
                self.transport.close()
                return
            else:  # NEED_DATA, or PAUSED (cannot happen: we answer at once)
                return

    def _respond(self, request: h11.Request) -> None:
        method = request.method.decode("ascii")
        target = request.target.decode("ascii", "replace")
        try:
            status, headers, body = self.server.handler(method, target)
        except Exception:
            log.exception("error answering %s %s", method, target)
            status, headers, body = 500, [("content-type", "text/plain")], b"internal error\n"
        self._send(status, headers, body, head=method == "HEAD")
        if self.h11.our_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.h11.start_next_cycle()
        self.timer.reset(self.server.timeout)

    def _fail(self, status: int, why: str) -> None:
        """The request cannot be read: answer ``status`` if we still can, and close."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._send(status, [("content-type", "text/plain"), ("connection", "close")],
                       f"{why}\n".encode("ascii", "replace"))
        self.transport.close()

    def _send(self, status: int, headers: list, body: bytes, head: bool = False) -> None:
        headers = [*headers, ("content-length", str(len(body)))]
        data = self.h11.send(h11.Response(status_code=status, headers=headers))
        if body and not head:  # a reply to HEAD has the length but not the body
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        self.transport.write(data)

    def _timed_out(self) -> None:
        """No complete request within the timeout: drop the connection, silently."""
        self.transport.close()
