"""One accepted socket: transport <-> protocol Connection <-> the server's policy.

A Peer is the transport's protocol object. Bytes go into its ``Connection``;
each event that comes out is handed to the ``Server``. Reading can be paused
for several independent reasons (a password check in flight, our own output
backed up, the partner's output backed up); it resumes when none is left, and
events already buffered are handled then, so nothing that arrived is lost.
"""

from __future__ import annotations

import logging
import random

from selchat.protocol import events as ev
from selchat.protocol.connection import SERVER, Connection
from selchat.protocol.state import State

log = logging.getLogger("selchat.server")

# Reasons to stop reading, as bits of Peer.paused.
WAITING = 1      # a worker is checking a password or looking up a user
BACKLOG = 2      # our own output buffer is over its high-water mark
PARTNER = 4      # the login socket we feed is over its high-water mark
FLOOD = 8        # over the rate limit: wait for tokens


class ReadPausing:
    """Reading paused for reasons, one bit each (``WAITING``, ``BACKLOG``,
    ``PARTNER``, ``FLOOD``): the socket is read again, and what it had
    buffered handled, once no reason is left. Shared by ``Peer`` and the IRC
    front end's connection, which have ``paused``, ``feeders``, ``server``,
    ``process()`` and ``reader()`` (the transport to pause)."""

    __slots__ = ()

    def pause(self, reason: int) -> None:
        if not self.paused:
            self.reader().pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        reader = self.reader()
        if not self.paused and not reader.closing:
            reader.resume_reading()
            # Frames that arrived before the pause are still buffered.
            self.server.reactor.call_soon(self.process)

    def feed_paused_by(self, feeder: "Peer") -> None:
        """``feeder`` writes into us and we are congested: stop reading it."""
        feeder.pause(PARTNER)
        self.feeders.append(feeder)

    def resume_feeders(self) -> None:
        feeders, self.feeders = self.feeders, []
        for feeder in feeders:
            feeder.resume(PARTNER)


class Peer(ReadPausing):
    # AWAY and BACK (a partner's connection lost, then back) are version 2
    # frames: a version 2 session gets them through its outbox, and a version
    # 1 client would not know them (Session.deliver).
    hears_presence = False

    __slots__ = (
        "server", "transport", "conn", "session", "deadline", "failures",
        "paused", "congested", "feeders", "address", "host",
        "cmd_bucket", "msg_bucket", "prelogin_bytes", "prelogin_frames", "stuck", "version", "received",
        "received_timer", "received_pending", "received_after", "fated_seen",
    )

    def __init__(self, server, address, cmd_bucket):
        self.server = server
        self.address = address
        self.host = address[0] if isinstance(address, tuple) else str(address)
        self.transport = None
        self.conn = Connection(SERVER)
        self.session = None        # set once logged in or attached
        self.deadline = None       # login/attach deadline timer of a fresh socket
        self.failures = 0          # failed logins on this socket
        self.paused = 0
        self.congested = False     # our output is over the high-water mark
        self.feeders: list = []    # chat peers paused because we are congested
        self.cmd_bucket = cmd_bucket    # rate limit of every frame but chat messages
        self.msg_bucket = cmd_bucket    # the chat socket gets its own for messages
        self.prelogin_bytes = 0    # input before logging in or attaching
        self.prelogin_frames = 0
        self.stuck = None          # timer: output congested for too long
        self.version = 1           # protocol version asked for with VERSION (login socket)
        self.received = 0          # version 2 chat socket: the last seq said RECEIVED
        self.received_timer = None # version 2 chat socket: RECEIVED is due when it fires
        self.received_pending = False  # ...and it is set to fire
        self.received_after = None # ...and not before this (reactor clock; set by the last look that found one owed)
        self.fated_seen = 0        # ...the session's last fate when that timer was set

    # -- from the transport ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            self.prelogin_bytes += len(data)
            if self.prelogin_bytes > self.server.config.prelogin_bytes:
                self.close(ev.Bye("too-much", "too much input before login"))
                return
        self.conn.receive_data(data)
        self.process()

    def eof_received(self) -> None:
        self.conn.receive_data(b"")
        self.process()

    def connection_lost(self, exc) -> None:
        self.resume_feeders()
        self.server.peer_lost(self, exc)

    def pause_writing(self) -> None:
        self.congested = True
        self.pause(BACKLOG)
        self.stuck = self.server.reactor.call_later(self.server.config.stuck_timeout, self.server.peer_stuck, self)

    def resume_writing(self) -> None:
        self.congested = False
        if self.stuck is not None:
            self.stuck.cancel()
            self.stuck = None
        self.resume(BACKLOG)
        self.resume_feeders()

    # -- events -------------------------------------------------------------------

    def received_due(self) -> None:
        """Version 2 chat socket: chat messages were taken (relayed or
        refused); ``RECEIVED <seq>`` for all of them goes out within
        ``RECEIVED_DELAY``, one for every read meanwhile, but no sooner than
        about ``RECEIVED_SPACING`` after the previous one (a stream whose
        fates do not come gets one every two seconds or so)."""
        if self.received_pending:
            return
        self.received_pending = True
        self.fated_seen = self.session.fated
        delay = ev.RECEIVED_DELAY
        if self.received_after is not None:
            delay = max(delay, self.received_after - self.server.reactor.clock())
        timer = self.received_timer
        if timer is None:
            self.received_timer = self.server.reactor.call_later(delay, self.say_received)
        else:  # it fired: re-arm it
            timer.reset(delay)

    def say_received(self) -> None:
        """``RECEIVED`` for every chat message read since the last one,
        unless a fate (on the login socket) has already said it: the server
        takes messages in order, so a fate for seq n means it had them all up
        to n (docs/protocol.md). If a fate went out while the timer ran, the
        partner's client is acknowledging and the next fate will say it
        too: look again a spacing later instead, so that a stream between
        two users who are both there costs no ``RECEIVED`` at all."""
        self.received_pending = False
        seq = self.conn.msg_seq
        session = self.session
        journal = session.journal
        if journal is not None and journal.durable < seq:
            seq = journal.durable  # a cluster says RECEIVED only for what Redis has
        fated = session.fated
        if seq <= self.received or seq <= fated:
            return
        # 0.75 to 1.25 times the spacing: sessions that started together
        # (a resume storm) do not stay in step.
        self.received_after = self.server.reactor.clock() + ev.RECEIVED_SPACING * (0.75 + random.random() / 2)
        if fated > self.fated_seen:
            self.received_due()  # a fate went out meanwhile, and more are coming: look again then
            return
        self.received = seq
        self.send(ev.Received(seq))

    def process(self) -> None:
        """Hand every buffered event to the server, unless reading is paused.

        Each handled frame takes a token from this socket's bucket (chat
        messages from their own); once one runs dry, reading pauses until
        tokens come back, so a flood is slowed, not dropped.
        """
        conn = self.conn
        next_event, handle, clock = conn.next_event, self.server.handle, self.server.reactor.clock
        cmd, msg = self.cmd_bucket, self.msg_bucket
        if msg is not None:  # on a login or check socket, the same bucket as cmd
            msg.refill(clock())
        # A chat socket's command bucket is refilled on its first use: chat
        # messages alone (the relay's fast path) never touch it.
        cmd_fresh = cmd is None or cmd is msg
        try:
            while not self.paused and not self.transport.closing:
                session = self.session
                if session is not None and session.partner is not None and session.chat is self:
                    # Fast path: a run of plain chat messages, relayed as one block.
                    batch = conn.next_messages(int(msg.tokens) if msg is not None else 1 << 30)
                    if batch is not None:
                        self.server.relay(self, session, *batch)
                        if msg is not None:
                            msg.tokens -= batch[1]
                            if msg.tokens < 1.0 and not self.refilled(msg):
                                self.throttle(msg)
                                return
                        if not conn.buffered:
                            return  # the usual case: the whole read was one block
                        continue
                    outbox = session.outbox
                    if outbox is not None:
                        # Version 2: an ACK that rides ahead of the messages.
                        ack = conn.next_ack(outbox.acked, outbox.last_id)
                        if ack is not None:
                            self.server.registry.acknowledge(self, session, ack)
                            continue
                elif session is not None and session.check is self and session.outbox is not None:
                    # Fast path: one ACK of new events (what a client sends on its own).
                    outbox = session.outbox
                    ack = conn.next_ack(outbox.acked, outbox.last_id)
                    if ack is not None:
                        self.server.registry.acknowledge(self, session, ack)
                        if not conn.buffered:
                            return  # the usual case: the read was that one ACK
                        continue
                event = next_event()
                if event is ev.NEED_DATA:
                    return
                if session is None and not self.prelogin_frame():
                    return
                etype = type(event)
                if etype is ev.Ack and self.acknowledges_new(event):
                    handle(self, event)  # bounded by what we sent: not rate limited
                    continue
                handle(self, event)
                bucket = msg if etype is ev.Message else cmd
                if bucket is not None:
                    if not cmd_fresh and bucket is cmd:
                        cmd.refill(clock())
                        cmd_fresh = True
                    bucket.tokens -= 1.0
                    if bucket.tokens < 1.0 and not self.refilled(bucket):
                        self.throttle(bucket)
                        return
        except Exception as exc:
            # A bug met by this client's input: drop this client, not the loop.
            log.exception("error handling %r; closing it", self)
            self.transport.on_error(exc)

    def acknowledges_new(self, event: ev.Ack) -> bool:
        """Whether an ACK acknowledges events not acknowledged yet: those
        are not rate limited (there can be at most one per event sent); a
        repeated or out-of-range one costs a command token like any other
        frame."""
        outbox = self.session.outbox
        return outbox is not None and outbox.acked < event.id <= outbox.last_id

    def prelogin_frame(self) -> bool:
        """Count a frame received before login; False (and closed) past the cap."""
        self.prelogin_frames += 1
        if self.prelogin_frames > self.server.config.prelogin_frames:
            self.close(ev.Bye("too-much", "too many frames before login"))
            return False
        return True

    def refilled(self, bucket) -> bool:
        """Refill from the clock; True if a token is back already (a high
        rate must not wait for the next timer tick)."""
        bucket.refill(self.server.reactor.clock())
        return bucket.tokens >= 1.0

    def reader(self):
        return self.transport

    def throttle(self, bucket) -> None:
        self.pause(FLOOD)
        self.server.reactor.call_later(bucket.wait(), self.resume, FLOOD)

    # -- to the socket ------------------------------------------------------------

    def send(self, event: ev.Event) -> None:
        if self.transport.closing or self.conn.state is State.CLOSED:
            return
        self.transport.write(self.conn.send(event))

    def close(self, bye: ev.Bye | None = None) -> None:
        """Send ``bye`` if given, flush, close."""
        if bye is not None:
            self.send(bye)
        self._cancel_timers()
        self.transport.close()

    def close_now(self) -> None:
        """Drop the socket without a word or a flush (its session let go of it)."""
        self._cancel_timers()
        self.resume_feeders()
        self.transport.abort()

    def _cancel_timers(self) -> None:
        for timer in (self.deadline, self.stuck, self.received_timer):
            if timer is not None:
                timer.cancel()
        self.deadline = self.stuck = self.received_timer = None
        self.received_pending = False

    def __repr__(self) -> str:
        who = self.session.name if self.session is not None else "-"
        return f"<Peer {self.address} {self.conn.state.name} {who}>"
