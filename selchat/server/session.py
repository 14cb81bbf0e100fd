"""A user's session: three sockets, one account, at most one chat or request."""

from __future__ import annotations

import enum
import time

from selchat.protocol import codec
from selchat.protocol import events as ev
from selchat.protocol.state import State
from selchat.server.peer import PARTNER

#: Events a session that has ended still keeps for a late RESUME (its tombstone).
_FATES = (ev.Delivered, ev.Undelivered)
# The partner's connection lost, then back; and the chat's start and end, which forget it.
_PRESENCE = (ev.Away, ev.Back, ev.Started, ev.Ended)


class Phase(enum.Enum):
    ATTACHING = "attaching"  # logged in (or resumed); chat and check sockets not both attached yet
    ONLINE = "online"
    DETACHED = "detached"    # version 2: lost its connection; kept for RESUME until the window ends
    CLOSED = "closed"


class PendingRequest:
    """A chat request from ``source`` to ``target`` that nobody has answered yet.

    A ``quiet`` one is a request to a user who has blocked the source: only
    the source holds it (the target is not told, not busy, and answers
    nothing), and it ends, after a while, as declined."""

    __slots__ = ("source", "target", "timer", "quiet")

    def __init__(self, source: "Session", target: "Session", quiet: bool = False):
        self.source = source
        self.target = target
        self.timer = None
        self.quiet = quiet

    def other(self, session: "Session") -> "Session":
        return self.target if session is self.source else self.source


class Session:
    """Server-side state of one logged-in user.

    ``login``, ``chat`` and ``check`` are the ``Peer`` objects of the three
    sockets (None until attached). ``partner`` is the session being chatted
    with; ``request`` the pending request this user sent or received.

    Version 2 sessions (docs/protocol.md) also have an ``outbox``: every
    event for the login socket is numbered and kept there until the client
    acknowledges it, so that it can be replayed after a RESUME, and its chat
    messages get their fates from it. ``seq_base`` is the seq of the last
    chat message the server had from this session when its chat socket last
    went away (the new chat socket counts on from it). ``waiting`` are
    senders' chat sockets paused until the outbox has room again.
    """

    __slots__ = (
        "sid", "name", "name_bytes", "key", "phase", "login", "chat", "check", "tokens",
        "partner", "request", "requests", "attach_timer", "heartbeat", "awaiting_pong", "ping_seq",
        "since", "outbox", "resume_secret", "seq_base", "waiting", "resume_timer", "was_online", "fated",
        "epoch", "journal", "away",
        "__weakref__",
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
        self.outbox = None         # version 2 (and only then): selchat.server.outbox.Outbox
        self.resume_secret = ""    # version 2: the secret half of the resume token
        self.seq_base = 0
        self.waiting: list = []
        self.resume_timer = None   # version 2, while DETACHED: the end of the resume window
        self.was_online = False    # READY has been sent (a resumed session does not get it again)
        self.fated = 0             # version 2: the highest seq of ours a fate was sent for
        self.epoch = "0"           # cluster: the account's fencing counter when this session claimed it
        self.journal = None        # cluster, version 2: what Redis keeps of it (selchat.cluster.node.Journal)
        self.away = ""             # the partner this user was told is AWAY (lower case), until BACK or the chat's end

    @property
    def busy(self) -> bool:
        return self.partner is not None or self.request is not None

    @property
    def accepted(self) -> int:
        """The seq of the last chat message the server has from this session."""
        chat = self.chat
        return chat.conn.msg_seq if chat is not None else self.seq_base

    # -- delivery: the only two ways a user event reaches the login socket --------

    def deliver(self, event, sender: "Session | None" = None, seq: int = 0) -> None:
        """Tell the user something: it goes out on the login socket.

        ``sender`` and ``seq`` name the chat message an ``Incoming`` carries,
        so that its fate reaches its sender. A version 2 session numbers and
        keeps the event (also while detached: it is replayed on RESUME); an
        ended one keeps only fates, for a late RESUME to hear.
        """
        if type(event) in _PRESENCE and not self._presence(event):
            return
        outbox = self.outbox
        login = self.login
        if outbox is None:
            if type(event) in _FATES:
                self._version_1_fate(event)
                return
            if login is not None and login.conn.can_send(type(event)):
                login.send(event)
                if sender is not None and sender.outbox is not None:
                    sender.deliver(ev.Delivered(seq, seq))  # a version 1 client acknowledges nothing
            elif sender is not None and sender.outbox is not None:
                sender.deliver(ev.Undelivered(seq, seq, "gone", f"{self.name} left"))
            return
        if self.phase is Phase.CLOSED:
            if type(event) in _FATES:
                outbox.record(codec.encode(event))
            return
        if type(event) in _FATES:
            if self.journal is not None:  # a cluster keeps it first; it comes back to record()
                self.journal.fate(event)
                return
            if event.last > self.fated:
                self.fated = event.last  # no RECEIVED needed up to here (Peer.say_received)
        self._keep(codec.encode(event), sender, seq)

    def _version_1_fate(self, fate) -> None:
        """A fate of this version 1 session's messages: version 1 has no
        receipts, so ``DELIVERED`` says nothing; ``UNDELIVERED`` (held for
        a partner that did not come back, or left) is a ``NACK`` for each
        message on the chat socket, which numbers them as the fate does."""
        chat = self.chat
        if type(fate) is ev.Undelivered and chat is not None and self.phase is not Phase.CLOSED:
            for seq in range(fate.first, fate.last + 1):
                chat.send(ev.Nack(seq, fate.code, fate.text))

    def _presence(self, event) -> bool:
        """Whether to tell ``event`` (``AWAY``, ``BACK``, ``STARTED`` or
        ``ENDED``). ``AWAY`` is told once, until ``BACK`` or the chat's end:
        in a cluster both the node that saw the drop and the one the session
        resumes on may say it. ``AWAY`` and ``BACK`` go only to users whose
        client knows them: version 2, or IRC (as notices)."""
        kind = type(event)
        if kind is ev.Away:
            who = event.user.lower()
            if self.away == who:
                return False
            self.away = who
        else:
            self.away = ""
            if kind is not ev.Back:
                return True
        return self.outbox is not None or (self.login is not None and self.login.hears_presence)

    def record(self, event) -> None:
        """A version 2 event that the cluster has already kept (a fate that
        went through Redis): numbered, kept and sent as ``deliver`` does."""
        if type(event) in _FATES and event.last > self.fated:
            self.fated = event.last
        self._keep(codec.encode(event), None, 0)

    def _keep(self, data: bytes, sender, seq: int) -> None:
        """Version 2: number and keep one event, and send it if the login socket is there."""
        self.outbox.record(data, 1, sender, seq)
        login = self.login
        if login is not None and login.conn.state is State.LOGIN:
            login.transport.write(data)

    def deliver_block(self, sender: "Session", block: bytes, count: int, first_seq: int) -> None:
        """``count`` plain chat messages from ``sender``, seqs ``first_seq``...:
        ``block`` is their ``MSG <text>`` frames joined by LF
        (``Connection.next_messages``).

        Written as ``MSG <sender> <text>`` frames with one C-level replace
        (``codec.relay_block``) and kept in the outbox with one call: the
        relay's fast path, so no per-message Python work.
        """
        data = codec.relay_block(sender.name_bytes, block)
        outbox = self.outbox
        login = self.login
        if outbox is not None:
            outbox.record(data, count, sender, first_seq)  # a version 1 sender too: see Session._version_1_fate
            if login is not None and login.conn.state is State.LOGIN:
                login.transport.write(data)
            return
        written = login is not None and login.conn.can_send(ev.Incoming)
        if written:
            login.transport.write(data)
        if sender.outbox is not None:  # a version 1 partner acknowledges nothing
            last = first_seq + count - 1
            sender.deliver(ev.Delivered(first_seq, last) if written
                           else ev.Undelivered(first_seq, last, "gone", f"{self.name} left"))

    def hold_back(self, feeder) -> None:
        """``feeder`` (a chat socket) just delivered to us: pause it while we
        cannot take more (our login socket's output is backed up, or our
        unacknowledged events are at their bound)."""
        login = self.login
        if login is not None and login.congested:
            login.feed_paused_by(feeder)
        else:
            outbox = self.outbox
            if outbox is not None and outbox.last_id - outbox.acked >= outbox.limit:  # Outbox.full
                feeder.pause(PARTNER)
                self.waiting.append(feeder)

    def hold_back_own(self, chat) -> None:
        """Our own chat socket just sent: pause it while our client leaves our
        outbox at its bound (it does not acknowledge: its receipts would pile
        up without end). Its next ACK resumes it."""
        outbox = self.outbox
        if outbox.last_id - outbox.acked >= outbox.limit:  # Outbox.full
            chat.pause(PARTNER)
            self.waiting.append(chat)

    def release_waiting(self, force: bool = False) -> None:
        """Resume the senders paused by a full outbox, once it has room."""
        if self.waiting and (force or not self.outbox.full):
            waiting, self.waiting = self.waiting, []
            for feeder in waiting:
                feeder.resume(PARTNER)

    def peers(self):
        return [p for p in (self.login, self.chat, self.check) if p is not None]

    def __repr__(self) -> str:
        return f"<Session {self.sid} {self.name} {self.phase.name}>"
