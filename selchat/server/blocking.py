"""A user's block list: BLOCK, UNBLOCK and BLOCKS, and the look-up every
chat request waits for.

The list is kept in the account store, so it outlives sessions and is the
same on every node of a cluster; each read or write runs on a worker thread
(``Accounts``) and the chat socket is not read meanwhile, so replies keep
their order. A request from a blocked user is answered for the user who
blocked them as a decline (``Hub.chat``): a *quiet* request, pending for
the asker only and declined after a random while, so that it looks like a
"no"; the one who blocked hears nothing and stays free.

May touch: the peer that sent the command (pause, resume, send), the account
store's non-blocking calls, the hub's ``part`` and the log events.
"""

from __future__ import annotations

import logging

from selchat.protocol import events as ev
from selchat.server import audit
from selchat.server.peer import WAITING
from selchat.server.session import Phase
from selchat.store.accounts import MAX_BLOCKS, TooManyBlocks

log = logging.getLogger("selchat.server")

#: The account store could not be read or written.
STORAGE = "the account store is unavailable; try again shortly"


class Blocking:
    def __init__(self, server):
        self.server = server

    def _ready(self, peer, verb: str):
        """The session, if this peer may use the block list now (else the ERR is sent)."""
        return self.server._online(peer, verb)

    def _consult(self, peer, session, verb: str, call, *args, answer) -> None:
        """``call(*args, done)``, one of the account store's non-blocking
        calls, with the socket paused until ``answer(result)`` has run on the
        loop. Not run if the session has ended meanwhile; ``ERR <verb>
        storage`` if the store failed."""
        peer.pause(WAITING)

        def done(future) -> None:
            peer.resume(WAITING)
            if peer.session is not session or session.phase is Phase.CLOSED:
                return
            try:
                result = future.result()
            except TooManyBlocks:
                peer.send(ev.Error(verb, "too-many", f"you have blocked {MAX_BLOCKS} users; unblock some first"))
                return
            except Exception as exc:
                log.warning("block list of %s: %s", session.name, exc)
                peer.send(ev.Error(verb, "storage", STORAGE))
                return
            answer(result)

        call(*args, done)

    def on_block(self, peer, event: ev.Block) -> None:
        session = self._ready(peer, "BLOCK")
        if session is None:
            return
        if event.user.lower() == session.key:
            peer.send(ev.Error("BLOCK", "self", "you cannot block yourself"))
            return

        def stored(name) -> None:
            if name is None:
                peer.send(ev.Error("BLOCK", "unknown-user", f"there is no user {event.user}"))
            else:
                self._part(peer, session, name)

        self._consult(peer, session, "BLOCK", self.server.accounts.block, session.name, event.user, answer=stored)

    def _part(self, peer, session, name: str) -> None:
        """End a chat or request with the user just blocked, then say OK."""
        hub = self.server.hub
        if self.server.cluster is None:
            hub.part(session, name.lower())
            peer.send(ev.Ok("BLOCK", name))
            return
        peer.pause(WAITING)

        def parted() -> None:
            peer.resume(WAITING)
            peer.send(ev.Ok("BLOCK", name))

        hub.part(session, name.lower(), parted)

    def on_unblock(self, peer, event: ev.Unblock) -> None:
        session = self._ready(peer, "UNBLOCK")
        if session is None:
            return

        def removed(name) -> None:
            if name is None:
                peer.send(ev.Error("UNBLOCK", "not-blocked", f"you have not blocked {event.user}"))
            else:
                peer.send(ev.Ok("UNBLOCK", name))

        self._consult(peer, session, "UNBLOCK", self.server.accounts.unblock, session.name, event.user,
                      answer=removed)

    def on_blocks(self, peer, event: ev.Blocks) -> None:
        session = self._ready(peer, "BLOCKS")
        if session is None:
            return

        def listed(names) -> None:
            for name in names:
                peer.send(ev.UserEntry(name, "blocked"))
            peer.send(ev.Ok("BLOCKS", str(len(names))))

        self._consult(peer, session, "BLOCKS", self.server.accounts.blocked_users, session.name, answer=listed)

    def check_request(self, peer, session, user: str, then) -> None:
        """Before ``CHAT user`` goes ahead: ``then(blocked)``, where
        ``blocked`` says whether ``user`` has blocked ``session``'s user.
        The socket is paused (WAITING) until ``then`` has run; a store that
        cannot answer refuses the request (a block must hold). A connection
        lost meanwhile takes the request with it."""
        def looked_up(blocked: bool) -> None:
            if session.chat is peer:
                if blocked:  # for an operator looking into harassment: who keeps asking whom
                    audit.emit("request-blocked", user=session.name, target=user, addr=peer.host)
                then(blocked)

        self._consult(peer, session, "CHAT", self.server.accounts.is_blocked, user, session.name, answer=looked_up)
