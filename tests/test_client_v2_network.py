"""The issue's field test: pull the network under either client for 60 s
mid-chat; the chat survives and every message gets exactly one fate.

Default timings throughout (the client's 30 s heartbeat, the server's 90 s
ping and 120 s resume window), so each run takes about 70 s: behind
``make test-slow``.
"""

from __future__ import annotations

import time

import pytest

from tests.support import unique
from tests.test_client_v2_e2e import Peer, proxies, start_chat  # noqa: F401 (proxies: a fixture)

PULLED_FOR = 60.0


def seen(peer: Peer, kind: str, **fields) -> None:
    """``peer`` has shown this event, before now or within a minute."""
    if not any(e["type"] == kind and all(e[k] == v for k, v in fields.items()) for e in peer.events):
        peer.expect(kind, timeout=60, **fields)


@pytest.mark.slow
@pytest.mark.parametrize("pulled", ["alice", "bob"])
def test_a_chat_survives_the_network_pulled_for_60_seconds(make_server, clients, proxies, pulled):
    srv = make_server("--conn-rate", "0", "--max-per-address", "0", "--throttle-after", "0")
    pa, pb = proxies(srv), proxies(srv)
    alice = Peer(clients, pa.port, unique("na"), "--ping-interval", "30", "--ping-timeout", "30")
    bob = Peer(clients, pb.port, unique("nb"), "--ping-interval", "30", "--ping-timeout", "30")
    alice.expect("ready")
    bob.expect("ready")
    start_chat(alice, bob)
    alice.write("before")
    bob.expect("message", text="before")
    proxy = pa if pulled == "alice" else pb
    proxy.network_down()
    alice.write("a1", "a2")
    bob.write("b1", "b2")
    time.sleep(PULLED_FOR)  # the fault's duration, not a synchronisation
    proxy.network_up()
    for sender, receiver, prefix in ((alice, bob, "a"), (bob, alice, "b")):
        for text in (f"{prefix}1", f"{prefix}2"):
            seen(receiver, "message", text=text)
            seen(sender, "delivered", text=text)
    alice.write("after")
    bob.expect("message", text="after")
    alice.expect("delivered", text="after")
    for peer in (alice, bob):
        peer.process.close_stdin()
        assert peer.process.wait() == 0
        peer.drain()
    for sender, receiver, mine in ((alice, bob, ["before", "a1", "a2", "after"]), (bob, alice, ["b1", "b2"])):
        assert [e["text"] for e in receiver.of("message") if e["user"] == sender.name] == mine  # once, in order
        assert not sender.of("not-delivered") and not sender.of("unconfirmed")
        # the chat never broke: it ended only when the first of them logged out
        assert not receiver.of("chat-dropped")
        assert [e["reason"] for e in receiver.of("ended")] in ([], ["left"])
