"""A user's session: three sockets, one account, at most one chat or request."""

from __future__ import annotations

import enum
import time


class Phase(enum.Enum):
    ATTACHING = "attaching"  # logged in; chat and check sockets not both attached yet
    ONLINE = "online"
    CLOSED = "closed"


class PendingRequest:
    """A chat request from ``source`` to ``target`` that nobody has answered yet."""

    __slots__ = ("source", "target", "timer")

    def __init__(self, source: "Session", target: "Session"):
        self.source = source
        self.target = target
        self.timer = None

    def other(self, session: "Session") -> "Session":
        return self.target if session is self.source else self.source


class Session:
    """Server-side state of one logged-in user.

    ``login``, ``chat`` and ``check`` are the ``Peer`` objects of the three
    sockets (None until attached). ``partner`` is the session being chatted
    with; ``request`` the pending request this user sent or received.
    """

    __slots__ = (
        "sid", "name", "name_bytes", "key", "phase", "login", "chat", "check", "tokens",
        "partner", "request", "requests", "attach_timer", "heartbeat", "awaiting_pong", "ping_seq",
        "since", "__weakref__",
    )

    def __init__(self, sid: int, name: str, tokens: dict):
        self.sid = sid
        self.name = name
        self.name_bytes = name.encode("ascii")  # user names are ASCII; used by the relay
        self.key = name.lower()
        self.phase = Phase.ATTACHING
        self.login = None
        self.chat = None
        self.check = None
        self.tokens = tokens  # Role -> secret still unused
        self.partner: Session | None = None
        self.request: PendingRequest | None = None
        self.requests = None  # token bucket for chat requests sent
        self.attach_timer = None
        self.heartbeat = None
        self.awaiting_pong = False
        self.ping_seq = 0
        self.since = time.time()  # wall clock of the login, for `selchat admin who`

    @property
    def busy(self) -> bool:
        return self.partner is not None or self.request is not None

    def notify(self, event) -> None:
        """Tell the user something: it goes out on the login socket."""
        login = self.login
        if login is not None:
            login.send(event)

    def peers(self):
        return [p for p in (self.login, self.chat, self.check) if p is not None]

    def __repr__(self) -> str:
        return f"<Session {self.sid} {self.name} {self.phase.name}>"
