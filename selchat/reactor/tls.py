"""Server-side TLS for the reactor: a ``Transport`` that speaks TLS.

``TLSTransport`` keeps everything the plain ``Transport`` promises (one
``recv`` per readiness event, one ``send`` per turn for everything written in
that turn, the same high/low water marks, the lingering close) and adds a
non-blocking handshake with a deadline.

Why memory BIOs rather than ``wrap_socket``
-------------------------------------------
The ``ssl.SSLObject`` sits on a pair of ``ssl.MemoryBIO`` (as in asyncio's
``sslproto``); the socket stays a plain non-blocking socket and this class
does its I/O itself. With ``SSLSocket`` the library does the system calls,
and that fights the reactor in four places, all of which disappear here:

* ``SSLSocket.send`` may stop half-way through a buffer with
  ``SSLWantWriteError`` and must then be retried with the same bytes and at
  least the same length, its progress invisible until it completes (Python
  does not enable partial writes). Writing into a memory BIO always completes,
  so ``_wbuf`` holds ciphertext and is sent exactly like plain bytes: the
  kernel's partial sends, ``del buf[:sent]``, EVENT_WRITE only while something
  is left.
* Records are read whole by OpenSSL and may sit decrypted in the SSL object
  where ``select()`` cannot see them (``pending()``). Here one ``recv`` feeds
  the incoming BIO and the SSL object is read until it wants more, so nothing
  is left behind, and one ``recv`` still gives one ``data_received``
  (at most ``RECV_SIZE`` of ciphertext, so the plaintext is bounded too).
* ``SSLWantWriteError`` during a read (a TLS 1.3 KeyUpdate answer, a
  renegotiation) cannot happen: whatever the SSL object wants to send lands in
  the outgoing BIO and is queued like any write. The server also refuses
  renegotiation (``OP_NO_RENEGOTIATION``).
* The close is ours: the close_notify alert is a few more bytes in the write
  buffer, then the same FIN and bounded linger as ``Transport``, on the same
  socket object. (``SSLSocket.shutdown`` drops its SSL object, and
  ``unwrap()`` on a non-blocking socket raises half-way.)

The cost is a copy of each chunk between the BIOs and our buffers, which is
nothing next to the encryption.

Lifecycle
---------
From accept the transport is *handshaking*: it reads whatever the pause state
(the handshake must progress even if the protocol paused reading), answers
through the write buffer, and keeps the protocol's writes (the server's HELLO)
as plaintext until the handshake completes; they are then encrypted and sent
in the next flush. The water marks count plaintext and ciphertext together.

The handshake must complete within ``handshake_timeout`` seconds of accept
(not extended by incoming bytes); otherwise the socket is aborted. A failed
handshake (a plaintext client, garbage, a client that rejects our certificate)
is logged at INFO with OpenSSL's reason, an EOF or reset during it at DEBUG;
either way only that socket is closed and the protocol gets
``connection_lost(exc)``. Nothing raises into the loop.

``close()`` encrypts and sends what is buffered, then a close_notify (we do
not wait for the peer's), then FIN, and reads and discards until the peer's
FIN, as ``Transport`` does and for the same reason (unread input makes the
kernel answer with RST, which can destroy our last bytes). Called during the
handshake, it lets the handshake finish first, so the buffered writes are
delivered. All of it, handshake, flush and linger, is bounded by ``LINGER``
seconds from ``close()``. ``abort()`` closes at once.

This class overrides whole methods of ``Transport`` and owns its close timer
and FIN state; from the base it uses ``__init__`` (the attributes and the
selector registration), ``_force_close``, ``pause_reading``, ``on_writable``,
``abort`` and ``on_error``.
"""

from __future__ import annotations

import logging
import ssl

from selchat.reactor.transport import (
    EVENT_READ,
    EVENT_WRITE,
    HIGH_WATER,
    LINGER,
    LOW_WATER,
    RECV_SIZE,
    Transport,
)

log = logging.getLogger("selchat.reactor")

HANDSHAKE_TIMEOUT = 10.0

_WOULD_BLOCK = (BlockingIOError, InterruptedError)


def server_context(certfile: str, keyfile: str | None = None, password=None) -> ssl.SSLContext:
    """A server ``SSLContext``: TLS 1.2 or later, the stdlib's modern ciphers
    (forward secret AEAD only), no compression, no renegotiation, no client
    certificates.

    A TCP EOF without close_notify reads as a plain EOF (``OP_IGNORE_UNEXPECTED_EOF``)
    rather than a fatal error, so a client that half-closes still gets our
    last frames, as over plaintext. Truncation gains an attacker nothing here:
    frames end with a newline and an unterminated tail is dropped at EOF, so
    only whole frames can be cut, as a forged RST could cut them anyway.

    ``keyfile`` may be omitted when ``certfile`` holds the key too. The
    certificate file should hold the full chain (leaf first).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0))
    ctx.load_cert_chain(certfile, keyfile, password)
    return ctx


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLCertVerificationError) or not reason:
        return str(exc) or type(exc).__name__
    return reason


class TLSTransport(Transport):
    """A server-side TLS connection on a non-blocking socket.

    ``TLSTransport(loop, sock, protocol, context=ctx)`` with ``ctx`` from
    ``server_context``; the protocol interface is the same as ``Transport``'s.
    """

    __slots__ = (
        "ssl_object", "_incoming", "_outgoing", "_plain", "_handshaking", "_handshake_timer",
        "_notified", "_close_timer",
    )

    def __init__(
        self,
        loop,
        sock,
        protocol,
        *,
        context: ssl.SSLContext,
        handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
    ):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._plain = bytearray()  # written by the protocol, not yet encrypted
        self._handshaking = True
        self._handshake_timer = None
        self._notified = False  # close_notify queued
        self._close_timer = None  # bounds close(): handshake, flush and linger together
        super().__init__(loop, sock, protocol, high_water, low_water)
        if handshake_timeout is not None:
            self._handshake_timer = loop.call_later(handshake_timeout, self._handshake_expired, handshake_timeout)

    # -- state --------------------------------------------------------------------

    @property
    def handshake_done(self) -> bool:
        return not self._handshaking and not self._closed

    @property
    def buffered(self) -> int:
        """Bytes written but not yet accepted by the kernel (plaintext and ciphertext)."""
        return len(self._plain) + len(self._wbuf)

    def _update_mask(self) -> None:
        if self._closed:
            return
        reading = self._want_read or (self._handshaking and not self._eof)
        mask = (EVENT_READ if reading else 0) | (EVENT_WRITE if self._wbuf else 0)
        if mask == self._mask:
            return
        if not mask:
            self._selector.unregister(self.sock)
        elif not self._mask:
            self._selector.register(self.sock, mask, self)
        else:
            self._selector.modify(self.sock, mask, self)
        self._mask = mask

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.want_flush(self)

    def _collect_output(self) -> None:
        """Move what the SSL object produced into the write buffer."""
        if self._outgoing.pending:
            self._wbuf += self._outgoing.read()
            self._schedule_flush()

    # -- handshake ----------------------------------------------------------------

    def _do_handshake(self) -> None:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self._collect_output()
            return
        except (ssl.SSLError, ValueError) as exc:
            self._handshake_failed(exc)
            return
        self._handshaking = False
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        log.debug("TLS with %s: %s %s", self.peername, self.ssl_object.version(), self.ssl_object.cipher()[0])
        self._collect_output()
        if self._plain or self._closing:
            self._schedule_flush()
        self._update_mask()

    def _handshake_failed(self, exc: BaseException) -> None:
        log.info("TLS handshake with %s failed: %s", self.peername, _reason(exc))
        # Best effort: our alert, if OpenSSL wrote one, tells the client why.
        alert = self._wbuf + self._outgoing.read()
        if alert:
            try:
                self.sock.send(alert)
            except OSError:
                pass
        self._force_close(exc)

    def _handshake_expired(self, timeout: float) -> None:
        self._handshake_timer = None
        if self._handshaking and not self._closed:
            log.info("TLS handshake with %s timed out after %g s", self.peername, timeout)
            self._force_close(TimeoutError(f"TLS handshake not completed within {timeout:g} s"))

    # -- reading ------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            if self._handshaking:
                log.debug("connection from %s lost during TLS handshake: %s", self.peername, exc)
            self._force_close(exc)
            return
        if self._handshaking:
            if not data:
                log.debug("%s closed the connection during the TLS handshake", self.peername)
                self._force_close(ConnectionResetError("EOF during TLS handshake"))
                return
            self._incoming.write(data)
            self._do_handshake()
            if self._closed or self._handshaking:
                return
            # Application data may have come in the same segment as the
            # client's Finished; read it now unless reading is paused (then
            # resume_reading picks it up: select() would not report it).
            if self._want_read and not self._closing:
                self._read_records()
            return
        if self._closing:  # flushing or lingering: discard input until the peer closes
            if not data:
                self._peer_closed_while_closing()
            return
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        self._read_records()

    def _read_records(self) -> None:
        """Decrypt everything the incoming BIO holds; one ``data_received`` for it."""
        chunks = []
        eof = False
        while True:
            try:
                chunk = self.ssl_object.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify
                eof = True
                break
            except ssl.SSLEOFError:  # TCP EOF without close_notify (a context without OP_IGNORE_UNEXPECTED_EOF)
                log.debug("%s closed without TLS close_notify", self.peername)
                eof = True
                break
            except ssl.SSLError as exc:
                log.info("TLS error from %s: %s", self.peername, _reason(exc))
                self._force_close(exc)
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        self._collect_output()  # e.g. an answer to a KeyUpdate
        if self._plain:
            self._schedule_flush()  # in case a write had to wait for this read
        if chunks:
            self.protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof and not self._closed:
            self._eof = True
            self._want_read = False
            if self._closing:
                if self._fin_sent:
                    self._force_close(None)
                else:
                    self._update_mask()
                return
            self._update_mask()
            self.protocol.eof_received()

    def _peer_closed_while_closing(self) -> None:
        self._eof = True
        self._want_read = False
        if self._fin_sent or not (self._wbuf or self._plain):
            self._force_close(None)
        else:  # still sending our last bytes: finish, then close without lingering
            self._update_mask()

    def resume_reading(self) -> None:
        if self._want_read:
            return
        self._want_read = True
        self._update_mask()
        if not self._handshaking and not self._closing and (self._incoming.pending or self.ssl_object.pending()):
            self.loop.call_soon(self._read_buffered)

    def _read_buffered(self) -> None:
        if self._closed or self._closing or self._eof or not self._want_read:
            return
        try:
            self._read_records()
        except Exception as exc:  # a protocol callback raised: same as in the reactor's dispatch
            log.exception("error in handler %r", self)
            self.on_error(exc)

    # -- writing ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closing or self._closed:
            return
        self._plain += data
        self._schedule_flush()
        if not self._writing_paused and self.buffered > self.high_water:
            self._writing_paused = True
            self.protocol.pause_writing()

    def flush(self) -> None:
        """Encrypt what was written, send what is buffered; once per turn."""
        self._flush_pending = False
        if self._closed:
            return
        if not self._handshaking:
            if self._plain:
                try:
                    self.ssl_object.write(self._plain)
                except ssl.SSLWantReadError:
                    pass  # only mid-renegotiation, which we refuse; retried after the next read
                except ssl.SSLError as exc:
                    # After an EOF without close_notify OpenSSL refuses to write
                    # (unless the context ignores such EOFs): the peer is gone.
                    log.log(logging.DEBUG if self._eof else logging.INFO,
                            "TLS error writing to %s: %s", self.peername, _reason(exc))
                    self._force_close(exc)
                    return
                else:
                    self._plain.clear()
            if self._closing and not self._plain and not self._notified:
                self._queue_close_notify()
            self._collect_output()
        if self._wbuf and not self._send_buffered():
            return
        self._after_send()

    def _after_send(self) -> None:
        if self._writing_paused and self.buffered <= self.low_water:
            self._writing_paused = False
            self.protocol.resume_writing()
        if self._closing and self._notified and not self._wbuf:
            self._shutdown_write()
            return
        self._update_mask()

    # -- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Hand the protocol nothing more; send what is buffered and a close_notify, then close."""
        if self._closing or self._closed:
            return
        self._closing = True
        self._want_read = not self._eof  # keep draining input while we linger
        self._close_timer = self.loop.call_later(LINGER, self._close_expired)
        if self._handshaking:  # finish it first (bounded by the deadline): the writes are owed
            self._update_mask()
            return
        self._schedule_flush()

    def _queue_close_notify(self) -> None:
        self._notified = True
        try:
            self.ssl_object.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify has not come: we do not wait for it
        except (ssl.SSLError, ValueError) as exc:
            log.debug("TLS shutdown with %s: %s", self.peername, _reason(exc))

    def _close_expired(self) -> None:
        self._close_timer = None
        self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        for timer in (self._handshake_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._handshake_timer = self._close_timer = None
        self._plain.clear()
        super()._force_close(exc)

    def __repr__(self) -> str:
        state = ("closed" if self._closed else "closing" if self._closing
                 else "handshaking" if self._handshaking else "open")
        return f"<TLSTransport {self.peername} {state} buffered={self.buffered}>"
