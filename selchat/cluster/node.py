"""One server as a node of a cluster: its Redis links, its lease, its mail.

``selchat serve --cluster redis://...`` makes a ``ClusterNode``. It joins
(a fresh node id, a subscription to its channel ``selchat:n:<id>``, a lease
renewed every second), claims every login for the cluster (``claim``), runs
the shared chat state through the scripts of ``scripts.py`` (for the
``ClusterHub``), carries events and chat messages to the nodes of users it
does not hold (``RemoteUser``), and delivers what other nodes send to its own
sessions (``_on_message``).

Safety over availability: a node that loses Redis, or sees that Redis lost
its data, or finds it was itself stopped past its lease, **fences itself**:
every session on it ends (``BYE cluster-lost``) and logins are refused until
it has joined again under a new id. The other nodes reap its users once its
lease runs out (``REAP``), so they leave WHO and their partners hear ENDED.
A login of an account held by another live node waits until that node has
let go of it (``K``/``R`` below) or its lease has run out, so two nodes never
hold one account at once.

Messages on a node's channel: a header line, then a payload (one or more
protocol lines)::

    E <key> <epoch>              an event for a session (payload: the line)
    X <key> <epoch>              ENDED: its chat is over (payload: the line)
    S <key> <epoch> <pkey> <pnode> <pepoch> <pv2>
                                 STARTED: its partner is pkey on pnode
    K <key> <epoch>              taken over: end that session, answer R
    R <key> <epoch>              (to the new node) the old session is gone
    D <key> <epoch> <sname> <snode> <sepoch> <sv2> <seq> <count> [<pos>]
                                 for a session: count > 0, that many chat
                                 messages from sname (the sender's MSG block,
                                 first seq <seq>, from RELAY: the first's
                                 position among all relayed to the session,
                                 0 for a version 1 one); -1, one event carrying
                                 message <seq>; 0, any other event
    F <key> <epoch> stop|go      slow down / go on: the partner cannot take more
    M <key> <epoch>              (payload: a node) a RESUME there took the
                                 session over: let go of it without ending
                                 it, answer R
    P <key> <epoch> <pkey> <pnode> <pepoch> <pv2>
                                 the session's partner is on pnode now (it
                                 resumed there); payload: BACK (a version 1
                                 client's node drops it)
    L <key> <epoch> <pkey>       the session's partner pkey (version 1) was
                                 on a node that died: the messages relayed to
                                 it that have no fate yet never will
    O <key> <epoch>              (payload: the text) an operator's kick or
                                 lock on another node: end that session

And on ``selchat:all``, which every node hears, one line ``<kind> <node id>
...`` (``share``): ``failed``, ``succeeded``, ``registered``, ``deleted``
or ``locked``, each with an account key and an address (``Logins.shared``);
``notice <text>``, an operator's broadcast.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import deque

from selchat.cluster import scripts
from selchat.cluster.redislink import BufferFull, PubSubLink, RedisError, RedisLink
from selchat.protocol import codec
from selchat.protocol import events as ev
from selchat.server.logins import UNAVAILABLE
from selchat.server.peer import PARTNER, WAITING

log = logging.getLogger("selchat.cluster")

#: How long a node's lease lasts without renewal, and how often it is renewed.
LEASE_SECONDS = 5.0
RENEW_SECONDS = 1.0
#: A node acts only while its last renewal is younger than this (its own
#: clock): a node stopped for longer (SIGSTOP, a VM pause) fences itself
#: before it reads anything, since another node may hold its users by then.
SAFE_SECONDS = LEASE_SECONDS - 1.5
#: How often each node looks for dead nodes' users.
REAP_SECONDS = 1.0
#: How long a login waits for the node that held the account to let go.
RELEASE_WAIT = LEASE_SECONDS + 1.0
#: Redis command timeout: no reply this long and the link is down (fencing).
REDIS_TIMEOUT = 3.0

__all__ = ["ClusterNode", "RemoteUser", "SUPERSEDED", "UNAVAILABLE"]

#: ``claim``'s answer for a login that a later one of the same account beat.
SUPERSEDED = "superseded"

#: The channel every node listens to: what the nodes count together (failed
#: logins and accounts made per address, ``Logins.shared``) and operators'
#: broadcasts (``notice``), as ``<kind> <node id> <fields...>``.
SHARED = "selchat:all"

#: Sessions detached per DEPART call when a node shuts down.
DEPART_BATCH = 200

#: What a version 2 user hears when its node shuts down and the cluster goes on.
MOVING = "this server is shutting down; your session moves to another server of the cluster"


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


_SHAS = {name: _sha(body) for name, body in scripts.SCRIPTS.items()}


def _event(line: bytes) -> ev.Event:
    """One event line from another node (or a script), LF or not."""
    return codec.decode_server(line[:-1] if line.endswith(b"\n") else line)


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RemoteUser:
    """A session on another node, as this node's sessions see it: what
    ``Session`` offers a partner or a sender (``name``, ``key``,
    ``name_bytes``, ``outbox`` set for version 2, ``deliver``,
    ``deliver_block``, ``hold_back``), carried through Redis."""

    __slots__ = ("node", "key", "name", "name_bytes", "node_id", "epoch", "outbox", "blocked", "partner",
                 "unfated", "__weakref__")

    def __init__(self, node: "ClusterNode", key: str, name: str, node_id: str, epoch: str, v2: bool):
        self.node = node
        self.key = key
        self.name = name
        self.name_bytes = name.encode()
        self.node_id = node_id
        self.epoch = epoch
        self.outbox = True if v2 else None  # only ever tested against None
        self.blocked = False                # its node said stop (F): its outbox or socket is full
        self.partner = None
        # Version 1: the first and last seq of the version 2 messages relayed
        # to it whose fate has not come back yet (see ``lost``).
        self.unfated: list[int] | None = None

    def deliver(self, event, sender=None, seq: int = 0) -> None:
        kind = type(event)
        if sender is not None and kind is ev.Incoming:
            if self.outbox is None and sender.outbox is not None:
                self._relayed(seq, seq)
            self.node.send_message(self, sender, seq, -1, codec.encode(event))
        elif kind is ev.Delivered or kind is ev.Undelivered:  # kept in Redis for its session, wherever it is
            self.node.eval("fate", self.key, self.epoch, codec.encode(event)[:-1], 0, self.node.keep)
        else:
            self.node.post(self.node_id, f"D {self.key} {self.epoch} - - 0 0 0 0", codec.encode(event))

    def deliver_block(self, sender, block: bytes, count: int, first_seq: int) -> None:
        if self.outbox is None and sender.outbox is not None:
            self._relayed(first_seq, first_seq + count - 1)
        self.node.send_message(self, sender, first_seq, count, block)

    # A version 1 session's node says DELIVERED as it writes each message to
    # it. If that node dies, the messages it had not written yet get no fate
    # from it: the partner's node keeps the range still waiting for one, and
    # reports it when Redis says the node died (``L``).

    def _relayed(self, first: int, last: int) -> None:
        if self.unfated is None:
            self.unfated = [first, last]
        else:
            self.unfated[1] = last

    def fated(self, last: int) -> None:
        """A fate came for the sender's messages up to ``last``."""
        unfated = self.unfated
        if unfated is not None and last >= unfated[0]:
            if last >= unfated[1]:
                self.unfated = None
            else:
                unfated[0] = last + 1

    def lost(self) -> tuple[int, int] | None:
        """Its node died: the seqs relayed to it that will never have a fate from it."""
        unfated, self.unfated = self.unfated, None
        return (unfated[0], unfated[1]) if unfated is not None else None

    def hold_back(self, feeder) -> None:
        """Its node said stop (``F``): pause the sender until it says go."""
        if self.blocked:
            feeder.pause(PARTNER)

    def __repr__(self) -> str:
        return f"<RemoteUser {self.name}@{self.node_id} epoch {self.epoch}>"


class RemoteFeeder:
    """A remote sender as the local backpressure code sees a chat socket:
    ``pause``/``resume`` become ``F stop``/``F go`` to its node."""

    __slots__ = ("user", "paused")

    def __init__(self, user: RemoteUser):
        self.user = user
        self.paused = 0

    def pause(self, reason: int) -> None:
        if not self.paused:
            self.user.node.post(self.user.node_id, f"F {self.user.key} {self.user.epoch} stop", b"")
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused:
                self.user.node.post(self.user.node_id, f"F {self.user.key} {self.user.epoch} go", b"")


class Journal:
    """What Redis keeps of one version 2 session of this node, so that it can
    be resumed on another node (docs/architecture.md, "Resuming on another
    node"): the fates of its messages (``fate``: kept before the client
    hears them), how far its own messages reached Redis (``durable``:
    RECEIVED says no more), and the messages relayed to it until its client
    acknowledges them (``acked`` trims them). ``got`` is the position of the
    last relayed message written to its outbox; ``marks`` pair an outbox id
    with the position of the message it carries."""

    __slots__ = ("node", "session", "got", "durable", "marks", "trimmed")

    def __init__(self, node: "ClusterNode", session, got: int = 0, durable: int = 0):
        self.node = node
        self.session = session
        self.got = got
        self.durable = durable
        self.marks: deque[tuple[int, int]] = deque()
        self.trimmed = got

    def fate(self, event) -> None:
        """A fate of the session's own messages, decided here (a refusal):
        into Redis first, then (``E``) to the client."""
        session = self.session
        last = event.last
        self.node.eval("fate", session.key, session.epoch, codec.encode(event)[:-1], last, self.node.keep,
                       callback=lambda reply: self.reached(last) if reply == 1 else None)

    def reached(self, seq: int) -> None:
        """Redis has the session's messages up to ``seq``: RECEIVED may say so."""
        if seq > self.durable:
            self.durable = seq
            chat = self.session.chat
            if chat is not None and chat.received < seq <= chat.conn.msg_seq:
                chat.received_due()

    def written(self, last_pos: int) -> None:
        """Relayed messages up to position ``last_pos`` are in the outbox (its last id)."""
        self.got = last_pos
        self.marks.append((self.session.outbox.last_id, last_pos))

    def got_before(self, event_id: int) -> int:
        """How many chat messages were relayed to the session before its event
        ``event_id`` (one not acknowledged yet)."""
        pos = self.trimmed
        for mark_id, mark_pos in self.marks:
            if mark_id >= event_id:
                break
            pos = mark_pos
        return pos

    def acked(self, receipts) -> None:
        """The client acknowledged events (``Outbox.ack``'s ``receipts``): the
        chat messages among them leave Redis, and their senders get their
        receipts, in one call."""
        session = self.session
        acked = session.outbox.acked
        marks = self.marks
        pos = 0
        while marks and marks[0][0] <= acked:
            pos = marks.popleft()[1]
        if pos > self.trimmed:
            self.trimmed = pos
        else:
            pos = 0
        if not pos and not receipts:
            return
        args = []
        for sender, first, last in receipts:
            if sender.outbox is not None:  # version 1 has no receipts
                args += (sender.key, sender.epoch, f"DELIVERED {first} {last}")
        self.node.eval("acked", session.key, session.epoch, pos, self.node.keep, *args)


def _skip_messages(payload: bytes, skip: int) -> bytes:
    """A relayed block without its first ``skip`` messages (LF-separated frames)."""
    cut = 0
    for _ in range(skip):
        cut = payload.index(b"\n", cut) + 1
    return payload[cut:]


class ClusterNode:
    def __init__(self, server, url: str):
        self.server = server
        self.reactor = server.reactor
        self.url = url
        self.node_id = ""
        self.joined = False
        self.fences = 0              # times fenced (/metrics)
        self.gen = None              # Redis's generation value, as first seen
        self.safe_until = 0.0        # monotonic: act only before this
        self.users: dict[tuple[str, str], RemoteUser] = {}  # (key, epoch) -> proxy
        self.feeders: dict[tuple[str, str], RemoteFeeder] = {}
        self.releases: dict[tuple[str, str], list] = {}     # (key, old epoch) -> callbacks waiting for R
        self.released: dict[tuple[str, str], tuple] = {}    # R that came before its claim's reply: (when, payload)
        self.claiming: dict[str, int] = {}                  # key -> claims of it in flight here
        self.superseded: dict[str, int] = {}                # key -> highest epoch K said is over (while claiming)
        self.arriving: dict[str, list] = {}                 # key -> mail for a session being moved here
        self.moved: dict[tuple[str, str], float] = {}       # (key, epoch) moved away (M): when
        self.keep = server.config.resume_buffer             # fates kept in Redis per session
        self._renew = None
        self._reap = None
        self.link = RedisLink(self.reactor, url, on_up=self._link_up, on_down=self._link_down,
                              name="selchat-node", timeout=REDIS_TIMEOUT, ping_interval=1.0)
        self.sub = PubSubLink(self.reactor, url, on_up=self._link_up, on_down=self._link_down,
                              name="selchat-node-sub", timeout=REDIS_TIMEOUT, ping_interval=1.0)
        self.link.on_drain = self._drained
        self.held: list = []         # chat sockets paused while the Redis link is congested
        self.reactor.wake_check = self._wake_check

    # -- joining, the lease, fencing ------------------------------------------------

    @property
    def up(self) -> bool:
        return self.joined and self.link.up and self.sub.up

    def _link_up(self) -> None:
        if not (self.link.up and self.sub.up) or self.node_id:
            return
        for body in scripts.SCRIPTS.values():
            self.link.command("SCRIPT", "LOAD", body)
        self.node_id = secrets.token_hex(6)
        self.sub.subscribe(SHARED, on_message=self._on_shared)
        self.sub.subscribe(f"selchat:n:{self.node_id}", on_message=self._on_message,
                           callback=lambda reply: self._renew_lease())

    def _link_down(self, exc) -> None:
        self.fence(f"lost contact with Redis: {exc}")

    def _renew_lease(self) -> None:
        if not self.node_id or not self.link.up:
            return
        sent = time.monotonic()
        node_id = self.node_id

        def renewed(reply) -> None:
            if node_id != self.node_id:
                return
            if isinstance(reply, RedisError):
                self.fence(f"could not renew the lease: {reply}")
                return
            gen = _s(reply)
            if self.gen is not None and gen != self.gen:
                self.gen = gen
                self.fence("Redis lost the cluster's state (restarted without it): history lost", resumable=False)
                return
            self.gen = gen
            self.safe_until = sent + SAFE_SECONDS
            if not self.joined:
                self.joined = True
                log.info("cluster: joined as node %s (%s)", self.node_id, self.link.config.redacted())
                self._reap = self.reactor.call_later(REAP_SECONDS, self._reap_dead)
            self._renew = self.reactor.call_later(RENEW_SECONDS, self._renew_lease)

        self.eval("lease", self.node_id, int(LEASE_SECONDS * 1000), secrets.token_hex(8), callback=renewed)

    def _reap_dead(self) -> None:
        self._reap = None
        if not self.up:
            return

        def reaped(reply) -> None:
            if isinstance(reply, int) and reply:
                log.info("cluster: reaped %d sessions of nodes that stopped renewing their lease", reply)

        window = int(self.server.config.resume_window * 1000)
        self.eval("reap", window, callback=reaped)
        self._reap = self.reactor.call_later(REAP_SECONDS, self._reap_dead)

    def _wake_check(self) -> None:
        """Before every turn's handlers run: a node whose lease may have
        run out (it was stopped, or its renewals go unanswered) fences itself
        before it delivers anything."""
        if self.joined and time.monotonic() > self.safe_until:
            self.fence("the lease ran out (this node was stopped, or Redis did not answer)")

    def fence(self, why: str, resumable: bool = True) -> None:
        """Stop acting for the cluster: let go of every session here, refuse
        logins, join again under a new id once Redis is reachable.

        Version 2 sessions are dropped without a word (their sockets close):
        Redis keeps them, the other nodes detach them once this node's lease
        runs out, and their clients resume them, here or elsewhere, when the
        cluster is reachable again. Unless ``resumable`` is False (Redis lost
        its data, so nothing is kept), they end as version 1 sessions do,
        with ``BYE cluster-lost``."""
        was = self.joined or self.node_id
        self.joined = False
        old = self.node_id
        self.node_id = ""
        for timer in (self._renew, self._reap):
            if timer is not None:
                timer.cancel()
        self._renew = self._reap = None
        if old:
            self.sub.unsubscribe(f"selchat:n:{old}", SHARED)
        self.users.clear()
        self.feeders.clear()
        self.held.clear()  # their sessions end here
        self.released.clear()
        self.superseded.clear()
        self.arriving.clear()
        self.moved.clear()
        waiting, self.releases = self.releases, {}
        for callbacks in waiting.values():
            for callback in callbacks:
                callback(False)
        if was:
            self.fences += 1
            registry = self.server.registry
            kept = [session for session in registry.sessions.values() if session.journal is not None]
            if resumable:
                for session in kept:
                    registry.let_go(session)
            log.error("cluster: fenced (%s); %s", why,
                      f"letting go of {len(kept)} resumable sessions, ending the rest" if resumable and kept
                      else "ending every session on this node")
            registry.end_all_sessions(
                "dropped", "lost connection", ev.Bye("cluster-lost", "this server lost contact with the cluster"),
                why="cluster-lost")
        if self.link.up and self.sub.up:
            self.reactor.call_soon(self._link_up)

    # -- limits the nodes count together -------------------------------------------------

    def share(self, kind: str, *fields: str) -> None:
        """Tell every other node (``Logins.shared``): a failed or a good
        password from an address, an account made from one, an account
        deleted or locked. So a guesser or an account maker spreading over the nodes
        is counted as on one server; each node still decides alone, without
        waiting for Redis. And an operator's broadcast (``notice``)."""
        if self.up:
            self.link.command("PUBLISH", SHARED, " ".join((kind, self.node_id, *fields)))

    def _on_shared(self, channel: bytes, data: bytes) -> None:
        kind, _, rest = data.decode(errors="replace").partition(" ")
        node_id, _, rest = rest.partition(" ")
        if not self.joined or node_id == self.node_id or not rest:
            return
        if kind == "notice":  # an operator's broadcast on another node
            self.server.broadcast(rest, here_only=True)
        else:
            self.server.logins.shared(kind, *rest.split(" "))

    def census(self, done) -> None:
        """``done({node id: sessions})`` for the whole cluster, as Redis has
        it (``""``: detached sessions, away until they resume), or
        ``done(None)`` if Redis cannot say."""
        if not self.up:
            self.reactor.call_soon(done, None)
            return

        def counted(reply) -> None:
            if not isinstance(reply, list):
                done(None)
                return
            users: dict[str, int] = {}
            for node in reply[1::2]:
                users[_s(node)] = users.get(_s(node), 0) + 1
            done(users)

        self.link.command("HGETALL", "selchat:online", callback=counted)

    # -- shutting down while the cluster goes on ---------------------------------------

    def depart(self) -> int:
        """The node shuts down (SIGTERM), the cluster does not: every
        version 2 session here is detached in Redis at once, as if the node
        had died, and let go of here with a ``NOTICE`` and no ``BYE``, so
        that its client resumes it on another node (or on this one, back
        within the resume window) with its chat. Returns how many; the
        others end as on a lone server."""
        if not self.up:
            return 0
        registry = self.server.registry
        args, now = [], time.monotonic()
        for session in list(registry.sessions.values()):
            if session.journal is None or session.outbox is None:
                continue
            # Its client may have read what it has not acknowledged: hand over
            # only what it drops if it has it. Where it stands (STARTED,
            # REQUEST, a request's end, AWAY) the next node says from Redis.
            handed = self._hand_over(session, session.outbox.acked, only=b"ENDED ")
            session.deliver(ev.Notice(MOVING))
            if session.login is not None:
                session.login.transport.flush()  # the NOTICE, before the sockets are dropped
            registry.let_go(session)
            self.moved[(session.key, session.epoch)] = now  # what still comes for it is in Redis
            args += (session.key, session.epoch, handed)
        window = int(self.server.config.resume_window * 1000)
        for start in range(0, len(args), 3 * DEPART_BATCH):  # Redis runs a script alone: keep each short
            self.eval("depart", self.node_id, window, *args[start:start + 3 * DEPART_BATCH])
        return len(args) // 3

    def leave(self, done) -> None:
        """Last, after ``depart`` and the other sessions' ends: the lease
        goes (Redis runs one connection's commands in order, so after them),
        and the other nodes reap this one at once. ``done()`` when Redis has
        answered, or at once if it cannot."""
        for timer in (self._renew, self._reap):
            if timer is not None:
                timer.cancel()
        self._renew = self._reap = None
        if not self.up:
            done()
            return
        self.link.command("DEL", f"selchat:node:{self.node_id}", callback=lambda reply: done())

    # -- Redis ----------------------------------------------------------------------

    def eval(self, name: str, *args, callback=None) -> None:
        self.link.command("EVALSHA", _SHAS[name], 0, *args, callback=callback)

    def post(self, node_id: str, header: str, payload: bytes) -> None:
        """A message for another node (unfenced: events, receipts, flow)."""
        if self.up:
            self.link.command("PUBLISH", f"selchat:n:{node_id}", header.encode() + b"\n" + payload)

    def send_message(self, to: RemoteUser, sender, seq: int, count: int, payload: bytes) -> None:
        """Chat messages from local ``sender`` to ``to``: relayed only while
        the sender's session is the account's current one (RELAY fences), and
        kept in Redis until ``to``'s client has them (version 2)."""
        if not self.up:  # fencing: the session is ending; these were not sent, say so
            self._not_sent(sender, seq, count, UNAVAILABLE)
            return
        last = seq + max(count, 1) - 1
        journal = sender.journal

        def relayed(reply) -> None:
            if reply == 1 or reply == 2:
                if journal is not None:
                    journal.reached(last)
                if reply == 2:
                    self._wait_for_room(sender, to)
            elif reply == 3:
                self._not_sent(sender, seq, count, f"{to.name} left the chat")
            elif reply == 0 or isinstance(reply, BufferFull):
                # Not relayed: the sender's session was taken over (0), or
                # the link's buffer was full. (LinkDown: the link is lost, the
                # node fences itself and the session ends; its fate is unknown.)
                why = "the cluster is overloaded" if reply else "your session was taken over"
                self._not_sent(sender, seq, count, why)

        self.eval("relay", sender.key, sender.epoch, to.key, count, seq, sender.name, self.node_id,
                  1 if sender.outbox is not None else 0, self.keep, payload, callback=relayed)
        chat = sender.chat
        if self.link.congested and chat is not None and not chat.paused & PARTNER:
            chat.pause(PARTNER)  # Redis reads slower than we relay: slow the sender, lose nothing
            self.held.append(chat)

    def _wait_for_room(self, sender, to: RemoteUser) -> None:
        """``to`` (detached: its node died) holds as many messages as it may:
        read no more from ``sender`` until its client takes some, or the chat
        ends."""
        chat = sender.chat
        if chat is None or chat.paused & PARTNER:
            return
        chat.pause(PARTNER)

        def poll() -> None:
            if sender.chat is not chat or sender.partner is not to or not self.up:
                chat.resume(PARTNER)
                return

            def length(reply) -> None:
                if isinstance(reply, int) and reply < self.keep // 2:
                    chat.resume(PARTNER)
                else:
                    self.reactor.call_later(0.5, poll)

            self.link.command("LLEN", f"selchat:in:{to.key}", callback=length)

        self.reactor.call_later(0.5, poll)

    def _drained(self) -> None:
        held, self.held = self.held, []
        for chat in held:
            chat.resume(PARTNER)

    @staticmethod
    def _not_sent(sender, seq: int, count: int, why: str) -> None:
        """Chat messages that were never published: their fate, at once."""
        last = seq + max(count, 1) - 1
        if sender.outbox is not None:
            sender.deliver(ev.Undelivered(seq, last, "gone", why))
        elif sender.chat is not None:
            for s in range(seq, last + 1):
                sender.chat.send(ev.Nack(s, "gone", why))

    def track(self, session, token: str) -> None:
        """A version 2 session begins here: its resume token goes into Redis
        (hashed), so that any node can find the session by it."""
        session.journal = Journal(self, session)
        self.eval("token", session.key, session.epoch, _token_hash(token))

    def remote(self, key: str, name: str, node_id: str, epoch: str, v2: bool) -> RemoteUser:
        user = self.users.get((key, epoch))
        if user is None or user.node_id != node_id:
            user = self.users[(key, epoch)] = RemoteUser(self, key, name, node_id, epoch, v2)
        return user

    def forget(self, user: RemoteUser) -> None:
        self.users.pop((user.key, user.epoch), None)
        self.feeders.pop((user.key, user.epoch), None)

    # -- logins -------------------------------------------------------------------------

    def claim(self, name: str, v2: bool, done) -> None:
        """Make this node the holder of account ``name``; ``done(epoch)``
        once no other node holds it, or ``done(None)`` if the cluster cannot
        be reached (the login is refused)."""
        if not self.up:
            self.reactor.call_soon(done, None)
            return
        key = name.lower()
        self.claiming[key] = self.claiming.get(key, 0) + 1

        def finish(epoch) -> None:
            # A later login (here or elsewhere) may have superseded this one
            # while it waited: its K came before there was a session to end.
            left = self.claiming.get(key, 1) - 1
            over = self.superseded.get(key, 0)
            if left:
                self.claiming[key] = left
            else:
                self.claiming.pop(key, None)
                self.superseded.pop(key, None)
            if epoch is not None and int(epoch) <= over:
                done(SUPERSEDED)
            else:
                done(epoch)

        def claimed(reply) -> None:
            if isinstance(reply, RedisError) or not reply or not reply[0]:
                finish(None)
                return
            epoch, old_node, old_alive, old_epoch = _s(reply[0]), _s(reply[1]), reply[2], _s(reply[3])
            if old_node and old_node != self.node_id and old_alive:
                self._await_release(key, old_node, old_epoch, lambda ok, _: finish(epoch if ok else None))
            else:
                finish(epoch)

        self.eval("claim", key, name, self.node_id, 1 if v2 else 0, callback=claimed)

    def _await_release(self, key: str, old_node: str, old_epoch: str, done) -> None:
        """Wait for ``R`` from the node that held the account, or for it to
        be gone, whichever first; ``done(ok, handed)`` (``handed``: the
        events the old holder handed over with its ``R``, see ``_on_move``).
        Gone: its lease ran out, or its subscription is (``PUBSUB NUMSUB``: a
        killed node's connections close at once). A node without its
        subscription hears nothing more, and the new epoch fences whatever it
        still tries to relay."""
        early = self.released.pop((key, old_epoch), None)
        if early is not None:  # R came first
            self.reactor.call_soon(done, True, early[1])
            return
        waiters = self.releases.setdefault((key, old_epoch), [])
        deadline = time.monotonic() + RELEASE_WAIT
        finished = []

        def finish(ok: bool, handed: bytes = b"") -> None:
            if not finished:
                finished.append(ok)
                done(ok, handed)

        waiters.append(finish)

        def poll() -> None:
            if finished:
                return
            if not self.up:
                finish(False)
                return

            def exists(reply) -> None:
                if finished:
                    return
                if reply == 0:
                    self.releases.pop((key, old_epoch), None)
                    finish(True)
                elif time.monotonic() > deadline or isinstance(reply, RedisError):
                    self.releases.pop((key, old_epoch), None)
                    finish(False)
                else:
                    self.reactor.call_later(0.25, poll)

            def subscribed(reply) -> None:
                if finished:
                    return
                if isinstance(reply, list) and len(reply) == 2 and reply[1] == 0:
                    exists(0)  # its subscription is gone: as good as dead
                else:
                    self.link.command("EXISTS", f"selchat:node:{old_node}", callback=exists)

            self.link.command("PUBSUB", "NUMSUB", f"selchat:n:{old_node}", callback=subscribed)

        self.reactor.call_soon(poll)

    # -- resuming a session another node held -------------------------------------

    def resume(self, peer, event: ev.Resume) -> None:
        """RESUME of a session this node does not hold: find it by its token
        (RECLAIM), make this node its holder (the old node, if alive, lets go
        of it: ``M``/``R``), then take over what Redis kept (TAKE) and go on
        where the client left off. docs/architecture.md, "Resuming on another
        node"."""
        registry = self.server.registry
        if not self.up:
            self._resume_failed(peer, "unavailable", UNAVAILABLE)
            return
        peer.pause(WAITING)
        _, _, secret = event.token.partition(".")

        def reclaimed(reply) -> None:
            code = _s(reply[0]) if isinstance(reply, list) and reply else "down"
            if peer.transport.closing and code != "ok":
                return
            if code == "unknown":
                registry.unknown_session(peer)
                peer.resume(WAITING)
            elif code == "here":  # held here, under a token this node's ids do not show
                session = registry.sessions.get(_s(reply[1]))
                if session is None or session.outbox is None or \
                        not hmac.compare_digest(session.resume_secret.encode(), secret.encode()):
                    registry.unknown_session(peer)
                else:
                    registry.resume_here(peer, event, session)
                peer.resume(WAITING)
            elif code == "ok":
                key, name, epoch = _s(reply[1]), _s(reply[2]), _s(reply[3])
                old_node, old_alive, old_epoch = _s(reply[4]), reply[5], _s(reply[6])
                self.arriving[key] = []

                def take(ok: bool = True, handed: bytes = b"") -> None:
                    if not ok:  # the old node neither let go nor died in time
                        self.arriving.pop(key, None)
                        self._resume_failed(peer, "unavailable", UNAVAILABLE)
                        return
                    self.eval("take", key, epoch, callback=lambda reply: self._took(
                        peer, event, secret, key, name, epoch, reply, handed))

                if old_alive:
                    self._await_release(key, old_node, old_epoch, take)
                else:
                    take()
            else:
                self._resume_failed(peer, "unavailable", UNAVAILABLE)

        self.eval("reclaim", _token_hash(event.token), self.node_id, event.last_id, callback=reclaimed)

    def _resume_failed(self, peer, code: str, text: str) -> None:
        if not peer.transport.closing:
            peer.send(ev.Error("RESUME", code, text))
            peer.resume(WAITING)

    def _took(self, peer, event: ev.Resume, secret: str, key: str, name: str, epoch: str, reply,
              handed: bytes = b"") -> None:
        """TAKE's answer: the session is this node's now. Send RESUMED, then
        every fate Redis kept (the client drops those it has), and the chat
        messages its client had not received (``event.messages``: how many it
        had), with in their place among them the other events: those the old
        node handed over (``handed``, if it was alive), the ``ENDED`` no node
        could tell it, where the session stands (``STARTED``, ``REQUEST``,
        then ``AWAY``) and how its last chat request ended (``DECLINED``...,
        unless the client read a message after it): the client may have missed
        them from a node that died, and drops what it knows. Messages it had
        but had not acknowledged are DELIVERED now."""
        waiting = self.arriving.pop(key, [])
        if not isinstance(reply, list) or _s(reply[0]) != "ok" or not self.up:
            self._resume_failed(peer, "unavailable", UNAVAILABLE)
            return
        acc = int(reply[1])
        pkey, pname, pnode, pepoch, pv2 = (_s(v) for v in reply[2:7])
        fates, held, untold, asker = reply[7], reply[8], reply[9], _s(reply[10])
        session = self.server.registry.adopt(peer, name, epoch, secret, event.last_id, acc)
        journal = session.journal = Journal(self, session, durable=acc)
        for line in fates:
            session.record(_event(line))
        seen = max(event.messages, 0)  # chat messages its client had
        # Events to put among the messages: (messages relayed before it, event).
        said = []
        for line in handed.splitlines():
            got, _, frame = line.partition(b" ")
            said.append((int(got), _event(frame)))
        for entry in untold:
            got, _, line = entry.partition(b"\n")
            said.append((int(got), _event(line)))
        stands = None
        if pkey:
            session.partner = self.remote(pkey, pname, pnode, pepoch, pv2 == "1")
            stands = (int(reply[11]), ev.Started(pname))
        elif asker:
            stands = (int(reply[12]), ev.Request(asker))
        if stands is not None and all(e != stands[1] for _, e in said):  # not if the old node handed it over
            said.append(stands)
        if reply[13]:  # how its last request ended: said again unless a message after it was read
            got, _, line = reply[13].partition(b"\n")
            over = (int(got), _event(line))
            if over[0] >= seen and all(e != over[1] for _, e in said):
                said.append(over)
        said.sort(key=lambda pair: pair[0])  # stable: an ENDED before the STARTED of the next chat
        if pkey and not pnode:  # its node died and its lease ran out: detached
            said.append((math.inf, ev.Away(pname)))
        said.reverse()
        journal.got = seen
        journal.marks.append((event.last_id, seen))  # acknowledged by the RESUME itself
        shown: list[list] = []  # (sender, first, last): had, not acknowledged: delivered
        for entry in held:
            head, _, payload = entry.partition(b"\n")
            pos, n, count, sname, snode, sepoch, sv2, seq = head.decode().split(" ")
            pos, n, count, seq = int(pos), int(n), int(count), int(seq)
            sender = self.remote(sname.lower(), sname, snode, sepoch, sv2 == "1")
            while said and said[-1][0] < pos:
                session.deliver(said.pop()[1])
            had = min(seen - pos + 1, n)
            if had > 0 and sender.outbox is not None:
                if shown and shown[-1][0] is sender and shown[-1][2] + 1 == seq:
                    shown[-1][2] = seq + had - 1
                else:
                    shown.append([sender, seq, seq + had - 1])
            self._write_relayed(session, sender, pos, count, seq, payload)
        while said:
            session.deliver(said.pop()[1])
        journal.acked([tuple(r) for r in shown])  # also trims what the client had (trimmed < seen)
        for handler, fields, payload in waiting:  # told or relayed to it while it was moving
            handler(self, key, epoch, fields, payload)
        peer.resume(WAITING)
        log.info("cluster: %s resumed here (moved from another node): %d fates, %d held blocks",
                 name, len(fates), len(held))
        if peer.transport.closing:  # gone while it moved: the session is here now, detached
            self.server.registry.lost(session, "dropped", f"{name} lost connection")

    def _on_move(self, key, epoch, fields, payload) -> None:
        """M: a RESUME on another node took this session over (payload: that
        node and the client's last event id): let go of it without ending it,
        and say so (R), handing over the events the client may not have had."""
        new_node, _, last_id = payload.decode().partition(" ")
        session = self._local(key, epoch)
        handed = b""
        if session is not None:
            handed = self._hand_over(session, int(last_id or 0))
            self.server.registry.let_go(session)
        now = time.monotonic()
        self.moved[(key, epoch)] = now
        if len(self.moved) > 1000:
            self.moved = {k: t for k, t in self.moved.items() if now - t < 60}
        if new_node:
            self.post(new_node, f"R {key} {epoch}", handed)

    @staticmethod
    def _hand_over(session, last_id: int, only: bytes = b"") -> bytes:
        """The events after ``last_id`` in the session's outbox that Redis
        does not keep (not chat messages, not fates: a chat's start or end,
        a request, AWAY...; only those starting with ``only`` if given),
        each as ``<pos> <frame>``: pos, how many chat messages were relayed
        to the session before it."""
        outbox, journal = session.outbox, session.journal
        if outbox is None or journal is None:
            return b""
        out = []
        for entry in outbox.entries:
            if entry.sender is not None or entry.count != 1 or entry.first_id <= last_id:
                continue
            frame = entry.data
            if frame.startswith((b"DELIVERED ", b"UNDELIVERED ")) or not frame.startswith(only):
                continue
            out.append(b"%d %s" % (journal.got_before(entry.first_id), frame))
        return b"".join(out)

    def _on_partner_moved(self, key, epoch, fields, payload) -> None:
        """P: our partner resumed on another node (fields: its key, node,
        epoch, v2); the session hears BACK (Session.deliver drops it for a
        version 1 client)."""
        session = self._local(key, epoch)
        if session is None:
            return
        old = session.partner
        if old is None or old.key != fields[3]:
            return
        if isinstance(old, RemoteUser):
            self.forget(old)
        session.partner = self.remote(fields[3], old.name, fields[4], fields[5], fields[6] == "1")
        if isinstance(old, RemoteUser) and old.blocked and session.chat is not None:
            session.chat.resume(PARTNER)
        if payload:
            session.deliver(_event(payload))

    # -- mail from other nodes ------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if not self.joined:
            return
        head, _, payload = data.partition(b"\n")
        fields = head.decode().split(" ")
        kind, key, epoch = fields[0], fields[1], fields[2]
        try:
            handler = self._HANDLERS[kind]
        except KeyError:
            log.warning("cluster: unknown message %r", head[:80])
            return
        arriving = self.arriving  # usually empty: one test per message on the hot path
        if arriving and key in arriving and kind in self._WAIT_FOR_ARRIVAL and self._local(key, epoch) is None:
            arriving[key].append((handler, fields, payload))  # being moved here: handled once it is
            return
        handler(self, key, epoch, fields, payload)

    def _local(self, key: str, epoch: str):
        session = self.server.registry.sessions.get(key)
        if session is not None and session.epoch == epoch:
            return session
        return None

    def _on_event(self, key, epoch, fields, payload) -> None:
        session = self._local(key, epoch)
        if session is not None:
            event = _event(payload)
            if session.outbox is not None and type(event) in (ev.Delivered, ev.Undelivered):
                partner = session.partner
                if partner is not None and partner.unfated is not None:
                    partner.fated(event.last)
                session.record(event)  # kept in Redis already (FATE)
            else:
                session.deliver(event)

    def _on_ended(self, key, epoch, fields, payload) -> None:
        session = self._local(key, epoch)
        if session is None:
            return
        partner = session.partner
        if partner is not None:
            session.partner = None
            if isinstance(partner, RemoteUser):
                self.forget(partner)
                if partner.blocked and session.chat is not None:
                    session.chat.resume(PARTNER)  # nothing to wait for any more
        session.deliver(_event(payload))

    def _on_lost(self, key, epoch, fields, payload) -> None:
        session = self._local(key, epoch)
        partner = session.partner if session is not None else None
        if partner is None or partner.key != fields[3]:
            return
        lost = partner.lost()
        if lost is not None:
            why = f"{partner.name}'s server went down before it was delivered"
            session.deliver(ev.Undelivered(*lost, "gone", why))

    def _on_started(self, key, epoch, fields, payload) -> None:
        session = self._local(key, epoch)
        if session is None:
            return
        pkey, pnode, pepoch, pv2 = fields[3], fields[4], fields[5], fields[6] == "1"
        event = _event(payload)
        session.partner = self.partner_for(pkey, event.user, pnode, pepoch, pv2)
        session.deliver(event)

    def partner_for(self, pkey: str, name: str, pnode: str, pepoch: str, v2: bool):
        """The partner as a local session sees it: always a proxy, even on
        this node, so that every chat message goes through Redis (RELAY) and
        is there to replay if this node dies."""
        return self.remote(pkey, name, pnode, pepoch, v2)

    def _on_kick(self, key, epoch, fields, payload) -> None:
        if key in self.claiming:  # a login of it here may not have its session yet
            self.superseded[key] = max(self.superseded.get(key, 0), int(epoch))
        session = self._local(key, epoch)
        if session is not None:
            self.server.registry.end_session(session, "dropped", f"{session.name} lost connection",
                                             ev.Bye("replaced", "logged in from another client"), why="replaced")
        new_node = payload.decode()
        if new_node and new_node != self.node_id:
            self.post(new_node, f"R {key} {epoch}", b"")
        elif new_node == self.node_id:
            self._on_release(key, epoch, fields, b"")

    def kick_elsewhere(self, key: str, text: str, done) -> None:
        """An operator's kick (or lock) of ``key``, whose session is not on
        this node: the node that holds it ends it. ``done(node_id)``;
        ``done(None)`` if it is online nowhere, ``done(False)`` if Redis
        cannot say."""
        def found(reply) -> None:
            if isinstance(reply, RedisError):
                done(False)
                return
            if not reply or not reply[0] or not reply[1]:
                done(None)  # no record, or detached (no node): nothing to end now
                return
            node_id, epoch = _s(reply[0]), _s(reply[1])
            self.post(node_id, f"O {key} {epoch}", text.encode())
            done(node_id)

        self.link.command("HMGET", f"selchat:u:{key}", "node", "epoch", callback=found)

    def _on_operator_kick(self, key, epoch, fields, payload) -> None:
        """O: an operator on another node kicked (or locked) this session."""
        if self._local(key, epoch) is not None:  # still the session the operator's node saw
            self.server.registry.kick(key, payload.decode())

    def _on_release(self, key, epoch, fields, payload) -> None:
        """R: the old holder let go of the session (payload: the events it
        handed over, after an M)."""
        callbacks = self.releases.pop((key, epoch), None)
        if callbacks is None:  # before the reply to our claim: remember it a while
            now = time.monotonic()
            self.released[(key, epoch)] = (now, payload)
            if len(self.released) > 1000:
                self.released = {k: v for k, v in self.released.items() if now - v[0] < RELEASE_WAIT}
            return
        for callback in callbacks:
            callback(True, payload)

    def _on_delivery(self, key, epoch, fields, payload) -> None:
        sname, snode, sepoch, sv2 = fields[3], fields[4], fields[5], fields[6] == "1"
        seq, count = int(fields[7]), int(fields[8])
        session = self._local(key, epoch)
        if session is None:
            if (key, epoch) in self.moved:  # moved away: its new node replays it from Redis
                return
        sender = self.remote(sname.lower(), sname, snode, sepoch, sv2) if sname != "-" else None
        if session is None:  # it ended (or was taken over) while this was on the way
            if sender is not None and sender.outbox is not None and count:
                last = seq + max(count, 1) - 1
                sender.deliver(ev.Undelivered(seq, last, "gone", "your partner left"))
            return
        if count == 0:
            session.deliver(_event(payload))
            return
        self._write_relayed(session, sender, int(fields[9]), count, seq, payload)
        session.hold_back(self._feeder(sender))

    def _write_relayed(self, session, sender: RemoteUser, pos: int, count: int, seq: int, payload: bytes) -> None:
        """Chat messages relayed to ``session`` (from RELAY, or replayed from
        its in: list after a move), the first at position ``pos`` among all
        relayed to it: those it has already are skipped."""
        journal = session.journal
        if journal is not None and pos:
            last = pos + max(count, 1) - 1
            if last <= journal.got:
                return
            if pos <= journal.got:  # only part of a block is new (count > 1)
                skip = journal.got - pos + 1
                payload = _skip_messages(payload, skip)
                count -= skip
                seq += skip
        if count > 0:
            session.deliver_block(sender, payload, count, seq)
        else:
            session.deliver(_event(payload), sender, seq)
        if journal is not None and pos:
            journal.written(last)

    def _feeder(self, sender: RemoteUser) -> RemoteFeeder:
        feeder = self.feeders.get((sender.key, sender.epoch))
        if feeder is None:
            feeder = self.feeders[(sender.key, sender.epoch)] = RemoteFeeder(sender)
        return feeder

    def _on_flow(self, key, epoch, fields, payload) -> None:
        session = self._local(key, epoch)
        if session is None or session.chat is None:
            return
        partner = session.partner
        if isinstance(partner, RemoteUser):
            go = fields[3] == "go"
            partner.blocked = not go
            if go:
                session.chat.resume(PARTNER)
            else:
                session.chat.pause(PARTNER)  # and RemoteUser.hold_back keeps it so

    #: What a session being moved here (RESUME) is told or sent before it is.
    _WAIT_FOR_ARRIVAL = frozenset("EXSD")
    _HANDLERS = {
        "E": _on_event, "X": _on_ended, "S": _on_started, "K": _on_kick, "R": _on_release,
        "D": _on_delivery, "F": _on_flow, "M": _on_move, "P": _on_partner_moved, "O": _on_operator_kick,
        "L": _on_lost,
    }

    def close(self) -> None:
        self.reactor.wake_check = None
        for timer in (self._renew, self._reap):
            if timer is not None:
                timer.cancel()
        self.link.close()
        self.sub.close()
