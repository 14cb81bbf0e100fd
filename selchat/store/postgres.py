"""The account store in PostgreSQL: the same accounts as :mod:`selchat.store.accounts`, shared.

``selchat serve --db postgresql://user:password@host/dbname`` keeps the
accounts here, so several servers (and ``selchat user``) share them. The
rules are those of the SQLite store: names are 1-32 characters of
``[A-Za-z0-9_-]``, kept as first registered and unique regardless of case
(a unique index on ``lower(name)``); passwords are scrypt hashes made by
:mod:`selchat.store.passwords`, always computed in the calling thread and
never inside a transaction. Block lists are rows of ``selchat_blocks``
(owner, blocked), unique regardless of case, as in SQLite's ``blocks``. A
locked account has its reason in ``selchat_users.locked`` (NULL: not locked).

The driver is psycopg 3 (``pip install 'selchat[postgres]'``), imported only
when a store is opened, so a server without it runs on SQLite as before.

Each store owns one connection, in autocommit mode: every statement is its
own short transaction, so a committed registration is visible to every other
store at once. The server opens one store per worker thread. A connection
found broken (the server restarted, the network dropped it) is let go:
the call that found it raises :class:`StorageUnavailable`, unless it was a
read that a fresh connection could answer at once, and the next call
connects again.
"""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from selchat.store import is_postgres_url  # noqa: F401  (re-exported)
from selchat.store.accounts import (
    LookupMethods,
    StorageUnavailable,
    StoreError,
    TooManyBlocks,
    UserExists,
    check_password,
    check_username,
)
from selchat.store.passwords import (
    DEFAULT_SCRYPT_N,
    hash_password,
)

__all__ = [
    "SCHEMA_VERSION",
    "CONNECT_TIMEOUT",
    "INSTALL_HINT",
    "is_postgres_url",
    "redact_url",
    "PostgresAccountStore",
]

#: 1: selchat_users. 2: selchat_blocks, and selchat_users.locked.
SCHEMA_VERSION = 2
#: Seconds to wait for a connection, unless the URL sets ``connect_timeout``.
CONNECT_TIMEOUT = 5
INSTALL_HINT = "pip install 'selchat[postgres]'"

# Any constant will do: it only has to be the same in every selchat process,
# so two that start at once do not both create (or upgrade) the tables.
_SCHEMA_LOCK = 0x5E1C4A7
# Version 1: the accounts.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS selchat_users (
        name    text        NOT NULL,
        pwhash  text        NOT NULL,
        created timestamptz NOT NULL DEFAULT now()
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS selchat_users_name ON selchat_users (lower(name))",
    "CREATE TABLE IF NOT EXISTS selchat_schema (version integer NOT NULL)",
)
# Version 2: block lists. ``owner`` has blocked ``blocked``; both canonical.
_SCHEMA_BLOCKS = (
    """CREATE TABLE IF NOT EXISTS selchat_blocks (
        owner   text        NOT NULL,
        blocked text        NOT NULL,
        created timestamptz NOT NULL DEFAULT now()
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS selchat_blocks_pair ON selchat_blocks (lower(owner), lower(blocked))",
    # delete_user finds the rows that name an account as the one blocked.
    "CREATE INDEX IF NOT EXISTS selchat_blocks_blocked ON selchat_blocks (lower(blocked))",
)
# Version 2 too: account locks. NULL: not locked; else the reason, perhaps "".
_SCHEMA_LOCKS = ("ALTER TABLE selchat_users ADD COLUMN IF NOT EXISTS locked text",)


def _url_secrets(url: str) -> list[str]:
    """The password(s) in *url*, as written and percent-decoded, longest first."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        raw = parts.netloc.rpartition("@")[0]
        if ":" in raw:
            found.add(raw.split(":", 1)[1])
        for piece in parts.query.split("&"):  # as written; decoded below
            if piece.startswith("password="):
                found.add(piece[len("password="):])
    except ValueError:
        pass
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


def redact_url(url: str) -> str:
    """*url* with its password (in the user part or a ``password=`` parameter) shown as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(a URL that does not parse)"
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}@{hostinfo}" if at else hostinfo
    query = "&".join(
        "password=***" if piece.startswith("password=") else piece
        for piece in parts.query.split("&")
    ) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
        quoted = quote(secret, safe="")
        if quoted != secret:
            text = text.replace(quoted, "***")
    return text


def _import_psycopg():
    try:
        import psycopg
        import psycopg.conninfo
        import psycopg.errors
    except ImportError as exc:
        err = StorageUnavailable(
            f"PostgreSQL accounts need psycopg 3, which is not installed: {INSTALL_HINT}"
        )
        err.__cause__ = exc
        raise err from exc
    return psycopg


def _iso_utc(when: datetime) -> str:
    # As the SQLite store writes it: "+00:00", to the second.
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


class PostgresAccountStore(LookupMethods):
    """Accounts in the PostgreSQL database at *url* (``postgresql://...``).

    The same methods, results and errors as
    :class:`selchat.store.accounts.AccountStore`: validation problems raise
    :class:`InvalidUsername` / :class:`InvalidPassword`, a duplicate name
    (in any case) :class:`UserExists`, and any database failure
    (unreachable, authentication refused, a statement that fails)
    :class:`StorageUnavailable`, including on open. No message shows the
    password from the URL.

    Opening connects and creates the tables if they are missing, or brings
    those of an older selchat up to ``SCHEMA_VERSION`` (under an advisory
    lock, so processes that start together do not collide).

    Threading: psycopg connections may be shared, but a store does one thing
    at a time; the server opens one store per worker thread, as with SQLite.
    """

    def __init__(self, url: str, scrypt_n: int = DEFAULT_SCRYPT_N) -> None:
        self.url = url
        self.scrypt_n = scrypt_n
        self.where = redact_url(url)
        self._secrets = _url_secrets(url)
        self._pg = _import_psycopg()
        self._conn = None
        self._closed = False
        self._conn = self._connect()

    # -- connections -----------------------------------------------------------

    def _error(self, action: str, exc: BaseException) -> StorageUnavailable:
        # libpq's messages span lines ("connection refused\n\tIs the server
        # running ..."): one line reads better in a log or a protocol reply.
        detail = " ".join(str(exc).split()) or type(exc).__name__
        detail = _scrub(detail, self._secrets)
        # As the SQLite store words it; the database itself is not named
        # (the server sends this text to the client whose login failed).
        err = StorageUnavailable(f"account storage unavailable ({action}): {detail}")
        err.__cause__ = exc
        return err

    def _connect(self):
        pg = self._pg
        try:
            given = pg.conninfo.conninfo_to_dict(self.url)
            extra = {}
            if "connect_timeout" not in given:
                extra["connect_timeout"] = CONNECT_TIMEOUT
            if "application_name" not in given:
                extra["application_name"] = "selchat"
            conn = pg.connect(self.url, autocommit=True, **extra)
        except pg.Error as exc:
            raise self._error("open", exc) from None
        try:
            self._setup(conn)
        except StoreError:
            conn.close()
            raise
        except pg.Error as exc:
            conn.close()
            raise self._error("open", exc) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self, conn) -> None:
        version = self._schema_version(conn)
        if version is None or version < SCHEMA_VERSION:
            # Serialise with any other selchat creating or upgrading the
            # tables now, then look again: it may have finished first. A
            # session lock, taken in its own transaction, so that the look
            # after it is a new transaction (one begun before the wait could
            # miss the tables the other made: its catalog lookups may be cached).
            conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
            try:
                version = self._schema_version(conn)
                if version is None or version < SCHEMA_VERSION:
                    # Each step takes the schema one version on, all in one
                    # transaction: new tables go straight to SCHEMA_VERSION.
                    with conn.transaction():
                        if version is None:
                            for statement in _SCHEMA:
                                conn.execute(statement)
                            conn.execute("INSERT INTO selchat_schema (version) VALUES (1)")
                            version = 1
                        if version == 1:
                            for statement in _SCHEMA_BLOCKS + _SCHEMA_LOCKS:
                                conn.execute(statement)
                            version = 2
                        # Future migrations: `if version == 2: ...; version = 3` here.
                        conn.execute("UPDATE selchat_schema SET version = %s", (version,))
            finally:
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
                except self._pg.Error:
                    pass  # a connection that broke took its lock with it
        if version > SCHEMA_VERSION:
            raise StorageUnavailable(
                f"database {self.where} has selchat schema version {version}; "
                f"this selchat understands up to {SCHEMA_VERSION}"
            )

    @staticmethod
    def _schema_version(conn) -> int | None:
        # to_regclass: no error (and no aborted transaction) when it is missing.
        if conn.execute("SELECT to_regclass('selchat_schema')").fetchone()[0] is None:
            return None
        row = conn.execute("SELECT max(version) FROM selchat_schema").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _connection(self):
        """The open connection and whether it is fresh; connects if there is none."""
        if self._closed:
            raise StorageUnavailable("account store is closed")
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken):
            self._drop()
            conn = None
        if conn is None:
            self._conn = conn = self._connect()
            return conn, True
        return conn, False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _run(self, action: str, query, *, retry: bool = False):
        """``query(conn)`` on the connection. A failure is StorageUnavailable;
        a broken connection is let go, so the next call connects again. With
        *retry* (reads only), a connection that was already broken when the
        call began (say the database restarted since the last call) is
        replaced and the query run once more."""
        pg = self._pg
        conn, fresh = self._connection()
        try:
            return query(conn)
        except pg.Error as exc:
            broken = conn.closed or conn.broken
            if broken:
                self._drop()
            if not (broken and retry and not fresh):
                raise self._error(action, exc) from None
        conn, _ = self._connection()
        try:
            return query(conn)
        except pg.Error as exc:
            if conn.closed or conn.broken:
                self._drop()
            raise self._error(action, exc) from None

    # -- queries -------------------------------------------------------------

    def _lookup(self, name: str) -> tuple[str, str, str | None] | None:
        def query(conn):
            return conn.execute(
                "SELECT name, pwhash, locked FROM selchat_users WHERE lower(name) = lower(%s)", (name,)
            ).fetchone()

        row = self._run("read", query, retry=True)
        return None if row is None else (row[0], row[1], row[2])

    def add_user(self, name: str, password: str) -> str:
        """Register *name* with *password*; return the canonical name.

        Raises :class:`InvalidUsername`, :class:`InvalidPassword`,
        :class:`UserExists` or :class:`StorageUnavailable`. When this
        returns, the row is committed.
        """
        check_username(name)
        check_password(password)
        existing = self._lookup(name)
        if existing is not None:
            raise UserExists(f"username {existing[0]!r} is already taken")
        # Hash outside any transaction: it is slow and must hold nothing.
        encoded = hash_password(password, self.scrypt_n)
        unique_violation = self._pg.errors.UniqueViolation

        def insert(conn):
            try:
                conn.execute(
                    "INSERT INTO selchat_users (name, pwhash) VALUES (%s, %s)", (name, encoded)
                )
            except unique_violation:
                return False
            return True

        if not self._run("write", insert):
            # Lost a race with another store registering the same name.
            existing = self._lookup(name)
            taken = existing[0] if existing else name
            raise UserExists(f"username {taken!r} is already taken")
        return name

    def _replace_hash(self, name: str, encoded: str) -> bool:
        def update(conn):
            return conn.execute(
                "UPDATE selchat_users SET pwhash = %s WHERE lower(name) = lower(%s)", (encoded, name)
            ).rowcount

        return self._run("write", update) > 0

    def delete_user(self, name: str) -> bool:
        """Delete *name* (any case, locked or not), and every block list
        entry naming it either way; True if it existed."""
        try:
            check_username(name)
        except StoreError:
            return False

        def delete(conn):
            with conn.transaction():
                # The account first: its row lock waits for a block() that
                # holds it, whose new row the next statement then sees.
                deleted = conn.execute(
                    "DELETE FROM selchat_users WHERE lower(name) = lower(%s)", (name,)
                ).rowcount
                # Whoever registers the name next starts with no blocks, and blocked by nobody.
                conn.execute(
                    "DELETE FROM selchat_blocks WHERE lower(owner) = lower(%s) OR lower(blocked) = lower(%s)",
                    (name, name),
                )
            return deleted

        return self._run("write", delete) > 0

    # -- locks ------------------------------------------------------------------

    def _set_lock(self, name: str, reason: str) -> str | None:
        def lock(conn):
            return conn.execute(
                "UPDATE selchat_users SET locked = %s WHERE lower(name) = lower(%s) RETURNING name",
                (reason, name),
            ).fetchone()

        row = self._run("write", lock)
        return None if row is None else row[0]

    def _clear_lock(self, name: str) -> str | None:
        def unlock(conn):
            return conn.execute(
                "UPDATE selchat_users SET locked = NULL "
                "WHERE lower(name) = lower(%s) AND locked IS NOT NULL RETURNING name",
                (name,),
            ).fetchone()

        row = self._run("write", unlock)
        return None if row is None else row[0]

    def _locks(self) -> list[tuple[str, str]]:
        def query(conn):
            # The order of list_users.
            return conn.execute(
                "SELECT name, locked FROM selchat_users WHERE locked IS NOT NULL "
                'ORDER BY lower(name) COLLATE "C", name COLLATE "C"'
            ).fetchall()

        return [(n, r) for n, r in self._run("read", query, retry=True)]

    # -- block lists -----------------------------------------------------------

    def _add_block(self, owner: str, other: str, limit: int) -> str | None:
        def add(conn):
            with conn.transaction():
                # Both accounts' rows locked, in one order (so two people
                # blocking each other at once do not deadlock): no second
                # block() by the owner can pass the count below at the same
                # time, and neither account can be deleted until this commits.
                rows = conn.execute(
                    "SELECT name FROM selchat_users WHERE lower(name) IN (lower(%s), lower(%s)) "
                    'ORDER BY lower(name) COLLATE "C" FOR UPDATE',
                    (owner, other),
                ).fetchall()
                found = {row[0].lower(): row[0] for row in rows}
                owner_name, other_name = found.get(owner.lower()), found.get(other.lower())
                if owner_name is None or other_name is None:
                    return None
                if conn.execute(
                    "SELECT 1 FROM selchat_blocks WHERE lower(owner) = lower(%s) AND lower(blocked) = lower(%s)",
                    (owner_name, other_name),
                ).fetchone():
                    return other_name
                (count,) = conn.execute(
                    "SELECT count(*) FROM selchat_blocks WHERE lower(owner) = lower(%s)", (owner_name,)
                ).fetchone()
                if count >= limit:
                    raise TooManyBlocks.of(owner_name, limit)
                conn.execute(
                    "INSERT INTO selchat_blocks (owner, blocked) VALUES (%s, %s)", (owner_name, other_name)
                )
            return other_name

        return self._run("write", add)

    def _remove_block(self, owner: str, other: str) -> str | None:
        def remove(conn):
            return conn.execute(
                "DELETE FROM selchat_blocks WHERE lower(owner) = lower(%s) AND lower(blocked) = lower(%s) "
                "RETURNING blocked",
                (owner, other),
            ).fetchone()

        row = self._run("write", remove)
        return None if row is None else row[0]

    def _blocks_of(self, owner: str) -> list[str]:
        def query(conn):
            # The order of list_users (and of SQLite), whatever the locale.
            return conn.execute(
                "SELECT blocked FROM selchat_blocks WHERE lower(owner) = lower(%s) "
                'ORDER BY lower(blocked) COLLATE "C", blocked COLLATE "C"',
                (owner,),
            ).fetchall()

        return [row[0] for row in self._run("read", query, retry=True)]

    def _has_block(self, owner: str, other: str) -> bool:
        def query(conn):
            return conn.execute(
                "SELECT 1 FROM selchat_blocks WHERE lower(owner) = lower(%s) AND lower(blocked) = lower(%s)",
                (owner, other),
            ).fetchone()

        return self._run("read", query, retry=True) is not None

    def list_users(self) -> list[tuple[str, str]]:
        """All accounts as ``(canonical name, created ISO-8601 UTC)``, sorted case-insensitively."""
        def query(conn):
            # COLLATE "C": byte order, as SQLite's NOCASE has it, whatever the
            # database's locale ('_' before letters, digits first).
            return conn.execute(
                'SELECT name, created FROM selchat_users '
                'ORDER BY lower(name) COLLATE "C", name COLLATE "C"'
            ).fetchall()

        return [(n, _iso_utc(c)) for n, c in self._run("read", query, retry=True)]

    def close(self) -> None:
        """Close the connection; idempotent. A closed store does not reconnect."""
        self._closed = True
        self._drop()

    def __enter__(self) -> PostgresAccountStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
