"""store: the account stores (SQLite, PostgreSQL) and password hashing.

:func:`open_store` picks the store a ``--db`` value names: a
``postgresql://`` (or ``postgres://``) URL opens
:class:`~selchat.store.postgres.PostgresAccountStore`, anything else is a
SQLite file for :class:`~selchat.store.accounts.AccountStore`. Both have the
same methods and raise the same errors.
"""

from __future__ import annotations

from selchat.store.passwords import DEFAULT_SCRYPT_N

__all__ = ["is_postgres_url", "describe_db", "open_store"]

_URL_PREFIXES = ("postgresql://", "postgres://")


def is_postgres_url(db: str) -> bool:
    """True if *db* is a PostgreSQL URL rather than a SQLite path."""
    return isinstance(db, str) and db.lower().startswith(_URL_PREFIXES)


def describe_db(db: str) -> str:
    """*db* as it may be shown or logged: a URL's password replaced by ``***``."""
    if is_postgres_url(db):
        from selchat.store.postgres import redact_url

        return redact_url(db)
    return db


def open_store(db: str, scrypt_n: int = DEFAULT_SCRYPT_N):
    """Open the account store *db* names; StoreError (StorageUnavailable) if it cannot be.

    PostgreSQL needs psycopg 3 (the ``postgres`` extra); it is imported here,
    only when a URL is given, and its absence is a StorageUnavailable that
    says what to install.
    """
    if is_postgres_url(db):
        from selchat.store.postgres import PostgresAccountStore

        return PostgresAccountStore(db, scrypt_n=scrypt_n)
    from selchat.store.accounts import AccountStore

    return AccountStore(db, scrypt_n=scrypt_n)
