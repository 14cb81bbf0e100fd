"""The account store as the reactor sees it: every call runs on a worker thread.

Each worker thread opens its own store on first use (``open_store``: SQLite
connections may not cross threads; with PostgreSQL each thread gets its own
psycopg connection). Hashing and every database call run there, never on
the loop. The reactor only ever calls ``submit``-style methods that return at
once and deliver the result to a callback on the loop.
"""

from __future__ import annotations

import threading

from selchat.store import open_store


class Accounts:
    def __init__(self, reactor, path: str, scrypt_n: int):
        self.reactor = reactor
        self.path = path  # a SQLite file or a postgresql:// URL
        self.scrypt_n = scrypt_n
        self._local = threading.local()
        self._stores: list = []   # AccountStore or PostgresAccountStore
        self._lock = threading.Lock()

    def _store(self):
        store = getattr(self._local, "store", None)
        if store is None:
            store = open_store(self.path, scrypt_n=self.scrypt_n)
            self._local.store = store
            with self._lock:
                self._stores.append(store)
        return store

    def check(self) -> None:
        """Open the database once, now, so a path or URL that cannot work
        fails at start (StoreError) instead of at every login; with
        PostgreSQL this also creates the tables. Blocking: call it before the
        loop runs."""
        open_store(self.path, scrypt_n=self.scrypt_n).close()

    # Each of these returns immediately; ``done(future)`` runs on the loop.

    def verify(self, name: str, password: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().verify(name, password), done=done)

    def register(self, name: str, password: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().add_user(name, password), done=done)

    def change_password(self, name: str, old: str, new: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().change_password(name, old, new), done=done)

    def delete_account(self, name: str, password: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().delete_account(name, password), done=done)

    def lock_user(self, name: str, reason: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().lock_user(name, reason), done=done)

    def unlock_user(self, name: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().unlock_user(name), done=done)

    def exists(self, name: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().exists(name), done=done)

    # Block lists: see LookupMethods.block and the rest for the results.

    def block(self, owner: str, other: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().block(owner, other), done=done)

    def unblock(self, owner: str, other: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().unblock(owner, other), done=done)

    def blocked_users(self, owner: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().blocked_users(owner), done=done)

    def is_blocked(self, owner: str, other: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().is_blocked(owner, other), done=done)

    def close(self) -> None:
        with self._lock:
            for store in self._stores:
                try:
                    store.close()
                except Exception:
                    pass
            self._stores.clear()
