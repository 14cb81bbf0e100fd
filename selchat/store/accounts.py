"""The account store: usernames and scrypt password hashes in SQLite.

Usernames are 1-32 characters of ``[A-Za-z0-9_-]``.  They are stored as
given (the *canonical* spelling) and are unique regardless of case; every
lookup is case-insensitive and reports the canonical spelling.

Each account also has a block list: the accounts it has blocked (at most
``MAX_BLOCKS``), kept by canonical spelling and dropped, in both
directions, when an account is deleted.

An operator may *lock* an account (abuse): its name stays taken, but its
password no longer logs in (``verify`` raises :class:`AccountLocked`, and
only when the password is right, so only its owner learns of the lock).

The database runs in WAL mode with ``synchronous=FULL``, so once
:meth:`AccountStore.add_user` returns, the registration is on disk and
survives a crash of the process (and, as far as the OS and disk honour
fsync, a power loss).
"""

from __future__ import annotations

import re
import sqlite3
from datetime import datetime, timezone

from selchat.store.passwords import (
    DEFAULT_SCRYPT_N,
    MAX_PASSWORD_BYTES,
    dummy_verify,
    hash_password,
    verify_password,
)

__all__ = [
    "DEFAULT_DB_PATH",
    "USERNAME_MAX",
    "MAX_BLOCKS",
    "LOCK_REASON_MAX",
    "SCHEMA_VERSION",
    "BUSY_TIMEOUT_MS",
    "StoreError",
    "InvalidUsername",
    "InvalidPassword",
    "UserExists",
    "TooManyBlocks",
    "AccountLocked",
    "InvalidReason",
    "StorageUnavailable",
    "check_username",
    "check_password",
    "check_lock_reason",
    "AccountStore",
    "LookupMethods",
]

#: Default database file, relative to the current working directory.
DEFAULT_DB_PATH = "selchat.db"

USERNAME_MAX = 32
#: The most accounts one account may have on its block list.
MAX_BLOCKS = 1000
#: The longest reason a lock may carry, in characters (it is shown in protocol replies).
LOCK_REASON_MAX = 200
#: 1: users. 2: blocks, and users.locked.
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000

_USERNAME_RE = re.compile(r"[A-Za-z0-9_-]+")


class StoreError(Exception):
    """Base class of account-store errors.

    ``code`` is a short kebab-case string suitable for a protocol reply;
    ``str(err)`` is a human-readable message.
    """

    code = "store"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidUsername(StoreError):
    code = "bad-username"


class InvalidPassword(StoreError):
    code = "bad-password"


class UserExists(StoreError):
    code = "taken"


class TooManyBlocks(StoreError):
    """The account has ``MAX_BLOCKS`` entries on its block list already."""

    code = "too-many-blocks"

    @classmethod
    def of(cls, owner: str, limit: int) -> TooManyBlocks:
        return cls(f"{owner!r} has blocked {limit} users already, the most allowed")


class AccountLocked(StoreError):
    """The password is right, but an operator has locked the account.

    ``reason`` is the operator's reason ("" if none was given)."""

    code = "locked"

    def __init__(self, reason: str = "") -> None:
        message = "this account is locked"
        super().__init__(f"{message}: {reason}" if reason else message)
        self.reason = reason


class InvalidReason(StoreError):
    """A lock reason that could not be shown in a reply: too long, or not one printable line."""

    code = "bad-reason"


class StorageUnavailable(StoreError):
    """The database could not be read or written (disk full, read-only, locked...)."""

    code = "storage"


def check_username(name: str) -> None:
    """Raise :class:`InvalidUsername` unless *name* is 1-32 chars of ``[A-Za-z0-9_-]``."""
    if not isinstance(name, str):
        raise InvalidUsername("username must be a string")
    if not name:
        raise InvalidUsername("username must not be empty")
    if len(name) > USERNAME_MAX:
        raise InvalidUsername(
            f"username must be at most {USERNAME_MAX} characters (got {len(name)})"
        )
    if not _USERNAME_RE.fullmatch(name):
        raise InvalidUsername(
            "username may contain only ASCII letters, digits, '_' and '-'"
        )


def check_password(password: str) -> None:
    """Raise :class:`InvalidPassword` unless *password* is acceptable.

    Acceptable: 1 to ``MAX_PASSWORD_BYTES`` bytes once encoded as UTF-8,
    with no NUL, CR or LF.
    """
    if not isinstance(password, str):
        raise InvalidPassword("password must be a string")
    if not password:
        raise InvalidPassword("password must not be empty")
    if "\x00" in password or "\r" in password or "\n" in password:
        raise InvalidPassword("password must not contain NUL, CR or LF")
    try:
        size = len(password.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidPassword("password is not valid Unicode text") from None
    if size > MAX_PASSWORD_BYTES:
        raise InvalidPassword(
            f"password must be at most {MAX_PASSWORD_BYTES} bytes of UTF-8 (got {size})"
        )


def check_lock_reason(reason: str) -> None:
    """Raise :class:`InvalidReason` unless *reason* is at most
    ``LOCK_REASON_MAX`` printable characters (spaces allowed; no tabs,
    line breaks or other control characters): it ends up in a one-line
    protocol reply and in ``selchat user list``'s tab-separated lines."""
    if not isinstance(reason, str):
        raise InvalidReason("the lock reason must be a string")
    if len(reason) > LOCK_REASON_MAX:
        raise InvalidReason(
            f"the lock reason must be at most {LOCK_REASON_MAX} characters (got {len(reason)})"
        )
    if not reason.isprintable():
        raise InvalidReason("the lock reason must be one line of printable characters")


def _now_iso() -> str:
    # "+00:00" rather than "Z" so datetime.fromisoformat() reads it on 3.10 too.
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _storage_error(action: str, exc: sqlite3.Error) -> StorageUnavailable:
    err = StorageUnavailable(f"account storage unavailable ({action}): {exc}")
    err.__cause__ = exc
    return err


# Version 1: the accounts.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name    TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
    pwhash  TEXT NOT NULL,
    created TEXT NOT NULL
)
"""

# Version 2: block lists. ``owner`` has blocked ``blocked``; both canonical.
_SCHEMA_BLOCKS = (
    """CREATE TABLE IF NOT EXISTS blocks (
    owner   TEXT NOT NULL COLLATE NOCASE,
    blocked TEXT NOT NULL COLLATE NOCASE,
    created TEXT NOT NULL,
    PRIMARY KEY (owner, blocked)
)""",
    # delete_user finds the rows that name an account as the one blocked.
    "CREATE INDEX IF NOT EXISTS blocks_blocked ON blocks (blocked)",
)
# Version 2 too: account locks. NULL: not locked; else the reason, perhaps "".
_SCHEMA_LOCKS = ("ALTER TABLE users ADD COLUMN locked TEXT",)


class LookupMethods:
    """What every account store does with its own ``_lookup(name) ->
    (canonical name, encoded hash, lock reason or None) | None``,
    ``_replace_hash(name, encoded) -> bool`` and ``scrypt_n``: check a
    password, set or change one, say whether a name exists and how it is
    spelled (the SQLite store here, ``postgres.PostgresAccountStore``).

    The block list likewise: the names are checked here, the SQL is each
    store's ``_add_block``, ``_remove_block``, ``_blocks_of`` and
    ``_has_block``, called only with well-formed names. Locks too:
    ``_set_lock``, ``_clear_lock`` and ``_locks``."""

    scrypt_n: int

    def _lookup(self, name: str) -> tuple[str, str, str | None] | None:  # pragma: no cover - interface
        raise NotImplementedError

    def verify(self, name: str, password: str) -> str | None:
        """Return the canonical name if *password* is right for *name*, else None.

        An unknown user, a wrong password and a malformed name or password
        all give None after the same amount of hashing work.  A database
        failure raises :class:`StorageUnavailable` rather than returning None.
        The right password for a locked account raises :class:`AccountLocked`
        (a wrong one gives None, as for any account: the lock is only
        revealed to whoever knows the password).
        """
        try:
            check_username(name)
            check_password(password)
        except StoreError:
            dummy_verify(password, self.scrypt_n)
            return None
        row = self._lookup(name)
        if row is None:
            dummy_verify(password, self.scrypt_n)
            return None
        canonical, encoded, locked = row
        if not verify_password(password, encoded):
            return None
        if locked is not None:
            raise AccountLocked(locked)
        return canonical

    def _replace_hash(self, name: str, encoded: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def set_password(self, name: str, password: str) -> bool:
        """Replace *name*'s (any case) password; True if the account exists.
        Raises :class:`InvalidPassword` or :class:`StorageUnavailable`."""
        check_password(password)
        try:
            check_username(name)
        except InvalidUsername:
            return False
        # Hashed outside any transaction: it is slow and must hold nothing.
        return self._replace_hash(name, hash_password(password, self.scrypt_n))

    def change_password(self, name: str, old: str, new: str) -> str | None:
        """Set *new* as *name*'s password if *old* is its password now.

        Returns the canonical name, or None (wrong password, no such
        account) after the same hashing work as ``verify``. Raises
        :class:`InvalidPassword` for an unacceptable *new* before any
        hashing, :class:`AccountLocked` as ``verify`` does, and
        :class:`StorageUnavailable` as the other calls do.
        """
        check_password(new)
        canonical = self.verify(name, old)
        if canonical is None or not self.set_password(canonical, new):
            return None
        return canonical

    def delete_account(self, name: str, password: str) -> str | None:
        """Delete *name* if *password* is its password (the user's own
        deletion; ``delete_user`` is the operator's). Returns the canonical
        name, or None (wrong password, no such account) after the same
        hashing work as ``verify``; :class:`AccountLocked` as ``verify``
        raises it (an operator's ``delete_user`` deletes a locked account)."""
        canonical = self.verify(name, password)
        if canonical is None or not self.delete_user(canonical):
            return None
        return canonical

    def exists(self, name: str) -> bool:
        """True if an account *name* exists (case-insensitive)."""
        try:
            check_username(name)
        except InvalidUsername:
            return False
        return self._lookup(name) is not None

    def canonical_name(self, name: str) -> str | None:
        """The registered spelling of *name*, or None if there is no such account."""
        try:
            check_username(name)
        except InvalidUsername:
            return None
        row = self._lookup(name)
        return row[0] if row else None

    # -- locks ------------------------------------------------------------------

    def lock_user(self, name: str, reason: str = "") -> str | None:
        """Lock *name* (any case): its password stops logging in, its name
        stays taken. Returns the canonical name, or None if there is no such
        account. Locking a locked account again replaces the reason. Raises
        :class:`InvalidReason` (see :func:`check_lock_reason`). A session
        already logged in is not ended here: that is the server's business."""
        check_lock_reason(reason)
        try:
            check_username(name)
        except InvalidUsername:
            return None
        return self._set_lock(name, reason)

    def unlock_user(self, name: str) -> str | None:
        """Unlock *name* (any case); the canonical name if it was locked, else None."""
        try:
            check_username(name)
        except InvalidUsername:
            return None
        return self._clear_lock(name)

    def locked_users(self) -> dict[str, str]:
        """The locked accounts: canonical name -> reason, in ``list_users`` order."""
        return dict(self._locks())

    def _set_lock(self, name: str, reason: str) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def _clear_lock(self, name: str) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def _locks(self) -> list[tuple[str, str]]:  # pragma: no cover - interface
        raise NotImplementedError

    # -- block lists -----------------------------------------------------------

    def block(self, owner: str, other: str) -> str | None:
        """Put *other* on *owner*'s block list; return *other*'s canonical name.

        None if either account does not exist (or a name is malformed).
        Blocking again is no error and adds nothing. Raises
        :class:`TooManyBlocks` if *owner* has ``MAX_BLOCKS`` entries already
        (and *other* is not one of them), :class:`StorageUnavailable` on a
        database failure. Whether *owner* may block itself is the caller's
        business.
        """
        try:
            check_username(owner)
            check_username(other)
        except InvalidUsername:
            return None
        # Read now, not at import: the limit is the module's at the time of the call.
        return self._add_block(owner, other, MAX_BLOCKS)

    def unblock(self, owner: str, other: str) -> str | None:
        """Take *other* (any case) off *owner*'s block list; return the
        canonical name removed, or None if it was not there."""
        try:
            check_username(owner)
            check_username(other)
        except InvalidUsername:
            return None
        return self._remove_block(owner, other)

    def blocked_users(self, owner: str) -> list[str]:
        """The canonical names *owner* has blocked, sorted case-insensitively."""
        try:
            check_username(owner)
        except InvalidUsername:
            return []
        return self._blocks_of(owner)

    def is_blocked(self, owner: str, other: str) -> bool:
        """True if *owner* has blocked *other* (both in any case)."""
        try:
            check_username(owner)
            check_username(other)
        except InvalidUsername:
            return False
        return self._has_block(owner, other)

    def _add_block(self, owner: str, other: str, limit: int) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def _remove_block(self, owner: str, other: str) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def _blocks_of(self, owner: str) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def _has_block(self, owner: str, other: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class AccountStore(LookupMethods):
    """Accounts in a SQLite database at *path*.

    *path* is a file name (``":memory:"`` works, for tests) or a SQLite
    ``file:`` URI (e.g. ``"file:selchat.db?mode=ro"``).  *scrypt_n* is the
    scrypt cost used for new hashes and for dummy work; existing hashes
    verify with the parameters they were made with.

    Threading: one ``AccountStore`` per thread.  The underlying
    :class:`sqlite3.Connection` keeps ``check_same_thread`` at its default,
    so using a store from a thread other than the one that created it
    raises :class:`sqlite3.ProgrammingError`.  Create one store per worker
    thread; several stores (threads or processes) may share one database
    file, SQLite's locking plus a busy timeout of ``BUSY_TIMEOUT_MS``
    serialise the writes.

    Errors: validation problems raise :class:`InvalidUsername` /
    :class:`InvalidPassword`, a duplicate name raises :class:`UserExists`,
    and any SQLite failure (disk full, read-only database, lock not
    obtained within the busy timeout, corrupt file) raises
    :class:`StorageUnavailable`, including on open.  Misuse such as calling
    from the wrong thread still raises :class:`sqlite3.ProgrammingError`.
    """

    def __init__(self, path: str, scrypt_n: int = DEFAULT_SCRYPT_N) -> None:
        self.path = path
        self.scrypt_n = scrypt_n
        self._conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # autocommit; explicit BEGIN where needed
                uri=path.startswith("file:"),
            )
        except sqlite3.ProgrammingError:
            raise  # misuse (wrong thread...), not a storage failure
        except sqlite3.Error as exc:
            raise _storage_error("open", exc) from exc
        try:
            self._setup(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise _storage_error("open", exc) from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # -- setup -------------------------------------------------------------

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            # Read-only database (or directory): switching modes needs a
            # write.  Reads still work; writes will raise StorageUnavailable.
            pass
        conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        self._check_not_newer(version)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another store may have won the race.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            self._check_not_newer(version)
            # Each step takes the schema one version on, all in this transaction:
            # a new file goes straight to SCHEMA_VERSION, an old one is upgraded.
            if version == 0:
                conn.execute(_SCHEMA)
                version = 1
            if version == 1:
                for statement in _SCHEMA_BLOCKS + _SCHEMA_LOCKS:
                    conn.execute(statement)
                version = 2
            # Future migrations: `if version == 2: ...; version = 3` here.
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _check_not_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StorageUnavailable(
                f"database {self.path!r} has schema version {version}; "
                f"this selchat understands up to {SCHEMA_VERSION}"
            )

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageUnavailable("account store is closed")
        return self._conn

    # -- queries -------------------------------------------------------------

    def _read(self, sql: str, args: tuple = (), one: bool = False):
        """A query's rows (its first row, or None, if ``one``); a database
        error is a storage error, misuse (the wrong thread...) is not."""
        try:
            cursor = self._db.execute(sql, args)
            return cursor.fetchone() if one else cursor.fetchall()
        except sqlite3.ProgrammingError:
            raise  # misuse (wrong thread...), not a storage failure
        except sqlite3.Error as exc:
            raise _storage_error("read", exc) from exc

    def _lookup(self, name: str) -> tuple[str, str, str | None] | None:
        return self._read("SELECT name, pwhash, locked FROM users WHERE name = ?", (name,), one=True)

    def add_user(self, name: str, password: str) -> str:
        """Register *name* with *password*; return the canonical name.

        Raises :class:`InvalidUsername`, :class:`InvalidPassword`,
        :class:`UserExists` or :class:`StorageUnavailable`.  When this
        returns, the row is committed and synced to disk.
        """
        check_username(name)
        check_password(password)
        existing = self._lookup(name)
        if existing is not None:
            raise UserExists(f"username {existing[0]!r} is already taken")
        # Hash outside any transaction: it is slow and must not hold the lock.
        encoded = hash_password(password, self.scrypt_n)
        try:
            self._db.execute(
                "INSERT INTO users (name, pwhash, created) VALUES (?, ?, ?)",
                (name, encoded, _now_iso()),
            )
        except sqlite3.IntegrityError:
            # Lost a race with another store registering the same name.
            existing = self._lookup(name)
            taken = existing[0] if existing else name
            raise UserExists(f"username {taken!r} is already taken") from None
        except sqlite3.ProgrammingError:
            raise  # misuse (wrong thread...), not a storage failure
        except sqlite3.Error as exc:
            raise _storage_error("write", exc) from exc
        return name

    def _replace_hash(self, name: str, encoded: str) -> bool:
        try:
            cur = self._db.execute("UPDATE users SET pwhash = ? WHERE name = ?", (encoded, name))
        except sqlite3.ProgrammingError:
            raise  # misuse (wrong thread...), not a storage failure
        except sqlite3.Error as exc:
            raise _storage_error("write", exc) from exc
        return cur.rowcount > 0

    def _write(self, work):
        """``work(conn)`` in one write transaction (``BEGIN IMMEDIATE``: the
        write lock from the start, so what it reads cannot change before it
        writes). Committed if it returns, rolled back if it raises."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the first error is the one to report
                raise
        except sqlite3.ProgrammingError:
            raise  # misuse (wrong thread...), not a storage failure
        except sqlite3.Error as exc:
            raise _storage_error("write", exc) from exc
        return result

    def delete_user(self, name: str) -> bool:
        """Delete *name* (any case, locked or not), and every block list
        entry naming it either way; True if it existed."""
        try:
            check_username(name)
        except InvalidUsername:
            return False

        def delete(db: sqlite3.Connection) -> bool:
            cur = db.execute("DELETE FROM users WHERE name = ?", (name,))
            # Whoever registers the name next starts with no blocks, and blocked by nobody.
            db.execute("DELETE FROM blocks WHERE owner = ? OR blocked = ?", (name, name))
            return cur.rowcount > 0

        return self._write(delete)

    # -- locks ------------------------------------------------------------------

    def _set_lock(self, name: str, reason: str) -> str | None:
        def lock(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT name FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE users SET locked = ? WHERE name = ?", (reason, name))
            return row[0]

        return self._write(lock)

    def _clear_lock(self, name: str) -> str | None:
        def unlock(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT name FROM users WHERE name = ? AND locked IS NOT NULL", (name,)
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE users SET locked = NULL WHERE name = ?", (name,))
            return row[0]

        return self._write(unlock)

    def _locks(self) -> list[tuple[str, str]]:
        rows = self._read("SELECT name, locked FROM users WHERE locked IS NOT NULL "
                          "ORDER BY name COLLATE NOCASE, name")
        return [(n, r) for n, r in rows]

    # -- block lists -----------------------------------------------------------

    def _add_block(self, owner: str, other: str, limit: int) -> str | None:
        def add(db: sqlite3.Connection) -> str | None:
            found = []
            for name in (owner, other):
                row = db.execute("SELECT name FROM users WHERE name = ?", (name,)).fetchone()
                if row is None:
                    return None
                found.append(row[0])
            owner_name, other_name = found
            if db.execute(
                "SELECT 1 FROM blocks WHERE owner = ? AND blocked = ?", (owner_name, other_name)
            ).fetchone():
                return other_name
            (count,) = db.execute("SELECT count(*) FROM blocks WHERE owner = ?", (owner_name,)).fetchone()
            if count >= limit:
                raise TooManyBlocks.of(owner_name, limit)
            db.execute(
                "INSERT INTO blocks (owner, blocked, created) VALUES (?, ?, ?)",
                (owner_name, other_name, _now_iso()),
            )
            return other_name

        return self._write(add)

    def _remove_block(self, owner: str, other: str) -> str | None:
        def remove(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT blocked FROM blocks WHERE owner = ? AND blocked = ?", (owner, other)
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM blocks WHERE owner = ? AND blocked = ?", (owner, other))
            return row[0]

        return self._write(remove)

    def _blocks_of(self, owner: str) -> list[str]:
        rows = self._read("SELECT blocked FROM blocks WHERE owner = ? ORDER BY blocked COLLATE NOCASE, blocked",
                          (owner,))
        return [n for (n,) in rows]

    def _has_block(self, owner: str, other: str) -> bool:
        row = self._read("SELECT 1 FROM blocks WHERE owner = ? AND blocked = ?", (owner, other), one=True)
        return row is not None

    def list_users(self) -> list[tuple[str, str]]:
        """All accounts as ``(canonical name, created ISO-8601 UTC)``, sorted case-insensitively."""
        rows = self._read("SELECT name, created FROM users ORDER BY name COLLATE NOCASE, name")
        return [(n, c) for n, c in rows]

    def close(self) -> None:
        """Close the connection; idempotent."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> AccountStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
