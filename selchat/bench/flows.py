"""The measuring loop: flows of numbered, timestamped messages over ready sockets.

A *flow* is one direction of one pair: the sender's socket (selchat: its
chat socket; baseline: its only socket) and the partner's receiving socket
(selchat: its login socket). Each message's text is

    <seq:10 digits> <send time, monotonic ns:19 digits> <x padding>

to ``--size`` bytes. The receiver checks that the sequence numbers arrive
exactly in order, and records ``receive time - send time`` (one clock, since
both ends live in the same worker process, and CLOCK_MONOTONIC is one clock
for the whole machine anyway).

The loop is closed: a flow keeps ``window`` messages in flight, and every
batch that arrives frees room that is refilled at once with one ``send()``
(all messages of a batch share one timestamp: the moment of that send).

With protocol version 2 the receiver's login socket also counts its frames
and acknowledges them as the selchat client does, batched: one ``ACK <last
id>`` on its check socket ``ACK_DELAY`` after the first frame not yet
acknowledged (but not before about ``ACK_SPACING`` after its previous timed
one), or at once when ``ACK_EVERY`` wait; the sender's login socket gets ``DELIVERED <first> <last>``
receipts (numbered and acknowledged too), which must cover every message
exactly once, in order; the sender's chat socket gets ``RECEIVED <seq>``,
which is checked and otherwise ignored (``V2LoginConn``, ``V2ChatConn``).
A version 2 window ends when every message has arrived *and* been reported
delivered to its sender.

Costs are kept out of the loop: frames are made by one ``%`` each from a
template built once per batch; a received chunk is parsed by one regular
expression call and checked and timed by C-level ``map``/``list`` calls,
not by a Python loop per message (under 1 us per message sent and received,
Python side, at 32 in flight).
"""

from __future__ import annotations

import heapq
import os
import random
import re
import selectors
import time
from array import array
from itertools import repeat

from selchat.bench.sysinfo import machine_busy_seconds
from selchat.protocol.events import ACK_DELAY, ACK_EVERY, ACK_GRACE, ack_rest

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
RECV_SIZE = 256 * 1024
ACK_DELAY_NS = int(ACK_DELAY * 1e9)
ACK_GRACE_NS = int(ACK_GRACE * 1e9)
ACK_POLL = 0.005       # seconds: how often a window looks for ACKs due (while any are)


def rest_ns() -> int:
    """A rest after a timed ACK, drawn as the selchat client draws it
    (``ack_rest``)."""
    return int(ack_rest(ACK_DELAY, random.random()) * 1e9)


HEADER = 31            # "<seq:10> <stamp:19> " before the padding
MIN_SIZE = HEADER + 1  # at least one byte of padding

# " <seq> <stamp> x" in "MSG alice ..." (selchat) or "from alice ..." (baseline). Unanchored
# it is twice as fast; a chunk must still hold exactly one match per line.
_RX = re.compile(rb" (\d{10}) (\d{19}) x")
FINDALL = _RX.findall
SEARCH = _RX.search
# A receipt (version 2). Unanchored: "UNDELIVERED 1 2 away ..." does not match
# (its numbers are followed by a code), nor does a message of ours (digits and x).
_DELIVERED = re.compile(rb"DELIVERED (\d+) (\d+)\n")
DELIVERED_FINDALL = _DELIVERED.findall
_RECEIVED = re.compile(rb"RECEIVED (\d+)\n")
RECEIVED_FINDALL = _RECEIVED.findall

monotonic_ns = time.monotonic_ns


def whole_lines(piece: bytes, data: bytes) -> tuple[bytes, bytes]:
    """``data`` read after ``piece`` (a line's start from the last read): the
    whole lines, and the piece of a line they leave for the next read."""
    if piece:
        data = piece + data
    if data[-1] == 10:
        return data, b""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


class Fleet:
    """All the sockets of one worker for one server: one selector, flows, problems."""

    def __init__(self, kind: str, version: int = 1):
        self.kind = kind
        self.version = version  # selchat protocol version 2: a window also waits for the receipts
        self.selector = selectors.DefaultSelector()
        self.flows: list[Flow] = []
        self.conns: list[Conn] = []
        self.problems: list[str] = []
        self.problem_count = 0
        self.pings = 0
        # Version 2: login sockets with an ACK due, and when (monotonic ns);
        # acknowledgements are batched as the selchat client batches them.
        # Every entry is its insertion time + ACK_DELAY_NS, so the dict's
        # order is the order they fall due.
        self.acks_due: dict["V2LoginConn", int] = {}
        # Login sockets resting after a timed ACK: a heap of (until when,
        # id, conn), the rest drawn as the client draws it (``rest_ns``).
        self.resting: list[tuple[int, int, "V2LoginConn"]] = []
        # --rate: flows whose next top-up waits for its time, (monotonic ns, n, flow).
        self.paced: list[tuple[int, int, "Flow"]] = []

    def send_due_acks(self, now: int) -> None:
        """The ACKs due by ``now``, and the rests over by then: the heads of
        ``acks_due`` (in due order) and ``resting`` (a heap), so a loop turn
        costs the ACKs it sends, not one look per login socket. A rest that
        ends with frames unacknowledged starts the delay for them."""
        due, resting = self.acks_due, self.resting
        ready = []
        for conn, when in due.items():
            if when > now:
                break
            ready.append((conn, when))
        for conn, when in ready:
            del due[conn]
            conn.ack()
            self.rest(conn, when)
        while resting and resting[0][0] <= now:
            conn = heapq.heappop(resting)[2]
            conn.resting = False
            if conn.wire_id > conn.acked:
                due[conn] = now + ACK_DELAY_NS

    def rest(self, conn: "V2LoginConn", start: int) -> None:
        """``conn`` sent its timed ACK at ``start``: no delay starts for it
        until the rest is over."""
        conn.resting = True
        heapq.heappush(self.resting, (start + rest_ns(), id(conn), conn))

    def add(self, conn: "Conn") -> "Conn":
        conn.sock.setblocking(False)
        self.selector.register(conn.sock, EVENT_READ, conn)
        self.conns.append(conn)
        return conn

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < 20:
            self.problems.append(text)

    def keepalive(self, timeout: float = 0) -> None:
        """Between timed runs: answer PINGs, notice drops."""
        for key, mask in self.selector.select(timeout):
            conn = key.data
            if mask & EVENT_READ:
                conn.on_read()
            if mask & EVENT_WRITE:
                conn.on_writable()
        self.send_due_acks(monotonic_ns())

    # -- the timed window ------------------------------------------------------------

    def run(self, window: int, duration: float, start_ns: int, drain_timeout: float = 10.0,
            progress=None, slot: int = 0, burst: int = 0, pace_ns: int = 0) -> dict:
        """One timed window: start at ``start_ns``, keep ``window`` messages in
        flight per flow for ``duration`` seconds, then stop sending and wait for
        everything in flight. Returns counts, latencies and our own CPU time.

        ``burst`` (warm-up only): the first flow keeps that many in flight
        instead, so the server gets reads as large as its buffer.

        ``pace_ns`` (``--rate``): a flow tops up at most once per ``pace_ns``
        (the flows' first sends spread over one period), so the offered load
        is at most flows x window / period whatever the server's speed."""
        flows = self.flows
        lat = array("q")
        base = [(f.sent, f.received) for f in flows]
        reads0 = sum(f.reads for f in flows)
        late0, gaps0, problems0 = self.late_gaps() + (self.problem_count,)
        samples0 = len(self.problems)
        paced = self.paced
        paced.clear()
        for i, f in enumerate(flows):
            f.window, f.lat, f.pace = window, lat, pace_ns
            f.next_ns = start_ns + pace_ns * i // len(flows)
            f.queued = False
        if burst and flows:
            flows[0].window = max(window, burst)
        wait = (start_ns - monotonic_ns()) / 1e9
        if wait > 0:
            time.sleep(wait)
        busy0 = machine_busy_seconds()
        cpu0 = os.times()
        t0 = monotonic_ns()
        end = t0 + int(duration * 1e9)
        for f in flows:
            f.sending = True
            f.top_up()
        select = self.selector.select
        received = 0
        last_rx = t0
        drain_until = None
        acks_due = self.acks_due
        while True:
            now = monotonic_ns()
            if acks_due or self.resting:
                self.send_due_acks(now)
                timeout = ACK_POLL
            else:
                timeout = (end - now) / 1e9 if drain_until is None else 0.05
            if paced:
                self.send_paced(now)
                if paced:
                    timeout = min(timeout, (paced[0][0] - now) / 1e9)
            got = 0
            for key, mask in select(timeout if timeout > 0 else 0):
                conn = key.data
                if mask & EVENT_READ:
                    got += conn.on_read()
                if mask & EVENT_WRITE:
                    conn.on_writable()
            if got:
                received += got
                last_rx = monotonic_ns()
                if progress is not None:
                    progress[slot] = received
            if drain_until is None:
                if monotonic_ns() >= end:
                    for f in flows:
                        f.sending = False
                    drain_until = monotonic_ns() + int(drain_timeout * 1e9)
            elif all(f.sent == f.received for f in flows) and (
                    self.version < 2 or all(f.sent == f.delivered for f in flows)) \
                    or monotonic_ns() >= drain_until:
                break
        cpu = os.times()
        busy = machine_busy_seconds() - busy0
        sent = sum(f.sent - s for f, (s, _) in zip(flows, base))
        got_total = sum(f.received - r for f, (_, r) in zip(flows, base))
        late, gaps = self.late_gaps()
        return {
            "t0_ns": t0, "last_rx_ns": last_rx, "sent": sent, "received": got_total,
            "rx_reads": sum(f.reads for f in flows) - reads0,
            "lost": sum(f.sent - f.received for f in flows),
            "unconfirmed": sum(f.sent - f.delivered for f in flows) if self.version >= 2 else 0,
            "reordered": late - late0, "gaps": gaps - gaps0,
            "problems": self.problem_count - problems0, "problem_samples": self.problems[samples0:samples0 + 5],
            "gen_user": cpu.user - cpu0.user, "gen_sys": cpu.system - cpu0.system,
            "machine_busy": busy, "lat": lat.tobytes(),
        }

    def send_paced(self, now: int) -> None:
        """Top up the flows whose pacing slot has come."""
        paced = self.paced
        while paced and paced[0][0] <= now:
            flow = heapq.heappop(paced)[2]
            flow.queued = False
            if flow.sending:
                flow.top_up()

    def late_gaps(self) -> tuple[int, int]:
        return sum(f.late for f in self.flows), sum(f.gaps for f in self.flows)

    def close(self) -> None:
        for conn in self.conns:
            conn.sock.close()
        self.selector.close()


class Conn:
    """A socket in a fleet that should not say anything (a chat socket: the
    server answers a delivered message with nothing). Also does the writing."""

    __slots__ = ("sock", "fleet", "label", "outbuf", "dead")

    def __init__(self, sock, fleet: Fleet, label: str):
        self.sock, self.fleet, self.label = sock, fleet, label
        self.outbuf = None
        self.dead = False

    def write(self, data: bytes) -> None:
        if self.dead:
            return  # already reported; what it should have sent counts as lost
        if self.outbuf is not None:
            self.outbuf += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(f"send failed: {exc}")
            return
        if sent < len(data):
            self.outbuf = bytearray(data[sent:])
            self.fleet.selector.modify(self.sock, EVENT_READ | EVENT_WRITE, self)

    def on_writable(self) -> None:
        if self.outbuf is None or self.dead:
            return
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"send failed: {exc}")
            return
        del self.outbuf[:sent]
        if not self.outbuf:
            self.outbuf = None
            self.fleet.selector.modify(self.sock, EVENT_READ, self)

    def recv(self) -> bytes | None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._lost(f"recv failed: {exc}")
            return None
        if not data:
            self._lost("closed by the server")
            return None
        return data

    def _lost(self, why: str) -> None:
        if not self.dead:
            self.dead = True
            self.fleet.problem(f"{self.label}: {why}")
            self.fleet.selector.unregister(self.sock)

    def on_read(self) -> int:
        data = self.recv()
        if data:
            self.fleet.problem(f"{self.label}: unexpected {data[:120]!r}")
        return 0


class CheckConn(Conn):
    """A selchat check socket: answers the server's PINGs."""

    __slots__ = ()

    def on_read(self) -> int:
        data = self.recv()
        if not data:
            return 0
        for line in data.split(b"\n"):  # PINGs are tiny: one never spans two reads
            if line.startswith(b"PING"):
                self.write(b"PONG" + line[4:] + b"\n")
                self.fleet.pings += 1
            elif line:
                self.fleet.problem(f"{self.label}: unexpected {line[:120]!r}")
        return 0


class RxConn(Conn):
    """A socket that receives one flow (and may also send another: baseline)."""

    __slots__ = ("flow",)

    def __init__(self, sock, fleet: Fleet, label: str, flow: "Flow"):
        super().__init__(sock, fleet, label)
        self.flow = flow

    def on_read(self) -> int:
        if self.flow is None:  # a baseline sender in a one-direction run
            return Conn.on_read(self)
        data = self.recv()
        if not data:
            return 0
        return self.flow.receive(data, monotonic_ns())


def filler(size: int, text: str) -> bytes:
    """``size`` bytes of message text: ASCII x's, or (``utf8``) an x (the
    receiver's pattern ends with it) and then é's, two bytes each, as a chat
    in most languages other than English has."""
    if text == "utf8":
        return b"x" + "é".encode() * ((size - 1) // 2) + b"x" * ((size - 1) % 2)
    return b"x" * size


class Flow:
    """One direction of one pair: what was sent, what arrived, in what order."""

    __slots__ = ("tx", "fleet", "head", "tail", "window", "sent", "received", "expected",
                 "late", "gaps", "rxbuf", "lat", "sending", "delivered", "accepted", "reads", "acker",
                 "pace", "next_ns", "queued")

    def __init__(self, fleet: Fleet, tx: Conn, prefix: bytes, size: int, text: str = "ascii"):
        if size < MIN_SIZE:
            raise ValueError(f"message size must be at least {MIN_SIZE} bytes")
        self.fleet, self.tx = fleet, tx
        self.head = prefix + b"%010d "                      # b"MSG %010d " or b"to bob %010d "
        self.tail = b" " + filler(size - HEADER, text) + b"\n"
        self.window = 1
        self.sent = 0          # messages handed to send() (seq of the last one)
        self.received = 0      # messages that arrived
        self.expected = 1      # next sequence number due
        self.late = 0          # arrived after a higher number (reordered) or twice
        self.gaps = 0          # numbers skipped when a higher one arrived
        self.rxbuf = b""       # an incomplete last line
        self.lat = array("q")
        self.sending = False
        self.delivered = 0     # version 2: the last seq reported DELIVERED to the sender
        self.accepted = 0      # version 2: the last seq the server said RECEIVED
        self.reads = 0         # reads of the receiving socket that brought messages
        self.acker = None      # version 2: the sender's login socket, whose ripe ACK rides with our messages
        self.pace = 0          # --rate: at most one top-up per this many ns (0: whenever there is room)
        self.next_ns = 0       # --rate: the earliest time of the next top-up
        self.queued = False    # --rate: waiting in Fleet.paced for that time

    def top_up(self) -> None:
        """Send enough to have ``window`` in flight, in one send(); when paced,
        not before the flow's next slot (it waits in ``Fleet.paced``)."""
        k = self.window - (self.sent - self.received)
        if k <= 0:
            return
        now = monotonic_ns()
        if self.pace:
            if now < self.next_ns:
                if not self.queued:
                    self.queued = True
                    heapq.heappush(self.fleet.paced, (self.next_ns, id(self), self))
                return
            # The next slot one period on. A flow that fell behind (the
            # server cannot take the rate) makes up at most one period: it
            # then sends whenever it has room, and the report shows the rate
            # it got.
            self.next_ns = max(self.next_ns + self.pace, now - self.pace)
        first = self.sent + 1
        self.sent += k
        template = self.head + b"%019d" % now + self.tail
        ack = self.acker.ripe_ack(now) if self.acker is not None else b""
        if k == 1:
            self.tx.write(ack + template % first)
        else:
            self.tx.write(b"".join([ack, *[template % seq for seq in range(first, first + k)]]))

    def send_one(self) -> None:
        """One more message regardless of the window (paced, open-loop sending)."""
        self.sent += 1
        now = monotonic_ns()
        ack = self.acker.ripe_ack(now) if self.acker is not None else b""
        self.tx.write(ack + self.head % self.sent + b"%019d" % now + self.tail)

    def receive(self, data: bytes, now: int, others: int = 0) -> int:
        """Account for a chunk read from the receiving socket; returns messages
        in it. ``others``: lines in it that are not messages and were accounted
        for by the caller (version 2 receipts)."""
        data, self.rxbuf = whole_lines(self.rxbuf, data)
        if not data:
            return 0
        found = FINDALL(data)
        n = len(found)
        if n + others != data.count(b"\n"):
            return self._odd_lines(data, now)
        if not n:
            return 0
        seqs, stamps = zip(*found)
        first = self.expected
        self.expected = first + n
        if list(map(int, seqs)) != list(range(first, first + n)):
            self._misordered(seqs, first)
        if stamps[0] == stamps[-1]:  # one burst (stamps only grow): one latency for all
            self.lat.extend(repeat(now - int(stamps[0]), n))
        else:
            self.lat.extend(map(now.__sub__, map(int, stamps)))
        self.received += n
        self.reads += 1
        if self.sending:
            self.top_up()
        return n

    def _misordered(self, seqs, first: int) -> None:
        """Slow path: redo the order check message by message."""
        expected = first
        for seq in map(int, seqs):
            if seq == expected:
                expected += 1
            elif seq > expected:
                self.gaps += seq - expected
                expected = seq + 1
            else:
                self.late += 1
        self.expected = expected

    def _odd_lines(self, data: bytes, now: int) -> int:
        """Slow path: a chunk holding something other than our messages."""
        n = 0
        for line in data.split(b"\n")[:-1]:
            m = SEARCH(line)
            if m is None:
                if line.startswith(b"DELIVERED ") and DELIVERED_FINDALL(line + b"\n"):
                    continue  # accounted for by the caller (version 2)
                self.fleet.problem(f"{self.tx.label} partner got {line[:120]!r}")
                continue
            n += 1
            seq = int(m.group(1))
            if seq != self.expected:
                self._misordered([seq], self.expected)
            else:
                self.expected += 1
            self.lat.append(now - int(m.group(2)))
        self.received += n
        self.reads += n > 0
        if self.sending and n:
            self.top_up()
        return n


# -- protocol version 2 ---------------------------------------------------------------

class V2LoginConn(Conn):
    """A version 2 login socket: ``MSG`` frames of the incoming flow (if any)
    and ``DELIVERED`` receipts for the outgoing one (if any), every frame
    counted and acknowledged as the selchat client does (after they are
    handled): one ``ACK <last id>`` on the check socket ``ACK_DELAY`` after
    the first frame not acknowledged, or at once when ``ACK_EVERY`` wait;
    in the last ``ACK_GRACE`` of the delay, ahead of this user's next chat
    message instead (``ripe_ack``). After a timed ACK the socket rests
    (``Fleet.resting``): frames that come then start the delay only once
    the rest is over (about ``ACK_SPACING`` after the previous delay began)."""

    __slots__ = ("flow", "out", "check", "wire_id", "acked", "buf", "resting")

    def __init__(self, sock, fleet: Fleet, label: str, flow: "Flow | None", out: "Flow | None",
                 check: Conn, wire_id: int):
        super().__init__(sock, fleet, label)
        self.flow, self.out, self.check = flow, out, check
        self.wire_id = wire_id  # the id of the last frame read (setup's READY, STARTED... included)
        self.acked = wire_id
        self.buf = b""
        self.resting = False  # in Fleet.resting, after a timed ACK

    def ack(self) -> None:
        if self.wire_id > self.acked:
            self.acked = self.wire_id
            self.check.write(b"ACK %d\n" % self.wire_id)

    def ripe_ack(self, now: int) -> bytes:
        """The ACK to put ahead of a chat message sent ``now``: due within
        ``ACK_GRACE``, or none (b"")."""
        due = self.fleet.acks_due.get(self)
        if due is None or now < due - ACK_GRACE_NS or self.wire_id <= self.acked:
            return b""
        del self.fleet.acks_due[self]
        self.fleet.rest(self, due)
        self.acked = self.wire_id
        return b"ACK %d\n" % self.wire_id

    def on_read(self) -> int:
        data = self.recv()
        if not data:
            return 0
        data, self.buf = whole_lines(self.buf, data)
        if not data:
            return 0
        now = monotonic_ns()
        receipts = DELIVERED_FINDALL(data) if b"DELIVERED " in data else ()
        if receipts:
            self._receipts(receipts)
        n = 0
        if self.flow is not None:
            n = self.flow.receive(data, now, len(receipts))
        elif len(receipts) != data.count(b"\n"):
            for line in data.split(b"\n")[:-1]:
                if not line.startswith(b"DELIVERED "):
                    self.fleet.problem(f"{self.label}: unexpected {line[:120]!r}")
        self.wire_id += data.count(b"\n")
        if self.wire_id - self.acked >= ACK_EVERY:
            self.fleet.acks_due.pop(self, None)
            self.ack()
        elif not self.resting and self not in self.fleet.acks_due:
            self.fleet.acks_due[self] = now + ACK_DELAY_NS
        return n

    def _receipts(self, receipts) -> None:
        """DELIVERED ranges must follow on from each other, each message once,
        and never cover one that has not arrived."""
        out = self.out
        if out is None:
            self.fleet.problem(f"{self.label}: a receipt for a user who sent nothing: {receipts[0]!r}")
            return
        for first, last in receipts:
            first, last = int(first), int(last)
            if first != out.delivered + 1 or last < first or last > out.received:
                self.fleet.problem(f"{self.label}: DELIVERED {first} {last} after {out.delivered} "
                                   f"({out.received} arrived)")
            out.delivered = max(out.delivered, last)


class V2ChatConn(Conn):
    """A version 2 chat socket: ``RECEIVED <seq>`` once per read of messages;
    checked (it grows, and names only messages sent), otherwise ignored."""

    __slots__ = ("out", "buf")

    def __init__(self, sock, fleet: Fleet, label: str, out: "Flow | None"):
        super().__init__(sock, fleet, label)
        self.out = out
        self.buf = b""

    def on_read(self) -> int:
        data = self.recv()
        if not data:
            return 0
        if self.buf:
            data = self.buf + data
        cut = data.rfind(b"\n") + 1
        self.buf = data[cut:]
        data = data[:cut]
        if not data:
            return 0
        found = RECEIVED_FINDALL(data)
        out = self.out
        if len(found) != data.count(b"\n") or out is None:
            self.fleet.problem(f"{self.label}: unexpected {data[:120]!r}")
            return 0
        seq = int(found[-1])
        if seq < out.accepted or seq > out.sent:
            self.fleet.problem(f"{self.label}: RECEIVED {seq} after {out.accepted} ({out.sent} sent)")
        out.accepted = seq
        return 0
