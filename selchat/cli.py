"""The ``selchat`` command: serve, connect, user."""

from __future__ import annotations

import logging
import os
import ssl
import sys

import click
from click.core import ParameterSource

from selchat import __version__, logsetup
from selchat.server import options
from selchat.server.config import ServerConfig
from selchat.server.options import ConfigError, Loader
from selchat.store import describe_db, is_postgres_url
from selchat.store.accounts import DEFAULT_DB_PATH

DEFAULTS = ServerConfig()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="selchat")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """selchat: direct chat between two users, on a single-threaded server."""
    ctx.obj = {"verbose": verbose}


# -- serve --------------------------------------------------------------------------

def _setting(key: str, *decls: str, **kw):
    """A ``serve`` option for ServerConfig field ``key``: its default from
    ServerConfig, its SELCHAT_* variable shown in --help. The values are
    resolved by ``selchat.server.options.Loader``, not here (see serve)."""
    kw.setdefault("default", getattr(DEFAULTS, key))
    kw.setdefault("show_default", kw["default"] is not None)
    if key in options.ENV_KEYS:
        kw.update(envvar=options.envvar(key), show_envvar=True)
    return click.option(*(decls or (options.option(key),)), key, **kw)


def _check_metrics(ctx, param, value):
    from selchat.server.metrics import parse_address  # lazily: it brings the HTTP server

    if value:
        try:
            parse_address(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9117, [::1]:9117)")
    return value


@main.command()
@click.option("--config", "config_path", envvar="SELCHAT_SERVER_CONFIG", show_envvar=True, metavar="PATH",
              type=click.Path(dir_okay=False),
              help="TOML file of settings (keys: the options' names, e.g. ping_interval = 90); "
                   "re-read on SIGHUP. An option or variable outranks it.")
@_setting("host", metavar="ADDR", help="Address to listen on.")
@_setting("port", type=int, metavar="PORT", help="TCP port to listen on (0 picks a free one and prints it).")
@_setting("db", metavar="PATH|URL",
          help="Account database: a SQLite file (created if missing) or a postgresql:// URL.")
@_setting("ping_interval", type=float, metavar="SECONDS", help="PING a check socket silent for this long.")
@_setting("ping_timeout", type=float, metavar="SECONDS", help="Drop a session this long after an unanswered PING.")
@_setting("request_timeout", type=float, metavar="SECONDS", help="An unanswered chat request expires after this.")
@_setting("login_timeout", type=float, metavar="SECONDS", help="A new socket must log in or attach within this.")
@_setting("attach_timeout", type=float, metavar="SECONDS",
          help="After login, the chat and check sockets must attach within this.")
@_setting("registration", "--registration/--no-registration", show_default="on",
          help="Let clients create accounts with REGISTER.")
@_setting("registrations_per_hour", type=float, metavar="N",
          help=f"Accounts one address may create per hour, after a burst of {DEFAULTS.registration_burst}"
               " (0: no limit).")
@_setting("stuck_timeout", type=float, metavar="SECONDS",
          help="Drop a client that has not read its output for this long.")
@_setting("resume_window", type=float, metavar="SECONDS",
          help="Keep a version 2 session that lost its connection this long for RESUME.")
@_setting("resume_buffer", type=int, metavar="N",
          help="Unacknowledged events kept per version 2 session; past it, senders are slowed.")
@_setting("cluster", metavar="redis://HOST:PORT/DB",
          help="Be a node of the cluster that shares this Redis (presence, chats, routing); alone without it.")
@_setting("max_connections", type=int, metavar="N", help="Open sockets in all (0: what the descriptor limit allows).")
@_setting("max_per_address", type=int, metavar="N",
          help="Open sockets from one address (each user needs 3; 0: no limit).")
@_setting("conn_rate", type=float, metavar="PER_S",
          help=f"New connections per second from one address, after a burst of {DEFAULTS.conn_burst} (0: no limit).")
@_setting("cmd_rate", type=float, metavar="PER_S",
          help=f"Commands per second per socket, after a burst of {DEFAULTS.cmd_burst} (0: no limit).")
@_setting("msg_rate", type=float, metavar="PER_S",
          help=f"Chat messages per second per user, after a burst of {DEFAULTS.msg_burst} (0: no limit).")
@_setting("throttle_after", type=click.IntRange(min=0), metavar="N",
          help="Failed logins from one address (any accounts) before its attempts are throttled (0: never).")
@_setting("tls_cert", type=click.Path(exists=True, dir_okay=False), metavar="PATH",
          help="Serve TLS with this certificate chain (PEM); plaintext without it. Reloaded on SIGHUP.")
@_setting("tls_key", type=click.Path(exists=True, dir_okay=False), metavar="PATH",
          help="The private key for --tls-cert (PEM), if not in the same file.")
@_setting("workers", type=click.IntRange(1, 64), metavar="N", help="Threads for password hashing and database writes.")
@_setting("motd_file", type=click.Path(dir_okay=False), metavar="PATH",
          help="Send this file's lines to every user after login (re-read on SIGHUP).")
@_setting("metrics", metavar="HOST:PORT", callback=_check_metrics,
          help="Serve Prometheus metrics at http://HOST:PORT/metrics (off by default).")
@_setting("admin_socket", type=click.Path(dir_okay=False), metavar="PATH",
          help="Open the control socket for `selchat admin` here (mode 0600; off by default).")
@_setting("log_file", type=click.Path(dir_okay=False), metavar="PATH",
          help="Log to this file instead of stderr (reopened on SIGHUP, for logrotate).")
@_setting("log_format", type=click.Choice(options.LOG_FORMATS), help="Log lines as text or one JSON object each.")
@_setting("irc_port", type=click.IntRange(0, 65535), metavar="PORT",
          help="Also serve IRC clients (irssi, WeeChat, HexChat) on this port (off by default).")
@_setting("irc_tls_port", type=click.IntRange(0, 65535), metavar="PORT",
          help="Also serve IRC clients over TLS on this port, with --tls-cert (off by default).")
@_setting("scrypt_n", type=int, hidden=True, help="scrypt cost of new password hashes (tests and benchmarks lower it).")
@click.pass_context
def serve(ctx, config_path, **settings):
    """Run the chat server (one thread, one selector) until SIGINT/SIGTERM; SIGHUP reloads."""
    from selchat.server.app import Server, raise_nofile_limit

    if settings["tls_key"] and not settings["tls_cert"] and config_path is None:
        raise click.UsageError("--tls-key needs --tls-cert")
    # Only what the command line says explicitly outranks the rest; the
    # Loader reads the SELCHAT_* variables and the file itself, and again on
    # every reload (so a value left to the file follows the file).
    given = {key: value for key, value in settings.items()
             if ctx.get_parameter_source(key) is ParameterSource.COMMANDLINE}
    loader = Loader(config_path, given, os.environ)
    try:
        config = loader.load()
    except ConfigError as exc:
        raise click.ClickException(str(exc))
    try:
        logs = logsetup.setup(config, ctx.obj["verbose"])
    except OSError as exc:
        raise click.ClickException(f"cannot open the log file {config.log_file}: {exc.strerror or exc}")
    try:
        _serve(config, loader, logs, Server, raise_nofile_limit)
    finally:
        logs.close()
    click.echo("selchat stopped")


def _serve(config: ServerConfig, loader, logs, Server, raise_nofile_limit) -> None:  # noqa: N803
    from selchat.server import systemd
    from selchat.store.accounts import StoreError

    nofile = raise_nofile_limit()
    try:
        server = Server(config, loader=loader, logs=logs)
    except StoreError as exc:
        raise click.ClickException(f"cannot open the database {describe_db(config.db)}: {exc}{_missing_dir(config.db)}")
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        raise click.ClickException(f"cannot use the TLS certificate or key: {exc}")
    except ConfigError as exc:
        raise click.ClickException(str(exc))
    except (ValueError, RuntimeError) as exc:  # --cluster: a bad URL, or no hiredis
        raise click.ClickException(f"--cluster: {exc}")
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise click.ClickException(f"cannot start: {exc.strerror or exc}{where}")
    try:
        address = server.listen()
    except OSError as exc:
        _abandon(server)
        raise click.ClickException(_listen_error(server, config, exc))
    server.install_signal_handlers()
    logging.getLogger("selchat.server").info(
        "descriptor limit %d: room for %d sockets, about %d clients (3 sockets each)",
        nofile, server.admission.max_connections, server.admission.max_connections // 3)
    scheme = "TLS" if config.tls_cert else "plaintext"
    if config.cluster:
        from selchat.cluster.resp import parse_url

        scheme += f", cluster {parse_url(config.cluster).redacted()}"
    click.echo(f"selchat {__version__} listening on {address[0]}:{address[1]} ({scheme}, database {describe_db(config.db)})")
    if server.irc is not None:
        for kind, (host, port, *_) in server.irc.addresses:
            click.echo(f"IRC clients: {host}:{port} ({kind})")
    sys.stdout.flush()
    systemd.notify("READY=1", f"STATUS=listening on {address[0]}:{address[1]}")
    server.serve_forever()


def _missing_dir(path: str) -> str:
    if is_postgres_url(path):
        return ""
    folder = os.path.dirname(os.path.abspath(path))
    return "" if os.path.isdir(folder) else f" (no directory {folder})"


def _listen_error(server, config: ServerConfig, exc: OSError) -> str:
    """Which of the listeners failed, and why. Server.listen binds the chat
    port first, then the metrics one, then the admin socket."""
    why = exc.strerror or str(exc)
    if server.listener is None:
        return f"cannot listen on {config.host}:{config.port}: {why}"
    if (exc.strerror or "").startswith("IRC port"):  # selchat.irc.frontend names the port
        return f"cannot listen on {exc.strerror}"
    if config.metrics and server.metrics_endpoint is None:
        return f"cannot serve metrics on {config.metrics}: {why}"
    if str(exc).startswith("admin socket"):  # control.ControlError says which and why
        return f"cannot open the {exc}"
    return f"cannot open the admin socket {config.admin_socket}: {why}"


def _abandon(server) -> None:
    """Let go of a server that will not run (its threads, its database)."""
    for close in (server.accounts.close, server.reactor.close):
        try:
            close()
        except Exception:  # already failing; the first error is the one to show
            pass


# -- user ---------------------------------------------------------------------------

@main.group()
@click.option("--db", envvar="SELCHAT_DB", default=DEFAULT_DB_PATH, show_default=True, metavar="PATH|URL",
              help="Account database: a SQLite file or a postgresql:// URL.")
@click.pass_context
def user(ctx, db):
    """Manage accounts in the database (the server may be running)."""
    ctx.obj["db"] = db


def _open_store(ctx):
    from selchat.store import open_store
    from selchat.store.accounts import StoreError

    try:
        return open_store(ctx.obj["db"])
    except StoreError as exc:
        raise click.ClickException(str(exc))


def _with_store(ctx, action):
    """``action(store)`` on the account database; a StoreError is the command's error."""
    from selchat.store.accounts import StoreError

    with _open_store(ctx) as store:
        try:
            return action(store)
        except StoreError as exc:
            raise click.ClickException(str(exc))


@user.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from the first line of stdin (else $SELCHAT_PASSWORD, else a hidden prompt).")
@click.option("--password", "old_password", hidden=True,
              help="Removed: a password on the command line shows in ps.")
@click.pass_context
def user_add(ctx, name, password_stdin, old_password):
    """Create account NAME. The password comes from --password-stdin,
    $SELCHAT_PASSWORD or a hidden prompt (asked twice), never from an argument."""
    if old_password is not None:
        raise click.UsageError("--password was removed (the password would show in ps): "
                               "use --password-stdin, SELCHAT_PASSWORD or the prompt")
    password = _new_password(password_stdin)
    canonical = _with_store(ctx, lambda store: store.add_user(name, password))
    click.echo(f"added {canonical}")


def _new_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise click.ClickException("no password on stdin (--password-stdin reads its first line)")
        return password
    password = os.environ.get("SELCHAT_PASSWORD")
    if password:
        return password
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True,
              help="Read the new password from the first line of stdin (else $SELCHAT_PASSWORD, else a hidden prompt).")
@click.pass_context
def user_passwd(ctx, name, password_stdin):
    """Set a new password for account NAME (an operator's reset: the old one
    is not asked for; a user changes their own with /password in selchat
    connect). A logged-in user stays online; the new password is for their
    next login."""
    password = _new_password(password_stdin)
    if not _with_store(ctx, lambda store: store.set_password(name, password)):
        raise click.ClickException(f"no user {name}")
    click.echo(f"password set for {name}")


@user.command("del")
@click.argument("name")
@click.pass_context
def user_del(ctx, name):
    """Delete account NAME (a logged-in user stays online until they leave)."""
    if not _with_store(ctx, lambda store: store.delete_user(name)):
        raise click.ClickException(f"no user {name}")
    click.echo(f"deleted {name}")


@user.command("lock")
@click.argument("name")
@click.argument("words", nargs=-1, metavar="[REASON...]")
@click.pass_context
def user_lock(ctx, name, words):
    """Lock account NAME (abuse): its password no longer logs it in (a login
    with it is told the REASON, if any), and the name stays taken. Locking
    again replaces the reason. A logged-in user stays online until they leave
    or are kicked (`selchat admin kick NAME`; `selchat admin lock` does both)."""
    reason = " ".join(words)
    canonical = _with_store(ctx, lambda store: store.lock_user(name, reason))
    if canonical is None:
        raise click.ClickException(f"no user {name}")
    click.echo(f"locked {canonical}")


@user.command("unlock")
@click.argument("name")
@click.pass_context
def user_unlock(ctx, name):
    """Unlock account NAME: its password logs it in again."""
    def unlock(store):
        canonical = store.unlock_user(name)
        if canonical is None:
            existing = store.canonical_name(name)
            raise click.ClickException(f"{existing} is not locked" if existing else f"no user {name}")
        return canonical

    click.echo(f"unlocked {_with_store(ctx, unlock)}")


@user.command("list")
@click.pass_context
def user_list(ctx):
    """List accounts, with their creation time (UTC), one a line, tab-separated;
    a locked account has a third column, `locked: REASON`."""
    users, locked = _with_store(ctx, lambda store: (store.list_users(), store.locked_users()))
    for name, created in users:
        line = f"{name}\t{created}"
        if name in locked:
            line += f"\tlocked: {locked[name]}"
        click.echo(line)


# -- connect --------------------------------------------------------------------------

from selchat.admin import admin  # noqa: E402
from selchat.bench.command import bench  # noqa: E402  (heavy modules load lazily)
from selchat.client.command import connect  # noqa: E402

main.add_command(connect)
main.add_command(bench)
main.add_command(admin)


if __name__ == "__main__":
    main()
