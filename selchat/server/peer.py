"""One accepted socket: transport <-> protocol Connection <-> the server's policy.

A Peer is the transport's protocol object. Bytes go into its ``Connection``;
each event that comes out is handed to the ``Server``. Reading can be paused
for several independent reasons (a password check in flight, our own output
backed up, the partner's output backed up); it resumes when none is left, and
events already buffered are handled then, so nothing that arrived is lost.
"""

from __future__ import annotations

import logging

from selchat.protocol import events as ev
from selchat.protocol.connection import SERVER, Connection
from selchat.protocol.state import State

log = logging.getLogger("selchat.server")

# Reasons to stop reading, as bits of Peer.paused.
WAITING = 1      # a worker is checking a password or looking up a user
BACKLOG = 2      # our own output buffer is over its high-water mark
PARTNER = 4      # the login socket we feed is over its high-water mark


class Peer:
    __slots__ = (
        "server", "transport", "conn", "session", "deadline", "failures",
        "paused", "congested", "feeders", "address",
    )

    def __init__(self, server, address):
        self.server = server
        self.address = address
        self.transport = None
        self.conn = Connection(SERVER)
        self.session = None        # set once logged in or attached
        self.deadline = None       # login/attach deadline timer of a fresh socket
        self.failures = 0          # failed logins on this socket
        self.paused = 0
        self.congested = False     # our output is over the high-water mark
        self.feeders: list = []    # chat peers paused because we are congested

    # -- from the transport ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
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

    def resume_writing(self) -> None:
        self.congested = False
        self.resume(BACKLOG)
        self.resume_feeders()

    # -- events -------------------------------------------------------------------

    def process(self) -> None:
        """Hand every buffered event to the server, unless reading is paused."""
        next_event, handle = self.conn.next_event, self.server.handle
        try:
            while not self.paused and not self.transport.closing:
                event = next_event()
                if event is ev.NEED_DATA:
                    return
                handle(self, event)
        except Exception as exc:
            # A bug met by this client's input: drop this client, not the loop.
            log.exception("error handling %r; closing it", self)
            self.transport.on_error(exc)

    def pause(self, reason: int) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.transport.closing:
            self.transport.resume_reading()
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

    # -- to the socket ------------------------------------------------------------

    def send(self, event: ev.Event) -> None:
        if self.transport.closing or self.conn.state is State.CLOSED:
            return
        self.transport.write(self.conn.send(event))

    def close(self, bye: ev.Bye | None = None) -> None:
        """Send ``bye`` if given, flush, close."""
        if bye is not None:
            self.send(bye)
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.transport.close()

    def __repr__(self) -> str:
        who = self.session.name if self.session is not None else "-"
        return f"<Peer {self.address} {self.conn.state.name} {who}>"
