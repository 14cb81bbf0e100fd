"""/metrics: what Prometheus sees, parsed with Prometheus's own text parser,
and the HTTP listener behind it, which no client may use to disturb the chat."""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time

import h11
import pytest
from prometheus_client.parser import text_string_to_metric_families

from selchat import __version__
from selchat.reactor.httpd import HTTPConnection, HTTPServer
from selchat.reactor.listener import bind
from selchat.reactor.loop import Reactor
from selchat.server.app import Server
from selchat.server.config import ServerConfig
from selchat.server.metrics import CONTENT_TYPE, LagProbe, Metrics
from tests.support import DEADLINE, Canary, LineSocket, RawUser, start_chat, wait_for


class InProcessServer:
    """A chat server with /metrics, its reactor on a thread of the test process."""

    def __init__(self, tmp_path, **settings):
        config = ServerConfig(host="127.0.0.1", port=0, db=str(tmp_path / "accounts.db"), scrypt_n=16,
                              metrics="127.0.0.1:0", **settings)
        self.server = Server(config)
        self.host, self.port = self.server.listen()[:2]
        self.metrics = self.server.metrics_endpoint.address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def connect(self) -> LineSocket:
        return LineSocket(self.host, self.port)

    def stop(self) -> None:
        try:
            self.server.reactor.call_soon_threadsafe(self.server.shutdown)
        except OSError as exc:
            # Seen twice in full runs (EBADF: the loop's waker socket was
            # closed). If the loop had already stopped, there is nothing to
            # stop; if it still runs, say so, with what we know.
            if self.thread.is_alive():
                raise AssertionError(f"cannot wake the running loop to stop it: {exc!r}; "
                                     f"stopping={self.server.stopping} peers={len(self.server.peers)}") from exc
            return
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "server did not stop"


@pytest.fixture
def srv(tmp_path):
    server = InProcessServer(tmp_path)
    yield server
    server.stop()


def parse(text: str) -> dict:
    """{(sample name, frozenset of labels): value}, by Prometheus's parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(address) -> dict:
    conn = http.client.HTTPConnection(*address, timeout=DEADLINE)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == CONTENT_TYPE
        return parse(resp.read().decode())
    finally:
        conn.close()


def value(samples: dict, name: str, **labels) -> float:
    return samples[name, frozenset(labels.items())]


class HTTPClient:
    """A raw socket and a client-side h11 parser: several requests on one
    connection, pipelined or not, their bytes sent however a test likes."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.pending: list[h11.Request] = []  # sent, response not read yet

    @classmethod
    def connect(cls, address) -> "HTTPClient":
        return cls(socket.create_connection(address, timeout=DEADLINE))

    def request(self, method: str = "GET", target: str = "/metrics", headers=()) -> bytes:
        """The bytes of a request, to pass to ``send`` (alone, joined or split)."""
        request = h11.Request(method=method, target=target, headers=[("host", "x"), *headers])
        self.pending.append(request)
        encoder = h11.Connection(h11.CLIENT)
        return encoder.send(request) + encoder.send(h11.EndOfMessage())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict, bytes]:
        """The response to the oldest pending request: (status, headers, body)."""
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        self.h11.send(self.pending.pop(0))  # its bytes went out already; this tells the parser
        self.h11.send(h11.EndOfMessage())
        status, headers, body = None, None, b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(self.sock.recv(65536))
            elif type(event) is h11.Response:
                status, headers = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
            elif type(event) is h11.Data:
                body += event.data
            elif type(event) is h11.EndOfMessage:
                return status, headers, body
            else:
                raise AssertionError(f"unexpected {event!r}")

    def closed(self) -> bool:
        """True once the server has closed the connection (reads what is left)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def raw_exchange(address, data: bytes) -> bytes:
    """Send ``data``, return all the server sends until it closes the connection."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


# -- what an operator sees ----------------------------------------------------------

def test_two_users_chatting_show_up_in_the_metrics(srv):
    before = scrape(srv.metrics)
    assert value(before, "selchat_sessions_online") == 0
    assert value(before, "selchat_logins_total", result="ok") == 0
    assert value(before, "selchat_build_info", version=__version__) == 1

    alice, bob = RawUser(srv), RawUser(srv)
    start_chat(alice, bob)
    alice.chat.send(*[f"MSG hello {i}" for i in range(3)])
    bob.chat.send("MSG hi", "MSG there")
    assert [bob.login.line() for _ in range(3)] == [f"MSG {alice.name} hello {i}" for i in range(3)]
    assert [alice.login.line() for _ in range(2)] == [f"MSG {bob.name} hi", f"MSG {bob.name} there"]

    m = scrape(srv.metrics)
    assert value(m, "selchat_sessions_online") == 2
    assert value(m, "selchat_chats_active") == 1
    assert value(m, "selchat_sockets_open") == 6
    assert value(m, "selchat_messages_relayed_total") >= 5
    assert value(m, "selchat_logins_total", result="ok") == 2
    assert value(m, "selchat_logins_total", result="failed") == 0
    assert value(m, "selchat_worker_queue_depth") == 0  # both registrations done, none left queued
    assert value(m, "selchat_uptime_seconds") > 0
    assert value(m, "selchat_refusals_total", reason="server-full") == 0

    bob.chat.send("QUIT")
    bob.chat.expect("OK QUIT")
    alice.chat.send("EXIT")
    alice.chat.expect("OK EXIT")
    m = scrape(srv.metrics)
    assert value(m, "selchat_sessions_online") == 1
    assert value(m, "selchat_chats_active") == 0


def test_failed_throttled_and_refused_logins_are_counted(tmp_path):
    srv = InProcessServer(tmp_path, max_per_address=8)
    try:
        victim = RawUser(srv)                 # 3 sockets, kept open: no close races the count
        guesses = []
        for i in range(4):  # 3 checked and wrong, the 4th throttled without a check
            sock = srv.connect()
            sock.send(f"LOGIN {victim.name} wrong{i}")
            assert sock.line().startswith("ERR LOGIN ")
            guesses.append(sock)
        last = srv.connect()                  # the 8th socket from this address
        extra = LineSocket(srv.host, srv.port, hello=False)
        assert extra.line().startswith("BYE too-many-connections")
        m = scrape(srv.metrics)
        assert value(m, "selchat_logins_total", result="ok") == 1
        assert value(m, "selchat_logins_total", result="failed") == 3
        assert value(m, "selchat_logins_total", result="throttled") == 1
        assert value(m, "selchat_refusals_total", reason="too-many-connections") == 1
        assert value(m, "selchat_password_checks_waiting") == 0
        for sock in [*guesses, last, *victim.sockets()]:
            sock.close()
    finally:
        srv.stop()


def test_pending_request_and_attaching_session(srv):
    alice, bob = RawUser(srv), RawUser(srv)
    alice.chat.send(f"CHAT {bob.name}")
    alice.chat.expect("OK CHAT")
    half = RawUser(srv, check=False)  # logged in, check socket never attached
    m = scrape(srv.metrics)
    assert value(m, "selchat_chat_requests_pending") == 1
    assert value(m, "selchat_chats_active") == 0
    assert value(m, "selchat_sessions_online") == 2
    assert value(m, "selchat_sessions_attaching") == 1
    half.close()


def test_other_paths_404_other_methods_405_head_has_no_body(srv):
    client = HTTPClient.connect(srv.metrics)
    client.send(client.request(target="/"))
    assert client.response()[0] == 404
    client.send(client.request(target="/metrics/x"))
    assert client.response()[0] == 404
    client.send(client.request("POST", headers=[("content-length", "0")]))
    status, headers, _ = client.response()
    assert status == 405 and headers["allow"] == "GET, HEAD"
    client.send(client.request("HEAD"))
    status, headers, body = client.response()
    assert status == 200 and body == b"" and int(headers["content-length"]) > 100
    client.send(client.request(target="/metrics?name[]=x"))  # Prometheus may add parameters
    assert client.response()[0] == 200
    client.close()


def test_keep_alive_and_pipelining_on_one_connection(srv):
    client = HTTPClient.connect(srv.metrics)
    client.send(client.request())
    first = client.response()
    client.send(client.request())
    second = client.response()
    assert first[0] == second[0] == 200
    assert value(parse(second[2].decode()), "selchat_sessions_online") == 0
    # Two requests in one packet: two responses, in order, and still open.
    client.send(client.request(target="/nope") + client.request())
    assert [client.response()[0] for _ in range(2)] == [404, 200]
    client.send(client.request(headers=[("connection", "close")]))
    assert client.response()[0] == 200
    assert client.closed()
    client.close()


def test_garbage_and_endless_headers_are_refused_and_the_chat_goes_on(srv):
    canary = Canary(srv)
    reply = raw_exchange(srv.metrics, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    canary.check()
    endless = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100_000
    assert raw_exchange(srv.metrics, endless).startswith(b"HTTP/1.1 431 ")
    canary.check()
    huge_body = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"b" * 100_000
    assert raw_exchange(srv.metrics, huge_body).startswith(b"HTTP/1.1 413 ")
    canary.check()
    assert value(scrape(srv.metrics), "selchat_sessions_online") == 2


def test_too_many_metrics_connections_get_503_and_the_chat_goes_on(srv):
    canary = Canary(srv)
    cap = srv.server.metrics_endpoint.http.max_connections
    idle = [socket.create_connection(srv.metrics, timeout=DEADLINE) for _ in range(cap)]
    # The idle ones are all accepted once a request on the last of them is answered.
    last = HTTPClient(idle[-1])
    last.send(last.request())
    assert last.response()[0] == 200
    assert raw_exchange(srv.metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 503 ")
    canary.check()
    for sock in idle:
        sock.close()
    wait_for(lambda: not srv.server.metrics_endpoint.http.connections, "the closed connections are forgotten")
    assert value(scrape(srv.metrics), "selchat_chats_active") == 1


# -- the listener, unit by unit ----------------------------------------------------

@pytest.fixture
def httpd():
    """An HTTPServer with a trivial handler and short limits, on a reactor thread."""
    reactor = Reactor()
    seen = []

    def handler(method, target):
        seen.append((method, target))
        return 200, [("content-type", "text/plain")], f"{method} {target}\n".encode()

    server = HTTPServer(reactor, bind("127.0.0.1", 0), handler, max_connections=4, max_request=1024,
                        timeout=0.3)
    server.seen = seen
    thread = threading.Thread(target=reactor.run, daemon=True)
    thread.start()
    yield server
    reactor.call_soon_threadsafe(reactor.stop)
    thread.join(DEADLINE)
    reactor.close()


def test_a_request_fed_one_byte_at_a_time_is_answered_after_its_last_byte():
    reactor = Reactor()  # not running: the test plays the loop
    server = HTTPServer(reactor, bind("127.0.0.1", 0), lambda m, t: (200, [], f"{m} {t}".encode()))
    ours, theirs = socket.socketpair()
    theirs.settimeout(DEADLINE)
    conn = HTTPConnection(server, ours)
    client = HTTPClient(theirs)
    first = client.request(target="/a")
    both = first + client.request(target="/bb")
    for i in range(len(both)):
        conn.data_received(both[i:i + 1])
        answered = conn.transport.buffered > 0
        assert answered == (i >= len(first) - 1), f"after byte {i}"
    conn.transport.flush()  # what the loop does at the end of a turn
    assert client.response() == (200, {"content-length": "6"}, b"GET /a")
    assert client.response() == (200, {"content-length": "7"}, b"GET /bb")
    server.close()
    client.close()
    reactor.close()


def test_idle_and_trickling_connections_are_closed_by_the_timeout(httpd):
    idle = socket.create_connection(httpd.address, timeout=DEADLINE)
    started = time.monotonic()
    assert idle.recv(1) == b""  # closed without a word
    assert 0.25 < time.monotonic() - started < 2
    idle.close()
    # A byte every 0.1 s does not keep a connection open past 0.3 s.
    trickle = socket.create_connection(httpd.address, timeout=DEADLINE)
    started = time.monotonic()
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\n\r\n":
        trickle.send(bytes([byte]))
        # The client's pace: wait 0.1 s for the next byte, unless closed meanwhile.
        if select.select([trickle], [], [], 0.1)[0]:
            break
    assert trickle.recv(1) == b""
    assert 0.25 < time.monotonic() - started < 2
    trickle.close()
    assert httpd.seen == []


def test_a_keep_alive_connection_stays_open_while_it_is_used(httpd):
    client = HTTPClient.connect(httpd.address)
    for i in range(5):  # over the 0.3 s timeout in all, within it each time
        client.send(client.request(target=f"/{i}"))
        assert client.response() == (200, {"content-type": "text/plain", "content-length": str(len(f"GET /{i}\n"))},
                                     f"GET /{i}\n".encode())
        time.sleep(0.1)  # the client's pace, not synchronisation
    client.close()


def test_a_client_that_does_not_read_is_answered_no_faster_than_it_reads():
    reactor = Reactor()  # not running: the test plays the loop
    server = HTTPServer(reactor, bind("127.0.0.1", 0), lambda m, t: (200, [], b"x" * 1000))
    ours, theirs = socket.socketpair()
    theirs.settimeout(DEADLINE)
    conn = HTTPConnection(server, ours)
    client = HTTPClient(theirs)
    conn.data_received(b"".join(client.request(target=f"/{i}") for i in range(500)))
    # 500 requests arrived at once; only a high-water mark's worth is answered.
    high = conn.transport.high_water
    assert high < conn.transport.buffered <= high + 1100
    # As the client reads, the rest is answered, in order.
    for i in range(500):
        conn.transport.flush()
        assert client.response() == (200, {"content-length": "1000"}, b"x" * 1000), i
    assert conn.transport.buffered == 0
    server.close()
    client.close()
    reactor.close()


def test_a_stuck_client_is_dropped_and_others_are_served_meanwhile(httpd):
    stuck = socket.create_connection(httpd.address, timeout=DEADLINE)
    stuck.setblocking(False)
    request = b"GET /" + b"x" * 900 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        while True:  # until the server stops reading and the kernel buffers are full
            stuck.send(request * 64)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    client = HTTPClient.connect(httpd.address)
    client.send(client.request(target="/other"))
    assert client.response()[2] == b"GET /other\n"
    client.close()
    wait_for(lambda: len(httpd.connections) == 0, "the stuck connection is dropped")
    stuck.close()


def test_handler_errors_are_500_and_the_connection_goes_on():
    reactor = Reactor()
    calls = []

    def handler(method, target):
        calls.append(target)
        if target == "/boom":
            raise RuntimeError("boom")
        return 200, [], b"ok"

    server = HTTPServer(reactor, bind("127.0.0.1", 0), handler)
    thread = threading.Thread(target=reactor.run, daemon=True)
    thread.start()
    client = HTTPClient.connect(server.address)
    client.send(client.request(target="/boom"))
    assert client.response()[0] == 500
    client.send(client.request(target="/fine"))
    assert client.response() == (200, {"content-length": "2"}, b"ok")
    client.close()
    reactor.call_soon_threadsafe(reactor.stop)
    thread.join(DEADLINE)
    reactor.close()


# -- the numbers behind the gauges ---------------------------------------------------

def test_worker_queue_depth_counts_jobs_until_their_callback_ran():
    reactor = Reactor()
    first, second = threading.Event(), threading.Event()
    depths = []

    def done(future):
        depths.append(reactor.pending_jobs)
        reactor.stop()

    reactor.run_in_thread(first.wait, DEADLINE, done=done)
    reactor.run_in_thread(second.wait, DEADLINE, done=done)
    assert reactor.pending_jobs == 2
    first.set()
    reactor.run()
    assert depths == [1]  # the first job's callback ran: only the second is counted
    second.set()
    reactor.run()
    assert depths == [1, 0]
    reactor.close()


def test_loop_lag_is_how_late_the_probe_timer_ran():
    now = [100.01]
    reactor = Reactor(clock=lambda: now[0])  # ticks of 0.05 s
    metrics = Metrics()
    probe = LagProbe(reactor, metrics, interval=1.0)
    now[0] = 101.04  # due at 101.01, within the tick (101.00-101.05) the wheel promises
    reactor.timers.advance()
    assert metrics.lag == 0.0
    now[0] = 102.54  # due at 102.04, tick ends 102.05: the loop was busy for 0.49 s more
    reactor.timers.advance()
    assert metrics.lag == pytest.approx(0.49)
    assert metrics.lag_max == metrics.lag
    now[0] = 103.545  # due at 103.54, on time again: the last value drops, the maximum stays
    reactor.timers.advance()
    assert metrics.lag == 0.0 and metrics.lag_max == pytest.approx(0.49)
    probe.close()
    reactor.close()


def test_a_detached_session_and_its_resume_show_up_in_the_metrics(srv):
    from tests.support import V2User, start_chat

    alice, bob = V2User(srv.connect), V2User(srv.connect)
    start_chat(alice, bob)
    bob.cut()
    alice.expect(f"AWAY {bob.name}")
    m = scrape(srv.metrics)
    assert value(m, "selchat_sessions_detached") == 1
    assert value(m, "selchat_sessions_online") == 2  # bob is still in /who
    assert value(m, "selchat_resumes_total") == 0
    bob.resume()
    alice.expect(f"BACK {bob.name}")
    m = scrape(srv.metrics)
    assert value(m, "selchat_sessions_detached") == 0
    assert value(m, "selchat_resumes_total") == 1
    assert value(m, "selchat_logins_total", result="ok") == 2  # the resume checked no password
