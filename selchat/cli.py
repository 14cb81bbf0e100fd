"""The ``selchat`` command: serve, connect, user."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import ssl
import sys

import click

from selchat import __version__
from selchat.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig
from selchat.store.accounts import DEFAULT_DB_PATH

DEFAULTS = ServerConfig()


def setup_logging(verbosity: int, default: int = logging.WARNING) -> None:
    """Log to stderr through a queue: the reactor thread only appends to the
    queue, a background thread does the writing, so a slow terminal or file
    never blocks the loop."""
    level = {0: default, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    q: queue.SimpleQueue = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(q, handler)
    listener.start()
    atexit.register(listener.stop)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(q)]
    root.setLevel(level)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="selchat")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """selchat: direct chat between two users, on a single-threaded server."""
    ctx.obj = {"verbose": verbose}


# -- serve --------------------------------------------------------------------------

@main.command()
@click.option("--host", envvar="SELCHAT_HOST", default=DEFAULT_HOST, show_default=True, metavar="ADDR",
              help="Address to listen on.")
@click.option("--port", envvar="SELCHAT_PORT", default=DEFAULT_PORT, show_default=True, type=int, metavar="PORT",
              help="TCP port to listen on (0 picks a free one and prints it).")
@click.option("--db", envvar="SELCHAT_DB", default=DEFAULT_DB_PATH, show_default=True, metavar="PATH",
              help="SQLite account database (created if missing).")
@click.option("--ping-interval", envvar="SELCHAT_PING_INTERVAL", default=DEFAULTS.ping_interval, show_default=True,
              type=float, metavar="SECONDS", help="PING a check socket silent for this long.")
@click.option("--ping-timeout", envvar="SELCHAT_PING_TIMEOUT", default=DEFAULTS.ping_timeout, show_default=True,
              type=float, metavar="SECONDS", help="Drop a session this long after an unanswered PING.")
@click.option("--request-timeout", envvar="SELCHAT_REQUEST_TIMEOUT", default=DEFAULTS.request_timeout,
              show_default=True, type=float, metavar="SECONDS", help="An unanswered chat request expires after this.")
@click.option("--login-timeout", default=DEFAULTS.login_timeout, show_default=True, type=float, metavar="SECONDS",
              help="A new socket must log in or attach within this.")
@click.option("--attach-timeout", default=DEFAULTS.attach_timeout, show_default=True, type=float, metavar="SECONDS",
              help="After login, the chat and check sockets must attach within this.")
@click.option("--registration/--no-registration", envvar="SELCHAT_REGISTRATION", default=True, show_default=True,
              help="Let clients create accounts with REGISTER.")
@click.option("--stuck-timeout", default=DEFAULTS.stuck_timeout, show_default=True, type=float, metavar="SECONDS",
              help="Drop a client that has not read its output for this long.")
@click.option("--max-connections", default=DEFAULTS.max_connections, show_default=True, type=int, metavar="N",
              help="Open sockets in all (0: what the descriptor limit allows).")
@click.option("--max-per-address", default=DEFAULTS.max_per_address, show_default=True, type=int, metavar="N",
              help="Open sockets from one address (each user needs 3; 0: no limit).")
@click.option("--conn-rate", default=DEFAULTS.conn_rate, show_default=True, type=float, metavar="PER_S",
              help=f"New connections per second from one address, after a burst of {DEFAULTS.conn_burst} (0: no limit).")
@click.option("--cmd-rate", default=DEFAULTS.cmd_rate, show_default=True, type=float, metavar="PER_S",
              help=f"Commands per second per socket, after a burst of {DEFAULTS.cmd_burst} (0: no limit).")
@click.option("--msg-rate", default=DEFAULTS.msg_rate, show_default=True, type=float, metavar="PER_S",
              help=f"Chat messages per second per user, after a burst of {DEFAULTS.msg_burst} (0: no limit).")
@click.option("--tls-cert", envvar="SELCHAT_TLS_CERT", type=click.Path(exists=True, dir_okay=False), metavar="PATH",
              help="Serve TLS with this certificate chain (PEM); plaintext without it.")
@click.option("--tls-key", envvar="SELCHAT_TLS_KEY", type=click.Path(exists=True, dir_okay=False), metavar="PATH",
              help="The private key for --tls-cert (PEM), if not in the same file.")
@click.option("--workers", default=DEFAULTS.workers, show_default=True, type=click.IntRange(1, 64), metavar="N",
              help="Threads for password hashing and database writes.")
@click.option("--scrypt-n", default=DEFAULTS.scrypt_n, type=int, hidden=True,
              help="scrypt cost of new password hashes (tests and benchmarks lower it).")
@click.pass_context
def serve(ctx, host, port, db, ping_interval, ping_timeout, request_timeout, login_timeout, attach_timeout,
          registration, stuck_timeout, max_connections, max_per_address, conn_rate, cmd_rate, msg_rate,
          tls_cert, tls_key, workers, scrypt_n):
    """Run the chat server (one thread, one selector) until SIGINT/SIGTERM."""
    from selchat.server.app import Server, raise_nofile_limit

    if tls_key and not tls_cert:
        raise click.UsageError("--tls-key needs --tls-cert")
    setup_logging(ctx.obj["verbose"], default=logging.INFO)
    config = ServerConfig(
        host=host, port=port, db=db, ping_interval=ping_interval, ping_timeout=ping_timeout,
        request_timeout=request_timeout, login_timeout=login_timeout, attach_timeout=attach_timeout,
        registration=registration, workers=workers, scrypt_n=scrypt_n, stuck_timeout=stuck_timeout,
        max_connections=max_connections, max_per_address=max_per_address, conn_rate=conn_rate,
        cmd_rate=cmd_rate, msg_rate=msg_rate, tls_cert=tls_cert, tls_key=tls_key,
    )
    nofile = raise_nofile_limit()
    try:
        server = Server(config)
    except ssl.SSLError as exc:
        raise click.ClickException(f"cannot use the TLS certificate or key: {exc}")
    try:
        address = server.listen()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    server.install_signal_handlers()
    logging.getLogger("selchat.server").info(
        "descriptor limit %d: room for %d sockets, about %d clients (3 sockets each)",
        nofile, server.max_connections, server.max_connections // 3)
    scheme = "TLS" if tls_cert else "plaintext"
    click.echo(f"selchat {__version__} listening on {address[0]}:{address[1]} ({scheme}, database {db})")
    sys.stdout.flush()
    server.serve_forever()
    click.echo("selchat stopped")


# -- user ---------------------------------------------------------------------------

@main.group()
@click.option("--db", envvar="SELCHAT_DB", default=DEFAULT_DB_PATH, show_default=True, metavar="PATH",
              help="SQLite account database.")
@click.pass_context
def user(ctx, db):
    """Manage accounts in the database (the server may be running)."""
    ctx.obj["db"] = db


def _open_store(ctx):
    from selchat.store.accounts import AccountStore, StoreError

    try:
        return AccountStore(ctx.obj["db"])
    except StoreError as exc:
        raise click.ClickException(str(exc))


@user.command("add")
@click.argument("name")
@click.option("--password", envvar="SELCHAT_PASSWORD", metavar="PASSWORD", prompt=True, hide_input=True,
              confirmation_prompt=True, help="The password (prompted, hidden, if not given; or $SELCHAT_PASSWORD).")
@click.pass_context
def user_add(ctx, name, password):
    """Create account NAME."""
    from selchat.store.accounts import StoreError

    with _open_store(ctx) as store:
        try:
            canonical = store.add_user(name, password)
        except StoreError as exc:
            raise click.ClickException(str(exc))
    click.echo(f"added {canonical}")


@user.command("del")
@click.argument("name")
@click.pass_context
def user_del(ctx, name):
    """Delete account NAME (a logged-in user stays online until they leave)."""
    from selchat.store.accounts import StoreError

    with _open_store(ctx) as store:
        try:
            existed = store.delete_user(name)
        except StoreError as exc:
            raise click.ClickException(str(exc))
    if not existed:
        raise click.ClickException(f"no user {name}")
    click.echo(f"deleted {name}")


@user.command("list")
@click.pass_context
def user_list(ctx):
    """List accounts, with their creation time (UTC)."""
    with _open_store(ctx) as store:
        for name, created in store.list_users():
            click.echo(f"{name}\t{created}")


# -- connect --------------------------------------------------------------------------

from selchat.bench.command import bench  # noqa: E402  (heavy modules load lazily)
from selchat.client.command import connect  # noqa: E402

main.add_command(connect)
main.add_command(bench)


if __name__ == "__main__":
    main()
