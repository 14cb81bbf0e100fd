"""Progress on stderr while a bench runs (the report itself goes to stdout).

On a terminal a live status line is redrawn in place; otherwise (a pipe, a
log file, ``make bench > out``) only the permanent notes are printed, one per
step, so a long run still shows it is alive without flooding the log.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._live = False
        self._started = time.monotonic()

    def note(self, text: str) -> None:
        """A line that stays."""
        if not self.enabled:
            return
        self._clear()
        elapsed = time.monotonic() - self._started
        self.stream.write(f"[{elapsed:6.1f}s] {text}\n")
        self.stream.flush()

    def live(self, text: str) -> None:
        """A status that the next one replaces (terminals only)."""
        if not self.tty:
            return
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._live = True

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\r\x1b[K")
            self._live = False


class RateMeter:
    """Turns a growing counter (the workers' shared progress slots) into a
    live line: elapsed/total seconds and the recent rate."""

    def __init__(self, progress: Progress, label: str, counters, duration: float, unit: str = "msgs/s"):
        self.progress, self.label, self.counters = progress, label, counters
        self.duration, self.unit = duration, unit
        self.start = time.monotonic()
        self.last = (self.start, 0)

    def __call__(self) -> None:
        now = time.monotonic()
        total = sum(self.counters)
        then, before = self.last
        rate = (total - before) / (now - then) if now > then else 0.0
        self.last = (now, total)
        self.progress.live(f"{self.label}: {min(now - self.start, self.duration):.1f}/{self.duration:g} s, "
                           f"{rate:,.0f} {self.unit}")
