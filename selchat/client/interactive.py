"""The interactive client: a prompt_toolkit prompt, a status line, and output above them.

prompt_toolkit does the line editing (history, cursor keys, word deletion,
paste, wide characters) and the completion menu. What it shows:

- the **prompt**, naming you and your chat state (``alice → bob> ``);
- the **status line** below it: you, the connection (with the reconnect
  countdown), the chat state, and the keys worth knowing;
- everything else **above** the prompt, through one printer: each batch of
  lines is written inside ``run_in_terminal``, which erases the prompt, lets
  the lines scroll up, and draws the prompt again with the half-typed line
  intact. A single task writes, in order, on the loop thread: nothing races
  prompt_toolkit's own drawing.

The line you enter is erased and replaced by its echo: a chat message as
``[alice] text`` in your colour (from the session's ``sent`` notice), anything
else as the prompt and the line, dimmed. So the scrollback reads as a
transcript with one colour per speaker and timestamps on every line.

Colours are plain SGR codes, written only when colour is on; with colour off
prompt_toolkit draws in monochrome too (``ColorDepth.DEPTH_1_BIT``), so no
colour code is ever sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import sys

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.application.current import get_app_session
from prompt_toolkit.filters import Condition
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.output import ColorDepth
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style

from selchat.client.core import COMMANDS, ClientSession, Phase
from selchat.client.notices import Notice
from selchat.client.servers import address
from selchat.client.ui import prompt_text, stamp

#: How long Tab waits for the server's list of names before using the last one.
NAMES_WAIT = 1.0

# SGR codes by role. Only the name tag of a message is coloured, not its text.
SGR = {
    "own": "1;36",       # [alice] your messages
    "partner": "1;32",   # [bob] your partner's
    "notice": "33",      # what the server says: started, ended, declined...
    "alert": "1;35",     # a chat request for you
    "error": "31",       # refusals, lost connections
    "quiet": "2",        # echoes, hints, help, timestamps
}
ROLE = {
    "message": "partner", "sent": "own", "request-in": "alert",
    "error": "error", "not-delivered": "error", "not-delivered-old": "error", "lost": "error",
    "protocol-error": "error", "disconnected": "error", "chat-dropped": "error", "request-dropped": "error",
    "login-failed": "error", "register-failed": "error", "unreachable": "error", "hint-register": "quiet",
    "hint-idle": "quiet", "hint-request-in": "quiet", "hint-request-out": "quiet", "help": "quiet",
    "help-command": "quiet", "retrying": "quiet", "reconnecting": "quiet", "gave-up": "quiet",
    "connected": "quiet", "unconfirmed": "error", "chat-kept": "quiet", "queued": "quiet", "delivered": "quiet",
}
#: Receipts: the ``delivered`` notices of one batch of events make one short line.
RECEIPT_KIND = "delivered"
RECEIPT_TEXT = 40   # characters of a message quoted in a receipt
#: Kinds the status line shows instead of printing a line for each.
STATUS_KINDS = frozenset({"reconnecting"})

STYLE = Style.from_dict({
    "prompt.user": "bold",
    "prompt.partner": "ansigreen bold",
    "prompt.state": "ansiyellow",
    "bottom-toolbar": "reverse",
    "bottom-toolbar.alert": "reverse ansimagenta",
})

#: A command whose argument is a user name (``/chat``, ``/block``...), and the name so far.
_USER_NAME = re.compile(r"\s*(%s)\s+(\S*)$" % "|".join(re.escape(name) for name, c in COMMANDS.items() if c.names),
                        re.IGNORECASE)
_PASSWORD = re.compile(r"\s*/password\s*", re.IGNORECASE)
_UNREGISTER = re.compile(r"\s*/unregister\s*", re.IGNORECASE)
_HELP_NAME = re.compile(r"\s*/help\s+(\S*)$", re.IGNORECASE)


def paint(text: str, role: str, color: bool) -> str:
    if not color or not text:
        return text
    return f"\x1b[{SGR[role]}m{text}\x1b[0m"


def render(notice: Notice, color: bool, timestamp_format: str | None, when: float | None = None) -> str:
    """The line(s) for ``notice`` on a terminal, with time and colours."""
    prefix = paint(stamp(timestamp_format, when), "quiet", color)
    role = ROLE.get(notice.kind, "notice")
    if notice.kind in ("message", "sent"):
        return f"{prefix}{paint(f'[{notice.user}]', role, color)} {notice.text}"
    if notice.kind == "help":
        return "\n".join(prefix + paint(line, "quiet", color) for line in help_lines())
    return prefix + paint(notice.line(), role, color)


def receipt_line(texts: list[str], color: bool, timestamp_format: str | None, when: float | None = None) -> str:
    """One line for the messages of yours just delivered: ``✓ delivered: 'hi'``,
    or ``✓ 3 delivered: 'first' … 'last'``. A line of its own per message would
    double the transcript; the tick says the same in a glance."""
    def quote(text: str) -> str:
        return repr(text if len(text) <= RECEIPT_TEXT else text[:RECEIPT_TEXT - 1] + "…")

    if len(texts) == 1:
        body = f"✓ delivered: {quote(texts[0])}"
    else:
        body = f"✓ {len(texts)} delivered: {quote(texts[0])} … {quote(texts[-1])}"
    return paint(stamp(timestamp_format, when), "quiet", color) + paint(body, "quiet", color)


def help_lines() -> list[str]:
    width = max(len(c.usage) for c in COMMANDS.values())
    lines = ["commands:"]
    lines += [f"  {c.usage:<{width}}  {c.help}" for c in COMMANDS.values()]
    lines += [
        "a request is also answered with yes or no; in a chat every other line is a message",
        "(start it with // to send a line beginning with /)",
        "keys: Tab completes commands and names, Up/Down recall lines, Ctrl-W deletes a word,",
        "      Ctrl-C leaves a chat (again: exits), Ctrl-D exits",
    ]
    return lines


def status_text(session: ClientSession, client, reconnect_note: Notice | None = None, width: int = 80) -> str:
    """The status line: who, the connection, the chat state."""
    phase, partner = session.phase, session.partner
    if phase is Phase.RECONNECTING:
        wait = client.reconnect_in() if client is not None else None
        attempt = session.attempt
        why = f": {reconnect_note.text}" if reconnect_note is not None and reconnect_note.text else ""
        servers = session.servers
        to = f" to {servers.target}" if servers is not None and servers.several else ""
        if wait is None:
            conn = f"reconnecting{to} (attempt {attempt}){why}"
        else:
            conn = f"offline, reconnecting{to} in {math.ceil(wait)} s (attempt {attempt}{why})"
    elif phase in (Phase.CONNECTING, Phase.LOGGING_IN, Phase.ATTACHING):
        conn = "logging in"
    elif phase is Phase.CLOSED:
        conn = "disconnected"
    elif not session.online:
        conn = "reconnecting (attaching)"
    else:
        conn = "connected"
        if client is not None and client.server:
            conn += f" to {address(*client.server)}"
            if getattr(client, "tls", None) is not None:
                conn += " (TLS)"
    chat = {
        Phase.IDLE: "idle",
        Phase.REQUEST_IN: f"request from {partner}: yes or no?",
        Phase.REQUEST_OUT: f"waiting for {partner} to answer",
        Phase.CHATTING: f"chatting with {partner}" + (" (away, reconnecting)" if session.partner_away else ""),
    }.get(phase, "not in a chat")
    status = f" {session.user} · {conn} · {chat} "
    hints = "· /help · Tab completes · Ctrl-D exits "
    return status + hints if len(status) + len(hints) <= width else status


def completions(text: str, names, me: str = "", blocked=()) -> tuple[str, list[str]]:
    """What Tab can complete at the end of ``text``: the word being completed
    and its candidates (command names, or user names after ``/chat`` and
    the other commands that take one; after ``/unblock``, the ``blocked``
    names too, online or not)."""
    named = _USER_NAME.match(text)
    if named:
        word = named.group(2)
        if named.group(1).lower() == "/unblock":
            names = (*blocked, *names)
        found = {n.lower(): n for n in names if n.lower().startswith(word.lower()) and n.lower() != me.lower()}
        return word, sorted(found.values(), key=str.lower)
    helped = _HELP_NAME.match(text)
    if helped:
        word = helped.group(1)
        bare = word.lower().lstrip("/")
        return word, [name[1:] for name in COMMANDS if name[1:].startswith(bare)]
    stripped = text.lstrip()
    if stripped.startswith("/") and " " not in stripped:
        return stripped, [name for name in COMMANDS if name.startswith(stripped.lower())]
    return "", []


def common_prefix(words: list[str]) -> str:
    """The longest prefix all ``words`` share, ignoring case (in the first one's spelling)."""
    first = words[0]
    size = len(first)
    for word in words[1:]:
        size = min(size, len(word))
        for i in range(size):
            if word[i].lower() != first[i].lower():
                size = i
                break
    return first[:size]


class InteractiveUI:
    """A prompt_toolkit prompt with a status line; notices print above it.

    Ctrl-D (EOF) logs out; Ctrl-C leaves the chat (or withdraws or declines
    the request), and logs out when there is neither or when pressed again.
    prompt_toolkit restores the terminal whenever the prompt ends, also when
    its task is cancelled, and ``aclose`` always waits for that.
    """

    def __init__(self, color: bool = True, bell: bool = True, timestamp_format: str | None = "%H:%M"):
        self.color, self.bell, self.timestamp_format = color, bell, timestamp_format
        self.client = None
        self.session: ClientSession | None = None
        self._completing: asyncio.Task | None = None
        self._prompt: PromptSession | None = None
        self._task: asyncio.Task | None = None
        self._reconnect_note: Notice | None = None
        self._receipts: list[str] = []   # texts of "delivered" notices not yet printed
        self._pending: list[str] = []
        self._wake: asyncio.Event | None = None
        self._printer: asyncio.Task | None = None
        self._closing = False
        self._stopped = False

    # -- output ---------------------------------------------------------------------

    def show(self, notice: Notice) -> None:
        if notice.kind in STATUS_KINDS:
            self._reconnect_note = notice
            return
        if notice.kind == RECEIPT_KIND:
            self._receipts.append(notice.text)   # printed as one line at the end of the batch
            return
        self._print_receipts()
        text = render(notice, self.color, self.timestamp_format)
        if notice.kind == "request-in" and self.bell:
            text += "\a"
        self._write(text + "\n", stderr=notice.to_stderr)

    def _write(self, text: str, stderr: bool = False) -> None:
        """Queue ``text`` for the printer; before the loop runs, write it at once."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            stream = sys.stderr if stderr else sys.stdout
            stream.write(text)
            stream.flush()
            return
        self._pending.append(text)
        if self._printer is None:
            self._wake = asyncio.Event()
            self._printer = loop.create_task(self._print_forever())
        self._wake.set()

    async def _print_forever(self) -> None:
        """The one writer: batches of lines, in order, until closing and drained."""
        while not (self._closing and not self._pending):
            await self._wake.wait()
            self._wake.clear()
            await self._print_pending()

    async def _print_pending(self) -> None:
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []

        def emit() -> None:
            output = get_app_session().output
            output.write_raw(text)
            output.flush()

        try:
            await run_in_terminal(emit)
        except OSError:
            self._pending.clear()   # the terminal is gone (hung up): nobody to show it to

    def output(self):
        # Our own lines go through the printer; this only keeps a stray print
        # (a warning, a library) from garbling the prompt.
        return patch_stdout(raw=True)

    def _print_receipts(self) -> None:
        if self._receipts:
            texts, self._receipts = self._receipts, []
            self._write(receipt_line(texts, self.color, self.timestamp_format) + "\n")

    def refresh(self) -> None:
        # The client calls this after every batch of effects: the receipts of
        # one batch are one line.
        self._print_receipts()
        if self._prompt is not None and self._prompt.app.is_running:
            self._prompt.app.invalidate()

    # -- input ----------------------------------------------------------------------

    def start_input(self, client) -> None:
        self.client, self.session = client, client.session
        self._prompt = PromptSession(
            key_bindings=self._key_bindings(),
            style=STYLE,
            color_depth=None if self.color else ColorDepth.DEPTH_1_BIT,
            include_default_pygments_style=False,
            bottom_toolbar=self._toolbar,
            erase_when_done=True,
        )
        self._stopped = False
        self._task = asyncio.get_running_loop().create_task(self._read_lines())
        self._task.add_done_callback(self._input_ended)

    def _input_ended(self, task: asyncio.Task) -> None:
        """The prompt loop must not die silently: say why and log out."""
        if task.cancelled() or task.exception() is None:
            return
        err = task.exception()
        self.show(Notice("error", text=f"the terminal input failed: {type(err).__name__}: {err}"))
        self.client.end_of_input()

    def pause_input(self) -> None:
        pass   # a person cannot out-type the network

    def resume_input(self) -> None:
        pass

    def stop_input(self) -> None:
        if self._task is not None and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()
        self._stopped = True

    async def aclose(self) -> None:
        self._stopped = True
        self._print_receipts()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._printer is not None:   # the last lines, with no prompt left
            self._closing = True
            self._wake.set()
            await self._printer

    # -- Tab --------------------------------------------------------------------------

    def _key_bindings(self) -> KeyBindings:
        bindings = KeyBindings()

        completing = Condition(lambda: self._completing is not None and not self._completing.done())

        @bindings.add("tab", filter=~completing)
        def _tab(event) -> None:
            self._completing = asyncio.get_running_loop().create_task(self._complete(event.current_buffer))

        @bindings.add("enter", filter=completing)
        def _enter(event) -> None:
            # Tab is still asking the server for names: enter what it completes.
            buffer, app = event.current_buffer, event.app

            def enter(_) -> None:
                if app.is_running and not app.is_done:
                    buffer.validate_and_handle()

            self._completing.add_done_callback(enter)

        return bindings

    async def _complete(self, buffer) -> None:
        """Tab: complete a command, or a user name after ``/chat`` (``/block``...), shell-style.

        One candidate is inserted whole; several insert what they share, and
        when they share nothing more they are listed above the prompt. Names
        are first refreshed with a background WHO (waiting at most
        NAMES_WAIT), so someone who just came online can be completed; the
        session keeps that WHO apart from a typed ``/who``, so its answer is
        never printed.
        """
        text = buffer.document.text_before_cursor
        names = self.session.known_users
        if _USER_NAME.match(text):
            with contextlib.suppress(asyncio.TimeoutError):
                names = await asyncio.wait_for(asyncio.shield(self.client.refresh_names()), NAMES_WAIT)
            if buffer.document.text_before_cursor != text:
                return   # typed on meanwhile: this Tab is out of date
        word, found = completions(text, names, self.session.user, self.session.blocked)
        if not found:
            return
        insert = found[0] if len(found) == 1 else common_prefix(found)
        if len(found) == 1 and insert.startswith("/") and COMMANDS[insert].arity[1]:
            insert += " "   # /chat, /block, /help... go on with an argument
        if insert != word:
            buffer.delete_before_cursor(len(word))
            buffer.insert_text(insert)
        if len(found) > 1 and insert.lower() == word.lower():
            self._write(paint("  ".join(found), "quiet", self.color) + "\n")

    # -- the prompt and the status line -------------------------------------------------

    def _prompt_fragments(self):
        session = self.session
        if session.phase is Phase.RECONNECTING:
            wait = self.client.reconnect_in()
            state = f" [offline, reconnecting in {math.ceil(wait)} s]" if wait else " [offline, reconnecting]"
            return [("class:prompt.user", session.user), ("class:prompt.state", state), ("", "> ")]
        if session.phase is Phase.CHATTING:
            return [("class:prompt.user", session.user), ("", " → "),
                    ("class:prompt.partner", session.partner or ""), ("", "> ")]
        text = prompt_text(session)
        user, rest = text[:len(session.user)], text[len(session.user):]
        return [("class:prompt.user", user), ("class:prompt.state", rest[:-2]), ("", rest[-2:])]

    def _toolbar(self):
        style = "class:bottom-toolbar.alert" if self.session.phase is Phase.REQUEST_IN else ""
        width = self._prompt.app.output.get_size().columns
        return [(style, status_text(self.session, self.client, self._reconnect_note, width))]

    async def _read_lines(self) -> None:
        while not self._stopped:
            try:
                # handle_sigint=False: prompt_toolkit would remove our own SIGINT
                # handler when the prompt ends; in raw mode Ctrl-C is a key anyway.
                line = await self._prompt.prompt_async(self._prompt_fragments, handle_sigint=False)
            except EOFError:
                self.client.end_of_input()
            except KeyboardInterrupt:
                self.client.interrupt()
            else:
                self._echo(line)
                if _PASSWORD.fullmatch(line):
                    await self._change_password()
                elif _UNREGISTER.fullmatch(line):
                    await self._delete_account()
                else:
                    self.client.typed(line)

    async def _change_password(self) -> None:
        """/password: the passwords are read here, unechoed and kept out of
        the history, and handed to the session (never as a typed line)."""
        if not self.session.online:
            self.show(Notice("error", text="password not changed: not connected"))
            return
        secret = PromptSession(is_password=True, erase_when_done=True)  # its own: no history kept
        asked = []
        for question in ("current password: ", "new password: ", "repeat the new password: "):
            try:
                asked.append(await secret.prompt_async(question, handle_sigint=False))
            except (EOFError, KeyboardInterrupt):
                self.show(Notice("error", text="password not changed"))
                return
        old, new, again = asked
        if new != again:
            self.show(Notice("error", text="password not changed: the two new passwords differ"))
            return
        self.client.change_password(old, new)

    async def _delete_account(self) -> None:
        """/unregister: the password is read here, unechoed and kept out of
        the history, then the user name, to confirm; only then is the
        password handed to the session (never as a typed line)."""
        if not self.session.online:
            self.show(Notice("error", text="account not deleted: not connected"))
            return
        secret = PromptSession(is_password=True, erase_when_done=True)  # its own: no history kept
        confirm = PromptSession(erase_when_done=True)
        try:
            password = await secret.prompt_async("password (your account will be deleted for good): ",
                                                 handle_sigint=False)
            name = await confirm.prompt_async("type your user name to confirm: ", handle_sigint=False)
        except (EOFError, KeyboardInterrupt):
            self.show(Notice("error", text="account not deleted"))
            return
        if name.strip().lower() != self.session.user.lower():
            self.show(Notice("error", text="account not deleted"))
            return
        self.client.delete_account(password)

    def _echo(self, line: str) -> None:
        """Put the entered line back above the prompt (a message is echoed by
        the session's ``sent`` notice once it is really sent)."""
        if not line.strip():
            return
        session = self.session
        command = line.lstrip().startswith("/") and not line.startswith("//")
        if session.phase is Phase.CHATTING and not command:
            return
        for part in line.split("\n"):
            self._write(paint(stamp(self.timestamp_format) + prompt_text(session) + part, "quiet", self.color) + "\n")
