"""TLSTransport over real loopback sockets, against the stdlib's TLS client.

A real Reactor runs in a background thread with a Listener whose accepted
sockets are wrapped in TLSTransport around a small line-echo protocol. The
test thread is the client. Nothing sleeps: every wait is for a condition (the
protocol notifies a threading.Condition) or for socket readiness, each with a
deadline.
"""

from __future__ import annotations

import concurrent.futures
import logging
import selectors
import socket
import ssl
import threading
import time

import pytest
import trustme

from selchat.reactor import tls
from selchat.reactor.listener import Listener, bind
from selchat.reactor.loop import Reactor
from selchat.reactor.tls import TLSTransport, server_context
from selchat.reactor.transport import HIGH_WATER, LINGER, RECV_SIZE
from tests.support import DEADLINE

HOST = "localhost"


# -- certificates -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def context(ca, tmp_path_factory):
    """The server context, built by ``server_context`` from PEM files."""
    cert = ca.issue_cert(HOST, "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(certfile), append=i > 0)
    cert.private_key_pem.write_to_path(str(keyfile))
    return server_context(str(certfile), str(keyfile))


@pytest.fixture(scope="module")
def client_context(ca):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture(autouse=True)
def no_errors_logged(caplog):
    """Nothing a client does may raise into the loop (it would be logged as an error)."""
    caplog.set_level(logging.DEBUG, logger="selchat")
    yield
    bad = [r for r in caplog.records if r.name.startswith("selchat") and r.levelno >= logging.WARNING]
    assert not bad, [r.getMessage() for r in bad]


# -- the server side ------------------------------------------------------------------


class LineEcho:
    """Echoes complete lines; ``/close``, ``/abort`` and ``/bulk N`` are commands.

    Writes ``greeting`` at accept, before the handshake can have completed.
    Stops reading while the transport is over its high-water mark.
    """

    def __init__(self, server: TLSServer):
        self.server = server
        self.transport: TLSTransport | None = None
        self.buf = b""
        self.received = 0
        self.first_data_at: float | None = None
        self.pauses = self.resumes = 0
        self.max_buffered = 0
        self.eof = False
        self.lost = False
        self.lost_exc: BaseException | None = None

    def attach(self, transport: TLSTransport) -> None:
        self.transport = transport
        self.write(self.server.greeting)
        if self.server.close_at_accept:
            transport.close()
        if self.server.pause_at_accept:  # the test resumes it
            transport.pause_reading()

    def write(self, data: bytes) -> None:
        self.transport.write(data)
        self.max_buffered = max(self.max_buffered, self.transport.buffered)

    def data_received(self, data: bytes) -> None:
        if self.first_data_at is None:
            self.first_data_at = time.monotonic()
        self.received += len(data)
        *lines, self.buf = (self.buf + data).split(b"\n")
        echo = []
        for line in lines:
            if line == b"/close":
                self.write(b"".join(echo) + b"BYE\n")
                self.transport.close()
                break
            if line == b"/abort":
                self.transport.abort()
                break
            if line.startswith(b"/bulk "):
                self.write(b"".join(echo) + bulk(int(line.split()[1])))
                self.transport.close()
                break
            echo.append(line + b"\n")
        else:
            if echo:
                self.write(b"".join(echo))
        self.server.changed()

    def eof_received(self) -> None:
        self.eof = True
        if self.server.bye_on_eof:
            self.write(b"BYE\n")
        self.transport.close()
        self.server.changed()

    def connection_lost(self, exc) -> None:
        self.lost, self.lost_exc = True, exc
        self.server.changed()

    def pause_writing(self) -> None:
        self.pauses += 1
        self.transport.pause_reading()
        self.server.changed()

    def resume_writing(self) -> None:
        self.resumes += 1
        self.transport.resume_reading()
        self.server.changed()


class TLSServer:
    """A Reactor on a thread with a Listener that wraps every socket in TLSTransport."""

    def __init__(self, context, *, handshake_timeout: float = DEADLINE, greeting: bytes = b"HELLO\n",
                 sndbuf: int | None = None, close_at_accept: bool = False, pause_at_accept: bool = False,
                 bye_on_eof: bool = False):
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.greeting = greeting
        self.sndbuf = sndbuf
        self.close_at_accept = close_at_accept
        self.pause_at_accept = pause_at_accept
        self.bye_on_eof = bye_on_eof
        self.protocols: list[LineEcho] = []
        self.cond = threading.Condition()
        self.reactor = Reactor(tick=0.01)
        self.listener = Listener(self.reactor, bind("127.0.0.1", 0), self.accept)
        self.address = self.listener.address
        self.thread = threading.Thread(target=self.reactor.run, name="tls-reactor", daemon=True)
        self.thread.start()

    def accept(self, sock: socket.socket, addr) -> None:
        if self.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        proto = LineEcho(self)
        proto.attach(TLSTransport(self.reactor, sock, proto, context=self.context,
                                  handshake_timeout=self.handshake_timeout))
        self.protocols.append(proto)
        self.changed()

    def changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, predicate, what: str, timeout: float = DEADLINE):
        with self.cond:
            result = self.cond.wait_for(predicate, timeout)
        assert result, f"timed out waiting for {what}"
        return result

    def protocol(self, index: int) -> LineEcho:
        return self.wait_for(lambda: len(self.protocols) > index and self.protocols[index], f"accept #{index}")

    def stop(self) -> None:
        def shut():
            self.listener.close()
            for proto in self.protocols:
                proto.transport.abort()
            self.reactor.stop()
        self.reactor.call_soon_threadsafe(shut)
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "reactor did not stop"
        self.reactor.close()


@pytest.fixture
def make_server(context):
    servers = []

    def start(**kwargs) -> TLSServer:
        srv = TLSServer(context, **kwargs)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


# -- the client side ------------------------------------------------------------------


def bulk(n: int) -> bytes:
    """``n`` bytes of numbered 1 KiB lines (so a loss or a reordering shows)."""
    line_count = -(-n // 1024)
    data = b"".join(b"%07d " % i + b"x" * 1015 + b"\n" for i in range(line_count))
    return data[:n]


def raw_connect(server: TLSServer, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(DEADLINE)
    sock.connect(server.address)
    return sock


class Client:
    """A verifying TLS client (blocking, with a deadline on every call)."""

    def __init__(self, server: TLSServer, ctx: ssl.SSLContext, raw: socket.socket | None = None):
        raw = raw or raw_connect(server)
        # suppress_ragged_eofs=False: a clean close (close_notify) reads as b"",
        # a bare TCP close raises SSLEOFError, so the tests can tell them apart.
        self.sock = ctx.wrap_socket(raw, server_hostname=HOST, suppress_ragged_eofs=False)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(RECV_SIZE)
            assert chunk, f"EOF after {len(self.buf)} of {n} bytes"
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(RECV_SIZE)
            assert chunk, f"EOF before a line; have {self.buf!r}"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def expect_close_notify(self) -> None:
        assert self.buf == b""
        assert self.sock.recv(RECV_SIZE) == b""

    def close(self) -> None:
        self.sock.close()


def expect_closed(sock: socket.socket) -> bytes:
    """Read a plain socket until the server closes it (FIN or RST); return what came."""
    data = b""
    try:
        while chunk := sock.recv(RECV_SIZE):
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return data


def client_hello(ctx: ssl.SSLContext) -> bytes:
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


# -- tests ----------------------------------------------------------------------------


def test_echo_round_trip_after_a_verified_handshake(make_server, client_context):
    server = make_server()
    client = Client(server, client_context)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert client.line() == b"HELLO"  # written at accept, before the handshake
    client.send(b"one\ntwo\n")
    client.send(b"thr")
    client.send(b"ee\n")
    assert [client.line() for _ in range(3)] == [b"one", b"two", b"three"]
    proto = server.protocol(0)
    assert proto.transport.handshake_done and not proto.lost
    client.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_server_context_refuses_old_protocols(make_server, context):
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    server = make_server()
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    try:
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        old.wrap_socket(raw_connect(server), server_hostname=HOST)
    server.wait_for(lambda: server.protocols and server.protocols[0].lost, "refused handshake to close")


def test_large_payload_with_backpressure_loses_nothing(make_server, client_context):
    server = make_server(sndbuf=32 * 1024)
    raw = raw_connect(server, rcvbuf=32 * 1024)
    client = Client(server, client_context, raw)
    assert client.line() == b"HELLO"
    proto = server.protocol(0)
    payload = bulk(4 * 1024 * 1024)
    sock = client.sock
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    sent, received, chunk = 0, bytearray(), 16 * 1024
    deadline = time.monotonic() + DEADLINE
    # Send without reading until the server reports its write buffer over the
    # high-water mark (and so stops reading), then read and write together.
    while len(received) < len(payload):
        assert time.monotonic() < deadline, f"stuck: sent {sent}, received {len(received)}"
        reading = proto.pauses > 0 or sent == len(payload)
        for _, mask in sel.select(0.05):
            if mask & selectors.EVENT_WRITE and sent < len(payload):
                try:  # after SSLWantWrite the same bytes are retried: chunk boundaries are fixed
                    sent += sock.send(payload[sent:sent + chunk])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
            if mask & selectors.EVENT_READ and reading:
                try:
                    while data := sock.recv(RECV_SIZE):  # drain what the SSL object holds
                        received += data
                    raise AssertionError("server closed during the echo")
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
        reading = proto.pauses > 0 or sent == len(payload)  # so never neither
        sel.modify(sock, (selectors.EVENT_READ if reading else 0)
                   | (selectors.EVENT_WRITE if sent < len(payload) else 0))
    sel.close()
    assert bytes(received) == payload
    assert proto.pauses >= 1
    # the client can have the last bytes before the reactor thread is back from send()
    server.wait_for(lambda: proto.resumes == proto.pauses, "resume_writing after the last pause")
    # memory stays bounded: the high-water mark plus about one read
    assert proto.max_buffered <= HIGH_WATER + 2 * RECV_SIZE, proto.max_buffered
    sock.setblocking(True)
    sock.settimeout(DEADLINE)
    client.send(b"/close\n")
    assert client.line() == b"BYE"
    client.expect_close_notify()


def test_large_write_before_the_handshake_arrives_after_it(make_server, client_context):
    greeting = bulk(300 * 1024)
    server = make_server(greeting=greeting)
    client = Client(server, client_context)
    proto = server.protocol(0)
    assert proto.pauses == 1  # 300 KiB written at accept is over the high-water mark
    assert client.read(len(greeting)) == greeting
    server.wait_for(lambda: proto.resumes == 1, "resume_writing once drained")
    client.send(b"after\n")
    assert client.line() == b"after"


def test_close_before_the_handshake_still_delivers_the_greeting(make_server, client_context):
    server = make_server(close_at_accept=True)
    client = Client(server, client_context)
    assert client.line() == b"HELLO"
    client.expect_close_notify()
    client.close()  # our FIN ends the server's linger
    proto = server.protocol(0)
    server.wait_for(lambda: proto.lost, "connection_lost")
    assert proto.lost_exc is None


def test_reading_paused_before_the_handshake(make_server, client_context):
    """The handshake progresses while the protocol has paused reading, and
    application data that came in the same segment as the client's Finished
    (so select() will not report it) is handed over on resume_reading."""
    server = make_server(pause_at_accept=True)
    raw = raw_connect(server)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context.wrap_bio(incoming, outgoing, server_hostname=HOST)
    while True:  # a hand-driven client, so we choose how its bytes are cut into segments
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                raw.sendall(outgoing.read())
            data = raw.recv(RECV_SIZE)
            assert data, "server closed during the handshake"
            incoming.write(data)
    assert tls.version() == "TLSv1.3"  # where the client's Finished is its last handshake bytes
    tls.write(b"early\n")
    raw.sendall(outgoing.read())  # Finished and the first record, in one segment
    proto = server.protocol(0)
    resumed = []

    def resume():
        resumed.append(time.monotonic())
        proto.transport.resume_reading()
    server.reactor.call_soon_threadsafe(resume)
    received = b""
    while received.count(b"\n") < 2:
        try:
            received += tls.read(RECV_SIZE)
        except ssl.SSLWantReadError:
            data = raw.recv(RECV_SIZE)
            assert data, f"server closed; got {received!r}"
            incoming.write(data)
    assert received == b"HELLO\nearly\n"
    assert proto.first_data_at >= resumed[0]  # nothing handed over while paused
    raw.close()


def test_many_concurrent_clients(make_server, client_context):
    server = make_server()
    count = 40
    barrier = threading.Barrier(count)

    def one(i: int) -> None:
        raw = raw_connect(server)
        barrier.wait(DEADLINE)  # all connected: the handshakes interleave in the reactor
        client = Client(server, client_context, raw)
        assert client.line() == b"HELLO"
        lines = [b"client %d line %d" % (i, j) for j in range(20)]
        client.send(b"".join(line + b"\n" for line in lines))
        assert [client.line() for _ in lines] == lines
        barrier.wait(DEADLINE)  # all still connected at once
        client.send(b"/close\n")
        assert client.line() == b"BYE"
        client.expect_close_notify()
        client.close()

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(one, i) for i in range(count)]:
            future.result(timeout=DEADLINE)
    server.wait_for(lambda: len(server.protocols) == count and all(p.lost for p in server.protocols),
                    "every connection to close")
    assert all(p.lost_exc is None for p in server.protocols)


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"LOGIN alice secret\n",
    bytes(range(256)) * 64,
], ids=["http", "selchat-plaintext", "binary"])
def test_plaintext_client_is_closed_without_disturbing_a_tls_client(make_server, client_context, caplog, garbage):
    server = make_server()
    good = Client(server, client_context)
    assert good.line() == b"HELLO"
    bad = raw_connect(server)
    try:
        bad.sendall(garbage)
    except OSError:
        pass  # closed already
    reply = expect_closed(bad)
    assert b"HELLO" not in reply  # no plaintext ever leaves a TLS transport
    proto = server.protocol(1)
    server.wait_for(lambda: proto.lost, "the plaintext connection to be dropped")
    assert isinstance(proto.lost_exc, ssl.SSLError)
    assert any("TLS handshake" in r.getMessage() and "failed" in r.getMessage()
               and r.levelno == logging.INFO for r in caplog.records)
    good.send(b"still here\n")
    assert good.line() == b"still here"


def test_silent_and_slow_clients_are_aborted_at_the_handshake_deadline(make_server, client_context, caplog):
    timeout = 0.3
    server = make_server(handshake_timeout=timeout)
    good = Client(server, client_context)  # handshakes at once: its deadline is cancelled
    assert good.line() == b"HELLO"
    started = time.monotonic()
    silent = raw_connect(server)
    slow = raw_connect(server)
    slow.sendall(client_hello(client_context)[:20])  # a client hello begun, never finished
    assert expect_closed(silent) == b""
    assert expect_closed(slow) == b""
    assert time.monotonic() - started >= timeout  # timers never fire early
    for index in (1, 2):
        proto = server.protocol(index)
        server.wait_for(lambda: proto.lost, "connection_lost")
        assert isinstance(proto.lost_exc, TimeoutError)
    assert sum("timed out" in r.getMessage() for r in caplog.records) == 2
    # the established client outlived the handshake deadline and is fine
    good.send(b"ping\n")
    assert good.line() == b"ping"


def test_client_rejecting_the_certificate_fails_and_the_server_keeps_serving(make_server, client_context):
    server = make_server()
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)  # some other CA
    with pytest.raises(ssl.SSLCertVerificationError):
        stranger.wrap_socket(raw_connect(server), server_hostname=HOST)
    proto = server.protocol(0)
    server.wait_for(lambda: proto.lost, "the rejected connection to close")
    assert isinstance(proto.lost_exc, ssl.SSLError)
    with pytest.raises(ssl.SSLCertVerificationError):
        client_context.wrap_socket(raw_connect(server), server_hostname="not-" + HOST)
    client = Client(server, client_context)
    assert client.line() == b"HELLO"
    client.send(b"fine\n")
    assert client.line() == b"fine"


def test_server_close_flushes_then_sends_close_notify_and_fin(make_server, client_context):
    server = make_server(sndbuf=32 * 1024)
    client = Client(server, client_context)
    assert client.line() == b"HELLO"
    proto = server.protocol(0)
    size = 1024 * 1024
    client.send(b"/bulk %d\n" % size)  # written at once, then close(): all of it must arrive
    assert client.read(size) == bulk(size)
    client.expect_close_notify()
    raw = client.sock.unwrap()  # our close_notify; the server is lingering after its FIN
    started = time.monotonic()
    assert raw.recv(16) == b""
    raw.close()
    server.wait_for(lambda: proto.lost, "connection_lost")
    assert proto.lost_exc is None
    assert time.monotonic() - started < LINGER  # closed on our FIN, not by the linger timer


def test_close_with_unread_input_lingers_so_the_bye_is_not_lost_to_rst(make_server, client_context):
    server = make_server()
    client = Client(server, client_context)
    assert client.line() == b"HELLO"
    # The server closes on the first line, with the rest still unread in its
    # kernel buffer: without the linger its close() would answer with RST.
    client.send(b"/close\n" + bulk(256 * 1024))
    assert client.line() == b"BYE"
    client.expect_close_notify()
    client.close()
    proto = server.protocol(0)
    server.wait_for(lambda: proto.lost, "connection_lost")
    assert proto.lost_exc is None


def test_close_is_bounded_when_the_client_reads_nothing(make_server, client_context, monkeypatch):
    monkeypatch.setattr(tls, "LINGER", 0.3)
    server = make_server(sndbuf=32 * 1024)
    client = Client(server, client_context, raw_connect(server, rcvbuf=32 * 1024))
    assert client.line() == b"HELLO"
    started = time.monotonic()
    client.send(b"/bulk %d\n" % (4 * 1024 * 1024))  # far more than the kernel buffers; never read
    proto = server.protocol(0)
    server.wait_for(lambda: proto.lost, "the close to give up")
    assert proto.lost_exc is None
    assert time.monotonic() - started >= 0.3
    client.close()


def test_client_close_notify_is_eof(make_server, client_context):
    server = make_server()
    client = Client(server, client_context)
    assert client.line() == b"HELLO"
    client.send(b"last\n")
    assert client.line() == b"last"
    raw = client.sock.unwrap()  # sends close_notify, waits for the server's
    assert raw.recv(16) == b""
    raw.close()
    proto = server.protocol(0)
    server.wait_for(lambda: proto.lost, "connection_lost")
    assert proto.eof and proto.lost_exc is None


def test_bare_tcp_close_is_eof_too(make_server, client_context):
    server = make_server()
    client = Client(server, client_context)
    assert client.line() == b"HELLO"
    raw = socket.socket(fileno=client.sock.detach())  # close without close_notify
    raw.close()
    proto = server.protocol(0)
    server.wait_for(lambda: proto.lost, "connection_lost")
    assert proto.eof and proto.lost_exc is None


def test_half_close_without_close_notify_still_gets_the_last_frames(make_server, client_context):
    server = make_server(bye_on_eof=True)
    client = Client(server, client_context)
    assert client.line() == b"HELLO"
    client.send(b"last\n")
    socket.socket.shutdown(client.sock, socket.SHUT_WR)  # a bare FIN: SSLSocket.shutdown would drop TLS
    assert client.line() == b"last"
    assert client.line() == b"BYE"  # written after our EOF
    client.expect_close_notify()
    client.close()
    proto = server.protocol(0)
    server.wait_for(lambda: proto.lost, "connection_lost")
    assert proto.eof and proto.lost_exc is None


def test_abort_closes_at_once(make_server, client_context):
    server = make_server()
    client = Client(server, client_context)
    assert client.line() == b"HELLO"
    client.send(b"/abort\n")
    with pytest.raises((ssl.SSLEOFError, ConnectionResetError)):
        client.sock.recv(16)  # no close_notify: a bare close
    proto = server.protocol(0)
    server.wait_for(lambda: proto.lost, "connection_lost")
    assert proto.lost_exc is None
