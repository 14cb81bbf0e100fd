"""The client session core (selchat.client.core), without sockets or clocks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.client.core import (
    CHAT, CHECK, COMMANDS, LOGIN, SENT_KEPT, Backoff, ClientSession, Close, Connect, Heartbeat, Phase, Reconnect,
    Roster, Send, check_password, check_username,
)
from selchat.client.notices import ECHO_KINDS, FORMATS, JSON_FIELDS, STDERR_KINDS, Notice
from selchat.client.ui import json_event
from selchat.protocol.codec import MAX_FRAME


def frames(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def sent(effects, role=None) -> list[str]:
    """The frames in ``effects`` (for one role, or all as 'ROLE: frame')."""
    out = []
    for e in effects:
        if isinstance(e, Send) and (role is None or e.role is role):
            text = e.data.decode().rstrip("\n")
            out.append(text if role is not None else f"{e.role.value}: {text}")
    return out


def shown(effects, echoes: bool = False) -> list[str]:
    """The lines shown (without the echoes of what the user sent, unless asked)."""
    return [e.line() for e in effects if isinstance(e, Notice) and (echoes or e.kind not in ECHO_KINDS)]


def kinds(effects) -> list[str]:
    return [e.kind for e in effects if isinstance(e, Notice)]


def closed(effects) -> int | None:
    codes = [e.code for e in effects if isinstance(e, Close)]
    assert len(codes) <= 1
    return codes[0] if codes else None


def online(user: str = "alice", **kwargs) -> ClientSession:
    """A session taken through login, attach and READY."""
    s = ClientSession(user, "secret", **kwargs)
    s.start()
    s.receive(LOGIN, frames("HELLO 1 selchat/0.1.0", f"WELCOME {user} ctok ktok"))
    s.receive(CHAT, frames("HELLO 1 selchat/0.1.0", "OK ATTACH CHAT"))
    s.receive(CHECK, frames("HELLO 1 selchat/0.1.0", "OK ATTACH CHECK"))
    s.receive(LOGIN, frames(f"READY {user}"))
    assert s.phase is Phase.IDLE
    return s


def chatting(partner: str = "bob", **kwargs) -> ClientSession:
    s = online(**kwargs)
    s.receive(LOGIN, frames(f"STARTED {partner}"))
    assert s.phase is Phase.CHATTING and s.partner == partner
    return s


# --- logging in -------------------------------------------------------------------------


def test_start_sends_login_on_the_login_socket():
    s = ClientSession("alice", "correct horse")
    assert s.phase is Phase.CONNECTING
    assert sent(s.start()) == ["LOGIN: LOGIN alice correct horse"]
    assert s.phase is Phase.LOGGING_IN


def test_a_client_that_resumes_asks_for_version_2_first():
    """Version 2 makes the server hold a dropped session for a while: only a
    client that will come back (reconnecting on) asks for it."""
    assert sent(ClientSession("alice", "pw", reconnect=True).start()) == ["LOGIN: VERSION 2", "LOGIN: LOGIN alice pw"]
    assert sent(ClientSession("alice", "pw", version=2).start()) == ["LOGIN: VERSION 2", "LOGIN: LOGIN alice pw"]


def test_register_sends_register():
    assert sent(ClientSession("alice", "pw", register=True).start()) == ["LOGIN: REGISTER alice pw"]


def test_welcome_opens_and_attaches_both_sockets_then_ready_is_idle():
    s = ClientSession("ALICE", "pw")
    s.start()
    effects = s.receive(LOGIN, frames("HELLO 1 selchat/0.1.0", "WELCOME Alice ctok ktok"))
    assert effects == [Connect(CHAT), Send(CHAT, b"ATTACH CHAT ctok\n"),
                       Connect(CHECK), Send(CHECK, b"ATTACH CHECK ktok\n")]
    assert s.phase is Phase.ATTACHING and s.user == "Alice"
    assert s.receive(CHAT, frames("HELLO 1 x", "OK ATTACH CHAT")) == []
    assert s.receive(CHECK, frames("HELLO 1 x", "OK ATTACH CHECK")) == []
    assert not s.online
    assert shown(s.receive(LOGIN, frames("READY Alice"))) == ["logged in as Alice"]
    assert s.online and s.phase is Phase.IDLE


def test_frames_split_anywhere_give_the_same_result():
    s = ClientSession("alice", "pw")
    s.start()
    effects = []
    for byte in frames("HELLO 1 x", "WELCOME alice c k"):
        effects += s.receive(LOGIN, bytes([byte]))
    assert sent(effects) == ["CHAT: ATTACH CHAT c", "CHECK: ATTACH CHECK k"]


def test_wrong_password_is_a_login_failure_with_exit_1():
    s = ClientSession("alice", "wrong")
    s.start()
    effects = s.receive(LOGIN, frames("HELLO 1 x", "ERR LOGIN auth-failed invalid username or password"))
    assert shown(effects) == ["login failed: invalid username or password",
                              "no account yet? connect with --register to create one"]  # the name may be new
    assert all(n.to_stderr for n in effects if isinstance(n, Notice))
    assert closed(effects) == 1 and s.phase is Phase.CLOSED
    # Not after --register, nor for a refusal that is not about the password.
    r = ClientSession("alice", "pw", register=True)
    r.start()
    assert "hint-register" not in kinds(r.receive(LOGIN, frames("HELLO 1 x", "ERR REGISTER taken name taken")))
    t = ClientSession("alice", "pw")
    t.start()
    assert "hint-register" not in kinds(t.receive(LOGIN, frames("HELLO 1 x", "ERR LOGIN busy try again")))


def test_registration_refused_says_so():
    s = ClientSession("alice", "pw", register=True)
    s.start()
    effects = s.receive(LOGIN, frames("ERR REGISTER taken that name is taken"))
    assert shown(effects) == ["registration failed: that name is taken"] and closed(effects) == 1


def test_bye_auth_failed_while_logging_in_exits_1():
    s = ClientSession("alice", "pw")
    s.start()
    assert closed(s.receive(LOGIN, frames("BYE auth-failed too many failures"))) == 1


def test_refused_attach_ends_the_session():
    s = ClientSession("alice", "pw")
    s.start()
    s.receive(LOGIN, frames("WELCOME alice c k"))
    effects = s.receive(CHAT, frames("ERR ATTACH bad-token invalid or expired token"))
    assert closed(effects) == 3
    assert shown(effects) == ["protocol error: could not attach the chat socket: invalid or expired token"]


def test_other_protocol_version_is_fatal():
    s = ClientSession("alice", "pw")
    s.start()
    assert s.receive(LOGIN, frames("HELLO 2 selchat/9")) == []   # the newest it speaks: 1 is fine
    effects = s.receive(LOGIN, frames("HELLO 0 selchat/9"))
    assert closed(effects) == 3 and shown(effects)[0].startswith("protocol error:")


def test_lines_typed_before_ready_are_refused_locally():
    s = ClientSession("alice", "pw")
    s.start()
    effects = s.typed("/who")
    assert sent(effects) == [] and shown(effects) == ["error: not logged in yet"]


# --- typed lines -> frames -------------------------------------------------------------


@pytest.mark.parametrize("line, frame", [
    ("/chat bob", "CHAT bob"),
    ("/CHAT bob", "CHAT bob"),
    ("  /who  ", "WHO"),
    ("/accept", "ACCEPT"),
    ("/decline", "DECLINE"),
    ("/quit", "QUIT"),
    ("/exit", "EXIT"),
    ("/block bob", "BLOCK bob"),
    ("/UNBLOCK Bob", "UNBLOCK Bob"),
    ("/blocks", "BLOCKS"),
])
def test_commands_become_frames_on_the_chat_socket(line, frame):
    assert sent(online().typed(line), CHAT) == [frame]


@pytest.mark.parametrize("line, error", [
    ("/chat", "error: usage: /chat NAME"),
    ("/chat bob carol", "error: usage: /chat NAME"),
    ("/who now", "error: usage: /who"),
    ("/chat b@d", "error: not a valid user name: 'b@d' (1-32 letters, digits, _ or -)"),
    ("/frobnicate", "error: unknown command /frobnicate; /help lists the commands"),
    ("/hlep", "error: unknown command /hlep; did you mean /help?"),
    ("/chta bob", "error: unknown command /chta; did you mean /chat?"),
    ("/q", "error: unknown command /q; did you mean /quit?"),
    ("/whoo", "error: unknown command /whoo; did you mean /who?"),
    ("/help me please", "error: usage: /help [COMMAND]"),
    ("/help frob", "error: unknown command /frob; /help lists the commands"),
    ("/block", "error: usage: /block NAME"),
    ("/block bob carol", "error: usage: /block NAME"),
    ("/unblock", "error: usage: /unblock NAME"),
    ("/blocks bob", "error: usage: /blocks"),
    ("/block b@d", "error: not a valid user name: 'b@d' (1-32 letters, digits, _ or -)"),
    ("/unblock b@d", "error: not a valid user name: 'b@d' (1-32 letters, digits, _ or -)"),
])
def test_bad_commands_are_refused_locally(line, error):
    effects = online().typed(line)
    assert sent(effects) == [] and shown(effects) == [error]


def test_help_is_local():
    effects = online().typed("/help")
    assert sent(effects) == [] and shown(effects) == [FORMATS["help"]]


def test_plain_line_when_not_chatting_is_a_hint_and_not_sent():
    s = online()
    effects = s.typed("hello")
    assert sent(effects) == [] and shown(effects) == ["not in a chat; /chat NAME to start one"]
    assert s.typed("") == [] and s.typed("   ") == []


def test_plain_line_while_asked_or_asking_hints_at_the_answer():
    s = online()
    s.receive(LOGIN, frames("REQUEST bob"))
    assert shown(s.typed("maybe")) == ["bob asks for a chat: answer yes or no"]
    t = online()
    t.typed("/chat bob")
    assert shown(t.typed("hi")) == ["waiting for bob to answer; /quit withdraws the request"]


def test_exit_sends_exit_once_and_ignores_later_lines():
    s = online()
    assert sent(s.typed("/exit"), CHAT) == ["EXIT"]
    assert s.leaving
    assert s.typed("/who") == [] and s.exit() == []


# --- requests in ---------------------------------------------------------------------------


@pytest.mark.parametrize("answer, frame", [("yes", "ACCEPT"), ("Y", "ACCEPT"), ("no", "DECLINE"), ("n", "DECLINE")])
def test_yes_and_no_answer_a_request(answer, frame):
    s = online()
    assert shown(s.receive(LOGIN, frames("REQUEST bob"))) == ["chat request from bob (answer yes or no)"]
    assert s.phase is Phase.REQUEST_IN and s.partner == "bob"
    assert sent(s.typed(answer), CHAT) == [frame]


def test_yes_is_a_message_when_chatting_and_a_hint_when_idle():
    assert sent(chatting().typed("yes"), CHAT) == ["MSG yes"]
    assert sent(online().typed("yes")) == []


def test_accepted_request_becomes_a_chat_on_started():
    s = online()
    s.receive(LOGIN, frames("REQUEST bob"))
    s.typed("yes")
    assert shown(s.receive(CHAT, frames("OK ACCEPT bob"))) == []
    assert shown(s.receive(LOGIN, frames("STARTED bob"))) == ["chat with bob started"]
    assert s.phase is Phase.CHATTING and s.partner == "bob"


def test_declining_goes_back_to_idle():
    s = online()
    s.receive(LOGIN, frames("REQUEST bob"))
    s.typed("no")
    assert shown(s.receive(CHAT, frames("OK DECLINE bob"))) == ["you declined bob's chat request"]
    assert s.phase is Phase.IDLE and s.partner is None


@pytest.mark.parametrize("frame, line", [
    ("EXPIRED bob", "chat request with bob expired"),
    ("CANCELLED bob", "chat request with bob cancelled"),
])
def test_request_in_that_goes_away(frame, line):
    s = online()
    s.receive(LOGIN, frames("REQUEST bob"))
    assert shown(s.receive(LOGIN, frames(frame))) == [line]
    assert s.phase is Phase.IDLE


# --- requests out --------------------------------------------------------------------------


def test_chat_request_out_is_confirmed_by_ok_chat():
    s = online()
    s.typed("/chat bob")
    assert s.phase is Phase.REQUEST_OUT and s.partner == "bob"
    assert shown(s.receive(CHAT, frames("OK CHAT bob"))) == ["chat request sent to bob"]
    assert shown(s.receive(LOGIN, frames("STARTED bob"))) == ["chat with bob started"]
    assert s.phase is Phase.CHATTING


def test_names_match_regardless_of_case_and_take_the_servers_spelling():
    s = online()
    s.typed("/chat BOB")
    s.receive(CHAT, frames("OK CHAT Bob"))
    assert s.partner == "Bob"
    assert shown(s.receive(LOGIN, frames("DECLINED Bob"))) == ["Bob declined your chat request"]
    assert s.phase is Phase.IDLE


def test_refused_chat_request_goes_back_to_idle():
    s = online()
    s.typed("/chat bob")
    assert shown(s.receive(CHAT, frames("ERR CHAT busy bob is busy"))) == ["error: bob is busy"]
    assert s.phase is Phase.IDLE and s.partner is None


def test_chat_request_while_chatting_names_the_clients_command():
    s = chatting("bob")
    s.typed("/chat carol")
    assert shown(s.receive(CHAT, frames("ERR CHAT in-chat you are already chatting with bob; QUIT first"))) \
        == ["error: you are already chatting with bob; /quit first"]
    assert s.phase is Phase.CHATTING and s.partner == "bob"


@pytest.mark.parametrize("frame, line", [
    ("DECLINED bob", "bob declined your chat request"),
    ("EXPIRED bob", "chat request with bob expired"),
])
def test_request_out_answered(frame, line):
    s = online()
    s.typed("/chat bob")
    s.receive(CHAT, frames("OK CHAT bob"))
    assert shown(s.receive(LOGIN, frames(frame))) == [line]
    assert s.phase is Phase.IDLE


def test_answer_read_before_ok_chat_is_shown_once_and_ok_chat_is_silent():
    """Two sockets, two orders: DECLINED on the login socket may be read first."""
    s = online()
    s.typed("/chat bob")
    assert shown(s.receive(LOGIN, frames("DECLINED bob"))) == ["bob declined your chat request"]
    assert shown(s.receive(CHAT, frames("OK CHAT bob"))) == []
    assert s.phase is Phase.IDLE
    t = online()
    t.typed("/chat bob")
    assert shown(t.receive(LOGIN, frames("STARTED bob"))) == ["chat with bob started"]
    assert shown(t.receive(CHAT, frames("OK CHAT bob"))) == []
    assert t.phase is Phase.CHATTING


def test_quit_withdraws_a_request_out():
    s = online()
    s.typed("/chat bob")
    s.receive(CHAT, frames("OK CHAT bob"))
    assert sent(s.typed("/quit"), CHAT) == ["QUIT"]
    assert shown(s.receive(CHAT, frames("OK QUIT bob"))) == ["you withdrew your chat request to bob"]
    assert s.phase is Phase.IDLE


def test_request_in_while_asking_wins_and_the_refusal_does_not_undo_it():
    s = online()
    s.typed("/chat carol")
    s.receive(LOGIN, frames("REQUEST bob"))
    s.receive(CHAT, frames("ERR CHAT pending you already have a request"))
    assert s.phase is Phase.REQUEST_IN and s.partner == "bob"


# --- chatting --------------------------------------------------------------------------------


def test_messages_are_sent_and_received():
    s = chatting()
    assert sent(s.typed("hello there"), CHAT) == ["MSG hello there"]
    assert shown(s.receive(LOGIN, frames("MSG bob hi  you"))) == ["[bob] hi  you"]


def test_a_pasted_block_is_taken_line_by_line():
    assert sent(chatting().typed("one\r\ntwo\n/who")) == ["CHAT: MSG one", "CHAT: MSG two", "CHAT: WHO"]


def test_the_longest_message_relayed_with_the_longest_name_is_accepted():
    s = chatting("b" * 32)
    text = "x" * (MAX_FRAME - 4)            # the longest text a client may send
    effects = s.receive(LOGIN, frames(f"MSG {'b' * 32} {text}"))
    assert shown(effects) == [f"[{'b' * 32}] {text}"] and closed(effects) is None


def test_double_slash_sends_a_line_starting_with_slash():
    assert sent(chatting().typed("//etc/passwd is a file"), CHAT) == ["MSG /etc/passwd is a file"]


def test_nack_names_the_text_that_was_not_delivered():
    s = chatting()
    for text in ("one", "two", "three"):
        s.typed(text)
    effects = s.receive(CHAT, frames("NACK 2 not-in-chat you are not in a chat"))
    assert shown(effects) == ["not delivered: 'two' (you are not in a chat)"]


def test_nack_counts_every_msg_frame_sent_not_just_chat_lines():
    s = chatting()
    s.typed("first")
    s.typed("/who")
    s.typed("yes")  # a message while chatting
    assert shown(s.receive(CHAT, frames("NACK 2 not-in-chat gone"))) == ["not delivered: 'yes' (gone)"]


def test_nack_of_a_forgotten_message_names_its_number():
    s = chatting()
    for i in range(SENT_KEPT + 1):
        s.typed(f"m{i}")
    assert shown(s.receive(CHAT, frames("NACK 1 not-in-chat gone"))) == ["not delivered: message #1 (gone)"]
    assert shown(s.receive(CHAT, frames("NACK 2 not-in-chat gone"))) == ["not delivered: 'm1' (gone)"]


def test_messages_the_server_would_refuse_are_not_sent():
    s = chatting()
    effects = s.typed("bell\x07")
    assert sent(effects) == [] and shown(effects) == ["error: the message contains control characters; not sent"]
    assert sent(s.typed("x" * (MAX_FRAME - 4)), CHAT) == ["MSG " + "x" * (MAX_FRAME - 4)]
    assert sent(s.typed("tab\tok"), CHAT) == ["MSG tab\tok"]


def test_a_line_too_long_for_one_frame_is_sent_as_several_messages():
    """Cut after a space near the end of each piece where there is one, else
    at a character boundary; each piece is a message of its own (and echo)."""
    s = chatting()
    words = " ".join(f"w{i:04}" for i in range(1500))   # 8999 characters
    effects = s.typed(words)
    frames_ = sent(effects, CHAT)
    assert len(frames_) == 3 and all(len(f.encode()) <= MAX_FRAME for f in frames_)
    texts = [f.removeprefix("MSG ") for f in frames_]
    assert "".join(texts) == words and all(t.endswith(" ") for t in texts[:-1])
    assert [n.text for n in effects if getattr(n, "kind", "") == "sent"] == texts
    wide = "é" * MAX_FRAME   # no space: cut between characters, never inside one
    texts = [f.removeprefix("MSG ") for f in sent(s.typed(wide), CHAT)]
    assert "".join(texts) == wide and len(texts) == 3


def test_partner_ending_the_chat():
    s = chatting()
    effects = s.receive(LOGIN, frames("ENDED bob dropped connection lost"))
    assert shown(effects) == ["chat with bob ended (dropped): connection lost"]
    assert s.phase is Phase.IDLE and s.partner is None


@pytest.mark.parametrize("order", ["ok-first", "ended-first"])
def test_own_quit_is_shown_once_whatever_the_order(order):
    s = chatting()
    assert sent(s.typed("/quit"), CHAT) == ["QUIT"]
    replies = [(CHAT, "OK QUIT bob"), (LOGIN, "ENDED bob quit you ended the chat")]
    if order == "ended-first":
        replies.reverse()
    lines = []
    for role, frame in replies:
        lines += shown(s.receive(role, frames(frame)))
    assert lines == ["you left the chat with bob"]
    assert s.phase is Phase.IDLE


def test_partner_quitting_first_is_shown_when_our_quit_is_refused():
    s = chatting()
    s.typed("/quit")
    assert shown(s.receive(LOGIN, frames("ENDED bob quit bob ended the chat"))) == []
    effects = s.receive(CHAT, frames("ERR QUIT not-in-chat you are not in a chat"))
    assert shown(effects) == ["chat with bob ended (quit): bob ended the chat"]


def test_interrupt_quits_a_chat_but_exits_when_idle():
    s = chatting()
    assert sent(s.interrupt(), CHAT) == ["QUIT"] and not s.leaving
    t = online()
    assert sent(t.interrupt(), CHAT) == ["EXIT"] and t.leaving


def test_second_interrupt_exits_also_before_the_first_is_answered():
    s = chatting()
    assert sent(s.interrupt(), CHAT) == ["QUIT"]
    assert sent(s.interrupt(), CHAT) == ["EXIT"] and s.leaving   # OK QUIT not read yet
    t = chatting()
    t.interrupt()
    t.receive(CHAT, frames("OK QUIT bob"))
    assert t.phase is Phase.IDLE and sent(t.interrupt(), CHAT) == ["EXIT"]


def test_interrupt_declines_a_request_in_and_withdraws_a_request_out():
    s = online()
    s.receive(LOGIN, frames("REQUEST bob"))
    assert sent(s.interrupt(), CHAT) == ["DECLINE"] and not s.leaving
    assert sent(s.interrupt(), CHAT) == ["EXIT"]
    t = online()
    t.typed("/chat bob")
    assert sent(t.interrupt(), CHAT) == ["QUIT"] and not t.leaving


# --- who, shutdown, heartbeats ---------------------------------------------------------------


def test_background_who_refreshes_the_names_and_is_not_shown():
    s = online()
    assert sent(s.refresh_names(), CHAT) == ["WHO"] and s.refreshing
    assert s.refresh_names() == []   # one at a time
    effects = s.receive(CHAT, frames("USER alice idle", "USER bob busy", "OK WHO 2"))
    assert effects == [Roster(("alice", "bob"))] and s.known_users == ("alice", "bob")
    assert not s.refreshing


def test_users_who_and_background_who_are_told_apart_in_either_order():
    s = online()
    s.typed("/who")
    s.refresh_names()
    s.typed("/who")
    effects = s.receive(CHAT, frames("USER a idle", "OK WHO 1", "USER a idle", "USER b idle", "OK WHO 2",
                                     "USER c idle", "OK WHO 1"))
    assert shown(effects) == ["online: a (idle)", "online: c (idle)"]
    assert [e for e in effects if isinstance(e, Roster)] == [Roster(("a",)), Roster(("a", "b")), Roster(("c",))]
    t = online()
    t.refresh_names()
    assert shown(t.receive(CHAT, frames("ERR WHO too-long whatever"))) == []


def test_names_seen_in_events_are_offered_until_the_next_who():
    s = online()
    s.receive(LOGIN, frames("REQUEST bob"))
    assert s.known_users == ("bob",)
    s.refresh_names()
    s.receive(CHAT, frames("USER alice idle", "USER carol idle", "OK WHO 2"))
    assert s.known_users == ("alice", "carol")


def test_who_lines_and_json_fields_for_a_long_list():
    s = online()
    s.typed("/who")
    s.receive(CHAT, frames(*[f"USER u{i} idle" for i in range(205)]))
    [notice] = [e for e in s.receive(CHAT, frames("OK WHO 205")) if isinstance(e, Notice)]
    assert notice.line().endswith("u199 (idle) and 5 more")
    assert len(notice.fields()["users"]) == 205 and notice.fields()["more"] == 0


def test_help_for_one_command():
    s = online()
    assert shown(s.typed("/help chat")) == ["/chat NAME: ask NAME for a chat (Tab completes names)"]
    assert shown(s.typed("/help /QUIT")) == [f"/quit: {COMMANDS['/quit'].help}"]
    assert all(c.help and c.usage.startswith(name) for name, c in COMMANDS.items())


def test_a_sent_message_is_echoed_with_its_text():
    s = chatting()
    effects = s.typed("hi  there")
    assert [(e.kind, e.user, e.text) for e in effects if isinstance(e, Notice)] == [("sent", "alice", "hi  there")]
    assert shown(effects) == [] and shown(effects, echoes=True) == ["[alice] hi  there"]


def test_who_lists_users_in_one_line():
    s = online()
    assert sent(s.typed("/who"), CHAT) == ["WHO"]
    assert shown(s.receive(CHAT, frames("USER alice idle", "USER bob busy"))) == []
    assert shown(s.receive(CHAT, frames("OK WHO 2"))) == ["online: alice (idle), bob (busy)"]


def test_error_replies_are_shown():
    s = online()
    s.typed("/accept")
    assert shown(s.receive(CHAT, frames("ERR ACCEPT no-request nobody asked you"))) == ["error: nobody asked you"]


def test_shutdown_notice():
    assert shown(online().receive(LOGIN, frames("SHUTDOWN server going down"))) == ["server: server going down"]


def test_motd_lines_are_shown_as_they_are_after_ready():
    s = ClientSession("alice", "pw")
    s.start()
    s.receive(LOGIN, frames("HELLO 1 selchat/0.1.0", "WELCOME alice ctok ktok"))
    s.receive(CHAT, frames("OK ATTACH CHAT"))
    s.receive(CHECK, frames("OK ATTACH CHECK"))
    effects = s.receive(LOGIN, frames("READY alice", "MOTD Welcome to selchat!", "MOTD", "MOTD   be kind"))
    assert shown(effects) == ["logged in as alice", "Welcome to selchat!", "", "  be kind"]
    assert kinds(effects) == ["ready", "motd", "motd", "motd"]
    assert [e.fields() for e in effects if isinstance(e, Notice)][1:] == [
        {"text": "Welcome to selchat!"}, {"text": ""}, {"text": "  be kind"}]
    assert s.phase is Phase.IDLE and sent(effects) == []


def test_notices_are_shown_whatever_the_phase_and_change_nothing():
    s = ClientSession("alice", "pw")
    s.start()
    s.receive(LOGIN, frames("WELCOME alice ctok ktok"))
    assert shown(s.receive(LOGIN, frames("NOTICE before ready"))) == ["notice: before ready"]
    assert s.phase is Phase.ATTACHING
    s = chatting()
    effects = s.receive(LOGIN, frames("NOTICE the server restarts at 18:00", "MSG bob still here"))
    assert shown(effects) == ["notice: the server restarts at 18:00", "[bob] still here"]
    assert kinds(effects)[0] == "notice" and effects[0].fields() == {"text": "the server restarts at 18:00"}
    assert s.phase is Phase.CHATTING and s.partner == "bob" and sent(effects) == []


def test_motd_after_a_reconnect_follows_the_reconnected_line():
    s = online(reconnect=True, backoff=Backoff(rng=lambda: 0.0))
    s.receive(LOGIN, b"")
    s.start()
    s.receive(LOGIN, frames("WELCOME alice c2 k2"))
    s.receive(CHAT, frames("OK ATTACH CHAT"))
    s.receive(CHECK, frames("OK ATTACH CHECK"))
    assert kinds(s.receive(LOGIN, frames("READY alice", "MOTD hello again"))) == ["reconnected", "motd"]


@pytest.mark.parametrize("role, line", [(CHAT, "NOTICE x"), (CHECK, "MOTD x"), (LOGIN, "MOTD x")])
def test_motd_or_notice_where_the_server_may_not_send_it_is_a_protocol_error(role, line):
    s = ClientSession("alice", "pw")
    s.start()   # the login socket is AUTHENTICATING: no MOTD yet
    if role is not LOGIN:
        s = online()
    effects = s.receive(role, frames(line))
    assert kinds(effects) == ["protocol-error"] and closed(effects) == 3
    assert line.split()[0] in shown(effects)[0]


def test_server_ping_is_answered_with_pong():
    s = online()
    assert sent(s.receive(CHECK, frames("PING 42"))) == ["CHECK: PONG 42"]
    assert sent(s.receive(CHECK, frames("PING"))) == ["CHECK: PONG"]
    assert s.receive(CHECK, frames("PONG 1")) == []


def test_own_pings_count_up_and_wait_for_the_check_socket():
    s = ClientSession("alice", "pw")
    s.start()
    assert s.ping() == []   # not attached yet
    s = online()
    assert sent(s.ping()) == ["CHECK: PING 1"]
    assert sent(s.ping()) == ["CHECK: PING 2"]


def test_heartbeat_pings_every_interval_and_gives_up_after_interval_plus_timeout():
    hb = Heartbeat(interval=30, timeout=10, now=0)
    assert hb.deadline() == 30 and hb.due(29.9) is None
    assert hb.due(30) == Heartbeat.PING and hb.deadline() == 40
    hb.seen(35)
    assert hb.due(60) == Heartbeat.PING
    assert hb.due(74.9) is None and hb.deadline() == 75
    assert hb.due(75) == Heartbeat.DEAD


# --- the end of a session ------------------------------------------------------------------


def test_bye_is_reported_and_exits_3():
    s = chatting()
    effects = s.receive(LOGIN, frames("BYE replaced logged in from another client"))
    assert shown(effects) == ["disconnected: logged in from another client"] and closed(effects) == 3
    assert s.phase is Phase.CLOSED
    assert s.receive(CHAT, b"") == [] and s.typed("hi") == []


def test_eof_without_bye_is_a_lost_connection():
    effects = online().receive(CHECK, b"")
    assert shown(effects) == ["connection lost: the server closed the check socket"] and closed(effects) == 3


@pytest.mark.parametrize("chat_end", [frames("OK EXIT"), b""])
@pytest.mark.parametrize("login_end", [frames("BYE exit goodbye"), b""])
@pytest.mark.parametrize("login_first", [True, False])
def test_after_exit_the_session_ends_when_login_and_chat_sockets_have_ended(chat_end, login_end, login_first):
    s = online()
    s.typed("/exit")
    assert s.receive(CHECK, b"") == []   # the check socket does not matter
    steps = [(LOGIN, login_end), (CHAT, chat_end)]
    if not login_first:
        steps.reverse()
    (role1, data1), (role2, data2) = steps
    assert s.receive(role1, data1) == []
    effects = s.receive(role2, data2)
    assert shown(effects) == ["logged out"] and closed(effects) == 0


def test_replies_read_after_bye_but_sent_before_exit_are_still_shown():
    s = online()
    s.typed("/who")
    s.typed("/exit")
    assert s.receive(LOGIN, frames("BYE exit goodbye")) == []
    effects = s.receive(CHAT, frames("USER alice idle", "OK WHO 1", "OK EXIT"))
    assert shown(effects) == ["online: alice (idle)", "logged out"] and closed(effects) == 0


def test_bye_for_another_reason_while_leaving_is_shown_and_exits_0():
    s = online()
    s.exit()
    assert shown(s.receive(LOGIN, frames("BYE shutdown server stopping"))) == ["disconnected: server stopping"]
    assert closed(s.receive(CHAT, b"")) == 0


def test_exit_timeout_exits_0():
    s = online()
    s.exit()
    assert closed(s.exit_timed_out()) == 0


def test_bad_frame_from_the_server_is_a_fatal_protocol_error():
    effects = online().receive(LOGIN, frames("FROBNICATE now"))
    assert closed(effects) == 3
    assert shown(effects) == ["protocol error: bad frame on the login socket: unknown server frame FROBNICATE"]


def test_frame_on_the_wrong_socket_is_a_protocol_error():
    assert closed(online().receive(CHAT, frames("READY alice"))) == 3


def test_not_responding_and_socket_errors_exit_3():
    assert shown(online().not_responding()) == ["connection lost: server not responding"]
    assert closed(online().lost("chat socket: reset")) == 3


# --- reconnecting -------------------------------------------------------------------------


def steady(value: float):
    return lambda: value


def test_backoff_doubles_up_to_the_cap_with_jitter_between_half_and_all():
    low, high = Backoff(first=1, cap=30, rng=steady(0.0)), Backoff(first=1, cap=30, rng=steady(0.999999))
    lows = [low.next() for _ in range(8)]
    highs = [high.next() for _ in range(8)]
    assert lows == [0.5, 1, 2, 4, 8, 15, 15, 15]
    assert [round(h, 3) for h in highs] == [1, 2, 4, 8, 16, 30, 30, 30]
    low.reset()
    assert low.next() == 0.5 and low.attempt == 1
    assert Backoff(rng=steady(0.5)).next() == 0.75


def test_without_reconnect_a_lost_connection_exits_3():
    assert closed(chatting().lost("login socket: reset")) == 3


def test_a_lost_chat_is_said_then_a_reconnect_is_asked_for():
    s = chatting(reconnect=True, backoff=Backoff(rng=steady(0.0)))
    effects = s.receive(LOGIN, b"")
    assert shown(effects) == [
        "connection lost: the server closed the login socket",
        "chat with bob ended: the connection was lost",
        "reconnecting in 0.5 s (attempt 1): the server closed the login socket",
    ]
    assert effects[-1] == Reconnect(0.5) and closed(effects) is None
    assert s.phase is Phase.RECONNECTING and s.partner is None
    effects = s.reconnect_failed("Connection refused")
    assert shown(effects) == ["reconnecting in 1.0 s (attempt 2): Connection refused"]
    assert effects[-1] == Reconnect(1.0)


def test_reconnect_logs_in_again_and_says_where_the_user_stands():
    s = ClientSession("alice", "pw", register=True, reconnect=True, backoff=Backoff(rng=steady(0.0)))
    assert sent(s.start()) == ["LOGIN: VERSION 2", "LOGIN: REGISTER alice pw"]
    s.receive(LOGIN, frames("HELLO 1 x", "ERR VERSION unknown-command unknown command VERSION",
                            "WELCOME Alice ctok ktok", "READY Alice", "STARTED bob"))
    s.not_responding()
    s.reconnect_failed("refused")
    assert sent(s.start()) == ["LOGIN: VERSION 2", "LOGIN: LOGIN Alice pw"]   # the account exists now
    effects = s.receive(LOGIN, frames("HELLO 1 x", "WELCOME Alice c2 k2"))
    assert sent(effects) == ["CHAT: ATTACH CHAT c2", "CHECK: ATTACH CHECK k2"]
    effects = s.receive(LOGIN, frames("READY Alice"))
    assert shown(effects) == ["reconnected: logged in as Alice; not in a chat (the chat with bob ended when "
                              "the connection was lost; /chat bob asks again)"]
    assert s.phase is Phase.IDLE and s.backoff.attempt == 0


def test_a_request_lost_with_the_connection_is_said():
    s = online(reconnect=True)
    s.typed("/chat bob")
    assert "chat request with bob ended: the connection was lost" in shown(s.lost("chat socket: reset"))


def test_reconnect_after_a_bye_unless_it_is_final():
    s = online(reconnect=True)
    effects = s.receive(LOGIN, frames("BYE shutdown server is shutting down"))
    assert shown(effects)[0] == "disconnected: server is shutting down" and isinstance(effects[-1], Reconnect)
    for reason in ("replaced", "kicked", "auth-failed"):
        t = online(reconnect=True)
        assert closed(t.receive(LOGIN, frames(f"BYE {reason} no"))) == 3


def test_kicked_says_so_and_exits_3_without_reconnecting():
    s = chatting(reconnect=True)
    effects = s.receive(LOGIN, frames("BYE kicked spamming"))
    assert shown(effects) == ["disconnected: spamming"] and closed(effects) == 3
    assert not any(isinstance(e, Reconnect) for e in effects)
    # the partner of a kicked user is told why the chat ended
    t = chatting()
    assert shown(t.receive(LOGIN, frames("ENDED bob kicked bob was disconnected by an operator"))) == [
        "chat with bob ended (kicked): bob was disconnected by an operator"]
    assert t.phase is Phase.IDLE


def test_shutdown_tells_both_partners_the_same_then_reconnects():
    for me, partner in (("alice", "bob"), ("bob", "alice")):
        s = chatting(partner, user=me, reconnect=True)
        effects = s.receive(LOGIN, frames("SHUTDOWN the server is shutting down",
                                          f"ENDED {partner} shutdown the server is shutting down",
                                          "BYE shutdown the server is shutting down"))
        assert shown(effects)[:3] == [
            "server: the server is shutting down",
            f"chat with {partner} ended (shutdown): the server is shutting down",
            "disconnected: the server is shutting down",
        ]
        assert isinstance(effects[-1], Reconnect)


def test_no_reconnect_before_the_first_ready_or_after_a_protocol_error():
    s = ClientSession("alice", "pw", reconnect=True)
    s.start()
    assert closed(s.receive(LOGIN, b"")) == 3
    assert closed(online(reconnect=True).receive(LOGIN, frames("FROBNICATE"))) == 3


def test_what_follows_a_drop_in_the_same_read_is_of_the_past():
    s = chatting(reconnect=True)
    effects = s.receive(LOGIN, frames("BYE ping-timeout no answer", "MSG bob late") + b"")
    assert [type(e) for e in effects].count(Reconnect) == 1
    assert "[bob] late" not in shown(effects)
    assert s.receive(CHAT, b"") == [] and s.lost("check socket: reset") == [] and s.not_responding() == []


def test_while_offline_only_help_and_exit_work():
    s = online(reconnect=True)
    s.lost("reset")
    assert shown(s.typed("hello")) == ["error: not connected (reconnecting); not sent"]
    assert shown(s.typed("/who")) == ["error: not connected (reconnecting); not sent"]
    assert shown(s.typed("/help")) == [FORMATS["help"]]
    effects = s.typed("/exit")
    assert shown(effects) == ["stopped reconnecting"] and closed(effects) == 3 and sent(effects) == []


def test_interrupt_or_end_of_input_while_offline_stops_reconnecting():
    s = online(reconnect=True)
    s.lost("reset")
    assert closed(s.interrupt()) == 3
    t = online(reconnect=True)
    t.lost("reset")
    assert closed(t.exit()) == 3


@pytest.mark.parametrize("reply, line", [
    ("ERR LOGIN auth-failed invalid username or password", "login failed: invalid username or password"),
    ("ERR LOGIN locked this account is locked: spam", "login failed: this account is locked: spam"),
])
def test_a_refused_login_after_reconnecting_exits_1(reply, line):
    s = online(reconnect=True)
    s.lost("reset")
    s.start()
    effects = s.receive(LOGIN, frames(reply))
    assert closed(effects) == 1 and line in shown(effects)


@pytest.mark.parametrize("reply", [
    "ERR LOGIN busy the server is busy; try again in a moment",
    "ERR LOGIN storage account storage unavailable (read): disk I/O error",
    "ERR LOGIN throttled 4 too many failed logins; try again in 4 s",
])
def test_a_server_that_says_not_now_after_reconnecting_is_tried_again(reply):
    s = online(reconnect=True)
    s.lost("reset")
    s.start()
    effects = s.receive(LOGIN, frames(reply))
    assert closed(effects) is None and isinstance(effects[-1], Reconnect)
    assert s.phase is Phase.RECONNECTING


def test_throttled_at_the_first_login_exits_1_and_says_how_long():
    s = ClientSession("alice", "pw", reconnect=True)
    s.start()
    effects = s.receive(LOGIN, frames("HELLO 1 x", "ERR LOGIN throttled 4 too many failed logins; try again in 4 s"))
    assert closed(effects) == 1
    assert shown(effects) == ["login failed: too many failed logins; try again in 4 s"]


@settings(max_examples=200, deadline=None)
@given(role=st.sampled_from([LOGIN, CHAT, CHECK]), data=st.binary(max_size=300))
def test_with_reconnect_any_bytes_end_in_closed_or_reconnecting(role, data):
    s = chatting(reconnect=True)
    effects = s.receive(role, data) + s.receive(role, b"")
    assert all(isinstance(e, _EFFECT_TYPES) for e in effects)
    assert s.phase in (Phase.CLOSED, Phase.RECONNECTING)
    assert [type(e) for e in effects].count(Reconnect) + [type(e) for e in effects].count(Close) == 1


# --- the block list ---------------------------------------------------------------------------

BLOCKED_BOB = "you blocked bob: their chat requests are declined for you"


def test_block_and_unblock_are_sent_and_their_answers_shown():
    s = online()
    assert sent(s.typed("/block BOB"), CHAT) == ["BLOCK BOB"]
    effects = s.receive(CHAT, frames("OK BLOCK Bob"))   # the registered spelling
    assert shown(effects) == ["you blocked Bob: their chat requests are declined for you"]
    assert kinds(effects) == ["blocked"] and s.blocked == ("Bob",) and s.phase is Phase.IDLE
    assert sent(s.typed("/unblock bob"), CHAT) == ["UNBLOCK bob"]
    assert shown(s.receive(CHAT, frames("OK UNBLOCK Bob"))) == ["you unblocked Bob"]
    assert s.blocked == ()


def test_blocks_lists_the_blocked_users_in_one_line_and_leaves_the_roster_alone():
    s = online()
    s.receive(LOGIN, frames("REQUEST dave"))   # a name offered for completion
    s.typed("/decline")
    assert sent(s.typed("/blocks"), CHAT) == ["BLOCKS"]
    assert s.receive(CHAT, frames("OK DECLINE dave", "USER bob blocked", "USER carol blocked")) \
        == [Notice("you-declined", user="dave")]
    effects = s.receive(CHAT, frames("OK BLOCKS 2"))
    assert shown(effects) == ["blocked: bob, carol"]
    assert not any(isinstance(e, Roster) for e in effects) and s.known_users == ("dave",)
    assert s.blocked == ("bob", "carol")
    s.typed("/blocks")
    assert shown(s.receive(CHAT, frames("OK BLOCKS 0"))) == ["blocked: nobody"] and s.blocked == ()


@pytest.mark.parametrize("blocks_first", [False, True])
@pytest.mark.parametrize("one_read", [False, True])
def test_blocks_and_a_background_who_take_each_their_own_user_lines(blocks_first, one_read):
    """The USER lines before an OK belong to it, whichever OK it is: the
    roster gets no blocked name, the block list no online one."""
    s = online()
    who = ["USER alice idle", "USER dave busy", "OK WHO 2"]
    blocks = ["USER bob blocked", "USER carol blocked", "OK BLOCKS 2"]
    if blocks_first:
        s.typed("/blocks")
        assert sent(s.refresh_names(), CHAT) == ["WHO"]
        replies = blocks + who
    else:
        assert sent(s.refresh_names(), CHAT) == ["WHO"]
        s.typed("/blocks")
        replies = who + blocks
    if one_read:
        effects = s.receive(CHAT, frames(*replies))
    else:
        effects = [e for line in replies for e in s.receive(CHAT, frames(line))]
    assert shown(effects) == ["blocked: bob, carol"]
    assert [e for e in effects if isinstance(e, Roster)] == [Roster(("alice", "dave"))]
    assert s.known_users == ("alice", "dave") and s.blocked == ("bob", "carol") and not s.refreshing
    [notice] = [e for e in effects if isinstance(e, Notice)]
    assert notice.users == (("bob", "blocked"), ("carol", "blocked"))


def test_a_users_who_after_blocks_is_shown_without_the_blocked():
    s = online()
    s.typed("/blocks")
    s.typed("/who")
    effects = s.receive(CHAT, frames("USER bob blocked", "OK BLOCKS 1", "USER alice idle", "OK WHO 1"))
    assert shown(effects) == ["blocked: bob", "online: alice (idle)"]


def test_a_refused_blocks_forgets_its_user_lines():
    s = online()
    s.typed("/blocks")
    s.receive(CHAT, frames("USER bob blocked", "ERR BLOCKS storage the database is not answering"))
    s.refresh_names()
    assert s.receive(CHAT, frames("USER alice idle", "OK WHO 1")) == [Roster(("alice",))]


@pytest.mark.parametrize("verb, line", [("BLOCK", "/block bob"), ("UNBLOCK", "/unblock bob"), ("BLOCKS", "/blocks")])
def test_a_server_without_a_block_list_says_so(verb, line):
    s = online()
    s.typed(line)
    effects = s.receive(CHAT, frames(f"ERR {verb} unknown-command unknown command {verb}; send HELP for the list"))
    assert shown(effects) == ["error: this server has no block list (it is older than selchat 0.6.0)"]
    assert s.phase is Phase.IDLE


@pytest.mark.parametrize("typed, frame, line", [
    ("/block bob", "ERR BLOCK unknown-user no such user: bob", "error: no such user: bob"),
    ("/block alice", "ERR BLOCK self you cannot block yourself", "error: you cannot block yourself"),
    ("/block bob", "ERR BLOCK too-many you have blocked 1000 users already",
     "error: you have blocked 1000 users already"),
    ("/unblock bob", "ERR UNBLOCK not-blocked bob is not blocked", "error: bob is not blocked"),
    ("/blocks", "ERR BLOCKS storage the database is not answering", "error: the database is not answering"),
])
def test_block_refusals_are_errors(typed, frame, line):
    s = online()
    s.typed(typed)
    assert shown(s.receive(CHAT, frames(frame))) == [line] and s.blocked == ()


@pytest.mark.parametrize("ended_first", [True, False])
def test_blocking_the_partner_ends_the_chat_once_and_not_as_an_error(ended_first):
    s = chatting()
    assert sent(s.typed("/block bob"), CHAT) == ["BLOCK bob"]
    replies = [(LOGIN, "ENDED bob quit you ended the chat"), (CHAT, "OK BLOCK bob")]
    if not ended_first:
        replies.reverse()   # two sockets: read in either order
    effects = [e for role, line in replies for e in s.receive(role, frames(line))]
    ended = "chat with bob ended (quit): you ended the chat"
    assert shown(effects) == ([ended, BLOCKED_BOB] if ended_first else [BLOCKED_BOB, ended])
    assert s.phase is Phase.IDLE and s.partner is None
    assert shown(s.typed("hello")) == [FORMATS["hint-idle"]]   # not sent to bob


@pytest.mark.parametrize("ended_first", [True, False])
def test_block_then_quit_before_the_end_arrives(ended_first):
    """/quit typed after /block, before its ENDED: the server ended the chat
    for the BLOCK and refuses the QUIT. The end is shown once; the refusal
    only when it was read before the ENDED (as when the partner quits first)."""
    s = chatting()
    s.typed("/block bob")
    assert sent(s.typed("/quit"), CHAT) == ["QUIT"]
    login = [(LOGIN, "ENDED bob quit you ended the chat")]
    chat = [(CHAT, "OK BLOCK bob"), (CHAT, "ERR QUIT not-in-chat you are not in a chat")]
    effects = [e for role, line in (login + chat if ended_first else chat + login)
               for e in s.receive(role, frames(line))]
    lines = shown(effects)
    assert lines.count("chat with bob ended (quit): you ended the chat") == 1 and BLOCKED_BOB in lines
    assert ("error: you are not in a chat" in lines) is (not ended_first)
    assert s.phase is Phase.IDLE and s.partner is None


def test_blocking_with_a_request_pending_drops_it():
    """The server drops a request between us with no event for us: OK BLOCK says it."""
    s = online()
    s.typed("/chat bob")
    s.receive(CHAT, frames("OK CHAT bob"))
    s.typed("/block bob")
    assert shown(s.receive(CHAT, frames("OK BLOCK bob"))) == ["you withdrew your chat request to bob", BLOCKED_BOB]
    assert s.phase is Phase.IDLE and s.partner is None
    t = online()
    t.receive(LOGIN, frames("REQUEST bob"))
    t.typed("/block bob")
    assert shown(t.receive(CHAT, frames("OK BLOCK bob"))) == ["you declined bob's chat request", BLOCKED_BOB]
    assert t.phase is Phase.IDLE and t.partner is None


def test_blocking_someone_else_leaves_the_chat_or_request_alone():
    s = chatting()
    s.typed("/block carol")
    assert shown(s.receive(CHAT, frames("OK BLOCK carol"))) == [
        "you blocked carol: their chat requests are declined for you"]
    assert s.phase is Phase.CHATTING and s.partner == "bob"
    u = online()
    u.receive(LOGIN, frames("REQUEST bob"))
    u.typed("/block carol")
    u.receive(CHAT, frames("OK BLOCK carol"))
    assert u.phase is Phase.REQUEST_IN and u.partner == "bob"
    v = online()
    v.typed("/chat bob")
    v.typed("/block carol")
    assert shown(v.receive(CHAT, frames("OK CHAT bob", "OK BLOCK carol"))) == [
        "chat request sent to bob", "you blocked carol: their chat requests are declined for you"]
    assert v.phase is Phase.REQUEST_OUT and v.partner == "bob"


def test_the_block_list_kinds_as_json():
    def fields(notice: Notice) -> dict:
        event = json.loads(json_event(notice, when=0.0))
        assert event.pop("time") and event.pop("line") == notice.line()
        return event
    s = online()
    s.typed("/block bob")
    [blocked] = s.receive(CHAT, frames("OK BLOCK bob"))
    assert fields(blocked) == {"type": "blocked", "user": "bob"}
    s.typed("/unblock bob")
    [unblocked] = s.receive(CHAT, frames("OK UNBLOCK bob"))
    assert fields(unblocked) == {"type": "unblocked", "user": "bob"}
    s.typed("/blocks")
    [listed] = s.receive(CHAT, frames("USER bob blocked", "USER carol blocked", "OK BLOCKS 2"))
    assert fields(listed) == {"type": "blocks", "users": [{"name": "bob", "status": "blocked"},
                                                          {"name": "carol", "status": "blocked"}]}
    s.typed("/blocks")
    [nobody] = s.receive(CHAT, frames("OK BLOCKS 0"))
    assert fields(nobody) == {"type": "blocks", "users": []}


def test_help_mentions_the_block_list():
    assert "/block NAME" in FORMATS["help"] and "/unblock" in FORMATS["help"] and "/blocks" in FORMATS["help"]
    assert shown(online().typed("/help block")) == [f"/block NAME: {COMMANDS['/block'].help}"]


# --- formats and checks -------------------------------------------------------------------


def test_every_format_renders_as_one_line():
    for kind in FORMATS:
        line = Notice(kind, user="bob", text="t", detail="d", count=2).line()
        assert line and "\n" not in line and "{" not in line, kind
    assert STDERR_KINDS <= set(FORMATS) and ECHO_KINDS <= set(FORMATS)


def test_every_kind_has_its_json_fields_with_their_types():
    assert set(JSON_FIELDS) == set(FORMATS)
    for kind, fields in JSON_FIELDS.items():
        notice = Notice(kind, user="bob", text="7", detail="1.5", users=(("bob", "idle"),), count=3)
        out = notice.fields()
        assert list(out) == list(fields), kind
        for name, (_, kind_type) in fields.items():
            assert type(out[name]) is kind_type, (kind, name)
    assert Notice("who", users=(("a", "idle"), ("b", "busy"))).fields() == {
        "users": [{"name": "a", "status": "idle"}, {"name": "b", "status": "busy"}], "more": 0}


def test_user_and_password_checks():
    assert check_username("al-ice_9") is None
    assert check_username("") and check_username("x" * 33) and check_username("a b")
    assert check_password("correct horse") is None
    assert check_password("") and check_password("x" * 1025) and check_password("a\x1bb")


# --- properties ---------------------------------------------------------------------------


_EFFECT_TYPES = (Send, Connect, Close, Notice, Reconnect, Roster)


@settings(max_examples=300, deadline=None)
@given(role=st.sampled_from([LOGIN, CHAT, CHECK]), data=st.binary(max_size=300))
def test_any_bytes_from_the_server_give_effects_never_an_exception(role, data):
    s = online()
    effects = s.receive(role, data) + s.receive(role, b"")
    assert all(isinstance(e, _EFFECT_TYPES) for e in effects)
    assert s.phase is Phase.CLOSED
    for e in effects:
        if isinstance(e, Notice):
            assert "\n" not in e.line()


_SERVER_LINES = [
    (LOGIN, "REQUEST bob"), (LOGIN, "STARTED bob"), (LOGIN, "DECLINED bob"), (LOGIN, "EXPIRED bob"),
    (LOGIN, "CANCELLED bob"), (LOGIN, "ENDED bob quit q"), (LOGIN, "MSG bob hi"), (LOGIN, "REQUEST carol"),
    (CHAT, "OK CHAT bob"), (CHAT, "ERR CHAT busy b"), (CHAT, "OK QUIT bob"), (CHAT, "ERR QUIT not-in-chat n"),
    (CHAT, "OK DECLINE bob"), (CHAT, "OK ACCEPT bob"), (CHAT, "NACK 1 not-in-chat n"), (CHECK, "PING 3"),
    (CHAT, "OK BLOCK bob"), (CHAT, "OK BLOCK carol"), (CHAT, "USER bob blocked"), (CHAT, "OK BLOCKS 1"),
]
_TYPED = ["/chat bob", "/chat carol", "yes", "no", "/quit", "hello", "/who", "/accept", "/decline",
          "/block bob", "/blocks"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_SERVER_LINES), st.sampled_from(_TYPED)), max_size=30))
def test_any_mix_of_events_and_typing_keeps_a_consistent_phase(steps):
    s = online()
    for step in steps:
        if isinstance(step, str):
            effects = s.typed(step)
        else:
            role, line = step
            effects = s.receive(role, frames(line))
        assert all(isinstance(e, _EFFECT_TYPES) for e in effects)
        assert s.phase in (Phase.IDLE, Phase.REQUEST_IN, Phase.REQUEST_OUT, Phase.CHATTING)
        assert (s.partner is None) == (s.phase is Phase.IDLE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([LOGIN, CHAT, CHECK]),
                          st.sampled_from([b"", b"OK EXIT\n", b"BYE exit bye\n", b"USER a idle\n", b"PING 1\n",
                                           b"MSG bob hi\n", b"\xff\n", b"ENDED bob quit q\n"])),
                max_size=12))
def test_leaving_ends_once_whatever_arrives(steps):
    s = online()
    s.exit()
    codes = []
    for role, data in steps + [(LOGIN, b""), (CHAT, b""), (CHECK, b"")]:
        effects = s.receive(role, data)
        codes += [e.code for e in effects if isinstance(e, Close)]
    assert s.phase is Phase.CLOSED and codes == [0]


# --- changing the password ---------------------------------------------------------------


def test_a_changed_password_is_the_one_the_next_login_uses():
    s = online(reconnect=True, backoff=Backoff(rng=steady(0.0)))
    assert sent(s.change_password("secret", "x" * 1025)) == []   # refused here, not sent
    effects = s.change_password("my secret", "new one")
    assert sent(effects) == ["CHAT: PASSWORD my\\ secret new one"]
    effects = s.receive(CHAT, frames("ERR PASSWORD auth-failed that is not your current password"))
    assert shown(effects) == ["error: password not changed: that is not your current password"]
    s.change_password("secret", "new one")
    assert shown(s.receive(CHAT, frames("OK PASSWORD"))) == ["your password is changed"]
    s.not_responding()
    s.reconnect_failed("refused")
    assert sent(s.start()) == ["LOGIN: VERSION 2", "LOGIN: LOGIN alice new one"]


def test_password_is_not_read_from_a_typed_line_and_a_lost_answer_is_said():
    s = online(reconnect=True)
    effects = s.typed("/password")
    assert sent(effects) == [] and "asks for your passwords at a terminal" in shown(effects)[0]
    assert sent(s.typed("/password old new")) == []   # never sent as typed: usage
    s.change_password("secret", "new one")
    effects = s.lost("chat socket: reset")
    assert "error: the connection was lost before the server answered /password: your password may or " \
           "may not be changed" in shown(effects)


# --- deleting the account -------------------------------------------------------------------


def _v2_online(**kwargs) -> ClientSession:
    """A version 2 session (the server keeps it for a resume), online and idle."""
    s = ClientSession("alice", "secret", reconnect=True, ack_delay=0, backoff=Backoff(rng=steady(0.0)), **kwargs)
    s.start()
    s.receive(LOGIN, frames("HELLO 2 x", "OK VERSION 2", "WELCOME alice ctok ktok rtok"))
    s.receive(CHAT, frames("HELLO 2 x", "OK ATTACH CHAT"))
    s.receive(CHECK, frames("HELLO 2 x", "OK ATTACH CHECK"))
    s.receive(LOGIN, frames("READY alice"))
    assert s.online
    return s


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("ok_first", [True, False])
def test_a_deleted_account_leaves_for_good_whichever_socket_says_it_first(version, ok_first):
    """OK UNREGISTER (chat socket) and BYE unregistered (login socket) come in
    either order: the deletion is said once, the session ends as after /exit
    (exit 0), and nothing reconnects or logs in again."""
    s = _v2_online() if version == 2 else chatting(reconnect=True, backoff=Backoff(rng=steady(0.0)))
    assert sent(s.delete_account("my secret")) == ["CHAT: UNREGISTER my secret"]
    ok = (CHAT, frames("OK UNREGISTER alice"))
    bye = (LOGIN, frames("BYE unregistered your account is deleted"))
    effects = []
    for role, data in (ok, bye) if ok_first else (bye, ok):
        effects += s.receive(role, data)
        effects += s.receive(role, b"")
    effects += s.receive(CHECK, b"")
    assert shown(effects) == ["your account alice is deleted", "logged out"]
    assert closed(effects) == 0 and s.exit_code == 0
    assert not any(isinstance(e, Reconnect) for e in effects)
    assert s.phase is Phase.CLOSED and s.start() == [] and s.lost("reset") == []


def test_the_ok_alone_leaves_and_no_reconnect_follows_a_timeout_or_a_reset():
    s = online(reconnect=True, backoff=Backoff(rng=steady(0.0)))
    s.delete_account("secret")
    effects = s.receive(CHAT, frames("OK UNREGISTER Alice"))
    assert shown(effects) == ["your account Alice is deleted"] and s.leaving and closed(effects) is None
    assert s.typed("/who") == []   # leaving: nothing more is sent
    effects = s.lost("login socket: reset")   # instead of the BYE
    assert shown(effects) == ["connection lost: login socket: reset"] and closed(effects) == 0
    assert not any(isinstance(e, Reconnect) for e in effects)


def test_a_refused_unregister_says_why_and_the_session_goes_on():
    s = online(reconnect=True)
    for reply, line in (
        ("ERR UNREGISTER auth-failed that is not your current password",
         "error: account not deleted: that is not your current password"),
        ("ERR UNREGISTER throttled too many wrong passwords; try again in 4 s",
         "error: account not deleted: too many wrong passwords; try again in 4 s"),
        ("ERR UNREGISTER unknown-command unknown command UNREGISTER",
         "error: this server cannot delete accounts (it is older than selchat 0.6.0)"),
    ):
        assert sent(s.delete_account("secret")) == ["CHAT: UNREGISTER secret"]
        assert shown(s.receive(CHAT, frames(reply))) == [line]
        assert s.online and not s.leaving
    # no UNREGISTER is pending now: a BYE is not taken for the deletion's, nor a loss warned of
    effects = s.receive(LOGIN, frames("BYE shutdown server is shutting down"))
    assert shown(effects)[0] == "disconnected: server is shutting down" and len(shown(effects)) == 2
    assert isinstance(effects[-1], Reconnect)


def test_unregister_is_refused_locally_when_it_cannot_be_sent():
    s = online()
    assert shown(s.delete_account("")) == ["error: account not deleted: the password is empty"]
    assert sent(s.delete_account("a\x1bb")) == []
    effects = s.typed("/unregister")
    assert sent(effects) == [] and shown(effects) == [
        "error: /unregister asks for your password at a terminal; it cannot read it from a line (or a script)"]
    assert sent(s.typed("/UNREGISTER secret")) == []   # never sent as typed: usage
    assert shown(s.typed("/help unregister")) == [f"/unregister: {COMMANDS['/unregister'].help}"]
    not_yet = ClientSession("alice", "secret")
    not_yet.start()
    assert shown(not_yet.delete_account("secret")) == ["error: account not deleted: not connected"]
    s.exit()
    assert sent(s.delete_account("secret")) == []   # logging out already


@pytest.mark.parametrize("reconnect", [True, False])
def test_a_connection_lost_before_the_answer_to_unregister_is_said(reconnect):
    s = online(reconnect=reconnect, backoff=Backoff(rng=steady(0.0)))
    s.delete_account("secret")
    effects = s.lost("chat socket: reset")
    assert "error: the connection was lost before the server answered /unregister: your account may or " \
           "may not be deleted" in shown(effects)
    assert closed(effects) == (None if reconnect else 3)


def test_a_bye_unregistered_is_final_even_when_this_client_did_not_ask():
    s = online(reconnect=True)
    effects = s.receive(LOGIN, frames("BYE unregistered your account is deleted"))
    assert shown(effects) == ["disconnected: your account is deleted"] and closed(effects) == 3
    assert not any(isinstance(e, Reconnect) for e in effects)


def test_account_deleted_in_json():
    s = online()
    s.delete_account("secret")
    [deleted] = [e for e in s.receive(CHAT, frames("OK UNREGISTER alice")) if isinstance(e, Notice)]
    assert json.loads(json_event(deleted, 0.0)) | {"time": None} == {
        "type": "account-deleted", "time": None, "line": "your account alice is deleted", "user": "alice"}
