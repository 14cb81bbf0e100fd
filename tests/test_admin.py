"""`selchat admin` against a real server over its control socket (docs/operations.md, "Admin commands")."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from tests.support import DEADLINE, REPO_ROOT, Canary, RawUser, ServerProcess, start_chat, unique


def admin(sock_path, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    """The real `selchat admin` CLI, as a process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELCHAT_")}
    return subprocess.run([sys.executable, "-m", "selchat.cli", "admin", "--socket", str(sock_path), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)


def admin_json(sock_path, *args: str) -> dict:
    result = admin(sock_path, "--json", *args)
    assert result.returncode == 0, result
    return json.loads(result.stdout)


class ControlClient:
    """A raw connection to the control socket: JSON lines by hand, like `nc -U`."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict | None:
        line = self.file.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server with an admin socket, shared by the tests that only read or add users."""
    tmp = tmp_path_factory.mktemp("admin")
    path = tmp / "admin.sock"
    srv = ServerProcess(tmp, "--admin-socket", str(path))
    srv.admin_path = path
    yield srv
    srv.stop()


def test_the_socket_is_private_to_the_server_user(served):
    mode = os.lstat(served.admin_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_status_shows_the_live_server(served):
    alice, bob = RawUser(served), RawUser(served)
    start_chat(alice, bob)
    reply = admin_json(served.admin_path, "status")
    assert reply["ok"] is True
    assert reply["pid"] == served.proc.pid
    assert reply["listening"]["chat"] == f"{served.host}:{served.port}"
    assert reply["tls"] is False
    assert reply["online"] >= 2 and reply["chats"] >= 1 and reply["sockets"] >= 6
    assert reply["uptime"] >= 0

    text = admin(served.admin_path, "status")
    assert text.returncode == 0, text
    assert f"pid:          {served.proc.pid}" in text.stdout
    assert f"{served.host}:{served.port} (plaintext)" in text.stdout


def test_who_lists_every_session_with_its_state(served):
    alice, bob, carol = RawUser(served), RawUser(served), RawUser(served)
    start_chat(alice, bob)
    dave = RawUser(served, check=False)  # logged in, check socket not attached yet
    sessions = {s["name"]: s for s in admin_json(served.admin_path, "who")["sessions"]}
    assert sessions[alice.name]["state"] == "busy" and sessions[alice.name]["partner"] == bob.name
    assert sessions[bob.name]["partner"] == alice.name
    assert sessions[carol.name]["state"] == "idle" and sessions[carol.name]["partner"] is None
    assert sessions[dave.name]["state"] == "attaching"
    assert sessions[carol.name]["address"] == "127.0.0.1"

    text = admin(served.admin_path, "who")
    assert text.returncode == 0, text
    rows = {line.split()[0]: line.split() for line in text.stdout.splitlines()[1:]}
    assert rows[alice.name][1:4] == ["busy", bob.name, "127.0.0.1"]
    assert rows[carol.name][1:3] == ["idle", "-"]


def test_kick_ends_the_session_and_tells_the_partner(served):
    alice, bob = RawUser(served), RawUser(served)
    start_chat(alice, bob)
    result = admin(served.admin_path, "kick", bob.name, "--message", "be nice")
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"kicked {bob.name}"
    assert "BYE kicked be nice" in bob.login.expect_closed()
    alice.login.expect(f"ENDED {bob.name} ")
    names = [s["name"] for s in admin_json(served.admin_path, "who")["sessions"]]
    assert bob.name not in names and alice.name in names


def test_kick_takes_the_reason_after_the_name_as_irc_does(served):
    dave = RawUser(served)
    assert admin(served.admin_path, "kick", dave.name, "stop", "spamming").returncode == 0
    assert "BYE kicked stop spamming" in dave.login.expect_closed()


def test_kick_without_a_message_says_an_operator_did_it(served):
    carol = RawUser(served)
    assert admin(served.admin_path, "kick", carol.name).returncode == 0
    assert "BYE kicked kicked by an operator" in carol.login.expect_closed()


def test_kick_of_someone_not_online_exits_1(served):
    name = unique("ghost")
    result = admin(served.admin_path, "kick", name)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {name} is not online"


def test_lock_ends_the_session_and_keeps_the_account_out_until_unlock(served):
    """admin lock: the session ends (BYE kicked with the reason), the right
    password then gets ERR LOGIN locked (a wrong one still auth-failed: the
    lock shows only to whoever knows the password), the name stays taken;
    admin unlock lets it in again."""
    mallory, bob = RawUser(served), RawUser(served)
    start_chat(mallory, bob)
    result = admin(served.admin_path, "lock", mallory.name.upper(), "spam", "again")
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"locked {mallory.name} (session ended)"
    assert "BYE kicked your account is locked: spam again" in mallory.login.expect_closed()
    bob.expect(f"ENDED {mallory.name} kicked ")
    sock = served.connect()
    sock.send(f"LOGIN {mallory.name} wrong", f"LOGIN {mallory.name} pw secret", f"REGISTER {mallory.name} pw")
    assert sock.line() == "ERR LOGIN auth-failed invalid username or password"
    assert sock.line() == "ERR LOGIN locked this account is locked: spam again"
    assert sock.line().startswith("ERR REGISTER taken ")
    result = admin(served.admin_path, "lock", mallory.name)  # again, not online: nothing to end
    assert result.returncode == 0 and result.stdout.strip() == f"locked {mallory.name}"
    assert admin(served.admin_path, "unlock", mallory.name).stdout.strip() == f"unlocked {mallory.name}"
    again = admin(served.admin_path, "unlock", mallory.name)
    assert again.returncode == 1 and again.stderr.strip() == f"error: {mallory.name} is not a locked account"
    nobody = admin(served.admin_path, "lock", unique("ghost"))
    assert nobody.returncode == 1 and "there is no account" in nobody.stderr
    assert RawUser(served, mallory.name, register=False).name == mallory.name


def test_a_login_under_way_when_its_account_is_locked_is_refused(make_server, tmp_path):
    """The password of a LOGIN is being checked (real scrypt, tens of ms)
    when the operator locks the account: the check read the account before
    the lock, but the login is refused all the same, or, if it got in
    first, its session is ended by the lock."""
    path = tmp_path / "admin.sock"
    srv = make_server("--scrypt-n", "16384", "--admin-socket", str(path))
    mallory = RawUser(srv, password="pw")
    mallory.close()
    operator = ControlClient(path)  # connected first: the lock follows the LOGIN within a millisecond
    sock = srv.connect()
    sock.send(f"LOGIN {mallory.name} pw")
    operator.send(json.dumps({"cmd": "lock", "user": mallory.name, "text": "spam"}).encode() + b"\n")
    assert operator.reply()["ok"]
    first = sock.line()
    if first.startswith("WELCOME "):
        assert "BYE kicked your account is locked: spam" in sock.expect_closed()
    else:
        assert first.startswith("ERR LOGIN locked "), first


def test_broadcast_reaches_every_online_user(served):
    users = [RawUser(served) for _ in range(3)]
    start_chat(users[0], users[1])
    online = admin_json(served.admin_path, "status")["online"]
    result = admin(served.admin_path, "broadcast", "restart", "at", "5", "pm")  # words need no quotes
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"told {online} users"
    for user in users:
        user.login.expect("NOTICE restart at 5 pm")


def test_broadcast_of_control_characters_is_refused(served):
    result = admin(served.admin_path, "broadcast", "bad\x1b[2Jtext")
    assert result.returncode == 1
    assert "control characters" in result.stderr


def test_garbage_gets_errors_and_the_chat_goes_on(served):
    canary = Canary(served)
    client = ControlClient(served.admin_path)
    for request in (b"not json\n", b"[1, 2]\n", b'{"cmd": 7}\n', b'{"cmd": "selfdestruct"}\n',
                    b'{"cmd": "kick"}\n', b"\xff\xfe\xfd\n", b"[" * 10000 + b"\n"):
        client.send(request)
        reply = client.reply()
        assert reply["ok"] is False and reply["error"], (request[:20], reply)
        canary.check()
    client.send(b'{"cmd": "who"}\n')  # the connection is still usable
    assert client.reply()["ok"] is True
    client.send(b"x" * 100_000)  # a line with no end: an error, then the server hangs up
    reply = client.reply()
    assert reply["ok"] is False and "longer than" in reply["error"]
    assert client.reply() is None
    client.close()
    canary.check()


def test_several_admin_clients_at_once(served):
    clients = [ControlClient(served.admin_path) for _ in range(5)]
    for c in clients:  # all connected, none answered yet
        c.send(b'{"cmd": "status"}\n{"cmd": "who"}\n')
    for c in reversed(clients):
        assert c.reply()["pid"] == served.proc.pid
        assert "sessions" in c.reply()
        c.close()


def test_no_server_exits_2_with_a_message(tmp_path):
    path = tmp_path / "nobody.sock"
    result = admin(path, "status")
    assert result.returncode == 2
    assert f"no selchat server at {path}" in result.stderr


def test_a_stale_socket_is_replaced_and_removed_at_shutdown(tmp_path):
    path = tmp_path / "admin.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file that nobody listens on, as a killed server leaves
    stale.close()
    srv = ServerProcess(tmp_path, "--admin-socket", str(path))
    try:
        assert admin_json(path, "status")["pid"] == srv.proc.pid
    finally:
        assert srv.stop() == 0
    assert not path.exists()


def test_a_second_server_on_a_live_socket_refuses_to_start(tmp_path):
    path = tmp_path / "admin.sock"
    first = ServerProcess(tmp_path, "--admin-socket", str(path))
    try:
        second = subprocess.run(
            [sys.executable, "-m", "selchat.cli", "serve", "--port", "0", "--db", str(tmp_path / "second.db"),
             "--admin-socket", str(path)], capture_output=True, text=True, timeout=DEADLINE, cwd=REPO_ROOT)
        assert second.returncode != 0
        assert "another server is answering there" in second.stderr
        assert admin_json(path, "status")["pid"] == first.proc.pid  # the first one is untouched
    finally:
        first.stop()


def test_reload_reports_the_result(tmp_path):
    config = tmp_path / "selchat.toml"
    config.write_text('motd_file = "motd.txt"\n')
    (tmp_path / "motd.txt").write_text("welcome\n")
    path = tmp_path / "admin.sock"
    srv = ServerProcess(tmp_path, "--config", str(config), "--admin-socket", str(path))
    try:
        result = admin(path, "reload")
        assert result.returncode == 0, result
        assert result.stdout.startswith("reloaded: ") and result.stdout.count("reloaded") == 1
        config.write_text("this is = not [toml\n")
        result = admin(path, "reload")
        assert result.returncode == 1, result
        assert result.stderr.startswith("reload failed, keeping the old settings: ")
        assert "selchat.toml" in result.stderr and result.stderr.count("reload failed") == 1
        assert admin_json(path, "status")["pid"] == srv.proc.pid
    finally:
        srv.stop()
