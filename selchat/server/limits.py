"""Token buckets and failure counters: the arithmetic of the server's limits.

Nothing here reads a clock; callers pass ``now``, so tests drive time by hand.
"""

from __future__ import annotations

import collections


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; each event takes one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.stamp = now

    def take(self, now: float) -> bool:
        """Take a token if there is one."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until a whole token is back."""
        return max(0.0, (1.0 - self.tokens) / self.rate)

    @property
    def full(self) -> bool:
        return self.tokens >= self.burst


def bucket(rate: float, burst: int, now: float) -> TokenBucket | None:
    """A bucket, or None when the limit is off (rate 0)."""
    return TokenBucket(rate, burst, now) if rate > 0 else None


class FailureTracker:
    """Failed logins per key (an account or an address), with a growing delay.

    ``free`` failures cost nothing; once a key has ``n >= free`` of them,
    the next attempt must wait ``base * 2**(n - free)`` seconds after the
    last, at most ``cap``. A key forgets its failures ``forget`` seconds
    after the last one, or on a success. ``free=None``: never throttle (and
    remember nothing).
    """

    def __init__(self, free: int | None = 3, base: float = 1.0, cap: float = 60.0,
                 forget: float = 900.0, max_keys: int = 100_000):
        self.free, self.base, self.cap, self.forget, self.max_keys = free, base, cap, forget, max_keys
        self._failures: dict[str, tuple[int, float]] = {}

    def delay(self, key: str, now: float) -> float:
        """How long an attempt for ``key`` must wait now."""
        if self.free is None:
            return 0.0
        count, last = self._failures.get(key, (0, 0.0))
        if not count or now - last > self.forget:
            return 0.0
        if count < self.free:
            return 0.0
        wait = min(self.cap, self.base * 2 ** min(count - self.free, 32))
        return max(0.0, last + wait - now)

    def failed(self, key: str, now: float) -> None:
        if self.free is None:
            return
        count, last = self._failures.get(key, (0, 0.0))
        if now - last > self.forget:
            count = 0
        self._failures[key] = (count + 1, now)
        if len(self._failures) > self.max_keys:
            self._prune(now)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def refund(self, key: str) -> None:
        """Take back one failure: an attempt counted in advance did not fail."""
        count, last = self._failures.get(key, (0, 0.0))
        if count > 1:
            self._failures[key] = (count - 1, last)
        else:
            self._failures.pop(key, None)

    def _prune(self, now: float) -> None:
        stale = [k for k, (_, last) in self._failures.items() if now - last > self.forget]
        for key in stale:
            del self._failures[key]
        if len(self._failures) > self.max_keys:  # still too many: drop the oldest half
            by_age = sorted(self._failures, key=lambda k: self._failures[k][1])
            for key in by_age[: len(by_age) // 2]:
                del self._failures[key]

    def __len__(self) -> int:
        return len(self._failures)


class FairQueue:
    """Jobs waiting per key (an address), taken round-robin across keys.

    Password checks wait here for a worker: however many one address queues,
    a job from another address waits for at most one job of each address
    ahead of it, so a guesser cannot starve anyone else's login.
    """

    def __init__(self):
        self._queues: dict[str, collections.deque] = {}  # insertion order = turn order
        self._size = 0

    def push(self, key: str, job) -> None:
        self._queues.setdefault(key, collections.deque()).append(job)
        self._size += 1

    def pop(self):
        """The next job: the first of the key whose turn it is (IndexError if empty)."""
        if not self._queues:
            raise IndexError("pop from an empty FairQueue")
        key = next(iter(self._queues))
        queue = self._queues.pop(key)
        job = queue.popleft()
        self._size -= 1
        if queue:
            self._queues[key] = queue  # to the back of the line
        return job

    def queued(self, key: str) -> int:
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def __len__(self) -> int:
        return self._size
