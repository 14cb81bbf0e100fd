"""What an operator sees and does: the log's events, SIGHUP reloads, the MOTD.

Each test runs a real ``selchat serve`` and reads its log (stderr) the way
an operator or fail2ban would.
"""

from __future__ import annotations

import signal
import socket
import ssl

import trustme

from selchat.store.accounts import AccountStore
from tests.support import DEADLINE, Canary, LineSocket, RawUser, ServerProcess, unique


# --- the log -----------------------------------------------------------------------


def test_each_event_is_logged_with_its_name_user_address_and_real_reason(make_server):
    srv = make_server("--attach-timeout", "0.5")
    name = unique("ann")

    sock = srv.connect()
    sock.send(f"REGISTER {name} pw")
    assert sock.expect("WELCOME ")
    srv.wait_for_log(f"register user={name} addr=127.0.0.1 session=")
    # Never attached: the session ends for that reason, not as "dropped".
    assert sock.expect_closed() == ["BYE attach-timeout chat and check sockets not attached in time"]
    srv.wait_for_log(f"session-end user={name} addr=127.0.0.1 session=1 reason=attach-timeout")

    first = RawUser(srv, name, password="pw", register=False)
    srv.wait_for_log(f"login user={name} addr=127.0.0.1 session=2")
    RawUser(srv, name, password="pw", register=False)   # logs in again elsewhere
    assert first.login.expect_closed()[-1] == "BYE replaced logged in from another client"
    srv.wait_for_log(f"session-end user={name} addr=127.0.0.1 session=2 reason=replaced")

    for i in range(4):
        guess = srv.connect()
        guess.send(f"LOGIN {name} wrong{i}")
        guess.line()
        guess.close()
    srv.wait_for_log(f"login-failed user={name} addr=127.0.0.1 reason=auth-failed")
    log = srv.wait_for_log(f"throttled user={name} addr=127.0.0.1 wait=1")
    assert log.count(f"login-failed user={name} ") == 3

    third = RawUser(srv, password="pw")
    third.chat.send("EXIT")
    third.login.expect_closed()
    log = srv.wait_for_log(f"session-end user={third.name} addr=127.0.0.1 session=4 reason=exit")
    assert "logged in" not in log  # the old wording, which called a registration a login


def test_refusals_are_logged_with_the_address_and_reason(make_server):
    srv = make_server("--max-per-address", "2")
    kept = [srv.connect(), srv.connect()]
    extra = LineSocket(srv.host, srv.port, hello=False)
    assert extra.expect_closed() == ["BYE too-many-connections at most 2 connections from one address"]
    srv.wait_for_log("refused addr=127.0.0.1 reason=too-many-connections")
    for sock in kept:
        sock.close()


def test_storage_errors_are_logged_and_answered(tmp_path):
    path = tmp_path / "accounts.db"
    with AccountStore(str(path), scrypt_n=16) as store:
        store.add_user("olga", "pw")
    srv = ServerProcess(tmp_path, db=f"file:{path}?mode=ro")  # reads work, writes fail
    try:
        assert RawUser(srv, "olga", password="pw", register=False).name == "olga"
        sock = srv.connect()
        sock.send("REGISTER newbie pw")
        reply = sock.line()
        assert reply.startswith("ERR REGISTER storage account storage unavailable (write)"), reply
        srv.wait_for_log("storage-error user=newbie addr=127.0.0.1 error=")
        sock.send("LOGIN olga pw")  # a storage error is not a failed guess
        assert sock.line().startswith("WELCOME olga ")
    finally:
        srv.stop()


# --- SIGHUP ------------------------------------------------------------------------


def test_sighup_reloads_the_motd_and_leaves_sessions_alone(make_server, tmp_path):
    motd = tmp_path / "motd.txt"
    motd.write_text("")  # no message of the day yet
    srv = make_server("--motd-file", str(motd))
    canary = Canary(srv)

    motd.write_text("welcome to the test server\n\nbe nice\n")
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_for_log("reloaded")
    canary.check()                        # the chat goes on, nothing lost
    user = RawUser(srv)                   # MOTD lines follow READY
    assert [user.login.line() for _ in range(3)] == ["MOTD welcome to the test server", "MOTD", "MOTD be nice"]
    user.chat.send("WHO")                 # and nothing else was queued before the answer
    assert user.chat.line().startswith("USER ")
    assert srv.proc.poll() is None


def test_a_bad_config_file_on_sighup_keeps_the_old_settings(make_server, tmp_path):
    config = tmp_path / "selchat.toml"
    config.write_text("max_per_address = 60\n")
    srv = make_server("--config", str(config))
    canary = Canary(srv)

    config.write_text("max_per_adress = 2\n")   # a typo
    srv.proc.send_signal(signal.SIGHUP)
    log = srv.wait_for_log("reload failed, keeping the old settings")
    assert "max_per_adress" in log and "selchat.toml" in log
    canary.check()
    socks = [srv.connect() for _ in range(3)]   # the old limit (60) still holds
    for sock in socks:
        sock.close()

    config.write_text("max_per_address = 9\nworkers = 3\n")
    srv.proc.send_signal(signal.SIGHUP)
    log = srv.wait_for_log("reloaded: ")
    srv.wait_for_log("needs a restart to change: workers")
    assert "max_per_address" in log.split("reloaded: ")[-1]
    canary.check()
    # The new limit applies to new sockets: the first refusal quotes it.
    socks, refusal = [], None
    while refusal is None and len(socks) < 20:
        sock = LineSocket(srv.host, srv.port, hello=False)
        first = sock.line()
        if first.startswith("BYE "):
            refusal = first
        socks.append(sock)
    assert refusal == "BYE too-many-connections at most 9 connections from one address"
    for sock in socks:
        sock.close()


def _write_cert(ca: trustme.CA, chain, key) -> bytes:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(key))
    with open(chain, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def test_sighup_loads_a_renewed_certificate_for_new_handshakes(make_server, tmp_path):
    ca = trustme.CA()
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    first = _write_cert(ca, chain, key)
    srv = make_server("--tls-cert", str(chain), "--tls-key", str(key))
    srv.client_tls = ssl.create_default_context()
    ca.configure_trust(srv.client_tls)
    canary = Canary(srv)
    assert canary.alice.login.sock.getpeercert(binary_form=True) == first

    renewed = _write_cert(ca, chain, key)
    assert renewed != first
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_for_log("reloaded")
    fresh = srv.connect()
    assert fresh.sock.getpeercert(binary_form=True) == renewed
    canary.check()  # sessions on the old certificate carry on


def test_systemd_hears_ready_reloading_and_stopping(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(DEADLINE)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    srv = ServerProcess(tmp_path)
    try:
        def states() -> set[str]:
            return set(listener.recv(4096).decode().split("\n"))

        assert "READY=1" in states()
        srv.proc.send_signal(signal.SIGHUP)
        assert "RELOADING=1" in states()
        assert "READY=1" in states()
        assert srv.stop() == 0
        assert "STOPPING=1" in states()
    finally:
        srv.stop()
        listener.close()


def test_sighup_storm_leaves_the_server_up(make_server):
    srv = make_server()
    canary = Canary(srv)
    for _ in range(3):
        srv.proc.send_signal(signal.SIGHUP)
    srv.wait_for_log("reloaded")
    canary.check()
    assert RawUser(srv).name
