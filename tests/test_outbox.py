"""The v2 outbox: ids, cumulative ACKs, receipts, replay (selchat.server.outbox)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selchat.server.outbox import Outbox


class Sender:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


ALICE, BOB = Sender("alice"), Sender("bob")


def msgs(sender, first_seq, count):
    return b"".join(b"MSG %s m%d\n" % (sender.name.encode(), first_seq + i) for i in range(count))


def test_ack_of_a_block_gives_one_receipt_and_replay_keeps_the_rest():
    box = Outbox()
    box.record(b"STARTED alice\n")
    box.record(msgs(ALICE, 1, 3), count=3, sender=ALICE, first_seq=1)
    box.record(msgs(ALICE, 4, 2), count=2, sender=ALICE, first_seq=4)
    assert box.last_id == 6 and box.pending == 6
    assert box.ack(3) == [(ALICE, 1, 2)]  # ids 2-3 carried seqs 1-2, inside the first block
    assert box.replay() == b"MSG alice m3\n" + msgs(ALICE, 4, 2)
    assert box.ack(6) == [(ALICE, 3, 5)]  # the rest of that block and the next, merged
    assert box.replay() == b"" and box.pending == 0


def test_old_ack_is_a_no_op_and_one_beyond_the_end_is_refused():
    box = Outbox()
    box.record(b"READY alice\n")
    assert box.ack(1) == []
    assert box.ack(0) == [] and box.acked == 1
    with pytest.raises(ValueError):
        box.ack(2)


def test_receipts_of_two_senders_stay_apart():
    box = Outbox()
    box.record(msgs(ALICE, 1, 2), count=2, sender=ALICE, first_seq=1)
    box.record(b"ENDED alice quit bye\n")
    box.record(msgs(BOB, 7, 1), count=1, sender=BOB, first_seq=7)
    assert box.ack(4) == [(ALICE, 1, 2), (BOB, 7, 7)]


def test_held_lists_what_was_never_acknowledged():
    box = Outbox()
    box.record(msgs(ALICE, 1, 4), count=4, sender=ALICE, first_seq=1)
    box.record(b"AWAY x\n")
    box.record(msgs(ALICE, 5, 1), count=1, sender=ALICE, first_seq=5)
    box.ack(2)
    assert box.held() == [(ALICE, 3, 5)]


def test_full_at_the_limit():
    box = Outbox(limit=3)
    box.record(msgs(ALICE, 1, 2), count=2, sender=ALICE, first_seq=1)
    assert not box.full
    box.record(b"X\n")
    assert box.full
    box.ack(1)
    assert not box.full


@given(st.lists(st.one_of(st.integers(1, 5), st.just(0)), max_size=40), st.data())
def test_every_message_gets_exactly_one_receipt_or_is_held(ops, data):
    """Any sequence of blocks (n > 0) and other frames (0), and ACKs at random
    points: every seq is receipted once, in order, or held; replay is exactly
    the frames after the last ACK."""
    box = Outbox(limit=10**9)
    frames, seq = [], 0
    receipted = []
    for n in ops:
        if n:
            box.record(msgs(ALICE, seq + 1, n), count=n, sender=ALICE, first_seq=seq + 1)
            frames += [b"MSG alice m%d\n" % (seq + 1 + i) for i in range(n)]
            seq += n
        else:
            box.record(b"NOTICE hi\n")
            frames.append(b"NOTICE hi\n")
        if data.draw(st.booleans()):
            upto = data.draw(st.integers(0, box.last_id))
            for sender, first, last in box.ack(upto):
                receipted += range(first, last + 1)
            assert box.replay() == b"".join(frames[box.acked:])
    held = [s for _, first, last in box.held() for s in range(first, last + 1)]
    assert receipted + held == list(range(1, seq + 1))


@given(st.lists(st.tuples(st.sampled_from([ALICE, BOB, None]), st.integers(1, 4)), max_size=40), st.data())
def test_two_senders_runs_and_other_frames_each_message_one_receipt_in_order(ops, data):
    """Blocks of two senders and other frames interleaved (a sender's blocks
    that follow on share an entry): each sender's seqs are receipted once,
    in order, or held; replay is exactly the frames not acknowledged."""
    box = Outbox(limit=10**9)
    frames: list[bytes] = []
    seqs = {ALICE: 0, BOB: 0}
    receipted = {ALICE: [], BOB: []}
    for sender, n in ops:
        if sender is None:
            box.record(b"NOTICE hi\n")
            frames.append(b"NOTICE hi\n")
        else:
            first = seqs[sender] + 1
            box.record(msgs(sender, first, n), count=n, sender=sender, first_seq=first)
            frames += [b"MSG %s m%d\n" % (sender.name.encode(), first + i) for i in range(n)]
            seqs[sender] += n
        if data.draw(st.booleans()):
            upto = data.draw(st.integers(box.acked, box.last_id))
            for who, first, last in box.ack(upto):
                receipted[who] += range(first, last + 1)
            assert box.replay() == b"".join(frames[box.acked:])
    held = {ALICE: [], BOB: []}
    for who, first, last in box.held():
        held[who] += range(first, last + 1)
    for who in (ALICE, BOB):
        assert receipted[who] + held[who] == list(range(1, seqs[who] + 1))
