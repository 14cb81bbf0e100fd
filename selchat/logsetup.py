"""``selchat serve``'s logging: text or JSON lines, to stderr or a file, never blocking.

Every record goes through a queue: the root logger's only handler is a
``QueueHandler``, which appends to an unbounded queue and returns, and a
``QueueListener`` thread does the formatting and writing. So the reactor
thread never waits for a slow disk or terminal.

Text lines (what the fail2ban filter in docs/operations.md matches)::

    2026-12-02T22:10:00.123Z INFO selchat.events: login-failed user=bob addr=127.0.0.1 reason=auth-failed

JSON lines: one object each, with ``time``, ``level``, ``logger``,
``message``, and for the operator events of ``selchat.server.audit`` also
``event`` and the event's fields as top-level keys::

    {"time": "2026-12-02T22:10:00.123Z", "level": "INFO", "logger": "selchat.events",
     "message": "login-failed user=bob ...", "event": "login-failed", "user": "bob", ...}

On SIGHUP the server calls :meth:`Logs.apply` from a worker thread: it
switches the format and reopens the log file (logrotate has renamed the old
one). The switch goes through the same queue as the records, so no line is
lost or torn, and each lands in the file that was current when it was logged.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time

#: Keys every JSON line has; an event field of the same name does not replace them.
JSON_KEYS = ("time", "level", "logger", "message")


def utc_time(record: logging.LogRecord) -> str:
    """``2026-12-02T22:10:00.123Z``: the record's time in UTC, to the millisecond."""
    seconds = int(record.created)
    millis = min(999, int((record.created - seconds) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record, datefmt=None) -> str:  # noqa: N802 (logging's name)
        return utc_time(record)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {"time": utc_time(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        event = getattr(record, "event", None)
        if event is not None:
            obj["event"] = event
            for key, value in (getattr(record, "fields", None) or {}).items():
                if key not in obj:
                    obj[key] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exception"] = record.exc_text
        return json.dumps(obj, ensure_ascii=False, default=str)


FORMATTERS = {"text": TextFormatter, "json": JSONFormatter}


def level_for(verbosity: int) -> int:
    """``-v`` counted: none or one is INFO (the server's events), two or more DEBUG."""
    return logging.INFO if verbosity <= 1 else logging.DEBUG


class _Queue(logging.handlers.QueueHandler):
    """Hands the record over unformatted, so that the listener's formatter
    sees the audit fields and the exception itself (the stock QueueHandler
    formats the message on the calling thread and drops ``exc_info``)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)   # other handlers, if any, see the original
        record.message = record.getMessage()   # resolve %-args now: they may change later
        record.msg, record.args = record.message, None
        if record.exc_info and not record.exc_text:  # tracebacks hold frames; render them here
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        return record


class _Output(logging.StreamHandler):
    """The listener thread's one handler. Besides records it takes "switch"
    records that ``Logs.apply`` queues: handled in queue order, they put
    every line logged before the reload in the old file and every line
    after it in the new one."""

    def __init__(self, stream, file, formatter: logging.Formatter):
        super().__init__(stream)
        self.file = file   # the stream, if it is a file we opened (and so close)
        self.setFormatter(formatter)

    def handle(self, record: logging.LogRecord):
        switch = getattr(record, "selchat_switch", None)
        if switch is None:
            return super().handle(record)
        stream, file, formatter, done = switch
        with self.lock:
            self.setFormatter(formatter)
            self.setStream(stream)   # flushes the old stream first
            old, self.file = self.file, file
        if old is not None:
            old.close()
        done.set()
        return True

    def close(self) -> None:
        with self.lock:
            self.flush()
            if self.file is not None:
                self.file.close()
                self.file = None
        super().close()


class Logs:
    """The running log setup of ``selchat serve``; see :func:`setup`."""

    #: How long ``apply`` waits for the writer to switch files (it switches
    #: later all the same, once it gets there).
    APPLY_WAIT = 10.0

    def __init__(self, config, verbosity: int = 0, stderr=None):
        self._stderr = stderr if stderr is not None else sys.stderr
        self._lock = threading.Lock()   # one apply or close at a time
        self._closed = False
        stream, file = self._open(config.log_file)
        self.handler = _Output(stream, file, FORMATTERS[config.log_format]())
        self.log_file, self.log_format = config.log_file, config.log_format
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.listener = logging.handlers.QueueListener(self.queue, self.handler)
        self.listener.start()
        root = logging.getLogger()
        root.handlers[:] = [_Queue(self.queue)]
        root.setLevel(level_for(verbosity))
        atexit.register(self.close)

    def _open(self, path):
        """(stream, file or None): the log file opened for appending, or stderr."""
        if not path:
            return self._stderr, None
        f = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
        return f, f

    def apply(self, config) -> None:
        """Switch to ``config.log_format`` and (re)open ``config.log_file``.

        Thread-safe; blocking (it opens a file and waits for the writer), so
        call it from a worker, not the reactor. OSError if the file cannot be
        opened: nothing changes then.
        """
        with self._lock:
            if self._closed:
                return
            stream, file = self._open(config.log_file)
            done = threading.Event()
            switch = (stream, file, FORMATTERS[config.log_format](), done)
            self.queue.put_nowait(logging.makeLogRecord({"selchat_switch": switch}))
            done.wait(self.APPLY_WAIT)   # a writer stuck on a slow disk must not hang the reload
            self.log_file, self.log_format = config.log_file, config.log_format

    def close(self) -> None:
        """Write out what is queued, stop the thread, close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.listener.stop()   # handles everything queued before it returns
            self.handler.close()
        atexit.unregister(self.close)


def setup(config, verbosity: int = 0) -> Logs:
    """Route every log record through a queue to ``config.log_file`` (or
    stderr) in ``config.log_format``; OSError if the file cannot be opened."""
    return Logs(config, verbosity)
