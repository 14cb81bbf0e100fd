"""The Redis link: RESP encoding and URLs, the sans-I/O reply matching, and
links on a reactor thread against a real redis-server (tests/redisserver.py)
that the tests kill, pause and restart. No sleeps: every wait is for a
condition, with a deadline."""

from __future__ import annotations

import logging
import socket
import time

import pytest

hiredis = pytest.importorskip("hiredis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from selchat.cluster.redislink import (  # noqa: E402
    BufferFull,
    CommandProtocol,
    LinkDown,
    PubSubLink,
    PubSubProtocol,
    RedisError,
    RedisLink,
    ReplyError,
)
from selchat.cluster.resp import RedisConfig, encode, encode_py, parse_url  # noqa: E402
from tests.redisserver import Events, loop, make_redis, module_redis, redis_server  # noqa: E402,F401
from tests.support import DEADLINE, wait_for  # noqa: E402

FAST = dict(backoff=0.05, backoff_max=0.2)  # reconnect quickly in tests


# -- resp.py ---------------------------------------------------------------------------------

def test_encode_makes_a_resp_array_of_bulk_strings():
    assert encode("SET", b"k\r\n", 1) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n1\r\n"
    assert encode("ECHO", "é") == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"
    assert encode("INCRBY", "k", -12) == b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$3\r\n-12\r\n"
    assert encode("X", 0.5, bytearray(b"")) == b"*3\r\n$1\r\nX\r\n$3\r\n0.5\r\n$0\r\n\r\n"
    assert encode("GET", "k") == hiredis.pack_command(("GET", "k"))
    for bad in (None, True, object()):
        with pytest.raises(TypeError):
            encode("SET", "k", bad)
    with pytest.raises(ValueError):
        encode()


_args = st.lists(st.one_of(st.binary(max_size=20), st.text(max_size=10), st.integers(),
                           st.floats(allow_nan=False), st.binary(max_size=5).map(bytearray)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=8), _args)
def test_encode_is_the_same_with_and_without_hiredis(name, args):
    assert encode(name, *args) == encode_py(name, *args)
    reader = hiredis.Reader()
    reader.feed(encode(name, *args))  # a RESP array of bulk strings, which hiredis reads back
    parsed = reader.gets()
    assert parsed[0] == name.encode() and len(parsed) == len(args) + 1


def test_redis_urls():
    assert parse_url("redis://10.0.0.5:6380/2") == RedisConfig("10.0.0.5", 6380, 2)
    assert parse_url("redis://localhost") == RedisConfig("localhost", 6379, 0)
    cfg = parse_url("redis://:p%40ss@[::1]:7000/1")
    assert (cfg.host, cfg.port, cfg.db, cfg.password, cfg.username) == ("::1", 7000, 1, "p@ss", None)
    assert cfg.numeric_host and not parse_url("redis://redis.internal").numeric_host
    assert parse_url("redis://bob:pw@h/0").username == "bob"
    assert "p@ss" not in repr(cfg) and "p@ss" not in str(cfg)
    assert str(cfg) == "redis://:***@[::1]:7000/1"
    with pytest.raises(ValueError, match="rediss:// .*not supported yet") as info:
        parse_url("rediss://:secret@h:6379/0")
    assert "secret" not in str(info.value)
    for bad, words in [("http://h/0", "not a Redis URL"), ("redis://h:0/0", "port"),
                       ("redis://h:99999/0", "port"), ("redis://h/x", "database"),
                       ("redis:///0", "no host"), ("redis://h/0?timeout=1", "options"),
                       ("unix:///tmp/redis.sock", "not a Redis URL")]:
        with pytest.raises(ValueError, match=words):
            parse_url(bad)


# -- the sans-I/O cores: any split of the stream gives the same calls ---------------------------

_line = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
_leaf = st.one_of(
    st.tuples(st.just("simple"), _line),
    st.tuples(st.just("error"), _text),
    st.tuples(st.just("int"), st.integers(-2 ** 63, 2 ** 63 - 1)),
    st.tuples(st.just("bulk"), st.binary(max_size=40)),
    st.just(("nil",)),
    st.just(("nilarray",)),
)
resp_values = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=4).map(lambda xs: ("array", xs)),
                           max_leaves=12)


def wire(value) -> bytes:
    kind = value[0]
    if kind == "simple":
        return b"+" + value[1] + b"\r\n"
    if kind == "error":
        return b"-" + value[1].encode() + b"\r\n"
    if kind == "int":
        return b":%d\r\n" % value[1]
    if kind == "bulk":
        return b"$%d\r\n%s\r\n" % (len(value[1]), value[1])
    if kind == "nil":
        return b"$-1\r\n"
    if kind == "nilarray":
        return b"*-1\r\n"
    return b"*%d\r\n" % len(value[1]) + b"".join(wire(v) for v in value[1])


def python(value):
    """What the link hands a callback for ``value``."""
    kind = value[0]
    if kind in ("simple", "bulk"):
        return value[1]
    if kind == "error":
        return ("ReplyError", value[1])
    if kind == "int":
        return value[1]
    if kind in ("nil", "nilarray"):
        return None
    return [python(v) for v in value[1]]


def comparable(reply):
    if isinstance(reply, ReplyError):
        assert isinstance(reply, hiredis.ReplyError) and isinstance(reply, RedisError)
        return ("ReplyError", str(reply))
    if isinstance(reply, list):
        return [comparable(r) for r in reply]
    return reply


def chunks(data: bytes, cuts) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(resp_values, st.booleans()), min_size=1, max_size=25),
       st.lists(st.integers(min_value=0), max_size=30))
def test_command_core_matches_replies_in_order_however_the_stream_is_split(replies, cuts):
    stream = b"".join(wire(value) for value, _ in replies)

    def run(pieces):
        core = CommandProtocol()
        callbacks = []
        for i, (_value, has_callback) in enumerate(replies):
            callback = (lambda reply, i=i: None) if has_callback else None
            callbacks.append(callback)
            core.send(("GET", f"k{i}"), callback)
        calls = []
        for piece in pieces:
            calls += core.receive(piece)
        assert core.error is None and core.pending == 0
        return [(callbacks.index(fn), comparable(args[0])) for fn, args in calls]

    expected = [(i, python(value)) for i, (value, has_callback) in enumerate(replies) if has_callback]
    assert run([stream]) == expected
    assert run([stream[i:i + 1] for i in range(len(stream))]) == expected  # byte by byte, as h11's tests
    assert run(chunks(stream, cuts)) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("message"), st.sampled_from([b"a", b"b", b"gone"]), st.binary(max_size=20)),
    st.tuples(st.just("pmessage"), st.sampled_from([b"p.*", b"q.*"]), st.binary(max_size=20)),
    st.tuples(st.just("confirm"), st.sampled_from([b"subscribe", b"psubscribe", b"unsubscribe", b"pong"]),
              st.integers(1, 3)),
), max_size=30), st.lists(st.integers(min_value=0), max_size=30))
def test_pubsub_core_routes_messages_and_confirmations_however_the_stream_is_split(script, cuts):
    # The stream: messages interleaved with the confirmations of pending
    # (P)(UN)SUBSCRIBEs and PINGs, as Redis would send them.
    parts, expected_calls, entries = [], [], []
    count = 0
    for item in script:
        if item[0] == "message":
            parts.append(wire(("array", [("bulk", b"message"), ("bulk", item[1]), ("bulk", item[2])])))
            if item[1] != b"gone":  # unsubscribed while in flight: dropped
                expected_calls.append(("chan", item[1], item[2]))
        elif item[0] == "pmessage":
            channel = item[1][:1] + b".x"
            parts.append(wire(("array", [("bulk", b"pmessage"), ("bulk", item[1]), ("bulk", channel),
                                         ("bulk", item[2])])))
            if item[1] == b"p.*":
                expected_calls.append(("pat", channel, item[2]))
        else:
            kind, n = item[1], item[2]
            index = len(entries)
            entries.append((kind, n))
            if kind == b"pong":
                parts.append(wire(("array", [("bulk", b"pong"), ("bulk", b"")])) if n > 1 else b"+PONG\r\n")
                expected_calls.append(("done", index, b"PONG"))
                continue
            for j in range(n):
                count += 1 if kind != b"unsubscribe" else -1
                parts.append(wire(("array", [("bulk", kind), ("bulk", b"c%d" % j), ("int", count)])))
            expected_calls.append(("done", index, count))
    stream = b"".join(parts)

    def run(pieces):
        core = PubSubProtocol()
        seen = []
        core.channels.update({b"a": lambda c, d: seen.append(("chan", c, d)),
                              b"b": lambda c, d: seen.append(("chan", c, d))})
        core.patterns[b"p.*"] = lambda c, d: seen.append(("pat", c, d))
        for index, (kind, n) in enumerate(entries):
            core.send(("X",), lambda reply, index=index: seen.append(("done", index, reply)), kind,
                      1 if kind == b"pong" else n)
        for piece in pieces:
            for fn, args in core.receive(piece):
                fn(*args)
        assert core.error is None and core.pending == 0
        return seen

    assert run([stream]) == expected_calls
    assert run([stream[i:i + 1] for i in range(len(stream))]) == expected_calls
    assert run(chunks(stream, cuts)) == expected_calls


def test_core_stream_faults_stop_the_matching_and_fail_resets_it():
    core = CommandProtocol()
    got = []
    core.send(("PING",), got.append)
    core.send(("PING",), got.append)
    calls = core.receive(b"+PONG\r\n?garbage\r\n")
    assert [args for _fn, args in calls] == [(b"PONG",)]  # the replies before the fault still count
    assert "not RESP" in str(core.error)
    assert core.receive(b"+PONG\r\n") == []
    failed = core.fail(LinkDown("lost"))
    assert [(fn, str(args[0])) for fn, args in failed] == [(got.append, "lost")]
    assert core.error is None and core.pending == 0
    core.receive(b"+OK\r\n")
    assert "nobody asked" in str(core.error)
    pubsub = PubSubProtocol()
    pubsub.send(("SUBSCRIBE", "a"), None, b"subscribe", 1)
    pubsub.receive(wire(("array", [("bulk", b"psubscribe"), ("bulk", b"a"), ("int", 1)])))
    assert "expected b'subscribe'" in str(pubsub.error)


# -- links on a real redis-server ---------------------------------------------------------------

class Links:
    """Open links on the test's reactor thread; all closed after the test."""

    def __init__(self, loop):
        self.loop = loop
        self.opened = []

    def open(self, url, cls=RedisLink, wait_up=True, **options):
        ups, downs = Events("on_up"), Events("on_down")
        link = self.loop.call(cls, self.loop.reactor, url, on_up=lambda: ups("up"), on_down=downs, **options)
        link.ups, link.downs = ups, downs
        self.opened.append(link)
        if wait_up:
            ups.wait(1)
        return link

    def command(self, link, *args):
        """One command, its reply (waited for)."""
        reply = Events("reply")
        self.loop.call(link.command, *args, callback=reply)
        return reply.wait(1)[0]

    def close_all(self):
        for link in self.opened:
            self.loop.call(link.close)


@pytest.fixture
def links(loop):
    opened = Links(loop)
    yield opened
    opened.close_all()


def test_set_get_round_trip(module_redis, links):
    link = links.open(module_redis.url(), name="roundtrip")
    assert link.up and link.state == "up" and link.last_error is None
    assert links.command(link, "SET", "rt:greeting", "héllo") == b"OK"
    assert links.command(link, "GET", "rt:greeting") == "héllo".encode()
    assert links.command(link, "GET", "rt:missing") is None
    assert links.command(link, "RPUSH", "rt:list", 1, 2, b"\x00\r\n") == 3
    assert links.command(link, "LRANGE", "rt:list", 0, -1) == [b"1", b"2", b"\x00\r\n"]
    assert module_redis.call("CLIENT", "LIST").count(b"name=roundtrip ") == 1
    assert len(link.ups) == 1 and len(link.downs) == 0


def test_ten_thousand_pipelined_incrs_are_answered_in_order(redis_server, links):
    link = links.open(redis_server.url())
    replies = Events("INCR replies")

    def burst():  # one loop turn: all of it leaves in as few sends as the kernel takes
        for _ in range(10_000):
            link.command("INCR", "counter", callback=replies)
        return link.pending

    assert links.loop.call(burst) == 10_000
    assert replies.wait(10_000) == list(range(1, 10_001))
    assert redis_server.call("GET", "counter") == b"10000"
    assert links.loop.call(lambda: link.pending) == 0


def test_an_error_reply_reaches_its_callback_and_the_link_goes_on(module_redis, links, caplog):
    link = links.open(module_redis.url())
    assert links.command(link, "SET", "err:text", "abc") == b"OK"
    replies = Events("replies")

    def mixed():
        link.command("INCR", "err:text", callback=replies)
        link.command("NOSUCHCOMMAND", callback=replies)
        link.command("GET", "err:text", callback=lambda reply: 1 / 0)  # a callback that raises
        link.command("GET", "err:text", callback=replies)

    links.loop.call(mixed)
    wrongtype, unknown, text = replies.wait(3)
    assert isinstance(wrongtype, ReplyError) and isinstance(wrongtype, hiredis.ReplyError)
    assert "not an integer" in str(wrongtype)
    assert isinstance(unknown, ReplyError) and "unknown command" in str(unknown)
    assert text == b"abc"
    assert link.up and len(link.downs) == 0
    assert any("callback" in r.message and r.exc_info for r in caplog.records)
    assert links.command(link, "INCR", "err:n") == 1


def test_commands_while_not_up_get_link_down_on_the_next_turn(links):
    port = _closed_port()
    link = links.open(f"redis://127.0.0.1:{port}/0", wait_up=False, **FAST)
    got = []

    def issue():
        link.command("PING", callback=got.append)
        return list(got)  # nothing yet: never inside command()

    assert links.loop.call(issue) == []
    wait_for(lambda: got, "the LinkDown")
    assert isinstance(got[0], LinkDown) and not link.up
    wait_for(lambda: link.last_error is not None, "a failed attempt")
    assert "cannot connect" in str(link.last_error) and "refused" in str(link.last_error).lower()
    assert len(link.ups) == 0 and len(link.downs) == 0  # on_down only after an on_up
    with pytest.raises(TypeError):
        links.loop.call(link.command, "SET", "k", None)


def test_pub_sub_between_two_links_keeps_many_messages_in_order(redis_server, links):
    pub = links.open(redis_server.url(), name="pub")
    sub = links.open(redis_server.url(), cls=PubSubLink, name="sub")
    got, pgot = Events("messages"), Events("pattern messages")
    confirmed = Events("confirmations")
    links.loop.call(sub.subscribe, "room.1", b"room.2", on_message=got, callback=confirmed)
    links.loop.call(sub.psubscribe, "presence.*", on_message=pgot, callback=confirmed)
    assert confirmed.wait(2) == [2, 3]
    assert links.loop.call(lambda: sub.channels) == {b"room.1", b"room.2"}
    n = 3000

    def publish():
        for i in range(n):
            pub.command("PUBLISH", "room.1" if i % 2 else "room.2", b"m%d" % i)
            pub.command("PUBLISH", f"presence.node{i % 3}", b"p%d" % i)

    links.loop.call(publish)
    assert got.wait(n) == [(b"room.1" if i % 2 else b"room.2", b"m%d" % i) for i in range(n)]
    assert pgot.wait(n) == [(f"presence.node{i % 3}".encode(), b"p%d" % i) for i in range(n)]
    # Unsubscribed: no more deliveries for room.2; room.1 still flows.
    links.loop.call(sub.unsubscribe, "room.2", callback=confirmed)
    assert confirmed.wait(3)[-1] == 2
    links.loop.call(pub.command, "PUBLISH", "room.2", "late")
    links.loop.call(pub.command, "PUBLISH", "room.1", "last")
    assert got.wait(n + 1)[-1] == (b"room.1", b"last")
    assert len(got) == n + 1


def test_redis_killed_then_restarted(redis_server, links):
    url = redis_server.url()
    link = links.open(url, timeout=30, **FAST)  # a long timeout: the loss must come from the socket
    sub = links.open(url, cls=PubSubLink, timeout=30, **FAST)
    heard = Events("messages")
    confirmed = Events("subscribed")
    links.loop.call(sub.subscribe, "news", on_message=heard, callback=confirmed)
    confirmed.wait(1)
    assert links.command(link, "PUBLISH", "news", "before") == 1
    heard.wait(1)

    # Commands pending at the moment of death: Redis is stopped while they are sent.
    redis_server.pause()
    answers = Events("answers")
    links.loop.call(lambda: [link.command("INCR", "k", callback=lambda r, i=i: answers((i, r)))
                             for i in range(500)])
    wait_for(lambda: links.loop.call(lambda: link.pending == 500 and link.buffered == 0), "all 500 sent")
    redis_server.kill()

    link.downs.wait(1)
    sub.downs.wait(1)
    got = answers.wait(500)
    assert sorted(i for i, _ in got) == list(range(500))  # each callback once, in the order sent
    assert [i for i, _ in got] == list(range(500))
    assert all(isinstance(r, LinkDown) for _, r in got)
    assert got[0][1] is link.downs.snapshot()[0]  # the same LinkDown for all, and for on_down
    assert "within" not in str(got[0][1])  # the socket told us, not the timeout
    assert links.loop.call(lambda: (link.up, link.pending, sub.up)) == (False, 0, False)

    # Down, a command fails at once; restarted, both come back, the subscription with them.
    assert isinstance(links.command(link, "PING"), LinkDown)
    redis_server.restart()
    link.ups.wait(2)
    sub.ups.wait(2)  # fired only once the subscription is restored
    assert links.command(link, "PUBLISH", "news", "after") == 1
    assert heard.wait(2)[-1] == (b"news", b"after")
    assert len(answers) == 500 and len(link.downs) == 1 and len(sub.downs) == 1
    assert links.command(link, "INCR", "k") == 1  # a fresh, empty Redis


def test_a_stopped_redis_is_declared_down_by_the_timeout(redis_server, links):
    url = redis_server.url()
    link = links.open(url, timeout=0.5, ping_interval=0.2, **FAST)
    sub = links.open(url, cls=PubSubLink, timeout=0.5, ping_interval=0.2, **FAST)
    heard = Events("messages")
    links.loop.call(sub.subscribe, "news", on_message=heard)
    assert links.command(link, "PING") == b"PONG"

    redis_server.pause()
    started = time.monotonic()
    reply = links.command(link, "GET", "k")
    assert isinstance(reply, LinkDown) and "no reply from Redis within 0.5 s" in str(reply)
    assert 0.4 < time.monotonic() - started < 5
    assert link.downs.wait(1) == [reply]
    # The subscriber has nothing pending of its own: its idle PING finds the silence.
    assert "within 0.5 s" in str(sub.downs.wait(1)[0])
    # Still stopped: a new attempt connects (the kernel accepts) but its handshake times out.
    wait_for(lambda: link.last_error is not reply, "a failed attempt")
    assert "within 0.5 s" in str(link.last_error)
    assert not link.up and len(link.ups) == 1

    redis_server.resume()
    link.ups.wait(2)
    sub.ups.wait(2)
    assert links.command(link, "PUBLISH", "news", "back") == 1
    assert heard.wait(1) == [(b"news", b"back")]


def test_password_and_database_from_the_url(make_redis, links, caplog):
    server = make_redis("--requirepass", "s3cret")
    link = links.open(server.url(db=3))
    assert links.command(link, "SET", "where", "db3") == b"OK"
    assert server.call("GET", "where") is None  # db 0
    other = links.open(server.url(db=3), name="other")
    assert links.command(other, "GET", "where") == b"db3"

    caplog.set_level(logging.WARNING, logger="selchat.cluster")
    wrong = links.open(server.url(password="nope"), wait_up=False, **FAST)
    wait_for(lambda: wrong.last_error is not None, "the failed AUTH")
    assert "AUTH failed" in str(wrong.last_error) and "nope" not in str(wrong.last_error)
    assert not wrong.up and len(wrong.ups) == 0
    # retried with backoff, logged once per distinct reason
    wait_for(lambda: wrong.failures >= 3, "three attempts")
    assert sum("AUTH failed" in r.getMessage() for r in caplog.records) == 1
    assert "s3cret" not in caplog.text and "nope" not in caplog.text


def test_a_host_name_is_resolved_off_the_loop(module_redis, links):
    link = links.open(f"redis://localhost:{module_redis.port}/0")  # ::1 may come first; 127.0.0.1 answers
    assert links.command(link, "PING") == b"PONG"


def test_the_output_buffer_is_bounded(redis_server, links):
    link = links.open(redis_server.url(), max_buffer=4096)
    replies = Events("replies")

    def flood():  # one turn: nothing is sent until its end, so the buffer fills
        for i in range(200):
            link.command("SET", f"key{i}", "x" * 50, callback=lambda r, i=i: replies((i, r)))

    links.loop.call(flood)
    got = dict(replies.wait(200))
    sent = [i for i in range(200) if got[i] == b"OK"]
    refused = [i for i in range(200) if isinstance(got[i], BufferFull)]
    assert sent == list(range(len(sent))) and refused == list(range(len(sent), 200))
    assert 40 < len(sent) < 80  # ~4096 / 75 bytes
    assert link.up and links.command(link, "GET", "key0") == b"x" * 50


def test_close_fails_what_is_pending_and_ends_the_link(redis_server, links):
    link = links.open(redis_server.url())
    got = []

    def close_with_pending():
        for _ in range(3):
            link.command("PING", callback=got.append)
        link.close()
        link.close()
        return list(got), link.state

    before, state = links.loop.call(close_with_pending)
    assert state == "closed" and len(before) == 3
    assert all(isinstance(r, LinkDown) and "closed" in str(r) for r in before)
    assert len(link.downs) == 0
    wait_for(lambda: b"name=selchat" not in redis_server.call("CLIENT", "LIST"), "the connection closed")
    assert isinstance(links.command(link, "PING"), LinkDown)


# -- against a fake Redis: what leaves per turn, and a stream that is not RESP ------------------

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the link closed"
        data += chunk
    return data


def test_one_turn_of_commands_leaves_in_one_send_and_a_bad_stream_drops_the_link(links):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE)
    port = listener.getsockname()[1]
    link = links.open(f"redis://127.0.0.1:{port}/0", name=None, wait_up=False, ping_interval=60, **FAST)
    server, _ = listener.accept()
    server.settimeout(DEADLINE)
    assert _recv_exactly(server, len(encode("PING"))) == encode("PING")  # the whole handshake
    server.sendall(b"+PONG\r\n")
    link.ups.wait(1)

    replies = Events("replies")
    commands = [("SET", f"k{i}", i) for i in range(100)]
    links.loop.call(lambda: [link.command(*c, callback=replies) for c in commands])
    expected = b"".join(encode(*c) for c in commands)
    assert server.recv(1 << 20) == expected  # one recv has it all: it left in one send
    server.sendall(b"+OK\r\n" * 99 + b"+O")
    replies.wait(99)
    assert links.loop.call(lambda: link.pending) == 1
    server.sendall(b"K\r\n")
    assert replies.wait(100) == [b"OK"] * 100

    # Garbage: the link drops the connection and comes back.
    links.loop.call(link.command, "GET", "x", callback=replies)
    server.recv(1024)
    server.sendall(b"?what\r\n")
    lost = replies.wait(101)[-1]
    assert isinstance(lost, LinkDown) and "not RESP" in str(lost)
    assert link.downs.wait(1)
    assert server.recv(1024) == b""  # we closed it
    server.close()
    again, _ = listener.accept()
    again.settimeout(DEADLINE)
    assert _recv_exactly(again, len(encode("PING"))) == encode("PING")
    again.sendall(b"+PONG\r\n")
    link.ups.wait(2)
    # A reply nobody asked for is a fault too.
    again.sendall(b"+OK\r\n")
    assert "nobody asked" in str(link.downs.wait(2)[-1])
    again.close()
    listener.close()


def test_congested_while_redis_reads_slower_than_we_write_then_drained(redis_server, links):
    # The cluster slows its senders on `congested` and lets them go on
    # `on_drain`: with Redis stopped, the socket's output backs up past the
    # transport's high-water mark; once Redis reads again, it drains.
    link = links.open(redis_server.url(), timeout=30.0)
    drained = Events("drained")
    link.on_drain = lambda: drained("drained")
    replies = Events("replies")
    redis_server.pause()
    try:
        def flood():  # a few MiB: more than the kernel's buffers take
            for i in range(64):
                link.command("SET", f"big{i}", "x" * 65536, callback=replies)
            return link.congested

        deadline = time.monotonic() + DEADLINE
        while not links.loop.call(flood):
            assert time.monotonic() < deadline, "never congested"
    finally:
        redis_server.resume()
    drained.wait(1)
    assert links.loop.call(lambda: link.congested) is False
    assert link.up
