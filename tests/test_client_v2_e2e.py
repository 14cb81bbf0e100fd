"""The client's protocol version 2 over real sockets: ``selchat connect --json
--reconnect`` processes, a real server, and a fault proxy between each client
and the server that cuts, stalls and half-closes their connections.

What must hold whatever the faults: every message is either delivered
exactly once, in order, and its sender gets one ``delivered`` receipt for it,
or it never reaches the partner and its sender is told ``not-delivered``;
never both, never neither.
"""

from __future__ import annotations

import os
import queue
import random
import time

import pytest

from tests.faultproxy import FaultProxy
from tests.support import unique
from tests.test_client_json import check_event

CHAOS_SECONDS = 4.0      # how long the proxies break things in the big test
SETTLE_SECONDS = 15.0    # then every message must have its fate within this
SEED = int(os.environ.get("SELCHAT_CHAOS_SEED", "20261207"))   # another seed, another story


@pytest.fixture(scope="module")
def v2server(tmp_path_factory):
    from tests.support import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("v2client"), "--conn-rate", "0", "--max-per-address", "0",
                        "--throttle-after", "0", "--resume-window", "60")
    yield srv
    srv.stop()


@pytest.fixture
def proxies():
    """Fault proxies to a server; all closed after the test."""
    started = []

    def start(server) -> FaultProxy:
        proxy = FaultProxy(server.host, server.port).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


class Peer:
    """One ``selchat connect --json --reconnect`` process and what it said.

    ``read_until(pred)`` reads events until ``pred(event)`` is true, with a
    deadline; every event is checked against the README's schema on the way
    and kept in ``events``.
    """

    def __init__(self, clients, port: int, name: str, *args: str):
        self.name = name
        self.process = clients(port, "--json", "--reconnect", "--register", "--ping-interval", "1",
                               "--ping-timeout", "2", *args, user=name, password="pw")
        self.events: list[dict] = []
        self.ended = False

    def _next(self, timeout: float) -> dict | None:
        """The next event (waiting at most ``timeout``), or None at the end of the stream."""
        if self.ended:
            return None
        line = self.process.out.get(timeout=max(0.0, timeout))
        if line is None:
            self.ended = True
            return None
        event = check_event(line)
        self.events.append(event)
        return event

    def read_until(self, pred, timeout: float = 10.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._next(deadline - time.monotonic())
            except queue.Empty:
                raise AssertionError(f"{self.name}: no {what} within {timeout} s; last events "
                                     f"{self.events[-20:]}") from None
            if event is None:
                raise AssertionError(f"{self.name}: the client ended without {what}; last events "
                                     f"{self.events[-20:]}")
            if pred(event):
                return event

    def expect(self, kind: str, timeout: float = 10.0, **fields) -> dict:
        return self.read_until(lambda e: e["type"] == kind and all(e[k] == v for k, v in fields.items()),
                               timeout, f"{kind} {fields}")

    def drain(self) -> None:
        """Take in what has been printed so far, without waiting."""
        while True:
            try:
                if self._next(0) is None:
                    return
            except queue.Empty:
                return

    def write(self, *lines: str) -> None:
        self.process.write("".join(line + "\n" for line in lines))

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


def start_chat(a: Peer, b: Peer) -> None:
    a.write(f"/chat {b.name}")
    b.expect("request-in", user=a.name)
    b.write("yes")
    a.expect("started", user=b.name)
    b.expect("started", user=a.name)


def pair(clients, server, proxies) -> tuple[Peer, Peer, FaultProxy, FaultProxy]:
    pa, pb = proxies(server), proxies(server)
    a = Peer(clients, pa.port, unique("va"))
    b = Peer(clients, pb.port, unique("vb"))
    a.expect("ready")
    b.expect("ready")
    start_chat(a, b)
    return a, b, pa, pb


def test_a_message_gets_its_receipt_and_a_cut_connection_is_resumed(v2server, clients, proxies):
    alice, bob, pa, _ = pair(clients, v2server, proxies)
    alice.write("before the cut")
    bob.expect("message", user=alice.name, text="before the cut")
    assert alice.expect("delivered", text="before the cut")["seq"] == 1
    pa.cut_all()
    alice.expect("chat-kept", user=bob.name)
    bob.expect("away", user=alice.name)
    alice.write("typed while away")
    alice.expect("queued", text="typed while away")
    resumed = alice.expect("resumed", timeout=15)
    assert resumed["text"].startswith(f"still chatting with {bob.name}")
    bob.expect("back", user=alice.name)
    bob.expect("message", user=alice.name, text="typed while away")
    assert alice.expect("delivered", text="typed while away")["seq"] == 2
    bob.write("and back to you")
    alice.expect("message", user=bob.name, text="and back to you")
    bob.expect("delivered", text="and back to you", seq=1)
    for peer in (alice, bob):
        peer.process.close_stdin()
        assert peer.process.wait() == 0
        peer.drain()
    # shown once, and no message without its one fate
    assert [e["text"] for e in bob.of("message")] == ["before the cut", "typed while away"]
    assert not alice.of("not-delivered") and not alice.of("unconfirmed") and not bob.of("unconfirmed")


def write_in_bursts(alice: Peer, bob: Peer, texts: dict[str, list[str]], rng: random.Random, seconds: float,
                    after_burst=None) -> None:
    """Each peer's ``texts`` go in over ``seconds``, ten lines at a time, the
    writer of each burst drawn at random (each one's lines stay in order).
    This paces the load over the faults; nothing is waited for (a client
    keeps what is typed while it is offline). ``after_burst(i, n)`` runs
    after burst ``i`` of ``n``."""
    order = [alice] * (len(texts[alice.name]) // 10) + [bob] * (len(texts[bob.name]) // 10)
    rng.shuffle(order)
    sent = {alice.name: 0, bob.name: 0}
    bursts = []
    for peer in order:
        bursts.append((peer, texts[peer.name][sent[peer.name]:sent[peer.name] + 10]))
        sent[peer.name] += 10
    start = time.monotonic()
    for i, (peer, lines) in enumerate(bursts):
        peer.write(*lines)
        if after_burst is not None:
            after_burst(i, len(bursts))
        pause = start + seconds * (i + 1) / len(bursts) - time.monotonic()
        if pause > 0:
            time.sleep(pause)   # spreads the load over the faults; no condition is awaited
        alice.drain()
        bob.drain()


def each_message_had_exactly_one_fate(alice: Peer, bob: Peer, texts: dict[str, list[str]], story: str) -> None:
    """After a run of ``texts`` (each peer's lines, by name) sent both ways
    through faults: wait for a fate for every message, send a last one each
    way (both are online again, and the order holds to the end), end both
    clients, and check that every message was shown exactly once, in order,
    to its receiver, and had exactly one fate for its sender: delivered, or
    not delivered (never both, never neither, never unconfirmed)."""
    def settled(peer: Peer) -> bool:
        fates = len(peer.of("delivered")) + len(peer.of("not-delivered")) + len(peer.of("unconfirmed"))
        return fates >= len(texts[peer.name])

    for peer in (alice, bob):
        if not settled(peer):
            peer.read_until(lambda e, p=peer: settled(p), SETTLE_SECONDS, f"a fate for every message; {story}")
    for sender, receiver in ((alice, bob), (bob, alice)):
        sender.write(f"{sender.name} is done")
        receiver.expect("message", timeout=SETTLE_SECONDS, text=f"{sender.name} is done")
        sender.expect("delivered", timeout=SETTLE_SECONDS, text=f"{sender.name} is done")
    for peer in (alice, bob):
        peer.process.close_stdin()
        code = peer.process.wait()
        peer.drain()
        if code == 3:   # stdin ended while a late fault had it reconnecting: it gives up, rightly
            done = next(i for i, e in enumerate(peer.events)
                        if e["type"] == "delivered" and e["text"] == f"{peer.name} is done")
            kinds = [e["type"] for e in peer.events[done:]]
            assert "lost" in kinds and kinds[-1] == "gave-up", f"{peer.events[done:]}; {story}"
        else:
            assert code == 0, f"{peer.name} exit {code}: {peer.events[-12:]}; {story}"

    for sender, receiver in ((alice, bob), (bob, alice)):
        done = f"{sender.name} is done"
        delivered = [e["text"] for e in sender.of("delivered") if e["text"] != done]
        lost = [e["text"] for e in sender.of("not-delivered")]
        seen = [e["text"] for e in receiver.of("message") if e["user"] == sender.name]
        assert seen[-1] == done, story
        seen = seen[:-1]
        assert not sender.of("unconfirmed"), story
        assert len(set(delivered)) == len(delivered), "a receipt came twice"
        assert set(delivered).isdisjoint(lost), "both delivered and not delivered"
        assert set(delivered) | set(lost) == set(texts[sender.name]), "a message without a fate"
        # shown exactly once, in the order sent, and exactly those delivered
        assert len(set(seen)) == len(seen), "a message shown twice"
        assert seen == [t for t in texts[sender.name] if t in set(seen)], \
            f"out of order: {seen[:40]}; sender: {[(e['type'], e.get('text'), e.get('seq')) for e in sender.events][:120]}"
        assert set(seen) == set(delivered), story
        # seqs: one receipt per seq, each the message sent as that seq
        seqs = [e["seq"] for e in sender.of("delivered")]
        assert len(set(seqs)) == len(seqs)


def test_messages_both_ways_through_random_faults_each_get_exactly_one_fate(v2server, clients, proxies):
    count = 200
    alice, bob, pa, pb = pair(clients, v2server, proxies)
    texts = {alice.name: [f"{alice.name} says {i}" for i in range(count)],
             bob.name: [f"{bob.name} says {i}" for i in range(count)]}
    rng = random.Random(SEED)
    pa.chaos(random.Random(rng.random()), every=0.3)
    pb.chaos(random.Random(rng.random()), every=0.3)
    write_in_bursts(alice, bob, texts, rng, CHAOS_SECONDS)
    pa.stop_chaos()
    pb.stop_chaos()
    story = f"faults: {pa.faults + pb.faults}"
    each_message_had_exactly_one_fate(alice, bob, texts, story)
    assert len(alice.of("resumed")) + len(bob.of("resumed")) >= 3, story   # the faults did bite


def test_a_restarted_server_means_a_new_login_and_each_message_is_accounted_for(make_server, clients):
    first = make_server("--conn-rate", "0", "--max-per-address", "0", "--throttle-after", "0")
    alice = Peer(clients, first.port, unique("ra"))
    bob = Peer(clients, first.port, unique("rb"))
    alice.expect("ready")
    bob.expect("ready")
    start_chat(alice, bob)
    alice.write("seen")
    bob.expect("message", text="seen")
    alice.expect("delivered", text="seen")
    first.proc.kill()
    first.proc.wait()
    alice.expect("chat-kept", user=bob.name)
    alice.write("into the void")
    alice.expect("queued", text="into the void")
    make_server("--port", str(first.port), "--conn-rate", "0", "--max-per-address", "0",
                "--throttle-after", "0", db=first.db)
    # the new server has no session: the kept line is not delivered, the chat is over
    event = alice.expect("not-delivered", timeout=20, text="into the void")
    assert "no longer had the session" in event["reason"]
    alice.expect("chat-dropped", user=bob.name)
    assert alice.expect("reconnected")["lost_chat"] == bob.name
    bob.expect("reconnected", timeout=20)
    alice.write(f"/chat {bob.name}")   # and a new chat works, with receipts from 1
    bob.expect("request-in", user=alice.name)
    bob.write("yes")
    alice.expect("started")
    alice.write("again")
    bob.expect("message", text="again")
    assert alice.expect("delivered", text="again")["seq"] == 1


def test_away_past_the_window_ends_the_chat_and_reports_every_message(make_server, clients, proxies):
    srv = make_server("--conn-rate", "0", "--max-per-address", "0", "--throttle-after", "0",
                      "--resume-window", "1", "--ping-interval", "0.5", "--ping-timeout", "0.5")
    pa = proxies(srv)
    alice = Peer(clients, pa.port, unique("wa"), "--ping-interval", "0.3", "--ping-timeout", "0.5")
    bob = Peer(clients, srv.port, unique("wb"))
    alice.expect("ready")
    bob.expect("ready")
    start_chat(alice, bob)
    pa.network_down()   # alice's packets go nowhere; her new connections hang
    alice.expect("chat-kept", user=bob.name)
    alice.write("typed offline")
    alice.expect("queued", text="typed offline")
    bob.expect("away", user=alice.name)
    bob.write("while alice is away")
    # the window ends: bob's held message is reported, his chat is over
    bob.expect("ended", timeout=10, user=alice.name, reason="dropped")
    bob.expect("not-delivered", text="while alice is away")
    pa.network_up()
    alice.expect("not-delivered", timeout=15, text="typed offline")
    alice.expect("chat-dropped", user=bob.name)
    alice.expect("reconnected", timeout=15)
    assert not alice.of("message"), "bob's held message was reported undelivered: not shown"
