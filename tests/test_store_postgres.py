"""Accounts in PostgreSQL: the store against a real server, then ``selchat serve`` and
``selchat user`` with ``--db postgresql://...``.

One PostgreSQL runs for the session (tests/pgserver.py); a test that wants
empty tables makes a schema (or a database) of its own. The behaviour tests
run on both stores, SQLite and PostgreSQL, with the same expectations.
Without PostgreSQL or psycopg the tests that use ``pg`` are skipped, saying
what to install; the others need neither.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from selchat.store import describe_db, is_postgres_url, open_store
from selchat.store import accounts as accounts_module
from selchat.store.accounts import (
    MAX_BLOCKS,
    AccountLocked,
    AccountStore,
    InvalidPassword,
    InvalidUsername,
    StorageUnavailable,
    TooManyBlocks,
    UserExists,
)
from selchat.store.passwords import hash_password
from tests import pgserver
from tests.pgserver import PgServer, free_port
from tests.support import DEADLINE, REPO_ROOT, RawUser, ServerProcess, read_line_from, unique

CHEAP_N = 2**4


@pytest.fixture(scope="session")
def pg():
    """The session's PostgreSQL (tests/pgserver.py); skips when there is none."""
    with PgServer.started() as server:
        yield server


@pytest.fixture(scope="module")
def shared_url(pg):
    """One database for the tests that use names of their own (unique())."""
    return pg.create_database()


@pytest.fixture
def pg_store(pg):
    """A store on empty tables of its own (a schema of its own, named in the URL)."""
    from selchat.store.postgres import PostgresAccountStore

    store = PostgresAccountStore(pg.create_schema(), scrypt_n=CHEAP_N)
    yield store
    store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request, tmp_path):
    """Each behaviour test runs on both stores: they must not differ."""
    if request.param == "sqlite":
        store = AccountStore(str(tmp_path / "accounts.db"), scrypt_n=CHEAP_N)
    else:
        store = open_store(request.getfixturevalue("pg").create_schema(), scrypt_n=CHEAP_N)
    yield store
    store.close()


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``selchat ARGS`` as a real process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SELCHAT_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "selchat.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO_ROOT, timeout=DEADLINE)


def cli_here(*args: str, env: dict | None = None):
    """``selchat ARGS`` in this process (click's runner): quicker than a process."""
    from click.testing import CliRunner

    from selchat.cli import main

    env = {"SELCHAT_DB": None, "SELCHAT_PASSWORD": None, **(env or {})}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


# -- choosing the store, without a server -------------------------------------------


def test_the_url_prefix_chooses_postgresql(tmp_path):
    for url in ("postgresql://u@h/db", "postgres://h/db", "POSTGRESQL://h", "postgresql:///db?host=/run/pg"):
        assert is_postgres_url(url), url
    for path in ("selchat.db", "postgresql.db", "./postgresql://x", "/var/lib/postgres/x.db",
                 "file:x.db?mode=ro", ":memory:"):
        assert not is_postgres_url(path), path
    with open_store(str(tmp_path / "x.db"), scrypt_n=CHEAP_N) as store:
        assert type(store) is AccountStore


def test_describe_db_hides_the_password():
    assert describe_db("selchat.db") == "selchat.db"
    assert describe_db("postgresql://chat:s3cret@db.example:5432/chat") == "postgresql://chat:***@db.example:5432/chat"
    assert describe_db("postgres://chat@db/chat") == "postgres://chat@db/chat"
    assert (describe_db("postgresql://db/chat?user=chat&password=s3cret&sslmode=require")
            == "postgresql://db/chat?user=chat&password=***&sslmode=require")
    assert describe_db("postgresql://chat:p%40ss@db/chat") == "postgresql://chat:***@db/chat"


def test_without_psycopg_a_url_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "psycopg" or m.startswith("psycopg.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "psycopg", None)   # import psycopg -> ImportError
    with pytest.raises(StorageUnavailable) as info:
        open_store("postgresql://chat:s3cret@127.0.0.1/chat")
    assert "pip install 'selchat[postgres]'" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_a_url_in_the_config_file_is_not_a_path(tmp_path):
    from selchat.server.options import Loader

    conf = tmp_path / "selchat.toml"
    conf.write_text('db = "postgresql://chat@db.example/chat"\n')
    assert Loader(conf, {}, {}).load().db == "postgresql://chat@db.example/chat"
    conf.write_text('db = "accounts.db"\n')
    assert Loader(conf, {}, {}).load().db == str(tmp_path / "accounts.db")


def test_without_postgresql_the_tests_skip_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(pgserver, "find_bindir", lambda: None)
    with pytest.raises(pytest.skip.Exception, match=r"postgres not installed: apt-get install postgresql"):
        with PgServer.started():
            pass


def test_an_unreachable_server_is_storage_unavailable_without_the_password():
    port = free_port()   # nothing listens there
    with pytest.raises(StorageUnavailable) as info:
        open_store(f"postgresql://chat:s3cret@127.0.0.1:{port}/chat?connect_timeout=3")
    message = str(info.value)
    assert info.value.code == "storage"
    assert message.startswith("account storage unavailable (open): ") and str(port) in message
    assert "s3cret" not in message and "\n" not in message


def test_user_commands_with_an_unreachable_server_exit_1():
    url = f"postgresql://chat:s3cret@127.0.0.1:{free_port()}/chat"
    for args in (("add", "alice"), ("list",), ("del", "alice")):
        result = cli_here("user", "--db", url, *args, env={"SELCHAT_PASSWORD": "pw"})
        assert result.exit_code == 1
        assert result.output.startswith("Error: account storage unavailable (open): "), result.output
        assert "s3cret" not in result.output


# -- the store on a real server: the same behaviour as SQLite ------------------------


def test_register_verify_and_canonical_names(any_store):
    store = any_store
    assert store.add_user("Alice", "s3cret") == "Alice"
    for variant in ("alice", "ALICE", "aLiCe"):
        with pytest.raises(UserExists) as info:
            store.add_user(variant, "other")
        assert info.value.code == "taken" and str(info.value) == "username 'Alice' is already taken"
        assert store.verify(variant, "s3cret") == "Alice"
        assert store.exists(variant) and store.canonical_name(variant) == "Alice"
    assert store.verify("alice", "S3CRET") is None      # passwords are case-sensitive
    assert store.verify("alice", "other") is None
    assert store.verify("mallory", "s3cret") is None
    assert store.verify("bad name", "s3cret") is None
    assert store.verify("alice", "") is None
    assert store.canonical_name("nobody") is None and store.canonical_name("bad name") is None
    assert not store.exists("nobody") and not store.exists("x" * 33)


def test_invalid_names_and_passwords(any_store):
    for name in ("", "bad name", "x" * 33, "caf\u00e9"):
        with pytest.raises(InvalidUsername) as info:
            any_store.add_user(name, "pw")
        assert info.value.code == "bad-username"
    for password in ("", "a\nb", "a\x00b", "x" * 1025):
        with pytest.raises(InvalidPassword) as info:
            any_store.add_user("alice", password)
        assert info.value.code == "bad-password"
    assert any_store.add_user("alice", "p\u00e4ss w\u00f6rd \U0001F511") == "alice"
    assert any_store.verify("alice", "p\u00e4ss w\u00f6rd \U0001F511") == "alice"


def test_delete(any_store):
    store = any_store
    store.add_user("Alice", "pw")
    store.add_user("bob", "pw")
    assert store.delete_user("ALICE") is True
    assert store.delete_user("alice") is False
    assert store.delete_user("nobody") is False and store.delete_user("bad name") is False
    assert store.verify("Alice", "pw") is None and not store.exists("alice")
    assert [n for n, _ in store.list_users()] == ["bob"]
    assert store.add_user("aLiCe", "new") == "aLiCe"     # the name is free again, in any spelling
    assert store.verify("ALICE", "new") == "aLiCe"


def test_list_in_the_same_order_with_utc_timestamps(any_store):
    names = ["charlie", "Bob", "alice", "_under", "Dave", "-dash", "0zero", "Zed", "zebra"]
    for name in names:
        any_store.add_user(name, "pw")
    users = any_store.list_users()
    # SQLite's order (NOCASE, then as written), whatever the PostgreSQL locale.
    assert [n for n, _ in users] == sorted(names, key=lambda n: (n.lower(), n))
    now = datetime.now(timezone.utc)
    for _, created in users:
        assert created.endswith("+00:00") and len(created) == len("2025-01-01T00:00:00+00:00")
        assert abs((now - datetime.fromisoformat(created)).total_seconds()) < 60


def test_close_is_idempotent_and_final(any_store):
    any_store.close()
    any_store.close()
    with pytest.raises(StorageUnavailable):
        any_store.add_user("alice", "pw")


# -- what only PostgreSQL has ---------------------------------------------------------


def test_passwords_are_scrypt_hashes_of_the_store_cost(pg_store):
    import psycopg

    pg_store.add_user("alice", "pw")
    with psycopg.connect(pg_store.url) as conn:
        (pwhash,) = conn.execute("SELECT pwhash FROM selchat_users WHERE name = 'alice'").fetchone()
    assert pwhash.startswith(f"scrypt${CHEAP_N}$8$1$")
    # Hashes made at another cost still verify: the cost is read from the hash.
    with open_store(pg_store.url, scrypt_n=2**5) as other:
        assert other.verify("ALICE", "pw") == "alice"


def test_the_unique_index_catches_a_race(pg_store):
    # Another store registers the name between our look-up and our insert.
    with open_store(pg_store.url, scrypt_n=CHEAP_N) as other:
        real_lookup = pg_store._lookup
        calls = []

        def racing_lookup(name):
            calls.append(name)
            if len(calls) == 1:
                other.add_user("RACER", "theirs")
                return None
            return real_lookup(name)

        pg_store._lookup = racing_lookup
        with pytest.raises(UserExists, match="'RACER'"):
            pg_store.add_user("racer", "mine")
    del pg_store._lookup
    assert pg_store.verify("racer", "theirs") == "RACER"
    assert pg_store.add_user("next", "pw") == "next"     # the connection is still good


def test_stores_that_open_at_once_create_the_schema_once(pg):
    url = pg.create_schema()
    count = 6
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def open_one(i):
        barrier.wait(DEADLINE)
        try:
            store = open_store(url, scrypt_n=CHEAP_N)
            results[i] = store.add_user(f"user{i}", "pw")
            store.close()
        except Exception as exc:   # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert results == [f"user{i}" for i in range(count)]
    import psycopg

    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM selchat_schema").fetchall() == [(2,)]


def test_a_newer_schema_is_refused(pg):
    import psycopg

    url = pg.create_schema()
    open_store(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE selchat_schema SET version = 3")
    with pytest.raises(StorageUnavailable, match="schema version 3; this selchat understands up to 2") as info:
        open_store(url)
    assert pg.password not in str(info.value)


def test_bad_credentials_or_database_are_storage_unavailable(pg):
    for url in (pg.url().replace(pg.password, "not-" + pg.password), pg.url("no_such_db")):
        with pytest.raises(StorageUnavailable) as info:
            open_store(url)
        message = str(info.value)
        assert message.startswith("account storage unavailable (open): "), message
        assert pg.password not in message


def test_a_stopped_server_is_storage_unavailable_then_the_next_call_works(pg, shared_url):
    store = open_store(shared_url, scrypt_n=CHEAP_N)
    name = unique("down")
    store.add_user(name, "pw")
    pg.stop()
    try:
        calls = [lambda: store.verify(name, "pw"), lambda: store.add_user(unique(), "pw"),
                 lambda: store.exists(name), lambda: store.canonical_name(name),
                 store.list_users, lambda: store.delete_user(name),
                 lambda: store.block(name, name), lambda: store.unblock(name, name),
                 lambda: store.blocked_users(name), lambda: store.is_blocked(name, name),
                 lambda: store.lock_user(name), lambda: store.unlock_user(name), store.locked_users]
        for call in calls:
            with pytest.raises(StorageUnavailable) as info:
                call()
            assert info.value.code == "storage" and pg.password not in str(info.value)
        with pytest.raises(StorageUnavailable):
            open_store(shared_url, scrypt_n=CHEAP_N)
    finally:
        pg.start()
    assert store.verify(name, "pw") == name          # connects again, no failure left over
    assert store.add_user(unique(), "pw")
    store.close()


def test_a_restart_between_calls_costs_no_failed_read(pg, shared_url):
    store = open_store(shared_url, scrypt_n=CHEAP_N)
    name = store.add_user(unique("restart"), "pw")
    pg.stop()
    pg.start()
    # The connection is dead, but nobody was using it: the read reconnects.
    assert store.verify(name, "pw") == name
    pg.stop()
    pg.start()
    assert store.add_user(unique(), "pw")            # its look-up reconnects first
    store.close()


def test_a_connection_cut_by_the_server_is_replaced(pg, shared_url):
    import psycopg

    store = open_store(shared_url, scrypt_n=CHEAP_N)
    name = store.add_user(unique("cut"), "pw")

    def cut():
        pid = store._conn.info.backend_pid
        with psycopg.connect(shared_url, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)

    cut()
    assert store.canonical_name(name.upper()) == name    # a read retries on a new connection
    cut()
    with pytest.raises(StorageUnavailable):              # a write does not (it might have happened)
        store.delete_user(name)
    assert store.delete_user(name) is True               # the next call connects again
    store.close()


# -- selchat serve and selchat user with --db postgresql:// ----------------------------


def test_serve_and_user_commands_share_the_accounts(pg, tmp_path):
    url = pg.create_database()
    added = cli("user", "--db", url, "add", "Carol", env={"SELCHAT_PASSWORD": "carol pw"})
    assert added.returncode == 0 and added.stdout == "added Carol\n", added.stderr
    server = ServerProcess(tmp_path, db=url)
    try:
        # REGISTER over a real socket, as a client does; a name taken in another case is refused.
        alice = RawUser(server, name="Alice", password="alice pw")
        sock = server.connect()
        sock.send("REGISTER ALICE other", "REGISTER carol other")
        assert sock.line().startswith("ERR REGISTER taken username 'Alice' is already taken")
        assert sock.line().startswith("ERR REGISTER taken username 'Carol' is already taken")
        # LOGIN, with the password that `selchat user add` stored, in any case.
        sock.send("LOGIN carol wrong")
        assert sock.line() == "ERR LOGIN auth-failed invalid username or password"
        sock.send("LOGIN CAROL carol pw")
        assert sock.expect("WELCOME ").split()[1] == "Carol"
        alice.close()
        sock.close()
        assert "storage" not in server.log()
    finally:
        server.stop()
    listed = cli_here("user", "list", env={"SELCHAT_DB": url})   # the URL from the environment: not in ps
    assert listed.exit_code == 0, listed.output
    assert [line.split("\t")[0] for line in listed.output.splitlines()] == ["Alice", "Carol"]
    deleted = cli_here("user", "--db", url, "del", "alice")
    assert deleted.exit_code == 0 and deleted.output == "deleted alice\n"
    assert cli_here("user", "--db", url, "list").output.startswith("Carol\t")


def test_two_servers_on_one_database_see_each_others_registrations(pg, tmp_path):
    url = pg.create_database()
    one, two = ServerProcess(tmp_path, db=url), ServerProcess(tmp_path, db=url)
    try:
        for here, there in ((one, two), (two, one)):
            user = RawUser(here, password="pw here")
            sock = there.connect()
            sock.send(f"REGISTER {user.name.upper()} pw", f"LOGIN {user.name.upper()} pw here")
            assert sock.line().startswith(f"ERR REGISTER taken username '{user.name}' is already taken")
            assert sock.expect("WELCOME ").split()[1] == user.name
            user.close()
            sock.close()
    finally:
        one.stop()
        two.stop()


def test_the_server_keeps_running_while_postgresql_is_down(pg, shared_url, tmp_path):
    server = ServerProcess(tmp_path, "--request-timeout", "2", db=shared_url)  # a blocked request: 1.5 s at most
    try:
        user = RawUser(server, password="pw")
        name = user.name
        pg.stop()
        try:
            sock = server.connect()
            sock.send(f"LOGIN {name} pw")
            refused = sock.line()
            assert refused.startswith("ERR LOGIN storage account storage unavailable "), refused
            assert pg.password not in refused
        finally:
            pg.start()
        sock.send(f"LOGIN {name} pw")   # not counted as a failure, and now it works
        assert sock.expect("WELCOME ").split()[1] == name
        assert server.proc.poll() is None
        user.close()
        sock.close()   # before the stop, which would wait for them a while
        # A chat request waits for the block lists: with them unreadable it
        # is refused, not let through; then it goes through again.
        alice, bob = RawUser(server, password="pw"), RawUser(server, password="pw")
        bob.chat.send(f"BLOCK {alice.name}")
        bob.chat.expect(f"OK BLOCK {alice.name}")
        pg.stop()
        try:
            alice.chat.send(f"CHAT {bob.name}")
            alice.chat.expect("ERR CHAT storage ")
            bob.chat.send("BLOCKS")
            bob.chat.expect("ERR BLOCKS storage ")
        finally:
            pg.start()
        alice.chat.send(f"CHAT {bob.name}")
        alice.chat.expect(f"OK CHAT {bob.name}")
        alice.expect(f"DECLINED {bob.name}")
        alice.close()
        bob.close()
    finally:
        server.stop()


def test_serve_never_prints_the_password(pg):
    down = f"postgresql://selchat:{pg.password}@127.0.0.1:{free_port()}/x"
    result = cli("serve", "--port", "0", "--db", down)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: cannot open the database {describe_db(down)}: "
                                     "account storage unavailable (open): "), result.stderr
    assert pg.password not in result.stderr and "no directory" not in result.stderr
    proc = subprocess.Popen([sys.executable, "-m", "selchat.cli", "serve", "--port", "0", "--db", pg.url()],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
    try:
        banner = read_line_from(proc.stdout, DEADLINE)
    finally:
        proc.terminate()
        proc.wait(DEADLINE)
        proc.stdout.close()
    assert "listening on" in banner and pg.password not in banner, banner


def test_a_password_is_changed_only_with_the_one_it_has_now(any_store):
    store = any_store
    store.add_user("Alice", "old pass")
    assert store.change_password("alice", "wrong", "new pass") is None
    assert store.verify("alice", "old pass") == "Alice"          # unchanged
    with pytest.raises(InvalidPassword):
        store.change_password("alice", "old pass", "x" * 1025)   # refused before any hashing
    assert store.change_password("ALICE", "old pass", "new pass") == "Alice"
    assert store.verify("alice", "old pass") is None
    assert store.verify("alice", "new pass") == "Alice"
    assert store.change_password("nobody", "pw", "new pass") is None
    # An operator's reset needs no old password.
    assert store.set_password("alice", "reset") is True
    assert store.verify("Alice", "reset") == "Alice"
    assert store.set_password("nobody", "reset") is False and not store.exists("nobody")


def test_an_account_is_deleted_by_its_user_only_with_its_password(any_store):
    store = any_store
    store.add_user("Alice", "pw")
    store.add_user("Bob", "pw")
    store.block("bob", "alice")
    assert store.delete_account("alice", "wrong") is None
    assert store.exists("alice")
    assert store.delete_account("ALICE", "pw") == "Alice"
    assert not store.exists("alice") and store.verify("alice", "pw") is None
    assert store.blocked_users("bob") == []   # gone from every list, as with delete_user
    assert store.delete_account("alice", "pw") is None


# -- block lists, on both stores -------------------------------------------------------


def block_rows(store) -> list[tuple[str, str]]:
    """Every block list entry as stored, ``(owner, blocked)``, sorted."""
    if isinstance(store, AccountStore):
        rows = store._conn.execute("SELECT owner, blocked FROM blocks").fetchall()
    else:
        import psycopg

        with psycopg.connect(store.url) as conn:
            rows = conn.execute("SELECT owner, blocked FROM selchat_blocks").fetchall()
    return sorted((o, b) for o, b in rows)


def reopen(store):
    """Another store on the same database (as another worker thread has)."""
    if isinstance(store, AccountStore):
        return AccountStore(store.path, scrypt_n=CHEAP_N)
    return open_store(store.url, scrypt_n=CHEAP_N)


def add_users(store, *names: str) -> None:
    for name in names:
        store.add_user(name, "pw")


def test_block_unblock_list_and_ask(any_store):
    store = any_store
    add_users(store, "Alice", "bob", "Carol", "dave")
    assert store.blocked_users("alice") == [] and not store.is_blocked("alice", "bob")
    assert store.block("alice", "BOB") == "bob"          # the canonical spelling
    assert store.block("ALICE", "carol") == "Carol"
    assert store.blocked_users("aLiCe") == ["bob", "Carol"]
    assert store.is_blocked("alice", "bob") and store.is_blocked("ALICE", "CAROL")
    assert not store.is_blocked("alice", "dave")
    assert not store.is_blocked("bob", "alice")          # one way only
    assert store.blocked_users("bob") == []
    assert block_rows(store) == [("Alice", "Carol"), ("Alice", "bob")]   # both names canonical
    assert store.unblock("alice", "BOB") == "bob"        # the stored spelling
    assert store.unblock("alice", "bob") is None         # not blocked (any more)
    assert store.unblock("alice", "dave") is None        # never blocked
    assert not store.is_blocked("alice", "bob")
    assert store.blocked_users("alice") == ["Carol"]
    assert store.unblock("CAROL", "alice") is None       # the other way round is not an entry
    assert store.unblock("aLiCe", "cArOl") == "Carol"
    assert store.blocked_users("alice") == [] and block_rows(store) == []


def test_blocking_again_changes_nothing(any_store):
    store = any_store
    add_users(store, "Alice", "Bob")
    assert store.block("alice", "bob") == "Bob"
    for owner, other in (("alice", "bob"), ("ALICE", "BOB"), ("Alice", "Bob")):
        assert store.block(owner, other) == "Bob"
    assert store.blocked_users("alice") == ["Bob"]
    assert block_rows(store) == [("Alice", "Bob")]
    assert store.unblock("alice", "bob") == "Bob"
    assert store.unblock("alice", "bob") is None


def test_blocked_users_are_sorted_as_list_users_is(any_store):
    names = ["charlie", "Bob", "alice", "_under", "Dave", "-dash", "0zero", "Zed", "zebra"]
    add_users(any_store, "owner", *names)
    for name in names:
        any_store.block("owner", name.upper())
    assert any_store.blocked_users("OWNER") == sorted(names, key=lambda n: (n.lower(), n))


def test_unknown_or_malformed_names_block_nothing(any_store):
    store = any_store
    add_users(store, "alice")
    assert store.block("alice", "nobody") is None
    assert store.block("nobody", "alice") is None        # no owner account: nothing to keep it on
    for bad in ("", "bad name", "x" * 33, "caf\u00e9"):
        assert store.block("alice", bad) is None
        assert store.block(bad, "alice") is None
        assert store.unblock("alice", bad) is None and store.unblock(bad, "alice") is None
        assert store.is_blocked("alice", bad) is False and store.is_blocked(bad, "alice") is False
        assert store.blocked_users(bad) == []
    assert store.blocked_users("nobody") == [] and not store.is_blocked("nobody", "alice")
    assert block_rows(store) == []


def test_the_block_list_has_a_limit(any_store, monkeypatch):
    assert MAX_BLOCKS == 1000
    monkeypatch.setattr(accounts_module, "MAX_BLOCKS", 3)   # read at each call, by both stores
    store = any_store
    add_users(store, "Alice", "u1", "u2", "u3", "u4", "other")
    for name in ("u1", "u2", "u3"):
        assert store.block("alice", name) == name
    with pytest.raises(TooManyBlocks) as info:
        store.block("ALICE", "u4")
    assert info.value.code == "too-many-blocks"
    assert str(info.value) == "'Alice' has blocked 3 users already, the most allowed"
    assert store.block("alice", "U2") == "u2"            # one already there is no new entry: no error
    assert store.blocked_users("alice") == ["u1", "u2", "u3"] and not store.is_blocked("alice", "u4")
    assert store.block("other", "u4") == "u4"            # the limit is per owner
    assert store.unblock("alice", "u1") == "u1"
    assert store.block("alice", "u4") == "u4"            # room again
    assert store.blocked_users("alice") == ["u2", "u3", "u4"]
    # The refusal left no transaction open: everything else still works.
    assert store.add_user("later", "pw") == "later" and store.delete_user("later")


def test_deleting_an_account_drops_its_blocks_both_ways(any_store):
    store = any_store
    add_users(store, "alice", "Bob", "carol")
    store.block("alice", "bob")
    store.block("alice", "carol")
    store.block("bob", "alice")
    store.block("bob", "carol")
    store.block("carol", "bob")
    assert store.delete_user("BOB") is True
    assert store.blocked_users("alice") == ["carol"] and store.blocked_users("carol") == []
    assert block_rows(store) == [("alice", "carol")]
    # Someone else takes the name: no blocks of the old Bob's, and blocked by nobody.
    assert store.add_user("bOb", "new") == "bOb"
    assert store.blocked_users("bob") == []
    assert not store.is_blocked("alice", "bob") and not store.is_blocked("carol", "BOB")
    assert store.block("bob", "alice") == "alice"
    assert block_rows(store) == [("alice", "carol"), ("bOb", "alice")]
    assert store.delete_user("alice") is True
    assert block_rows(store) == []
    assert store.delete_user("alice") is False and store.delete_user("bad name") is False


def test_blocks_are_shared_by_stores_on_one_database(any_store):
    add_users(any_store, "alice", "bob")
    with reopen(any_store) as other:
        assert other.block("ALICE", "BOB") == "bob"
        assert any_store.is_blocked("alice", "bob") and any_store.blocked_users("alice") == ["bob"]
        assert any_store.unblock("alice", "bob") == "bob"
        assert not other.is_blocked("alice", "bob")


def test_the_limit_holds_when_blocks_race(any_store, monkeypatch):
    monkeypatch.setattr(accounts_module, "MAX_BLOCKS", 3)
    count = 6
    add_users(any_store, "owner", *[f"u{i}" for i in range(count)])
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def block_one(i):
        store = reopen(any_store)   # one store per thread, as the server has
        try:
            barrier.wait(DEADLINE)
            results[i] = store.block("owner", f"u{i}")
        except Exception as exc:   # noqa: BLE001 - reported below
            results[i] = exc
        finally:
            store.close()

    threads = [threading.Thread(target=block_one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    blocked = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, TooManyBlocks)]
    assert len(blocked) == 3 and len(refused) == count - 3, results
    assert any_store.blocked_users("owner") == sorted(blocked)


# -- locks, on both stores -------------------------------------------------------------


def test_lock_unlock_and_list_the_locked(any_store):
    store = any_store
    add_users(store, "Alice", "bob", "Carol")
    assert store.locked_users() == {}
    assert store.lock_user("ALICE", "spam") == "Alice"      # the canonical spelling
    assert store.lock_user("carol") == "Carol"              # no reason: ""
    assert store.locked_users() == {"Alice": "spam", "Carol": ""}
    assert list(store.locked_users()) == ["Alice", "Carol"]   # in list_users order
    assert store.lock_user("alice", "spam, and worse") == "Alice"   # again: the reason is replaced
    assert store.locked_users() == {"Alice": "spam, and worse", "Carol": ""}
    assert store.lock_user("nobody", "x") is None and store.lock_user("bad name") is None
    assert store.unlock_user("bob") is None                 # not locked
    assert store.unlock_user("nobody") is None and store.unlock_user("bad name") is None
    assert store.unlock_user("CAROL") == "Carol"
    assert store.unlock_user("carol") is None               # not any more
    assert store.locked_users() == {"Alice": "spam, and worse"}
    assert store.verify("carol", "pw") == "Carol"           # its password works again
    # Still an account in every other way.
    assert [n for n, _ in store.list_users()] == ["Alice", "bob", "Carol"]
    assert store.exists("alice") and store.canonical_name("ALICE") == "Alice"
    assert store.block("bob", "alice") == "Alice" and store.block("alice", "bob") == "bob"


def test_a_locked_account_is_refused_only_with_the_right_password(any_store):
    store = any_store
    add_users(store, "Alice")
    store.lock_user("alice", "spam")
    assert store.verify("alice", "wrong") is None           # the lock is not revealed
    assert store.verify("alice", "") is None
    for variant in ("alice", "ALICE", "Alice"):
        with pytest.raises(AccountLocked) as info:
            store.verify(variant, "pw")
        assert info.value.code == "locked" and info.value.reason == "spam"
        assert str(info.value) == "this account is locked: spam"
    store.lock_user("alice")
    with pytest.raises(AccountLocked) as info:
        store.verify("alice", "pw")
    assert info.value.reason == "" and str(info.value) == "this account is locked"
    assert store.unlock_user("alice") == "Alice"
    assert store.verify("alice", "pw") == "Alice"


def test_a_locked_user_cannot_change_the_password_or_delete_the_account(any_store):
    store = any_store
    add_users(store, "Alice")
    store.lock_user("alice", "spam")
    assert store.change_password("alice", "wrong", "new pw") is None
    with pytest.raises(AccountLocked):
        store.change_password("alice", "pw", "new pw")
    assert store.delete_account("alice", "wrong") is None
    with pytest.raises(AccountLocked):
        store.delete_account("ALICE", "pw")
    assert store.exists("alice")
    store.unlock_user("alice")
    assert store.verify("alice", "pw") == "Alice"           # the password was not changed
    assert store.verify("alice", "new pw") is None


def test_a_locked_name_stays_taken_until_the_operator_deletes_it(any_store):
    store = any_store
    add_users(store, "Alice", "bob")
    store.block("bob", "alice")
    store.lock_user("alice", "spam")
    for variant in ("alice", "ALICE"):
        with pytest.raises(UserExists, match="'Alice'"):
            store.add_user(variant, "other")
    assert store.set_password("alice", "reset") is True     # an operator's reset keeps the lock
    with pytest.raises(AccountLocked):
        store.verify("alice", "reset")
    assert store.delete_user("ALICE") is True               # as any other account
    assert not store.exists("alice") and store.locked_users() == {}
    assert store.blocked_users("bob") == []
    assert store.add_user("alice", "new") == "alice"        # free again, and not locked
    assert store.verify("alice", "new") == "alice" and store.locked_users() == {}


def test_locks_are_shared_by_stores_on_one_database(any_store):
    add_users(any_store, "alice")
    with reopen(any_store) as other:
        assert other.lock_user("ALICE", "spam") == "alice"
        assert any_store.locked_users() == {"alice": "spam"}
        with pytest.raises(AccountLocked):
            any_store.verify("alice", "pw")
        assert any_store.unlock_user("alice") == "alice"
        assert other.verify("alice", "pw") == "alice"


# -- block lists: what only PostgreSQL has ----------------------------------------------


def test_two_accounts_blocking_each_other_at_once_do_not_deadlock(pg_store):
    add_users(pg_store, "alice", "bob")
    rounds = 25
    barrier = threading.Barrier(2)
    errors: list = []

    def churn(owner, other):
        store = reopen(pg_store)
        try:
            barrier.wait(DEADLINE)
            for _ in range(rounds):
                assert store.block(owner, other) == other
                assert store.unblock(owner, other) == other
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=churn, args=pair) for pair in (("alice", "bob"), ("bob", "alice"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert errors == []
    assert block_rows(pg_store) == []


def test_a_version_1_database_is_upgraded(pg):
    import psycopg

    url = pg.create_schema()
    # The tables as selchat with schema version 1 made them, with an account in them.
    def columns():
        with psycopg.connect(url) as conn:
            return [n for (n,) in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'selchat_users' ORDER BY ordinal_position"
            )]

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""CREATE TABLE selchat_users (
            name    text        NOT NULL,
            pwhash  text        NOT NULL,
            created timestamptz NOT NULL DEFAULT now()
        )""")
        conn.execute("CREATE UNIQUE INDEX selchat_users_name ON selchat_users (lower(name))")
        conn.execute("CREATE TABLE selchat_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO selchat_schema (version) VALUES (1)")
        conn.execute("INSERT INTO selchat_users (name, pwhash) VALUES ('Alice', %s)",
                     (hash_password("old pw", CHEAP_N),))
    assert columns() == ["name", "pwhash", "created"]
    with open_store(url, scrypt_n=CHEAP_N) as store:
        assert store.locked_users() == {}                       # the old accounts are not locked
        assert store.verify("alice", "old pw") == "Alice"
        store.add_user("bob", "pw")
        assert store.block("alice", "BOB") == "bob"
        assert store.blocked_users("ALICE") == ["bob"]
        assert store.lock_user("BOB", "spam") == "bob"
    assert columns() == ["name", "pwhash", "created", "locked"]
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM selchat_schema").fetchall() == [(2,)]
        assert conn.execute("SELECT name, locked FROM selchat_users ORDER BY name").fetchall() == [
            ("Alice", None), ("bob", "spam")]
        with pytest.raises(psycopg.errors.UniqueViolation):   # one entry per pair, in any case
            conn.execute("INSERT INTO selchat_blocks (owner, blocked) VALUES ('ALICE', 'Bob')")
    with open_store(url, scrypt_n=CHEAP_N) as store:            # opened again: nothing to do
        assert store.is_blocked("alice", "bob") and store.verify("Alice", "old pw") == "Alice"
        assert store.locked_users() == {"bob": "spam"}
        with pytest.raises(AccountLocked):
            store.verify("bob", "pw")


def test_a_new_database_has_the_lock_column(pg):
    import psycopg

    url = pg.create_schema()
    open_store(url).close()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'selchat_users' AND column_name = 'locked'"
        ).fetchall()
    assert rows == [("text", "YES")]


def test_a_block_waits_for_the_owners_block_in_flight(pg_store, monkeypatch):
    # One block() is stopped after its count, before its insert; a second by the
    # same owner must wait for it, then count its row too: the limit holds.
    import psycopg

    monkeypatch.setattr(accounts_module, "MAX_BLOCKS", 3)
    add_users(pg_store, "owner", "u1", "u2", "u3", "u4")
    pg_store.block("owner", "u1")
    pg_store.block("owner", "u2")
    first, second = reopen(pg_store), reopen(pg_store)
    at_insert, go_on = threading.Event(), threading.Event()

    class PausingConnection:
        def __init__(self, conn):
            self._conn = conn

        def __getattr__(self, name):
            return getattr(self._conn, name)

        def execute(self, query, *args, **kwargs):
            if query.startswith("INSERT INTO selchat_blocks"):
                at_insert.set()
                assert go_on.wait(DEADLINE)
            return self._conn.execute(query, *args, **kwargs)

    first._conn = PausingConnection(first._conn)
    results: dict = {}

    def run(key, store, other):
        try:
            results[key] = store.block("owner", other)
        except Exception as exc:   # noqa: BLE001 - reported below
            results[key] = exc

    one = threading.Thread(target=run, args=("first", first, "u3"))
    one.start()
    assert at_insert.wait(DEADLINE)
    pid = second._conn.info.backend_pid
    two = threading.Thread(target=run, args=("second", second, "u4"))
    two.start()
    # Until the second waits on a lock (or, were there none, has finished).
    with psycopg.connect(pg_store.url, autocommit=True) as watch:
        deadline = time.monotonic() + DEADLINE
        while two.is_alive() and time.monotonic() < deadline:
            (waiting,) = watch.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity "
                                       "WHERE pid = %s", (pid,)).fetchone()
            if waiting:
                break
            time.sleep(0.01)   # polling interval; the condition ends the wait
    go_on.set()
    one.join(DEADLINE)
    two.join(DEADLINE)
    first._conn = first._conn._conn
    first.close()
    second.close()
    assert results["first"] == "u3"
    assert isinstance(results["second"], TooManyBlocks), results
    assert pg_store.blocked_users("owner") == ["u1", "u2", "u3"]
