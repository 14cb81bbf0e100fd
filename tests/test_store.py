"""Tests for the account store (selchat.store.accounts / selchat.store.passwords)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest

from selchat.store import passwords
from selchat.store.accounts import (
    DEFAULT_DB_PATH,
    LOCK_REASON_MAX,
    SCHEMA_VERSION,
    USERNAME_MAX,
    AccountLocked,
    AccountStore,
    InvalidPassword,
    InvalidReason,
    InvalidUsername,
    StorageUnavailable,
    StoreError,
    UserExists,
    check_password,
    check_username,
)
from selchat.store.passwords import (
    DEFAULT_SCRYPT_N,
    MAX_PASSWORD_BYTES,
    dummy_verify,
    hash_password,
    verify_password,
)

CHEAP_N = 2**4
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "accounts.db")


@pytest.fixture
def store(db_path: str):
    s = AccountStore(db_path, scrypt_n=CHEAP_N)
    yield s
    s.close()


# -- constants and error types ------------------------------------------------


def test_constants():
    assert MAX_PASSWORD_BYTES == 1024
    assert DEFAULT_SCRYPT_N == 2**14
    assert USERNAME_MAX == 32
    assert DEFAULT_DB_PATH == "selchat.db"


def test_error_codes_and_messages():
    assert InvalidUsername.code == "bad-username"
    assert InvalidPassword.code == "bad-password"
    assert UserExists.code == "taken"
    assert StorageUnavailable.code == "storage"
    for cls in (InvalidUsername, InvalidPassword, UserExists, StorageUnavailable):
        assert issubclass(cls, StoreError)
        err = cls("something human")
        assert str(err) == "something human"
        assert err.code == cls.code


def test_account_locked_carries_its_reason():
    assert issubclass(AccountLocked, StoreError) and issubclass(InvalidReason, StoreError)
    assert AccountLocked.code == "locked" and InvalidReason.code == "bad-reason"
    plain = AccountLocked("")
    assert str(plain) == "this account is locked" and plain.reason == "" and plain.code == "locked"
    why = AccountLocked("spam, again")
    assert str(why) == "this account is locked: spam, again" and why.reason == "spam, again"


def test_lock_reasons_must_be_one_short_printable_line(store):
    store.add_user("alice", "pw")
    assert LOCK_REASON_MAX == 200
    assert store.lock_user("alice", "x" * LOCK_REASON_MAX) == "alice"
    assert store.lock_user("alice", "caf\u00e9 \U0001F6AB spam") == "alice"
    for bad in ("x" * (LOCK_REASON_MAX + 1), "two\nlines", "cr\r", "tab\there", "nul\x00", "a\udc80b", None):
        with pytest.raises(InvalidReason) as info:
            store.lock_user("alice", bad)
        assert info.value.code == "bad-reason"
    assert store.locked_users() == {"alice": "caf\u00e9 \U0001F6AB spam"}   # the refusals changed nothing


# -- username rules ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "Z", "0", "_", "-", "alice", "Bob_the-3rd", "x" * 32, "A-Z_a-z_0-9"],
)
def test_good_usernames(name):
    check_username(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 33,
        "has space",
        " alice",
        "alice ",
        "tab\there",
        "new\nline",
        "alice\n",  # `$` in a naive regex would accept this
        "nul\x00",
        "dot.name",
        "at@host",
        "ünïcödé",
        "ｆｕｌｌｗｉｄｔｈ",  # fullwidth letters: str.isalnum() is True
        "٣",  # Arabic-Indic digit: \d would match
        "café",
        "emoji🙂",
        "slash/",
        "quote'",
    ],
)
def test_bad_usernames(name):
    with pytest.raises(InvalidUsername) as info:
        check_username(name)
    assert info.value.code == "bad-username"
    assert str(info.value)


def test_username_length_messages():
    with pytest.raises(InvalidUsername, match="empty"):
        check_username("")
    with pytest.raises(InvalidUsername, match="32"):
        check_username("x" * 33)


def test_username_not_str():
    with pytest.raises(InvalidUsername):
        check_username(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidUsername):
        check_username(b"alice")  # type: ignore[arg-type]


def test_add_user_validates_name(store):
    with pytest.raises(InvalidUsername):
        store.add_user("x" * 33, "pw")
    assert store.add_user("x" * 32, "pw") == "x" * 32
    with pytest.raises(InvalidUsername):
        store.add_user("bad name", "pw")
    assert [n for n, _ in store.list_users()] == ["x" * 32]


# -- password rules ----------------------------------------------------------


def test_password_length_limits():
    check_password("p")
    check_password("x" * MAX_PASSWORD_BYTES)
    with pytest.raises(InvalidPassword, match="1024"):
        check_password("x" * (MAX_PASSWORD_BYTES + 1))
    with pytest.raises(InvalidPassword, match="empty"):
        check_password("")


def test_password_length_counts_utf8_bytes():
    # "é" is 2 bytes, "€" 3 bytes, "🙂" 4 bytes in UTF-8.
    check_password("é" * 512)  # 1024 bytes
    with pytest.raises(InvalidPassword):
        check_password("é" * 512 + "x")  # 1025 bytes, 513 characters
    check_password("🙂" * 256)  # 1024 bytes
    with pytest.raises(InvalidPassword):
        check_password("€" * 342)  # 1026 bytes, only 342 characters
    check_password("x" + "€" * 341)  # 1024 bytes


@pytest.mark.parametrize("bad", ["a\x00b", "a\rb", "a\nb", "\n", "pw\r\n", "\x00"])
def test_password_forbidden_characters(bad):
    with pytest.raises(InvalidPassword) as info:
        check_password(bad)
    assert info.value.code == "bad-password"


def test_password_lone_surrogate_refused():
    with pytest.raises(InvalidPassword):
        check_password("a\udc80b")


def test_add_user_validates_password(store):
    with pytest.raises(InvalidPassword):
        store.add_user("alice", "x" * (MAX_PASSWORD_BYTES + 1))
    with pytest.raises(InvalidPassword):
        store.add_user("alice", "line\nbreak")
    with pytest.raises(InvalidPassword):
        store.add_user("alice", "")
    assert not store.exists("alice")
    store.add_user("alice", "x" * MAX_PASSWORD_BYTES)
    assert store.verify("alice", "x" * MAX_PASSWORD_BYTES) == "alice"
    assert store.verify("alice", "x" * (MAX_PASSWORD_BYTES + 1)) is None


def test_unicode_password_roundtrip(store):
    store.add_user("alice", "pässwörd 🙂 with spaces\tand tab")
    assert store.verify("alice", "pässwörd 🙂 with spaces\tand tab") == "alice"
    # NFC vs NFD are different byte strings: no normalisation is applied.
    assert store.verify("alice", "pa\u0308sswörd 🙂 with spaces\tand tab") is None


# -- hashing -----------------------------------------------------------------


def test_hash_format_carries_params():
    encoded = hash_password("secret", n=CHEAP_N)
    scheme, n, r, p, salt_hex, hash_hex = encoded.split("$")
    assert scheme == "scrypt"
    assert (int(n), int(r), int(p)) == (CHEAP_N, 8, 1)
    assert len(bytes.fromhex(salt_hex)) == 16
    assert len(bytes.fromhex(hash_hex)) == 32
    assert verify_password("secret", encoded)
    assert not verify_password("Secret", encoded)
    assert not verify_password("secret ", encoded)


def test_default_params_in_encoding():
    encoded = hash_password("secret")  # default cost; one real-size hash
    assert encoded.split("$")[1:4] == [str(2**14), "8", "1"]
    assert verify_password("secret", encoded)


def test_distinct_salts_for_same_password():
    a = hash_password("same", n=CHEAP_N)
    b = hash_password("same", n=CHEAP_N)
    assert a != b
    assert a.split("$")[4] != b.split("$")[4]
    assert verify_password("same", a) and verify_password("same", b)


def test_distinct_salts_in_store(store):
    store.add_user("alice", "same")
    store.add_user("bob", "same")
    rows = dict(store._conn.execute("SELECT name, pwhash FROM users").fetchall())
    assert rows["alice"] != rows["bob"]
    assert rows["alice"].split("$")[4] != rows["bob"].split("$")[4]


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "garbage",
        "bcrypt$16$8$1$00$00",
        "scrypt$16$8$1$zz$00",
        "scrypt$15$8$1$00$00",  # n not a power of two
        "scrypt$-16$8$1$00$00",
        "scrypt$16$8$1$$00",  # empty salt
        "scrypt$16$8$1$00$",  # empty hash
        "scrypt$16$8$1$00",  # missing field
    ],
)
def test_verify_password_malformed_is_false(encoded):
    assert verify_password("pw", encoded) is False


def test_old_params_verify_after_store_n_changes(db_path):
    with AccountStore(db_path, scrypt_n=2**4) as s:
        s.add_user("old", "pw-old")
    with AccountStore(db_path, scrypt_n=2**5) as s:
        s.add_user("new", "pw-new")
        assert s.verify("old", "pw-old") == "old"
        assert s.verify("new", "pw-new") == "new"
        assert s.verify("old", "pw-new") is None
        hashes = dict(s._conn.execute("SELECT name, pwhash FROM users"))
    assert hashes["old"].split("$")[1] == str(2**4)
    assert hashes["new"].split("$")[1] == str(2**5)


@pytest.fixture
def scrypt_calls(monkeypatch) -> list:
    """The cost (n) of every scrypt hash computed from now on, in order."""
    calls = []
    real = passwords.hashlib.scrypt

    def spy(*args, **kwargs):
        calls.append(kwargs["n"])
        return real(*args, **kwargs)

    monkeypatch.setattr(passwords.hashlib, "scrypt", spy)
    return calls


def test_dummy_verify_spends_a_hash(scrypt_calls):
    calls = scrypt_calls
    assert dummy_verify("whatever", n=CHEAP_N) is None
    dummy_verify("x" * 5000, n=CHEAP_N)  # oversize input is fine
    dummy_verify("a\udc80", n=CHEAP_N)  # so is a lone surrogate
    assert calls == [CHEAP_N] * 3


def test_verify_spends_one_hash_on_every_path(store, scrypt_calls):
    store.add_user("alice", "right")
    calls = scrypt_calls
    cases = [
        ("alice", "right"),  # success
        ("alice", "wrong"),  # wrong password
        ("nobody", "right"),  # unknown user
        ("bad name", "right"),  # malformed name
        ("alice", "bad\npassword"),  # malformed password
        ("alice", ""),  # empty password
        ("alice", "x" * 2000),  # oversize password
    ]
    for name, pw in cases:
        calls.clear()
        store.verify(name, pw)
        assert calls == [CHEAP_N], (name, pw)


# -- store behaviour ---------------------------------------------------------


def test_add_and_verify(store):
    assert store.add_user("alice", "s3cret") == "alice"
    assert store.verify("alice", "s3cret") == "alice"
    assert store.exists("alice")


def test_wrong_password_and_unknown_user_are_none(store):
    store.add_user("alice", "s3cret")
    assert store.verify("alice", "wrong") is None
    assert store.verify("alice", "S3CRET") is None  # passwords are case-sensitive
    assert store.verify("mallory", "s3cret") is None
    assert store.verify("", "s3cret") is None
    assert store.verify("bad name", "s3cret") is None
    assert store.verify("alice", "s3cret\n") is None
    assert store.verify("alice", "") is None


def test_case_insensitive_uniqueness_and_canonical_spelling(store):
    assert store.add_user("Alice", "pw") == "Alice"
    for variant in ("alice", "ALICE", "aLiCe", "Alice"):
        with pytest.raises(UserExists) as info:
            store.add_user(variant, "other")
        assert info.value.code == "taken"
        assert "Alice" in str(info.value)
        assert store.verify(variant, "pw") == "Alice"
        assert store.exists(variant)
    assert store.verify("alice", "other") is None
    assert store.list_users()[0][0] == "Alice"
    assert len(store.list_users()) == 1


def test_unique_index_catches_race(store, db_path):
    # Another store registers the name between our existence check and insert.
    other = AccountStore(db_path, scrypt_n=CHEAP_N)
    try:
        real_lookup = store._lookup
        state = {"first": True}

        def racing_lookup(name):
            if state["first"]:
                state["first"] = False
                other.add_user("RACER", "theirs")
                return None
            return real_lookup(name)

        store._lookup = racing_lookup
        with pytest.raises(UserExists, match="RACER"):
            store.add_user("racer", "mine")
    finally:
        other.close()
    del store._lookup
    assert store.verify("racer", "theirs") == "RACER"


def test_delete_user(store):
    store.add_user("Alice", "pw")
    store.add_user("bob", "pw")
    assert store.delete_user("ALICE") is True
    assert store.delete_user("alice") is False
    assert store.delete_user("nobody") is False
    assert store.delete_user("bad name") is False
    assert not store.exists("Alice")
    assert store.verify("Alice", "pw") is None
    assert [n for n, _ in store.list_users()] == ["bob"]
    # The name is free again, in any spelling.
    assert store.add_user("aLiCe", "new") == "aLiCe"
    assert store.verify("alice", "new") == "aLiCe"


def test_list_users_sorted_case_insensitively_with_utc_timestamps(store):
    for name in ("charlie", "Bob", "alice", "_under", "Dave", "-dash", "0zero"):
        store.add_user(name, "pw")
    users = store.list_users()
    names = [n for n, _ in users]
    assert names == sorted(names, key=str.lower)
    assert set(names) == {"charlie", "Bob", "alice", "_under", "Dave", "-dash", "0zero"}
    assert names.index("alice") < names.index("Bob") < names.index("charlie")
    assert names.index("charlie") < names.index("Dave")
    now = datetime.now(timezone.utc)
    for _, created in users:
        ts = datetime.fromisoformat(created)
        assert ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0
        assert abs((now - ts).total_seconds()) < 60


def test_list_users_empty(store):
    assert store.list_users() == []


def test_exists_on_bad_names(store):
    assert store.exists("nobody") is False
    assert store.exists("") is False
    assert store.exists("x" * 33) is False
    assert store.exists("with space") is False


def test_memory_store():
    with AccountStore(":memory:", scrypt_n=CHEAP_N) as s:
        s.add_user("alice", "pw")
        assert s.verify("ALICE", "pw") == "alice"


def test_close_is_idempotent_and_final(db_path):
    s = AccountStore(db_path, scrypt_n=CHEAP_N)
    s.close()
    s.close()
    with pytest.raises(StorageUnavailable):
        s.add_user("alice", "pw")


# -- SQLite settings and durability ------------------------------------------


def test_wal_sync_busy_timeout_and_schema_version(store, db_path):
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    # WAL is a persistent property of the file: a plain connection sees it.
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_newer_schema_version_is_refused(db_path):
    AccountStore(db_path, scrypt_n=CHEAP_N).close()
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA user_version = 999")
    raw.commit()
    raw.close()
    with pytest.raises(StorageUnavailable, match="schema"):
        AccountStore(db_path, scrypt_n=CHEAP_N)


def test_not_a_database_is_storage_unavailable(tmp_path):
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(StorageUnavailable):
        AccountStore(str(bogus), scrypt_n=CHEAP_N)


def test_persistence_across_reopen(db_path):
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        s.add_user("Alice", "pw1")
        s.add_user("bob", "pw2")
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        assert s.verify("alice", "pw1") == "Alice"
        assert s.verify("BOB", "pw2") == "bob"
        assert [n for n, _ in s.list_users()] == ["Alice", "bob"]
        assert s.delete_user("bob")
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        assert [n for n, _ in s.list_users()] == ["Alice"]


def test_two_open_stores_see_each_other(db_path):
    a = AccountStore(db_path, scrypt_n=CHEAP_N)
    b = AccountStore(db_path, scrypt_n=CHEAP_N)
    try:
        a.add_user("alice", "pw")
        assert b.verify("ALICE", "pw") == "alice"
        with pytest.raises(UserExists):
            b.add_user("Alice", "pw")
    finally:
        a.close()
        b.close()


def test_registration_survives_sigkill(db_path):
    child = textwrap.dedent(
        """
        import sys, time
        from selchat.store.accounts import AccountStore
        store = AccountStore(sys.argv[1], scrypt_n=16)
        store.add_user("Survivor", "pw")
        print("ok", flush=True)
        time.sleep(60)  # stay alive, holding the store open, until the test kills us
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", child, db_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ok", proc.stderr.read() if not line else line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # The connection was never closed, so the row may still live only in the WAL.
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        assert s.verify("survivor", "pw") == "Survivor"
        assert [n for n, _ in s.list_users()] == ["Survivor"]


# -- storage failures --------------------------------------------------------


def test_query_only_connection_refuses_writes_but_verifies(store):
    store.add_user("alice", "pw")
    store._conn.execute("PRAGMA query_only = ON")
    with pytest.raises(StorageUnavailable) as info:
        store.add_user("bob", "pw")
    assert info.value.code == "storage"
    assert isinstance(info.value.__cause__, sqlite3.Error)
    with pytest.raises(StorageUnavailable):
        store.delete_user("alice")
    assert store.verify("alice", "pw") == "alice"
    assert store.verify("alice", "nope") is None
    assert not store.exists("bob")
    assert [n for n, _ in store.list_users()] == ["alice"]


def test_read_only_uri_refuses_writes_but_verifies(db_path):
    # mode=ro is enforced by SQLite itself, so this fails even when run as root.
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        s.add_user("Alice", "pw")
    ro = AccountStore(f"file:{db_path}?mode=ro", scrypt_n=CHEAP_N)
    try:
        with pytest.raises(StorageUnavailable, match="readonly"):
            ro.add_user("bob", "pw")
        with pytest.raises(StorageUnavailable):
            ro.delete_user("alice")
        assert ro.verify("alice", "pw") == "Alice"
        assert ro.exists("ALICE")
    finally:
        ro.close()
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        assert [n for n, _ in s.list_users()] == ["Alice"]


def test_locked_database_is_storage_unavailable(db_path, monkeypatch):
    import selchat.store.accounts as accounts

    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        s.add_user("alice", "pw")
    monkeypatch.setattr(accounts, "BUSY_TIMEOUT_MS", 50)
    store = AccountStore(db_path, scrypt_n=CHEAP_N)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # hold the write lock
        with pytest.raises(StorageUnavailable, match="locked"):
            store.add_user("bob", "pw")
        # WAL readers are not blocked by a writer.
        assert store.verify("alice", "pw") == "alice"
        holder.execute("ROLLBACK")
        assert store.add_user("bob", "pw") == "bob"
    finally:
        holder.close()
        store.close()


def test_store_is_bound_to_its_thread(store):
    import threading

    errors = []

    def other():
        try:
            store.exists("alice")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1
    assert isinstance(errors[0], sqlite3.ProgrammingError)


# -- block lists: what only SQLite has (the rest: test_store_postgres.py, on both) ----


def make_version_1_database(path: str) -> None:
    """A file as selchat with schema version 1 made it, with the account Alice ("old pw")."""
    raw = sqlite3.connect(path)
    try:
        raw.execute(
            """CREATE TABLE users (
                name    TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
                pwhash  TEXT NOT NULL,
                created TEXT NOT NULL
            )"""
        )
        raw.execute(
            "INSERT INTO users (name, pwhash, created) VALUES (?, ?, ?)",
            ("Alice", hash_password("old pw", CHEAP_N), "2024-01-02T03:04:05+00:00"),
        )
        raw.execute("PRAGMA user_version = 1")
        raw.commit()
    finally:
        raw.close()


def user_columns(path: str) -> list[str]:
    raw = sqlite3.connect(path)
    try:
        return [row[1] for row in raw.execute("PRAGMA table_info(users)")]
    finally:
        raw.close()


def tables(path: str) -> set[str]:
    raw = sqlite3.connect(path)
    try:
        return {n for (n,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        raw.close()


def test_a_new_database_has_the_block_table_at_version_2(db_path):
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        assert s._conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert tables(db_path) == {"users", "blocks"}
    assert user_columns(db_path) == ["name", "pwhash", "created", "locked"]


def test_a_version_1_database_is_upgraded(db_path):
    make_version_1_database(db_path)
    assert tables(db_path) == {"users"}
    assert user_columns(db_path) == ["name", "pwhash", "created"]
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        assert s._conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert s._conn.execute("SELECT name, locked FROM users").fetchall() == [("Alice", None)]
        assert s.locked_users() == {}                       # the old accounts are not locked
        assert s.verify("alice", "old pw") == "Alice"
        assert s.list_users() == [("Alice", "2024-01-02T03:04:05+00:00")]
        s.add_user("bob", "pw")
        assert s.block("ALICE", "BOB") == "bob"
        assert s.blocked_users("alice") == ["bob"] and s.is_blocked("alice", "Bob")
        assert s.lock_user("BOB", "spam") == "bob"
    assert tables(db_path) == {"users", "blocks"}
    assert user_columns(db_path) == ["name", "pwhash", "created", "locked"]
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:     # opened again: nothing to do
        assert s.verify("Alice", "old pw") == "Alice"
        assert s.blocked_users("alice") == ["bob"]
        assert s.unblock("alice", "bob") == "bob"
        assert s.locked_users() == {"bob": "spam"}
        with pytest.raises(AccountLocked):
            s.verify("bob", "pw")


def test_an_upgrade_that_fails_leaves_version_1(db_path, monkeypatch):
    import selchat.store.accounts as accounts

    make_version_1_database(db_path)
    monkeypatch.setattr(accounts, "_SCHEMA_BLOCKS", accounts._SCHEMA_BLOCKS + ("NOT SQL",))
    with pytest.raises(StorageUnavailable):
        AccountStore(db_path, scrypt_n=CHEAP_N)
    assert tables(db_path) == {"users"}                  # all or nothing
    assert user_columns(db_path) == ["name", "pwhash", "created"]
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        raw.close()
    monkeypatch.undo()
    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        assert s.verify("alice", "old pw") == "Alice" and s.block("alice", "alice") == "Alice"
        assert s.lock_user("alice") == "Alice"


def test_an_upgrade_whose_lock_column_fails_leaves_version_1(db_path, monkeypatch):
    import selchat.store.accounts as accounts

    make_version_1_database(db_path)
    monkeypatch.setattr(accounts, "_SCHEMA_LOCKS", accounts._SCHEMA_LOCKS + ("NOT SQL",))
    with pytest.raises(StorageUnavailable):
        AccountStore(db_path, scrypt_n=CHEAP_N)
    assert tables(db_path) == {"users"}                  # the blocks table went too
    assert user_columns(db_path) == ["name", "pwhash", "created"]


def test_verify_spends_one_hash_on_a_locked_account(store, scrypt_calls):
    store.add_user("alice", "right")
    store.lock_user("alice", "spam")
    calls = scrypt_calls
    calls.clear()  # the hash add_user made
    assert store.verify("alice", "wrong") is None
    assert calls == [CHEAP_N]
    calls.clear()
    with pytest.raises(AccountLocked):
        store.verify("alice", "right")
    assert calls == [CHEAP_N]


def test_lock_writes_fail_cleanly_on_a_read_only_connection(store):
    store.add_user("alice", "pw")
    store.add_user("bob", "pw")
    store.lock_user("bob", "spam")
    store._conn.execute("PRAGMA query_only = ON")
    for call in (lambda: store.lock_user("alice"), lambda: store.unlock_user("bob")):
        with pytest.raises(StorageUnavailable) as info:
            call()
        assert isinstance(info.value.__cause__, sqlite3.Error)
        assert not store._conn.in_transaction              # rolled back, not left open
    assert store.locked_users() == {"bob": "spam"}         # reads go on
    store._conn.execute("PRAGMA query_only = OFF")
    assert store.unlock_user("bob") == "bob"


def test_a_version_1_file_opened_read_only_is_storage_unavailable(db_path):
    make_version_1_database(db_path)
    with pytest.raises(StorageUnavailable):
        AccountStore(f"file:{db_path}?mode=ro", scrypt_n=CHEAP_N)


def test_block_writes_fail_cleanly_on_a_read_only_connection(store):
    store.add_user("alice", "pw")
    store.add_user("bob", "pw")
    store.block("alice", "bob")
    store._conn.execute("PRAGMA query_only = ON")
    for call in (lambda: store.block("alice", "alice"), lambda: store.unblock("alice", "bob"),
                 lambda: store.delete_user("bob")):
        with pytest.raises(StorageUnavailable) as info:
            call()
        assert isinstance(info.value.__cause__, sqlite3.Error)
        assert not store._conn.in_transaction              # rolled back, not left open
    assert store.blocked_users("alice") == ["bob"] and store.is_blocked("alice", "bob")
    store._conn.execute("PRAGMA query_only = OFF")
    assert store.unblock("alice", "bob") == "bob"


def test_a_held_write_lock_makes_block_storage_unavailable(db_path, monkeypatch):
    import selchat.store.accounts as accounts

    with AccountStore(db_path, scrypt_n=CHEAP_N) as s:
        s.add_user("alice", "pw")
        s.add_user("bob", "pw")
    monkeypatch.setattr(accounts, "BUSY_TIMEOUT_MS", 50)
    store = AccountStore(db_path, scrypt_n=CHEAP_N)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageUnavailable, match="locked"):
            store.block("alice", "bob")
        assert not store.is_blocked("alice", "bob")       # reads go on
        holder.execute("ROLLBACK")
        assert store.block("alice", "bob") == "bob"
    finally:
        holder.close()
        store.close()


def test_the_reactor_wrapper_runs_block_calls_on_a_worker(db_path):
    import concurrent.futures
    import threading

    from selchat.server.accounts import Accounts

    class Reactor:
        """run_in_thread as the loop's: func on a worker, done(future) after."""

        def __init__(self):
            self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

        def run_in_thread(self, func, *args, done):
            self.pool.submit(func, *args).add_done_callback(done)

    reactor = Reactor()
    accounts = Accounts(reactor, db_path, scrypt_n=CHEAP_N)

    def call(method, *args):
        finished = threading.Event()
        futures = []

        def done(future):
            futures.append(future)
            finished.set()

        method(*args, done)
        assert finished.wait(10)
        return futures[0].result()

    try:
        call(accounts.register, "Alice", "pw")
        call(accounts.register, "bob", "pw")
        assert call(accounts.block, "alice", "BOB") == "bob"
        assert call(accounts.block, "alice", "nobody") is None
        assert call(accounts.is_blocked, "ALICE", "bob") is True
        assert call(accounts.blocked_users, "alice") == ["bob"]
        assert call(accounts.unblock, "alice", "Bob") == "bob"
        assert call(accounts.is_blocked, "alice", "bob") is False
        assert call(accounts.blocked_users, "alice") == []
    finally:
        reactor.pool.shutdown(wait=True)
        accounts.close()
