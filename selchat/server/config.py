"""Server settings, with their defaults in one place (the CLI and the docs read them).

Every limit here is listed, with the server it follows, in docs/security.md.
"""

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

    # -- deadlines (seconds) --
    #: A fresh socket must log in or attach within this of accept (not reset by input).
    login_timeout: float = 30.0
    #: After WELCOME, the chat and check sockets must attach within this.
    attach_timeout: float = 10.0
    #: The server PINGs a check socket that has been silent this long ...
    ping_interval: float = 90.0
    #: ... and drops the session if nothing arrives this long after the PING.
    ping_timeout: float = 60.0
    #: An unanswered chat request expires after this.
    request_timeout: float = 60.0
    #: A socket whose output stays over the high-water mark this long is dropped.
    stuck_timeout: float = 30.0
    #: A version 2 session that lost a socket is kept this long for RESUME.
    resume_window: float = 120.0

    # -- IRC front end (selchat/irc/; off when None) --
    #: Serve IRC clients (irssi, WeeChat, HexChat) on this port too (0: a free one).
    irc_port: int | None = None
    #: The same over TLS, with the server's certificate (needs tls_cert).
    irc_tls_port: int | None = None

    # -- cluster --
    #: redis://HOST:PORT/DB: a node of the cluster sharing that Redis (None: alone).
    cluster: str | None = None

    # -- version 2 sessions --
    #: Events a session keeps unacknowledged (to replay after a resume);
    #: past it, partners sending to the session are slowed.
    resume_buffer: int = 1000

    # -- input before login --
    #: Bytes and frames a socket may send before it has logged in or attached.
    prelogin_bytes: int = 8192
    prelogin_frames: int = 10
    #: Failed logins on one socket before it is closed.
    max_login_failures: int = 3
    #: Failed logins from one address (any accounts) before further attempts
    #: from it are throttled; 0 = never throttle by address alone. (One
    #: account is throttled from one address after 3 failures regardless.)
    throttle_after: int = 10

    # -- flood control: token buckets (rate per second, burst); rate 0 = unlimited --
    cmd_rate: float = 2.0
    cmd_burst: int = 5
    msg_rate: float = 50.0
    msg_burst: int = 100
    #: Chat requests a user may send: a burst of 3, then one every 10 s.
    request_rate: float = 0.1
    request_burst: int = 3

    # -- connections --
    #: Open sockets in all; 0 means "what the descriptor limit allows".
    max_connections: int = 0
    #: Open sockets from one address (a user needs 3); 0 = unlimited.
    max_per_address: int = 60
    #: New connections per second from one address, after a burst; 0 = unlimited.
    conn_rate: float = 10.0
    conn_burst: int = 30

    # -- passwords --
    #: Whether clients may create accounts with REGISTER.
    registration: bool = True
    #: Accounts one address may create per hour, after a burst; 0 = unlimited.
    registrations_per_hour: float = 30.0
    registration_burst: int = 10
    #: Threads for password hashing and database writes.
    workers: int = 2
    #: Password checks waiting or running at once; more are refused as "busy".
    max_hash_queue: int = 256
    #: scrypt cost for new password hashes (tests lower it).
    scrypt_n: int = DEFAULT_SCRYPT_N

    # -- TLS (off when tls_cert is None) --
    tls_cert: str | None = None
    tls_key: str | None = None
    #: A TLS handshake must complete within this of accept.
    tls_handshake_timeout: float = 10.0

    # -- operations (docs/operations.md) --
    #: Lines sent to every user after READY (MOTD frames); read at start and on reload.
    motd_file: str | None = None
    #: Serve Prometheus metrics at http://HOST:PORT/metrics ("HOST:PORT"), off when None.
    metrics: str | None = None
    #: The admin control socket (a Unix socket, mode 0600), off when None.
    admin_socket: str | None = None
    #: Log to this file instead of stderr (reopened on SIGHUP, for logrotate).
    log_file: str | None = None
    #: "text" or "json".
    log_format: str = "text"
    #: The TOML file the settings came from (re-read on SIGHUP), if any.
    config_file: str | None = None

    # -- reactor --
    #: Timer wheel tick, seconds: timers fire up to one tick late.
    tick: float = 0.05
    #: How long a graceful shutdown waits for buffers to drain.
    shutdown_grace: float = 3.0
