"""A non-blocking socket with a bounded write buffer, after asyncio's transports.

Reading: the reactor calls ``on_readable``; one ``recv`` per readiness event,
handed to ``protocol.data_received``. ``pause_reading`` simply drops
EVENT_READ from the selector registration.

Writing: ``write`` appends to a bytearray and asks the reactor to flush this
transport at the end of the turn, so everything written to one socket in one
turn leaves in one ``send``. Whatever the kernel does not take stays buffered
and EVENT_WRITE is registered only while it does. Past ``high_water`` bytes
buffered the protocol's ``pause_writing`` is called, and ``resume_writing``
once the buffer drains below ``low_water``: the protocol must then stop
feeding this transport (the server pauses whoever writes into it).

``close`` flushes what is buffered, then half-closes (FIN) and keeps reading,
discarding, until the peer closes too: closing a socket with unread input
makes the kernel send RST, and an RST can destroy the last frame we sent (a
BYE) before the peer reads it. Flushing and lingering together last at most
``LINGER`` seconds, so a peer that reads nothing cannot keep the socket open.
``abort`` closes at once.

The protocol object must have: data_received(bytes), eof_received(),
connection_lost(exc | None), pause_writing(), resume_writing().
"""

from __future__ import annotations

import errno
import logging
import operator
import selectors
import socket

log = logging.getLogger("selchat.reactor")

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

RECV_SIZE = 64 * 1024
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
LINGER = 2.0

_WOULD_BLOCK = (BlockingIOError, InterruptedError)


class Transport:
    __slots__ = (
        "loop", "sock", "protocol", "peername", "_selector", "_mask", "_wbuf", "_flush_later",
        "_want_read", "_flush_pending", "_closing", "_closed", "_writing_paused", "_eof", "_linger", "_fin_sent",
        "high_water", "low_water",
    )

    def __init__(self, loop, sock: socket.socket, protocol, high_water: int = HIGH_WATER, low_water: int = LOW_WATER):
        sock.setblocking(False)
        self.loop = loop
        self.sock = sock
        self.protocol = protocol
        try:
            self.peername = sock.getpeername()
        except OSError:
            self.peername = None
        self._selector = loop.selector
        self._flush_later = loop.to_flush.append  # Reactor.want_flush without its Python frame
        self._wbuf = bytearray()
        self._want_read = True
        self._flush_pending = False
        self._closing = False
        self._closed = False
        self._writing_paused = False
        self._eof = False
        self._linger = None
        self._fin_sent = False
        self.high_water = high_water
        self.low_water = low_water
        self._mask = EVENT_READ
        self._selector.register(sock, EVENT_READ, self)

    # -- state --------------------------------------------------------------------

    #: Closed, or closing (flushing and lingering). ``_force_close`` sets
    #: ``_closing`` too, so it alone says both; read through a C getter (no
    #: Python frame): the relay checks it on every read.
    closing = property(operator.attrgetter("_closing"))
    closed = property(operator.attrgetter("_closed"))

    @property
    def buffered(self) -> int:
        """Bytes written but not yet accepted by the kernel."""
        return len(self._wbuf)

    def _update_mask(self) -> None:
        if self._closed:
            return
        mask = (EVENT_READ if self._want_read else 0) | (EVENT_WRITE if self._wbuf else 0)
        if mask == self._mask:
            return
        if not mask:
            self._selector.unregister(self.sock)
        elif not self._mask:
            self._selector.register(self.sock, mask, self)
        else:
            self._selector.modify(self.sock, mask, self)
        self._mask = mask

    # -- reading ------------------------------------------------------------------

    def pause_reading(self) -> None:
        if self._want_read:
            self._want_read = False
            self._update_mask()

    def resume_reading(self) -> None:
        if not self._want_read:
            self._want_read = True
            self._update_mask()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            self._force_close(exc)
            return
        if self._closing:  # lingering: discard until the peer closes
            if not data:
                # The peer is done sending; finish sending what we still
                # owe it (a half-closing peer still reads), then close.
                self._eof = True
                self._want_read = False
                if self._wbuf:
                    self._update_mask()
                else:
                    self._force_close(None)
            return
        if data:
            self.protocol.data_received(data)
        else:
            self._eof = True
            self._want_read = False
            self._update_mask()
            self.protocol.eof_received()

    # -- writing ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closing or self._closed:
            return
        self._wbuf += data
        if not self._flush_pending:
            self._flush_pending = True
            self._flush_later(self)
        if not self._writing_paused and len(self._wbuf) > self.high_water:
            self._writing_paused = True
            self.protocol.pause_writing()

    def flush(self) -> None:
        """Send what is buffered; called by the reactor at the end of a turn."""
        self._flush_pending = False
        wbuf = self._wbuf
        if self._closed or not wbuf:
            return
        try:
            sent = self.sock.send(wbuf)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self._force_close(exc)
            return
        if sent == len(wbuf):
            wbuf.clear()
            if self._mask == EVENT_READ and not self._closing and not self._writing_paused:
                return  # the usual case: all sent, still reading, nothing to change
        elif sent:
            del wbuf[:sent]
        self._after_send()

    def _send_buffered(self) -> bool:
        """One ``send`` of the write buffer; False if the socket failed (it is closed).
        (``flush`` does the same inline: it runs once per relayed block.)"""
        try:
            sent = self.sock.send(self._wbuf)
        except _WOULD_BLOCK:
            return True
        except OSError as exc:
            self._force_close(exc)
            return False
        if sent:
            del self._wbuf[:sent]
        return True

    def on_writable(self) -> None:
        self.flush()

    def _after_send(self) -> None:
        if self._writing_paused and len(self._wbuf) <= self.low_water:
            self._writing_paused = False
            self.protocol.resume_writing()
        if not self._wbuf and self._closing:
            self._shutdown_write()
            return
        self._update_mask()

    # -- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Hand the protocol nothing more; send what is buffered, then close."""
        if self._closing or self._closed:
            return
        self._closing = True
        self._want_read = not self._eof  # keep draining input while we linger
        self._linger = self.loop.call_later(LINGER, self._force_close, None)
        if self._wbuf:
            self._update_mask()
            if not self._flush_pending:
                self._flush_pending = True
                self.loop.want_flush(self)
        else:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        """All sent: send FIN (once), then wait (until the linger timer) for the peer's FIN."""
        if self._closed or self._fin_sent:
            return
        if self._eof:
            self._force_close(None)
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._force_close(None)
            return
        self._fin_sent = True
        self._update_mask()

    def abort(self) -> None:
        """Close now, dropping anything buffered."""
        self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        if self._linger is not None:
            self._linger.cancel()
        if self._mask:
            self._selector.unregister(self.sock)
            self._mask = 0
        self._wbuf.clear()
        try:
            self.sock.close()
        finally:
            self.loop.call_soon(self.protocol.connection_lost, exc)

    def on_error(self, exc: BaseException) -> None:
        """A protocol callback raised: drop this connection, keep the loop."""
        self._force_close(exc)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        return f"<Transport {self.peername} {state} buffered={len(self._wbuf)}>"


def is_descriptor_exhaustion(exc: OSError) -> bool:
    return exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
