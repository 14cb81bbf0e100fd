"""A real IRC client against the IRC front end: irssi, driven in tmux.

irssi runs in a detached tmux session of its own (its own tmux server, on a
socket in the test's directory); keys go in with ``tmux send-keys`` and the
screen comes back with ``tmux capture-pane``. Every wait is for something to
appear on the screen or on a socket, with a deadline. The Debian packages
irssi and tmux are installed by ``.ci/run``; without them the test skips.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from tests.ircsupport import IrcServer, make_account
from tests.support import DEADLINE, RawUser, unique

pytestmark = pytest.mark.skipif(
    shutil.which("irssi") is None or shutil.which("tmux") is None,
    reason="needs irssi and tmux (Debian: apt-get install irssi tmux; .ci/run installs them)",
)


class Tmux:
    """One program in a detached tmux session on a private tmux server."""

    def __init__(self, socket_path, command: list[str], width: int = 200, height: int = 50):
        self.socket = str(socket_path)
        self.tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), *command)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True, capture_output=True,
                              text=True, timeout=DEADLINE).stdout

    def type(self, text: str) -> None:
        """Type a line and press Enter."""
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def screen(self) -> str:
        """The active window, with its scrollback."""
        return self.tmux("capture-pane", "-p", "-J", "-t", "t", "-S", "-200")

    def wait_for(self, pattern: str, timeout: float = DEADLINE) -> str:
        """The screen once ``pattern`` (a regex) is on it."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, screen := self.screen()):
            assert time.monotonic() < deadline, f"{pattern!r} not on the screen within {timeout} s:\n{screen}"
            time.sleep(0.05)  # polling interval; the condition ends the wait
        return screen

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=DEADLINE)


@pytest.fixture
def irc_server(tmp_path):
    motd = tmp_path / "motd.txt"
    motd.write_text("hello irssi\n")
    server = IrcServer(tmp_path, "--conn-rate", "0", "--motd-file", str(motd))
    yield server
    server.stop()


@pytest.fixture
def irssi(tmp_path, irc_server):
    started = []

    def start(nick: str, password: str) -> Tmux:
        home = tmp_path / "irssi-home"
        home.mkdir()
        # cmd_queue_speed 0: irssi's own flood control would hold each command
        # past the fifth for 2.2 s (the server's limits apply all the same).
        (home / "config").write_text('settings = { core = { real_name = "test"; user_name = "test"; }; '
                                     '"irc/core" = { cmd_queue_speed = "0"; }; };\n')
        command = ["irssi", f"--home={home}", "-c", irc_server.host, "-p", str(irc_server.irc_port),
                   "-n", nick, "-w", password]
        term = Tmux(tmp_path / "tmux.sock", command)
        started.append(term)
        return term

    yield start
    for term in started:
        term.kill()


def test_irssi_logs_in_answers_a_request_and_chats_with_a_selchat_user(irc_server, irssi):
    nick = make_account(irc_server, unique("irssi"), password="sesame")  # irssi's -w takes no spaces
    term = irssi(nick, "sesame")
    term.wait_for(rf"Welcome to selchat, {nick}!{nick}@selchat")
    term.wait_for(r"- hello irssi")  # the MOTD
    term.wait_for(r"logged in as " + nick)

    alice = RawUser(irc_server)
    alice.login.expect("MOTD hello irssi")
    alice.chat.send(f"CHAT {nick}")
    alice.chat.expect(f"OK CHAT {nick}")
    term.wait_for(rf"{alice.name} wants to chat: /msg selchat yes")
    term.type("/msg selchat yes")
    alice.login.expect(f"STARTED {nick}")

    alice.chat.send("MSG hello from selchat, ünïcode too")
    term.type(f"/query {alice.name}")  # its query window, opened by the message
    term.wait_for(rf"<{alice.name}> hello from selchat, ünïcode too")
    term.type("hi from irssi")  # typed in the query window: a PRIVMSG to alice
    assert alice.login.line() == f"MSG {nick} hi from irssi"
    term.wait_for(r"<[ @]?" + nick + r"> hi from irssi")

    term.type(f"/whois {alice.name}")
    term.wait_for(r"busy: in a chat")
    term.type("/quit bye")
    alice.login.expect(f"ENDED {nick} left {nick} logged out")
