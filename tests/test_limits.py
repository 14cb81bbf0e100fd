"""The arithmetic of the server's limits, with time driven by hand."""

from __future__ import annotations

import pytest

from selchat.server.limits import FailureTracker, FairQueue, TokenBucket


def test_failures_cost_nothing_until_free_then_the_wait_doubles():
    t = FailureTracker(free=3, base=1.0, cap=8.0)
    now = 100.0
    for _ in range(3):
        assert t.delay("k", now) == 0.0
        t.failed("k", now)
    assert t.delay("k", now) == 1.0
    t.failed("k", now)
    assert t.delay("k", now) == 2.0
    assert t.delay("k", now + 0.5) == 1.5        # the wait runs from the last failure
    for _ in range(10):
        t.failed("k", now)
    assert t.delay("k", now) == 8.0              # capped
    assert t.delay("other", now) == 0.0          # keys are independent


def test_failures_are_forgotten_after_a_while_or_on_success():
    t = FailureTracker(free=1, forget=60.0)
    t.failed("k", 0.0)
    assert t.delay("k", 0.0) > 0
    assert t.delay("k", 61.0) == 0.0
    t.failed("k", 61.0)
    t.succeeded("k")
    assert t.delay("k", 61.0) == 0.0 and len(t) == 0


def test_refund_takes_back_one_failure():
    t = FailureTracker(free=2)
    t.failed("k", 0.0)
    t.failed("k", 0.0)
    assert t.delay("k", 0.0) > 0
    t.refund("k")
    assert t.delay("k", 0.0) == 0.0
    t.refund("k")
    t.refund("k")  # more refunds than failures: nothing left, no error
    assert len(t) == 0


def test_free_none_never_throttles_and_keeps_nothing():
    t = FailureTracker(free=None)
    for _ in range(100):
        t.failed("k", 0.0)
    assert t.delay("k", 0.0) == 0.0 and len(t) == 0


def test_the_tracker_stays_bounded():
    t = FailureTracker(free=1, forget=10.0, max_keys=100)
    for i in range(1000):
        t.failed(f"addr{i}", float(i))
    assert len(t) <= 100


def test_fair_queue_takes_keys_in_turn():
    q = FairQueue()
    for i in range(5):
        q.push("flood", ("flood", i))
    q.push("owner", ("owner", 0))
    q.push("other", ("other", 0))
    assert len(q) == 7 and q.queued("flood") == 5 and q.queued("nobody") == 0
    order = [q.pop() for _ in range(7)]
    # The owner waits behind one flood job, not five.
    assert order[:3] == [("flood", 0), ("owner", 0), ("other", 0)]
    assert order[3:] == [("flood", i) for i in range(1, 5)]
    assert len(q) == 0 and not q
    with pytest.raises(IndexError):
        q.pop()


def test_token_bucket_refills_to_its_burst():
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.wait() == pytest.approx(0.5)
    assert b.take(0.5)
    b.refill(100.0)
    assert b.full and b.tokens == 3.0
