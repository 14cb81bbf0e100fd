"""``selchat connect``: the click command that ``selchat/cli.py`` adds to the group.

Everything that needs a person (the user name, a hidden password prompt,
"retry?") happens here, before the loop starts; ``app.run`` does the rest.

Exit codes: 0 ok, 1 login failed or bad usage, 2 server unreachable,
3 connection lost.
"""

from __future__ import annotations

import os
import sys

import click

from selchat.client import app, core
from selchat.client.ui import InteractiveUI, ScriptedUI

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


def _ask_retry() -> bool:
    return click.confirm("retry?", default=True)


@click.command("connect", cls=_Command)
@click.option("--host", envvar="SELCHAT_HOST", default="127.0.0.1", show_default=True,
              metavar="HOST", help="Server host name or address (env SELCHAT_HOST).")
@click.option("--port", envvar="SELCHAT_PORT", default=7117, show_default=True,
              type=click.IntRange(1, 65535), metavar="PORT", help="Server TCP port (env SELCHAT_PORT).")
@click.option("--user", envvar="SELCHAT_USER", metavar="NAME",
              help="User name (env SELCHAT_USER); asked for when missing in interactive mode.")
@click.option("--register", is_flag=True,
              help="Create the account, then log in. The password comes from SELCHAT_PASSWORD "
                   "or is asked for twice.")
@click.option("--retry", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="If the server is unreachable, try N more times (1 s apart, doubling up to 8 s).")
@click.option("--ping-interval", default=30.0, show_default=True, type=click.FloatRange(min=0.05),
              metavar="SECONDS", help="Send a heartbeat PING this often.")
@click.option("--ping-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.05),
              metavar="SECONDS",
              help="Give up when the server has been silent for the ping interval plus this long.")
def connect(host, port, user, register, retry, ping_interval, ping_timeout):
    """Log in to a selchat server and chat.

    On a terminal this is an interactive prompt (/help lists the commands).
    Otherwise lines are read from stdin as if typed and every event is printed
    as one line on stdout; at the end of stdin the client logs out. The
    password is read from SELCHAT_PASSWORD (required when not on a terminal).

    Exit codes: 0 ok, 1 login failed or bad usage, 2 server unreachable,
    3 connection lost.
    """
    interactive = _is_interactive()
    user = _get_user(user, interactive)
    password = _get_password(interactive, register)
    settings = app.Settings(host=host, port=port, user=user, password=password, register=register,
                            retry=retry, ping_interval=ping_interval, ping_timeout=ping_timeout)
    ui = InteractiveUI() if interactive else ScriptedUI()
    sys.exit(app.run(settings, ui, ask_retry=_ask_retry if interactive else None))
