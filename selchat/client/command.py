"""``selchat connect``: the click command that ``selchat/cli.py`` adds to the group.

Everything that needs a person (the user name, a hidden password prompt,
"retry?") happens here, before the loop starts; ``app.run`` does the rest.

Where an option's value comes from, first found wins (click's order): the
command line, the option's environment variable, the config file (through
``ctx.default_map``, filled by the eager ``--config`` option before any other
is read), the default. ``NO_COLOR`` counts as the environment variable of
``--color/--no-color``.

``--host`` may list several servers (``a:7117,b:7117``): they are parsed
here, before any prompt (``servers.parse``; a bad entry is a usage error),
and ``servers.Failover`` says how the client goes from one to the next.

``--tls`` is off unless asked for; ``--ca`` (from wherever it comes) turns
it on, and only an explicit ``--no-tls`` (or ``SELCHAT_TLS=0``, ``tls = false``)
keeps it off, ``--ca`` then unused: a CA given is never silently a
plaintext connection.

Exit codes: 0 ok, 1 login failed or bad usage, 2 server unreachable (also:
its TLS certificate is not trusted, or it does not speak TLS),
3 connection lost.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from selchat.client import app, config, core, servers
from selchat.client import tls as clienttls
from selchat.client.ui import JsonUI, ScriptedUI

PASSWORD_ENV = "SELCHAT_PASSWORD"


class _Command(click.Command):
    """A click command whose usage errors exit 1, not click's 2 (2 is "unreachable")."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as err:
            err.exit_code = core.EXIT_LOGIN
            raise


def _fail(text: str) -> None:
    click.echo(f"error: {text}", err=True)
    sys.exit(core.EXIT_LOGIN)


def _is_interactive() -> bool:
    """A prompt needs a terminal on both sides; anything else is scripted."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def _get_user(user: str | None, interactive: bool) -> str:
    if not user:
        if not interactive:
            _fail("--user (or SELCHAT_USER) is required when stdin is not a terminal")
        user = click.prompt("user name").strip()
    problem = core.check_username(user)
    if problem:
        _fail(problem)
    return user


def _get_password(interactive: bool, register: bool) -> str:
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        if not interactive:
            _fail(f"set {PASSWORD_ENV} to the password: scripted mode cannot prompt for it")
        password = click.prompt(
            "choose a password" if register else "password",
            hide_input=True,
            confirmation_prompt="repeat the password" if register else False,
        )
    problem = core.check_password(password)
    if problem:
        _fail(problem)
    return password


def _check_tls(tls: bool | None, ca: str | None) -> tuple[bool, str | None]:
    """Whether to use TLS, and the CA file (checked now, before any prompt)."""
    if tls is None:
        tls = ca is not None   # --ca implies --tls
    if not tls:
        return False, None
    if ca is not None:
        ca = os.path.expanduser(ca)
        try:
            clienttls.client_context(ca)
        except clienttls.CAError as err:
            _fail(f"--ca {err}")
    return True, ca


def _check_servers(host: str, port: int) -> tuple[servers.Server, ...]:
    try:
        return servers.parse(host, port)
    except servers.ServerListError as err:
        _fail(f"--host: {err}")


def _ask_retry() -> bool:
    return click.confirm("retry?", default=True)


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """Eager: read the config file into ``ctx.default_map`` before the other options."""
    path = Path(value).expanduser() if value else config.default_path()
    try:
        defaults = config.read(path, required=bool(value))
    except config.ConfigError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param)
    if os.environ.get("NO_COLOR"):   # https://no-color.org: set and not empty
        defaults["color"] = False    # an environment variable outranks the file
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return str(path)


@click.command("connect", cls=_Command)
@click.option("--config", "config_path", envvar="SELCHAT_CONFIG", metavar="PATH", is_eager=True,
              expose_value=False, callback=_load_config,
              help="Read option defaults from this TOML file (env SELCHAT_CONFIG; default "
                   "$XDG_CONFIG_HOME/selchat/config.toml, else ~/.config/selchat/config.toml).")
@click.option("--host", envvar="SELCHAT_HOST", default="127.0.0.1", show_default=True,
              metavar="HOST[,HOST...]",
              help="Server host name or address; or several servers, comma-separated, each HOST, HOST:PORT "
                   "or [IPv6]:PORT, tried in this order and failed over between (env SELCHAT_HOST).")
@click.option("--port", envvar="SELCHAT_PORT", default=7117, show_default=True,
              type=click.IntRange(1, 65535), metavar="PORT",
              help="Server TCP port, for --host entries without one (env SELCHAT_PORT).")
@click.option("--tls/--no-tls", envvar="SELCHAT_TLS", default=None,
              help="Speak TLS on all three sockets; the server's certificate must be trusted (system store, "
                   "or --ca) and name the --host entry in use (env SELCHAT_TLS=1). Default: off, on when --ca "
                   "is given.")
@click.option("--ca", envvar="SELCHAT_CA", metavar="PATH",
              help="Trust only the CA certificates in this PEM file, not the system store (env SELCHAT_CA); "
                   "implies --tls.")
@click.option("--user", envvar="SELCHAT_USER", metavar="NAME",
              help="User name (env SELCHAT_USER); asked for when missing in interactive mode.")
@click.option("--register", is_flag=True,
              help="Create the account, then log in. The password comes from SELCHAT_PASSWORD "
                   "or is asked for twice.")
@click.option("--retry", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="If the server is unreachable at start, try N more times (1 s apart, doubling up to 8 s); "
                   "with several servers, N more rounds of all of them.")
@click.option("--reconnect/--no-reconnect", default=None,
              help="When the connection is lost, reconnect (capped exponential backoff with jitter) and "
                   "resume the session (protocol version 2: the chat goes on, nothing is lost or shown "
                   "twice), or else log in again. Default: on in interactive mode, off in scripted and "
                   "--json mode.")
@click.option("--ping-interval", default=30.0, show_default=True, type=click.FloatRange(min=0.05),
              metavar="SECONDS", help="Send a heartbeat PING this often.")
@click.option("--ping-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.05),
              metavar="SECONDS",
              help="Give up when the server has been silent for the ping interval plus this long.")
@click.option("--json", "json_mode", is_flag=True,
              help="Print one JSON object per event on stdout (see the README for the fields); "
                   "read commands from stdin as in scripted mode, also on a terminal.")
@click.option("--color/--no-color", default=None,
              help="Colours on a terminal (default on; NO_COLOR set turns them off).")
@click.option("--bell/--no-bell", default=True, show_default=True,
              help="Ring the terminal bell when a chat request arrives.")
@click.option("--timestamps/--no-timestamps", default=None,
              help="Start each line with the time. Default: on in interactive mode, off in scripted mode.")
@click.option("--timestamp-format", default="%H:%M", show_default=True, metavar="FORMAT",
              help="strftime format of the timestamps, e.g. '%H:%M:%S' (%f: microseconds).")
def connect(host, port, tls, ca, user, register, retry, reconnect, ping_interval, ping_timeout, json_mode,
            color, bell, timestamps, timestamp_format):
    """Log in to a selchat server and chat.

    On a terminal this is an interactive prompt (/help lists the commands).
    Otherwise lines are read from stdin as if typed and every event is printed
    as one line on stdout (or, with --json, as one JSON object); at the end of
    stdin the client logs out. The password is read from SELCHAT_PASSWORD
    (required when not on a terminal).

    With --tls every socket is encrypted and the server's certificate is
    checked; a certificate that cannot be trusted exits 2.

    With several servers (--host a:7117,b:7117) the client tries them in
    order, each at once when the one before fails, and waits only after all
    have failed. It stays on the one that worked; when that connection is
    lost it tries the same server again (at once if the connection had
    lasted 5 s), then the next ones at once. It says which server it
    connected to (on stderr in scripted mode).

    Exit codes: 0 ok, 1 login failed or bad usage, 2 server unreachable (or
    not trusted, or not speaking TLS when asked to), 3 connection lost.
    """
    server_list = _check_servers(host, port)
    tls, ca = _check_tls(tls, ca)
    interactive = not json_mode and _is_interactive()
    user = _get_user(user, interactive)
    password = _get_password(interactive, register)
    if reconnect is None:
        reconnect = interactive
    if timestamps is None:
        timestamps = interactive
    settings = app.Settings(host=host, port=port, user=user, password=password, register=register,
                            retry=retry, ping_interval=ping_interval, ping_timeout=ping_timeout,
                            reconnect=reconnect, tls=tls, ca=ca, servers=server_list)
    stamps = timestamp_format if timestamps else None
    if json_mode:
        ui = JsonUI()
    elif interactive:
        from selchat.client.interactive import InteractiveUI   # prompt_toolkit: only on a terminal

        if color is None:
            color = os.environ.get("TERM") != "dumb"
        ui = InteractiveUI(color=color, bell=bell, timestamp_format=stamps)
    else:
        ui = ScriptedUI(timestamp_format=stamps)
    sys.exit(app.run(settings, ui, ask_retry=_ask_retry if interactive else None))
