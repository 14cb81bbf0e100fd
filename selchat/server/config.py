"""Server settings, with their defaults in one place (the CLI and docs read them)."""

from __future__ import annotations

from dataclasses import dataclass

from selchat.store.accounts import DEFAULT_DB_PATH
from selchat.store.passwords import DEFAULT_SCRYPT_N

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7117


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    db: str = DEFAULT_DB_PATH
    #: A fresh socket must log in or attach within this many seconds of accept.
    login_timeout: float = 30.0
    #: After WELCOME, the chat and check sockets must attach within this.
    attach_timeout: float = 10.0
    #: The server PINGs a check socket that has been silent this long ...
    ping_interval: float = 30.0
    #: ... and drops the session if nothing arrives this long after the PING.
    ping_timeout: float = 30.0
    #: An unanswered chat request expires after this many seconds.
    request_timeout: float = 60.0
    #: Failed logins on one socket before it is closed.
    max_login_failures: int = 3
    #: Whether clients may create accounts with REGISTER.
    registration: bool = True
    #: Threads for password hashing and database writes.
    workers: int = 2
    #: scrypt cost for new password hashes (tests lower it).
    scrypt_n: int = DEFAULT_SCRYPT_N
    #: Timer wheel tick, seconds: timers fire up to one tick late.
    tick: float = 0.05
    #: How long a graceful shutdown waits for buffers to drain.
    shutdown_grace: float = 3.0
