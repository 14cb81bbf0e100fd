"""Resuming a version 2 session on another node of a cluster.

When a node dies (SIGKILL) its version 2 sessions are not lost: Redis keeps
each one's chat, the messages relayed to it that its client has not
acknowledged, and the fates of its own messages, so its client resumes on
another node and the chat goes on with exactly one fate for every message
(docs/architecture.md, "Resuming on another node"). The same happens when a
client simply comes back through another node while its old node is alive.

Frame by frame with raw sockets first (what the protocol promises), then with
real ``selchat connect`` clients given two nodes (``--host a,b``) whose node
is killed while they exchange numbered messages both ways.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from selchat.cluster.node import MOVING
from tests.clusterharness import CLUSTER_ARGS, make_cluster, require_cluster_mode  # noqa: F401
from tests.support import DEADLINE, RawUser, V2User, start_chat, unique, wait_for
from tests.faultproxy import FaultProxy
from tests.test_client_v2_e2e import SEED, Peer, each_message_had_exactly_one_fate, write_in_bursts
from tests.test_client_v2_e2e import start_chat as e2e_start_chat

#: The spec's failover bound for a client (seconds from the SIGKILL to chatting
#: again) does not count the dead node's lease, which the cluster must wait
#: out before another node may hold its sessions (5 s).
LEASE = 5.0


def chatting(c, first: int, second: int) -> tuple[V2User, V2User]:
    """alice on node ``first`` and bob on ``second``, in a chat, all acknowledged."""
    alice, bob = V2User(c.node(first).connect), V2User(c.node(second).connect)
    start_chat(alice, bob)
    alice.ack()
    bob.ack()
    return alice, bob


def expect_frames(user: V2User, prefix: str, count: int) -> list[str]:
    return [user.expect(prefix) for _ in range(count)]


#: CLUSTER_ARGS with requests that do not expire while a test resumes.
PATIENT = (*CLUSTER_ARGS[:-2], "--request-timeout", "60")
assert CLUSTER_ARGS[-2] == "--request-timeout"


def resume_on(user: V2User, node, **kwargs) -> int:
    """RESUME through ``node`` (not the session's node)."""
    user.connect = node.connect
    return user.resume(**kwargs)


def received_up_to(user: V2User, seq: int) -> None:
    """RECEIVED on the chat socket, until one for ``seq`` (earlier ones may come first)."""
    while int(user.chat.expect("RECEIVED ").split()[1]) < seq:
        pass


def test_a_session_resumes_on_another_node_after_its_node_is_killed(make_cluster):
    require_cluster_mode()
    c = make_cluster(3)
    alice, bob = chatting(c, 0, 1)
    # alice's messages 1-3: bob's client shows all three, acknowledges only the first.
    alice.chat.send("MSG a1", "MSG a2", "MSG a3")
    assert [f.split(" ", 2)[2] for f in expect_frames(bob, f"MSG {alice.name} ", 3)] == ["a1", "a2", "a3"]
    got_by_alice = []
    bob.chat.send("MSG b1")
    got_by_alice.append(alice.expect(f"MSG {bob.name} ").split(" ", 2)[2])  # alice saw b1, acknowledged nothing
    received_up_to(alice, 3)
    killed = time.monotonic()
    c.kill(0)
    # bob's node hears that alice's node died (its lease ran out): AWAY, the chat stays up.
    bob.expect(f"AWAY {alice.name}", timeout=LEASE + DEADLINE)
    away_after = time.monotonic() - killed
    bob.chat.send("MSG b2", "MSG b3")  # held in Redis for alice
    received_up_to(bob, 3)
    # alice resumes on node 2: she has seen 1 message (b1); the server has her 3.
    last_id = alice.last_id
    assert resume_on(alice, c.node(2), messages=1) == 3 and alice.last_id == last_id  # numbered on
    # Where she stands (the chat), then what she had not received, once (not b1 again); bob hears BACK.
    alice.expect(f"STARTED {bob.name}")
    got_by_alice += [f.split(" ", 2)[2] for f in expect_frames(alice, f"MSG {bob.name} ", 2)]
    assert got_by_alice == ["b1", "b2", "b3"]
    bob.expect(f"BACK {alice.name}")
    # b1 was received before the crash: DELIVERED now; b2, b3 once she acknowledges.
    assert bob.expect("DELIVERED ").split()[1:3] == ["1", "1"]
    alice.ack()
    assert bob.expect("DELIVERED ").split()[1:3] == ["2", "3"]
    # alice's a2, a3 reached bob's client: his ACK now gives her the receipt, on her new node.
    bob.ack()
    assert alice.expect("DELIVERED ").split()[1:3] == ["1", "3"]
    # The chat goes on both ways.
    alice.chat.send("MSG a4")
    assert bob.expect(f"MSG {alice.name} ") == f"MSG {alice.name} a4"
    bob.ack()
    assert alice.expect("DELIVERED ").split()[1:3] == ["4", "4"]
    bob.chat.send("QUIT")
    bob.chat.expect("OK QUIT")
    assert alice.expect(f"ENDED {bob.name} quit")
    print(f"alice's node killed: bob heard AWAY after {away_after:.1f} s")
    for u in (alice, bob):
        for s in (u.login, u.chat, u.check):
            s.close()


def test_a_session_moves_to_another_node_while_its_node_is_alive(make_cluster):
    require_cluster_mode()
    c = make_cluster(2)
    alice, bob = chatting(c, 0, 1)
    bob.chat.send("MSG before")
    assert alice.expect(f"MSG {bob.name} ") == f"MSG {bob.name} before"
    alice.ack()
    bob.expect("DELIVERED 1 1")
    # alice's client comes back through node 1 (say her first node is out of
    # reach for her); node 0 has not noticed anything.
    old = (alice.login, alice.chat, alice.check)
    last_id = alice.last_id
    assert resume_on(alice, c.node(1), messages=1) == 0 and alice.last_id == last_id
    alice.expect(f"STARTED {bob.name}")  # where she stands
    for sock in old:  # node 0 let go of the session: its sockets close, without a word
        assert sock.expect_closed() == []
    bob.expect(f"AWAY {alice.name}")
    bob.expect(f"BACK {alice.name}")
    alice.chat.send("MSG from node 1")
    assert bob.expect(f"MSG {alice.name} ") == f"MSG {alice.name} from node 1"
    bob.ack()
    assert alice.expect("DELIVERED ") == "DELIVERED 1 1"
    bob.chat.send("MSG back to you")
    assert alice.expect(f"MSG {bob.name} ") == f"MSG {bob.name} back to you"
    alice.ack()
    bob.expect("DELIVERED 2 2")
    # A second move, back to node 0 (the token stays the same for the session).
    assert resume_on(alice, c.node(0), messages=2) == 1


@pytest.mark.parametrize("missed", ["STARTED", "REQUEST"])
def test_a_session_moved_to_another_node_is_told_where_it_stands(make_cluster, missed):
    """The old node's events are not replayed after a move: the new node says
    the chat or the request again (the frame may have been lost with the old
    connection; here the RESUME says it was)."""
    require_cluster_mode()
    c = make_cluster(2, *PATIENT)
    alice, bob = V2User(c.node(0).connect), V2User(c.node(1).connect)
    before = alice.last_id
    if missed == "STARTED":
        start_chat(alice, bob)
    else:
        bob.chat.send(f"CHAT {alice.name}")
        bob.chat.expect(f"OK CHAT {alice.name}")
        alice.expect(f"REQUEST {bob.name}")
    resume_on(alice, c.node(1), last_id=before)
    assert alice.expect("") == f"{missed} {bob.name}"
    if missed == "REQUEST":
        alice.chat.send("ACCEPT")
        alice.chat.expect(f"OK ACCEPT {bob.name}")
        assert alice.expect("") == f"STARTED {bob.name}"
        bob.expect(f"STARTED {alice.name}")
    bob.chat.send("MSG after the move")
    assert alice.expect("") == f"MSG {bob.name} after the move"


@pytest.mark.parametrize("when", ["before-its-lease-ran-out", "while-detached"])
def test_a_chat_that_ended_while_its_node_was_dead_ends_after_the_resume(make_cluster, when):
    """bob says a last word and leaves the chat while alice's node is dead:
    resumed on another node, she reads the word, then the chat's end."""
    require_cluster_mode()
    c = make_cluster(2)
    alice, bob = chatting(c, 0, 1)
    dead = f"selchat:n:{c.node_id(0)}"
    c.kill(0)
    if when == "while-detached":
        bob.expect(f"AWAY {alice.name}", timeout=LEASE + DEADLINE)
    else:  # Redis has seen node 0's connections go, and its lease still runs
        wait_for(lambda: c.redis.call("PUBSUB", "NUMSUB", dead)[1] == 0, "node 0's subscription gone")
    bob.chat.send("MSG last word", "QUIT")
    bob.chat.expect("OK QUIT")
    bob.expect(f"ENDED {alice.name} quit")
    resume_on(alice, c.node(1), messages=0)
    assert alice.expect("", timeout=LEASE + DEADLINE) == f"MSG {bob.name} last word"
    assert alice.expect("").startswith(f"ENDED {bob.name} quit")
    alice.ack()
    assert bob.expect("DELIVERED ") == "DELIVERED 1 1"
    # Over for both: alice may ask again.
    alice.chat.send(f"CHAT {bob.name}")
    alice.chat.expect(f"OK CHAT {bob.name}")
    bob.expect(f"REQUEST {alice.name}")


@pytest.mark.parametrize("drop", ["node-killed", "connection-cut"])
def test_what_happened_while_she_was_gone_comes_after_the_resume_in_order(make_cluster, drop):
    """bob says a last word and ends his chat with alice, then carol asks
    alice for one, while alice is gone: her node is dead (its lease still
    runs: the ENDED is kept in Redis, the REQUEST said again from the
    record), or her connection dropped and her node holds her events (it
    hands them over). Resumed through node 1, she gets each event once, in
    the order it happened."""
    require_cluster_mode()
    c = make_cluster(3, *PATIENT)
    alice, bob = chatting(c, 0, 1)
    carol = V2User(c.node(2).connect)
    if drop == "node-killed":
        dead = f"selchat:n:{c.node_id(0)}"
        c.kill(0)
        wait_for(lambda: c.redis.call("PUBSUB", "NUMSUB", dead)[1] == 0, "node 0's subscription gone")
    else:
        alice.cut()
        bob.expect(f"AWAY {alice.name}")
    bob.chat.send("MSG last word", "QUIT")
    bob.chat.expect("OK QUIT")
    carol.chat.send(f"CHAT {alice.name}")
    carol.chat.expect(f"OK CHAT {alice.name}")  # not away to the cluster yet: the request is made
    resume_on(alice, c.node(1), messages=0)
    assert alice.expect("") == f"MSG {bob.name} last word"
    assert alice.expect("").startswith(f"ENDED {bob.name} quit")
    assert alice.expect("") == f"REQUEST {carol.name}"
    alice.chat.send("ACCEPT")
    alice.chat.expect(f"OK ACCEPT {carol.name}")
    assert alice.expect("") == f"STARTED {carol.name}"  # nothing else came in between
    carol.expect(f"STARTED {alice.name}")


def test_a_drop_seen_by_its_node_then_a_resume_on_another_says_away_once(make_cluster):
    require_cluster_mode()
    c = make_cluster(2)
    alice, bob = chatting(c, 0, 1)
    alice.cut()  # node 0 sees it: AWAY; the resume on node 1 would say it again
    bob.expect(f"AWAY {alice.name}")
    resume_on(alice, c.node(1))
    assert bob.expect("") == f"BACK {alice.name}"
    alice.cut()  # and a second drop in the same chat is told again
    assert bob.expect("") == f"AWAY {alice.name}"


def test_a_detached_session_s_held_messages_are_reported_when_its_window_ends(make_cluster):
    require_cluster_mode()
    c = make_cluster(2, *CLUSTER_ARGS, "--resume-window", "2")
    alice, bob = chatting(c, 0, 1)
    c.kill(0)
    bob.expect(f"AWAY {alice.name}", timeout=LEASE + DEADLINE)
    bob.chat.send("MSG never read")
    # Nobody resumes alice: after the window, bob's message is not delivered, and the chat ends.
    frames = {bob.expect("", timeout=DEADLINE).split(" ", 1)[0] for _ in range(2)}
    assert frames == {"UNDELIVERED", "ENDED"}
    who = bob.chat
    who.send("WHO")
    listed = []
    while not (line := who.line()).startswith("OK WHO"):
        listed.append(line.split()[1])
    assert alice.name not in listed


@pytest.mark.parametrize("drop", ["node-killed", "connection-cut"])
def test_a_version_1_sender_hears_a_nack_for_each_message_held_for_a_partner_that_never_came_back(make_cluster, drop):
    """Its partner's node died (the cluster reports the held messages) or
    saw the drop itself (that node does)."""
    require_cluster_mode()
    c = make_cluster(2, *CLUSTER_ARGS, "--resume-window", "2")
    alice, old = V2User(c.node(0).connect), RawUser(c.node(1))
    start_chat(alice, old)
    old.chat.send("MSG read")
    assert alice.expect(f"MSG {old.name} ") == f"MSG {old.name} read"
    alice.ack()
    alice.check.send("PING sync")  # a round trip: node 0 has handled the ACK (and told Redis)
    alice.check.expect("PONG sync")
    if drop == "node-killed":
        c.kill(0)  # alice is detached once node 0's lease runs out
    else:
        alice.cut()
    old.chat.send("MSG held 2", "MSG held 3")
    old.login.expect(f"ENDED {alice.name} dropped", timeout=LEASE + 2 + DEADLINE)
    why = f"{alice.name} lost connection and did not come back"
    assert [old.chat.line(), old.chat.line()] == [f"NACK 2 away {why}", f"NACK 3 away {why}"]


def _relayed_but_never_written(c, alice: V2User, bob, node: int) -> None:
    """alice's message 1 reaches bob; then bob's node is stopped, and
    alice's 2-4 are relayed (Redis has them and published them to that
    node) but never written to bob; then the node is killed."""
    alice.chat.send("MSG written")
    assert bob.expect(f"MSG {alice.name} ") == f"MSG {alice.name} written"
    if isinstance(bob, V2User):
        bob.ack()
    assert alice.expect("DELIVERED ") == "DELIVERED 1 1"
    c.node(node).proc.send_signal(signal.SIGSTOP)
    alice.chat.send("MSG never 2", "MSG never 3", "MSG never 4")
    record = f"selchat:u:{alice.name.lower()}"
    wait_for(lambda: int(c.redis.call("HGET", record, "acc") or 0) == 4, "alice's messages relayed")
    c.kill(node)


def fates_and_end(alice: V2User, bob_name: str, last: int) -> set[str]:
    """What alice reads when her chat with bob ends with her messages 2 to
    ``last`` not delivered: the chat's end, and UNDELIVERED for each of
    those messages exactly once (in any order: a fate goes through Redis
    first). The fates' texts, one per reason."""
    ended, seqs, texts = [], [], set()
    while not ended or len(seqs) < last - 1:
        frame = alice.expect("", timeout=LEASE + DEADLINE)
        if frame.startswith("ENDED "):
            assert not ended and frame.startswith(f"ENDED {bob_name} dropped"), frame
            ended.append(frame)
            continue
        _, first, upto, code, text = frame.split(" ", 4)
        assert frame.startswith("UNDELIVERED ") and code == "gone", frame
        seqs += range(int(first), int(upto) + 1)
        texts.add(text)
    assert seqs == list(range(2, last + 1)), seqs
    return texts


def test_a_version_1_partner_s_node_dying_gives_the_messages_it_never_wrote_their_fate(make_cluster):
    """A version 1 client acknowledges nothing: its node says DELIVERED as it
    writes each message. Messages its node had not written when it died get
    no fate from it; the sender's node reports them once the cluster sees
    that node dead, near the chat's end."""
    require_cluster_mode()
    c = make_cluster(2)
    alice, bob = V2User(c.node(0).connect), RawUser(c.node(1))
    start_chat(alice, bob)
    _relayed_but_never_written(c, alice, bob, 1)
    assert fates_and_end(alice, bob.name, 4) == {f"{bob.name}'s server went down before it was delivered"}
    alice.chat.send("MSG after")  # the chat is over: refused at once, not held
    assert alice.expect("").startswith("UNDELIVERED 5 5 not-in-chat")


@pytest.mark.parametrize("version", [1, 2])
def test_a_login_after_its_node_died_gives_the_messages_held_for_the_old_session_their_fate(make_cluster, version):
    """bob's node dies with alice's messages 2-4 on their way to him, and bob
    logs in again (a new session, not a resume) on another node before the
    dead node's lease has run out: the new login ends the old session, and
    since no node is there to report what it held, the login does."""
    require_cluster_mode()
    c = make_cluster(2)
    alice = V2User(c.node(0).connect)
    bob = V2User(c.node(1).connect) if version == 2 else RawUser(c.node(1))
    start_chat(alice, bob)
    _relayed_but_never_written(c, alice, bob, 1)
    dead = f"selchat:n:{c.node_id(1)}"
    wait_for(lambda: c.redis.call("PUBSUB", "NUMSUB", dead)[1] == 0, "node 1's subscription gone")
    assert c.redis.call("EXISTS", f"selchat:node:{c.node_id(1)}") == 1  # its lease still runs
    if version == 2:
        V2User(c.node(0).connect, name=bob.name, register=False)
        why = f"{bob.name} logged in again before receiving it"
    else:
        RawUser(c.node(0), name=bob.name, register=False)
        why = f"{bob.name}'s server went down before it was delivered"
    assert fates_and_end(alice, bob.name, 4) == {why}


def client_asks(c, clients, prefix: str) -> tuple[Peer, V2User]:
    """alice, a ``selchat connect`` given nodes 0 and 1 (on node 0), has asked
    bob (raw, on node 1) for a chat."""
    n0, n1 = c.node(0).port, c.node(1).port
    alice = Peer(clients, n0, unique(prefix), "--host", f"127.0.0.1:{n0},127.0.0.1:{n1}")
    alice.expect("ready")
    bob = V2User(c.node(1).connect)
    alice.write(f"/chat {bob.name}")
    bob.expect(f"REQUEST {alice.name}")
    alice.expect("request-sent", user=bob.name)  # OK CHAT read: her client keeps the request across a drop
    return alice, bob


def client_chatting(c, clients, prefix: str) -> tuple[Peer, V2User]:
    """As ``client_asks``, and bob said yes."""
    alice, bob = client_asks(c, clients, prefix)
    bob.chat.send("ACCEPT")
    bob.chat.expect("OK ACCEPT")
    alice.expect("started", user=bob.name)
    return alice, bob


def test_a_client_shows_what_happened_while_its_node_was_dead_after_it_resumes(make_cluster, clients):
    """alice's selchat client (nodes 0, then 1) chats with bob (node 1). Node 0
    is killed while her client is stopped; bob says a last word and ends the
    chat. Resumed on node 1, her client shows the word, then the chat's end,
    and she is idle."""
    require_cluster_mode()
    c = make_cluster(2)
    alice, bob = client_chatting(c, clients, "ka")
    alice.process.proc.send_signal(signal.SIGSTOP)  # she cannot come back before bob has left
    try:
        c.kill(0)
        bob.chat.send("MSG last word", "QUIT")
        bob.chat.expect("OK QUIT")
    finally:
        alice.process.proc.send_signal(signal.SIGCONT)
    alice.expect("resumed", timeout=LEASE + 2 * DEADLINE)
    alice.expect("message", user=bob.name, text="last word")
    ended = alice.read_until(lambda e: e["type"] in ("ended", "started", "message"), what="the chat's end")
    assert (ended["type"], ended.get("user"), ended.get("reason")) == ("ended", bob.name, "quit"), ended
    bob.chat.send("WHO")  # and the cluster has her back, idle
    listed = []
    while not (line := bob.chat.line()).startswith("OK WHO"):
        listed.append(line)
    assert f"USER {alice.name} idle" in listed, listed


@pytest.mark.parametrize("when", ["sent-before-its-node-died", "while-its-node-was-dead"])
def test_a_declined_request_the_client_never_read_is_said_after_the_resume(make_cluster, when):
    """alice asks bob; bob declines while her node is stopped (it has the
    DECLINED and never writes it) or dead (nobody has it). Resumed through
    node 1, she reads the DECLINED, and is free to ask again."""
    require_cluster_mode()
    c = make_cluster(2, *PATIENT)
    alice, bob = V2User(c.node(0).connect), V2User(c.node(1).connect)
    alice.chat.send(f"CHAT {bob.name}")
    alice.chat.expect(f"OK CHAT {bob.name}")
    bob.expect(f"REQUEST {alice.name}")
    if when == "sent-before-its-node-died":
        c.node(0).proc.send_signal(signal.SIGSTOP)
    else:
        dead = f"selchat:n:{c.node_id(0)}"
        c.kill(0)
        wait_for(lambda: c.redis.call("PUBSUB", "NUMSUB", dead)[1] == 0, "node 0's subscription gone")
    bob.chat.send("DECLINE")
    bob.chat.expect(f"OK DECLINE {alice.name}")
    if when == "sent-before-its-node-died":
        c.kill(0)
    resume_on(alice, c.node(1), messages=0)
    assert alice.expect("", timeout=LEASE + DEADLINE) == f"DECLINED {bob.name}"
    alice.chat.send(f"CHAT {bob.name}")
    alice.chat.expect(f"OK CHAT {bob.name}")
    assert bob.expect("") == f"REQUEST {alice.name}"


@pytest.mark.parametrize("read", [True, False])
def test_a_client_shows_a_decline_once_whether_or_not_it_read_it_before_its_node_died(make_cluster, clients, read):
    """The node alice's client resumes on says again how her request ended
    (it cannot know whether her client read it from the node that died):
    her client shows it once either way, and she is idle."""
    require_cluster_mode()
    c = make_cluster(2, *PATIENT)
    alice, bob = client_asks(c, clients, "da")
    if read:
        bob.chat.send("DECLINE")
        bob.chat.expect(f"OK DECLINE {alice.name}")
        alice.expect("declined", user=bob.name)
        c.kill(0)
    else:
        alice.process.proc.send_signal(signal.SIGSTOP)  # she cannot read it from node 0
        try:
            c.kill(0)
            bob.chat.send("DECLINE")
            bob.chat.expect(f"OK DECLINE {alice.name}")
        finally:
            alice.process.proc.send_signal(signal.SIGCONT)
    alice.expect("resumed", timeout=LEASE + 2 * DEADLINE)
    bob.chat.send(f"CHAT {alice.name}")  # she is idle: bob may ask her
    bob.chat.expect(f"OK CHAT {alice.name}")
    alice.expect("request-in", user=bob.name)
    assert len(alice.of("declined")) == 1, alice.events


def test_a_node_shut_down_hands_its_version_2_sessions_to_the_other_nodes(make_cluster):
    """SIGTERM on one node of a cluster that goes on: its version 2 user
    hears a NOTICE and loses the connection without a BYE, her session
    detached at once (her partner hears AWAY), and resumes on another node
    with her chat, without waiting for the node's lease: it is gone when the
    node exits. Its version 1 user ends as on a lone server."""
    require_cluster_mode()
    c = make_cluster(2)
    alice, bob = chatting(c, 0, 1)
    old, carol = RawUser(c.node(0)), V2User(c.node(1).connect)
    start_chat(old, carol)
    alice.chat.send("MSG before")
    assert bob.expect(f"MSG {alice.name} ") == f"MSG {alice.name} before"
    assert c.node(0).stop(signal.SIGTERM) == 0
    assert c.redis.call("EXISTS", f"selchat:node:{c.node_id(0)}") == 0  # no node waits for its lease
    assert alice.expect("NOTICE ") == f"NOTICE {MOVING}"
    assert alice.login.expect_closed() == []  # no BYE: her client resumes
    assert old.login.expect_closed()[-1].startswith("BYE shutdown")
    assert carol.expect(f"ENDED {old.name} shutdown")
    bob.expect(f"AWAY {alice.name}")
    assert resume_on(alice, c.node(1), messages=0) == 1
    assert alice.expect("") == f"STARTED {bob.name}"  # where she stands, said again
    bob.expect(f"BACK {alice.name}")
    bob.chat.send("MSG after")
    assert alice.expect(f"MSG {bob.name} ") == f"MSG {bob.name} after"
    alice.ack()
    assert bob.expect("DELIVERED ") == "DELIVERED 1 1"
    bob.ack()
    assert alice.expect("DELIVERED ") == "DELIVERED 1 1"  # "before": its receipt, on her new node


def test_both_users_of_a_chat_on_a_node_that_shuts_down_go_on_chatting_on_another(make_cluster):
    require_cluster_mode()
    c = make_cluster(2)
    alice, bob = chatting(c, 0, 0)
    assert c.node(0).stop(signal.SIGTERM) == 0
    for user in (alice, bob):
        assert user.expect("NOTICE ") == f"NOTICE {MOVING}"
        assert resume_on(user, c.node(1), messages=0) == 0
        assert user.expect("") == f"STARTED {(bob if user is alice else alice).name}"
    alice.chat.send("MSG on node 1")
    assert bob.expect(f"MSG {alice.name} ") == f"MSG {alice.name} on node 1"


def test_a_session_already_away_when_its_node_shuts_down_resumes_elsewhere(make_cluster):
    """alice's connection was lost (node 0 holds her session for its window,
    and what bob sends her); node 0 shuts down meanwhile: she resumes on
    node 1 and gets bob's message once."""
    require_cluster_mode()
    c = make_cluster(2)
    alice, bob = chatting(c, 0, 1)
    alice.cut()
    bob.expect(f"AWAY {alice.name}")
    bob.chat.send("MSG while you were away")
    received_up_to(bob, 1)
    assert c.node(0).stop(signal.SIGTERM) == 0
    resume_on(alice, c.node(1), messages=0)
    assert alice.expect("") == f"STARTED {bob.name}"
    assert alice.expect("") == f"MSG {bob.name} while you were away"
    bob.expect(f"BACK {alice.name}")
    alice.ack()
    assert bob.expect("DELIVERED ") == "DELIVERED 1 1"


def test_a_chat_with_a_version_1_user_of_the_node_that_shut_down_ends_after_the_resume(make_cluster):
    """alice (version 2) and old (version 1) chat on node 0, which shuts
    down: old's session ends there, and alice, moved, reads the chat's end
    when she resumes on node 1, then is free."""
    require_cluster_mode()
    c = make_cluster(2)
    alice, old = V2User(c.node(0).connect), RawUser(c.node(0))
    start_chat(alice, old)
    alice.ack()
    assert c.node(0).stop(signal.SIGTERM) == 0
    assert alice.expect("NOTICE ") == f"NOTICE {MOVING}"
    assert old.login.expect_closed()[-1].startswith("BYE shutdown")
    resume_on(alice, c.node(1), messages=0)
    assert alice.expect("").startswith(f"ENDED {old.name} shutdown")
    bob = V2User(c.node(1).connect)
    alice.chat.send(f"CHAT {bob.name}")
    alice.chat.expect(f"OK CHAT {bob.name}")


def test_a_client_whose_node_shuts_down_goes_on_chatting_on_the_next(make_cluster, clients):
    """What a user of ``selchat connect`` sees: the notice, a reconnection,
    the chat going on; nothing said twice."""
    require_cluster_mode()
    c = make_cluster(2)
    alice, bob = client_chatting(c, clients, "sa")
    assert c.node(0).stop(signal.SIGTERM) == 0
    alice.expect("notice", text=MOVING)
    alice.expect("resumed", timeout=2 * DEADLINE)
    bob.chat.send("MSG still here")
    alice.expect("message", user=bob.name, text="still here")
    kinds = [e["type"] for e in alice.events]
    assert kinds.count("started") == 1 and "ended" not in kinds and "disconnected" not in kinds, kinds


class Exchange:
    """Two ``selchat connect --json`` clients sending numbered messages to each
    other from threads, and what each showed."""

    def __init__(self, a: Peer, b: Peer, count: int):
        self.a, self.b, self.count = a, b, count

    def send(self, peer: Peer, tag: str, pace: float) -> None:
        for i in range(1, self.count + 1):
            peer.write(f"{tag}{i}")
            time.sleep(pace)  # typing pace: the node dies mid-stream, not a synchronisation


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_a_chat_goes_on_when_either_user_s_node_is_killed_mid_stream(make_cluster, clients, victim):
    """alice (nodes 0 then 2) and bob (node 1) send each other numbered
    messages; node 0 is killed in the middle. Afterwards every message of
    each was shown to the other exactly once, in order, and every one has
    exactly one fate for its sender: delivered."""
    require_cluster_mode()
    c = make_cluster(3)
    n = [c.node(i).port for i in range(3)]
    hosts_a = f"127.0.0.1:{n[0]},127.0.0.1:{n[2]}"
    alice = Peer(clients, n[0], unique("ka"), "--host", hosts_a)
    bob = Peer(clients, n[1], unique("kb"), "--host", f"127.0.0.1:{n[1]}")
    alice.expect("ready")
    bob.expect("ready")
    if victim == "sender":
        first, second = alice, bob  # alice writes, then her node dies
    else:
        first, second = bob, alice  # bob writes to alice, whose node dies
    first.write(f"/chat {second.name}")
    second.expect("request-in", user=first.name)
    second.write("yes")
    first.expect("started", user=second.name)
    second.expect("started", user=first.name)
    count = 60
    x = Exchange(alice, bob, count)
    threads = [threading.Thread(target=x.send, args=(alice, "a", 0.05), daemon=True),
               threading.Thread(target=x.send, args=(bob, "b", 0.05), daemon=True)]
    for t in threads:
        t.start()
    # Mid-stream: once bob has shown some of alice's messages.
    bob.read_until(lambda e: e["type"] == "message" and e["text"] == "a15", timeout=DEADLINE, what="a15")
    killed = time.monotonic()
    c.kill(0)
    back = alice.expect("resumed", timeout=LEASE + 2 * DEADLINE)
    resumed_after = time.monotonic() - killed
    for t in threads:
        t.join(timeout=DEADLINE)
    for peer, other, tag in ((alice, bob, "a"), (bob, alice, "b")):
        last = f"{tag}{count}"
        if not any(e["type"] == "delivered" and e["text"] == last for e in peer.events):
            peer.expect("delivered", timeout=3 * DEADLINE, text=last)
        if not any(e["type"] == "message" and e["text"] == last for e in other.events):
            other.expect("message", timeout=DEADLINE, text=last)
    for peer in (alice, bob):
        peer.drain()
    print(f"node 0 killed ({victim}'s side): alice resumed on node 2 after {resumed_after:.1f} s: {back['text']}")
    for sender, receiver, tag in ((alice, bob, "a"), (bob, alice, "b")):
        mine = [f"{tag}{i}" for i in range(1, count + 1)]
        shown = [e["text"] for e in receiver.of("message") if e["user"] == sender.name]
        assert shown == mine, f"{receiver.name} showed {shown}"
        delivered = [e["text"] for e in sender.of("delivered")]
        assert sorted(delivered, key=lambda t: int(t[1:])) == mine, f"{sender.name}: delivered {delivered}"
        assert not sender.of("not-delivered") and not sender.of("unconfirmed")
        assert not receiver.of("chat-dropped") and not receiver.of("ended")
    assert any(e["type"] == "away" for e in bob.events) and any(e["type"] == "back" for e in bob.events)


@pytest.mark.slow
def test_across_moves_a_node_death_and_faults_every_message_gets_exactly_one_fate(make_cluster, clients):
    """alice (nodes 0 and 1) and bob (nodes 1 and 2), each through fault
    proxies that cut, stall and half-close their connections at random,
    send each other 200 numbered lines. Meanwhile each is made to move to
    their other node while the first is alive (its proxy refuses new
    connections), and then node 1 dies. Every line is shown once, in order,
    and has exactly one fate for its sender."""
    require_cluster_mode()
    c = make_cluster(3)
    proxies = {}
    try:
        for who, node in (("a", 0), ("a", 1), ("b", 1), ("b", 2)):
            proxies[who, node] = FaultProxy(c.node(node).host, c.node(node).port).start()

        def hosts(who: str, first: int, second: int) -> str:
            return f"127.0.0.1:{proxies[who, first].port},127.0.0.1:{proxies[who, second].port}"

        alice = Peer(clients, proxies["a", 0].port, unique("ca"), "--host", hosts("a", 0, 1))
        bob = Peer(clients, proxies["b", 1].port, unique("cb"), "--host", hosts("b", 1, 2))
        alice.expect("ready")
        bob.expect("ready")
        e2e_start_chat(alice, bob)
        count = 200
        texts = {peer.name: [f"{peer.name} says {i}" for i in range(count)] for peer in (alice, bob)}
        rng = random.Random(SEED)
        for proxy in proxies.values():
            proxy.chaos(random.Random(rng.random()), every=0.5)
        moves = []

        def after_burst(i: int, n: int) -> None:
            if i == n // 4:    # alice to node 1, node 0 alive
                proxies["a", 0].refuse_new()
                proxies["a", 0].cut_all()
                moves.append("alice 0->1")
            elif i == n // 2:  # bob to node 2, node 1 alive
                proxies["a", 0].refuse_new(False)
                proxies["b", 1].refuse_new()
                proxies["b", 1].cut_all()
                moves.append("bob 1->2")
            elif i == 3 * n // 4:  # alice's node dies: back to node 0
                proxies["b", 1].refuse_new(False)
                c.kill(1)
                moves.append("node 1 killed")

        write_in_bursts(alice, bob, texts, rng, 8.0, after_burst)
        for proxy in proxies.values():
            proxy.stop_chaos()
        story = f"moves: {moves}; faults: {[f for p in proxies.values() for f in p.faults]}"
        each_message_had_exactly_one_fate(alice, bob, texts, story)
        servers = {peer.name: {e["server"] for e in peer.of("connected")} for peer in (alice, bob)}
        assert servers[alice.name] == set(hosts("a", 0, 1).split(",")), story  # she did move, and back
        assert servers[bob.name] == set(hosts("b", 1, 2).split(",")), story
    finally:
        for proxy in proxies.values():
            proxy.close()
