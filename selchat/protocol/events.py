"""The events of the selchat wire protocol.

Every frame on the wire is one event. Events are small frozen dataclasses; the
codec (``codec.py``) turns them into bytes and back, and the per-socket state
machine (``state.py``) says which of them may cross a socket in which state.

Events that expect an answer can build it (``Ping.response()``), but the
protocol core never answers by itself: the caller decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: The highest protocol version this code speaks (announced in HELLO).
#: Version 1 is what a client gets unless it sends ``VERSION 2`` first.
PROTOCOL_VERSION = 2

#: Version 2 acknowledgements are batched both ways (docs/protocol.md): a
#: client sends ``ACK`` within ``ACK_DELAY`` seconds of the first event it has
#: not acknowledged, but not before about ``ACK_SPACING`` after its previous
#: timed ACK (drawn: see ``ClientSession.ack_now``), or at once when
#: ``ACK_EVERY`` are waiting; the server sends ``RECEIVED`` within
#: ``RECEIVED_DELAY`` seconds of a read that brought chat messages, but not
#: before about ``RECEIVED_SPACING`` after its previous one (drawn too).
#: One frame per batch instead of per read keeps a relayed message's cost near
#: version 1's; the spacing keeps a stream's receipts to about one a second
#: while a message after a quiet spell is acknowledged in a quarter of one
#: (docs/performance.md).
ACK_DELAY = 0.25
ACK_SPACING = 1.0
ACK_EVERY = 256
RECEIVED_DELAY = 0.5
RECEIVED_SPACING = 2.0


def ack_rest(delay: float, draw: float) -> float:
    """The rest after a timed ACK sent ``delay`` after its first event, for
    ``draw`` in [0, 1): half to one and a half times ``ACK_SPACING - delay``,
    so that clients that started together fall out of step."""
    return (ACK_SPACING - delay) * (0.5 + draw)


#: The last ``ACK_GRACE`` seconds of ``ACK_DELAY`` the client waits for a
#: chat message of its own to carry its ``ACK`` (on the chat socket, in the
#: same write) before it sends it alone on the check socket.
ACK_GRACE = 0.05


class Role(enum.Enum):
    """The job a socket does once it has identified itself."""

    LOGIN = "LOGIN"
    CHAT = "CHAT"
    CHECK = "CHECK"


class Event:
    """Base class of every protocol event."""

    __slots__ = ()


# --- Frames the client sends -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Login(Event):
    user: str
    password: str


@dataclass(frozen=True, slots=True)
class Register(Event):
    user: str
    password: str


@dataclass(frozen=True, slots=True)
class Version(Event):
    """``VERSION <n>``: speak protocol ``n`` on this session (login socket, before logging in)."""

    version: int


@dataclass(frozen=True, slots=True)
class Resume(Event):
    """``RESUME <token> <last-id> [<messages>]``: take a detached session back
    (v2), without a password: ``last_id`` is the id of the last login-socket
    event received, ``messages`` how many chat messages (``MSG`` events) the
    session's client has received in all (-1: not said). A cluster node that
    moves the session from a dead node replays only the messages after those."""

    token: str
    last_id: int
    messages: int = -1


@dataclass(frozen=True, slots=True)
class Ack(Event):
    """``ACK <id>`` on the check socket, or on the chat socket ahead of a
    chat message (v2): every login-socket event up to ``id`` has been
    received (cumulative)."""

    id: int


@dataclass(frozen=True, slots=True)
class Attach(Event):
    role: Role  # CHAT or CHECK
    token: str


@dataclass(frozen=True, slots=True)
class ChatRequest(Event):
    user: str


@dataclass(frozen=True, slots=True)
class Accept(Event):
    pass


@dataclass(frozen=True, slots=True)
class Decline(Event):
    pass


@dataclass(frozen=True, slots=True)
class Quit(Event):
    pass


@dataclass(frozen=True, slots=True)
class Exit(Event):
    pass


@dataclass(frozen=True, slots=True)
class Who(Event):
    pass


@dataclass(frozen=True, slots=True)
class Help(Event):
    pass


@dataclass(frozen=True, slots=True)
class Block(Event):
    """``BLOCK <user>`` (chat socket): ``user``'s chat requests are declined
    for you from now on, and a chat or request with them ends."""

    user: str


@dataclass(frozen=True, slots=True)
class Unblock(Event):
    user: str


@dataclass(frozen=True, slots=True)
class Blocks(Event):
    """``BLOCKS``: the users you have blocked (``USER <name> blocked`` each,
    then ``OK BLOCKS <count>``)."""


@dataclass(frozen=True, slots=True)
class Password(Event):
    """``PASSWORD <old> <new>`` (chat socket): change your password; ``old``
    is the one you have now (docs/protocol.md, "Changing your password")."""

    old: str
    new: str

    def __repr__(self) -> str:  # never in a log or a test report
        return "Password(old=..., new=...)"


@dataclass(frozen=True, slots=True)
class Unregister(Event):
    """``UNREGISTER <password>`` (chat socket): delete your account, if
    ``password`` is its password; the session then ends."""

    password: str

    def __repr__(self) -> str:  # never in a log or a test report
        return "Unregister(password=...)"


@dataclass(frozen=True, slots=True)
class Message(Event):
    """A chat line from the client; relayed to the partner as ``Incoming``."""

    text: str


# --- Heartbeats: either side may send them on the check socket ---------------


@dataclass(frozen=True, slots=True)
class Ping(Event):
    data: str = ""

    def response(self) -> "Pong":
        return Pong(self.data)


@dataclass(frozen=True, slots=True)
class Pong(Event):
    data: str = ""


# --- Frames the server sends -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """The greeting on every accepted socket."""

    version: int
    software: str


@dataclass(frozen=True, slots=True)
class Welcome(Event):
    """Login succeeded; the tokens attach the chat and check sockets."""

    user: str
    chat_token: str
    check_token: str
    resume_token: str = ""  # v2 only: RESUME takes the session back with it


@dataclass(frozen=True, slots=True)
class Resumed(Event):
    """``RESUMED <user> <accepted> <last-id> <chat-token> <check-token>``: the
    session is back (v2). The server has every chat message up to seq
    ``accepted``; the events after ``last_id`` follow, numbered from
    ``last_id + 1``. The tokens attach new chat and check sockets."""

    user: str
    accepted: int
    last_id: int
    chat_token: str
    check_token: str


@dataclass(frozen=True, slots=True)
class Unresumed(Event):
    """``UNRESUMED <accepted> <reason> <text>``: the session cannot be resumed
    (its resume window ended), but the server still knows how far it got: it
    had every chat message up to seq ``accepted``. The fates of messages not
    yet reported (DELIVERED, UNDELIVERED) follow, then BYE."""

    accepted: int
    reason: str
    text: str


@dataclass(frozen=True, slots=True)
class Attached(Event):
    """``OK ATTACH <role>``: the socket now does that role."""

    role: Role


@dataclass(frozen=True, slots=True)
class Ready(Event):
    """All three sockets are attached: the user is online."""

    user: str


@dataclass(frozen=True, slots=True)
class Ok(Event):
    """A command succeeded. ``info`` is command-specific (may be empty)."""

    verb: str
    info: str = ""


@dataclass(frozen=True, slots=True)
class Error(Event):
    """A command or frame was refused; nothing changed.

    ``verb`` is the verb of the refused frame (``-`` when it had none);
    ``code`` is a stable kebab-case word for programs, ``text`` is for people.
    """

    verb: str
    code: str
    text: str


@dataclass(frozen=True, slots=True)
class UserEntry(Event):
    """One line of a ``WHO`` answer (followed by ``OK WHO <count>``)."""

    user: str
    status: str  # "idle" or "busy"


@dataclass(frozen=True, slots=True)
class Request(Event):
    """``user`` asks you for a chat: answer ACCEPT or DECLINE."""

    user: str


@dataclass(frozen=True, slots=True)
class Started(Event):
    user: str


@dataclass(frozen=True, slots=True)
class Declined(Event):
    user: str


@dataclass(frozen=True, slots=True)
class Expired(Event):
    user: str


@dataclass(frozen=True, slots=True)
class Cancelled(Event):
    """A pending request went away because one side left."""

    user: str


@dataclass(frozen=True, slots=True)
class Ended(Event):
    """The chat with ``user`` is over. ``reason``: quit, left, dropped, shutdown."""

    user: str
    reason: str
    text: str


@dataclass(frozen=True, slots=True)
class Incoming(Event):
    """``MSG <user> <text>``: your partner said something."""

    user: str
    text: str


@dataclass(frozen=True, slots=True)
class Nack(Event):
    """Your ``seq``-th MSG on this chat socket was not delivered."""

    seq: int
    code: str
    text: str


@dataclass(frozen=True, slots=True)
class Received(Event):
    """``RECEIVED <seq>`` on the chat socket (v2): the server has every chat
    message up to ``seq``; each one will get a fate on the login socket."""

    seq: int


@dataclass(frozen=True, slots=True)
class Delivered(Event):
    """``DELIVERED <first> <last>`` (v2): your messages ``first``..``last`` that
    had no fate yet reached your partner's client (it acknowledged them)."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Undelivered(Event):
    """``UNDELIVERED <first> <last> <code> <text>`` (v2): your messages
    ``first``..``last`` that had no fate yet were not delivered, and never will be."""

    first: int
    last: int
    code: str
    text: str


@dataclass(frozen=True, slots=True)
class Away(Event):
    """``AWAY <user>`` (v2): your partner lost its connection; the chat stays
    up while it reconnects; your messages are held for it."""

    user: str


@dataclass(frozen=True, slots=True)
class Back(Event):
    """``BACK <user>`` (v2): your partner is back; held messages follow it."""

    user: str


@dataclass(frozen=True, slots=True)
class Shutdown(Event):
    text: str


@dataclass(frozen=True, slots=True)
class Notice(Event):
    """``NOTICE <text>``: a message from the server's operator to everyone
    online (``selchat admin broadcast``). Login socket, any time after WELCOME."""

    text: str


@dataclass(frozen=True, slots=True)
class Motd(Event):
    """``MOTD <text>``: one line of the message of the day, sent after READY.
    ``text`` may be empty: a blank line of the message."""

    text: str


@dataclass(frozen=True, slots=True)
class Bye(Event):
    """The last frame before the server closes the socket."""

    reason: str
    text: str


# --- Pseudo-events produced by the receiving side, never sent ----------------


@dataclass(frozen=True, slots=True)
class BadFrame(Event):
    """The peer sent something invalid here.

    ``reply`` is the frame to send back (``Error``, ``Nack`` or ``Bye``).
    When ``fatal`` is set the connection cannot continue: send the reply and close.
    """

    reply: Event
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side (EOF)."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by ``Connection.next_event()`` when no complete frame is buffered."""
