"""What a version 2 session has been sent and not yet acknowledged.

Every frame on a v2 session's login socket has an id: its position, 1 for the
first after WELCOME (docs/protocol.md, "Version 2"). The outbox keeps the
bytes of each frame until the client's cumulative ``ACK <id>`` says it has
them, so that a ``RESUME`` can replay the rest, and remembers which of them
carried whose chat messages, so that an ACK turns into delivery receipts for
the senders and the end of a session into "not delivered" reports.

One entry holds one frame, or a run of one sender's relayed messages (the
relay's fast path writes many ``MSG`` frames with one call, and the blocks
that follow on join the same entry, as a list of blocks); an ACK that falls
inside a run drops the blocks it covers and splits only the one it ends in.

Pure bookkeeping: no socket, no clock, no session methods called. The caller
(``Session``) writes the bytes and sends the receipts.
"""

from __future__ import annotations

from collections import deque

#: Unacknowledged events kept per session by default (``--resume-buffer``).
DEFAULT_LIMIT = 1000


class Entry:
    """``count`` consecutive frames (ids ``first_id``...), as the bytes sent:
    ``blocks``, as written, each of ``counts[i]`` frames.

    ``sender`` is the session whose chat messages they are (seqs
    ``first_seq``...), or None for anything else (a request, a receipt...).
    """

    __slots__ = ("first_id", "count", "blocks", "counts", "sender", "first_seq")

    def __init__(self, first_id: int, count: int, data: bytes, sender=None, first_seq: int = 0):
        self.first_id = first_id
        self.count = count
        self.blocks = [data]
        self.counts = [count]
        self.sender = sender
        self.first_seq = first_seq

    @property
    def last_id(self) -> int:
        return self.first_id + self.count - 1

    @property
    def data(self) -> bytes:
        return b"".join(self.blocks)

    def drop_first(self, n: int) -> None:
        """Forget the first ``n`` frames (they were acknowledged; ``n`` <
        ``count``): the whole blocks they cover, then the head of the block
        the last of them is in. Splitting only that block, not the run, keeps
        an ACK's cost to the blocks it covers (a split makes an object per
        frame: 21-47 µs for 256 frames here)."""
        blocks, counts = self.blocks, self.counts
        whole, left = 0, n
        while counts[whole] <= left:
            left -= counts[whole]
            whole += 1
        if whole:
            del blocks[:whole]
            del counts[:whole]
        if left:
            blocks[0] = blocks[0].split(b"\n", left)[left]
            counts[0] -= left
        self.first_id += n
        self.first_seq += n
        self.count -= n

    def __repr__(self) -> str:
        return f"<Entry {self.first_id}..{self.last_id} seq {self.first_seq} from {self.sender!r}>"


class Outbox:
    """Ids given out and not yet acknowledged, in order.

    ``last_id``: the id of the last frame recorded (0: none yet);
    ``acked``: the client's last ACK. ``pending`` = ``last_id - acked``.
    """

    __slots__ = ("last_id", "acked", "entries", "limit")

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.last_id = 0
        self.acked = 0
        self.entries: deque[Entry] = deque()
        self.limit = limit

    @property
    def pending(self) -> int:
        return self.last_id - self.acked

    @property
    def full(self) -> bool:
        """Senders to this session should wait for acknowledgements."""
        return self.last_id - self.acked >= self.limit

    def record(self, data: bytes, count: int = 1, sender=None, first_seq: int = 0) -> None:
        """``count`` frames (``data``, LF-terminated) were sent, or held for sending.

        A sender's messages that follow on from the last entry's join it (as
        one more block): an ACK then walks one entry per run of one sender's
        messages, not one per relayed block, and a block costs no new entry."""
        entries = self.entries
        if sender is not None and entries:
            last = entries[-1]
            if last.sender is sender and last.first_seq + last.count == first_seq:
                last.blocks.append(data)
                last.counts.append(count)
                last.count += count
                self.last_id += count
                return
        entries.append(Entry(self.last_id + 1, count, data, sender, first_seq))
        self.last_id += count

    def ack(self, upto: int) -> list[tuple[object, int, int]]:
        """The client has every frame up to ``upto``: forget them.

        Returns the delivery receipts, ``(sender, first_seq, last_seq)``, with
        consecutive ranges of one sender merged. Raises ValueError if
        ``upto`` is beyond the last frame sent; an old ACK is a no-op.
        """
        if upto > self.last_id:
            raise ValueError(f"ACK {upto} is beyond the last event sent ({self.last_id})")
        receipts: list[list] = []
        entries = self.entries
        popleft = entries.popleft
        last = None  # the receipt being extended
        while entries:  # once per entry (a relayed block): kept lean
            entry = entries[0]
            first_id = entry.first_id
            if first_id > upto:
                break
            count = entry.count
            done = count if first_id + count - 1 <= upto else upto - first_id + 1
            if done == count:
                popleft()
            sender = entry.sender
            if sender is not None:
                first = entry.first_seq
                if last is not None and last[0] is sender and last[2] + 1 == first:
                    last[2] = first + done - 1
                else:
                    last = [sender, first, first + done - 1]
                    receipts.append(last)
            if done < count:
                entry.drop_first(done)
                break
        self.acked = max(self.acked, upto)
        return [tuple(r) for r in receipts]

    def replay(self) -> bytes:
        """The bytes of every frame not acknowledged, in order (for a resume)."""
        return b"".join(entry.data for entry in self.entries)

    def held(self) -> list[tuple[object, int, int]]:
        """Chat messages not acknowledged: ``(sender, first_seq, last_seq)``,
        merged as in ``ack``. They will never be (the session is ending)."""
        out: list[list] = []
        for entry in self.entries:
            if entry.sender is None:
                continue
            first, last = entry.first_seq, entry.first_seq + entry.count - 1
            if out and out[-1][0] is entry.sender and out[-1][2] + 1 == first:
                out[-1][2] = last
            else:
                out.append([entry.sender, first, last])
        return [tuple(r) for r in out]

    def keep_only(self, wanted) -> None:
        """Forget every entry but the single frames for which ``wanted(data)``
        is true (an ended session keeps only its fates, for a late RESUME)."""
        self.entries = deque(e for e in self.entries if e.count == 1 and e.sender is None and wanted(e.data))

    def __repr__(self) -> str:
        return f"<Outbox ids {self.acked + 1}..{self.last_id} in {len(self.entries)} entries>"
