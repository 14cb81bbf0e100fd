"""Presence, chat requests and chats: the server's policy, with no I/O.

The hub works on session objects that have ``name``, ``key`` (lower-cased
name), ``partner``, ``request``, ``busy`` and ``deliver(event)``. It tells users
things through ``deliver`` and returns the reply to each command; it never
touches a socket, so the tests drive it with plain objects and a fake clock.
"""

from __future__ import annotations

import random
from typing import Callable

from selchat.protocol import events as ev
from selchat.server.session import PendingRequest

COMMANDS_HELP = (
    "CHAT <user> | ACCEPT | DECLINE | QUIT | EXIT | WHO | HELP | MSG <text> | PASSWORD <old> <new>"
    " | BLOCK <user> | UNBLOCK <user> | BLOCKS | UNREGISTER <password>"
    " (commands on the chat socket; see docs/protocol.md)"
)


#: A request to a user who has blocked the asker is declined after a part of
#: the request timeout drawn at random (at most this many seconds), as a
#: person might take to say no; not at once, which would give the block away.
QUIET_DECLINE_MAX = 20.0


def quiet_delay(request_timeout: float, draw: float) -> float:
    """When a blocked request is declined, for ``draw`` in [0, 1): a quarter
    to three quarters of the request timeout (of ``QUIET_DECLINE_MAX`` if
    that is shorter)."""
    return (0.25 + 0.5 * draw) * min(request_timeout, QUIET_DECLINE_MAX)


class Hub:
    def __init__(self, call_later: Callable, request_timeout: float, draw: Callable[[], float] = random.random):
        self.call_later = call_later
        self.request_timeout = request_timeout
        self.draw = draw
        self.online: dict[str, object] = {}  # key -> session
        self.quiet: dict[object, list] = {}  # target session -> quiet requests to it (from users it blocked)

    # -- presence -----------------------------------------------------------------

    def join(self, session) -> None:
        self.online[session.key] = session

    def leave(self, session, reason: str, text: str) -> None:
        """The session is going away: end its chat or request, tell the other side."""
        if self.online.get(session.key) is session:
            del self.online[session.key]
        if session.request is not None:
            req = session.request
            self._clear_request(req)
            if not req.quiet:
                req.other(session).deliver(ev.Cancelled(session.name))
        for req in self.quiet.pop(session, ()):  # as a request to it would be: cancelled
            if req.source.request is req:
                self._clear_request(req)
                req.source.deliver(ev.Cancelled(session.name))
        if session.partner is not None:
            partner = session.partner
            session.partner = partner.partner = None
            partner.deliver(ev.Ended(session.name, reason, text))

    def end_all(self, reason: str, text: str) -> None:
        """End every chat and request at once, telling both sides the same
        (the server is shutting down: nobody is to blame)."""
        for session in list(self.online.values()):
            partner = session.partner
            if partner is not None:
                session.partner = partner.partner = None
                session.deliver(ev.Ended(partner.name, reason, text))
                partner.deliver(ev.Ended(session.name, reason, text))
            req = session.request
            if req is not None:
                self._clear_request(req)
                req.source.deliver(ev.Expired(req.target.name))
                if not req.quiet:
                    req.target.deliver(ev.Expired(req.source.name))

    def who(self) -> list:
        sessions = sorted(self.online.values(), key=lambda s: s.key)
        entries = [ev.UserEntry(s.name, "busy" if s.busy else "idle") for s in sessions]
        return entries + [ev.Ok("WHO", str(len(entries)))]

    # -- chat requests ------------------------------------------------------------

    def chat(self, session, name: str, blocked: bool = False):
        """Ask ``name`` for a chat. Returns the reply, or None when ``name`` is not
        online (the caller then finds out whether the account exists at all).
        If ``name`` has blocked the asker (``blocked``), the request is a
        quiet one: to the asker it is pending as any other, but ``name``
        hears nothing of it, and it is declined after ``quiet_delay``."""
        key = name.lower()
        if key == session.key:
            return ev.Error("CHAT", "self", "you cannot chat with yourself")
        if session.partner is not None:
            return ev.Error("CHAT", "in-chat", f"you are already chatting with {session.partner.name}; QUIT first")
        if session.request is not None:
            other = session.request.other(session)
            return ev.Error("CHAT", "pending", f"you already have a pending chat request with {other.name}")
        target = self.online.get(key)
        if target is None:
            return None
        if target.busy:
            return ev.Error("CHAT", "busy", f"{target.name} is busy")
        if blocked:
            req = session.request = PendingRequest(session, target, quiet=True)
            req.timer = self.call_later(quiet_delay(self.request_timeout, self.draw()), self._expire, req)
            self.quiet.setdefault(target, []).append(req)
            return ev.Ok("CHAT", target.name)
        req = PendingRequest(session, target)
        req.timer = self.call_later(self.request_timeout, self._expire, req)
        session.request = target.request = req
        target.deliver(ev.Request(session.name))
        return ev.Ok("CHAT", target.name)

    def accept(self, session):
        req = session.request
        if req is None or req.target is not session:
            return ev.Error("ACCEPT", "no-request", "no chat request to answer")
        self._clear_request(req)
        source = req.source
        session.partner, source.partner = source, session
        source.deliver(ev.Started(session.name))
        session.deliver(ev.Started(source.name))
        return ev.Ok("ACCEPT", source.name)

    def decline(self, session):
        req = session.request
        if req is None or req.target is not session:
            return ev.Error("DECLINE", "no-request", "no chat request to answer")
        self._clear_request(req)
        req.source.deliver(ev.Declined(session.name))
        return ev.Ok("DECLINE", req.source.name)

    def quit(self, session):
        partner = session.partner
        if partner is not None:
            session.partner = partner.partner = None
            partner.deliver(ev.Ended(session.name, "quit", f"{session.name} ended the chat"))
            session.deliver(ev.Ended(partner.name, "quit", "you ended the chat"))
            return ev.Ok("QUIT", partner.name)
        req = session.request
        if req is not None and req.source is session:
            self._clear_request(req)
            if not req.quiet:
                req.target.deliver(ev.Cancelled(session.name))
            return ev.Ok("QUIT", req.target.name)
        return ev.Error("QUIT", "not-in-chat", "you are not in a chat")

    def part(self, session, key: str) -> None:
        """``session`` has blocked the user ``key``: end its chat with them,
        decline their request or withdraw its own, as QUIT and DECLINE would
        (their replies unsent: the BLOCK has its own)."""
        partner = session.partner
        req = session.request
        if partner is not None and partner.key == key:
            self.quit(session)
        elif req is not None and req.other(session).key == key:
            (self.decline if req.target is session else self.quit)(session)

    def _expire(self, req: PendingRequest) -> None:
        if req.source.request is not req:
            return  # answered or withdrawn meanwhile
        self._clear_request(req)
        if req.quiet:  # the "no" of a user who blocked the asker
            req.source.deliver(ev.Declined(req.target.name))
            return
        req.source.deliver(ev.Expired(req.target.name))
        req.target.deliver(ev.Expired(req.source.name))

    def _clear_request(self, req: PendingRequest) -> None:
        if req.timer is not None:
            req.timer.cancel()
        req.source.request = None
        if not req.quiet:
            req.target.request = None
            return
        waiting = self.quiet.get(req.target)  # a quiet request was never the target's own
        if waiting is not None and req in waiting:
            waiting.remove(req)
            if not waiting:
                del self.quiet[req.target]

    # -- messages -----------------------------------------------------------------

    def message(self, session, text: str, seq: int):
        """Relay a chat line; returns a Nack if it cannot be delivered, else None."""
        partner = session.partner
        if partner is None:
            return ev.Nack(seq, "not-in-chat", "you are not in a chat")
        partner.deliver(ev.Incoming(session.name, text), session, seq)
        return None
