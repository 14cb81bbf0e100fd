"""The server: accepts sockets, logs users in, attaches their sockets, keeps
heartbeats, and hands commands to the hub.

Flow of one chat message:  Transport.on_readable -> Peer.data_received ->
Connection.next_event() -> Server.handle -> Hub.message -> partner
Session.notify -> partner's login Peer.send -> Transport.write (buffered;
sent once at the end of the reactor turn).
"""

from __future__ import annotations

import hmac
import itertools
import logging
import resource
import secrets
import signal

from selchat import __version__
from selchat.protocol import codec
from selchat.protocol import events as ev
from selchat.protocol.events import Role
from selchat.reactor.listener import Listener, bind
from selchat.reactor.loop import Reactor
from selchat.reactor.tls import TLSTransport, server_context
from selchat.reactor.transport import Transport
from selchat.server.accounts import Accounts
from selchat.server.config import ServerConfig
from selchat.server.hub import COMMANDS_HELP, Hub
from selchat.server.limits import FailureTracker, bucket
from selchat.server.peer import WAITING, Peer
from selchat.server.session import Phase, Session
from selchat.store.accounts import StoreError

log = logging.getLogger("selchat.server")

HELLO = ev.Hello(ev.PROTOCOL_VERSION, f"selchat/{__version__}")
AUTH_FAILED = "invalid username or password"


class Server:
    def __init__(self, config: ServerConfig, reactor: Reactor | None = None):
        self.config = config
        self.reactor = reactor or Reactor(tick=config.tick, workers=config.workers)
        self.accounts = Accounts(self.reactor, config.db, config.scrypt_n)
        self.tls = server_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        self.hub = Hub(self.reactor.call_later, config.request_timeout)
        self.sessions: dict[str, Session] = {}   # key -> the account's one session
        self.by_sid: dict[int, Session] = {}     # sid -> session still attaching
        self.peers: set[Peer] = set()
        self.listener: Listener | None = None
        self.per_host: dict[str, int] = {}          # open sockets per source address
        self.host_rate: dict[str, object] = {}      # connection-rate bucket per address
        # Failed logins slow further attempts: per account after 2 failures,
        # per address after 10 (many users may share an address).
        self.user_failures = FailureTracker(free=2)
        self.addr_failures = FailureTracker(free=10)
        self.hashing = 0                            # password checks queued or running
        # Keep the socket cap below the descriptor limit, with room for the
        # listener, the database, the wake-up pipe and the log.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_connections = config.max_connections or max(16, soft - 64)
        self._sids = itertools.count(1)
        self._stopping = False
        self._handlers = {
            ev.Message: self.on_message,
            ev.Login: self.on_login,
            ev.Register: self.on_login,
            ev.Attach: self.on_attach,
            ev.ChatRequest: self.on_chat,
            ev.Accept: self.on_accept,
            ev.Decline: self.on_decline,
            ev.Quit: self.on_quit,
            ev.Exit: self.on_exit,
            ev.Who: self.on_who,
            ev.Help: self.on_help,
            ev.Ping: self.on_ping,
            ev.Pong: self.on_pong,
            ev.BadFrame: self.on_bad_frame,
            ev.ConnectionClosed: self.on_closed,
        }

    # -- lifecycle ----------------------------------------------------------------

    def listen(self, sock=None) -> tuple:
        """Bind (or take ``sock``) and start accepting; returns the address."""
        if sock is None:
            sock = bind(self.config.host, self.config.port)
        self.listener = Listener(self.reactor, sock, self.accept)
        return self.listener.address

    def serve_forever(self) -> None:
        try:
            self.reactor.run()
        finally:
            self.accounts.close()
            self.reactor.close()

    def shutdown(self) -> None:
        """Stop accepting, tell everyone, flush, close; the loop stops when done."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down: %d sessions", len(self.sessions))
        if self.listener is not None:
            self.listener.close()
        sessions = list(self.sessions.values())
        for session in sessions:  # everyone hears it first, before chats end
            session.notify(ev.Shutdown("server is shutting down"))
        for session in sessions:
            self.end_session(session, "shutdown", "the server is shutting down",
                             ev.Bye("shutdown", "server is shutting down"))
        for peer in list(self.peers):
            peer.close(ev.Bye("shutdown", "server is shutting down"))
        deadline = self.reactor.clock() + self.config.shutdown_grace
        self._wait_drained(deadline)

    def _wait_drained(self, deadline: float) -> None:
        if not self.peers or self.reactor.clock() >= deadline:
            for peer in list(self.peers):
                peer.transport.abort()
            self.reactor.stop()
            return
        self.reactor.call_later(0.05, self._wait_drained, deadline)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> graceful shutdown, run on the loop (wakes select)."""
        def handler(signum, frame):
            self.reactor.call_soon_threadsafe(self.shutdown)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- connections ----------------------------------------------------------------

    def accept(self, sock, address) -> None:
        refusal = self._refusal(address)
        if refusal is not None:
            # Refused before any state is made: one best-effort line, then close.
            try:
                sock.send(f"BYE {refusal}\n".encode())
            except OSError:
                pass
            sock.close()
            return
        host = address[0] if isinstance(address, tuple) else str(address)
        self.per_host[host] = self.per_host.get(host, 0) + 1
        cfg = self.config
        peer = Peer(self, address, bucket(cfg.cmd_rate, cfg.cmd_burst, self.reactor.clock()))
        if self.tls is not None:
            peer.transport = TLSTransport(self.reactor, sock, peer, context=self.tls,
                                          handshake_timeout=cfg.tls_handshake_timeout)
        else:
            peer.transport = Transport(self.reactor, sock, peer)
        self.peers.add(peer)
        peer.deadline = self.reactor.call_later(cfg.login_timeout, self._login_timeout, peer)
        peer.send(HELLO)

    def _refusal(self, address) -> str | None:
        """Why a new connection from ``address`` is refused, or None."""
        cfg = self.config
        if self._stopping:
            return "shutdown server is shutting down"
        if self.max_connections and len(self.peers) >= self.max_connections:
            return "server-full the server has no room for more connections"
        host = address[0] if isinstance(address, tuple) else str(address)
        if cfg.max_per_address and self.per_host.get(host, 0) >= cfg.max_per_address:
            return f"too-many-connections at most {cfg.max_per_address} connections from one address"
        if cfg.conn_rate > 0:
            now = self.reactor.clock()
            rate = self.host_rate.get(host)
            if rate is None:
                if len(self.host_rate) > 10_000:
                    self._prune_host_rates(now)
                rate = self.host_rate[host] = bucket(cfg.conn_rate, cfg.conn_burst, now)
            if not rate.take(now):
                return "too-fast too many new connections from one address; slow down"
        return None

    def _prune_host_rates(self, now: float) -> None:
        for host, rate in list(self.host_rate.items()):
            rate.refill(now)
            if rate.full:
                del self.host_rate[host]

    def _login_timeout(self, peer: Peer) -> None:
        peer.deadline = None
        if peer.session is None:
            peer.close(ev.Bye("timeout", "no login within %g seconds" % self.config.login_timeout))

    def peer_lost(self, peer: Peer, exc) -> None:
        if peer in self.peers:
            self.peers.discard(peer)
            left = self.per_host.get(peer.host, 1) - 1
            if left > 0:
                self.per_host[peer.host] = left
            else:
                self.per_host.pop(peer.host, None)
        for timer in (peer.deadline, peer.stuck):
            if timer is not None:
                timer.cancel()
        peer.deadline = peer.stuck = None
        session = peer.session
        if session is not None and session.phase is not Phase.CLOSED:
            self.end_session(session, "dropped", f"{session.name} lost connection")

    def handle(self, peer: Peer, event) -> None:
        self._handlers[type(event)](peer, event)

    def on_bad_frame(self, peer: Peer, event: ev.BadFrame) -> None:
        if event.fatal:
            peer.close(event.reply)
        else:
            peer.send(event.reply)

    def on_closed(self, peer: Peer, event) -> None:
        peer.close()

    # -- logging in -----------------------------------------------------------------

    def on_login(self, peer: Peer, event) -> None:
        """LOGIN or REGISTER: check the password on a worker; stop reading meanwhile.

        Failed logins slow down further attempts for the same account and from
        the same address (FailureTracker); the wait happens before hashing.
        """
        register = type(event) is ev.Register
        verb = "REGISTER" if register else "LOGIN"
        if register and not self.config.registration:
            peer.send(ev.Error(verb, "registration-closed", "registration is closed on this server"))
            return
        peer.pause(WAITING)
        now = self.reactor.clock()
        keys = (event.user.lower(), peer.host)
        delay = max(self.user_failures.delay(keys[0], now), self.addr_failures.delay(keys[1], now))
        if delay > 0:
            self.reactor.call_later(delay, self._check_password, peer, event, verb, keys)
        else:
            self._check_password(peer, event, verb, keys)

    def _check_password(self, peer: Peer, event, verb: str, keys) -> None:
        if peer.transport.closing:
            return
        if self.hashing >= self.config.max_hash_queue:
            peer.send(ev.Error(verb, "busy", "the server is busy; try again in a moment"))
            peer.resume(WAITING)
            return
        self.hashing += 1
        call = self.accounts.register if verb == "REGISTER" else self.accounts.verify
        call(event.user, event.password, done=lambda fut: self._login_done(peer, verb, keys, fut))

    def _login_done(self, peer: Peer, verb: str, keys, future) -> None:
        self.hashing -= 1
        if peer.transport.closing:
            return
        try:
            name = future.result()
        except StoreError as exc:
            peer.send(ev.Error(verb, exc.code, str(exc)))
            peer.resume(WAITING)
            return
        except Exception:
            log.exception("account store failed")
            peer.send(ev.Error(verb, "storage", "the account store failed; try again later"))
            peer.resume(WAITING)
            return
        now = self.reactor.clock()
        if name is None:
            self.user_failures.failed(keys[0], now)
            self.addr_failures.failed(keys[1], now)
            peer.failures += 1
            peer.send(ev.Error(verb, "auth-failed", AUTH_FAILED))
            if peer.failures >= self.config.max_login_failures:
                peer.close(ev.Bye("auth-failed", "too many failed logins"))
            else:
                peer.resume(WAITING)
            return
        self.user_failures.succeeded(keys[0])
        self.addr_failures.succeeded(keys[1])
        if self._stopping:
            peer.close(ev.Bye("shutdown", "server is shutting down"))
            return
        self._start_session(peer, name)
        peer.resume(WAITING)

    def _start_session(self, peer: Peer, name: str) -> None:
        old = self.sessions.get(name.lower())
        if old is not None:
            log.info("%s logged in again; replacing the old session", name)
            self.end_session(old, "dropped", f"{name} lost connection",
                             ev.Bye("replaced", "logged in from another client"))
        sid = next(self._sids)
        secrets_by_role = {Role.CHAT: secrets.token_urlsafe(16), Role.CHECK: secrets.token_urlsafe(16)}
        session = Session(sid, name, secrets_by_role)
        cfg = self.config
        session.requests = bucket(cfg.request_rate, cfg.request_burst, self.reactor.clock())
        session.login = peer
        peer.session = session
        if peer.deadline is not None:
            peer.deadline.cancel()
            peer.deadline = None
        self.sessions[session.key] = session
        self.by_sid[sid] = session
        session.attach_timer = self.reactor.call_later(self.config.attach_timeout, self._attach_timeout, session)
        peer.send(ev.Welcome(name, f"{sid}.{secrets_by_role[Role.CHAT]}", f"{sid}.{secrets_by_role[Role.CHECK]}"))
        log.info("%s logged in from %s (session %d)", name, peer.host, sid)

    def _attach_timeout(self, session: Session) -> None:
        if session.phase is Phase.ATTACHING:
            self.end_session(session, "dropped", f"{session.name} lost connection",
                             ev.Bye("attach-timeout", "chat and check sockets not attached in time"))

    def on_attach(self, peer: Peer, event: ev.Attach) -> None:
        session = self._check_token(event)
        if session is None:
            peer.send(ev.Error("ATTACH", "bad-token", "invalid or expired token"))
            peer.close()
            return
        session.tokens.pop(event.role)  # single use
        if peer.deadline is not None:
            peer.deadline.cancel()
            peer.deadline = None
        peer.session = session
        if event.role is Role.CHAT:
            session.chat = peer
            cfg = self.config
            peer.msg_bucket = bucket(cfg.msg_rate, cfg.msg_burst, self.reactor.clock())
        else:
            session.check = peer
        peer.send(ev.Attached(event.role))
        if session.chat is not None and session.check is not None:
            self._go_online(session)

    def _check_token(self, event: ev.Attach) -> Session | None:
        """The session the token belongs to, or None. Never says why."""
        sid, _, secret = event.token.partition(".")
        session = self.by_sid.get(int(sid)) if sid.isdigit() and len(sid) < 20 else None
        if session is None or session.phase is not Phase.ATTACHING:
            return None
        expected = session.tokens.get(event.role)
        if expected is None or not hmac.compare_digest(expected.encode(), secret.encode()):
            return None
        return session

    def _go_online(self, session: Session) -> None:
        session.phase = Phase.ONLINE
        del self.by_sid[session.sid]
        session.tokens.clear()
        session.attach_timer.cancel()
        session.heartbeat = self.reactor.call_later(self.config.ping_interval, self._heartbeat, session)
        self.hub.join(session)
        session.notify(ev.Ready(session.name))

    def end_session(self, session: Session, reason: str, text: str, bye: ev.Bye | None = None) -> None:
        """End a session once: its chat or request, its timers, its three sockets."""
        if session.phase is Phase.CLOSED:
            return
        session.phase = Phase.CLOSED
        self.hub.leave(session, reason, text)
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        self.by_sid.pop(session.sid, None)
        session.tokens.clear()
        for timer in (session.attach_timer, session.heartbeat):
            if timer is not None:
                timer.cancel()
        login = session.login
        for peer in session.peers():
            peer.close(bye if peer is login else None)
        log.info("%s session %d ended: %s", session.name, session.sid, reason)

    def peer_stuck(self, peer: Peer) -> None:
        """``peer`` has not read its output for stuck_timeout seconds: drop it.

        Its buffer cannot drain, so it is aborted rather than flushed."""
        peer.stuck = None
        session = peer.session
        if session is not None:
            self.end_session(session, "dropped", f"{session.name} stopped reading")
        peer.transport.abort()

    # -- heartbeats -----------------------------------------------------------------

    def _heartbeat(self, session: Session) -> None:
        if session.phase is not Phase.ONLINE:
            return
        if session.awaiting_pong:
            self.end_session(session, "dropped", f"{session.name} stopped answering heartbeats",
                             ev.Bye("ping-timeout", "no answer to PING within %g seconds" % self.config.ping_timeout))
            return
        session.awaiting_pong = True
        session.ping_seq += 1
        session.check.send(ev.Ping(str(session.ping_seq)))
        session.heartbeat.reset(self.config.ping_timeout)

    def _alive(self, session: Session) -> None:
        """Any frame on the check socket: the client is alive."""
        session.awaiting_pong = False
        session.heartbeat.reset(self.config.ping_interval)

    def on_ping(self, peer: Peer, event: ev.Ping) -> None:
        peer.send(event.response())
        if peer.session.phase is Phase.ONLINE:
            self._alive(peer.session)

    def on_pong(self, peer: Peer, event: ev.Pong) -> None:
        if peer.session.phase is Phase.ONLINE:
            self._alive(peer.session)

    # -- commands (chat socket) -----------------------------------------------------

    def _online(self, peer: Peer, verb: str) -> Session | None:
        session = peer.session
        if session.phase is Phase.ONLINE:
            return session
        peer.send(ev.Error(verb, "not-ready", "attach the check socket first"))
        return None

    def on_message(self, peer: Peer, event: ev.Message) -> None:
        session = peer.session
        nack = self.hub.message(session, event.text, peer.conn.msg_seq)
        if nack is not None:
            peer.send(nack)
            return
        target = session.partner.login
        if target.congested:
            # The partner's output is backed up: read no more from this
            # sender until it drains. What was read is still delivered.
            target.feed_paused_by(peer)

    def relay(self, peer: Peer, session: Session, block: bytes, count: int) -> None:
        """The fast path of on_message: ``count`` plain messages in one block."""
        target = session.partner.login
        if target.conn.can_send(ev.Incoming):
            target.transport.write(codec.relay_block(session.name_bytes, block))
            if target.congested:
                target.feed_paused_by(peer)

    def on_chat(self, peer: Peer, event: ev.ChatRequest) -> None:
        session = self._online(peer, "CHAT")
        if session is None:
            return
        requests = session.requests
        if requests is not None:
            requests.refill(self.reactor.clock())
            if requests.tokens < 1.0:
                wait = requests.wait()
                peer.send(ev.Error("CHAT", "rate-limited", f"too many chat requests; try again in {wait:.0f} s"))
                return
        reply = self.hub.chat(session, event.user)
        if reply is not None:
            if requests is not None and type(reply) is ev.Ok:
                requests.tokens -= 1.0  # only requests that reached someone count
            peer.send(reply)
            return
        # Not online: say whether the account exists at all (a database read,
        # so on a worker; later commands on this socket wait, to keep order).
        peer.pause(WAITING)

        def done(future):
            try:
                known = future.result()
            except Exception:
                known = True  # cannot tell; "offline" is the safe answer
            if known:
                peer.send(ev.Error("CHAT", "offline", f"{event.user} is not online"))
            else:
                peer.send(ev.Error("CHAT", "unknown-user", f"there is no user {event.user}"))
            peer.resume(WAITING)

        self.accounts.exists(event.user, done)

    def on_accept(self, peer: Peer, event) -> None:
        session = self._online(peer, "ACCEPT")
        if session is not None:
            peer.send(self.hub.accept(session))

    def on_decline(self, peer: Peer, event) -> None:
        session = self._online(peer, "DECLINE")
        if session is not None:
            peer.send(self.hub.decline(session))

    def on_quit(self, peer: Peer, event) -> None:
        session = self._online(peer, "QUIT")
        if session is not None:
            peer.send(self.hub.quit(session))

    def on_who(self, peer: Peer, event) -> None:
        for entry in self.hub.who():
            peer.send(entry)

    def on_help(self, peer: Peer, event) -> None:
        peer.send(ev.Ok("HELP", COMMANDS_HELP))

    def on_exit(self, peer: Peer, event) -> None:
        session = peer.session
        peer.send(ev.Ok("EXIT"))
        self.end_session(session, "left", f"{session.name} logged out", ev.Bye("exit", "goodbye"))


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
