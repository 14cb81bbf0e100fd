"""Presence, chat requests and chats for a node of a cluster.

The same commands and replies as ``selchat.server.hub.Hub``, but the state
is the cluster's, in Redis, and every change is one script (``scripts.py``)
that also tells the other nodes. So the commands answer later: each takes a
``done(reply)`` callback (the server stops reading that chat socket until
then, keeping replies in order). What stays local is what the relay needs at
once: each local session's ``partner``, a local ``Session`` or a
``RemoteUser``, set from the script's reply (for the one who acted) or from
the node's ``S``/``X`` messages (for the other).
"""

from __future__ import annotations

import random

from selchat.cluster.node import UNAVAILABLE, ClusterNode, RemoteUser, _s
from selchat.cluster.redislink import RedisError
from selchat.protocol import events as ev
from selchat.server.hub import Hub, quiet_delay


class ClusterHub:
    def __init__(self, node: ClusterNode, call_later, request_timeout: float, draw=random.random):
        self.node = node
        self.call_later = call_later
        self.request_timeout = request_timeout
        self.draw = draw
        self.online: dict[str, object] = {}  # key -> this node's sessions (metrics, admin, broadcast)

    # -- presence -----------------------------------------------------------------

    def join(self, session) -> None:
        self.online[session.key] = session

    def leave(self, session, reason: str, text: str) -> None:
        if self.online.get(session.key) is session:
            del self.online[session.key]
        self._unpair(session)
        self.node.eval("leave", session.key, session.epoch, reason, text)

    def _unpair(self, session) -> None:
        """Forget the local partner pointers now: the relay must stop at once;
        the other side hears ENDED from the script."""
        partner = session.partner
        session.partner = None
        if isinstance(partner, RemoteUser):
            self.node.forget(partner)
        elif partner is not None and partner.partner is session:
            partner.partner = None

    def let_go(self, session) -> None:
        """The session moved to another node: forget it here, without a word
        to the cluster (its record is the new node's)."""
        if self.online.get(session.key) is session:
            del self.online[session.key]
        self._unpair(session)

    def end_all(self, reason: str, text: str) -> None:
        """The node shuts down: pairs of this node hear ENDED from here (their
        node is going); the others hear it from the scripts as each session
        leaves."""
        here = self.node.node_id
        for session in list(self.online.values()):
            partner = session.partner
            if isinstance(partner, RemoteUser) and partner.node_id == here:
                other = self.online.get(partner.key)
                if other is not None and other.epoch == partner.epoch:
                    session.partner = other.partner = None
                    session.deliver(ev.Ended(other.name, reason, text))
                    other.deliver(ev.Ended(session.name, reason, text))

    def who(self, done) -> None:
        def reply(value) -> None:
            if isinstance(value, RedisError):
                done([ev.Error("WHO", "unavailable", UNAVAILABLE)])
                return
            pairs = sorted(((_s(value[i]), value[i + 1]) for i in range(0, len(value), 2)),
                           key=lambda p: p[0].lower())
            entries = [ev.UserEntry(name, "busy" if busy else "idle") for name, busy in pairs]
            done(entries + [ev.Ok("WHO", str(len(entries)))])

        self.node.eval("who", callback=reply)

    # -- chat requests ------------------------------------------------------------

    def chat(self, session, name: str, done, blocked: bool = False) -> None:
        """``done(reply)``, or ``done(None)`` when ``name`` is online nowhere.
        ``blocked``: ``name`` has blocked the asker (as ``Hub.chat``)."""
        key = name.lower()
        if key == session.key:
            done(ev.Error("CHAT", "self", "you cannot chat with yourself"))
            return

        def reply(value) -> None:
            if isinstance(value, RedisError):
                done(ev.Error("CHAT", "unavailable", UNAVAILABLE))
                return
            code, other = _s(value[0]), _s(value[1]) if len(value) > 1 else ""
            if code == "ok":
                self.call_later(self.request_timeout, self._expire, session.key, key, _s(value[2]))
                done(ev.Ok("CHAT", other))
            elif code == "quiet":  # to a user who blocked the asker: declined later, from here
                delay = quiet_delay(self.request_timeout, self.draw())
                self.call_later(delay, self._expire, session.key, key, _s(value[2]), "DECLINED")
                done(ev.Ok("CHAT", other))
            elif code == "offline":
                done(None)
            elif code == "busy":
                done(ev.Error("CHAT", "busy", f"{other} is busy"))
            elif code == "away":  # its node died; its client may resume it elsewhere
                done(ev.Error("CHAT", "busy", f"{other} is away (reconnecting)"))
            elif code == "in-chat":
                done(ev.Error("CHAT", "in-chat", f"you are already chatting with {other}; QUIT first"))
            elif code == "pending":
                done(ev.Error("CHAT", "pending", f"you already have a pending chat request with {other}"))
            else:
                done(ev.Error("CHAT", "unavailable", UNAVAILABLE))

        self.node.eval("request", session.key, session.epoch, key, "1" if blocked else "0", callback=reply)

    def _expire(self, source_key: str, target_key: str, request_id: str, verb: str = "EXPIRED") -> None:
        self.node.eval("expire", source_key, target_key, request_id, verb)

    def accept(self, session, done) -> None:
        def reply(value) -> None:
            code = _s(value[0]) if not isinstance(value, RedisError) else "unavailable"
            if code == "ok":
                name, pnode, pepoch, pv2, pkey = (_s(v) for v in value[1:6])
                session.partner = self.node.partner_for(pkey, name, pnode, pepoch, pv2 == "1")
                done(ev.Ok("ACCEPT", name))
            elif code == "no-request":
                done(ev.Error("ACCEPT", "no-request", "no chat request to answer"))
            else:
                done(ev.Error("ACCEPT", "unavailable", UNAVAILABLE))

        self.node.eval("accept", session.key, session.epoch, callback=reply)

    def decline(self, session, done, only: str = "") -> None:
        def reply(value) -> None:
            code = _s(value[0]) if not isinstance(value, RedisError) else "unavailable"
            if code == "ok":
                done(ev.Ok("DECLINE", _s(value[1])))
            elif code == "no-request":
                done(ev.Error("DECLINE", "no-request", "no chat request to answer"))
            else:
                done(ev.Error("DECLINE", "unavailable", UNAVAILABLE))

        self.node.eval("decline", session.key, session.epoch, only, callback=reply)

    def quit(self, session, done, only: str = "") -> None:
        def reply(value) -> None:
            code = _s(value[0]) if not isinstance(value, RedisError) else "unavailable"
            if code == "ok":
                self._unpair(session)
                done(ev.Ok("QUIT", _s(value[1])))
            elif code == "not-in-chat":
                done(ev.Error("QUIT", "not-in-chat", "you are not in a chat"))
            else:
                done(ev.Error("QUIT", "unavailable", UNAVAILABLE))

        self.node.eval("quit", session.key, session.epoch, f"{session.name} ended the chat", only, callback=reply)

    def part(self, session, key: str, done) -> None:
        """As ``Hub.part``: a chat or request with ``key`` ends (the scripts
        act only if it is with ``key``); then ``done()``."""
        def declined(reply) -> None:
            done()

        def quitted(reply) -> None:
            if type(reply) is ev.Ok:
                done()
            else:  # no chat or request of ours with them: perhaps theirs to us
                self.decline(session, declined, only=key)

        self.quit(session, quitted, only=key)

    # -- messages -----------------------------------------------------------------

    #: As on one server: the partner (a ``RemoteUser`` if on another node) delivers.
    message = Hub.message
