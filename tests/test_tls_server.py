"""selchat serve --tls-cert/--tls-key: the whole protocol over TLS, next to
clients that get the handshake wrong."""

from __future__ import annotations

import socket
import ssl

import pytest
import trustme

from tests.support import DEADLINE, RawUser, start_chat


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_server(make_server, ca, tmp_path):
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    with open(chain, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    srv = make_server("--tls-cert", str(chain), "--tls-key", str(key))
    srv.client_tls = ssl.create_default_context()
    ca.configure_trust(srv.client_tls)
    return srv


def test_chat_over_tls(tls_server):
    alice, bob = RawUser(tls_server), RawUser(tls_server)
    assert alice.login.sock.version() in ("TLSv1.2", "TLSv1.3")
    start_chat(alice, bob)
    alice.chat.send("MSG over tls")
    assert bob.login.line() == f"MSG {alice.name} over tls"


def test_plaintext_client_on_a_tls_port_is_closed_and_harms_nobody(tls_server):
    alice, bob = RawUser(tls_server), RawUser(tls_server)
    start_chat(alice, bob)
    plain = socket.create_connection((tls_server.host, tls_server.port), timeout=DEADLINE)
    plain.sendall(b"LOGIN alice secret\n")
    assert plain.recv(4096) == b""  # the handshake fails; only this socket closes
    alice.chat.send("MSG still here")
    assert bob.login.line() == f"MSG {alice.name} still here"


def test_client_that_does_not_trust_the_server_fails(tls_server):
    untrusting = ssl.create_default_context()  # does not know our CA
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusting.wrap_socket(socket.create_connection((tls_server.host, tls_server.port), timeout=DEADLINE),
                               server_hostname="localhost")
    assert RawUser(tls_server).name  # the server carries on
