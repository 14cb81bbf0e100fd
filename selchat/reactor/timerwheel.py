"""A hashed timer wheel for the reactor's timeouts.

This is a single-level hashed wheel in the style of Netty's
``HashedWheelTimer``. Time is cut into ticks of ``tick`` seconds; tick ``k``
covers ``[k * tick, (k + 1) * tick)`` and maps to slot ``k & (slots - 1)``
(``slots`` is a power of two). A timer lives in the slot of the tick holding
its deadline; a timer more than one rotation (``tick * slots``) ahead shares
its slot with nearer ones and simply stays put when the slot comes round before
it is due (Netty counts "remaining rounds"; comparing the stored deadline does
the same job).

Each slot is a dict used as an insertion-ordered set, and every timer knows the
dict it is in, so:

* schedule is O(1): compute the tick, insert into that slot's dict;
* cancel is O(1): ``del slot[timer]``;
* reset is O(1), and usually just an attribute store. Most network timeouts are
  pushed back long before they fire (a heartbeat timer is reset on every
  inbound frame), so a reset to a *later* deadline only records the new
  deadline and leaves the timer in its old, too-early slot; when that slot
  comes round the timer is found not due and re-filed under its real deadline.
  Only a reset to an *earlier* deadline moves the timer (delete + insert).

Every slot also keeps a lower bound on the deadlines of the timers in it
(lowered on insert, recomputed whenever the slot is scanned, left alone on
cancel and on a lazy reset, which only raise deadlines). ``advance()`` walks
the ticks that elapsed since the previous call (at most one rotation) and only
scans a slot whose bound has been reached. That keeps a loop that calls
``advance()`` on every iteration cheap, lets a far-future timer sit untouched
until it is due, and means ``advance()`` fires *every* timer whose deadline is
``<= clock()``: the tick only sets the granularity of ``next_timeout()``, so
an event loop sleeping for ``next_timeout()`` fires timers at most one tick
late, and never early.

The cost of ``advance()`` is one cheap check per elapsed tick (capped at
``slots``), plus the timers in the slots it scans, plus sorting the timers it
fires (they are run in deadline order). ``next_timeout()`` looks at no more
than one rotation of slots.

The slot of the tick in progress is the exception. A busy loop calls
``advance()`` many times per tick, and the timers of that tick come due one
by one; scanning the whole slot each time one does would cost every turn
the slot's size (hundreds, with thousands of sessions). So the first time
a timer in it comes due before its tick ends, the slot is indexed by
deadline in a heap (``_near``: an entry for every timer in it, and for every
timer filed into it until the tick ends), and later turns pop only what is
due. An entry keeps the deadline the timer had when it was pushed; a lazy
reset only raises it, so the heap's minimum stays a lower bound. A popped
entry whose timer left the slot (cancelled, fired, moved) is skipped, and
one whose timer was reset to later is pushed again or re-filed.

Due timers are first moved to a "ready" dict and only then run, so a callback
may schedule, cancel or reset any timer, itself included, at any point. Timers
armed by a callback fire on a later ``advance()``, never the current one.
"""

from __future__ import annotations

import logging
import math
import time
from heapq import heapify, heappop, heappush
from itertools import count
from operator import attrgetter
from typing import Any, Callable

__all__ = ["Timer", "TimerWheel"]

_log = logging.getLogger("selchat.timer")
_by_deadline = attrgetter("deadline")


class Timer:
    """A scheduled call, returned by ``TimerWheel.call_later`` / ``call_at``.

    ``deadline`` (absolute, in clock units), ``callback`` and ``args`` are
    public; treat ``deadline`` as read-only and use ``reset()`` to move it.
    """

    __slots__ = ("deadline", "callback", "args", "_wheel", "_slot")

    def __init__(self, wheel: TimerWheel, deadline: float,
                 callback: Callable[..., Any], args: tuple) -> None:
        self.deadline = deadline
        self.callback = callback
        self.args = args
        self._wheel = wheel
        # The dict (wheel slot or the wheel's ready set) holding this timer;
        # None once it fired or was cancelled.
        self._slot: dict[Timer, None] | None = None

    @property
    def active(self) -> bool:
        """True while scheduled and not yet fired or cancelled."""
        return self._slot is not None

    def cancel(self) -> None:
        """Unschedule. O(1); a no-op if already cancelled or fired."""
        slot = self._slot
        if slot is not None:
            del slot[self]
            self._slot = None
            self._wheel._count -= 1

    def reset(self, delay: float) -> None:
        """Set the deadline to ``clock() + delay``, re-arming the timer if it
        already fired or was cancelled. O(1): a later deadline is only stored
        (see the module docstring); an earlier one moves the timer."""
        wheel = self._wheel
        deadline = wheel.clock() + delay
        slot = self._slot
        if slot is not None:
            # In the ready set the timer is due anyway; advance() re-checks
            # the deadline before running it.
            if deadline >= self.deadline or slot is wheel._ready:
                self.deadline = deadline
                return
            del slot[self]
        else:
            wheel._count += 1
        self.deadline = deadline
        wheel._file(self)

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"<Timer {state} deadline={self.deadline!r} callback={self.callback!r}>"


class TimerWheel:
    """Hashed timer wheel driven by ``advance()``; see the module docstring."""

    def __init__(self, tick: float = 0.05, slots: int = 512,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not tick > 0:
            raise ValueError(f"tick must be > 0, not {tick!r}")
        if not isinstance(slots, int) or slots <= 0 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two, not {slots!r}")
        self.tick = tick
        self.clock = clock
        self._mask = slots - 1
        self._wheel: list[dict[Timer, None]] = [{} for _ in range(slots)]
        # _bounds[i] <= the deadline of every timer in _wheel[i].
        self._bounds = [math.inf] * slots
        # Due timers collected by advance() and not yet run.
        self._ready: dict[Timer, None] = {}
        self._count = 0
        # First tick not known to be over: ticks before it have been
        # processed, every filed timer sits at a tick >= _tick.
        self._tick = self._tick_of(clock())
        # The slots of the ticks _tick.._hint-1 are known to be empty, so
        # next_timeout() need not look at them again (it would otherwise
        # walk the same empty slots at every turn of the loop).
        self._hint = self._tick
        # The slot of the tick in progress, indexed by deadline once one of
        # its timers came due before the tick ended (module docstring):
        # _near holds (deadline, n, timer) for every timer in _near_slot,
        # the slot of tick _tick; None and [] when there is none (dropped
        # whenever _tick moves on).
        self._near_slot: dict[Timer, None] | None = None
        self._near: list[tuple[float, int, Timer]] = []
        self._pushes = count()  # tie-breaker: timers do not compare

    def _tick_of(self, t: float) -> int:
        return int(t // self.tick)

    def _file(self, timer: Timer) -> None:
        """Put an armed timer in the slot of its deadline's tick (or of the
        current tick, if that is already past)."""
        deadline = timer.deadline
        k = self._tick_of(deadline)
        if k < self._tick:
            k = self._tick
        i = k & self._mask
        slot = self._wheel[i]
        slot[timer] = None
        timer._slot = slot
        if slot is self._near_slot:
            heappush(self._near, (deadline, next(self._pushes), timer))
        if deadline < self._bounds[i]:
            self._bounds[i] = deadline
        # The first tick from _tick on that this slot stands for.
        first = self._tick + ((k - self._tick) & self._mask)
        if first < self._hint:
            self._hint = first

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call ``callback(*args)`` once ``clock() >= when``."""
        timer = Timer(self, when, callback, args)
        self._count += 1
        self._file(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call ``callback(*args)`` ``delay`` seconds from now (``delay <= 0``:
        on the next ``advance()``)."""
        return self.call_at(self.clock() + delay, callback, *args)

    def next_timeout(self) -> float | None:
        """Seconds until ``advance()`` is next needed: None if no timer is
        scheduled, 0 if one is already due, else the time to the end of the
        earliest tick whose slot holds a timer (that timer may be one or more
        rotations away, in which case this wakes up early)."""
        if not self._count:
            return None
        if self._ready:  # left over by a callback raising BaseException
            return 0.0
        now = self.clock()
        wheel, bounds, mask = self._wheel, self._bounds, self._mask
        start = self._tick
        for k in range(max(start, self._hint), start + mask + 1):
            i = k & mask
            if wheel[i]:
                self._hint = k
                if bounds[i] <= now:
                    return 0.0
                return max(0.0, self._start_of(k + 1) - now)
        return 0.0  # not reached: _count > 0 means some slot is non-empty

    def _start_of(self, k: int) -> float:
        """The first clock value in tick ``k``. ``k * tick`` can round to just
        below it, and sleeping until then would wake up too early to fire the
        timers of tick ``k - 1``."""
        t = k * self.tick
        while self._tick_of(t) < k:
            t = math.nextafter(t, math.inf)
        return t

    def advance(self) -> int:
        """Run every timer whose deadline is ``<= clock()``, in deadline
        order; return how many ran. A callback's exception is logged to the
        ``selchat.timer`` logger and does not stop the others."""
        now = self.clock()
        self._collect(now)
        ready = self._ready
        fired = 0
        for timer in sorted(ready, key=_by_deadline):
            if timer._slot is not ready:
                continue  # cancelled, or reset to later and re-filed, by a callback
            del ready[timer]
            if timer.deadline > now:  # reset to later by an earlier callback
                self._file(timer)
                continue
            timer._slot = None
            self._count -= 1
            fired += 1
            try:
                timer.callback(*timer.args)
            except Exception:
                _log.exception("timer callback %r failed", timer.callback)
        return fired

    def _collect(self, now: float) -> None:
        """Move the due timers of the elapsed ticks into the ready set,
        re-filing timers that were lazily reset to a later deadline."""
        wheel, bounds, mask = self._wheel, self._bounds, self._mask
        first = self._tick
        target = self._tick_of(now)
        if target > first:
            self._tick = target
            if self._near_slot is not None:  # that tick is over: its slot is scanned as any other
                self._near_slot = None
                self._near = []
        # Ticks first..target, the current (unfinished) one included; past
        # one rotation each slot has been seen once.
        for k in range(first, first + min(max(target - first, 0) + 1, mask + 1)):
            i = k & mask
            if bounds[i] > now:
                continue
            if k == target:
                self._collect_near(i, now)
                continue
            slot = wheel[i]
            low = math.inf
            for timer in list(slot):
                if self._settle(slot, i, timer, now) and timer.deadline < low:
                    low = timer.deadline
            bounds[i] = low

    def _settle(self, slot: dict, i: int, timer: Timer, now: float) -> bool:
        """A timer of slot ``i`` looked at: if due, it moves to the ready
        set; if lazily reset to a deadline of another slot, it is re-filed
        there; else it stays, and the answer is True."""
        deadline = timer.deadline
        if deadline <= now:
            del slot[timer]
            ready = self._ready
            ready[timer] = None
            timer._slot = ready
            return False
        if self._tick_of(deadline) & self._mask != i:
            del slot[timer]
            self._file(timer)
            return False
        return True

    def _collect_near(self, i: int, now: float) -> None:
        """``_collect`` for slot ``i``, that of the tick in progress: pop
        what is due from its heap, built on the first call of the tick."""
        slot = self._wheel[i]
        pushes = self._pushes
        near = self._near
        if self._near_slot is not slot:
            # The first time in this tick: the full scan, the rest into the heap.
            near = [(timer.deadline, next(pushes), timer) for timer in list(slot)
                    if self._settle(slot, i, timer, now)]
            heapify(near)
            self._near = near
            self._near_slot = slot
        while near and near[0][0] <= now:
            timer = heappop(near)[2]
            # Skipped if cancelled, fired or moved since it was pushed; pushed
            # again if reset to later within this slot.
            if timer._slot is slot and self._settle(slot, i, timer, now):
                heappush(near, (timer.deadline, next(pushes), timer))
        self._bounds[i] = near[0][0] if near else math.inf

    def __len__(self) -> int:
        """Number of active timers."""
        return self._count

    def __repr__(self) -> str:
        return f"<TimerWheel tick={self.tick!r} slots={self._mask + 1} timers={self._count}>"
