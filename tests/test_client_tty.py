"""The interactive client as a person uses it: in a pseudo-terminal, against the real server.

Each client runs under ``sh -c '<client>; echo EXIT=$?; stty -a'`` in a pty
(pexpect), so after it ends we also see its exit code and whether it left the
terminal as it found it (``icanon`` and ``echo`` on). The other side of a chat
is a ``RawUser``, driven frame by frame. prompt_toolkit draws by difference, so
text on the screen can come with escape sequences between its characters:
``loose()`` matches through them. Nothing sleeps: every wait is an expect with
a deadline.

``PROMPT_TOOLKIT_NO_CPR=1``: the pty does not answer cursor-position requests
as a terminal would, and prompt_toolkit would wait for them.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import sys

import pexpect
import pytest

from selchat.client.core import COMMANDS
from selchat.client.notices import FORMATS, Notice
from selchat.client.interactive import common_prefix, completions, render
from tests.support import DEADLINE, REPO_ROOT, RawUser, unique
from tests.test_client_scripted import FakeServer

_BETWEEN = r"(?:\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|[\r\x08\x07])*"
# SGR sequences that set a colour: 30-38/40-48 (and 38;5/48;5, 38;2/48;2), 90-97, 100-107
_SGR = re.compile(r"\x1b\[([0-9;]*)m")
_COLOUR_PARAMS = {str(n) for n in (*range(30, 39), *range(40, 49), *range(90, 98), *range(100, 108))}


def loose(text: str) -> str:
    """A regex for ``text`` as drawn on a terminal: escape sequences may come
    between characters, and a space may be drawn as a cursor move."""
    return _BETWEEN.join(r"(?: |\x1b\[\d*C)" if char == " " else re.escape(char) for char in text.rstrip())


def colour_codes(output: str) -> list[str]:
    return [m.group(0) for m in _SGR.finditer(output) if _COLOUR_PARAMS & set(m.group(1).split(";"))]


class Tty:
    """``selchat connect`` in a pseudo-terminal."""

    def __init__(self, tmp_path, port: int, user: str, *args: str, env: dict | None = None,
                 register: bool = True):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SELCHAT_") and k != "NO_COLOR"}
        environ.update(SELCHAT_PASSWORD="pw tty", TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1",
                       XDG_CONFIG_HOME=str(tmp_path), HOME=str(tmp_path))   # no config of the user's
        environ.update(env or {})
        cmd = [sys.executable, "-m", "selchat.cli", "connect", "--port", str(port), "--user", user,
               *(["--register"] if register else []), *args]
        script = f"trap : INT; {shlex.join(cmd)}; echo EXIT=$?; stty -a"
        self.user = user
        self.out = io.StringIO()
        self.child = pexpect.spawn("/bin/sh", ["-c", script], env=environ, cwd=str(REPO_ROOT),
                                   dimensions=(24, 200), encoding="utf-8", timeout=DEADLINE)
        self.child.logfile_read = self.out

    def expect(self, text: str) -> None:
        """Wait until ``text`` has been drawn."""
        try:
            self.child.expect(loose(text))
        except (pexpect.TIMEOUT, pexpect.EOF) as err:
            raise AssertionError(f"{text!r} not seen; the screen got:\n{self.out.getvalue()[-3000:]!r}") from err

    def send(self, keys: str) -> None:
        self.child.send(keys)

    def login(self) -> "Tty":
        self.expect(f"logged in as {self.user}")
        self.expect(f"{self.user}> ")   # the prompt is up: keys go to prompt_toolkit
        return self

    def client_pid(self) -> int:
        """The client process (the shell's child)."""
        path = f"/proc/{self.child.pid}/task/{self.child.pid}/children"
        with open(path) as f:
            return int(f.read().split()[0])

    def finish(self) -> int:
        """Wait for the client to end; its exit code. Fails if the terminal was not restored."""
        try:
            self.child.expect(r"EXIT=(\d+)")
            code = int(self.child.match.group(1))
            self.child.expect(pexpect.EOF)
        except (pexpect.TIMEOUT, pexpect.EOF) as err:
            raise AssertionError(f"the client did not end; the screen got:\n{self.out.getvalue()[-3000:]!r}") from err
        modes = self.child.before
        assert re.search(r"(?<![-\w])icanon\b", modes) and re.search(r"(?<![-\w])echo\b", modes), \
            f"terminal not restored: {modes!r}"
        return code

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def tty(tmp_path):
    started = []

    def start(*args, **kwargs) -> Tty:
        one = Tty(tmp_path, *args, **kwargs)
        started.append(one)
        return one

    yield start
    for one in started:
        one.close()


# --- the pieces, without a terminal ----------------------------------------------------


def test_completions_of_commands_names_and_help_topics():
    names = ("alice", "Bob", "bobby", "carol")
    assert completions("/c", names) == ("/c", ["/chat"])
    assert completions("  /", names)[1] == list(COMMANDS)
    assert completions("/chat b", names, me="alice") == ("b", ["Bob", "bobby"])
    assert completions("/CHAT  BOBB", names) == ("BOBB", ["bobby"])
    assert completions("/chat ", names, me="alice") == ("", ["Bob", "bobby", "carol"])
    assert completions("/help qu", names) == ("qu", ["quit"])
    assert completions("hello /c", names) == ("", [])
    assert completions("/chat bob x", names) == ("", [])
    assert completions("/block b", names, me="alice") == ("b", ["Bob", "bobby"])
    assert completions(" /UNBLOCK car", names) == ("car", ["carol"])
    assert completions("/blocks b", names) == ("", [])   # /blocks takes no name
    assert completions("/b", names) == ("/b", ["/block", "/blocks"])
    assert completions("/unb", names) == ("/unb", ["/unblock"])
    assert completions("/unblock b", ("bob", "Bob", "bobby")) == ("b", ["Bob", "bobby"])  # one per user
    # /unblock offers the blocked too, online or not; /block and /chat do not
    assert completions("/unblock d", names, blocked=("dave",)) == ("d", ["dave"])
    assert completions("/unblock b", names, blocked=("bob",)) == ("b", ["Bob", "bobby"])
    assert completions("/block d", names, blocked=("dave",)) == ("d", [])
    assert common_prefix(["Bob", "bobby"]) == "Bob" and common_prefix(["bobby", "bobcat"]) == "bob"


def test_rendering_with_and_without_colour():
    message = Notice("message", user="bob", text="hi")
    assert render(message, color=False, timestamp_format=None) == "[bob] hi"
    assert render(message, color=False, timestamp_format="%Y", when=0).endswith(" [bob] hi")
    coloured = render(message, color=True, timestamp_format=None)
    assert colour_codes(coloured) and coloured.endswith(" hi")
    for kind in FORMATS:
        plain = render(Notice(kind, user="u", text="t", detail="1"), color=False, timestamp_format="%H:%M")
        assert "\x1b" not in plain, kind
    assert render(Notice("help"), color=False, timestamp_format=None).count("\n") >= len(COMMANDS)


def start_chat(alice: Tty, bob: RawUser) -> None:
    """``alice`` (a terminal) asks ``bob`` (frames) for a chat, and he accepts."""
    alice.send(f"/chat {bob.name}\r")
    bob.login.expect(f"REQUEST {alice.user}")
    bob.chat.send("ACCEPT")
    bob.chat.expect(f"OK ACCEPT {alice.user}")
    bob.login.expect(f"STARTED {alice.user}")
    alice.expect(f"chat with {bob.name} started")
    alice.expect(f"{alice.user} → {bob.name}> ")


def test_a_half_typed_line_stays_intact_while_messages_arrive_and_is_sent_whole(server, tty):
    alice = tty(server.port, unique("alice")).login()
    bob = RawUser(server, unique("bob"))
    start_chat(alice, bob)
    alice.send("hello wor")
    alice.expect("hello wor")
    for text in ("first incoming", "second incoming"):
        bob.chat.send(f"MSG {text}")
        alice.expect(f"[{bob.name}] {text}")
        alice.expect(f"{alice.user} → {bob.name}> hello wor")   # drawn again under it, whole
    alice.send("ld\r")
    bob.login.expect(f"MSG {alice.user} hello world")
    alice.expect(f"[{alice.user}] hello world")   # the echo, once sent
    alice.send("\x04")
    assert alice.finish() == 0


def test_tab_completes_commands_and_a_user_who_just_came_online(server, tty):
    alice = tty(server.port, unique("alice")).login()
    bob = RawUser(server, unique("tabbob"))   # online only now: the client must ask the server
    alice.send("/ch\t")
    alice.expect("/chat ")
    alice.send(bob.name[:-1] + "\t")
    alice.expect(bob.name)
    alice.send("\r")
    bob.login.expect(f"REQUEST {alice.user}")
    alice.expect(f"chat request sent to {bob.name}")
    assert "online:" not in alice.out.getvalue()   # the WHO behind Tab is not shown
    alice.send("/quit\r")
    alice.expect(f"you withdrew your chat request to {bob.name}")
    alice.send("/wh\t\r")   # the user's own /who is
    alice.expect("online: ")
    alice.send("/exit\r")
    assert alice.finish() == 0


def test_history_recalls_a_line_and_ctrl_w_deletes_a_word(server, tty):
    alice = tty(server.port, unique("alice")).login()
    bob = RawUser(server, unique("bob"))
    start_chat(alice, bob)
    alice.send("first line\r")
    bob.login.expect(f"MSG {alice.user} first line")
    alice.expect(f"[{alice.user}] first line")
    alice.send("\x1b[A")   # Up
    alice.expect("first line")
    alice.send("\r")
    bob.login.expect(f"MSG {alice.user} first line")
    alice.send("one two\x17three\r")   # Ctrl-W
    bob.login.expect(f"MSG {alice.user} one three")
    alice.send("/exit\r")
    assert alice.finish() == 0


def test_password_is_asked_unechoed_kept_out_of_the_history_and_then_logs_in(server, tty):
    name = unique("alice")
    alice = tty(server.port, name).login()
    alice.send("/password\r")
    for question, answer in (("current password: ", "pw tty"), ("new password: ", "s3cret new"),
                             ("repeat the new password: ", "s3cret new")):
        alice.expect(question)
        alice.send(answer + "\r")
    alice.expect("your password is changed")
    alice.expect(f"{name}> ")
    alice.send("\x1b[A")   # Up: the line before is /password, no password
    alice.expect("/password")
    alice.send("\x15/exit\r")   # Ctrl-U, then /exit
    assert alice.finish() == 0
    assert "s3cret" not in alice.out.getvalue() and "pw tty" not in alice.out.getvalue()
    assert RawUser(server, name, password="s3cret new", register=False).name == name


def test_unregister_asks_unechoed_confirms_the_name_keeps_no_history_then_deletes_for_good(server, tty):
    name = unique("alice")
    alice = tty(server.port, name, "--reconnect").login()
    bob = RawUser(server, unique("bob"))
    start_chat(alice, bob)

    def unregister(confirm: str) -> None:
        alice.send("/unregister\r")
        alice.expect("password (your account will be deleted for good): ")
        alice.send("pw tty")
        alice.expect("******")   # drawn masked before Enter (keys sent with it would be taken unseen)
        alice.send("\r")
        alice.expect("type your user name to confirm: ")
        alice.send(confirm + "\r")

    # A name that is not hers: nothing is sent (the right password would delete the account).
    unregister("nobody-else")
    alice.expect("error: account not deleted")
    alice.expect(f"{name} → {bob.name}> ")
    alice.send("\x1b[A")   # Up: the line before is /unregister, not the name nor the password
    alice.expect("/unregister")
    alice.send("\x15still here\r")   # Ctrl-U; the chat goes on: nothing was sent
    bob.login.expect(f"MSG {alice.user} still here")
    # Ctrl-C at the password prompt: not deleted either.
    alice.send("/unregister\r")
    alice.expect("password (your account will be deleted for good): ")
    alice.send("\x03")
    alice.expect("error: account not deleted")
    alice.expect(f"{name} → {bob.name}> ")
    # Now for good: the name in other case is hers.
    unregister(name.upper())
    alice.expect(f"your account {name} is deleted")
    bob.login.expect(f"ENDED {name} left")
    alice.expect("logged out")
    assert alice.finish() == 0   # with --reconnect on, it does not come back
    screen = alice.out.getvalue()
    assert not re.search(loose("pw tty"), screen), "the password was drawn"
    assert "disconnected:" not in screen and "reconnecting" not in screen
    again = server.connect()
    again.send(f"LOGIN {name} pw tty")
    assert again.line().startswith("ERR LOGIN auth-failed")
    bob.close()


def test_ctrl_c_leaves_the_chat_and_a_second_ctrl_c_exits(server, tty):
    alice = tty(server.port, unique("alice")).login()
    bob = RawUser(server, unique("bob"))
    start_chat(alice, bob)
    alice.send("\x03")
    bob.login.expect(f"ENDED {alice.user} quit")
    alice.expect(f"you left the chat with {bob.name}")
    alice.expect(f"{alice.user}> ")
    alice.send("\x03")
    assert alice.finish() == 0
    bob.close()


def test_reconnects_by_itself_when_the_server_is_killed_and_restarted(make_server, tty, tmp_path):
    first = make_server()
    alice = tty(first.port, unique("alice")).login()
    bob = RawUser(first, unique("bob"))
    start_chat(alice, bob)
    first.proc.kill()
    first.proc.wait()
    alice.expect("connection lost: ")
    # Version 2: the chat is kept for a resume, and what she types waits for it.
    alice.expect(f"the chat with {bob.name} is kept while reconnecting")
    alice.expect(f"{alice.user} [offline, reconnecting")   # the countdown, in the prompt
    alice.send("hello?\r")
    alice.expect("not connected: 'hello?' will be sent once the connection is back")
    # the same port and database: ServerProcess's own --port 0 is overridden by the later one
    second = make_server("--port", str(first.port), db=first.db)
    assert second.port == first.port
    # The new server knows nothing of her session: the line was never sent,
    # the chat is over, and she logs in again with her password.
    alice.expect("not delivered: 'hello?'")
    alice.expect(f"chat with {bob.name} ended: the connection was lost")
    alice.expect(f"reconnected: logged in as {alice.user}; not in a chat (the chat with {bob.name} ended")
    carol = RawUser(second, unique("carol"))
    carol.chat.send(f"CHAT {alice.user}")
    carol.chat.expect(f"OK CHAT {alice.user}")   # the server has her online again
    alice.expect(f"chat request from {carol.name}")
    assert "\a" in alice.out.getvalue()   # the bell rang for it
    alice.send("no\r")
    carol.login.expect(f"DECLINED {alice.user}")
    alice.send("\x04")
    assert alice.finish() == 0


@pytest.mark.parametrize("args, env, coloured", [
    ((), {}, True),
    ((), {"NO_COLOR": "1"}, False),
    (("--no-color",), {}, False),
])
def test_no_color_output_has_no_colour_codes(server, tty, args, env, coloured):
    alice = tty(server.port, unique("alice"), *args, env=env).login()
    bob = RawUser(server, unique("bob"))
    bob.chat.send(f"CHAT {alice.user}")
    alice.expect(f"chat request from {bob.name}")
    alice.send("yes\r")
    alice.expect(f"chat with {bob.name} started")
    bob.chat.send("MSG hi")
    alice.expect(f"[{bob.name}] hi")
    alice.send("/hlep\r")
    alice.expect("did you mean /help?")
    alice.send("/exit\r")
    assert alice.finish() == 0
    codes = colour_codes(alice.out.getvalue())
    assert bool(codes) == coloured, codes[:5]


def test_timestamps_bell_and_their_switches(server, tty):
    alice = tty(server.port, unique("alice"), "--timestamp-format", "<%H:%M:%S>").login()
    assert re.search(r"<\d\d:\d\d:\d\d>" + _BETWEEN + loose(" logged in as"), alice.out.getvalue())
    alice.send("\x04")
    assert alice.finish() == 0
    quiet = tty(server.port, unique("alice"), "--no-timestamps", "--no-bell").login()
    bob = RawUser(server, unique("bob"))
    bob.chat.send(f"CHAT {quiet.user}")
    quiet.expect(f"chat request from {bob.name}")
    quiet.send("\x04")
    assert quiet.finish() == 0
    out = quiet.out.getvalue()
    assert "\a" not in out
    assert not re.search(r"\d\d:\d\d" + _BETWEEN + loose(" logged in as"), out)


def test_without_reconnect_a_lost_connection_exits_3_and_restores_the_terminal(make_server, tty):
    srv = make_server()
    alice = tty(srv.port, unique("alice"), "--no-reconnect").login()
    srv.proc.kill()
    srv.proc.wait()
    alice.expect("connection lost: ")
    assert alice.finish() == 3


def test_sigterm_logs_out_and_restores_the_terminal(server, tty):
    alice = tty(server.port, unique("alice")).login()
    alice.send("half a line")
    alice.expect("half a line")
    os.kill(alice.client_pid(), signal.SIGTERM)
    assert alice.finish() == 0


def test_help_lists_every_command(server, tty):
    alice = tty(server.port, unique("alice")).login()
    alice.send("/help\r")
    for usage in ("/chat NAME", "/accept", "/decline", "/quit", "/who", "/help [COMMAND]", "/exit"):
        alice.expect(usage)
    alice.send("/help quit\r")
    alice.expect("/quit: leave the chat")
    alice.send("/exit\r")
    assert alice.finish() == 0


def test_motd_after_login_and_a_notice_above_a_half_typed_line(tty):
    fake = FakeServer(users={"alice": "pw tty"}, motd=["Welcome to the fake server.", "Be kind."]).start()
    try:
        alice = tty(fake.port, "alice", "--no-timestamps")
        alice.expect("logged in as alice")
        alice.expect("Welcome to the fake server.")
        alice.expect("Be kind.")
        alice.expect("alice> ")
        alice.send("half typ")
        alice.expect("half typ")
        fake.send("LOGIN", "NOTICE the server restarts at 18:00")
        alice.expect("notice: the server restarts at 18:00")
        alice.expect("alice> half typ")   # drawn again under it, intact
        alice.send("\x15\x04")   # Ctrl-U clears the line, Ctrl-D on the empty line exits
        assert alice.finish() == 0
    finally:
        fake.stop()
