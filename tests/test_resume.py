"""Protocol version 2 over real sockets: numbered events, ACKs, receipts,
detach and RESUME, and one fate for every message (docs/protocol.md)."""

from __future__ import annotations

import threading

import pytest

from selchat.protocol.events import RECEIVED_DELAY, RECEIVED_SPACING

from tests.support import LineSocket, RawUser, V2User, start_chat


@pytest.fixture(scope="module")
def v2server(tmp_path_factory):
    from tests.support import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("v2"), "--conn-rate", "0", "--max-per-address", "0",
                        "--throttle-after", "0", "--resume-window", "30")
    yield srv
    srv.stop()


#: Long enough for the RECEIVED the server owes to come (it batches them,
#: and spaces them).
QUIET = RECEIVED_SPACING + RECEIVED_DELAY


def quiet_line(sock: LineSocket, wait: float) -> str | None:
    """The next frame, or None if none comes within ``wait`` seconds (to
    see that something has stopped)."""
    try:
        return sock.line(timeout=wait)
    except AssertionError:
        return None


def pair(server):
    a, b = V2User(server.connect), V2User(server.connect)
    start_chat(a, b)
    return a, b


def test_version_2_is_asked_for_and_welcome_carries_a_resume_token(v2server):
    user = V2User(v2server.connect)
    sid, _, secret = user.token.partition(".")
    assert sid.isdigit() and len(secret) >= 22  # 128 bits, url-safe base64


def test_a_session_that_does_not_ask_stays_version_1(v2server):
    old = RawUser(v2server)  # no VERSION: WELCOME has two tokens, no ACKs needed
    other = RawUser(v2server)
    start_chat(old, other)
    old.chat.send("MSG plain")
    assert other.login.line() == f"MSG {old.name} plain"
    old.chat.send("MSG")
    assert old.chat.line() == "NACK 2 empty empty message"  # v1 refusals stay on the chat socket


def test_unsupported_version_is_refused(v2server):
    sock = v2server.connect()
    sock.send("VERSION 3")
    assert sock.expect("ERR VERSION unsupported")


def test_received_then_delivered_once_the_partner_acks(v2server):
    alice, bob = pair(v2server)
    alice.chat.send("MSG one", "MSG two")
    seqs = []
    while not seqs or seqs[-1] < 2:
        seqs.append(int(alice.chat.expect("RECEIVED ").split()[1]))
    assert bob.expect(f"MSG {alice.name} one") and bob.expect(f"MSG {alice.name} two")
    bob.ack()
    got = alice.expect("DELIVERED ").split()
    assert got[1:] == ["1", "2"]


def test_an_ack_ahead_of_a_message_on_the_chat_socket_is_taken_with_it(v2server):
    alice, bob = pair(v2server)
    alice.chat.send("MSG hi")
    bob.expect(f"MSG {alice.name} hi")
    # bob's reply carries his ACK in the same write (as the selchat client
    # sends a ripe one): alice hears her message delivered, then his reply.
    bob.chat.send(f"ACK {bob.last_id}", "MSG hello")
    assert alice.expect("DELIVERED ") == "DELIVERED 1 1"
    assert alice.expect(f"MSG {bob.name} hello")
    # The fate said the server has alice's message: no RECEIVED follows for it.
    assert quiet_line(alice.chat, RECEIVED_DELAY + 0.5) is None
    # bob's message, with no fate yet, gets its RECEIVED.
    assert bob.chat.expect("RECEIVED ") == "RECEIVED 1"


def test_refused_message_gets_its_fate_on_the_login_socket(v2server):
    alice, bob = pair(v2server)
    alice.chat.send("MSG fine", "MSG")
    assert alice.expect("UNDELIVERED ") == "UNDELIVERED 2 2 empty empty message"
    bob.expect(f"MSG {alice.name} fine")
    bob.ack()
    assert alice.expect("DELIVERED ") == "DELIVERED 1 1"


def test_ack_beyond_the_last_event_is_refused(v2server):
    alice = V2User(v2server.connect)
    alice.check.send(f"ACK {alice.last_id + 5}")
    assert alice.check.expect("ERR ACK bad-ack")
    alice.ack()  # a good one still works: nothing closed
    alice.chat.send("WHO")
    assert alice.chat.expect("USER ")


def test_drop_away_held_resume_back_and_replay(v2server):
    alice, bob = pair(v2server)
    alice.chat.send("MSG before")
    bob.expect(f"MSG {alice.name} before")
    bob.ack()
    alice.expect("DELIVERED 1 1")
    alice.ack()
    bob.cut()
    alice.expect(f"AWAY {bob.name}")
    alice.chat.send("MSG while away 1", "MSG while away 2")
    accepted = bob.resume()
    assert accepted == 0  # bob sent nothing
    # Replayed: exactly the held messages, once, in order.
    assert bob.event() == f"MSG {alice.name} while away 1"
    assert bob.event() == f"MSG {alice.name} while away 2"
    alice.expect(f"BACK {bob.name}")
    bob.ack()
    assert alice.expect("DELIVERED ") == "DELIVERED 2 3"
    # The chat goes on, both ways.
    bob.chat.send("MSG hello again")
    alice.expect(f"MSG {bob.name} hello again")


def test_received_is_spaced_while_messages_keep_coming_without_fates(v2server):
    alice, bob = pair(v2server)
    alice.chat.send("MSG one")
    assert alice.chat.expect("RECEIVED ") == "RECEIVED 1"  # bob has not acknowledged: no fate
    alice.chat.send("MSG two")
    # Not RECEIVED_DELAY after this read, but (0.75 to 1.25 times)
    # RECEIVED_SPACING after the last one.
    assert quiet_line(alice.chat, RECEIVED_SPACING * 0.75 - 0.3) is None
    assert alice.chat.expect("RECEIVED ") == "RECEIVED 2"
    assert bob.expect(f"MSG {alice.name} one") and bob.expect(f"MSG {alice.name} two")


def test_no_received_while_fates_keep_coming_and_one_once_they_stop(v2server):
    """A stream whose partner acknowledges gets its fates and no RECEIVED
    (the next fate says it too); once the fates stop, RECEIVED comes."""
    alice, bob = pair(v2server)
    alice.chat.send("MSG 1")
    assert bob.expect(f"MSG {alice.name} 1")
    # Each round: one more message in flight, then bob acknowledges the one
    # before it, so that a message without a fate is always there.
    rounds = int((RECEIVED_DELAY + RECEIVED_SPACING * 1.25) / 0.2) + 2
    for n in range(2, rounds + 2):
        alice.chat.send(f"MSG {n}")
        bob.ack()  # up to message n - 1: n is not read yet
        assert alice.expect("DELIVERED ") == f"DELIVERED {n - 1} {n - 1}"
        assert bob.expect(f"MSG {alice.name} {n}")
        seen = quiet_line(alice.chat, 0.2)
        if n == 2 and seen == "RECEIVED 1":
            continue  # a machine stalled for RECEIVED_DELAY before the first fate: it was due then
        assert seen is None  # no RECEIVED, over about 3 s in all
    # bob stops acknowledging: the last message has no fate, and RECEIVED says
    # the server has it, at the latest two looks later (the one that saw the
    # last fate waited once more).
    assert alice.chat.expect("RECEIVED ", timeout=2 * RECEIVED_SPACING * 1.25 + 1) == f"RECEIVED {rounds + 1}"


def test_resume_after_the_sender_lost_a_message_in_flight(v2server):
    """The client resends what the server never RECEIVED; the server never
    relays a seq twice."""
    alice, bob = pair(v2server)
    alice.chat.send("MSG one")
    alice.chat.expect("RECEIVED 1")
    alice.cut()
    assert bob.expect(f"MSG {alice.name} one")
    bob.expect(f"AWAY {alice.name}")
    accepted = alice.resume()
    assert accepted == 1
    alice.chat.send("MSG two")  # seq 2: the next after accepted
    assert alice.chat.expect("RECEIVED ") == "RECEIVED 2"
    bob.expect(f"BACK {alice.name}")
    assert bob.expect(f"MSG {alice.name} two")
    bob.ack()
    assert alice.expect("DELIVERED ") == "DELIVERED 1 2"


def test_replay_starts_after_the_id_the_client_names(v2server):
    alice, bob = pair(v2server)
    alice.chat.send("MSG a", "MSG b", "MSG c")
    for text in "abc":
        bob.expect(f"MSG {alice.name} {text}")
    # bob saw all three but its ACK never left: it resumes from what it saw.
    bob.cut()
    alice.expect(f"AWAY {bob.name}")
    bob.resume()
    alice.expect(f"BACK {bob.name}")
    assert alice.expect("DELIVERED ") == "DELIVERED 1 3"  # the RESUME's last id acknowledged them
    alice.chat.send("MSG d")
    assert bob.event() == f"MSG {alice.name} d"  # nothing replayed twice


def test_resume_takes_over_sockets_the_server_still_has(v2server):
    alice, bob = pair(v2server)
    old = (alice.login, alice.chat, alice.check)
    alice.resume()   # the old sockets are still open
    for sock in old:
        assert sock.expect_closed() == []
    alice.chat.send("MSG from the new sockets")
    bob.expect(f"MSG {alice.name} from the new sockets")


def test_bad_token_is_unknown_and_the_socket_may_log_in(v2server):
    alice = V2User(v2server.connect)
    sock = v2server.connect()
    sid = alice.token.partition(".")[0]
    sock.send(f"RESUME {sid}.{'A' * 22} 0")
    assert sock.expect("ERR RESUME unknown-session")
    sock.send("RESUME 99999999.x 0")
    assert sock.expect("ERR RESUME unknown-session")
    alice.chat.send("WHO")  # the real session is untouched
    assert alice.chat.expect("USER ")


def test_window_end_reports_held_messages_and_a_late_resume_says_how_far(make_server):
    srv = make_server("--conn-rate", "0", "--max-per-address", "0", "--resume-window", "1")
    alice, bob = pair(srv)
    alice.chat.send("MSG seen")
    bob.expect(f"MSG {alice.name} seen")
    bob.ack()
    alice.expect("DELIVERED 1 1")
    bob.chat.send("MSG bob one")
    bob.chat.expect("RECEIVED 1")
    alice.expect(f"MSG {bob.name} bob one")
    bob.cut()
    alice.expect(f"AWAY {bob.name}")
    alice.chat.send("MSG held 1", "MSG held 2")
    alice.chat.expect("RECEIVED ")
    # The window ends: held messages are reported, the chat ends.
    lines = [alice.event(timeout=10), alice.event(timeout=10)]
    assert "UNDELIVERED 2 3 away " in " ".join(lines), lines
    assert any(line.startswith(f"ENDED {bob.name} dropped") for line in lines), lines
    alice.ack()
    alice.check.send("PING sync")  # a round trip: the ACK has been handled
    alice.check.expect("PONG sync")
    # bob comes back too late: told how far the server got, and the fate of
    # its own message, which alice's client acknowledged.
    sock = srv.connect()
    sock.send(f"RESUME {bob.token} {bob.last_id}")
    assert sock.expect("UNRESUMED ").split()[1:3] == ["1", "expired"]
    assert sock.expect("DELIVERED ") == "DELIVERED 1 1"
    assert sock.expect("BYE expired")


def test_a_version_1_partner_acknowledges_nothing_so_writing_is_delivering(v2server):
    alice = V2User(v2server.connect)
    old = RawUser(v2server)
    start_chat(alice, old)
    alice.chat.send("MSG to an old client", "MSG and another")
    assert old.login.line() == f"MSG {alice.name} to an old client"
    got = []
    while sum(int(last) - int(first) + 1 for first, last in got) < 2:
        got.append(alice.expect("DELIVERED ").split()[1:])
    assert got[0][0] == "1" and got[-1][1] == "2"
    old.login.close()  # a version 1 session is never detached: its drop ends the chat
    assert alice.expect(f"ENDED {old.name} dropped")


def test_a_version_1_partner_hears_no_away_or_back_and_its_messages_wait(v2server):
    alice = V2User(v2server.connect)
    old = RawUser(v2server)
    start_chat(alice, old)
    alice.cut()
    old.chat.send("MSG while you were away")  # held for alice: the chat is kept
    alice.resume()
    assert alice.expect(f"MSG {old.name} ") == f"MSG {old.name} while you were away"
    alice.chat.send("MSG back")
    # The login socket's next frame: no AWAY, no BACK (version 1 has no such frames).
    assert old.login.line() == f"MSG {alice.name} back"


def test_a_version_1_sender_hears_a_nack_for_each_message_held_for_a_partner_that_never_came_back(make_server):
    srv = make_server("--conn-rate", "0", "--max-per-address", "0", "--resume-window", "1")
    alice = V2User(srv.connect)
    old = RawUser(srv)
    start_chat(alice, old)
    old.chat.send("MSG read", "MSG read too")
    assert alice.expect(f"MSG {old.name} ") == f"MSG {old.name} read"
    alice.expect(f"MSG {old.name} read too")
    alice.ack()  # acknowledged: delivered, and version 1 hears nothing of it
    alice.check.send("PING sync")
    alice.check.expect("PONG sync")
    alice.cut()
    old.chat.send("MSG held 3", "MSG held 4")
    # The window ends: the chat ends, and the chat socket refuses messages 3 and 4, by their number.
    old.login.expect(f"ENDED {alice.name} dropped", timeout=10)
    why = f"{alice.name} lost connection and did not come back"
    assert [old.chat.line(), old.chat.line()] == [f"NACK 3 away {why}", f"NACK 4 away {why}"]
    old.chat.send("WHO")
    assert old.chat.line() == f"USER {old.name} idle"  # nothing else came on the chat socket...
    old.chat.expect("OK WHO ")
    carol = RawUser(srv)  # ...nor on the login socket (no DELIVERED, no UNDELIVERED) before this
    carol.chat.send(f"CHAT {old.name}")
    assert old.login.line() == f"REQUEST {carol.name}"


def test_a_new_login_ends_a_detached_session_and_its_held_messages_are_gone(v2server):
    alice, bob = pair(v2server)
    bob.cut()
    alice.expect(f"AWAY {bob.name}")
    alice.chat.send("MSG held")
    alice.chat.expect("RECEIVED 1")
    again = V2User(v2server.connect, name=bob.name, register=False)  # bob logs in anew elsewhere
    assert alice.expect(f"ENDED {bob.name} dropped")
    assert alice.expect("UNDELIVERED 1 1 gone ")
    assert again.name == bob.name
    sock = v2server.connect()  # the old session's token now hears it ended
    sock.send(f"RESUME {bob.token} {bob.last_id}")
    assert sock.expect("UNRESUMED ").split()[1:3] == ["0", "expired"]
    assert sock.expect("BYE expired")


def test_held_messages_past_the_bound_slow_the_sender_and_none_is_lost(make_server):
    srv = make_server("--conn-rate", "0", "--max-per-address", "0", "--resume-buffer", "20")
    alice, bob = pair(srv)
    bob.cut()
    alice.expect(f"AWAY {bob.name}")
    alice.chat.send(*[f"MSG n{i}" for i in range(1, 201)])
    # The server stops reading alice once bob's unacknowledged events are
    # at the bound: what it RECEIVED stops short of 200.
    received = 0
    while (line := quiet_line(alice.chat, QUIET)) is not None:
        received = int(line.split()[1])
    assert 0 < received < 200
    bob.resume()
    alice.expect(f"BACK {bob.name}")
    texts = []
    delivered = 0
    while len(texts) < 200:
        texts.append(bob.expect(f"MSG {alice.name} ").split(" ", 2)[2])
        if bob.last_id % 10 == 0:
            bob.ack()  # makes room: the server reads alice again
            # ...as long as alice acknowledges her receipts too (she is slowed otherwise)
            while (line := quiet_line(alice.login, 0.05)) is not None:
                alice.last_id += 1
                first, last = map(int, line.split()[1:])
                assert line.startswith("DELIVERED ") and first == delivered + 1
                delivered = last
            alice.ack()
    assert texts == [f"n{i}" for i in range(1, 201)]  # each once, in order
    bob.ack()
    while delivered < 200:
        line = alice.expect("DELIVERED ")
        first, last = map(int, line.split()[1:])
        assert first == delivered + 1
        delivered = last


def test_a_client_that_stops_answering_pings_is_detached_not_ended(make_server):
    srv = make_server("--conn-rate", "0", "--max-per-address", "0", "--ping-interval", "0.3",
                      "--ping-timeout", "0.3")
    alice, bob = pair(srv)
    keep_alive = threading.Event()

    def answer_pings():  # alice answers; bob does not
        while not keep_alive.is_set():
            line = quiet_line(alice.check, 0.1)
            if line and line.startswith("PING"):
                alice.check.send("PONG" + line[4:])

    thread = threading.Thread(target=answer_pings, daemon=True)
    thread.start()
    try:
        assert alice.expect(f"AWAY {bob.name}", timeout=5)
        bob.resume()
        assert alice.expect(f"BACK {bob.name}")
    finally:
        keep_alive.set()
        thread.join()


def test_acks_of_new_events_are_not_rate_limited_as_commands(make_server):
    # Five commands per socket, then one per 100 s: were ACKs charged as
    # commands, the fifth one here would wait 100 s.
    srv = make_server("--conn-rate", "0", "--max-per-address", "0", "--cmd-rate", "0.01")
    alice, bob = pair(srv)
    for i in range(1, 11):
        alice.chat.send(f"MSG m{i}")
        bob.expect(f"MSG {alice.name} m{i}")
        bob.ack()  # one per read, as the selchat client does
        assert alice.expect("DELIVERED ") == f"DELIVERED {i} {i}"
        alice.ack()


def test_a_client_that_never_acknowledges_is_slowed_not_grown_without_end(make_server):
    srv = make_server("--conn-rate", "0", "--max-per-address", "0", "--resume-buffer", "8")
    alice, bob = pair(srv)
    alice.ack()
    # alice never acknowledges her receipts: past 8 events waiting, the
    # server stops reading her messages (RECEIVED and receipts stop short of
    # what she sent) until she does.
    sent = got = 0
    while sent < 40:
        sent += 1
        alice.chat.send(f"MSG r{sent}")
        line = quiet_line(bob.login, 1.0)
        if line is None:
            break
        got += 1
        bob.last_id += 1
        bob.ack()
    assert sent < 40, "the server kept reading a client that acknowledged nothing"
    accepted = 0  # the last seq the server says it has
    while (line := quiet_line(alice.chat, QUIET)) is not None:
        accepted = int(line.split()[1])  # RECEIVED <seq>
    while alice.last_id < 8 + 1:  # her receipts so far, up to the bound
        accepted = max(accepted, int(alice.expect("DELIVERED ").split()[2]))
    assert accepted <= got < sent
    alice.ack()  # she acknowledges: the server reads her again
    for n in range(got + 1, sent + 1):
        bob.expect(f"MSG {alice.name} r{n}")
