"""The click CLI: options, exit codes and the user admin commands."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from selchat import __version__
from selchat.cli import main
from selchat.store.accounts import AccountStore
from tests.support import DEADLINE


# logsetup (and so `selchat serve` run in-process) configures the root logger.
pytestmark = pytest.mark.usefixtures("keep_root_logging")


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


def test_serve_help_shows_every_environment_variable():
    help_text = " ".join(run("serve", "--help").output.split())   # unwrap click's line breaks
    from selchat.server.options import ENV_KEYS, envvar, option

    for key in ENV_KEYS:
        assert option(key).split("/")[0] in help_text, key
        assert f"env var: {envvar(key)}" in help_text, key
    for new in ("--config PATH", "--log-file PATH", "--log-format [text|json]", "--metrics HOST:PORT",
                "--admin-socket PATH", "--motd-file PATH", "--throttle-after N"):
        assert new in help_text, new
    assert "env var: SELCHAT_SERVER_CONFIG" in help_text


def test_serve_with_a_database_it_cannot_open_exits_at_once(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "selchat.cli", "serve", "--port", "0",
                             "--db", "/nonexistent-dir/x.db"], capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 1
    assert result.stdout == ""        # never said it was listening
    assert result.stderr.startswith("Error: cannot open the database /nonexistent-dir/x.db: ")
    assert "(no directory /nonexistent-dir)" in result.stderr and len(result.stderr.splitlines()) == 1
    assert time.monotonic() - started < 5


def test_serve_metrics_address_errors(tmp_path):
    bad = run("serve", "--metrics", "9117", "--db", str(tmp_path / "a.db"))
    assert bad.exit_code == 2 and "'9117' is not HOST:PORT" in bad.output
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        result = run("serve", "--port", "0", "--metrics", f"127.0.0.1:{port}", "--db", str(tmp_path / "a.db"))
    finally:
        busy.close()
    assert result.exit_code == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.output
    assert "listening on" not in result.output


def test_serve_says_why_the_admin_socket_cannot_be_made(tmp_path):
    not_a_socket = tmp_path / "admin.sock"
    not_a_socket.write_text("someone's file")
    result = run("serve", "--port", "0", "--admin-socket", str(not_a_socket), "--db", str(tmp_path / "a.db"))
    assert result.exit_code == 1
    assert f"cannot open the admin socket {not_a_socket}: the file exists and is not a socket" in result.output
    assert not_a_socket.read_text() == "someone's file"


def test_serve_says_why_the_log_file_cannot_be_opened(tmp_path):
    result = run("serve", "--port", "0", "--log-file", str(tmp_path / "no-dir" / "x.log"),
                 "--db", str(tmp_path / "a.db"))
    assert result.exit_code == 1 and "cannot open the log file" in result.output
    assert "No such file or directory" in result.output


def test_user_add_reads_the_password_from_stdin_or_the_environment(tmp_path):
    db = str(tmp_path / "u.db")
    piped = run("user", "--db", db, "add", "dave", "--password-stdin", input="from stdin\nignored\n",
                env={"SELCHAT_PASSWORD": "not this"})
    assert piped.exit_code == 0 and piped.output == "added dave\n"
    env = run("user", "--db", db, "add", "erin", env={"SELCHAT_PASSWORD": "from env"})
    assert env.exit_code == 0 and env.output == "added erin\n"
    empty = run("user", "--db", db, "add", "fred", "--password-stdin", input="")
    assert empty.exit_code == 1 and "no password on stdin" in empty.output
    store = AccountStore(db, scrypt_n=16)
    try:
        assert store.verify("dave", "from stdin") == "dave"
        assert store.verify("erin", "from env") == "erin"
        assert not store.exists("fred")
    finally:
        store.close()


def test_user_add_takes_no_password_argument(tmp_path):
    """An argument shows in ps to every user of the machine."""
    result = run("user", "--db", str(tmp_path / "u.db"), "add", "gina", "--password", "hunter2")
    assert result.exit_code == 2 and "--password was removed" in result.output
    assert "--password " not in run("user", "add", "--help").output.replace("--password-stdin", "")


def test_user_passwd_sets_a_new_password_without_the_old_one(tmp_path):
    db = str(tmp_path / "u.db")
    run("user", "--db", db, "add", "hana", env={"SELCHAT_PASSWORD": "forgotten"})
    prompted = run("user", "--db", db, "passwd", "HANA", input="fresh one\nfresh one\n",
                   env={"SELCHAT_PASSWORD": None})
    assert prompted.exit_code == 0 and "password set for HANA" in prompted.output
    piped = run("user", "--db", db, "passwd", "hana", "--password-stdin", input="from stdin\n")
    assert piped.exit_code == 0
    with AccountStore(db) as store:
        assert store.verify("hana", "forgotten") is None and store.verify("hana", "from stdin") == "hana"
    missing = run("user", "--db", db, "passwd", "nobody", env={"SELCHAT_PASSWORD": "pw"})
    assert missing.exit_code == 1 and "no user nobody" in missing.output


def test_user_lock_and_unlock(tmp_path):
    db = str(tmp_path / "u.db")
    run("user", "--db", db, "add", "Mallory", env={"SELCHAT_PASSWORD": "pw"})
    run("user", "--db", db, "add", "bob", env={"SELCHAT_PASSWORD": "pw"})
    locked = run("user", "--db", db, "lock", "mallory", "spam", "and", "abuse")
    assert locked.exit_code == 0 and locked.output == "locked Mallory\n"
    with AccountStore(db, scrypt_n=16) as store:
        assert store.locked_users() == {"Mallory": "spam and abuse"}   # the rest of the words
    again = run("user", "--db", db, "lock", "MALLORY")                  # no reason: replaced by none
    assert again.exit_code == 0 and again.output == "locked Mallory\n"
    with AccountStore(db, scrypt_n=16) as store:
        assert store.locked_users() == {"Mallory": ""}
    unlocked = run("user", "--db", db, "unlock", "MALLORY")
    assert unlocked.exit_code == 0 and unlocked.output == "unlocked Mallory\n"
    with AccountStore(db, scrypt_n=16) as store:
        assert store.locked_users() == {} and store.verify("mallory", "pw") == "Mallory"


def test_user_lock_and_unlock_errors_exit_1(tmp_path):
    db = str(tmp_path / "u.db")
    run("user", "--db", db, "add", "Carol", env={"SELCHAT_PASSWORD": "pw"})
    missing = run("user", "--db", db, "lock", "nobody", "spam")
    assert missing.exit_code == 1 and missing.output == "Error: no user nobody\n"
    not_locked = run("user", "--db", db, "unlock", "carol")
    assert not_locked.exit_code == 1 and not_locked.output == "Error: Carol is not locked\n"
    no_such = run("user", "--db", db, "unlock", "nobody")
    assert no_such.exit_code == 1 and no_such.output == "Error: no user nobody\n"
    too_long = run("user", "--db", db, "lock", "carol", "x" * 201)
    assert too_long.exit_code == 1 and "at most 200 characters" in too_long.output
    with AccountStore(db, scrypt_n=16) as store:
        assert store.locked_users() == {}
    assert run("user", "--db", db, "lock").exit_code == 2       # NAME is required
    assert run("user", "--db", db, "unlock").exit_code == 2


def test_user_list_shows_the_locks_in_a_third_column(tmp_path):
    db = str(tmp_path / "u.db")
    for name in ("alice", "Bob", "carol"):
        run("user", "--db", db, "add", name, env={"SELCHAT_PASSWORD": "pw"})
    run("user", "--db", db, "lock", "bob", "spam", "bot")
    run("user", "--db", db, "lock", "carol")
    listed = run("user", "--db", db, "list")
    assert listed.exit_code == 0
    rows = [line.split("\t") for line in listed.output.splitlines()]
    assert [row[0] for row in rows] == ["alice", "Bob", "carol"]
    assert [len(row) for row in rows] == [2, 3, 3]             # name, created[, lock]
    assert rows[1][2] == "locked: spam bot" and rows[2][2] == "locked: "
    for row in rows:
        assert row[1].endswith("+00:00")
    run("user", "--db", db, "unlock", "bob")
    assert [len(line.split("\t")) for line in run("user", "--db", db, "list").output.splitlines()] == [2, 2, 3]


def test_user_lock_help_says_a_session_lasts_until_kicked():
    for command in ("lock", "del"):
        help_text = " ".join(run("user", command, "--help").output.split())
        assert "stays online until they leave" in help_text, command
    assert "selchat admin kick NAME" in " ".join(run("user", "lock", "--help").output.split())
