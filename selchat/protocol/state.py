"""The per-socket state machine, as two tables.

A socket starts FRESH. Its first frame decides its role: LOGIN/REGISTER make it
a login socket (AUTHENTICATING until the server answers), ATTACH makes it a
chat or check socket (ATTACHING until the server answers). The tables say, for
each state, which frames may cross the socket and the state that follows. A
frame missing from the table is a protocol error: it is refused and changes
nothing. Both sides run the same tables; the server checks what it receives
against CLIENT_FRAMES and what it sends against SERVER_FRAMES, the client the
other way round.
"""

from __future__ import annotations

import enum

from selchat.protocol import events as ev


class State(enum.Enum):
    FRESH = "fresh"                    # accepted, role not known yet
    AUTHENTICATING = "authenticating"  # LOGIN/REGISTER sent, waiting for WELCOME or ERR
    ATTACHING = "attaching"            # ATTACH sent, waiting for OK ATTACH or ERR
    LOGIN = "login"                    # authenticated login socket: server -> user events
    CHAT = "chat"                      # attached chat socket: commands and messages
    CHECK = "check"                    # attached check socket: heartbeats
    CLOSED = "closed"


S = State

_COMMANDS = (ev.ChatRequest, ev.Accept, ev.Decline, ev.Quit, ev.Exit, ev.Who, ev.Help, ev.Password,
             ev.Unregister, ev.Block, ev.Unblock, ev.Blocks, ev.Message)

#: Frames a client may send: state -> {event type: next state}.
CLIENT_FRAMES: dict[State, dict[type, State]] = {
    S.FRESH: {
        ev.Version: S.FRESH, ev.Login: S.AUTHENTICATING, ev.Register: S.AUTHENTICATING,
        ev.Resume: S.AUTHENTICATING, ev.Attach: S.ATTACHING,
        ev.Help: S.FRESH,  # what to send first (the unknown-command error points here)
    },
    S.AUTHENTICATING: {},
    S.ATTACHING: {},
    S.LOGIN: {},
    S.CHAT: {t: S.CHAT for t in (*_COMMANDS, ev.Ack)},  # ACK: v2, riding with a MSG
    S.CHECK: {ev.Ping: S.CHECK, ev.Pong: S.CHECK, ev.Ack: S.CHECK},
    S.CLOSED: {},
}

_USER_EVENTS = (
    ev.Ready, ev.Request, ev.Started, ev.Declined, ev.Expired, ev.Cancelled,
    ev.Ended, ev.Incoming, ev.Error, ev.Shutdown, ev.Notice, ev.Motd,
    ev.Delivered, ev.Undelivered, ev.Away, ev.Back,  # version 2
)
_ANY_TIME = {ev.Bye: S.CLOSED, ev.Shutdown: None}  # None: stay in the current state


def _with_any_time(state: State, table: dict[type, State | None]) -> dict[type, State]:
    merged = {**{t: state if nxt is None else nxt for t, nxt in _ANY_TIME.items()}, **table}
    return merged


#: Frames the server may send: state -> {event type: next state}.
#: ``Attached`` is special: it leads to CHAT or CHECK by its role (see ``next_state``).
SERVER_FRAMES: dict[State, dict[type, State]] = {
    # OK VERSION answers VERSION: the server sends it in FRESH; a client that
    # sent LOGIN right behind its VERSION reads it in AUTHENTICATING.
    S.FRESH: _with_any_time(S.FRESH, {ev.Hello: S.FRESH, ev.Error: S.FRESH, ev.Ok: S.FRESH}),
    S.AUTHENTICATING: _with_any_time(
        S.AUTHENTICATING,
        {ev.Hello: S.AUTHENTICATING, ev.Ok: S.AUTHENTICATING, ev.Welcome: S.LOGIN, ev.Resumed: S.LOGIN,
         ev.Unresumed: S.LOGIN, ev.Error: S.FRESH},
    ),
    S.ATTACHING: _with_any_time(
        S.ATTACHING, {ev.Hello: S.ATTACHING, ev.Attached: S.CHAT, ev.Error: S.CLOSED}
    ),
    S.LOGIN: _with_any_time(S.LOGIN, {t: S.LOGIN for t in _USER_EVENTS}),
    S.CHAT: _with_any_time(
        S.CHAT, {ev.Ok: S.CHAT, ev.Error: S.CHAT, ev.UserEntry: S.CHAT, ev.Nack: S.CHAT, ev.Received: S.CHAT}
    ),
    S.CHECK: _with_any_time(S.CHECK, {ev.Ping: S.CHECK, ev.Pong: S.CHECK, ev.Error: S.CHECK}),
    S.CLOSED: {},
}


def next_state(table: dict[State, dict[type, State]], state: State, event: ev.Event) -> State | None:
    """The state after ``event`` crosses a socket in ``state``, or None if it may not."""
    nxt = table[state].get(type(event))
    if nxt is S.CHAT and type(event) is ev.Attached:
        return S.CHAT if event.role is ev.Role.CHAT else S.CHECK
    if nxt is not None and type(event) is ev.Error and event.verb == "VERSION":
        # The answer to VERSION, not to the LOGIN that may follow it at once:
        # the socket stays where it is (FRESH, or AUTHENTICATING behind it).
        return state
    return nxt
