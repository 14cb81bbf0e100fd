"""The per-socket state machine, in the style of h2's test_state_machines.py.

Every (state, event) pair is tried on both sides, for what is received and what
is sent. The expected outcome comes from ``SPEC`` below, written from
docs/protocol.md independently of ``selchat/protocol/state.py``; one test
checks that the two agree.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.protocol import codec
from selchat.protocol import events as ev
from selchat.protocol.connection import CLIENT, SERVER, Connection
from selchat.protocol.errors import LocalProtocolError
from selchat.protocol.state import CLIENT_FRAMES, SERVER_FRAMES, State, next_state

S = State
CHAT, CHECK = ev.Role.CHAT, ev.Role.CHECK

# --- one instance of every event ---------------------------------------------------

CLIENT_EVENTS = [
    ev.Login("alice", "pass word"),
    ev.Register("bob", "s3cret"),
    ev.Attach(CHAT, "chat-token_1"),
    ev.Attach(CHECK, "check-token_2"),
    ev.ChatRequest("bob"),
    ev.Accept(),
    ev.Decline(),
    ev.Quit(),
    ev.Exit(),
    ev.Who(),
    ev.Help(),
    ev.Message("hello there"),
    ev.Password("old one", "new one"),
    ev.Unregister("pass word"),
    ev.Block("bob"),
    ev.Unblock("bob"),
    ev.Blocks(),
    ev.Ping("1"),
    ev.Ping(""),
    ev.Pong("1"),
    ev.Pong(""),
    ev.Version(2),
    ev.Resume("3.s3cret", 17),
    ev.Resume("3.s3cret", 17, 5),
    ev.Ack(17),
]

SERVER_EVENTS = [
    ev.Hello(1, "selchat/0.1.0"),
    ev.Welcome("alice", "ct", "kt"),
    ev.Welcome("alice", "ct", "kt", "rt"),
    ev.Resumed("alice", 4, 17, "ct", "kt"),
    ev.Unresumed(4, "expired", "the resume window ended"),
    ev.Received(4),
    ev.Delivered(1, 4),
    ev.Undelivered(5, 6, "away", "bob did not come back"),
    ev.Away("bob"),
    ev.Back("bob"),
    ev.Attached(CHAT),
    ev.Attached(CHECK),
    ev.Ready("alice"),
    ev.Ok("WHO", "2"),
    ev.Ok("EXIT"),
    ev.Error("CHAT", "busy", "bob is busy"),
    ev.UserEntry("bob", "idle"),
    ev.Request("bob"),
    ev.Started("bob"),
    ev.Declined("bob"),
    ev.Expired("bob"),
    ev.Cancelled("bob"),
    ev.Ended("bob", "quit", "bob quit the chat"),
    ev.Incoming("bob", "hi alice"),
    ev.Nack(3, "not-in-chat", "you are not chatting"),
    ev.Shutdown("going down"),
    ev.Shutdown(""),
    ev.Notice("back in five minutes"),
    ev.Notice(""),
    ev.Motd("welcome to selchat"),
    ev.Motd(""),
    ev.Bye("exit", "see you"),
    ev.Ping("7"),
    ev.Pong("7"),
]

VERB = {
    ev.Login: "LOGIN", ev.Register: "REGISTER", ev.Attach: "ATTACH", ev.ChatRequest: "CHAT",
    ev.Accept: "ACCEPT", ev.Decline: "DECLINE", ev.Quit: "QUIT", ev.Exit: "EXIT", ev.Who: "WHO",
    ev.Help: "HELP", ev.Password: "PASSWORD", ev.Message: "MSG", ev.Ping: "PING", ev.Pong: "PONG",
    ev.Unregister: "UNREGISTER", ev.Block: "BLOCK", ev.Unblock: "UNBLOCK", ev.Blocks: "BLOCKS",
    ev.Hello: "HELLO", ev.Welcome: "WELCOME", ev.Attached: "OK", ev.Ready: "READY", ev.Ok: "OK",
    ev.Error: "ERR", ev.UserEntry: "USER", ev.Request: "REQUEST", ev.Started: "STARTED",
    ev.Declined: "DECLINED", ev.Expired: "EXPIRED", ev.Cancelled: "CANCELLED", ev.Ended: "ENDED",
    ev.Incoming: "MSG", ev.Nack: "NACK", ev.Shutdown: "SHUTDOWN", ev.Bye: "BYE",
    ev.Notice: "NOTICE", ev.Motd: "MOTD",
    ev.Version: "VERSION", ev.Resume: "RESUME", ev.Ack: "ACK", ev.Resumed: "RESUMED",
    ev.Unresumed: "UNRESUMED", ev.Received: "RECEIVED", ev.Delivered: "DELIVERED",
    ev.Undelivered: "UNDELIVERED", ev.Away: "AWAY", ev.Back: "BACK",
}

WHERE = {
    S.FRESH: "log in or attach first",
    S.AUTHENTICATING: "wait for the login reply",
    S.ATTACHING: "wait for the attach reply",
    S.LOGIN: "the login socket only receives; send commands on the chat socket",
    S.CHAT: "this is the chat socket",
    S.CHECK: "the check socket only carries PING, PONG and ACK",
    S.CLOSED: "the socket is closed",
}

# --- the specification, from docs/protocol.md ----------------------------------------

_COMMANDS = {ev.ChatRequest, ev.Accept, ev.Decline, ev.Quit, ev.Exit, ev.Who, ev.Help, ev.Password, ev.Message,
             ev.Unregister, ev.Block, ev.Unblock, ev.Blocks}
_LOGIN_SOCKET = {
    ev.Ready, ev.Request, ev.Started, ev.Declined, ev.Expired, ev.Cancelled,
    ev.Ended, ev.Incoming, ev.Error, ev.Shutdown,
    ev.Notice, ev.Motd,  # after WELCOME, before READY too; only on the login socket
    ev.Delivered, ev.Undelivered, ev.Away, ev.Back,  # version 2
}


def client_spec(state: State, event: ev.Event) -> State | None:
    """The state after the client sends ``event`` in ``state``; None: not allowed."""
    t = type(event)
    if state is S.FRESH:
        return {ev.Version: S.FRESH, ev.Login: S.AUTHENTICATING, ev.Register: S.AUTHENTICATING,
                ev.Resume: S.AUTHENTICATING, ev.Attach: S.ATTACHING, ev.Help: S.FRESH}.get(t)
    if state is S.CHAT and (t in _COMMANDS or t is ev.Ack):  # ACK: v2, ahead of a MSG
        return S.CHAT
    if state is S.CHECK and t in (ev.Ping, ev.Pong, ev.Ack):
        return S.CHECK
    return None


def server_spec(state: State, event: ev.Event) -> State | None:
    """The state after the server sends ``event`` in ``state``; None: not allowed."""
    t = type(event)
    if state is S.CLOSED:
        return None
    if t is ev.Bye:
        return S.CLOSED
    if t is ev.Shutdown:
        return state
    if state is S.FRESH:
        return {ev.Hello: S.FRESH, ev.Error: S.FRESH, ev.Ok: S.FRESH}.get(t)  # OK VERSION
    if state is S.AUTHENTICATING:
        return {ev.Hello: S.AUTHENTICATING, ev.Ok: S.AUTHENTICATING, ev.Welcome: S.LOGIN,
                ev.Resumed: S.LOGIN, ev.Unresumed: S.LOGIN, ev.Error: S.FRESH}.get(t)
    if state is S.ATTACHING:
        if t is ev.Attached:
            return S.CHAT if event.role is CHAT else S.CHECK
        return {ev.Hello: S.ATTACHING, ev.Error: S.CLOSED}.get(t)
    if state is S.LOGIN:
        return S.LOGIN if t in _LOGIN_SOCKET else None
    if state is S.CHAT:
        return S.CHAT if t in (ev.Ok, ev.Error, ev.UserEntry, ev.Nack, ev.Received) else None
    if state is S.CHECK:
        return S.CHECK if t in (ev.Ping, ev.Pong, ev.Error) else None
    raise AssertionError(state)


def conn_in(side, state: State) -> Connection:
    conn = Connection(side)
    conn.state = state
    return conn


def test_spec_matches_state_tables():
    for state in State:
        for event in CLIENT_EVENTS + SERVER_EVENTS:
            assert next_state(CLIENT_FRAMES, state, event) is client_spec(state, event), (state, event)
            assert next_state(SERVER_FRAMES, state, event) is server_spec(state, event), (state, event)


def test_every_state_can_be_left_and_reached():
    reachable = {S.FRESH}
    for _ in State:
        for state in list(reachable):
            reachable |= {client_spec(state, e) for e in CLIENT_EVENTS} - {None}
            reachable |= {server_spec(state, e) for e in SERVER_EVENTS} - {None}
    assert reachable == set(State)
    # and every state but CLOSED has a way out
    for state in set(State) - {S.CLOSED}:
        assert any(server_spec(state, e) not in (None, state) for e in SERVER_EVENTS + CLIENT_EVENTS) or any(
            client_spec(state, e) not in (None, state) for e in CLIENT_EVENTS
        )


# --- receiving --------------------------------------------------------------------


def check_receive(side, state: State, event: ev.Event) -> None:
    spec = client_spec if side is SERVER else server_spec
    conn = conn_in(side, state)
    conn.receive_data(codec.encode(event))
    got = conn.next_event()
    expected = spec(state, event)
    if expected is not None:
        assert got == event
        assert conn.state is expected
        counted = side is SERVER and type(event) is ev.Message
        assert conn.msg_seq == (1 if counted else 0)
    else:
        verb = VERB[type(event)]
        reply = ev.Error(verb, "wrong-socket", f"{verb} is not valid here: {WHERE[state]}")
        assert got == ev.BadFrame(reply, fatal=False)
        assert conn.state is state
        assert conn.msg_seq == 0
    assert conn.next_event() is ev.NEED_DATA
    assert conn.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(State), st.sampled_from(CLIENT_EVENTS))
def test_server_receives(state, event):
    check_receive(SERVER, state, event)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(State), st.sampled_from(SERVER_EVENTS))
def test_client_receives(state, event):
    check_receive(CLIENT, state, event)


def test_receive_every_pair():
    """The same as the two tests above, exhaustively (hypothesis may miss a pair)."""
    for state in State:
        for event in CLIENT_EVENTS:
            check_receive(SERVER, state, event)
        for event in SERVER_EVENTS:
            check_receive(CLIENT, state, event)


# --- sending ----------------------------------------------------------------------


def check_send(side, state: State, event: ev.Event) -> None:
    spec = server_spec if side is SERVER else client_spec
    conn = conn_in(side, state)
    expected = spec(state, event)  # None too for frames of the other direction
    if expected is not None:
        assert conn.send(event) == codec.encode(event)
        assert conn.state is expected
        counted = side is CLIENT and type(event) is ev.Message
        assert conn.msg_seq == (1 if counted else 0)
    else:
        with pytest.raises(LocalProtocolError, match=f"cannot send {type(event).__name__} in state {state.name}"):
            conn.send(event)
        assert conn.state is state
        assert conn.msg_seq == 0


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(State), st.sampled_from(SERVER_EVENTS + CLIENT_EVENTS))
def test_server_sends(state, event):
    check_send(SERVER, state, event)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(State), st.sampled_from(CLIENT_EVENTS + SERVER_EVENTS))
def test_client_sends(state, event):
    check_send(CLIENT, state, event)


def test_send_every_pair():
    for state in State:
        for event in CLIENT_EVENTS + SERVER_EVENTS:
            check_send(SERVER, state, event)
            check_send(CLIENT, state, event)


def test_nothing_crosses_the_wrong_way():
    """A client frame the server may not send, and the other way round."""
    for state in State:
        for event in CLIENT_EVENTS:
            if type(event) not in (ev.Ping, ev.Pong):
                with pytest.raises(LocalProtocolError):
                    conn_in(SERVER, state).send(event)
        for event in SERVER_EVENTS:
            if type(event) not in (ev.Ping, ev.Pong):
                with pytest.raises(LocalProtocolError):
                    conn_in(CLIENT, state).send(event)


# --- scenarios ----------------------------------------------------------------------


def receive(conn: Connection, data: bytes) -> list[ev.Event]:
    conn.receive_data(data)
    out = []
    for _ in range(1000):
        event = conn.next_event()
        if event is ev.NEED_DATA:
            return out
        out.append(event)
        if type(event) is ev.ConnectionClosed:  # it would repeat forever
            return out
    raise AssertionError("next_event() never returned NEED_DATA")


def test_login_socket_server_side():
    conn = Connection(SERVER)
    assert conn.state is S.FRESH
    assert conn.send(ev.Hello(1, "selchat/0.1.0")) == b"HELLO 1 selchat/0.1.0\n"
    assert conn.state is S.FRESH
    assert receive(conn, b"LOGIN alice wrong pw\n") == [ev.Login("alice", "wrong pw")]
    assert conn.state is S.AUTHENTICATING
    # a second LOGIN while the first is being checked is refused
    assert receive(conn, b"LOGIN alice pw\n") == [
        ev.BadFrame(ev.Error("LOGIN", "wrong-socket", "LOGIN is not valid here: wait for the login reply"))
    ]
    assert conn.state is S.AUTHENTICATING
    assert conn.send(ev.Error("LOGIN", "auth-failed", "wrong password")) == b"ERR LOGIN auth-failed wrong password\n"
    assert conn.state is S.FRESH  # try again
    assert receive(conn, b"REGISTER alice pw\n") == [ev.Register("alice", "pw")]
    assert conn.state is S.AUTHENTICATING
    assert conn.send(ev.Welcome("alice", "c1", "k1")) == b"WELCOME alice c1 k1\n"
    assert conn.state is S.LOGIN
    # the login socket only receives
    assert receive(conn, b"WHO\n") == [
        ev.BadFrame(
            ev.Error(
                "WHO", "wrong-socket",
                "WHO is not valid here: the login socket only receives; send commands on the chat socket",
            )
        )
    ]
    assert conn.send(ev.Ready("alice")) == b"READY alice\n"
    assert conn.send(ev.Incoming("bob", "hi")) == b"MSG bob hi\n"
    with pytest.raises(LocalProtocolError):
        conn.send(ev.Ok("WHO", "1"))
    assert conn.state is S.LOGIN
    assert conn.send(ev.Bye("exit", "bye")) == b"BYE exit bye\n"
    assert conn.state is S.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(ev.Bye("exit", "bye"))


def test_login_socket_client_side():
    conn = Connection(CLIENT)
    assert receive(conn, b"HELLO 1 selchat/0.1.0\n") == [ev.Hello(1, "selchat/0.1.0")]
    assert conn.send(ev.Login("alice", "pw")) == b"LOGIN alice pw\n"
    assert conn.state is S.AUTHENTICATING
    with pytest.raises(LocalProtocolError):
        conn.send(ev.Login("alice", "pw"))
    assert receive(conn, b"ERR LOGIN auth-failed wrong password\r\n") == [
        ev.Error("LOGIN", "auth-failed", "wrong password")
    ]
    assert conn.state is S.FRESH
    conn.send(ev.Login("alice", "pw"))
    assert receive(conn, b"WELCOME alice c1 k1\n") == [ev.Welcome("alice", "c1", "k1")]
    assert conn.state is S.LOGIN
    assert receive(conn, b"READY alice\nREQUEST bob\nSHUTDOWN\n") == [
        ev.Ready("alice"), ev.Request("bob"), ev.Shutdown(""),
    ]
    assert conn.state is S.LOGIN
    assert receive(conn, b"BYE shutdown server stopping\n") == [ev.Bye("shutdown", "server stopping")]
    assert conn.state is S.CLOSED


def test_motd_and_notice_only_on_a_logged_in_login_socket():
    """The client takes MOTD and NOTICE after WELCOME (READY or not) on the
    login socket, and refuses them anywhere else, as the server may not send them."""
    conn = Connection(CLIENT)
    receive(conn, b"HELLO 1 selchat/0.1.0\n")
    for line, verb in ((b"MOTD hi", "MOTD"), (b"NOTICE hi", "NOTICE")):
        assert receive(conn, line + b"\n") == [
            ev.BadFrame(ev.Error(verb, "wrong-socket", f"{verb} is not valid here: log in or attach first"))
        ]
    conn.send(ev.Login("alice", "pw"))
    assert receive(conn, b"NOTICE early\n") == [
        ev.BadFrame(ev.Error("NOTICE", "wrong-socket", "NOTICE is not valid here: wait for the login reply"))
    ]
    assert receive(conn, b"WELCOME alice c k\nNOTICE before ready\nREADY alice\nMOTD Welcome!\nMOTD\n"
                         b"MOTD  be nice\nNOTICE going down at 6\n") == [
        ev.Welcome("alice", "c", "k"), ev.Notice("before ready"), ev.Ready("alice"),
        ev.Motd("Welcome!"), ev.Motd(""), ev.Motd(" be nice"), ev.Notice("going down at 6"),
    ]
    assert conn.state is S.LOGIN
    for state in (S.CHAT, S.CHECK):
        other = conn_in(CLIENT, state)
        where = WHERE[state]
        assert receive(other, b"MOTD x\nNOTICE y\n") == [
            ev.BadFrame(ev.Error("MOTD", "wrong-socket", f"MOTD is not valid here: {where}")),
            ev.BadFrame(ev.Error("NOTICE", "wrong-socket", f"NOTICE is not valid here: {where}")),
        ]
        with pytest.raises(LocalProtocolError):
            conn_in(SERVER, state).send(ev.Notice("x"))
    server = conn_in(SERVER, S.LOGIN)
    assert server.send(ev.Motd("")) == b"MOTD\n" and server.send(ev.Notice("hi")) == b"NOTICE hi\n"
    assert server.state is S.LOGIN
    with pytest.raises(LocalProtocolError):
        conn_in(CLIENT, S.LOGIN).send(ev.Notice("x"))  # server -> client only


@pytest.mark.parametrize("role, state", [(CHAT, S.CHAT), (CHECK, S.CHECK)])
def test_attach(role, state):
    server = Connection(SERVER)
    assert receive(server, f"ATTACH {role.value} tok\n".encode()) == [ev.Attach(role, "tok")]
    assert server.state is S.ATTACHING
    assert server.send(ev.Attached(role)) == f"OK ATTACH {role.value}\n".encode()
    assert server.state is state

    client = Connection(CLIENT)
    assert client.send(ev.Attach(role, "tok")) == f"ATTACH {role.value} tok\n".encode()
    assert client.state is S.ATTACHING
    assert receive(client, f"OK ATTACH {role.value}\n".encode()) == [ev.Attached(role)]
    assert client.state is state


def test_attach_refused_closes():
    server = Connection(SERVER)
    receive(server, b"ATTACH CHAT bad\n")
    server.send(ev.Error("ATTACH", "bad-token", "unknown token"))
    assert server.state is S.CLOSED
    client = Connection(CLIENT)
    client.send(ev.Attach(CHAT, "bad"))
    assert receive(client, b"ERR ATTACH bad-token unknown token\n") == [ev.Error("ATTACH", "bad-token", "unknown token")]
    assert client.state is S.CLOSED


def test_chat_socket():
    server = conn_in(SERVER, S.CHAT)
    assert receive(server, b"WHO\nMSG hi\nPING x\n") == [
        ev.Who(),
        ev.Message("hi"),
        ev.BadFrame(ev.Error("PING", "wrong-socket", "PING is not valid here: this is the chat socket")),
    ]
    assert server.msg_seq == 1
    assert server.send(ev.UserEntry("bob", "idle")) == b"USER bob idle\n"
    assert server.send(ev.Ok("WHO", "1")) == b"OK WHO 1\n"
    assert server.send(ev.Nack(1, "not-in-chat", "no chat")) == b"NACK 1 not-in-chat no chat\n"
    assert server.state is S.CHAT
    with pytest.raises(LocalProtocolError):
        server.send(ev.Incoming("bob", "hi"))  # relayed on the login socket, not here
    assert server.state is S.CHAT


def test_check_socket():
    server = conn_in(SERVER, S.CHECK)
    assert receive(server, b"PING 5\nPONG 1\nWHO\n") == [
        ev.Ping("5"),
        ev.Pong("1"),
        ev.BadFrame(
            ev.Error("WHO", "wrong-socket", "WHO is not valid here: the check socket only carries PING, PONG and ACK")
        ),
    ]
    assert server.send(ev.Ping("5").response()) == b"PONG 5\n"
    assert server.send(ev.Ping("2")) == b"PING 2\n"
    assert server.state is S.CHECK


@pytest.mark.parametrize("state", [s for s in State if s is not S.CLOSED])
def test_bye_from_any_state_closes(state):
    server = conn_in(SERVER, state)
    assert server.send(ev.Bye("shutdown", "server stopping")) == b"BYE shutdown server stopping\n"
    assert server.state is S.CLOSED
    client = conn_in(CLIENT, state)
    assert receive(client, b"BYE shutdown server stopping\n") == [ev.Bye("shutdown", "server stopping")]
    assert client.state is S.CLOSED
    # and nothing more may be sent or received
    with pytest.raises(LocalProtocolError):
        server.send(ev.Bye("shutdown", "again"))
    assert receive(client, b"PING 1\n") == [
        ev.BadFrame(ev.Error("PING", "wrong-socket", "PING is not valid here: the socket is closed"))
    ]


@pytest.mark.parametrize("state", [s for s in State if s is not S.CLOSED])
def test_shutdown_keeps_the_state(state):
    server = conn_in(SERVER, state)
    assert server.send(ev.Shutdown("soon")) == b"SHUTDOWN soon\n"
    assert server.state is state


@pytest.mark.parametrize("state", list(State))
def test_eof_closes_from_any_state(state):
    conn = conn_in(SERVER, state)
    assert receive(conn, b"") == [ev.ConnectionClosed()]
    assert conn.state is S.CLOSED


@pytest.mark.parametrize("data", ["", "1", "hello world", " spaced "])
def test_ping_response(data):
    ping = ev.Ping(data)
    pong = ping.response()
    assert type(pong) is ev.Pong
    assert pong == ev.Pong(data)
    assert pong.data == data
    # and it survives the wire, both ways
    server = conn_in(SERVER, S.CHECK)
    client = conn_in(CLIENT, S.CHECK)
    assert receive(server, client.send(ping)) == [ping]
    assert receive(client, server.send(server_ping := ev.Ping(data))) == [server_ping]
    assert receive(client, server.send(ping.response())) == [pong]
    assert receive(server, client.send(server_ping.response())) == [pong]


def test_err_version_is_not_the_answer_to_the_login_pipelined_behind_it():
    conn = Connection(CLIENT)
    conn.send(ev.Version(2))
    conn.send(ev.Login("alice", "pw"))
    assert conn.state is S.AUTHENTICATING
    assert receive(conn, b"ERR VERSION unsupported this server speaks version 1\n") == [
        ev.Error("VERSION", "unsupported", "this server speaks version 1")]
    assert conn.state is S.AUTHENTICATING  # still waiting for the LOGIN's answer
    assert receive(conn, b"WELCOME alice c k\n") == [ev.Welcome("alice", "c", "k")]
    assert conn.state is S.LOGIN
