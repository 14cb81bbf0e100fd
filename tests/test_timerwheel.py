"""Tests for selchat.reactor.timerwheel, all on a hand-driven fake clock."""

from __future__ import annotations

import logging
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from selchat.reactor.timerwheel import Timer, TimerWheel


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(tick: float = 0.25, slots: int = 8, start: float = 0.0):
    clock = FakeClock(start)
    return clock, TimerWheel(tick=tick, slots=slots, clock=clock)


def drive(clock: FakeClock, wheel: TimerWheel, until: float, step: float) -> None:
    """Advance the clock to ``until`` in steps, calling advance() each time."""
    while clock.now < until:
        clock.now = min(until, clock.now + step)
        wheel.advance()


# --- construction -----------------------------------------------------------


@pytest.mark.parametrize("slots", [0, 3, 6, 100, -4, 2.0])
def test_slots_must_be_a_power_of_two(slots):
    with pytest.raises(ValueError):
        TimerWheel(slots=slots, clock=FakeClock())


@pytest.mark.parametrize("tick", [0, -0.5, math.nan])
def test_tick_must_be_positive(tick):
    with pytest.raises(ValueError):
        TimerWheel(tick=tick, clock=FakeClock())


def test_defaults_and_public_clock():
    wheel = TimerWheel()
    assert wheel.tick == 0.05
    assert wheel.clock is time.monotonic
    assert len(wheel) == 0
    assert wheel.next_timeout() is None
    assert TimerWheel(slots=1, clock=FakeClock()).advance() == 0


# --- firing time ------------------------------------------------------------


def test_fires_not_before_deadline():
    clock, wheel = make()
    fired = []
    wheel.call_later(1.0, lambda: fired.append(clock.now))
    drive(clock, wheel, 0.999, 0.001)
    assert fired == []
    clock.now = 1.0
    assert wheel.advance() == 1
    assert fired == [1.0]
    assert len(wheel) == 0


def test_sleeping_for_next_timeout_fires_at_most_one_tick_late():
    clock, wheel = make(tick=0.25, slots=8, start=10.0)
    fired = {}
    deadlines = [10.0, 10.01, 10.3, 10.5, 11.0, 11.99, 12.0, 13.7, 25.3]
    for d in deadlines:
        wheel.call_at(d, lambda d: fired.setdefault(d, clock.now), d)
    while (timeout := wheel.next_timeout()) is not None:
        clock.now += timeout
        wheel.advance()
    assert sorted(fired) == deadlines
    for d, at in fired.items():
        assert d <= at <= d + 0.25, (d, at)


def test_advance_fires_everything_due_in_deadline_order():
    clock, wheel = make(tick=1.0, slots=4)
    order = []
    for d in [3.5, 0.2, 9.0, 0.1, 2.0, 5.0]:  # 9.0 and 5.0 share slot 1 with 1.x
        wheel.call_at(d, order.append, d)
    clock.now = 5.0
    assert wheel.advance() == 5
    assert order == [0.1, 0.2, 2.0, 3.5, 5.0]
    assert len(wheel) == 1
    clock.now = 8.999
    assert wheel.advance() == 0
    clock.now = 9.0
    assert wheel.advance() == 1
    assert order[-1] == 9.0


def test_zero_and_negative_delays_fire_on_next_advance():
    clock, wheel = make(start=5.0)
    fired = []
    wheel.call_later(0, fired.append, "zero")
    wheel.call_later(-3, fired.append, "negative")
    wheel.call_at(-100.0, fired.append, "long ago")
    assert wheel.next_timeout() == 0
    assert wheel.advance() == 3
    assert fired == ["long ago", "negative", "zero"]


def test_callback_args_and_timer_attributes():
    clock, wheel = make()
    got = []

    def cb(*args):
        got.append(args)

    timer = wheel.call_later(0.5, cb, 1, "two", None)
    assert isinstance(timer, Timer)
    assert (timer.deadline, timer.callback, timer.args) == (0.5, cb, (1, "two", None))
    assert timer.active
    assert not hasattr(timer, "__dict__")
    clock.now = 0.5
    wheel.advance()
    assert got == [(1, "two", None)]
    assert not timer.active


def test_long_timers_wait_many_rotations():
    clock, wheel = make(tick=0.25, slots=8)  # one rotation = 2 s
    fired = []
    wheel.call_later(37.3, fired.append, "long")
    wheel.call_later(0.3, fired.append, "same slot, first rotation")
    wheel.call_later(2.3, fired.append, "same slot, second rotation")
    drive(clock, wheel, 37.25, 0.05)
    assert fired == ["same slot, first rotation", "same slot, second rotation"]
    drive(clock, wheel, 37.55, 0.05)
    assert fired[-1] == "long"
    assert len(wheel) == 0


def test_long_gap_between_advances():
    clock, wheel = make(tick=0.25, slots=8)
    fired = []
    for d in [0.1, 1.9, 3.0, 50.0, 51.0]:
        wheel.call_at(d, fired.append, d)
    clock.now = 49.0  # 24 rotations without an advance()
    assert wheel.advance() == 3
    assert fired == [0.1, 1.9, 3.0]
    clock.now = 50.0
    assert wheel.advance() == 1
    clock.now = 52.0
    assert wheel.advance() == 1
    assert fired == [0.1, 1.9, 3.0, 50.0, 51.0]


# --- cancel -----------------------------------------------------------------


def test_cancel_prevents_firing_and_is_idempotent():
    clock, wheel = make()
    fired = []
    a = wheel.call_later(1, fired.append, "a")
    b = wheel.call_later(1, fired.append, "b")
    assert len(wheel) == 2
    a.cancel()
    a.cancel()
    assert not a.active and b.active
    assert len(wheel) == 1
    clock.now = 2
    assert wheel.advance() == 1
    assert fired == ["b"]
    b.cancel()  # after firing: no-op
    assert len(wheel) == 0
    assert wheel.next_timeout() is None


def test_the_tick_in_progress_fires_its_timers_one_by_one_whatever_happens_to_them():
    """A busy loop advances many times within one tick: each advance fires
    exactly what is due by then, also for timers scheduled, reset and
    cancelled after the first of that tick came due (when the slot is kept
    in a heap), and for one of a later rotation sharing the slot."""
    clock, wheel = make(tick=1.0, slots=8)
    fired = []
    at = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "e": 0.5, "later rotation": 8.3}
    timers = {name: wheel.call_at(when, fired.append, name) for name, when in at.items()}
    clock.now = 0.1
    assert wheel.advance() == 1 and fired == ["a"]
    timers["b"].reset(0.25)                  # later, in the same tick (lazy)
    timers["c"].cancel()
    timers["d"].reset(0.05)                  # earlier (moved)
    wheel.call_at(0.3, fired.append, "new")  # into the tick in progress
    timers["e"].reset(1.4)                   # later, into the next tick
    clock.now = 0.2
    assert wheel.advance() == 1 and fired == ["a", "d"]
    clock.now = 0.3
    assert wheel.advance() == 1 and fired == ["a", "d", "new"]
    clock.now = 0.35
    assert wheel.advance() == 1 and fired == ["a", "d", "new", "b"]
    drive(clock, wheel, 1.49, 0.05)
    assert fired == ["a", "d", "new", "b"]
    clock.now = 1.5
    assert wheel.advance() == 1 and fired[-1] == "e"
    drive(clock, wheel, 8.29, 0.5)
    assert fired[-1] == "e" and len(wheel) == 1
    clock.now = 8.3
    assert wheel.advance() == 1 and fired[-1] == "later rotation" and len(wheel) == 0


# --- reset ------------------------------------------------------------------


def test_reset_later_is_lazy_and_postpones():
    clock, wheel = make(tick=0.25, slots=8)
    fired = []
    t = wheel.call_later(1.0, fired.append, "t")
    slot = t._slot
    clock.now = 0.5
    t.reset(1.0)  # new deadline 1.5: only the deadline is stored
    assert t.deadline == 1.5 and t._slot is slot
    drive(clock, wheel, 1.49, 0.01)
    assert fired == []
    assert t._slot is not slot  # re-filed when its old slot came round
    clock.now = 1.5
    assert wheel.advance() == 1
    assert fired == ["t"]


def test_reset_many_times_like_a_heartbeat():
    clock, wheel = make(tick=0.25, slots=8)
    fired = []
    t = wheel.call_later(3.0, fired.append, "dead")
    for _ in range(1000):  # a frame every 0.1 s for 100 s
        clock.now = round(clock.now + 0.1, 10)
        t.reset(3.0)
        wheel.advance()
    assert fired == [] and len(wheel) == 1
    last = t.deadline
    drive(clock, wheel, last + 0.5, 0.05)
    assert fired == ["dead"]


def test_reset_earlier_moves_the_timer():
    clock, wheel = make(tick=0.25, slots=8)
    fired = []
    t = wheel.call_later(30.0, fired.append, "t")
    t.reset(0.5)
    assert t.deadline == 0.5
    assert wheel.next_timeout() == 0.75
    clock.now = 0.49
    assert wheel.advance() == 0
    clock.now = 0.5
    assert wheel.advance() == 1
    drive(clock, wheel, 31, 0.25)
    assert fired == ["t"]


def test_reset_after_firing_or_cancel_rearms():
    clock, wheel = make()
    fired = []
    t = wheel.call_later(1, fired.append, "t")
    clock.now = 1
    wheel.advance()
    assert fired == ["t"] and not t.active and len(wheel) == 0
    t.reset(2)
    assert t.active and t.deadline == 3 and len(wheel) == 1
    clock.now = 3
    assert wheel.advance() == 1
    assert fired == ["t", "t"]
    t.reset(1)
    t.cancel()
    t.reset(1)
    assert len(wheel) == 1
    clock.now = 4
    assert wheel.advance() == 1
    assert wheel.advance() == 0  # at most once per arming
    assert fired == ["t", "t", "t"]


# --- callbacks that touch the wheel ------------------------------------------


def test_callback_cancels_another_timer_in_the_same_slot():
    clock, wheel = make()
    fired = []
    victim = None

    def killer():
        fired.append("killer")
        victim.cancel()

    wheel.call_at(1.0, killer)
    victim = wheel.call_at(1.1, fired.append, "victim")  # same tick, due together
    clock.now = 2
    assert wheel.advance() == 1
    assert fired == ["killer"]
    assert len(wheel) == 0


def test_callback_resets_another_due_timer():
    clock, wheel = make()
    fired = []
    other = None

    def pusher():
        fired.append("pusher")
        other.reset(1.0)

    wheel.call_at(1.0, pusher)
    other = wheel.call_at(1.1, fired.append, "other")
    clock.now = 1.2
    assert wheel.advance() == 1
    assert other.active and other.deadline == 2.2
    clock.now = 2.1
    assert wheel.advance() == 0
    clock.now = 2.2
    assert wheel.advance() == 1
    assert fired == ["pusher", "other"]


def test_callback_resets_another_due_timer_to_earlier():
    clock, wheel = make()
    fired = []
    other = None

    def puller():
        fired.append("puller")
        other.reset(-1)  # still due, same arming: runs in this advance()

    wheel.call_at(1.0, puller)
    other = wheel.call_at(1.1, fired.append, "other")
    clock.now = 1.2
    assert wheel.advance() == 2
    assert fired == ["puller", "other"]
    assert len(wheel) == 0


def test_callback_schedules_into_the_same_slot():
    clock, wheel = make(tick=1.0, slots=4)
    fired = []

    def spawner():
        fired.append("spawner")
        wheel.call_later(0, fired.append, "now")  # fires on the next advance
        wheel.call_later(0.1, fired.append, "soon")  # same slot, same tick
        wheel.call_later(4.0, fired.append, "next rotation")  # same slot

    wheel.call_at(1.0, spawner)
    clock.now = 1.0
    assert wheel.advance() == 1
    assert fired == ["spawner"]
    assert wheel.next_timeout() == 0
    assert wheel.advance() == 1
    assert fired == ["spawner", "now"]
    clock.now = 1.1
    assert wheel.advance() == 1
    clock.now = 4.9
    assert wheel.advance() == 0
    clock.now = 5.0
    assert wheel.advance() == 1
    assert fired == ["spawner", "now", "soon", "next rotation"]


def test_periodic_timer_resetting_itself():
    clock, wheel = make(tick=0.25, slots=8)
    fired = []

    def beat():
        fired.append(clock.now)
        if len(fired) < 5:
            timer.reset(1.0)

    timer = wheel.call_later(1.0, beat)
    drive(clock, wheel, 10, 0.125)
    assert fired == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert not timer.active and len(wheel) == 0


def test_callback_cancels_itself_and_reschedules_others():
    clock, wheel = make()
    fired = []

    def selfish():
        fired.append("selfish")
        me.cancel()  # already fired: no-op
        me.reset(-1)  # re-armed: fires on the next advance, not this one

    me = wheel.call_at(1.0, selfish)
    clock.now = 1.0
    assert wheel.advance() == 1
    assert me.active
    assert wheel.advance() == 1
    assert fired == ["selfish", "selfish"]


def test_exception_in_callback_is_logged_and_others_still_fire(caplog):
    clock, wheel = make()
    fired = []

    def boom():
        raise RuntimeError("boom")

    wheel.call_at(0.5, fired.append, "before")
    wheel.call_at(0.6, boom)
    wheel.call_at(0.7, fired.append, "after")
    clock.now = 1
    with caplog.at_level(logging.ERROR, logger="selchat.timer"):
        assert wheel.advance() == 3
    assert fired == ["before", "after"]
    [record] = [r for r in caplog.records if r.name == "selchat.timer"]
    assert record.exc_info[0] is RuntimeError
    assert len(wheel) == 0


def test_base_exception_propagates_without_losing_timers():
    clock, wheel = make()
    fired = []

    def interrupt():
        raise KeyboardInterrupt

    wheel.call_at(0.5, interrupt)
    wheel.call_at(0.6, fired.append, "later")
    clock.now = 1
    with pytest.raises(KeyboardInterrupt):
        wheel.advance()
    assert len(wheel) == 1
    assert wheel.next_timeout() == 0
    assert wheel.advance() == 1
    assert fired == ["later"]


# --- next_timeout and len ---------------------------------------------------


def test_next_timeout():
    clock, wheel = make(tick=0.25, slots=8, start=100.0)
    assert wheel.next_timeout() is None
    t = wheel.call_later(0.3, lambda: None)  # tick [100.25, 100.5)
    assert wheel.next_timeout() == 0.5
    clock.now = 100.1
    assert wheel.next_timeout() == pytest.approx(0.4)
    clock.now = 100.3
    assert wheel.next_timeout() == 0  # due
    clock.now = 101
    assert wheel.next_timeout() == 0  # never negative
    t.cancel()
    assert wheel.next_timeout() is None
    # A timer several rotations away: wake up no later than its deadline + tick
    # (early is fine).
    far = wheel.call_later(20.0, lambda: None)
    assert 0 < wheel.next_timeout() <= 20.25
    far.cancel()
    wheel.call_later(-1, lambda: None)
    assert wheel.next_timeout() == 0


def full_scan_timeout(wheel: TimerWheel) -> float | None:
    """next_timeout() as a walk over every slot from the current tick, with
    no memory of earlier walks: what the hint must not change."""
    if not len(wheel):
        return None
    if wheel._ready:
        return 0.0
    now = wheel.clock()
    mask = wheel._mask
    for k in range(wheel._tick, wheel._tick + mask + 1):
        i = k & mask
        if wheel._wheel[i]:
            return 0.0 if wheel._bounds[i] <= now else max(0.0, wheel._start_of(k + 1) - now)
    return 0.0


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.floats(-1, 12, allow_nan=False)),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
    st.tuples(st.just("reset"), st.integers(0, 40), st.floats(-1, 12, allow_nan=False)),
    st.tuples(st.just("time"), st.floats(0, 3, allow_nan=False)),
    st.tuples(st.just("advance")),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_next_timeout_with_its_hint_equals_a_full_scan(steps):
    # The hint skips slots known to be empty; it must never skip a timer.
    clock, wheel = make(tick=0.25, slots=8, start=50.0)
    timers = []
    for step in steps:
        if step[0] == "add":
            timers.append(wheel.call_later(step[1], lambda: None))
        elif step[0] == "cancel" and timers:
            timers[step[1] % len(timers)].cancel()
        elif step[0] == "reset" and timers:
            timers[step[1] % len(timers)].reset(step[2])
        elif step[0] == "time":
            clock.now += step[1]
        elif step[0] == "advance":
            wheel.advance()
        assert wheel.next_timeout() == full_scan_timeout(wheel)


def test_len_counts_active_timers():
    clock, wheel = make()
    timers = [wheel.call_later(i / 4, lambda: None) for i in range(10)]
    assert len(wheel) == 10
    timers[3].cancel()
    timers[3].cancel()
    timers[4].reset(100)
    assert len(wheel) == 9
    clock.now = 1.0
    assert wheel.advance() == 3  # 0, 0.25, 0.5 (0.75 cancelled, 1.0 reset)
    assert len(wheel) == 6
    timers[0].reset(1)
    assert len(wheel) == 7


# --- property tests ---------------------------------------------------------

# (tick, slots, time unit, start): delays and clock steps are integers times
# the unit. The first config keeps all arithmetic exact, the others do not.
CONFIGS = [
    (1.0, 8, 1 / 8, 1000.0),
    (0.05, 16, 0.0137, 12345.678),
    (0.1, 4, 0.03, -7.3),
    (0.25, 1, 0.1, 0.0),
]


class TimerWheelMachine(RuleBasedStateMachine):
    """The wheel against a dict of deadlines."""

    @initialize(config=st.sampled_from(CONFIGS))
    def setup(self, config):
        self.tick, slots, self.unit, start = config
        self.clock = FakeClock(start)
        self.wheel = TimerWheel(tick=self.tick, slots=slots, clock=self.clock)
        self.timers: list[Timer] = []
        self.model: dict[int, float] = {}  # timer index -> deadline, active ones
        self.fired: list[tuple[int, float]] = []  # (index, clock() when run)

    def _cb(self, i: int) -> None:
        self.fired.append((i, self.clock()))

    # Delays run from a little negative to several rotations ahead.
    delays = st.integers(-20, 400)

    @rule(delay=delays)
    def schedule(self, delay):
        d = delay * self.unit
        i = len(self.timers)
        self.timers.append(self.wheel.call_later(d, self._cb, i))
        self.model[i] = self.clock() + d

    @rule(delay=delays)
    def schedule_at(self, delay):
        when = self.clock() + delay * self.unit
        i = len(self.timers)
        self.timers.append(self.wheel.call_at(when, self._cb, i))
        self.model[i] = when

    @precondition(lambda self: self.timers)
    @rule(n=st.integers(0, 10**6))
    def cancel(self, n):
        i = n % len(self.timers)
        self.timers[i].cancel()
        self.model.pop(i, None)

    @precondition(lambda self: self.timers)
    @rule(n=st.integers(0, 10**6), delay=delays)
    def reset(self, n, delay):
        i = n % len(self.timers)
        d = delay * self.unit
        self.timers[i].reset(d)
        self.model[i] = self.clock() + d

    @rule(step=st.integers(0, 200))
    def pass_time(self, step):
        self.clock.now += step * self.unit

    @rule()
    def sleep_for_next_timeout(self):
        timeout = self.wheel.next_timeout()
        if timeout is not None:
            self.clock.now += timeout

    @rule()
    def advance(self):
        now = self.clock()
        due = {i: d for i, d in self.model.items() if d <= now}
        self.fired.clear()
        n = self.wheel.advance()
        fired_ids = [i for i, _ in self.fired]
        # Exactly the due timers fire (hence none later than deadline + tick
        # at the advance() following the clock passing it), each once ...
        assert sorted(fired_ids) == sorted(due)
        assert n == len(due)
        # ... none before its deadline, and in deadline order.
        for i, at in self.fired:
            assert due[i] <= at
        assert [due[i] for i in fired_ids] == sorted(due.values())
        for i in due:
            del self.model[i]

    @invariant()
    def matches_model(self):
        if not hasattr(self, "wheel"):
            return
        assert len(self.wheel) == len(self.model)
        for i, timer in enumerate(self.timers):
            assert timer.active == (i in self.model)
            if i in self.model:
                assert timer.deadline == self.model[i]

    @invariant()
    def next_timeout_is_sensible(self):
        if not hasattr(self, "wheel"):
            return
        timeout = self.wheel.next_timeout()
        if not self.model:
            assert timeout is None
            return
        now = self.clock()
        earliest = min(self.model.values())
        assert timeout is not None and timeout >= 0
        if earliest <= now:
            assert timeout == 0
        # Never sleep past the earliest deadline plus one tick.
        assert timeout <= max(0.0, earliest - now) + self.tick + 1e-9


TimerWheelMachine.TestCase.settings = settings(
    max_examples=250, stateful_step_count=50, deadline=None
)
test_timer_wheel_against_model = TimerWheelMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    delays=st.lists(st.integers(-20, 600), max_size=40),
    cancels=st.sets(st.integers(0, 39)),
)
def test_event_loop_driven_by_next_timeout(config, delays, cancels):
    """Sleeping exactly next_timeout() between advance() calls fires every
    timer within [deadline, deadline + tick] (for one scheduled in the past,
    within a tick of starting), and then the wheel is empty."""
    tick, slots, unit, start = config
    clock = FakeClock(start)
    wheel = TimerWheel(tick=tick, slots=slots, clock=clock)
    fired_at: dict[int, float] = {}
    timers = [
        wheel.call_later(n * unit, lambda i: fired_at.setdefault(i, clock()), i)
        for i, n in enumerate(delays)
    ]
    for i in cancels:
        if i < len(timers):
            timers[i].cancel()
    live = {i: t.deadline for i, t in enumerate(timers) if t.active}
    wakeups = 0
    while (timeout := wheel.next_timeout()) is not None:
        clock.now += timeout
        wheel.advance()
        wakeups += 1
        assert wakeups < 10_000
    assert fired_at.keys() == live.keys()
    for i, d in live.items():
        assert d <= fired_at[i] <= max(d, start) + tick + 1e-9
