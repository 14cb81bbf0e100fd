"""The click CLI: options, exit codes and the user admin commands."""

from __future__ import annotations

import logging
import socket

import pytest
from click.testing import CliRunner

from selchat import __version__
from selchat.cli import main
from selchat.store.accounts import AccountStore


@pytest.fixture(autouse=True)
def keep_logging():
    """`selchat serve` configures the root logger; put it back for other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run(*args, env=None, input=None):
    return CliRunner().invoke(main, list(args), env=env, input=input, catch_exceptions=False)


def test_version_and_help():
    assert run("--version").output.strip() == f"selchat, version {__version__}"
    help_text = run("serve", "--help").output
    for option in ("--host ADDR", "--port PORT", "--db PATH", "--ping-interval SECONDS", "--ping-timeout SECONDS",
                   "--request-timeout SECONDS", "--tls-cert PATH", "--msg-rate PER_S"):
        assert option in help_text, option
    assert set(run("--help").output.split("Commands:")[1].split()) >= {"serve", "connect", "user", "bench"}


def test_user_add_list_del(tmp_path):
    db = str(tmp_path / "u.db")
    added = run("user", "--db", db, "add", "Alice", env={"SELCHAT_PASSWORD": "pw one"})
    assert added.exit_code == 0 and added.output == "added Alice\n"
    prompted = run("user", "--db", db, "add", "bob", input="secret\nsecret\n", env={"SELCHAT_PASSWORD": None})
    assert prompted.exit_code == 0, prompted.output
    names = [line.split("\t")[0] for line in run("user", "--db", db, "list").output.splitlines()]
    assert names == ["Alice", "bob"]
    store = AccountStore(db, scrypt_n=16)
    assert store.verify("alice", "pw one") == "Alice" and store.verify("bob", "secret") == "bob"
    store.close()
    assert run("user", "--db", db, "del", "ALICE").output == "deleted ALICE\n"
    assert [line.split("\t")[0] for line in run("user", "--db", db, "list").output.splitlines()] == ["bob"]


def test_user_errors_exit_1(tmp_path):
    db = str(tmp_path / "u.db")
    run("user", "--db", db, "add", "carol", env={"SELCHAT_PASSWORD": "pw"})
    taken = run("user", "--db", db, "add", "CAROL", env={"SELCHAT_PASSWORD": "pw"})
    assert taken.exit_code == 1 and "Error:" in taken.output
    bad = run("user", "--db", db, "add", "no spaces", env={"SELCHAT_PASSWORD": "pw"})
    assert bad.exit_code == 1
    missing = run("user", "--db", db, "del", "nobody")
    assert missing.exit_code == 1 and "no user nobody" in missing.output


def test_serve_on_a_busy_port_says_so(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        result = CliRunner().invoke(main, ["serve", "--port", str(port), "--db", str(tmp_path / "a.db")])
    finally:
        busy.close()
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


def test_tls_key_without_cert_is_a_usage_error(tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("x")
    result = CliRunner().invoke(main, ["serve", "--tls-key", str(key), "--db", str(tmp_path / "a.db")])
    assert result.exit_code == 2 and "--tls-key needs --tls-cert" in result.output
