"""The two faces of the client: scripted (stdin/stdout lines) and interactive.

Both implement what ``app.Client`` expects of a UI: ``show(notice)``,
``refresh()``, ``start_input(client)``, ``pause_input()``, ``resume_input()``,
``stop_input()``, ``output()`` (a context manager around the session) and
``aclose()``.

Scripted mode prints every notice as one line (``core.FORMATS``) and flushes,
so another program can follow along; it reads commands from stdin. Interactive
mode reads with a prompt_toolkit prompt whose text shows the phase, and prints
notices above the input line through ``patch_stdout`` so they never garble
what the user is typing.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import sys

from selchat.client.core import ClientSession, Notice, Phase

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
    return f"{user}> "


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
    """stdin lines in; one line per notice out on stdout (stderr before a session)."""

    def __init__(self, stdin_fd: int | None = None):
        self._fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
        self._lines: StdinLines | None = None

    def show(self, notice: Notice) -> None:
        stream = sys.stderr if notice.to_stderr else sys.stdout
        try:
            print(notice.line(), file=stream, flush=True)
        except BrokenPipeError:
            # Nobody reads us any more; keep running to log out cleanly.
            sys.stdout = open(os.devnull, "w")

    def output(self):
        return contextlib.nullcontext()

    def refresh(self) -> None:
        pass

    def start_input(self, client) -> None:
        self._lines = StdinLines(self._fd, client.typed, client.end_of_input)
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


class InteractiveUI:
    """A prompt_toolkit prompt showing the phase; notices print above it.

    Ctrl-D (EOF) logs out; Ctrl-C leaves the chat (or withdraws the request),
    and logs out when there is neither. prompt_toolkit restores the terminal
    whenever the prompt ends, also when its task is cancelled, and ``aclose``
    always waits for that.
    """

    def __init__(self):
        self._prompt = None
        self._task: asyncio.Task | None = None
        self._client = None

    def show(self, notice: Notice) -> None:
        print(notice.line(), file=sys.stderr if notice.to_stderr else sys.stdout, flush=True)

    def output(self):
        from prompt_toolkit.patch_stdout import patch_stdout

        return patch_stdout()

    def refresh(self) -> None:
        if self._prompt is not None:
            self._prompt.app.invalidate()

    def start_input(self, client) -> None:
        from prompt_toolkit import PromptSession

        self._client = client
        self._prompt = PromptSession()
        self._task = asyncio.get_running_loop().create_task(self._read_lines())

    def pause_input(self) -> None:
        pass   # a person cannot out-type the network

    def resume_input(self) -> None:
        pass

    def stop_input(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def aclose(self) -> None:
        self.stop_input()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read_lines(self) -> None:
        session = self._client.session
        while True:
            try:
                # handle_sigint=False: prompt_toolkit would remove our own SIGINT
                # handler when the prompt ends; in raw mode Ctrl-C is a key anyway.
                line = await self._prompt.prompt_async(lambda: prompt_text(session), handle_sigint=False)
            except EOFError:
                self._client.end_of_input()
            except KeyboardInterrupt:
                self._client.interrupt()
            else:
                self._client.typed(line)
