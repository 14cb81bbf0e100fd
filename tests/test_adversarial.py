"""Abuse and faults, each with a canary pair chatting through it.

Every test here starts a real server, puts two users in a chat (the canary),
does something hostile or breaks something, and checks that the canary's
messages still arrive, in order, none lost. Heavier variants are marked slow
(``make test-slow``); the sizes here keep ``make test`` quick.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.support import DEADLINE, Canary, LineSocket, RawUser, ServerProcess, rss_kib, start_chat, unique


@pytest.fixture
def canary_server(make_server):
    """make_server, plus a canary on the server it returns."""

    def start(*args, **kwargs):
        srv = make_server(*args, **kwargs)
        canary = Canary(srv)
        canary.check()
        return srv, canary

    return start


# --- input ------------------------------------------------------------------------


def test_long_unterminated_line(canary_server):
    srv, canary = canary_server()
    mallory = RawUser(srv)
    try:
        mallory.chat.send_bytes(b"A" * (80 * 1024))
    except OSError:
        pass
    assert mallory.chat.expect_closed() == ["BYE too-long no line ending within 65536 bytes"]
    canary.check()


def test_over_long_line_is_refused_whole_and_not_relayed(canary_server):
    srv, canary = canary_server()
    text = "z" * 5000
    canary.alice.chat.send(f"MSG {text}", "MSG after")
    seq = canary.sent + 1  # the canary's messages count too
    assert canary.alice.chat.line() == f"NACK {seq} too-long frame longer than 4096 bytes"
    assert canary.bob.login.line() == f"MSG {canary.alice.name} after"  # nothing of the long one
    canary.check()


def test_byte_by_byte_with_a_split_multibyte_character(canary_server):
    srv, canary = canary_server()
    frame = "MSG naïve café ☕ 𝄞\n".encode()
    for i in range(len(frame)):
        canary.alice.chat.send_bytes(frame[i:i + 1])
    assert canary.bob.login.line() == f"MSG {canary.alice.name} naïve café ☕ 𝄞"
    canary.check()


def test_fifty_pipelined_commands_in_one_send(canary_server):
    srv, canary = canary_server("--cmd-rate", "0")
    user = RawUser(srv)
    user.chat.send(*(["HELP", "QUIT"] * 25))
    for _ in range(25):
        assert user.chat.line().startswith("OK HELP ")
        assert user.chat.line() == "ERR QUIT not-in-chat you are not in a chat"
    canary.check()


def test_command_flood_is_slowed_not_dropped(canary_server):
    srv, canary = canary_server()  # default: a burst of 5, then 2 per second
    user = RawUser(srv)
    started = time.monotonic()
    user.chat.send(*["QUIT"] * 11)
    for _ in range(11):
        assert user.chat.line() == "ERR QUIT not-in-chat you are not in a chat"
    # 5 at once, the other 6 at 2/s: at least ~3 s, whatever the machine
    assert time.monotonic() - started >= 2.5
    canary.check()


def test_message_flood_is_slowed_and_delivered_in_order(canary_server):
    srv, canary = canary_server("--msg-rate", "100")  # burst 100, then 100/s
    alice, bob = canary.alice, canary.bob
    started = time.monotonic()
    alice.chat.send(*[f"MSG flood {i}" for i in range(300)])
    for i in range(300):
        assert bob.login.line() == f"MSG {alice.name} flood {i}"
    assert time.monotonic() - started >= 1.5  # 200 over the burst at 100/s
    canary.check()


def test_random_bytes_before_login(canary_server):
    srv, canary = canary_server()
    junk = srv.connect()
    try:
        junk.send_bytes(random.Random(7).randbytes(1 << 20))
    except OSError:
        pass  # the server may close before all of it is sent
    seen = junk.expect_closed()
    assert seen and seen[-1].startswith("BYE "), seen
    canary.check()


def test_http_request_gets_an_error(canary_server):
    srv, canary = canary_server()
    http = srv.connect()
    http.send_bytes(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert http.line() == "ERR GET unknown-command unknown command GET; send HELP for the list"
    assert http.line() == "ERR - unknown-command unknown command; send HELP for the list"
    canary.check()


def test_bad_utf8_and_control_characters_reach_nobody(canary_server):
    srv, canary = canary_server()
    canary.alice.chat.send_bytes(b"MSG \xff\xfe\n" + b"MSG \x00nul\n" + b"MSG cr\rinside\n"
                                 + "MSG c1\u009b31m\n".encode())
    for seq in range(canary.sent + 1, canary.sent + 5):
        assert canary.alice.chat.line().startswith(f"NACK {seq} bad-encoding ")
    canary.check()


# --- slow consumers -----------------------------------------------------------------


def test_slow_consumer_is_dropped_and_sender_told(canary_server):
    srv, canary = canary_server("--msg-rate", "0", "--stuck-timeout", "1")
    sender, stuck = RawUser(srv), RawUser(srv)
    start_chat(sender, stuck)
    rss_before = rss_kib(srv.proc.pid)
    data = b"".join(f"MSG {i} {'q' * 1000}\n".encode() for i in range(10_000))  # 10 MB
    pump = threading.Thread(target=lambda: _send_quietly(sender.chat.sock, data), daemon=True)
    pump.start()
    # stuck never reads; within the stuck timeout the server drops it and tells the sender
    assert sender.login.line() == f"ENDED {stuck.name} dropped {stuck.name} stopped reading"
    assert rss_kib(srv.proc.pid) - rss_before < 8 * 1024
    canary.check()


def _send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


# --- connections ----------------------------------------------------------------------


def test_connect_flood_is_refused_per_address(canary_server):
    srv, canary = canary_server("--max-per-address", "20", "--conn-rate", "0")
    socks, refused = [], 0
    for _ in range(40):
        sock = socket.create_connection((srv.host, srv.port), timeout=DEADLINE)
        socks.append(sock)
    for sock in socks:
        if LineSocket.wrap(sock).line().startswith("BYE too-many-connections"):
            refused += 1
    # the canary holds 6 sockets: 14 more fit, the other 26 are refused
    assert refused == 26
    for sock in socks:
        sock.close()
    canary.check()
    RawUser(srv)  # once they are gone, new users get in again


def test_connect_rate_per_address(canary_server):
    srv, canary = canary_server("--conn-rate", "1")  # burst 30, then 1/s
    lines = []
    for _ in range(40):
        sock = LineSocket(srv.host, srv.port, hello=False)
        lines.append(sock.line())
        sock.close()
    assert sum(line.startswith("HELLO") for line in lines) <= 31
    assert any(line.startswith("BYE too-fast ") for line in lines)
    canary.check()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to lower the hard descriptor limit")
def test_descriptor_exhaustion_pauses_accepting_and_recovers(tmp_path):
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    srv = ServerProcess(tmp_path, "--max-connections", "1000", "--max-per-address", "0",
                        "--conn-rate", "0", preexec_fn=low_limit)
    try:
        canary = Canary(srv)
        hogs = []
        for _ in range(60):  # more than the server has descriptors for
            hogs.append(socket.create_connection((srv.host, srv.port), timeout=DEADLINE))
        canary.check()
        srv.wait_for_log("not accepting for")  # EMFILE met, listener paused (not spinning)
        for sock in hogs:
            sock.close()
        late = RawUser(srv)  # accepted again once descriptors are free
        assert late.name
        canary.check()
    finally:
        srv.stop()


# --- passwords ------------------------------------------------------------------------


def _first_reply(srv, line: str, source: str | None = None) -> str | None:
    """The answer to ``line`` on a fresh socket (from ``source``), which is then closed."""
    sock = LineSocket(srv.host, srv.port, source=source)
    try:
        sock.send(line)
        return sock.line()
    finally:
        sock.close()


def _login_reply(srv, name: str, password: str, source: str | None = None) -> str | None:
    return _first_reply(srv, f"LOGIN {name} {password}", source)


def test_password_guessing_is_throttled_at_once_and_only_from_that_address(canary_server):
    srv, canary = canary_server()
    victim = RawUser(srv, password="the right one")
    replies = [_login_reply(srv, victim.name, f"guess{i}") for i in range(3)]
    assert replies == ["ERR LOGIN auth-failed invalid username or password"] * 3
    # The fourth guess is not checked: it is answered at once, with the wait.
    reply = _login_reply(srv, victim.name, "guess3")
    assert reply.startswith("ERR LOGIN throttled "), reply
    seconds = int(reply.split()[3])
    assert 1 <= seconds <= 60, reply
    # Even the right password waits its turn from that address ...
    assert _login_reply(srv, victim.name, "the right one").startswith("ERR LOGIN throttled ")
    # ... but the owner, from another address, is not slowed at all.
    assert _login_reply(srv, victim.name, "the right one", source="127.0.0.2").startswith("WELCOME ")
    # Once the wait is over, the right password works from the first address too.
    deadline = time.monotonic() + seconds + DEADLINE
    while (reply := _login_reply(srv, victim.name, "the right one")).startswith("ERR LOGIN throttled "):
        assert time.monotonic() < deadline, "still throttled long after the wait it announced"
        time.sleep(0.2)  # polling interval; the loop's exit is the condition
    assert reply.startswith("WELCOME "), reply
    canary.check()


def _register_reply(srv, name: str, source: str | None = None) -> str | None:
    return _first_reply(srv, f"REGISTER {name} pw", source)


def test_account_creation_is_limited_per_address(make_server):
    """An address creates 10 accounts at once, then 1 per hour (here): the
    11th REGISTER is answered at once with the wait, nothing is made. A
    REGISTER that made no account (the name was taken) is not charged;
    another address and logins are not slowed."""
    srv = make_server("--registrations-per-hour", "1")
    names = [unique("r") for _ in range(10)]
    for i, name in enumerate(names):
        assert _register_reply(srv, name).startswith("WELCOME "), i
        if i == 0:
            assert _register_reply(srv, name.upper()).startswith("ERR REGISTER taken ")
    spam = unique("spam")
    reply = _register_reply(srv, spam)
    assert reply.startswith("ERR REGISTER throttled "), reply
    assert 3000 <= int(reply.split()[3]) <= 3600, reply   # "<seconds> too many accounts ..."
    assert _login_reply(srv, spam, "pw") == "ERR LOGIN auth-failed invalid username or password"  # not made
    assert _login_reply(srv, names[0], "pw").startswith("WELCOME ")
    assert _register_reply(srv, spam, source="127.0.0.2").startswith("WELCOME ")


def test_parallel_guesses_are_throttled_too(make_server):
    srv = make_server()
    victim = RawUser(srv)
    socks = [LineSocket(srv.host, srv.port) for _ in range(6)]
    for i, sock in enumerate(socks):  # all six in flight before any answer
        sock.send(f"LOGIN {victim.name} guess{i}")
    replies = [sock.line() for sock in socks]
    failed = [r for r in replies if r.startswith("ERR LOGIN auth-failed")]
    throttled = [r for r in replies if r.startswith("ERR LOGIN throttled")]
    assert len(failed) == 3 and len(throttled) == 3, replies


def test_guessing_from_20_addresses_never_locks_the_owner_out(make_server):
    """Twenty attacking addresses guess as fast as they can, at the real
    scrypt cost; the owner, from a fresh address, still gets in within 2 s,
    and every throttled guess is answered, none held to the login deadline."""
    srv = make_server("--scrypt-n", "16384")
    owner = RawUser(srv, password="owner's password")
    owner.close()
    stop = threading.Event()
    answers: list[str] = []
    lock = threading.Lock()

    def attack(source: str) -> None:
        n = 0
        while not stop.is_set():
            try:
                sock = LineSocket(srv.host, srv.port, source=source, hello=False)
            except OSError:
                continue
            try:
                sock.line()  # HELLO, or BYE too-fast
                for _ in range(3):
                    n += 1
                    target = owner.name if n % 2 else unique("nobody")
                    sock.send(f"LOGIN {target} guess{n}")
                got = [sock.line(timeout=DEADLINE) for _ in range(3)]
            except OSError:
                got = []
            finally:
                sock.close()
            with lock:
                answers.extend(g for g in got if g is not None)

    attackers = [threading.Thread(target=attack, args=(f"127.0.0.{i}",), daemon=True) for i in range(2, 22)]
    for t in attackers:
        t.start()
    try:
        deadline = time.monotonic() + DEADLINE
        while sum(a.startswith("ERR LOGIN throttled") for a in list(answers)) < 20:
            assert time.monotonic() < deadline, answers[-5:]
            time.sleep(0.05)  # polling interval
        waits = []
        for i in range(3):
            sock = LineSocket(srv.host, srv.port, source=f"127.0.0.{50 + i}")
            started = time.monotonic()
            sock.send(f"LOGIN {owner.name} owner's password")
            reply = sock.line()
            waits.append(time.monotonic() - started)
            sock.close()
            assert reply.startswith("WELCOME "), reply
        assert max(waits) < 2.0, waits
    finally:
        stop.set()
        for t in attackers:
            t.join(DEADLINE)
    assert not any(a.startswith("BYE timeout") for a in answers)
    assert {a.split()[2] for a in answers if a.startswith("ERR LOGIN")} <= {"auth-failed", "throttled", "busy"}


def test_an_overlong_password_is_refused_without_hashing(make_server):
    srv = make_server()
    victim = RawUser(srv)
    sock = LineSocket(srv.host, srv.port)
    sock.send(f"LOGIN {victim.name} {'p' * 1025}")
    # auth-failed would mean it was hashed and compared; bad-password means it was not.
    assert sock.line() == "ERR LOGIN bad-password password must be at most 1024 bytes of UTF-8"
    sock.send(f"LOGIN {victim.name} {'é' * 513}")  # 1026 bytes, 513 characters
    assert sock.line() == "ERR LOGIN bad-password password must be at most 1024 bytes of UTF-8"
    # Both count as failed attempts on the socket: the third closes it.
    sock.send(f"LOGIN {victim.name} {'p' * 2000}")
    assert sock.line().startswith("ERR LOGIN bad-password")
    assert sock.expect_closed() == ["BYE auth-failed too many failed logins"]


def test_long_passwords_in_parallel_do_not_stall_the_loop(make_server):
    """Dozens of registrations and logins with 1024-byte passwords and the real
    scrypt cost, while a canary chats: hashing runs off the loop, so the
    canary keeps answering promptly."""
    srv = make_server("--scrypt-n", "16384", "--max-per-address", "0", "--conn-rate", "0")
    canary = Canary(srv)
    password = "p" * 1024
    names = [unique("long") for _ in range(32)]

    def attempt(verb, name):
        # From four addresses: one address may have only 8 checks waiting.
        sock = LineSocket(srv.host, srv.port, source=f"127.0.0.{2 + names.index(name) % 4}")
        sock.send(f"{verb} {name} {password}")
        reply = sock.line(timeout=60)
        sock.close()
        return reply

    lags = []
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for verb in ("REGISTER", "LOGIN"):
            futures = [pool.submit(attempt, verb, name) for name in names]
            while not all(f.done() for f in futures):
                started = time.monotonic()
                canary.check(1)
                lags.append(time.monotonic() - started)
            replies = [f.result() for f in futures]
            assert all(r.startswith("WELCOME ") for r in replies), replies
    # 64 scrypt hashes take seconds of CPU; on the loop they would stall the
    # canary for all of that. Off the loop, its typical round trip stays short.
    assert len(lags) >= 5 and sorted(lags)[len(lags) // 2] < 0.25, lags


# --- requests ----------------------------------------------------------------------------


def test_chat_request_spam_is_rate_limited(canary_server):
    srv, canary = canary_server()
    spammer, victim = RawUser(srv), RawUser(srv)
    for _ in range(3):
        spammer.chat.send(f"CHAT {victim.name}", "QUIT")
        assert spammer.chat.line() == f"OK CHAT {victim.name}"
        assert spammer.chat.line() == f"OK QUIT {victim.name}"
    spammer.chat.send(f"CHAT {victim.name}")
    assert spammer.chat.line().startswith("ERR CHAT rate-limited too many chat requests; try again in ")
    for _ in range(3):
        assert victim.login.line() == f"REQUEST {spammer.name}"
        assert victim.login.line() == f"CANCELLED {spammer.name}"
    canary.check()


# --- shutdown and restart --------------------------------------------------------------------


def test_sigterm_with_many_sessions(make_server):
    srv = make_server("--max-per-address", "0", "--conn-rate", "0")
    users = [RawUser(srv) for _ in range(40)]
    for a, b in zip(users[::2], users[1::2]):
        start_chat(a, b)
    assert srv.stop(signal.SIGTERM, timeout=DEADLINE) == 0
    for user in users:
        seen = user.login.expect_closed()
        assert seen[0] == "SHUTDOWN the server is shutting down", seen
        assert seen[-1] == "BYE shutdown the server is shutting down", seen


def test_sigkill_and_immediate_restart_rebinds_and_keeps_accounts(tmp_path):
    srv = ServerProcess(tmp_path)
    names = [RawUser(srv).name for _ in range(5)]
    port = srv.port
    srv.proc.kill()
    srv.proc.wait()
    again = ServerProcess(tmp_path, "--port", str(port), db=srv.db)
    try:
        assert again.port == port
        for name in names:
            assert RawUser(again, name, register=False).name == name
    finally:
        again.stop()


# --- storage faults ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs the test can fill up or make read-only (root only)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small filesystem")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path):
    """Write zeros to ``path`` until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_disk_full_refuses_registration_and_keeps_everything_else(make_server, small_disk, tmp_path):
    srv = make_server(db=str(small_disk / "a.db"))
    canary = Canary(srv)
    filler = small_disk / "filler"
    _fill(filler)
    sock = srv.connect()
    sock.send(f"REGISTER {unique('late')} pw")
    reply = sock.line()
    assert reply.startswith("ERR REGISTER storage "), reply
    canary.check()
    again = RawUser(srv, canary.alice.name, password="pw secret", register=False)  # logins still work
    assert again.name == canary.alice.name
    filler.unlink()
    sock.send(f"REGISTER {unique('later')} pw")
    assert sock.line().startswith("WELCOME ")  # recovered once there is room


def _immutable(paths, on: bool) -> None:
    flag = "+i" if on else "-i"
    for path in paths:
        if subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode != 0:
            pytest.skip("needs chattr on a filesystem that supports the immutable flag")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chattr"), reason="needs root and chattr")
def test_read_only_database_refuses_registration_and_recovers(make_server, tmp_path):
    db = tmp_path / "ro.db"
    srv = make_server(db=str(db))
    canary = Canary(srv)
    name = canary.alice.name
    files = [db, db.with_name(db.name + "-wal")]
    _immutable(files, True)  # not even root may write them now
    try:
        sock = srv.connect()
        sock.send(f"REGISTER {unique('ro')} pw")
        reply = sock.line()
        assert reply.startswith("ERR REGISTER storage "), reply
        canary.check()
        assert RawUser(srv, name, password="pw secret", register=False).name == name
    finally:
        _immutable(files, False)
    sock.send(f"REGISTER {unique('rw')} pw")
    assert sock.line().startswith("WELCOME ")
