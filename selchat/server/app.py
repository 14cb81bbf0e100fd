"""The server: accepts sockets, logs users in, and hands their frames to the
session registry (``registry.py``: attach, heartbeats, detach and resume,
the end of a session) and to the hub (``hub.py``: presence, requests, chats).

Flow of one chat message:  Transport.on_readable -> Peer.data_received ->
Connection.next_messages() (a block of plain MSG frames) -> Server.relay ->
partner Session.deliver_block (numbered and kept in the outbox, version 2)
-> partner's login Transport.write (buffered; sent once at the end of the
reactor turn). A frame the fast path does not take goes Connection.next_event()
-> Server.handle -> Hub.message -> partner Session.deliver, the same place.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import signal
import time

from selchat import __version__
from selchat.protocol import events as ev
from selchat.reactor.listener import Listener, bind
from selchat.reactor.loop import Reactor
from selchat.reactor.tls import TLSTransport, server_context
from selchat.reactor.transport import Transport
from selchat.server import audit, systemd
from selchat.server.accounts import Accounts
from selchat.server.config import ServerConfig
from selchat.server.control import ControlSocket
from selchat.server.hub import COMMANDS_HELP, Hub
from selchat.server.admission import Admission
from selchat.server.blocking import Blocking
from selchat.server.limits import bucket
from selchat.server.logins import SHUTTING_DOWN, Logins
from selchat.server.metrics import Metrics, MetricsEndpoint
from selchat.server.peer import WAITING, Peer
from selchat.server.registry import Registry
from selchat.server.session import Phase, Session

log = logging.getLogger("selchat.server")

HELLO = ev.Hello(ev.PROTOCOL_VERSION, f"selchat/{__version__}")
#: Settings a reload cannot change on a running server (docs/operations.md).
RESTART_ONLY = ("host", "port", "db", "workers", "scrypt_n", "metrics", "admin_socket", "tick", "config_file",
                "cluster", "irc_port", "irc_tls_port")
#: The MOTD file's limits: more lines or longer lines are cut (and logged).
MOTD_MAX_LINES = 50
MOTD_MAX_CHARS = 400


def read_motd(path: str | None) -> list[str]:
    """The MOTD file's lines (blocking: at start, or on a worker); OSError if unreadable."""
    if not path:
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if len(lines) > MOTD_MAX_LINES or any(len(line) > MOTD_MAX_CHARS for line in lines):
        log.warning("MOTD %s: only the first %d lines of at most %d characters are sent",
                    path, MOTD_MAX_LINES, MOTD_MAX_CHARS)
    return ["".join(c for c in line[:MOTD_MAX_CHARS] if c.isprintable()) for line in lines[:MOTD_MAX_LINES]]


#: HELP on a socket that has not logged in or attached yet.
FRESH_HELP = (
    "LOGIN <user> <password> | REGISTER <user> <password> | VERSION 2 | RESUME <token> <last-id> [<messages>]"
    " | ATTACH CHAT|CHECK <token> (log in on this socket, then attach two more with the"
    " tokens of WELCOME; see docs/protocol.md)"
)


class Server:
    """``loader`` (``selchat.server.options.Loader``) re-reads the config file
    on a reload; ``logs`` (``selchat.logsetup.Logs``) re-applies the log
    settings and reopens the log file. Both are optional (tests leave them out).

    Construction may block (it checks the database and reads the MOTD file):
    it runs before the loop does, and raises StoreError or OSError on a
    setting that cannot work, so that ``selchat serve`` fails at start.
    """

    def __init__(self, config: ServerConfig, reactor: Reactor | None = None, loader=None, logs=None):
        self.config = config
        self.loader = loader
        self.logs = logs
        self.reactor = reactor or Reactor(tick=config.tick, workers=config.workers)
        self.accounts = Accounts(self.reactor, config.db, config.scrypt_n)
        self.accounts.check()
        self.tls = server_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        self.motd = read_motd(config.motd_file)
        self.started_at = time.time()
        self._reloading = False
        self._reload_next: list | None = None   # asked again while reloading: their done callbacks
        self.cluster = None  # selchat.cluster.node.ClusterNode with --cluster
        self.leaving_cluster = False  # shutting down: until Redis has this node's last word
        if config.cluster:
            self.cluster, self.hub = make_cluster(self, config)
        else:
            self.hub = Hub(self.reactor.call_later, config.request_timeout)
        self.registry = Registry(self)
        self.sessions = self.registry.sessions   # key -> the account's one session
        self.peers: set[Peer] = set()
        self.listener: Listener | None = None
        self.metrics = Metrics()
        self.metrics_endpoint: MetricsEndpoint | None = None  # /metrics, when config.metrics is set
        self.control: ControlSocket | None = None  # the admin socket, when config.admin_socket is set
        self.irc = None  # selchat.irc.frontend.IrcFrontend, when config.irc_port or irc_tls_port is set
        self.stopping = False
        self.admission = Admission(self)
        self.logins = Logins(self)
        self.blocking = Blocking(self)
        self._handlers = {
            ev.Message: self.on_message,
            ev.Login: self.logins.on_login,
            ev.Register: self.logins.on_login,
            ev.Version: self.on_version,
            ev.Resume: self.registry.on_resume,
            ev.Attach: self.registry.on_attach,
            ev.Ack: self.registry.on_ack,
            ev.ChatRequest: self.on_chat,
            ev.Accept: self.on_accept,
            ev.Decline: self.on_decline,
            ev.Quit: self.on_quit,
            ev.Exit: self.on_exit,
            ev.Who: self.on_who,
            ev.Password: self.logins.on_password,
            ev.Unregister: self.logins.on_unregister,
            ev.Block: self.blocking.on_block,
            ev.Unblock: self.blocking.on_unblock,
            ev.Blocks: self.blocking.on_blocks,
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
        if self.config.metrics:
            self.metrics_endpoint = MetricsEndpoint(self, self.config.metrics)
        if self.config.admin_socket:
            self.control = ControlSocket(self, self.config.admin_socket)
        if self.config.irc_port is not None or self.config.irc_tls_port is not None:
            from selchat.irc.frontend import IrcFrontend  # a second front end, on the same pieces

            self.irc = IrcFrontend(self)
            self.irc.listen()
        return self.listener.address

    def serve_forever(self) -> None:
        try:
            self.reactor.run()
        finally:
            if self.cluster is not None:
                self.cluster.close()
            self.accounts.close()
            self.reactor.close()

    def shutdown(self) -> None:
        """Stop accepting, tell everyone, flush, close; the loop stops when done."""
        if self.stopping:
            return
        self.stopping = True
        systemd.notify("STOPPING=1")
        log.info("shutting down: %d sessions", len(self.sessions))
        if self.listener is not None:
            self.listener.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if self.control is not None:
            self.control.close()  # removes the socket file
        if self.irc is not None:
            self.irc.close()
        if self.cluster is not None:  # the cluster goes on: its version 2 sessions move to other nodes
            moved = self.cluster.depart()
            if moved:
                log.info("cluster: %d resumable sessions let go of, to resume on other nodes", moved)
        sessions = list(self.sessions.values())
        # Both partners of a chat hear the same, in the same order: SHUTDOWN,
        # ENDED <other> shutdown, BYE shutdown. (Ending the sessions one by
        # one would tell the first "BYE" and its partner "ENDED".)
        for session in sessions:
            session.deliver(ev.Shutdown(SHUTTING_DOWN))
        self.hub.end_all("shutdown", SHUTTING_DOWN)
        for session in sessions:
            self.registry.end_session(session, "shutdown", SHUTTING_DOWN, ev.Bye("shutdown", SHUTTING_DOWN),
                                      fate=("gone", SHUTTING_DOWN))
        for peer in list(self.peers):
            peer.close(ev.Bye("shutdown", SHUTTING_DOWN))
        if self.cluster is not None:
            self.leaving_cluster = True
            self.cluster.leave(self._left_cluster)  # after the sessions' ends, in Redis too
        deadline = self.reactor.clock() + self.config.shutdown_grace
        self._wait_drained(deadline)

    def _left_cluster(self) -> None:
        self.leaving_cluster = False

    def _wait_drained(self, deadline: float) -> None:
        if (not self.peers and not self.leaving_cluster) or self.reactor.clock() >= deadline:
            for peer in list(self.peers):
                peer.transport.abort()
            self.reactor.stop()
            return
        self.reactor.call_later(0.05, self._wait_drained, deadline)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> graceful shutdown, SIGHUP -> reload; both run on
        the loop (call_soon_threadsafe wakes select)."""
        def stop(signum, frame):
            self.reactor.call_soon_threadsafe(self.shutdown)

        def reload(signum, frame):
            self.reactor.call_soon_threadsafe(self.reload)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    # -- reloading (SIGHUP, `selchat admin reload`) ---------------------------------

    def reload(self, done=None) -> None:
        """Re-read the config file, TLS certificate and key, MOTD and log
        settings on a worker, then apply them on the loop; ``done(ok, message)``.

        A file that fails to load or check keeps the old settings, and says
        why. Settings that cannot change on a running server (RESTART_ONLY,
        TLS on or off) keep their old value and are logged as needing a
        restart. Sessions are untouched; new limits apply to new sockets
        and to the next use of each deadline.

        Asked again while one runs (logrotate's SIGHUP just after an edit's),
        it runs once more when that one ends: the files may have changed
        after the running one read them. Requests meanwhile share that run.
        """
        if self.stopping:
            if done is not None:
                done(False, SHUTTING_DOWN)
            return
        if self._reloading:
            if self._reload_next is None:
                self._reload_next = []
            if done is not None:
                self._reload_next.append(done)
            return
        self._reloading = True
        systemd.notify("RELOADING=1")
        log.info("reloading%s", f" {self.config.config_file}" if self.config.config_file else "")
        loader, logs = self.loader, self.logs

        def work():  # on a worker: file reads and the TLS key load may block
            config = loader.load() if loader is not None else dataclasses.replace(self.config)
            tls = server_context(config.tls_cert, config.tls_key) if config.tls_cert else None
            motd = read_motd(config.motd_file)
            if logs is not None:
                logs.apply(config)  # last: only once everything else checked out
            return config, tls, motd

        self.reactor.run_in_thread(work, done=lambda future: self._reloaded(future, done))

    def _reloaded(self, future, done) -> None:
        self._reloading = False
        try:
            config, tls, motd = future.result()
        except Exception as exc:
            ok, message = False, f"reload failed, keeping the old settings: {exc}"
            log.error("%s", message)
        else:
            ok, message = True, self._apply(config, tls, motd)
            log.info("%s", message)
        systemd.notify("READY=1")
        if done is not None:
            done(ok, message)
        waiting, self._reload_next = self._reload_next, None
        if waiting is not None:
            def tell_all(ok: bool, message: str) -> None:
                for each in waiting:
                    each(ok, message)
            self.reload(tell_all)

    def _apply(self, config: ServerConfig, tls, motd: list[str]) -> str:
        """Switch to ``config`` (checked already); returns what changed, for the log."""
        old = self.config
        stuck = [f for f in RESTART_ONLY if getattr(config, f) != getattr(old, f)]
        for name in stuck:
            setattr(config, name, getattr(old, name))
        if (config.tls_cert is None) != (old.tls_cert is None):
            stuck.append("tls_cert (TLS on or off)")
            config.tls_cert, config.tls_key, tls = old.tls_cert, old.tls_key, self.tls
        changed = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(old, f.name)]
        self.config = config
        self.tls = tls                       # new handshakes use the new certificate
        self.motd = motd
        self.hub.request_timeout = config.request_timeout
        self.admission.configure(config)
        self.logins.addr_failures.free = config.throttle_after or None
        message = "reloaded: " + (", ".join(changed) + " changed" if changed else "no setting changed")
        if stuck:
            message += "; needs a restart to change: " + ", ".join(stuck)
            log.warning("reload: %s cannot change on a running server; restart to apply", ", ".join(stuck))
        return message

    # -- operators (`selchat admin`) --------------------------------------------------

    def kick(self, name: str, text: str) -> bool:
        """End ``name``'s session: BYE kicked <text>; False if not logged in."""
        return self.registry.kick(name, text)

    def broadcast(self, text: str, here_only: bool = False) -> int:
        """NOTICE <text> to every logged-in user, and through the cluster to
        those of the other nodes (unless ``here_only``); returns how many
        were told here."""
        notice = ev.Notice(text)
        for session in self.sessions.values():
            session.deliver(notice)
        if self.cluster is not None and not here_only:
            self.cluster.share("notice", text)
        return len(self.sessions)

    # -- connections ----------------------------------------------------------------

    def accept(self, sock, address) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        refusal = self.admission.refusal(host, len(self.peers))
        if refusal is not None:
            reason = refusal.partition(" ")[0]
            self.metrics.refusals[reason] += 1
            audit.emit("refused", logging.WARNING, addr=host, reason=reason)
            # Refused before any state is made: one best-effort line, then close.
            try:
                sock.send(f"BYE {refusal}\n".encode())
            except OSError:
                pass
            sock.close()
            return
        self.admission.opened(host)
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

    def _login_timeout(self, peer: Peer) -> None:
        peer.deadline = None
        if peer.session is None:
            peer.close(ev.Bye("timeout", "no login within %g seconds" % self.config.login_timeout))

    def peer_lost(self, peer: Peer, exc) -> None:
        if peer in self.peers:
            self.peers.discard(peer)
            self.admission.closed(peer.host)
        for timer in (peer.deadline, peer.stuck):
            if timer is not None:
                timer.cancel()
        peer.deadline = peer.stuck = None
        session = peer.session
        if session is not None and peer in session.peers():  # not one it let go of
            self.registry.lost(session, "dropped", f"{session.name} lost connection")

    def peer_stuck(self, peer: Peer) -> None:
        self.registry.peer_stuck(peer)

    def handle(self, peer: Peer, event) -> None:
        self._handlers[type(event)](peer, event)

    def on_bad_frame(self, peer: Peer, event: ev.BadFrame) -> None:
        if event.fatal:
            peer.close(event.reply)
        elif type(event.reply) is ev.Nack:
            self._refuse_message(peer, event.reply)
        else:
            peer.send(event.reply)

    def on_closed(self, peer: Peer, event) -> None:
        peer.close()

    def on_ping(self, peer: Peer, event: ev.Ping) -> None:
        peer.send(event.response())
        if peer.session.phase is Phase.ONLINE:
            self.registry.alive(peer.session)

    def on_pong(self, peer: Peer, event: ev.Pong) -> None:
        if peer.session.phase is Phase.ONLINE:
            self.registry.alive(peer.session)

    # -- version 2 (docs/protocol.md) -------------------------------------------------

    def on_version(self, peer: Peer, event: ev.Version) -> None:
        if event.version in (1, 2):
            peer.version = event.version
            peer.send(ev.Ok("VERSION", str(event.version)))
        else:
            peer.send(ev.Error("VERSION", "unsupported", f"this server speaks versions 1 and {ev.PROTOCOL_VERSION}"))

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
            self._refuse_message(peer, nack)
            return
        self.metrics.messages_relayed += 1
        # The partner cannot take more now: read no more from this sender
        # until it can. What was read is still delivered.
        session.partner.hold_back(peer)
        if session.outbox is not None:
            session.hold_back_own(peer)
            peer.received_due()

    def relay(self, peer: Peer, session: Session, block: bytes, count: int) -> None:
        """The fast path of on_message: ``count`` plain messages in one block."""
        partner = session.partner
        partner.deliver_block(session, block, count, peer.conn.msg_seq - count + 1)
        self.metrics.messages_relayed += count
        partner.hold_back(peer)
        outbox = session.outbox
        if outbox is not None:  # version 2; the checks of hold_back_own and received_due, inline
            if outbox.last_id - outbox.acked >= outbox.limit:
                session.hold_back_own(peer)
            if not peer.received_pending:
                peer.received_due()

    @staticmethod
    def _refuse_message(peer: Peer, nack: ev.Nack) -> None:
        """A chat message that will not be delivered: version 1 hears NACK on
        the chat socket, version 2 its fate on the login socket."""
        session = peer.session
        if session.outbox is None:
            peer.send(nack)
        else:
            session.deliver(ev.Undelivered(nack.seq, nack.seq, nack.code, nack.text))
            peer.received_due()

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
        # Has the user asked blocked the asker? A database read, so on a
        # worker; later frames on this socket wait for the answer, in order.
        self.blocking.check_request(peer, session, event.user,
                                    lambda blocked: self._chat(peer, session, event.user, blocked))

    def _chat(self, peer: Peer, session: Session, user: str, blocked: bool) -> None:
        requests = session.requests

        def answered(reply) -> None:
            if reply is None:
                self._offline(peer, user)
                return
            if requests is not None and type(reply) is ev.Ok:
                requests.tokens -= 1.0  # only requests that reached someone count
            peer.send(reply)

        if self.cluster is not None:  # the answer comes from Redis: later frames wait for it
            peer.pause(WAITING)

            def later(reply) -> None:
                answered(reply)
                if reply is not None:
                    peer.resume(WAITING)

            self.hub.chat(session, user, later, blocked)
            return
        reply = self.hub.chat(session, user, blocked)
        if reply is None:
            peer.pause(WAITING)  # _offline resumes it
        answered(reply)

    def _offline(self, peer: Peer, user: str) -> None:
        """``user`` is online nowhere: ERR CHAT offline, or unknown-user if
        there is no such account. ``peer`` is paused (WAITING) until then."""
        def done(future):
            try:
                known = future.result()
            except Exception:
                known = True  # cannot tell; "offline" is the safe answer
            if known:
                peer.send(ev.Error("CHAT", "offline", f"{user} is not online"))
            else:
                peer.send(ev.Error("CHAT", "unknown-user", f"there is no user {user}"))
            peer.resume(WAITING)

        self.accounts.exists(user, done)

    def _answer(self, peer: Peer, command, *args) -> None:
        """Send the hub's reply to a command. A cluster's hub answers later,
        from Redis: this socket's later frames wait for it, in order."""
        if self.cluster is None:
            reply = command(*args)
            for event in reply if type(reply) is list else (reply,):
                peer.send(event)
            return
        peer.pause(WAITING)

        def done(reply) -> None:
            for event in reply if type(reply) is list else (reply,):
                peer.send(event)
            peer.resume(WAITING)

        command(*args, done)

    def on_accept(self, peer: Peer, event) -> None:
        session = self._online(peer, "ACCEPT")
        if session is not None:
            self._answer(peer, self.hub.accept, session)

    def on_decline(self, peer: Peer, event) -> None:
        session = self._online(peer, "DECLINE")
        if session is not None:
            self._answer(peer, self.hub.decline, session)

    def on_quit(self, peer: Peer, event) -> None:
        session = self._online(peer, "QUIT")
        if session is not None:
            self._answer(peer, self.hub.quit, session)

    def on_who(self, peer: Peer, event) -> None:
        self._answer(peer, self.hub.who)

    def on_help(self, peer: Peer, event) -> None:
        peer.send(ev.Ok("HELP", COMMANDS_HELP if peer.session is not None else FRESH_HELP))

    def on_exit(self, peer: Peer, event) -> None:
        session = peer.session
        peer.send(ev.Ok("EXIT"))
        self.registry.end_session(session, "left", f"{session.name} logged out", ev.Bye("exit", "goodbye"), why="exit")


def make_cluster(server: "Server", config: ServerConfig):
    """The cluster node and its hub, for ``--cluster``. Raises ValueError
    for a URL that cannot work, RuntimeError without hiredis."""
    from selchat.cluster.resp import parse_url

    parse_url(config.cluster)  # ValueError: says what is wrong with it
    try:
        from selchat.cluster.hub import ClusterHub
        from selchat.cluster.node import ClusterNode
    except ImportError as exc:
        raise RuntimeError(f"--cluster needs hiredis: pip install 'selchat[cluster]' ({exc})") from None
    node = ClusterNode(server, config.cluster)
    return node, ClusterHub(node, server.reactor.call_later, config.request_timeout)


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
