"""The client session core speaking protocol version 2 (docs/protocol.md,
"Version 2"): numbered events and ACKs, one fate per message, resuming after
a drop. Frames in, effects out; no sockets, no clocks."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.client.core import (
    CHAT, CHECK, LOGIN, RESUME_CAP, Backoff, ClientSession, Close, ACK_CONFIRM, AckLater, Connect, Phase,
    Reconnect, Send,
)
from selchat.client.notices import FORMATS, JSON_FIELDS, RECEIPT_KINDS, Notice
from selchat.protocol.events import ACK_EVERY, ACK_GRACE, ACK_SPACING, ack_rest
from tests.test_client_core import closed, frames, kinds, sent, shown

HELLO = "HELLO 2 selchat/0.2.0"


def notices(effects, *wanted: str) -> list[Notice]:
    return [e for e in effects if isinstance(e, Notice) and (not wanted or e.kind in wanted)]


def v2_online(user: str = "alice", **kwargs) -> ClientSession:
    """A version 2 session taken through login, attach and READY (event 1, acknowledged)."""
    kwargs.setdefault("backoff", Backoff(rng=lambda: 0.0))
    kwargs.setdefault("version", 2)
    kwargs.setdefault("ack_delay", 0)  # every read acknowledged at once (batching: its own test)
    kwargs.setdefault("rng", lambda: 0.5)  # the rest after an ACK: its nominal length
    s = ClientSession(user, "secret", **kwargs)
    assert sent(s.start()) == ["LOGIN: VERSION 2", f"LOGIN: LOGIN {user} secret"]
    s.receive(LOGIN, frames(HELLO, "OK VERSION 2", f"WELCOME {user} ctok ktok rtok"))
    s.receive(CHAT, frames(HELLO, "OK ATTACH CHAT"))
    s.receive(CHECK, frames(HELLO, "OK ATTACH CHECK"))
    effects = s.receive(LOGIN, frames(f"READY {user}"))
    if s.ack_delay > 0:
        assert AckLater(s.ack_delay - ACK_GRACE) in effects
        assert AckLater(ACK_GRACE) in s.ack_now()  # the loop's timer: the ACK is ripe
        effects = s.ack_now()  # and then due, and the rest of ACK_SPACING follows
        assert AckLater(ack_rest(s.ack_delay, s.rng())) in effects
        assert sent(s.ack_now()) == []  # the rest is over; nothing came meanwhile
    assert sent(effects, CHECK) == ["ACK 1"]
    assert s.online and s.phase is Phase.IDLE
    return s


def v2_chatting(partner: str = "bob", **kwargs) -> ClientSession:
    s = v2_online(**kwargs)
    assert sent(s.receive(LOGIN, frames(f"STARTED {partner}")), CHECK) == ["ACK 2"]
    assert s.phase is Phase.CHATTING
    return s


def drop(s: ClientSession) -> list:
    """The login socket's EOF: with reconnect on, a version 2 session asks to come back."""
    effects = s.receive(LOGIN, b"")
    assert isinstance(effects[-1], Reconnect) and s.phase is Phase.RECONNECTING
    return effects


def resume(s: ClientSession, accepted: int, last_id: int, *events: str) -> list:
    """start() sends RESUME; the server answers RESUMED (and ``events``), the
    new sockets attach. The effects from RESUMED on."""
    effects = s.start()
    assert sent(effects) == [f"LOGIN: RESUME rtok {s._seen_id} {s._got}"]
    effects = s.receive(LOGIN, frames(HELLO, f"RESUMED {s.user} {accepted} {last_id} c2 k2", *events))
    effects += s.receive(CHAT, frames(HELLO, "OK ATTACH CHAT"))
    effects += s.receive(CHECK, frames(HELLO, "OK ATTACH CHECK"))
    return effects


# --- asking for version 2, counting, acknowledging ------------------------------------------


def test_welcome_with_a_resume_token_starts_the_count_and_ready_is_acknowledged():
    s = ClientSession("alice", "pw", reconnect=True, ack_delay=0)
    s.start()
    effects = s.receive(LOGIN, frames(HELLO, "OK VERSION 2", "WELCOME alice ctok ktok rtok"))
    assert effects == [Connect(CHAT), Send(CHAT, b"ATTACH CHAT ctok\n"),
                       Connect(CHECK), Send(CHECK, b"ATTACH CHECK ktok\n")]
    # READY read before the check socket's OK ATTACH: the ACK waits for it.
    s.receive(CHAT, frames(HELLO, "OK ATTACH CHAT"))
    effects = s.receive(LOGIN, frames("READY alice", "NOTICE hi all"))
    assert shown(effects) == ["logged in as alice", "notice: hi all"] and sent(effects) == []
    assert sent(s.receive(CHECK, frames(HELLO, "OK ATTACH CHECK")), CHECK) == ["ACK 2"]


def test_one_ack_per_read_for_all_the_events_it_brought():
    s = v2_chatting()
    effects = s.receive(LOGIN, frames("MSG bob one", "MSG bob two", "MSG bob three"))
    assert shown(effects) == ["[bob] one", "[bob] two", "[bob] three"]
    assert sent(effects) == ["CHECK: ACK 5"]
    assert s.receive(LOGIN, b"MSG bob fo") == []   # no whole event: no ACK
    assert sent(s.receive(LOGIN, b"ur\n"), CHECK) == ["ACK 6"]


def test_bye_has_no_id():
    s = v2_chatting()
    effects = s.receive(LOGIN, frames("BYE exit goodbye"))
    assert closed(effects) == 3 and sent(effects, CHECK) == []


def test_a_server_that_refuses_version_2_is_spoken_to_in_version_1():
    s = ClientSession("alice", "pw", reconnect=True, ack_delay=0)
    s.start()
    effects = s.receive(LOGIN, frames("HELLO 1 selchat/0.1.0", "ERR VERSION unknown-command unknown command",
                                      "WELCOME alice ctok ktok"))
    assert shown(effects) == [] and sent(effects) == ["CHAT: ATTACH CHAT ctok", "CHECK: ATTACH CHECK ktok"]
    s.receive(CHAT, frames("OK ATTACH CHAT"))
    s.receive(CHECK, frames("OK ATTACH CHECK"))
    effects = s.receive(LOGIN, frames("READY alice", "STARTED bob"))
    assert sent(effects) == []   # no ACK in version 1
    s.typed("hi")
    assert shown(s.receive(CHAT, frames("NACK 1 not-in-chat you are not in a chat"))) == [
        "not delivered: 'hi' (you are not in a chat)"]


# --- one fate per message --------------------------------------------------------------------------


def test_delivered_marks_each_message_once_with_its_seq():
    s = v2_chatting()
    s.typed("one\ntwo\nthree")
    s.receive(CHAT, frames("RECEIVED 3"))
    effects = s.receive(LOGIN, frames("DELIVERED 1 2"))
    assert [(n.kind, n.count, n.text) for n in notices(effects)] == [("delivered", 1, "one"), ("delivered", 2, "two")]
    assert notices(effects)[0].line() == "delivered: 'one'"
    assert notices(effects)[0].fields() == {"seq": 1, "text": "one"}
    assert notices(s.receive(LOGIN, frames("DELIVERED 1 2"))) == []   # a fate comes once
    assert [n.count for n in notices(s.receive(LOGIN, frames("DELIVERED 3 3")))] == [3]
    assert s._mine == {}


def test_refusals_come_as_undelivered_and_show_the_text():
    s = v2_chatting()
    s.typed("fine")
    s.typed("x" * 10)
    # The fate on the login socket can be read before RECEIVED on the chat socket.
    effects = s.receive(LOGIN, frames("UNDELIVERED 2 2 too-long message too long"))
    assert shown(effects) == [f"not delivered: '{'x' * 10}' (message too long)"]
    s.receive(CHAT, frames("RECEIVED 2"))
    assert shown(s.receive(LOGIN, frames("DELIVERED 1 2"))) == ["delivered: 'fine'"]


def test_a_message_refused_as_not_in_a_chat_ends_a_chat_whose_end_never_came():
    """The ENDED was lost (with a node of a cluster that died): the server's
    answer to the next message says where the user stands."""
    s = v2_chatting()
    s.typed("still there?")
    effects = s.receive(LOGIN, frames("UNDELIVERED 1 1 not-in-chat you are not in a chat"))
    assert shown(effects) == ["not delivered: 'still there?' (you are not in a chat)",
                              "chat with bob is over (the server has no chat for you)"]
    assert s.phase is Phase.IDLE and s.partner is None
    # Not in a chat already (the ENDED came first, as it does): nothing more.
    s.receive(LOGIN, frames("STARTED carol"))
    s.receive(LOGIN, frames("ENDED carol quit carol ended the chat"))
    assert shown(s.receive(LOGIN, frames("UNDELIVERED 2 2 not-in-chat you are not in a chat"))) == []


def test_where_the_session_stands_said_again_after_a_move_shows_nothing_twice():
    """A cluster node that takes the session over says STARTED, AWAY or
    REQUEST again (the client may have missed them from the old node)."""
    s = v2_chatting(reconnect=True)
    drop(s)
    effects = resume(s, 0, 2, "STARTED bob", "AWAY bob")
    assert shown(effects) == ["reconnected: still chatting with bob", "bob is away (reconnecting)"]
    drop(s)
    resume(s, 0, 4)
    assert s.partner_away  # a drop of ours does not make bob present (its node does not say AWAY again)
    drop(s)
    effects = resume(s, 0, 4, "STARTED bob", "AWAY bob", "BACK bob")
    assert shown(effects) == ["reconnected: still chatting with bob", "bob is back"] and not s.partner_away
    s.receive(LOGIN, frames("ENDED bob quit bob ended the chat", "REQUEST carol"))
    drop(s)
    effects = resume(s, 0, 9, "REQUEST carol")
    assert shown(effects) == ["reconnected: carol asks for a chat: answer yes or no"]
    # Missed while the old node died: shown once, and the state follows.
    drop(s)
    effects = resume(s, 0, 10, "STARTED dave")
    assert shown(effects) == ["reconnected: carol asks for a chat: answer yes or no", "chat with dave started"]
    assert s.phase is Phase.CHATTING and s.partner == "dave"


def test_a_huge_or_bogus_range_costs_nothing_and_shows_only_our_messages():
    s = v2_chatting()
    s.typed("a")
    assert shown(s.receive(LOGIN, frames("DELIVERED 5 99999999999999999999"))) == []
    assert shown(s.receive(LOGIN, frames("UNDELIVERED 0 18446744073709551615 gone bob left"))) == [
        "not delivered: 'a' (bob left)"]


def test_away_and_back():
    s = v2_chatting()
    effects = s.receive(LOGIN, frames("AWAY bob"))
    assert shown(effects) == ["bob is away (reconnecting)"] and s.partner_away and s.phase is Phase.CHATTING
    assert shown(s.receive(LOGIN, frames("BACK bob"))) == ["bob is back"] and not s.partner_away
    s.receive(LOGIN, frames("AWAY bob", "ENDED bob dropped bob's connection was lost"))
    assert not s.partner_away and s.phase is Phase.IDLE


def test_receipts_are_hidden_in_plain_scripted_mode_and_documented_for_json():
    assert RECEIPT_KINDS == {"delivered"}
    for kind in ("delivered", "unconfirmed", "away", "back", "chat-kept", "queued", "resumed"):
        assert kind in FORMATS and kind in JSON_FIELDS


# --- dropped and resumed ---------------------------------------------------------------------------


def test_a_drop_keeps_the_chat_and_asks_to_resume_soon():
    s = v2_chatting(reconnect=True, backoff=Backoff(rng=lambda: 0.999999))
    for _ in range(6):
        s.backoff.next()   # many attempts already
    effects = drop(s)
    assert shown(effects)[:2] == ["connection lost: the server closed the login socket",
                                  "the chat with bob is kept while reconnecting; what you type is sent "
                                  "once it is back"]
    assert effects[-1].delay <= RESUME_CAP   # the resume window is short: come back soon


def test_resume_sends_again_what_the_server_lacks_and_shows_nothing_twice():
    s = v2_chatting(reconnect=True)
    s.typed("one\ntwo\nthree")
    s.receive(CHAT, frames("RECEIVED 1"))
    s.receive(LOGIN, frames("MSG bob hi"))               # event 3, acknowledged
    s.receive(LOGIN, frames("MSG bob unacked"))          # event 4: its ACK may never have arrived
    drop(s)
    effects = s.typed("typed while away")
    assert shown(effects) == ["not connected: 'typed while away' will be sent once the connection is back"]
    assert notices(effects)[0].fields() == {"seq": 4, "text": "typed while away"}
    assert sent(effects) == []
    # The server had seq 1 and 2, and events up to 3: it replays 4, then news.
    effects = resume(s, 2, 3, "MSG bob unacked", "MSG bob new", "DELIVERED 1 1")
    assert sent(effects, CHAT) == ["ATTACH CHAT c2", "MSG three", "MSG typed while away"]
    assert shown(effects, echoes=True) == [
        "reconnected: still chatting with bob; 2 kept messages sent now",   # first, then what came meanwhile
        "[bob] new", "delivered: 'one'",
        "[alice] typed while away",   # echoed when it is really sent; 'three' was echoed before
    ]
    assert sent(effects, CHECK) == ["ATTACH CHECK k2", "ACK 6"]
    assert s.online and s.phase is Phase.CHATTING and s.partner == "bob" and s.backoff.attempt == 0
    assert notices(effects, "resumed")[0].fields() == {"user": "alice", "text": notices(effects, "resumed")[0].text,
                                                       "resent": 2}
    # seqs go on across the resume; a NACK on the new chat socket counts from it
    s.typed("five")
    s.receive(CHAT, frames("RECEIVED 5"))
    effects = s.receive(LOGIN, frames("DELIVERED 2 5"))
    assert [(n.count, n.text) for n in notices(effects)] == [(2, "two"), (3, "three"), (4, "typed while away"),
                                                             (5, "five")]
    s.typed("six")
    assert shown(s.receive(CHAT, frames("NACK 4 too-long too long"))) == ["not delivered: 'six' (too long)"]


def test_no_ready_after_resume_and_the_chat_state_follows_replayed_events():
    s = v2_chatting(reconnect=True)
    drop(s)
    effects = resume(s, 0, 2, "ENDED bob quit bob ended the chat", "REQUEST carol")
    assert shown(effects) == ["reconnected: still chatting with bob",   # where it stood, then what happened
                              "chat with bob ended (quit): bob ended the chat",
                              "chat request from carol (answer yes or no)"]
    assert s.phase is Phase.REQUEST_IN and s.partner == "carol"
    assert sent(s.typed("yes"), CHAT) == ["ACCEPT"]


def test_events_read_before_the_sockets_attach_and_input_waits_for_them():
    s = v2_chatting(reconnect=True)
    drop(s)
    s.start()
    effects = s.receive(LOGIN, frames(HELLO, "RESUMED alice 0 2 c2 k2", "MSG bob early"))
    assert shown(effects) == ["reconnected: still chatting with bob", "[bob] early"] and not s.online
    effects = s.typed("quick")   # the chat socket is not attached yet: kept
    assert kinds(effects) == ["queued"] and sent(effects) == []
    assert shown(s.typed("/who")) == ["error: not connected (reconnecting); not sent"]
    s.receive(CHECK, frames(HELLO, "OK ATTACH CHECK"))
    effects = s.receive(CHAT, frames(HELLO, "OK ATTACH CHAT"))
    assert sent(effects) == ["CHAT: MSG quick"] and s.online


def test_a_drop_while_resuming_keeps_the_state_and_the_count():
    s = v2_chatting(reconnect=True)
    s.typed("one")
    drop(s)
    s.start()
    s.receive(LOGIN, frames(HELLO, "RESUMED alice 0 2 c2 k2", "MSG bob three"))
    effects = s.receive(CHAT, b"")   # the new chat socket is cut before it attached
    assert isinstance(effects[-1], Reconnect)
    effects = resume(s, 1, 3)
    assert sent(effects, CHAT) == ["ATTACH CHAT c2"]   # seq 1 is there now
    assert shown(effects) == ["reconnected: still chatting with bob"]
    assert shown(s.receive(LOGIN, frames("DELIVERED 1 1"))) == ["delivered: 'one'"]


def test_unknown_session_logs_in_again_and_reports_each_message_once():
    s = v2_chatting(reconnect=True)
    s.typed("had it\nlost on the way")
    s.receive(CHAT, frames("RECEIVED 1"))
    drop(s)
    s.typed("typed while away")
    s.start()
    effects = s.receive(LOGIN, frames(HELLO, "ERR RESUME unknown-session no such session"))
    assert shown(effects) == [
        "unconfirmed: 'had it' (sent, but whether it was delivered is not known)",
        # sent, not RECEIVED: the server may have relayed it before it went
        "unconfirmed: 'lost on the way' (sent, but whether it was delivered is not known)",
        "not delivered: 'typed while away' (not sent: the server no longer had the session)",
        "chat with bob ended: the connection was lost",
    ]
    assert sent(effects) == ["LOGIN: VERSION 2", "LOGIN: LOGIN alice secret"]   # on the same socket
    effects = s.receive(LOGIN, frames("OK VERSION 2", "WELCOME alice c3 k3 rtok2"))
    assert sent(effects) == ["CHAT: ATTACH CHAT c3", "CHECK: ATTACH CHECK k3"]
    s.receive(CHAT, frames(HELLO, "OK ATTACH CHAT"))
    s.receive(CHECK, frames(HELLO, "OK ATTACH CHECK"))
    effects = s.receive(LOGIN, frames("READY alice"))
    assert shown(effects) == ["reconnected: logged in as alice; not in a chat (the chat with bob ended when the "
                              "connection was lost; /chat bob asks again)"]
    assert sent(effects) == ["CHECK: ACK 1"]   # a new session counts from 1
    # the next drop resumes the new session
    drop(s)
    assert sent(s.start()) == ["LOGIN: RESUME rtok2 1 0"]


def test_resume_window_over_fates_then_a_new_login():
    s = v2_chatting(reconnect=True)
    s.typed("m1\nm2\nm3\nm4")
    s.receive(CHAT, frames("RECEIVED 3"))
    s.receive(LOGIN, frames("DELIVERED 1 1"))
    drop(s)
    s.start()
    effects = s.receive(LOGIN, frames(HELLO, "UNRESUMED 3 expired the session ended 130 s ago",
                                      "DELIVERED 1 2", "UNDELIVERED 3 3 away bob did not come back"))
    assert shown(effects) == [
        "not delivered: 'm4' (not sent: the session ended 130 s ago)",
        "delivered: 'm2'",   # m1's fate came before: not twice
        "not delivered: 'm3' (bob did not come back)",
    ]
    assert sent(effects) == []   # no ACK: there is no check socket
    effects = s.receive(LOGIN, frames("BYE expired the session has expired"))
    assert isinstance(effects[-1], Reconnect) and closed(effects) is None
    assert shown(effects)[0] == "chat with bob ended: the connection was lost"
    assert sent(s.start()) == ["LOGIN: VERSION 2", "LOGIN: LOGIN alice secret"]


def test_unresumed_then_bye_reports_messages_still_without_a_fate_as_unconfirmed():
    s = v2_chatting(reconnect=True)
    s.typed("m1")
    s.receive(CHAT, frames("RECEIVED 1"))
    drop(s)
    s.start()
    s.receive(LOGIN, frames(HELLO, "UNRESUMED 1 expired gone"))
    effects = s.receive(LOGIN, frames("BYE expired gone"))
    assert kinds(effects)[0] == "unconfirmed" and isinstance(effects[-1], Reconnect)


def test_a_busy_server_is_asked_again_later_keeping_the_session():
    s = v2_chatting(reconnect=True)
    s.typed("kept")
    drop(s)
    s.start()
    effects = s.receive(LOGIN, frames(HELLO, "ERR RESUME busy the server is busy"))
    assert isinstance(effects[-1], Reconnect) and kinds(effects) == ["reconnecting"]
    assert sent(s.start()) == ["LOGIN: RESUME rtok 2 0"]


def test_an_accepted_count_that_cannot_be_is_a_protocol_error():
    s = v2_chatting(reconnect=True)
    s.typed("one")
    drop(s)
    s.start()
    effects = s.receive(LOGIN, frames(HELLO, "RESUMED alice 5 2 c2 k2"))
    assert closed(effects) == 3 and "protocol error" in shown(effects)[0]


def test_final_byes_and_exits_report_the_messages_without_a_fate():
    s = v2_chatting(reconnect=True)
    s.typed("had it\nnot yet")
    s.receive(CHAT, frames("RECEIVED 1"))
    effects = s.receive(LOGIN, frames("BYE replaced logged in from another client"))
    assert closed(effects) == 3
    # "not yet" went out too: the server may have relayed it before the BYE
    assert kinds(effects) == ["disconnected", "unconfirmed", "unconfirmed"]
    t = v2_chatting()   # no reconnect: a lost connection ends it
    t.typed("lost")
    assert kinds(t.lost("reset")) == ["lost", "unconfirmed"]
    u = v2_chatting(reconnect=True)
    drop(u)
    u.typed("kept")
    effects = u.exit()
    assert kinds(effects) == ["gave-up", "not-delivered"] and closed(effects) == 3


def test_a_chat_request_lost_before_its_answer_is_not_kept():
    s = v2_online(reconnect=True)
    s.typed("/chat bob")
    effects = drop(s)
    assert "before the server answered your chat request to bob" in shown(effects)[1]
    effects = resume(s, 0, 1)
    assert shown(effects) == ["reconnected: not in a chat"]
    # it did reach the server after all: the answer comes on the login socket
    assert shown(s.receive(LOGIN, frames("STARTED bob"))) == ["chat with bob started"]


def test_plain_lines_while_offline_are_kept_only_in_a_chat():
    s = v2_online(reconnect=True)
    drop(s)
    assert shown(s.typed("hello")) == ["error: not connected (reconnecting); not sent"]
    t = v2_chatting(reconnect=True)
    drop(t)
    assert kinds(t.typed("//slash")) == ["queued"] and t._mine == {1: "/slash"}
    assert shown(t.typed("bad\x1b")) == ["error: the message contains control characters; not sent"]
    assert t.typed("") == []
    long = "y" * 5000   # too long for one frame: kept as two messages, numbered on
    assert kinds(t.typed(long)) == ["queued", "queued"] and "".join([t._mine[2], t._mine[3]]) == long


# --- robustness ------------------------------------------------------------------------------------


def _scripted_run(chunks) -> tuple[list[str], list[str]]:
    """A whole v2 life fed in the given chunking: login, chat, a drop, a resume
    with replay, fates. Returns what was shown and every frame sent except ACKs
    (their number depends on the reads), and checks the ACKs never go back."""
    s = ClientSession("alice", "secret", reconnect=True, backoff=Backoff(rng=lambda: 0.0), ack_delay=0)
    effects = s.start()

    def feed(role, data):
        out = []
        for part in chunks(data):
            out += s.receive(role, part)
        return out

    effects += feed(LOGIN, frames(HELLO, "OK VERSION 2", "WELCOME alice ctok ktok rtok"))
    effects += feed(CHAT, frames(HELLO, "OK ATTACH CHAT"))
    effects += feed(CHECK, frames(HELLO, "OK ATTACH CHECK"))
    effects += feed(LOGIN, frames("READY alice", "STARTED bob", "MSG bob one", "AWAY bob"))
    effects += s.typed("a\nb\nc")
    effects += feed(CHAT, frames("RECEIVED 1"))
    effects += feed(LOGIN, frames("BACK bob", "DELIVERED 1 1"))
    effects += s.receive(LOGIN, b"")
    effects += s.typed("d")
    effects += s.start()
    effects += feed(LOGIN, frames(HELLO, "RESUMED alice 2 5 c2 k2", "BACK bob", "DELIVERED 1 1", "MSG bob two",
                                  "DELIVERED 2 2"))
    effects += feed(CHAT, frames(HELLO, "OK ATTACH CHAT"))
    effects += feed(CHECK, frames(HELLO, "OK ATTACH CHECK"))
    effects += feed(CHAT, frames("RECEIVED 4"))
    effects += feed(LOGIN, frames("UNDELIVERED 3 4 away bob did not come back"))
    acks = [int(line.split()[1]) for line in sent(effects, CHECK) if line.startswith("ACK")]
    assert acks == sorted(acks) and acks[-1] == 10
    others = [line for line in sent(effects) if "ACK " not in line or "ATTACH" in line]
    return shown(effects, echoes=True), others


def test_a_whole_resume_gives_the_same_result_whatever_the_reads():
    whole, frames_whole = _scripted_run(lambda data: [data])
    assert whole == [
        "logged in as alice", "chat with bob started", "[bob] one", "bob is away (reconnecting)",
        "[alice] a", "[alice] b", "[alice] c", "bob is back", "delivered: 'a'",
        "connection lost: the server closed the login socket",
        "the chat with bob is kept while reconnecting; what you type is sent once it is back",
        "reconnecting in 0.5 s (attempt 1): the server closed the login socket",
        "not connected: 'd' will be sent once the connection is back",
        "reconnected: still chatting with bob; 2 kept messages sent now", "[bob] two", "delivered: 'b'",
        "[alice] d", "not delivered: 'c' (bob did not come back)", "not delivered: 'd' (bob did not come back)",
    ]
    bytewise = _scripted_run(lambda data: [data[i:i + 1] for i in range(len(data))])
    assert bytewise == (whole, frames_whole)
    rng = random.Random(7)
    for _ in range(30):
        def chunks(data):
            cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
            return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert _scripted_run(chunks) == (whole, frames_whole)


_EFFECT_TYPES = (Send, Connect, Close, Notice, Reconnect)


@settings(max_examples=200, deadline=None)
@given(role=st.sampled_from([LOGIN, CHAT, CHECK]), data=st.binary(max_size=300),
       lines=st.lists(st.sampled_from([
           "RECEIVED 2", "DELIVERED 1 3", "UNDELIVERED 2 9 away x", "AWAY bob", "BACK bob", "MSG bob x",
           "RESUMED alice 1 1 a b", "UNRESUMED 1 expired x", "NACK 1 empty x", "ENDED bob quit x",
           "OK ATTACH CHAT", "READY alice", "ERR ACK bad-ack x", "ERR RESUME unknown-session x",
       ]), max_size=6))
def test_any_frames_or_bytes_in_a_v2_session_give_effects_never_an_exception(role, data, lines):
    s = v2_chatting(reconnect=True)
    s.typed("one\ntwo\nthree")
    effects = s.receive(role, frames(*lines)) + s.receive(role, data) + s.receive(role, b"")
    assert all(isinstance(e, _EFFECT_TYPES) for e in effects)
    assert s.phase in (Phase.CLOSED, Phase.RECONNECTING, Phase.CHATTING, Phase.IDLE)
    if s.phase is Phase.RECONNECTING:   # and resuming from there works too
        s.start()
        s.receive(LOGIN, frames(HELLO, f"RESUMED alice {s._received} {s._seen_id} c k", "MSG bob y"))
        s.receive(LOGIN, data)


def test_exit_waits_until_the_server_has_read_our_last_ack():
    s = v2_chatting()
    s.receive(LOGIN, frames("MSG bob last words"))
    effects = s.typed("/exit")
    assert sent(effects) == ["CHECK: PING exit"] and s.leaving
    assert sent(s.receive(CHECK, frames("PONG 1"))) == []   # a heartbeat's PONG is not it
    assert sent(s.receive(CHECK, frames("PONG exit"))) == ["CHAT: EXIT"]
    s.receive(CHAT, frames("OK EXIT"))
    assert kinds(s.receive(LOGIN, frames("BYE exit goodbye"))) == ["logged-out"] and s.exit_code == 0
    t = v2_chatting()
    t.exit()
    effects = t.exit_timed_out()   # no PONG in time: EXIT all the same, and leave
    assert sent(effects) == ["CHAT: EXIT"] and closed(effects) == 0


def test_acks_are_batched_within_the_delay_or_at_once_when_many_wait():
    s = v2_online(ack_delay=0.25)
    effects = s.receive(LOGIN, frames("STARTED bob"))
    assert sent(effects, CHECK) == [] and AckLater(0.25 - ACK_GRACE) in effects
    # More reads before the delay is over: no second timer, no ACK yet.
    effects = s.receive(LOGIN, frames("MSG bob one", "MSG bob two"))
    assert sent(effects, CHECK) == [] and not [e for e in effects if isinstance(e, AckLater)]
    effects = s.ack_now()  # ripe: ACK_GRACE more for a chat message to carry it
    assert sent(effects) == [] and AckLater(ACK_GRACE) in effects
    assert sent(s.ack_now(), CHECK) == ["ACK 4"]  # one ACK for the three events
    assert sent(s.ack_now(), CHECK) == []          # nothing new: nothing sent
    # ACK_EVERY events waiting: acknowledged with the read that brought them.
    many = [f"MSG bob m{i}" for i in range(ACK_EVERY)]
    assert sent(s.receive(LOGIN, frames(*many)), CHECK) == [f"ACK {4 + ACK_EVERY}"]


def test_a_stream_is_acknowledged_about_once_a_second_a_quiet_spell_in_a_quarter():
    s = v2_online(ack_delay=0.25)
    acks_ripen(s, ["STARTED bob"])
    effects = s.ack_now()
    assert sent(effects, CHECK) == ["ACK 2"] and AckLater(ACK_SPACING - 0.25) in effects
    # Events during the rest after an ACK start no timer and send nothing,
    # and a message of ours carries no ACK (none is ripe).
    effects = s.receive(LOGIN, frames("MSG bob one"))
    assert sent(effects) == [] and not [e for e in effects if isinstance(e, AckLater)]
    assert sent(s.typed("hi")) == ["CHAT: MSG hi"]
    # The rest ends: the usual delay starts for what came meanwhile.
    effects = s.ack_now()
    assert sent(effects) == [] and AckLater(0.25 - ACK_GRACE) in effects
    s.ack_now()  # ripe
    assert sent(s.ack_now(), CHECK) == ["ACK 3"]
    # A rest with nothing new ends quietly; the next event gets the plain delay.
    assert sent(s.ack_now()) == []
    assert AckLater(0.25 - ACK_GRACE) in s.receive(LOGIN, frames("MSG bob two"))
    # ACK_EVERY waiting is acknowledged at once, rest or not.
    s.ack_now()
    s.ack_now()
    many = [f"MSG bob m{i}" for i in range(ACK_EVERY)]
    assert sent(s.receive(LOGIN, frames(*many)), CHECK) == [f"ACK {4 + ACK_EVERY}"]


def test_the_rest_after_an_ack_is_spread_so_that_clients_fall_out_of_step():
    rests = []
    for draw in (0.0, 0.5, 0.99):
        s = v2_online(ack_delay=0.25, rng=lambda: draw)
        acks_ripen(s, ["STARTED bob"])
        rests += [e.delay for e in s.ack_now() if isinstance(e, AckLater)]
    nominal = ACK_SPACING - 0.25
    assert rests == [nominal * 0.5, nominal, nominal * 1.49]


def acks_ripen(s: ClientSession, events: list[str]) -> None:
    """``events`` arrive; the first stage of the ACK timer runs out."""
    effects = s.receive(LOGIN, frames(*events))
    assert AckLater(s.ack_delay - ACK_GRACE) in effects and sent(effects) == []
    effects = s.ack_now()
    assert sent(effects) == [] and AckLater(ACK_GRACE) in effects


def test_a_ripe_ack_rides_ahead_of_the_next_chat_message_in_one_write():
    s = v2_online(ack_delay=0.25)
    acks_ripen(s, ["STARTED bob", "MSG bob hi"])
    effects = s.typed("hello")
    # ACK then MSG on the chat socket: the server reads both at once.
    assert sent(effects) == ["CHAT: ACK 3", "CHAT: MSG hello"]
    assert AckLater(ACK_CONFIRM, confirm=True) in effects
    assert sent(s.ack_now()) == []  # the second stage finds nothing left to send
    # RECEIVED for that message: the server read the ACK too; nothing more.
    s.receive(CHAT, frames("RECEIVED 1"))
    assert sent(s.ack_confirm()) == []


def test_a_fate_confirms_a_ridden_ack_as_received_does():
    s = v2_online(ack_delay=0.25)
    acks_ripen(s, ["STARTED bob"])
    s.typed("hello")
    s.receive(LOGIN, frames("DELIVERED 1 1"))  # no RECEIVED: the fate says it
    assert sent(s.ack_confirm()) == []


def test_a_ridden_ack_the_server_did_not_read_is_sent_again_on_the_check_socket():
    # The server may have paused the chat socket until this very ACK comes
    # (a full outbox): no RECEIVED, no fate in ACK_CONFIRM, so it goes again
    # where it is always read.
    s = v2_online(ack_delay=0.25)
    acks_ripen(s, ["STARTED bob"])
    assert sent(s.typed("hello")) == ["CHAT: ACK 2", "CHAT: MSG hello"]
    assert sent(s.ack_confirm()) == ["CHECK: ACK 2"]


def test_an_ack_not_ripe_yet_waits_for_its_timer_not_for_a_message():
    s = v2_online(ack_delay=0.25)
    s.receive(LOGIN, frames("STARTED bob"))
    assert sent(s.typed("hello")) == ["CHAT: MSG hello"]  # too soon: acking every write would cost more
    s.ack_now()
    assert sent(s.ack_now()) == ["CHECK: ACK 2"]


def test_an_old_server_refusing_ack_on_the_chat_socket_gets_it_on_the_check_socket():
    s = v2_online(ack_delay=0.25)
    acks_ripen(s, ["STARTED bob"])
    s.typed("hello")
    effects = s.receive(CHAT, frames("ERR ACK wrong-socket ACK is not valid here: this is the chat socket"))
    assert sent(effects) == ["CHECK: ACK 2"] and not notices(effects, "error")


def test_resume_says_how_many_chat_messages_arrived_replays_not_counted_twice():
    """A cluster node that takes the session over from a dead node knows the
    messages by their count, not by the dead node's event ids."""
    s = v2_chatting(reconnect=True)
    s.receive(LOGIN, frames("MSG bob one", "MSG bob two"))
    drop(s)
    assert sent(s.start()) == ["LOGIN: RESUME rtok 4 2"]
    # The same node replays what it sent after the last ACK (2): both again, and a third.
    effects = s.receive(LOGIN, frames(HELLO, "RESUMED alice 0 2 c2 k2", "MSG bob one", "MSG bob two",
                                      "MSG bob three"))
    assert [e for e in kinds(effects) if e == "message"] == ["message"]
    s.receive(CHAT, frames(HELLO, "OK ATTACH CHAT"))
    s.receive(CHECK, frames(HELLO, "OK ATTACH CHECK"))
    drop(s)
    assert sent(s.start()) == ["LOGIN: RESUME rtok 5 3"]


def test_a_server_that_takes_no_message_count_is_asked_again_without_it():
    s = v2_chatting(reconnect=True)
    s.receive(LOGIN, frames("MSG bob one"))
    drop(s)
    assert sent(s.start()) == ["LOGIN: RESUME rtok 3 1"]
    effects = s.receive(LOGIN, frames(HELLO, "ERR RESUME bad-syntax usage: RESUME <token> <last-id>"))
    assert sent(effects) == ["LOGIN: RESUME rtok 3"]
    effects = s.receive(LOGIN, frames("RESUMED alice 0 3 c2 k2"))
    assert not [k for k in kinds(effects) if k in ("error", "unconfirmed", "reconnected")]
    s.receive(CHAT, frames(HELLO, "OK ATTACH CHAT"))
    s.receive(CHECK, frames(HELLO, "OK ATTACH CHECK"))
    drop(s)
    assert sent(s.start()) == ["LOGIN: RESUME rtok 3"]  # the same server, the same session: no count again
