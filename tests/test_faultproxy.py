"""The fault proxy itself, over real sockets: it forwards byte-exact, and each
fault does to the client and the server what the real network failure does."""

from __future__ import annotations

import hashlib
import random
import resource
import selectors
import socket
import struct
import threading
import time

import pytest

from tests.faultproxy import FaultProxy

TIMEOUT = 5.0  # seconds any single expectation may take
QUIET = 0.3  # how long a socket must stay silent to count as "nothing arrived"


class EchoServer:
    """A line-agnostic echo server in one selector thread: echoes every byte,
    and after the client's EOF echoes the rest and sends EOF back."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=socket.SOMAXCONN)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.wake_r, self.wake_w = socket.socketpair()
        self.sel.register(self.wake_r, selectors.EVENT_READ, "stop")
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conns: dict[socket.socket, list] = {}  # sock -> [pending bytes, eof seen]
        while True:
            for key, _ in self.sel.select():
                if key.data == "stop":
                    for sock in conns:
                        sock.close()
                    return
                if key.fileobj is self.listener:
                    self._accept(conns)
                else:
                    self._serve(key.fileobj, conns)

    def _accept(self, conns) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            conns[sock] = [bytearray(), False]
            self.accepted += 1
            self.sel.register(sock, selectors.EVENT_READ)

    def _serve(self, sock, conns) -> None:
        pending, eof = conns[sock]
        try:
            if not eof and len(pending) < 1 << 20:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:  # woken to write: send what waits anyway
                    data = None
                if data:
                    pending += data
                elif data is not None:
                    conns[sock][1] = eof = True
            if pending:
                try:
                    del pending[:sock.send(pending)]
                except BlockingIOError:
                    pass
        except OSError:
            self._drop(sock, conns)
            return
        if eof and not pending:
            sock.shutdown(socket.SHUT_WR)
            self._drop(sock, conns)
            return
        want = (0 if eof or len(pending) >= 1 << 20 else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if pending else 0)
        self.sel.modify(sock, want)

    def _drop(self, sock, conns) -> None:
        self.sel.unregister(sock)
        del conns[sock]
        sock.close()

    def close(self) -> None:
        self.wake_w.send(b"x")
        self.thread.join(TIMEOUT)
        self.listener.close()
        self.sel.close()
        self.wake_r.close()
        self.wake_w.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def listener():
    """A bare listening socket: the test accepts and holds the server side."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


@pytest.fixture
def make_proxy():
    started = []

    def start(port: int, **kwargs) -> FaultProxy:
        proxy = FaultProxy("127.0.0.1", port, **kwargs).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=TIMEOUT)


def connect_and_read(proxy: FaultProxy, data: bytes = b"") -> tuple[bytes, str]:
    """Connect, send ``data``, read until closed: what came and how it
    ended. The proxy's reset may beat connect() itself (the handshake is
    done in the kernel before the proxy accepts): that is a reset too."""
    try:
        sock = connect(proxy)
        if data:
            sock.sendall(data)
    except ConnectionResetError:
        return b"", "reset"
    return recv_until_closed(sock)


def pair(proxy: FaultProxy, listener: socket.socket):
    """A client through the proxy, the server side of it, and its link."""
    count = len(proxy.links) + 1
    client = connect(proxy)
    server, _ = listener.accept()
    server.settimeout(TIMEOUT)
    link = proxy.wait_for_links(count)[-1]
    return client, server, link


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def recv_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the peer closes, and how: "eof" or "reset"."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def assert_silent(sock: socket.socket) -> None:
    """Nothing arrives on ``sock`` for QUIET seconds (nor does it close)."""
    sock.settimeout(QUIET)
    with pytest.raises(socket.timeout):
        data = sock.recv(1)
        pytest.fail(f"expected silence, got {data!r}")
    sock.settimeout(TIMEOUT)


def wait_until(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)  # polling interval; the condition ends the wait


def test_forwards_both_ways_byte_exact_and_counts(make_proxy, listener):
    proxy = make_proxy(listener.getsockname()[1])
    client, server, link = pair(proxy, listener)
    up, down = b"hello \x00\xff server\r\n", b"hi client\n"
    client.sendall(up)
    assert recv_exactly(server, len(up)) == up
    server.sendall(down)
    assert recv_exactly(client, len(down)) == down
    # The proxy thread counts a send after it returns: the bytes can be read first.
    wait_until(lambda: link.bytes_down == len(down), "the proxy to count the bytes sent down")
    assert (link.id, link.bytes_up, link.bytes_down, link.open) == (1, len(up), len(down), True)
    assert proxy.links == [link] and proxy.faults == []


def test_ten_mebibytes_echo_through_unchanged(make_proxy, echo):
    proxy = make_proxy(echo.port)
    payload = random.Random(7).randbytes(10 << 20)
    client = connect(proxy)
    sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
    sender.start()
    received = recv_exactly(client, len(payload))
    sender.join(TIMEOUT)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    link = proxy.links[0]
    wait_until(lambda: link.bytes_down == len(payload), "the proxy to count the bytes sent down")
    assert link.bytes_up == link.bytes_down == len(payload)


def test_eof_is_forwarded_each_way_and_the_link_then_closes(make_proxy, listener):
    proxy = make_proxy(listener.getsockname()[1])
    client, server, link = pair(proxy, listener)
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    assert recv_until_closed(server) == (b"last words", "eof")
    server.sendall(b"still talking")  # the other way is still open
    assert recv_exactly(client, 13) == b"still talking"
    server.close()
    assert recv_until_closed(client) == (b"", "eof")
    assert link.wait_closed(TIMEOUT) and link.closed_how == "eof"


def test_server_reset_resets_the_client(make_proxy, listener):
    proxy = make_proxy(listener.getsockname()[1])
    client, server, link = pair(proxy, listener)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()
    assert recv_until_closed(client)[1] == "reset"
    assert link.wait_closed(TIMEOUT) and link.closed_how == "error"


def test_cut_resets_both_sides_at_once(make_proxy, listener):
    proxy = make_proxy(listener.getsockname()[1])
    client, server, link = pair(proxy, listener)
    started = time.monotonic()
    link.cut()
    assert not link.open and link.closed_how == "cut"  # done when cut() returns
    assert recv_until_closed(client) == (b"", "reset")
    assert recv_until_closed(server) == (b"", "reset")
    assert time.monotonic() - started < 1.0
    assert [(i, kind) for _, i, kind in proxy.faults] == [(link.id, "cut")]


def test_cut_all_resets_every_link(make_proxy, echo):
    proxy = make_proxy(echo.port)
    clients = [connect(proxy) for _ in range(5)]
    proxy.wait_for_links(5)
    proxy.cut_all()
    assert proxy.open_links() == []
    assert all(recv_until_closed(c)[1] == "reset" for c in clients)


def test_stall_holds_data_both_ways_and_unstall_delivers_it(make_proxy, listener):
    proxy = make_proxy(listener.getsockname()[1])
    client, server, link = pair(proxy, listener)
    link.stall()
    client.sendall(b"up while stalled")
    server.sendall(b"down while stalled")
    assert_silent(server)
    assert_silent(client)
    assert link.open and link.bytes_up == link.bytes_down == 0
    link.unstall()
    assert recv_exactly(server, 16) == b"up while stalled"
    assert recv_exactly(client, 18) == b"down while stalled"
    assert [kind for _, _, kind in proxy.faults] == ["stall", "unstall"]


def test_stall_all_and_unstall_all(make_proxy, echo):
    proxy = make_proxy(echo.port)
    clients = [connect(proxy) for _ in range(3)]
    proxy.wait_for_links(3)
    proxy.stall_all()
    for i, c in enumerate(clients):
        c.sendall(b"ping %d" % i)
    assert_silent(clients[0])
    proxy.unstall_all()
    assert [recv_exactly(c, 6) for c in clients] == [b"ping 0", b"ping 1", b"ping 2"]


def test_half_close_up_gives_the_server_eof_while_down_still_works(make_proxy, listener):
    proxy = make_proxy(listener.getsockname()[1])
    client, server, link = pair(proxy, listener)
    client.sendall(b"before")
    assert recv_exactly(server, 6) == b"before"
    link.half_close("up")
    assert recv_until_closed(server) == (b"", "eof")
    client.sendall(b"dropped")  # goes nowhere: the server already saw EOF
    server.sendall(b"server still talks")
    assert recv_exactly(client, 18) == b"server still talks"
    assert link.open and link.bytes_up == 6


def test_half_close_down_gives_the_client_eof_while_up_still_works(make_proxy, listener):
    proxy = make_proxy(listener.getsockname()[1])
    client, server, link = pair(proxy, listener)
    link.half_close("down")
    assert recv_until_closed(client) == (b"", "eof")
    client.sendall(b"client still talks")
    assert recv_exactly(server, 18) == b"client still talks"
    server.sendall(b"dropped")
    assert link.open and link.bytes_down == 0
    with pytest.raises(ValueError):
        link.half_close("sideways")


def test_network_down_stalls_links_and_holds_new_connections(make_proxy, listener):
    proxy = make_proxy(listener.getsockname()[1])
    client, server, link = pair(proxy, listener)
    proxy.network_down()
    client.sendall(b"old link")
    assert_silent(server)
    late = connect(proxy)  # the connect itself succeeds, to the proxy
    late.sendall(b"new link")
    held = proxy.wait_for_links(2)[1]
    assert held.state == "held"
    listener.settimeout(QUIET)
    with pytest.raises(socket.timeout):  # nothing reaches the server
        listener.accept()
    assert_silent(late)
    proxy.network_up()
    assert recv_exactly(server, 8) == b"old link"
    listener.settimeout(TIMEOUT)
    late_server, _ = listener.accept()
    late_server.settimeout(TIMEOUT)
    assert recv_exactly(late_server, 8) == b"new link"
    late_server.sendall(b"welcome")
    assert recv_exactly(late, 7) == b"welcome"


def test_refuse_new_resets_new_connections_only(make_proxy, echo):
    proxy = make_proxy(echo.port)
    old = connect(proxy)
    proxy.wait_for_links(1)
    proxy.refuse_new(True)
    assert connect_and_read(proxy, b"x")[1] in ("reset", "eof")
    old.sendall(b"old ok")
    assert recv_exactly(old, 6) == b"old ok"
    assert proxy.refused == 1 and len(proxy.links) == 1 and echo.accepted == 1
    proxy.refuse_new(False)
    fresh = connect(proxy)
    fresh.sendall(b"fresh")
    assert recv_exactly(fresh, 5) == b"fresh"


def test_target_down_resets_the_client(make_proxy):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    proxy = make_proxy(port)
    assert connect_and_read(proxy) == (b"", "reset")
    assert proxy.wait_for_links(1)[0].closed_how == "refused by target"


@pytest.mark.parametrize("direction", ["up", "down"])
def test_cut_after_cuts_at_the_exact_byte(make_proxy, listener, direction):
    proxy = make_proxy(listener.getsockname()[1])
    client, server, link = pair(proxy, listener)
    sender, receiver = (client, server) if direction == "up" else (server, client)
    sender.sendall(b"abc\n")
    assert recv_exactly(receiver, 4) == b"abc\n"
    link.cut_after(direction, 7)
    sender.sendall(b"0123456789\nmore\n")  # cut in the middle of the line
    assert recv_until_closed(receiver) == (b"0123456", "reset")
    assert link.wait_closed(TIMEOUT) and link.closed_how == f"cut_after:{direction}"
    assert (link.bytes_up if direction == "up" else link.bytes_down) == 11
    assert proxy.faults[-1][1:] == (link.id, f"cut_after:{direction}")


def test_backpressure_bounds_what_the_proxy_reads(make_proxy, listener):
    proxy = make_proxy(listener.getsockname()[1], buffer_size=64 * 1024)
    client, server, link = pair(proxy, listener)
    client.setblocking(False)
    sent, total = 0, 64 << 20
    chunk = b"\x00" * 65536
    writable = selectors.DefaultSelector()
    writable.register(client, selectors.EVENT_WRITE)
    while sent < total and writable.select(QUIET):  # until the client is blocked
        try:
            sent += client.send(chunk)
        except BlockingIOError:
            pass
    writable.close()
    assert sent < total / 2, f"the proxy read {sent} bytes the server never took"
    client.setblocking(True)
    client.shutdown(socket.SHUT_WR)
    assert len(recv_until_closed(server)[0]) == sent  # nothing lost on the way


def test_chaos_injects_random_faults_and_records_them(make_proxy, echo):
    proxy = make_proxy(echo.port)
    clients = [connect(proxy) for _ in range(30)]
    links = proxy.wait_for_links(30)
    started = time.monotonic()
    proxy.chaos(random.Random(3), every=0.01, stall_for=(0.01, 0.05))
    wait_until(lambda: len([f for f in proxy.faults if f[2] != "unstall"]) >= 20, "20 faults")
    proxy.stop_chaos()
    faults = list(proxy.faults)
    times = [t for t, _, _ in faults]
    assert times == sorted(times) and times[0] >= started
    kinds = {kind.split(":")[0] for _, _, kind in faults}
    assert kinds == {"cut", "stall", "unstall", "half_close"}, faults
    ids = {link.id for link in links}
    assert all(i in ids for _, i, _ in faults)
    first_fault = {}
    for _, link_id, kind in faults:
        first_fault.setdefault(link_id, kind)
    for link_id, kind in first_fault.items():  # a link cut out of the blue was really reset
        if kind == "cut":
            assert not links[link_id - 1].open
            assert recv_until_closed(clients[link_id - 1])[1] == "reset"
    # chaos stalls end by themselves
    wait_until(lambda: not any(link.stalled for link in links), "stalls ended")
    count = len(proxy.faults)
    untouched = [c for c, link in zip(clients, links) if not any(i == link.id for _, i, _ in faults)]
    assert untouched, "chaos touched every link; use fewer faults"
    untouched[0].sendall(b"calm again")
    assert recv_exactly(untouched[0], 10) == b"calm again"
    assert len(proxy.faults) == count  # stopped: no more faults


def test_chaos_with_only_cuts_ends_every_link(make_proxy, echo):
    proxy = make_proxy(echo.port)
    clients = [connect(proxy) for _ in range(5)]
    proxy.wait_for_links(5)
    proxy.chaos(random.Random(1), every=0.01, faults=("cut",))
    assert all(recv_until_closed(c)[1] == "reset" for c in clients)
    proxy.stop_chaos()
    assert sorted(i for _, i, kind in proxy.faults) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        proxy.chaos(random.Random(1), every=0.01, faults=("meteor",))


def test_five_hundred_concurrent_links(make_proxy, echo):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096  # 500 clients + 1000 proxy sockets + 500 server sockets, and spare
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    proxy = make_proxy(echo.port)
    clients = []
    try:
        clients = [connect(proxy) for _ in range(500)]
        for i, c in enumerate(clients):
            c.sendall(b"client %03d\n" % i)
        assert [recv_exactly(c, 11) for c in clients] == [b"client %03d\n" % i for i in range(500)]
        assert len(proxy.links) == 500 and echo.accepted == 500
        assert [link.id for link in proxy.links] == list(range(1, 501))
    finally:
        for c in clients:
            c.close()


def test_close_resets_links_and_commands_then_fail(echo):
    proxy = FaultProxy("127.0.0.1", echo.port).start()
    client = connect(proxy)
    link = proxy.wait_for_links(1)[0]
    proxy.close()
    assert recv_until_closed(client) == (b"", "reset")
    assert link.closed_how == "proxy closed"
    with pytest.raises(RuntimeError):
        link.cut()
