"""``selchat connect --tls [--ca PATH]``: real client processes against real
TLS (and plaintext) servers, the options in process, and the client's TLS
transport under full socket buffers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading

import pytest
import trustme
from click.testing import CliRunner

from selchat.client import app, command
from selchat.client import tls as clienttls
from selchat.client.core import CHAT
from tests.support import DEADLINE, RawUser, ServerProcess, start_chat, unique

CERT_VERIFY = "TLS: certificate verify failed: "


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_pem(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def cert_files(ca, directory, *names):
    """A server certificate for ``names``: (chain.pem, key.pem) in ``directory``."""
    cert = ca.issue_cert(*names)
    chain, key = directory / "chain.pem", directory / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    with open(chain, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return str(chain), str(key)


@pytest.fixture(scope="module")
def tls_server(ca, tmp_path_factory):
    """One TLS server for the module, its certificate for localhost and 127.0.0.1."""
    directory = tmp_path_factory.mktemp("tls-server")
    chain, key = cert_files(ca, directory, "localhost", "127.0.0.1")
    srv = ServerProcess(directory, "--tls-cert", chain, "--tls-key", key)
    srv.client_tls = ssl.create_default_context()
    ca.configure_trust(srv.client_tls)
    yield srv
    srv.stop()


def expect_start(client, prefix: str) -> str:
    """Read stdout lines until one starts with ``prefix``."""
    while True:
        line = client.line()
        assert line is not None, f"stdout ended without {prefix!r}; seen: {client.seen}"
        if line.startswith(prefix):
            return line


def unreachable(client) -> str:
    """The client's one complaint on stderr, after it exited 2 with nothing on stdout."""
    assert client.wait() == 2, client.seen
    assert client.rest("out") == []
    err = client.rest("err")
    assert len(err) == 1, err
    return err[0]


# --- real processes ---------------------------------------------------------------


def test_two_clients_chat_over_tls(tls_server, ca_pem, clients, tmp_path):
    a, b = unique("alice"), unique("bob")
    alice = clients(tls_server.port, "--tls", "--ca", ca_pem, "--register", user=a, password="pw alice")
    # bob's TLS settings come from his config file (ca relative to it): the same sockets
    config = tmp_path / "conf" / "config.toml"
    config.parent.mkdir()
    config.write_text('tls = true\nca = "ca.pem"\n')
    (config.parent / "ca.pem").write_bytes(open(ca_pem, "rb").read())
    bob = clients(tls_server.port, "--config", str(config), "--register", user=b, password="pw bob")
    alice.expect(f"logged in as {a}")
    bob.expect(f"logged in as {b}")
    alice.write(f"/chat {b}\n")
    bob.expect(f"chat request from {a} (answer yes or no)")
    bob.write("yes\n")
    alice.expect(f"chat with {b} started")
    alice.write("hello over TLS\n")
    bob.expect(f"[{a}] hello over TLS")
    long = "ü" * 2000   # 4000 bytes: a whole frame in one TLS record
    bob.write(f"{long}\nand back\n")
    alice.expect(f"[{b}] {long}")
    alice.expect(f"[{b}] and back")
    alice.write("/exit\n")
    assert alice.wait() == 0
    bob.expect(f"chat with {a} ended (left): {a} logged out")
    bob.write("/exit\n")
    assert bob.wait() == 0
    assert alice.rest("err") == [] and bob.rest("err") == []


def test_a_client_that_does_not_know_the_ca_exits_2(tls_server, clients):
    # No --ca: the system store, which has never heard of the test CA.
    client = clients(tls_server.port, "--tls", "--retry", "3", user=unique())
    line = unreachable(client)   # at once: --retry does not retry what cannot change
    assert line == f"cannot reach 127.0.0.1:{tls_server.port}: {CERT_VERIFY}unable to get local issuer certificate"


def test_the_certificate_must_name_the_host(ca, ca_pem, make_server, clients, tmp_path):
    chain, key = cert_files(ca, tmp_path, "chat.example")
    srv = make_server("--tls-cert", chain, "--tls-key", key)
    line = unreachable(clients(srv.port, "--ca", ca_pem, "--host", "127.0.0.1", user=unique()))
    assert line.startswith(f"cannot reach 127.0.0.1:{srv.port}: {CERT_VERIFY}"), line
    assert "mismatch" in line and "'127.0.0.1'" in line, line


def test_a_plaintext_client_on_a_tls_port_is_told_so(tls_server, clients):
    client = clients(tls_server.port, "--register", user=unique())
    assert unreachable(client) == (
        f"cannot reach 127.0.0.1:{tls_server.port}: the server closed the connection without sending HELLO "
        "(if it serves TLS, connect with --tls)")
    assert RawUser(tls_server).name   # and the server carries on


def test_a_tls_client_on_a_plaintext_port_fails_the_handshake(server, ca_pem, clients):
    client = clients(server.port, "--tls", "--ca", ca_pem, user=unique())
    line = unreachable(client)
    # OpenSSL's words differ between versions ("wrong version number", "record layer failure")
    assert line.startswith(f"cannot reach 127.0.0.1:{server.port}: TLS: handshake failed: "), line


def test_reconnecting_speaks_tls_again(ca, ca_pem, make_server, clients, tmp_path):
    chain, key = cert_files(ca, tmp_path, "localhost", "127.0.0.1")
    first = make_server("--tls-cert", chain, "--tls-key", key)
    first.client_tls = ssl.create_default_context()
    ca.configure_trust(first.client_tls)
    a = unique("alice")
    alice = clients(first.port, "--tls", "--ca", ca_pem, "--reconnect", "--register", user=a)
    alice.expect(f"logged in as {a}")
    first.proc.kill()
    first.proc.wait()
    expect_start(alice, "reconnecting in ")
    second = make_server("--tls-cert", chain, "--tls-key", key, "--port", str(first.port), db=first.db)
    second.client_tls = first.client_tls
    expect_start(alice, f"reconnected: logged in as {a}; not in a chat")
    bob = RawUser(second)   # over TLS too: the server takes nothing else
    bob.chat.send(f"CHAT {a}")
    bob.chat.expect(f"OK CHAT {a}")
    alice.expect(f"chat request from {bob.name} (answer yes or no)")
    alice.write("no\n")
    bob.login.expect(f"DECLINED {a}")
    alice.close_stdin()
    assert alice.wait() == 0


def test_the_server_keeps_serving_tls_users_meanwhile(tls_server):
    # The failures above cost the server only their own sockets.
    alice, bob = RawUser(tls_server), RawUser(tls_server)
    start_chat(alice, bob)
    alice.chat.send("MSG still fine")
    assert bob.login.line() == f"MSG {alice.name} still fine"


# --- where --tls and --ca come from ---------------------------------------------------


@pytest.fixture
def options(monkeypatch, tmp_path):
    """Run ``connect`` with app.run replaced: (exit code, settings or None, output)."""
    calls = []
    monkeypatch.setattr(command.app, "run", lambda settings, ui, ask_retry=None: calls.append(settings) or 0)
    monkeypatch.setattr(command, "_is_interactive", lambda: False)

    def invoke(*args, env=None):
        base = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "SELCHAT_CONFIG": None,
                "SELCHAT_TLS": None, "SELCHAT_CA": None, "SELCHAT_PASSWORD": "pw", "SELCHAT_USER": "alice"}
        calls.clear()
        result = CliRunner().invoke(command.connect, list(args), env={**base, **(env or {})})
        return result.exit_code, (calls[0] if calls else None), result.output

    return invoke


def test_tls_and_ca_from_the_command_line_env_and_config(options, ca_pem, tmp_path):
    assert options()[1].tls is False
    _, settings, _ = options("--tls")
    assert (settings.tls, settings.ca) == (True, None)
    _, settings, _ = options("--ca", ca_pem)   # --ca implies --tls
    assert (settings.tls, settings.ca) == (True, ca_pem)
    _, settings, _ = options(env={"SELCHAT_TLS": "1"})
    assert (settings.tls, settings.ca) == (True, None)
    _, settings, _ = options(env={"SELCHAT_CA": ca_pem})
    assert (settings.tls, settings.ca) == (True, ca_pem)
    _, settings, _ = options(env={"SELCHAT_TLS": "0", "SELCHAT_CA": ca_pem})   # said no: no
    assert (settings.tls, settings.ca) == (False, None)
    config = tmp_path / "xdg" / "selchat" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('tls = true\nca = "ca.pem"\n')
    (config.parent / "ca.pem").write_bytes(open(ca_pem, "rb").read())
    _, settings, _ = options()
    assert (settings.tls, settings.ca) == (True, str(config.parent / "ca.pem"))   # relative to the file
    _, settings, _ = options(env={"SELCHAT_CA": ca_pem})
    assert settings.ca == ca_pem   # the environment outranks the file
    _, settings, _ = options("--no-tls")
    assert (settings.tls, settings.ca) == (False, None)


def test_a_bad_ca_file_is_a_usage_error(options, tmp_path):
    code, settings, output = options("--ca", str(tmp_path / "missing.pem"))
    assert code == 1 and settings is None
    assert output.strip() == f"error: --ca {tmp_path / 'missing.pem'}: no such file"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    code, settings, output = options("--tls", "--ca", str(junk))
    assert code == 1 and settings is None and f"--ca {junk}: not a PEM file" in output
    (tmp_path / "xdg" / "selchat").mkdir(parents=True)
    (tmp_path / "xdg" / "selchat" / "config.toml").write_text('tls = "yes"\n')
    code, _, output = options()
    assert code == 1 and "tls must be true or false" in output


# --- the transport itself -----------------------------------------------------------


@pytest.mark.parametrize("read_size", [app.READ_SIZE, 1000])
def test_tls_transport_keeps_every_byte_through_full_buffers(ca, monkeypatch, read_size):
    """Writes that stop with SSLWantWriteError are retried with the same (and
    more) bytes; everything sent each way arrives whole and in order. With
    reads smaller than a TLS record, the rest of each record waits decrypted
    inside the SSL object, where select cannot see it: the peer sends nothing
    more (and does not close) until all has arrived, so a byte left there
    would hang the test."""
    monkeypatch.setattr(app, "READ_SIZE", read_size)
    tmp = ca.issue_cert("localhost")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tmp.configure_cert(server_ctx)
    client_ctx = clienttls.client_context()
    ca.configure_trust(client_ctx)
    up, down = os.urandom(300_000), os.urandom(2_000_000)
    ours, theirs = socket.socketpair()
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    stuck, finished = threading.Event(), threading.Event()
    got_up: list[bytes] = []

    def peer() -> None:
        with server_ctx.wrap_socket(theirs, server_side=True) as tls:
            tls.settimeout(DEADLINE)
            stuck.wait(DEADLINE)   # read nothing until the client is stuck
            data = b""
            while len(data) < 2 * len(up):
                data += tls.recv(65536)
            got_up.append(data)
            tls.sendall(down)
            finished.wait(DEADLINE)   # keep the socket open and quiet

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        ours.setblocking(False)
        sock = await clienttls.handshake_async(loop, ours, client_ctx, "localhost", DEADLINE)
        received, done = bytearray(), loop.create_future()

        def on_read(role, data):
            received.extend(data)
            if len(received) >= len(down) and not done.done():
                done.set_result(None)

        def on_error(role, err):
            if not done.done():
                done.set_exception(err)

        transport = app.Transport(loop, CHAT, on_read, on_error, lambda: None)
        transport.start(sock)
        transport.write(up)
        assert transport.buffered > 0   # the socket is full: a send stopped half-way
        transport.write(up)             # more, while the first send waits to be retried
        stuck.set()
        try:
            await asyncio.wait_for(done, DEADLINE)
        finally:
            finished.set()
        assert transport.buffered == 0
        transport.close()
        return bytes(received)

    received = asyncio.run(main())
    thread.join(DEADLINE)
    assert hashlib.sha256(got_up[0]).digest() == hashlib.sha256(up + up).digest()
    assert len(received) == len(down) and received == down
