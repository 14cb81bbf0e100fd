"""The admin control socket: a Unix stream socket that ``selchat admin`` talks to.

It runs on the server's own reactor, like the chat listener: accepting,
reading and answering never block, and no admin client can cost the loop
more than a bounded amount of work. The protocol is one JSON object per line
each way::

    {"cmd": "who"}                              -> {"ok": true, "sessions": [...]}
    {"cmd": "kick", "user": "bob"}              -> {"ok": true, "user": "bob", "node": "here"}
    {"cmd": "lock", "user": "bob", "text": "spam"} -> {"ok": true, "user": "bob", "kicked": "here"}
    {"cmd": "unlock", "user": "bob"}            -> {"ok": true, "user": "bob"}
    {"cmd": "broadcast", "text": "back in 5"}   -> {"ok": true, "users": 3}
    {"cmd": "frobnicate"}                       -> {"ok": false, "error": "unknown command ..."}

Replies come in the order of the requests: while a ``reload``, ``lock`` or
``unlock`` waits for its worker, later requests on that connection wait too
(reading is paused).
Garbage (bad JSON, a non-object, a missing or unknown command) gets an error
reply and the connection stays usable; a line over ``MAX_LINE`` bytes gets an
error reply and the connection is closed, since where the next request starts
is then unknown.

Who may connect is decided by the file system: the socket is created with
mode 0600 (bound under a umask of 0o177, so it is never accessible to anyone
else, even for an instant), so only the server's own user (and root) can
connect. Docs: docs/operations.md, "Admin commands".
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time

from selchat import __version__
from selchat.protocol import codec
from selchat.protocol.errors import FrameError
from selchat.reactor.listener import Listener
from selchat.reactor.transport import Transport
from selchat.server import audit
from selchat.server.logins import UNAVAILABLE
from selchat.server.session import Phase

log = logging.getLogger("selchat.server")

#: Longest request line, in bytes (a broadcast text is at most a frame anyway).
MAX_LINE = 16 * 1024
#: Admin connections open at once; one more is refused with an error reply.
MAX_CLIENTS = 16
#: An admin connection that sends nothing for this long is closed.
IDLE_TIMEOUT = 60.0
#: Longest kick or broadcast text, in bytes: it must fit in one server frame.
MAX_TEXT = codec.MAX_FRAME - 64

COMMANDS = ("status", "who", "kick", "lock", "unlock", "broadcast", "reload")


class ControlError(OSError):
    """The control socket cannot be created (a live server there, not a socket...)."""


class RequestError(Exception):
    """A request that is refused; its text is the reply's ``error``."""


def bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600.

    A socket file nobody answers on (left by a server that was killed) is
    removed; one a live server answers on, or a file that is not a socket,
    is an error: we never take over another server's socket or delete
    someone's file.
    """
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ControlError(f"admin socket {path}: the file exists and is not a socket")
        if _answers(path):
            raise ControlError(f"admin socket {path}: another server is answering there")
        os.unlink(path)
        log.info("removed the stale admin socket %s", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # created 0600: no window in which others could connect
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)  # whatever the file system did with the umask
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        sock.close()
        raise ControlError(f"admin socket {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _answers(path: str) -> bool:
    """Whether a server accepts connections at the socket file ``path``.

    Called once at start, before the loop runs, so it may block (briefly)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:  # a full backlog, no permission: something is there
        raise ControlError(f"admin socket {path}: cannot tell whether a server answers there: {exc}") from exc
    finally:
        probe.close()
    return True


class ControlSocket:
    """The control listener and its connections, on ``server``'s reactor."""

    def __init__(self, server, path: str):
        self.server = server
        self.path = path
        sock = bind_unix(path)
        # Remember which file we made, so that closing never removes a
        # socket another server has put at the same path since.
        self._inode = os.stat(path).st_ino
        self.connections: set[ControlConnection] = set()
        self.listener = Listener(server.reactor, sock, self._accept, max_per_turn=MAX_CLIENTS)
        self._commands = {
            "status": self.status, "who": self.who, "kick": self.kick, "lock": self.lock, "unlock": self.unlock,
            "broadcast": self.broadcast, "reload": self.reload,
        }
        log.info("admin socket at %s", path)

    def _accept(self, sock: socket.socket, address) -> None:
        if len(self.connections) >= MAX_CLIENTS:
            try:
                sock.send(_encode(_error(f"too many admin connections (at most {MAX_CLIENTS})")))
            except OSError:
                pass
            sock.close()
            return
        self.connections.add(ControlConnection(self, sock))

    def close(self) -> None:
        """Stop accepting, remove the socket file, let open connections finish."""
        self.listener.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass  # already gone
        for conn in list(self.connections):
            conn.transport.close()

    # -- requests ---------------------------------------------------------------

    def handle(self, line: bytes, reply_later) -> dict | None:
        """The reply to one request line, or None if ``reply_later(reply)`` will be called."""
        try:
            request = json.loads(line)
        except ValueError as exc:  # bad UTF-8 too (UnicodeDecodeError is a ValueError)
            return _error(f"bad JSON: {exc}")
        except RecursionError:  # "[[[[..." deeper than the interpreter's stack
            return _error("bad JSON: nested too deeply")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _error('a request is a JSON object with a "cmd" string, e.g. {"cmd": "status"}')
        command = self._commands.get(request["cmd"])
        if command is None:
            return _error(f"unknown command {request['cmd'][:40]!r}; the commands are {', '.join(COMMANDS)}")
        try:
            return command(request, reply_later)
        except RequestError as exc:
            return _error(str(exc))
        except Exception as exc:  # our bug: say so, keep the loop
            log.exception("admin command %s failed", request["cmd"])
            return _error(f"internal error: {exc!r}")

    def status(self, request: dict, reply_later) -> dict | None:
        server = self.server
        listening = {"chat": _address(server.listener.address), "admin": self.path}
        if server.metrics_endpoint is not None:
            listening["metrics"] = _address(server.metrics_endpoint.address)
        online = server.hub.online.values()
        cluster = None
        if server.cluster is not None:
            node = server.cluster
            cluster = {"redis": node.link.config.redacted(), "node": node.node_id or None,
                       "joined": node.up, "fences": node.fences}
        result = {
            "ok": True,
            "version": __version__,
            "pid": os.getpid(),
            "started_at": server.started_at,
            "uptime": time.time() - server.started_at,
            "listening": listening,
            "tls": server.tls is not None,
            "config_file": server.config.config_file,
            "sessions": len(server.sessions),
            "online": len(online),
            "chats": sum(1 for s in online if s.partner is not None) // 2,
            "sockets": len(server.peers),
            "cluster": cluster,
        }
        if cluster is None:
            return result

        def counted(users) -> None:  # every node's sessions, from Redis
            cluster["users"] = users
            reply_later(result)

        server.cluster.census(counted)
        return None

    def who(self, request: dict, reply_later) -> dict:
        sessions = sorted(self.server.sessions.values(), key=lambda s: s.key)
        return {"ok": True, "sessions": [_describe(s) for s in sessions]}

    def kick(self, request: dict, reply_later) -> dict | None:
        user = _string(request, "user")
        text = _text(request, "text", default="kicked by an operator")

        def kicked(where) -> dict:
            if where is False:
                return _error(UNAVAILABLE)
            if where is None:
                return _error(f"{user} is not online")
            audit.emit("admin", cmd="kick", user=user, text=text, node=where)
            return {"ok": True, "user": user, "node": where}

        if self.server.kick(user, text):
            return kicked("here")
        if self.server.cluster is None:
            raise RequestError(f"{user} is not online")
        self.server.cluster.kick_elsewhere(user.lower(), text, lambda node: reply_later(kicked(node)))
        return None

    def lock(self, request: dict, reply_later) -> None:
        """Lock the account in the database (a worker's write), then end its
        session here, if it has one: its password no longer logs it in."""
        user = _string(request, "user")
        reason = _text(request, "text", default="")

        text = f"your account is locked: {reason}" if reason else "your account is locked"

        def locked(name: str | None) -> dict | None:
            if name is None:
                return _error(f"there is no account {user}")
            self.server.logins.locked(name)  # and its logins under way, here and on the other nodes
            if self.server.kick(name, text):
                return done(name, "here")
            if self.server.cluster is None:
                return done(name, None)
            self.server.cluster.kick_elsewhere(name.lower(), text, lambda node: reply_later(done(name, node)))
            return None

        def done(name: str, where) -> dict:
            """``where``: "here", another node's id, None (not online) or
            False (the cluster cannot say: locked all the same)."""
            audit.emit("admin", cmd="lock", user=name, text=reason, node="?" if where is False else where or "-")
            if where is False:
                return _error(f"{name} is locked, but whether a session of it is online elsewhere is not known: "
                              f"{UNAVAILABLE}")
            return {"ok": True, "user": name, "kicked": where}

        self._in_store(reply_later, "not locked", locked, self.server.accounts.lock_user, user, reason)

    def unlock(self, request: dict, reply_later) -> None:
        user = _string(request, "user")

        def unlocked(name: str | None) -> dict:
            if name is None:
                return _error(f"{user} is not a locked account")
            audit.emit("admin", cmd="unlock", user=name)
            return {"ok": True, "user": name}

        self._in_store(reply_later, "not unlocked", unlocked, self.server.accounts.unlock_user, user)

    @staticmethod
    def _in_store(reply_later, failed: str, then, call, *args) -> None:
        """``call(*args, done)``, one of the account store's calls on a
        worker; then ``reply_later(then(result))`` on the loop, or an error
        reply that starts with ``failed``."""
        def done(future) -> None:
            try:
                result = future.result()
            except Exception as exc:
                reply_later(_error(f"{failed}: {exc}"))
                return
            reply = then(result)
            if reply is not None:  # else ``then`` replies later itself
                reply_later(reply)

        call(*args, done)

    def broadcast(self, request: dict, reply_later) -> dict:
        text = _text(request, "text")
        users = self.server.broadcast(text)
        audit.emit("admin", cmd="broadcast", users=users, text=text)
        if self.server.cluster is not None:  # the other nodes tell theirs
            return {"ok": True, "users": users, "cluster": True}
        return {"ok": True, "users": users}

    def reload(self, request: dict, reply_later) -> None:
        def done(ok: bool, message: str) -> None:  # on the loop, after the worker
            audit.emit("admin", cmd="reload", ok=ok, message=message)
            reply_later({"ok": True, "message": message} if ok else _error(message))

        self.server.reload(done)


class ControlConnection:
    """One admin client: the Transport's protocol object, reading request lines."""

    __slots__ = ("control", "transport", "buffer", "waiting", "paused", "timer")

    def __init__(self, control: ControlSocket, sock: socket.socket):
        self.control = control
        self.buffer = bytearray()
        self.waiting = False  # a reply is owed (a reload is running): read on after it
        self.paused = False   # the client is not reading its replies
        loop = control.server.reactor
        self.transport = Transport(loop, sock, self)
        self.timer = loop.call_later(IDLE_TIMEOUT, self._idle)

    # -- the Transport's protocol interface -------------------------------------

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.timer.reset(IDLE_TIMEOUT)
        self._process()

    def eof_received(self) -> None:
        # A request line without its newline is still a request (``printf ... | nc -U``);
        # it is answered before the close that eof_received leads to.
        if self.buffer and not self.waiting:
            self.buffer += b"\n"
            self._process()
        if not self.waiting:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.timer.cancel()
        self.control.connections.discard(self)

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self._resume()

    # -- requests ---------------------------------------------------------------

    def _process(self) -> None:
        """Answer every complete request line buffered, unless we must wait."""
        while not (self.waiting or self.paused or self.transport.closing):
            end = self.buffer.find(b"\n", 0, MAX_LINE + 1)
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self.transport.write(_encode(_error(f"request line longer than {MAX_LINE} bytes")))
                    self.transport.close()
                return
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            if not line.strip():
                continue  # blank lines (``nc`` users pressing Enter) are no request
            reply = self.control.handle(line, self._reply_later)
            if reply is None:
                self.waiting = True
                self.transport.pause_reading()
            else:
                self.transport.write(_encode(reply))

    def _reply_later(self, reply: dict) -> None:
        """The owed reply is ready: send it, then go on with what came meanwhile."""
        if self.transport.closing:
            return
        self.waiting = False
        self.transport.write(_encode(reply))
        self.timer.reset(IDLE_TIMEOUT)
        self._resume()

    def _resume(self) -> None:
        if self.waiting or self.paused:
            return
        if self.transport.closing:
            return
        self.transport.resume_reading()
        self._process()

    def _idle(self) -> None:
        if self.waiting:  # a slow reload is not the client's silence
            self.timer.reset(IDLE_TIMEOUT)
        else:
            self.transport.close()


# -- helpers --------------------------------------------------------------------------

def _encode(reply: dict) -> bytes:
    return json.dumps(reply).encode("ascii") + b"\n"


def _error(text: str) -> dict:
    return {"ok": False, "error": text}


def _string(request: dict, key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError(f'"{request["cmd"]}" needs "{key}", a non-empty string')
    return value


def _text(request: dict, key: str, default: str | None = None) -> str:
    """A text that goes into a frame to users: one line, no control characters."""
    if default is not None and key not in request:
        return default
    value = _string(request, key)
    data = value.encode("utf-8", "surrogatepass")
    if len(data) > MAX_TEXT:
        raise RequestError(f'"{key}" is longer than {MAX_TEXT} bytes')
    try:
        codec.decode_text(data)
    except FrameError:
        raise RequestError(f'"{key}" must be valid UTF-8 text on one line, without control characters') from None
    return value


def _address(address: tuple) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(session) -> dict:
    """One line of ``who``: what an operator wants to know about a session."""
    if session.phase is Phase.ATTACHING:
        state = "attaching"
    elif session.busy:
        state = "busy"
    else:
        state = "idle"
    request = session.request
    if request is None:
        asking = None
    elif request.source is session:
        asking = {"to": request.target.name}
    else:
        asking = {"from": request.source.name}
    return {
        "name": session.name,
        "state": state,
        "partner": session.partner.name if session.partner is not None else None,
        "request": asking,
        "address": session.login.host if session.login is not None else None,
        "since": session.since,
    }
