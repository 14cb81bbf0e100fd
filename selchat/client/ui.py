"""The faces of the client for programs: scripted lines and --json.

Every UI implements what ``app.Client`` expects: ``show(notice)``,
``refresh()``, ``start_input(client)``, ``pause_input()``, ``resume_input()``,
``stop_input()``, ``output()`` (a context manager around the session) and
``aclose()``. The interactive one, on prompt_toolkit, is in ``interactive.py``
(imported only on a terminal, so scripts do not pay for loading it).

Scripted mode prints every notice as one line (``notices.FORMATS``) and flushes,
so another program can follow along; it reads commands from stdin. ``--json``
reads the same way and prints one JSON object per notice instead.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone

from selchat.client.core import ClientSession, Phase
from selchat.client.notices import ECHO_KINDS, RECEIPT_KINDS, Notice

MAX_INPUT_LINE = 64 * 1024   # a longer run without a newline is handed on as one line
READ_SIZE = 65536


def prompt_text(session: ClientSession) -> str:
    """The prompt for the session's phase: ``alice> ``, ``alice → bob> `` ..."""
    user, partner = session.user, session.partner
    if session.phase is Phase.CHATTING:
        return f"{user} → {partner}> "
    if session.phase is Phase.REQUEST_IN:
        return f"{user} [{partner} asks: yes/no]> "
    if session.phase is Phase.REQUEST_OUT:
        return f"{user} [waiting for {partner}]> "
    if session.phase is Phase.RECONNECTING:
        return f"{user} [offline]> "
    return f"{user}> "


def stamp(fmt: str | None, when: float | None = None) -> str:
    """``when`` (now by default) in local time by ``fmt``, and a space; "" without a format.
    A ``datetime``'s strftime, so ``%f`` (microseconds) works too."""
    if not fmt:
        return ""
    return datetime.fromtimestamp(time.time() if when is None else when).astimezone().strftime(fmt) + " "


def json_event(notice: Notice, when: float | None = None) -> str:
    """One --json line: type, time, the plain line, and the kind's own fields."""
    moment = datetime.fromtimestamp(time.time() if when is None else when, timezone.utc)
    event = {"type": notice.kind, "time": moment.isoformat(timespec="milliseconds"), "line": notice.line()}
    event.update(notice.fields())
    return json.dumps(event, ensure_ascii=False)


class StdinLines:
    """Lines from a file descriptor, read without blocking the loop.

    Pipes, terminals and sockets are watched with ``loop.add_reader`` and read
    once per readiness; a read on a ready descriptor does not block, so the
    descriptor is left in blocking mode (it is shared with the parent shell,
    which would not expect O_NONBLOCK). epoll refuses regular files (and
    /dev/null) with EPERM, since they are always readable: those are read one
    chunk per loop iteration with ``call_soon``, so socket events still get
    their turn between chunks.
    """

    def __init__(self, fd: int, on_line, on_eof):
        self.fd = fd
        self._on_line, self._on_eof = on_line, on_eof
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched = False     # registered with add_reader
        self._polled = False      # a regular file: read with call_soon
        self._handle: asyncio.Handle | None = None
        self._paused = self._stopped = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._loop.add_reader(self.fd, self._read)
            self._watched = True
        except PermissionError:
            self._polled = True
            self._schedule()

    def pause(self) -> None:
        self._paused = True
        self._unwatch()

    def resume(self) -> None:
        if self._stopped or not self._paused:
            return
        self._paused = False
        if self._polled:
            self._schedule()
        else:
            self._loop.add_reader(self.fd, self._read)
            self._watched = True

    def stop(self) -> None:
        self._stopped = True
        self._unwatch()

    def _unwatch(self) -> None:
        if self._watched:
            self._loop.remove_reader(self.fd)
            self._watched = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_soon(self._read_polled)

    def _read_polled(self) -> None:
        self._handle = None
        self._read()
        if self._polled and not (self._paused or self._stopped):
            self._schedule()

    def _read(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""   # an unreadable stdin ends the input like EOF
        if data:
            self._feed(self._decoder.decode(data))
        else:
            self._feed(self._decoder.decode(b"", final=True))
            self._end()

    def _feed(self, text: str) -> None:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        if len(self._pending) > MAX_INPUT_LINE:
            lines.append(self._pending)
            self._pending = ""
        for line in lines:
            if self._stopped:
                return
            self._on_line(line)

    def _end(self) -> None:
        if self._pending and not self._stopped:
            self._on_line(self._pending)
        self._pending = ""
        if not self._stopped:
            self.stop()
            self._on_eof()


class ScriptedUI:
    """stdin lines in; one line per notice out on stdout (stderr before a session).

    Echoes of the user's own actions (``ECHO_KINDS``) and the receipts for
    them (``RECEIPT_KINDS``) are not printed: the output stays what scripts
    written for earlier versions expect. With
    ``timestamp_format`` every line starts with the local time.
    """

    def __init__(self, stdin_fd: int | None = None, timestamp_format: str | None = None):
        self._fd = stdin_fd   # None: sys.stdin's, looked up when input starts
        self._lines: StdinLines | None = None
        self.timestamp_format = timestamp_format

    def show(self, notice: Notice) -> None:
        if notice.kind in ECHO_KINDS or notice.kind in RECEIPT_KINDS:
            return
        self._print(stamp(self.timestamp_format) + notice.line(), sys.stderr if notice.to_stderr else sys.stdout)

    def _print(self, text: str, stream) -> None:
        try:
            print(text, file=stream, flush=True)
        except BrokenPipeError:
            # Nobody reads us any more; keep running to log out cleanly.
            sys.stdout = open(os.devnull, "w")

    def output(self):
        return contextlib.nullcontext()

    def refresh(self) -> None:
        pass

    def start_input(self, client) -> None:
        fd = sys.stdin.fileno() if self._fd is None else self._fd
        self._lines = StdinLines(fd, client.typed, client.end_of_input)
        self._lines.start()

    def pause_input(self) -> None:
        if self._lines:
            self._lines.pause()

    def resume_input(self) -> None:
        if self._lines:
            self._lines.resume()

    def stop_input(self) -> None:
        if self._lines:
            self._lines.stop()

    async def aclose(self) -> None:
        self.stop_input()


class JsonUI(ScriptedUI):
    """Like scripted mode, but every notice (also the ones scripted mode puts on
    stderr, and the echoes) is one JSON object on one line of stdout."""

    def show(self, notice: Notice) -> None:
        self._print(json_event(notice), sys.stdout)
