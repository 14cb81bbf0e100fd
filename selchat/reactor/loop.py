"""The reactor: one thread, one selector, one timer wheel.

Every turn of ``run()`` has the same shape (after asyncio's ``_run_once``):

1. wait in ``select()`` for at most the time until the next timer tick
   (zero when callbacks are ready or writes are pending);
2. hand each ready file object to its handler (``on_readable``/``on_writable``
   on ``SelectorKey.data``);
3. run the timers that are due, then the callbacks queued with ``call_soon``;
4. flush every transport written to in this turn, with one ``send()`` each.

Step 4 is what coalesces: whatever a turn wrote to one socket goes out in one
system call. A handler that raises is logged and its own ``on_error`` is told;
the loop runs on.

Blocking work (password hashing, SQLite writes) runs in a small thread pool
via ``run_in_thread``; its result comes back through a socketpair registered
with the selector, so the loop never waits for it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import selectors
import socket
import time
from typing import Callable

from selchat.reactor.timerwheel import Timer, TimerWheel

log = logging.getLogger("selchat.reactor")

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class Handler:
    """What the reactor expects in ``SelectorKey.data``."""

    __slots__ = ()

    def on_readable(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_writable(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_error(self, exc: BaseException) -> None:
        """A callback of ours raised while handling this file object."""


class _Waker(Handler):
    """The read end of a socketpair: wakes select() when a thread finishes work."""

    __slots__ = ("rsock", "wsock")

    def __init__(self) -> None:
        self.rsock, self.wsock = socket.socketpair()
        self.rsock.setblocking(False)
        self.wsock.setblocking(False)

    def on_readable(self) -> None:
        try:
            while self.rsock.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def wake(self) -> None:
        try:
            self.wsock.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # already awake: the pipe is full of wake-ups

    def close(self) -> None:
        self.rsock.close()
        self.wsock.close()


class Reactor:
    """A single-threaded selectors event loop with a hashed timer wheel."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        tick: float = 0.05,
        slots: int = 512,
        workers: int = 2,
    ):
        self.selector = selectors.DefaultSelector()
        self.timers = TimerWheel(tick=tick, slots=slots, clock=clock)
        self.clock = clock
        self._ready: collections.deque = collections.deque()
        self._from_threads: collections.deque = collections.deque()
        #: Transports written to in this turn, flushed at its end. A transport
        #: appends itself on its first write of a turn (``want_flush``, or this
        #: list's ``append`` kept at hand: a C call, no Python frame). The list
        #: is never replaced.
        self.to_flush: list = []
        self._waker = _Waker()
        self.selector.register(self._waker.rsock, selectors.EVENT_READ, self._waker)
        self._workers = workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._running = False
        #: Jobs given to run_in_thread whose done callback has not run yet
        #: (queued, running, or finished and waiting for the loop): the
        #: worker queue depth that /metrics shows.
        self.pending_jobs = 0
        #: Called, if set, after each select() and before the handlers run
        #: (a cluster node checks there that its lease has not run out while
        #: it was stopped, before it acts on what it reads).
        self.wake_check: Callable[[], None] | None = None

    # -- scheduling ---------------------------------------------------------------

    def call_soon(self, callback: Callable, *args) -> None:
        self._ready.append((callback, args))

    def call_later(self, delay: float, callback: Callable, *args) -> Timer:
        return self.timers.call_later(delay, callback, *args)

    def call_soon_threadsafe(self, callback: Callable, *args) -> None:
        """The only method other threads may call."""
        self._from_threads.append((callback, args))
        self._waker.wake()

    def run_in_thread(self, func: Callable, *args, done: Callable[[concurrent.futures.Future], None]) -> None:
        """Run ``func(*args)`` on a worker thread; call ``done(future)`` on the loop."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix="selchat-worker"
            )
        future = self._executor.submit(func, *args)
        self.pending_jobs += 1

        def finished(f: concurrent.futures.Future) -> None:  # on the loop
            self.pending_jobs -= 1
            done(f)

        future.add_done_callback(lambda f: self.call_soon_threadsafe(finished, f))

    def want_flush(self, transport) -> None:
        """Called by a transport on its first write of a turn."""
        self.to_flush.append(transport)

    # -- running ------------------------------------------------------------------

    def run(self) -> None:
        self._running = True
        select, ready, to_flush = self.selector.select, self._ready, self.to_flush
        try:
            while self._running:
                if ready or to_flush or self._from_threads:
                    timeout = 0
                else:
                    timeout = self.timers.next_timeout()
                events = select(timeout)
                if self.wake_check is not None:
                    self.wake_check()
                for key, mask in events:
                    # The handler call inline, not through a method: this runs
                    # once per ready socket, and a try costs nothing until it raises.
                    handler = key.data
                    try:
                        if mask & EVENT_READ:
                            handler.on_readable()
                        if mask & EVENT_WRITE:
                            handler.on_writable()
                    except Exception as exc:  # one client's failure never stops the loop
                        self._handler_failed(handler, exc)
                self.timers.advance()
                self._run_ready()
                if to_flush:
                    self._flush_all()
        finally:
            self._running = False

    def stop(self) -> None:
        """Make ``run()`` return after the current turn."""
        self._running = False

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self.selector.close()
        self._waker.close()

    # -- internals ----------------------------------------------------------------

    @staticmethod
    def _handler_failed(handler: Handler, exc: Exception) -> None:
        log.exception("error in handler %r", handler, exc_info=exc)
        try:
            handler.on_error(exc)
        except Exception:
            log.exception("error in error handler of %r", handler)

    def _run_ready(self) -> None:
        from_threads = self._from_threads
        while from_threads:
            self._ready.append(from_threads.popleft())
        # Run only what is queued now: callbacks queued by these run next turn.
        for _ in range(len(self._ready)):
            callback, args = self._ready.popleft()
            try:
                callback(*args)
            except Exception:
                log.exception("error in callback %r", callback)

    def _flush_all(self) -> None:
        # Only the transports written to so far: one that a flush writes to
        # (a resumed writer, say) is flushed at the end of the next turn.
        to_flush = self.to_flush
        count = len(to_flush)
        for i in range(count):
            transport = to_flush[i]
            try:
                transport.flush()
            except Exception as exc:
                log.exception("error flushing %r", transport)
                transport.on_error(exc)
        del to_flush[:count]
