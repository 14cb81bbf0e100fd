"""The account store as the reactor sees it: every call runs on a worker thread.

SQLite connections may not cross threads, so each worker thread opens its own
``AccountStore`` on first use. The reactor only ever calls ``submit``-style
methods that return at once and deliver the result to a callback on the loop.
"""

from __future__ import annotations

import threading

from selchat.store.accounts import AccountStore


class Accounts:
    def __init__(self, reactor, path: str, scrypt_n: int):
        self.reactor = reactor
        self.path = path
        self.scrypt_n = scrypt_n
        self._local = threading.local()
        self._stores: list[AccountStore] = []
        self._lock = threading.Lock()

    def _store(self) -> AccountStore:
        store = getattr(self._local, "store", None)
        if store is None:
            store = AccountStore(self.path, scrypt_n=self.scrypt_n)
            self._local.store = store
            with self._lock:
                self._stores.append(store)
        return store

    def check(self) -> None:
        """Open the database once, now, so a path that cannot work fails at
        start (StoreError) instead of at every login. Blocking: call it
        before the loop runs."""
        AccountStore(self.path, scrypt_n=self.scrypt_n).close()

    # Each of these returns immediately; ``done(future)`` runs on the loop.

    def verify(self, name: str, password: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().verify(name, password), done=done)

    def register(self, name: str, password: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().add_user(name, password), done=done)

    def exists(self, name: str, done) -> None:
        self.reactor.run_in_thread(lambda: self._store().exists(name), done=done)

    def close(self) -> None:
        with self._lock:
            for store in self._stores:
                try:
                    store.close()
                except Exception:
                    pass
            self._stores.clear()
