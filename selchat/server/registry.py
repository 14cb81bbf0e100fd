"""The session registry: who is logged in, attaching their sockets, alive.

It starts a session once the password has been checked, attaches the chat
and check sockets by their tokens, brings the session online (the hub's
presence, READY, the MOTD), keeps its heartbeat, and ends it, always through
``end_session``, whatever the cause.

Version 2 sessions (docs/protocol.md) are detached rather than ended when a
socket is lost, taken back with RESUME within the resume window, and leave a
tombstone when they end: for ``TOMBSTONE_SECONDS`` a late RESUME still hears
how far the server got and the fates of its messages.

May touch: the sessions (``sessions``, ``by_sid``) and their timers, the
peers of those sessions (tokens, deadlines, sends and closes), the hub's
``join``/``leave``/``let_go``, and from the ``Server`` only its config,
reactor, MOTD, metrics, ``logins`` (a refused RESUME counts as a failed
login) and ``cluster`` (a RESUME of a session it does not hold goes there).
It knows no wire format beyond the events it sends: another front end (or
a second node) attaches sessions through the same methods.
"""

from __future__ import annotations

import hmac
import itertools
import secrets

from selchat.protocol import events as ev
from selchat.protocol.events import Role
from selchat.server import audit
from selchat.server.limits import bucket
from selchat.server.outbox import Outbox
from selchat.server.session import Phase, Session

#: How long an ended version 2 session is remembered for a late RESUME.
TOMBSTONE_SECONDS = 600.0
#: Ended sessions remembered at most (the oldest are forgotten first).
MAX_TOMBSTONES = 100_000


class Registry:
    def __init__(self, server):
        self.server = server                     # for config and motd, both swapped on reload
        self.reactor = server.reactor
        self.hub = server.hub
        self.sessions: dict[str, Session] = {}   # key -> the account's one session
        self.by_sid: dict[int, Session] = {}     # sid -> session still attaching
        self.resumable: dict[int, Session] = {}  # sid -> version 2 session not ended
        self.tombstones: dict[int, tuple] = {}   # sid -> (ended version 2 session, its timer)
        self._sids = itertools.count(1)

    # -- starting and attaching -------------------------------------------------------

    def start_session(self, peer, name: str, epoch: str = "0") -> Session:
        """``peer`` has logged in as ``name``: make its session, send WELCOME
        with the two attach tokens (and the resume token, in version 2). An
        older session of the account ends. ``epoch``: the cluster's fencing
        counter for this login (``ClusterNode.claim``)."""
        old = self.sessions.get(name.lower())
        if old is not None:  # the partner sees a drop; the old client hears why
            self.end_session(old, "dropped", f"{name} lost connection",
                             ev.Bye("replaced", "logged in from another client"), why="replaced")
        sid = next(self._sids)
        session = Session(sid, name, {})
        session.epoch = epoch
        cfg = self.server.config
        session.requests = bucket(cfg.request_rate, cfg.request_burst, self.reactor.clock())
        self.sessions[session.key] = session
        chat_token, check_token = self._await_attach(session, peer)
        resume_token = ""
        if peer.version == 2:
            session.outbox = Outbox(cfg.resume_buffer)
            session.resume_secret = secrets.token_urlsafe(16)
            self.resumable[sid] = session
            resume_token = f"{sid}.{session.resume_secret}"
        peer.send(ev.Welcome(name, chat_token, check_token, resume_token))
        return session

    def _await_attach(self, session: Session, peer) -> tuple[str, str]:
        """``peer`` is the session's login socket now: make the single-use
        tokens its chat and check sockets attach with, within the attach
        timeout. Returns them, as the client sends them."""
        tokens = {Role.CHAT: secrets.token_urlsafe(16), Role.CHECK: secrets.token_urlsafe(16)}
        session.tokens = tokens
        session.login = peer
        peer.session = session
        if peer.deadline is not None:
            peer.deadline.cancel()
            peer.deadline = None
        self.by_sid[session.sid] = session
        session.attach_timer = self.reactor.call_later(self.server.config.attach_timeout, self._attach_timeout,
                                                       session)
        return f"{session.sid}.{tokens[Role.CHAT]}", f"{session.sid}.{tokens[Role.CHECK]}"

    def _attach_timeout(self, session: Session) -> None:
        if session.phase is Phase.ATTACHING:
            self.lost(session, "dropped", f"{session.name} lost connection",
                             ev.Bye("attach-timeout", "chat and check sockets not attached in time"),
                             why="attach-timeout")

    def on_attach(self, peer, event: ev.Attach) -> None:
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
            cfg = self.server.config
            peer.msg_bucket = bucket(cfg.msg_rate, cfg.msg_burst, self.reactor.clock())
            peer.conn.msg_seq = peer.received = session.seq_base  # seqs go on across resumes
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
        session.heartbeat = self.reactor.call_later(self.server.config.ping_interval, self._heartbeat, session)
        if session.was_online:
            return  # back after a RESUME: the user is where it was
        session.was_online = True
        self.hub.join(session)
        session.deliver(ev.Ready(session.name))
        for line in self.server.motd:
            session.deliver(ev.Motd(line))

    # -- version 2: detach, resume, acknowledge ----------------------------------------

    def lost(self, session: Session, reason: str, text: str, bye: ev.Bye | None = None, why: str | None = None) -> None:
        """One of the session's sockets is lost (or stuck, or silent): a
        version 2 session is detached, a version 1 session ends."""
        if session.outbox is not None:
            self.detach(session, why or reason)
        else:
            self.end_session(session, reason, text, bye, why)

    def detach(self, session: Session, why: str) -> None:
        """Keep the session for the resume window without its sockets: it
        stays in the hub (and its chat up), its events are held."""
        if session.phase in (Phase.DETACHED, Phase.CLOSED):
            return
        self._drop_sockets(session)
        session.phase = Phase.DETACHED
        session.resume_timer = self.reactor.call_later(self.server.config.resume_window, self._window_over, session)
        partner = session.partner
        if partner is not None:  # Session.deliver drops it for a version 1 client
            partner.deliver(ev.Away(session.name))
        audit.emit("session-detach", user=session.name, session=session.sid, reason=why)

    def _drop_sockets(self, session: Session) -> None:
        """Let go of the session's sockets (aborted: what they had is replayed
        after a RESUME) and of its timers; they are its sockets no more, so
        their loss changes nothing."""
        session.seq_base = session.accepted
        peers = session.peers()
        session.login = session.chat = session.check = None
        self.by_sid.pop(session.sid, None)
        session.tokens.clear()
        for timer in (session.attach_timer, session.heartbeat):
            if timer is not None:
                timer.cancel()
        session.attach_timer = session.heartbeat = None
        session.awaiting_pong = False
        for peer in peers:
            peer.close_now()

    def _window_over(self, session: Session) -> None:
        session.resume_timer = None
        if session.phase is Phase.DETACHED:
            self.end_session(session, "dropped", f"{session.name} lost connection", why="resume-window",
                             fate=("away", f"{session.name} lost connection and did not come back"))

    def on_resume(self, peer, event: ev.Resume) -> None:
        """RESUME <token> <last-id> on a fresh login socket: no password is
        checked; the token is the proof. Replays every event after last-id.
        A cluster node that does not hold the session asks the cluster
        (``ClusterNode.resume``), which may move it here from another node."""
        sid, _, secret = event.token.partition(".")
        sid = int(sid) if sid.isdigit() and len(sid) < 20 else 0
        session = self.resumable.get(sid)
        if session is None and sid in self.tombstones:
            session = self.tombstones[sid][0]
        if session is None or not hmac.compare_digest(session.resume_secret.encode(), secret.encode()):
            if self.server.cluster is not None:
                self.server.cluster.resume(peer, event)
            else:
                self.unknown_session(peer)
            return
        self.resume_here(peer, event, session)

    def unknown_session(self, peer) -> None:
        self.server.logins.resume_refused(peer, "unknown-session", "no session to resume with that token; log in")

    def resume_here(self, peer, event: ev.Resume, session: Session) -> None:
        """The RESUME of a session this server holds (or remembers)."""
        outbox = session.outbox
        if session.phase is Phase.CLOSED:
            # Too late: say how far the server got, and the fates kept for it.
            peer.send(ev.Unresumed(session.seq_base, "expired", "the session ended; log in again"))
            peer.transport.write(outbox.replay())
            peer.close(ev.Bye("expired", "the session ended; log in again"))
            return
        if event.last_id > outbox.last_id:
            self.server.logins.resume_refused(peer, "bad-id", f"event {event.last_id} was never sent; the last is {outbox.last_id}")
            return
        if session.phase is Phase.DETACHED:
            session.resume_timer.cancel()
            session.resume_timer = None
            partner = session.partner
            if partner is not None:
                partner.deliver(ev.Back(session.name))
        else:
            self._drop_sockets(session)  # it comes back before the server noticed the drop
        self._ack(session, event.last_id)  # what it saw, its ACK lost
        session.phase = Phase.ATTACHING
        chat_token, check_token = self._await_attach(session, peer)
        peer.send(ev.Resumed(session.name, session.seq_base, outbox.acked, chat_token, check_token))
        peer.transport.write(outbox.replay())
        session.release_waiting()
        self.server.metrics.resumes += 1
        audit.emit("resume", user=session.name, addr=peer.host, session=session.sid, replayed=outbox.pending)

    def on_ack(self, peer, event: ev.Ack) -> None:
        """ACK <id> (check socket, or chat socket ahead of a MSG): the client
        has every event up to id."""
        session = peer.session
        outbox = session.outbox
        if outbox is None:
            peer.send(ev.Error("ACK", "not-version-2", "ACK is for version 2 sessions"))
            return
        if event.id > outbox.last_id:
            peer.send(ev.Error("ACK", "bad-ack", f"ACK {event.id} is beyond the last event sent ({outbox.last_id})"))
            return
        self.acknowledge(peer, session, event.id)

    def acknowledge(self, peer, session: Session, upto: int) -> None:
        """The client has every event up to ``upto`` (at most the last sent)."""
        self._ack(session, upto)
        session.release_waiting()
        if session.phase is Phase.ONLINE:
            self.alive(session)

    @staticmethod
    def _ack(session: Session, upto: int) -> None:
        """Forget the events up to ``upto``; their chat messages' senders hear
        DELIVERED (in a cluster, through the session's journal)."""
        receipts = session.outbox.ack(upto)
        if session.journal is not None:
            session.journal.acked(receipts)
            return
        for sender, first, last in receipts:
            sender.deliver(ev.Delivered(first, last))  # Session.deliver drops it for version 1

    def adopt(self, peer, name: str, epoch: str, secret: str, last_id: int, accepted: int) -> Session:
        """A RESUME here of a version 2 session that another node held (the
        cluster moved it): a session that goes on from ``last_id`` (its next
        event is ``last_id + 1``) and seq ``accepted``, without READY. Sends
        RESUMED; the caller replays what the cluster kept."""
        old = self.sessions.get(name.lower())
        if old is not None:  # a stale copy (the cluster's record is this one): drop it, no fates
            self.let_go(old)
        session = Session(next(self._sids), name, {})
        session.epoch = epoch
        cfg = self.server.config
        session.requests = bucket(cfg.request_rate, cfg.request_burst, self.reactor.clock())
        session.outbox = outbox = Outbox(cfg.resume_buffer)
        outbox.last_id = outbox.acked = last_id
        session.resume_secret = secret
        session.seq_base = accepted
        session.was_online = True
        self.sessions[session.key] = session
        self.resumable[session.sid] = session
        self.hub.join(session)
        chat_token, check_token = self._await_attach(session, peer)
        peer.send(ev.Resumed(name, accepted, last_id, chat_token, check_token))
        self.server.metrics.resumes += 1
        audit.emit("resume", user=name, addr=peer.host, session=session.sid, moved=True)
        return session

    def let_go(self, session: Session) -> None:
        """The cluster moved this session to another node (a RESUME there):
        drop it here without ending it. Its chat, the messages held for it
        and the fates of its own are the cluster's (in Redis), and so is
        telling the partner (AWAY, BACK)."""
        if session.phase is Phase.CLOSED:
            return
        self._drop_sockets(session)
        session.phase = Phase.CLOSED
        if session.resume_timer is not None:
            session.resume_timer.cancel()
            session.resume_timer = None
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        self.resumable.pop(session.sid, None)
        self.hub.let_go(session)
        session.release_waiting(force=True)
        audit.emit("session-moved", user=session.name, session=session.sid)

    # -- ending -------------------------------------------------------------------

    def end_session(self, session: Session, reason: str, text: str, bye: ev.Bye | None = None,
                    why: str | None = None, fate: tuple[str, str] | None = None) -> None:
        """End a session once: its chat or request, its timers, its three sockets.

        ``reason`` and ``text`` are what the partner is told (ENDED); ``why``
        is what the log says (session-end reason=...), ``reason`` if None.
        Chat messages held for a version 2 session are reported to their
        senders as not delivered: ``fate`` is the code and text (``gone`` if
        None).
        """
        if session.phase is Phase.CLOSED:
            return
        session.seq_base = session.accepted
        session.phase = Phase.CLOSED
        self.hub.leave(session, reason, text)
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        self.by_sid.pop(session.sid, None)
        session.tokens.clear()
        for timer in (session.attach_timer, session.heartbeat, session.resume_timer):
            if timer is not None:
                timer.cancel()
        login = session.login
        for peer in session.peers():
            peer.close(bye if peer is login else None)
        if session.outbox is not None:
            self._bury(session, fate or ("gone", f"{session.name} left before receiving it"))
        audit.emit("session-end", user=session.name, addr=login.host if login is not None else "-",
                   session=session.sid, reason=why or reason)

    def _bury(self, session: Session, fate: tuple[str, str]) -> None:
        """A version 2 session has ended: report what it held as not
        delivered, and keep its tombstone (its unacknowledged fates) for a
        late RESUME."""
        del self.resumable[session.sid]
        outbox = session.outbox
        code, text = fate
        for sender, first, last in outbox.held():
            sender.deliver(ev.Undelivered(first, last, code, text))
        outbox.keep_only(lambda data: data.startswith((b"DELIVERED ", b"UNDELIVERED ")))
        session.release_waiting(force=True)
        if len(self.tombstones) >= MAX_TOMBSTONES:
            _, timer = self.tombstones.pop(next(iter(self.tombstones)))
            timer.cancel()
        timer = self.reactor.call_later(TOMBSTONE_SECONDS, self.tombstones.pop, session.sid, None)
        self.tombstones[session.sid] = (session, timer)

    def peer_stuck(self, peer) -> None:
        """``peer`` has not read its output for stuck_timeout seconds: drop it.

        Its buffer cannot drain, so it is aborted rather than flushed."""
        peer.stuck = None
        session = peer.session
        if session is not None and peer in session.peers():
            self.lost(session, "dropped", f"{session.name} stopped reading", why="stuck")
        peer.transport.abort()

    def end_all_sessions(self, reason: str, text: str, bye: ev.Bye, why: str) -> None:
        """End every session (a cluster node that fenced itself)."""
        for session in list(self.sessions.values()):
            self.end_session(session, reason, f"{session.name} {text}", bye, why=why)

    def kick(self, name: str, text: str) -> bool:
        """End ``name``'s session: BYE kicked <text>; False if not logged in."""
        session = self.sessions.get(name.lower())
        if session is None:
            return False
        self.end_session(session, "kicked", f"{session.name} was disconnected by an operator",
                         ev.Bye("kicked", text), why="kicked")
        return True

    # -- heartbeats -----------------------------------------------------------------

    def _heartbeat(self, session: Session) -> None:
        if session.phase is not Phase.ONLINE:
            return
        cfg = self.server.config
        if session.check.paused:
            # We are not reading it (its partner cannot take more, a flood
            # being slowed...): its silence is ours. Look again later.
            session.awaiting_pong = False
            session.heartbeat.reset(cfg.ping_interval)
            return
        if session.awaiting_pong:
            self.lost(session, "dropped", f"{session.name} stopped answering heartbeats",
                             ev.Bye("ping-timeout", "no answer to PING within %g seconds" % cfg.ping_timeout),
                             why="ping-timeout")
            return
        session.awaiting_pong = True
        session.ping_seq += 1
        session.check.send(ev.Ping(str(session.ping_seq)))
        session.heartbeat.reset(cfg.ping_timeout)

    def alive(self, session: Session) -> None:
        """Any frame on the check socket: the client is alive."""
        session.awaiting_pong = False
        session.heartbeat.reset(self.server.config.ping_interval)
