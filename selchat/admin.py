"""``selchat admin``: manage a running server over its control socket.

Each subcommand sends one JSON request line to the socket that ``selchat
serve --admin-socket PATH`` created, reads the one reply line, and prints it
for a person (or, with ``--json``, as it came). The protocol is in
``selchat/server/control.py``; docs/operations.md ("Admin commands") is the
operator's view.

Exit codes: 0 done, 1 the server refused (a user not online, a failed
reload) or bad usage, 2 no server answers at the socket.
"""

from __future__ import annotations

import datetime
import json
import socket
import sys

import click

DEFAULT_SOCKET = "selchat.sock"
EXIT_REFUSED = 1
EXIT_NO_SERVER = 2
#: How long to wait for a reply; a reload re-reads files on a worker, so it gets longer.
TIMEOUT = 10.0
RELOAD_TIMEOUT = 60.0


class _Command(click.Command):
    """Usage errors exit 1, not click's 2 (2 is "no server")."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as err:
            err.exit_code = EXIT_REFUSED
            raise


class _Group(_Command, click.Group):
    command_class = _Command


class NoServer(Exception):
    """Nobody answered at the socket; the text says what happened."""


def request(path: str, message: dict, timeout: float = TIMEOUT) -> dict:
    """Send one request to the control socket at ``path``; return the reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoServer(f"no selchat server at {path} (is `selchat serve --admin-socket {path}` running?)") from None
        except OSError as exc:
            raise NoServer(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(message).encode("ascii") + b"\n")
            reply = sock.makefile("rb").readline()
        except socket.timeout:
            raise NoServer(f"the server at {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise NoServer(f"lost the connection to {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not reply.endswith(b"\n"):
        raise NoServer(f"the server at {path} closed the connection without answering")
    return json.loads(reply)


@click.group(cls=_Group)
@click.option("--socket", "path", envvar="SELCHAT_ADMIN_SOCKET", default=DEFAULT_SOCKET, show_default=True,
              metavar="PATH", help="The server's control socket (selchat serve --admin-socket).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's reply as JSON, as it came.")
@click.pass_context
def admin(ctx, path, as_json):
    """Manage a running server: status, who, kick, lock, unlock, broadcast, reload.

    Exit codes: 0 done, 1 refused by the server (or bad usage), 2 no server
    answers at the socket.
    """
    ctx.obj = {"socket": path, "json": as_json}


def _run(ctx: click.Context, message: dict, show, timeout: float = TIMEOUT, failed: str | None = "error") -> None:
    """Ask the server, print its reply with ``show(reply)`` (or ``failed: <its
    error>`` on stderr; the error alone if ``failed`` is None), exit with the right code."""
    try:
        reply = request(ctx.obj["socket"], message, timeout)
    except NoServer as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_NO_SERVER)
    if ctx.obj["json"]:
        click.echo(json.dumps(reply))
    elif reply.get("ok"):
        show(reply)
    else:
        error = reply.get("error", "refused")
        click.echo(error if failed is None else f"{failed}: {error}", err=True)
    if not reply.get("ok"):
        sys.exit(EXIT_REFUSED)


@admin.command()
@click.pass_context
def status(ctx):
    """Version, uptime, addresses, sessions, chats, sockets."""
    def show(r):
        listening = r["listening"]
        rows = [
            ("version", f"selchat {r['version']}"),
            ("pid", r["pid"]),
            ("uptime", f"{_duration(r['uptime'])} (since {_when(r['started_at'])})"),
            ("chat", f"{listening['chat']} ({'TLS' if r['tls'] else 'plaintext'})"),
            ("metrics", listening.get("metrics", "off")),
            ("admin socket", listening["admin"]),
            ("config file", r["config_file"] or "none"),
            ("sessions", f"{r['sessions']} ({r['online']} online, {r['sessions'] - r['online']} attaching)"),
            ("chats", r["chats"]),
            ("sockets", r["sockets"]),
        ]
        cluster = r.get("cluster")
        if cluster:
            state = f"node {cluster['node']}" if cluster["joined"] else "not joined (fenced or joining)"
            rows.append(("cluster", f"{cluster['redis']}: {state}, fenced {cluster['fences']} times"))
            users = cluster.get("users")
            if users is not None:
                each = ", ".join(f"{node or 'away'}: {n}" for node, n in sorted(users.items()))
                rows.append(("all nodes", f"{sum(users.values())} sessions" + (f" ({each})" if each else "")))
        for key, value in rows:
            click.echo(f"{key + ':':<14}{value}")

    _run(ctx, {"cmd": "status"}, show)


@admin.command()
@click.pass_context
def who(ctx):
    """Every session: name, state, partner, address, since when."""
    def show(r):
        if not r["sessions"]:
            click.echo("nobody is online")
            return
        rows = [("NAME", "STATE", "PARTNER", "ADDRESS", "SINCE")]
        for s in r["sessions"]:
            rows.append((s["name"], s["state"], _partner(s), s["address"] or "-", _when(s["since"])))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])

    _run(ctx, {"cmd": "who"}, show)


@admin.command()
@click.argument("name")
@click.argument("words", nargs=-1, metavar="[REASON...]")
@click.option("--message", "text", metavar="TEXT", help="What the user is told (BYE kicked TEXT); or give it as REASON.")
@click.pass_context
def kick(ctx, name, words, text):
    """End NAME's session (in a cluster, on whichever node holds it); their
    chat partner is told the chat ended.

    The reason may follow the name, as in IRC's KICK: `kick mallory stop spamming`."""
    if words and text is not None:
        raise click.UsageError("give the reason as REASON or as --message, not both")
    if words:
        text = " ".join(words)
    message = {"cmd": "kick", "user": name}
    if text is not None:
        message["text"] = text
    _run(ctx, message, lambda r: click.echo(f"kicked {r['user']}" + _elsewhere(r.get("node"))))


@admin.command()
@click.argument("name")
@click.argument("words", nargs=-1, metavar="[REASON...]")
@click.pass_context
def lock(ctx, name, words):
    """Lock account NAME and end its session: its password no longer logs it
    in (it is told the REASON), and the name stays taken.

    The lock is in the account database, so every server sharing it refuses
    the account; in a cluster, the node holding the session ends it.
    `selchat user lock` locks offline (a session then lasts until kicked)."""
    message = {"cmd": "lock", "user": name}
    if words:
        message["text"] = " ".join(words)
    _run(ctx, message, lambda r: click.echo(f"locked {r['user']}" + (
        f" (session ended{_elsewhere(r['kicked'])})" if r["kicked"] else "")))


@admin.command()
@click.argument("name")
@click.pass_context
def unlock(ctx, name):
    """Unlock account NAME: its password logs it in again."""
    _run(ctx, {"cmd": "unlock", "user": name}, lambda r: click.echo(f"unlocked {r['user']}"))


@admin.command()
@click.argument("words", nargs=-1, required=True, metavar="TEXT...")
@click.pass_context
def broadcast(ctx, words):
    """Send TEXT to every online user (a NOTICE on their login socket), on
    every node of a cluster.

    Several words are joined with spaces, so TEXT needs no quotes."""
    text = " ".join(words)
    def show(r):
        users = r["users"]
        told = f"told {users} user{'' if users == 1 else 's'}"
        click.echo(f"{told} here, and sent to the other nodes of the cluster" if r.get("cluster") else told)

    _run(ctx, {"cmd": "broadcast", "text": text}, show)


@admin.command()
@click.pass_context
def reload(ctx):
    """Re-read the config and MOTD files, as SIGHUP does; print the result."""
    # The server's message says it all: "reloaded: ..." or "reload failed, keeping the old settings: ...".
    _run(ctx, {"cmd": "reload"}, lambda r: click.echo(r["message"]), timeout=RELOAD_TIMEOUT, failed=None)


# -- formatting -------------------------------------------------------------------------

def _elsewhere(node) -> str:
    """" on node X" for a session another node of a cluster held, else ""."""
    return f" on node {node}" if node and node != "here" else ""


def _partner(session: dict) -> str:
    if session["partner"]:
        return session["partner"]
    request = session["request"]
    if request:
        return f"(asking {request['to']})" if "to" in request else f"(asked by {request['from']})"
    return "-"


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{seconds}s")
    return " ".join(parts)
