"""Client-side TLS: the context, the handshake (blocking or on the loop), and
what to tell the user when it fails.

``selchat connect --tls`` wraps each of the three sockets in an
``ssl.SSLSocket`` (``SSLContext.wrap_socket``) with ``server_hostname`` set to
``--host``: the server's certificate must chain to a trusted CA (the system
store, or only the PEM bundle of ``--ca``) and name that host (a DNS name or
an IP address in its subjectAltName). SNI carries the name too, unless it is
an address.

Why ``SSLSocket`` here when the server uses memory BIOs (``selchat/reactor/tls.py``):
the client has three sockets and a handful of frames a second, and its
``app.Transport`` already does one ``recv`` per readiness and keeps unsent
bytes in a buffer it only trims after a successful ``send``; that is exactly
what a non-blocking ``SSLSocket`` needs (a ``send`` that raised
``SSLWantWriteError`` is retried with the same bytes, and more). What the
transport adds for TLS is in ``app.Transport``: the two "want" errors, and
draining ``pending()`` after a read, since ``select`` cannot see bytes already
decrypted inside the SSL object.

The handshake of the first login socket is done blocking, before the loop
starts, like its TCP connect; the chat and check sockets and every reconnect
do theirs on the loop (``handshake_async``). Either way it must complete
within ``timeout`` seconds (the client's connect timeout).

Failures are sorted into two kinds (``is_fatal``): the certificate cannot be
trusted, or the server does not speak TLS (or not a version we accept); trying
again will not change that, so the client says why and exits 2 at once. An EOF
or a reset during the handshake, or a timeout, may be passing, and counts like
a failed TCP connect (``--retry``, reconnecting).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl

#: Reasons that say the peer spoke something other than TLS.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                      "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "RECORD_LENGTH_MISMATCH", "UNEXPECTED_RECORD"})
_SSL_TEXT = re.compile(r"^\[[^\]]*\]\s*(.*?)\s*(\(_ssl\.c:\d+\))?$")


class CAError(ValueError):
    """The --ca file cannot be used; the message says why."""


class HandshakeTimeout(TimeoutError):
    """The TLS handshake did not complete in time."""


def client_context(ca: str | None = None) -> ssl.SSLContext:
    """A client ``SSLContext``: certificate and host name checked, TLS 1.2 or later.

    With ``ca`` (a PEM file of one or more CA certificates) only those CAs are
    trusted; without it, the system's store. ``CAError`` if ``ca`` cannot be read
    or holds no certificate.
    """
    if ca is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        try:   # the same settings; with a cafile the system's CAs are not loaded
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        except FileNotFoundError:
            raise CAError(f"{ca}: no such file") from None
        except IsADirectoryError:
            raise CAError(f"{ca}: is a directory, not a PEM file") from None
        except ssl.SSLError as err:
            raise CAError(f"{ca}: not a PEM file of CA certificates ({_text(err)})") from None
        except OSError as err:
            raise CAError(f"{ca}: {err.strerror or err}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return ctx


def _text(err: ssl.SSLError) -> str:
    """OpenSSL's words without the ``[SSL: CODE]`` and ``(_ssl.c:1006)`` wrapping."""
    raw = err.args[1] if len(err.args) > 1 and isinstance(err.args[1], str) else str(err)
    match = _SSL_TEXT.match(raw)
    text = match.group(1) if match else raw
    if not text and err.reason:
        text = err.reason.lower().replace("_", " ")
    return text or type(err).__name__


def is_fatal(err: BaseException) -> bool:
    """A TLS failure that trying again will not mend: an untrusted certificate,
    or a server that does not speak (our) TLS. EOFs, resets and timeouts are not."""
    return isinstance(err, ssl.SSLError) and not isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError))


def describe(err: ssl.SSLError | HandshakeTimeout) -> str:
    """What to tell the user about a TLS error, starting with ``TLS: ``."""
    if isinstance(err, HandshakeTimeout):
        return str(err)
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {err.verify_message or _text(err)}"
    if isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "TLS: the server closed the connection during the handshake"
    text = f"TLS: handshake failed: {_text(err)}"
    if err.reason in _NOT_TLS:
        text += " (does the server serve TLS?)"
    return text


def wrap(sock: socket.socket, ctx: ssl.SSLContext, hostname: str) -> ssl.SSLSocket:
    """``sock`` (connected) as an ``SSLSocket`` whose handshake is still to do.

    The ``SSLSocket`` takes over the descriptor; on failure ``sock`` is closed.
    """
    try:
        return ctx.wrap_socket(sock, server_hostname=hostname, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise


def handshake(sock: socket.socket, ctx: ssl.SSLContext, hostname: str, timeout: float) -> ssl.SSLSocket:
    """Blocking: the TLS handshake on a connected ``sock``, within ``timeout`` s in all.

    CPython's ``do_handshake`` on a socket with a timeout counts it from the
    start of the whole handshake, not per read, so a server trickling bytes
    cannot stretch it. Returns the ``SSLSocket`` (still with that timeout);
    on any failure the socket is closed and the error raised.
    """
    ssock = wrap(sock, ctx, hostname)
    try:
        ssock.settimeout(timeout)
        ssock.do_handshake()
    except socket.timeout:
        ssock.close()
        raise HandshakeTimeout(f"TLS: handshake not completed within {timeout:g} s") from None
    except BaseException:
        ssock.close()
        raise
    return ssock


async def handshake_async(loop: asyncio.AbstractEventLoop, sock: socket.socket, ctx: ssl.SSLContext,
                          hostname: str, timeout: float) -> ssl.SSLSocket:
    """The TLS handshake on a connected non-blocking ``sock``, on the loop.

    ``do_handshake`` is retried each time the socket becomes readable (or
    writable) as OpenSSL asks; the whole is bounded by ``timeout``. On failure
    or cancellation the socket is closed.
    """
    ssock = wrap(sock, ctx, hostname)
    try:
        await asyncio.wait_for(_handshake_steps(loop, ssock), timeout)
    except asyncio.TimeoutError:
        ssock.close()
        raise HandshakeTimeout(f"TLS: handshake not completed within {timeout:g} s") from None
    except BaseException:
        ssock.close()
        raise
    return ssock


async def _handshake_steps(loop: asyncio.AbstractEventLoop, ssock: ssl.SSLSocket) -> None:
    ssock.setblocking(False)
    fd = ssock.fileno()
    while True:
        try:
            ssock.do_handshake()
            return
        except ssl.SSLWantReadError:
            watch, unwatch = loop.add_reader, loop.remove_reader
        except ssl.SSLWantWriteError:
            watch, unwatch = loop.add_writer, loop.remove_writer
        ready = loop.create_future()
        watch(fd, _wake, ready)
        try:
            await ready
        finally:
            unwatch(fd)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
