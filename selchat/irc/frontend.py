"""The IRC front end: IRC clients (irssi, WeeChat, HexChat) as selchat users.

``selchat serve --irc-port PORT`` (and ``--irc-tls-port PORT``, with the
server's certificate) opens a second listener on the same reactor. Each
accepted IRC connection is an ``IrcConnection``: the transport's protocol
object, and for the rest of the server a stand-in for a ``Peer``. One IRC
connection is all three sockets of a protocol version 1 session at once
(its ``login``, ``chat`` and ``check``), so the server's own pieces do the
work unchanged:

* logging in goes through ``Logins.on_login`` (the same throttling, fair
  queue, password check on a worker thread, and takeover of the account's
  other session, whichever client it is), with the password from ``PASS`` or
  from SASL PLAIN;
* the session is started by ``Registry.start_session`` and attached with the
  two tokens of its ``WELCOME`` through ``Registry.on_attach``, so READY, the
  MOTD, heartbeats, the attach deadline and ``end_session`` are the
  registry's;
* commands go through the ``Server``'s own handlers (``on_chat``,
  ``on_accept``, ``on_decline``, ``on_quit``, ``on_who``, ``on_exit``): rate
  limits, the offline/unknown-user look-up and a cluster hub's asynchronous
  answers included; chat messages through ``Hub.message`` and the partner's
  ``hold_back``, as ``Server.on_message`` does;
* what the user is told arrives, as for any session, through
  ``Session.deliver`` (``send(event)`` here) and ``Session.deliver_block``
  (``transport.write`` of relayed ``MSG <sender> <text>`` frames here), and
  is translated to IRC: chat requests and their outcomes are NOTICEs from
  the service nick ``selchat``, a partner's messages PRIVMSGs from the
  partner's nick.

The wire format itself is ``selchat.irc.protocol`` (sans-I/O).
"""

from __future__ import annotations

import base64
import fnmatch
import logging
import re
from collections import deque

from selchat import __version__
from selchat.irc import protocol as irc
from selchat.irc.protocol import Message
from selchat.protocol import codec
from selchat.protocol import events as ev
from selchat.protocol.errors import FrameError
from selchat.protocol.events import Role
from selchat.protocol.state import State
from selchat.reactor.listener import Listener, bind
from selchat.reactor.tls import TLSTransport
from selchat.reactor.transport import Transport
from selchat.server import audit
from selchat.server.limits import bucket
from selchat.server.peer import BACKLOG, FLOOD, ReadPausing
from selchat.server.session import Phase
from selchat.store.accounts import USERNAME_MAX

log = logging.getLogger("selchat.irc")

#: The server's name in numerics and server notices.
SERVER_NAME = "irc.selchat"
#: The service nick that carries chat requests and takes the commands.
SERVICE = "selchat"
SERVICE_MASK = f"{SERVICE}!service@{SERVER_NAME}"
#: The host part of every user's mask: ``alice!alice@selchat``.
USER_HOST = "selchat"
#: Lines a client may send before it is logged in (a registration with CAP
#: and SASL takes 7 or 8); at least the server's own ``prelogin_frames``.
PRELOGIN_LINES = 30
#: Longest SASL PLAIN payload, base64, in all its AUTHENTICATE chunks.
MAX_SASL = 4096

_NICK = re.compile(r"[A-Za-z0-9_-]{1,%d}" % USERNAME_MAX)
# IRC formatting (bold, colours, italics ...) and other control characters:
# selchat text has none (a selchat client would refuse the frame).
_FORMATTING = re.compile(r"\x03(?:\d{1,2}(?:,\d{1,2})?)?|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?"
                         r"|[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_PRE_REGISTRATION = frozenset({"CAP", "PASS", "NICK", "USER", "AUTHENTICATE", "PING", "PONG", "QUIT"})

SERVICE_HELP = (
    "selchat has direct chats, no channels. Commands (/msg selchat ...):",
    "  chat NAME   ask NAME for a chat",
    "  yes | no    answer the chat request you were sent",
    "  quit        end your chat (or withdraw your request)",
    "  who         who is online, idle or busy",
    "  password OLD NEW   change your password (a space in OLD is written '\\ ')",
    "  block NAME  decline NAME's chat requests from now on (and end a chat with them)",
    "  unregister PASSWORD   delete your account, for good",
    "  unblock NAME, blocks   undo it; list whom you have blocked",
    "  help        this list",
    "While chatting, /msg NAME (or /query NAME) talks to your partner. /quit logs out.",
)


def clean_text(text: str) -> str:
    """IRC text -> selchat text: CTCP ACTION (/me) becomes ``* text``, other
    CTCP is dropped (""), formatting codes and control characters go."""
    if text.startswith("\x01"):
        body = text.strip("\x01")
        verb, _, rest = body.partition(" ")
        if verb.upper() != "ACTION":
            return ""
        text = "* " + rest
    text = _FORMATTING.sub("", text)
    return text if text.strip() else ""


def _cap_version(text: str) -> int:
    return int(text) if text.isdigit() and len(text) < 6 else 0


class IrcFrontend:
    """The IRC listeners of one server."""

    def __init__(self, server):
        self.server = server
        self.listeners: list[Listener] = []
        self.addresses: list[tuple[str, tuple]] = []  # ("plaintext" | "TLS", address)

    def listen(self) -> list[tuple[str, tuple]]:
        """Bind the IRC port(s) of the config; OSError names the port that failed."""
        cfg = self.server.config
        for port, tls in ((cfg.irc_port, False), (cfg.irc_tls_port, True)):
            if port is None:
                continue
            try:
                sock = bind(cfg.host, port)
            except OSError as exc:
                raise OSError(exc.errno, f"IRC port {cfg.host}:{port}: {exc.strerror or exc}") from None
            listener = Listener(self.server.reactor, sock, lambda s, a, t=tls: self.accept(s, a, t))
            self.listeners.append(listener)
            self.addresses.append(("TLS" if tls else "plaintext", listener.address))
        return self.addresses

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()

    def accept(self, sock, address, tls: bool) -> None:
        server = self.server
        host = address[0] if isinstance(address, tuple) else str(address)
        refusal = server.admission.refusal(host, len(server.peers))
        if refusal is not None:
            reason, _, text = refusal.partition(" ")
            server.metrics.refusals[reason] += 1
            audit.emit("refused", logging.WARNING, addr=host, reason=reason)
            try:
                sock.send(f"ERROR :Closing link: {reason} ({text})\r\n".encode())
            except OSError:
                pass
            sock.close()
            return
        server.admission.opened(host)
        cfg = server.config
        conn = IrcConnection(self, address)
        if tls:
            conn.wire = TLSTransport(server.reactor, sock, conn, context=server.tls,
                                     handshake_timeout=cfg.tls_handshake_timeout)
        else:
            conn.wire = Transport(server.reactor, sock, conn)
        server.peers.add(conn)
        conn.deadline = server.reactor.call_later(cfg.login_timeout, conn.login_timeout)


class _Relay:
    """What the server's code sees as ``peer.transport``: ``write`` takes
    the relay's ``MSG <sender> <text>`` frames (``Session.deliver_block``)
    and sends them as PRIVMSGs; the rest is the real transport's."""

    __slots__ = ("conn",)

    def __init__(self, conn: "IrcConnection"):
        self.conn = conn

    def write(self, data: bytes) -> None:
        conn = self.conn
        for line in data.split(b"\n"):
            if line.startswith(b"MSG "):
                _, sender, text = (line + b" ").split(b" ", 2)
                conn.privmsg_from(sender.decode("ascii"), text[:-1].decode("utf-8"))

    @property
    def closing(self) -> bool:
        return self.conn.wire.closing

    def close(self) -> None:
        self.conn.wire.close()

    def abort(self) -> None:
        self.conn.wire.abort()


class _State:
    """What the server's code sees as ``peer.conn``: a version 1 login socket
    that takes every user event while open, and the chat socket's count of
    chat messages."""

    __slots__ = ("msg_seq", "closed")

    def __init__(self):
        self.msg_seq = 0
        self.closed = False

    def can_send(self, event_type: type) -> bool:
        return not self.closed

    @property
    def state(self) -> State:
        return State.CLOSED if self.closed else State.LOGIN


#: Lines an IRC user sent that a NACK can still quote (one that names an
#: older line says only why): up to 128 KiB per user at 512-byte IRC lines.
RELAYED_KEPT = 256


class IrcConnection(ReadPausing):
    """One IRC client: the transport's protocol, and the login, chat and
    check "peer" of its session (see the module's docstring)."""

    hears_presence = True  # a partner's AWAY and BACK, as notices

    def __init__(self, frontend: IrcFrontend, address):
        self.frontend = frontend
        self.server = frontend.server
        self.address = address
        self.host = address[0] if isinstance(address, tuple) else str(address)
        self.wire = None               # the real Transport (or TLSTransport)
        self.transport = _Relay(self)  # what Session/Registry/Logins write to
        self.conn = _State()
        self.decoder = irc.Decoder()
        self.session = None
        self.deadline = None           # login deadline, as a Peer's
        self.stuck = None
        self.failures = 0              # failed logins on this connection (Logins counts)
        self.version = 1
        self.received = 0
        self.paused = 0
        self.congested = False
        self.feeders: list = []
        self.cmd_bucket = None         # once online
        self.msg_bucket = None         # set by Registry.on_attach
        self.prelogin_bytes = 0
        self.prelogin_lines = 0
        # registration
        self.nick: str | None = None   # as the client sent it
        self.user_given = False
        self.password: str | None = None
        self.cap_negotiating = False
        self.caps: set[str] = set()
        self.sasl_mech: str | None = None  # "PLAIN" while AUTHENTICATE chunks come
        self.sasl_data = ""
        self.checking: str | None = None   # "pass" or "sasl" while Logins checks the password
        self.tokens: tuple[str, str] | None = None  # from WELCOME, until attached
        self.name: str | None = None   # the account, once logged in
        self.registered = False        # 001 sent
        self.motd_lines = 0
        self.who_waiting: list = []    # callbacks for WHO answers, in order
        self.who_entries: list = []
        self.quitting_chat = False     # the service's quit ends a chat (not a request)
        # The last lines relayed (conn.msg_seq is the last one's seq): a NACK
        # names one by seq, as late as the partner's resume window's end.
        self.relayed: deque[str] = deque(maxlen=RELAYED_KEPT)

    def __repr__(self) -> str:
        return f"<IrcConnection {self.address} {self.name or self.nick or '-'}>"

    @property
    def me(self) -> str:
        return self.name or self.nick or "*"

    # -- from the transport ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.registered:  # logged in, but not through registration yet (SASL): still counted
            self.prelogin_bytes += len(data)
            if self.prelogin_bytes > self.server.config.prelogin_bytes:
                self.close_link("too-much", "too much input before login")
                return
        self.decoder.receive_data(data)
        self.process()

    def eof_received(self) -> None:
        self.decoder.receive_data(b"")
        self.process()

    def connection_lost(self, exc) -> None:
        self.conn.closed = True
        self.resume_feeders()
        server = self.server
        if self in server.peers:
            server.peers.discard(self)
            server.admission.closed(self.host)
        self._cancel_timers()
        session = self.session
        if session is not None and self in session.peers():
            server.registry.lost(session, "dropped", f"{session.name} lost connection")

    def pause_writing(self) -> None:
        self.congested = True
        self.pause(BACKLOG)
        self.stuck = self.server.reactor.call_later(self.server.config.stuck_timeout, self._stuck)

    def resume_writing(self) -> None:
        self.congested = False
        if self.stuck is not None:
            self.stuck.cancel()
            self.stuck = None
        self.resume(BACKLOG)
        self.resume_feeders()

    def _stuck(self) -> None:
        if self.session is not None:
            self.server.registry.peer_stuck(self)  # ends the session, aborts us
        else:
            self.stuck = None
            self.wire.abort()

    def login_timeout(self) -> None:
        self.deadline = None
        if self.session is None:
            self.close_link("timeout", "no login within %g seconds" % self.server.config.login_timeout)

    # -- reading: what Peer.process does, for IRC lines ------------------------------

    def process(self) -> None:
        decoder = self.decoder
        now = self.server.reactor.clock()
        for b in (self.cmd_bucket, self.msg_bucket):
            if b is not None:
                b.refill(now)
        try:
            while not self.paused and not self.wire.closing:
                item = decoder.next_event()
                if item is irc.NEED_DATA:
                    return
                if item is irc.CLOSED:
                    self.wire.close()  # connection_lost ends the session
                    return
                if not self.registered:
                    self.prelogin_lines += 1
                    if self.prelogin_lines > max(PRELOGIN_LINES, self.server.config.prelogin_frames):
                        self.close_link("too-much", "too many lines before login")
                        return
                if item is irc.TOO_LONG:
                    self.numeric(417, "Input line was too long")
                    continue
                if type(item) is irc.Malformed:
                    continue  # as IRC servers do: ignored
                session = self.session
                if session is not None and session.phase is Phase.ONLINE:
                    self.server.registry.alive(session)  # any line is a sign of life
                chat_message = self.handle(item)
                b = self.msg_bucket if chat_message else self.cmd_bucket
                if b is not None:
                    b.tokens -= 1.0
                    if b.tokens < 1.0:
                        b.refill(self.server.reactor.clock())
                        if b.tokens < 1.0:
                            self.pause(FLOOD)
                            self.server.reactor.call_later(b.wait(), self.resume, FLOOD)
                            return
        except Exception as exc:
            log.exception("error handling %r; closing it", self)
            self.wire.on_error(exc)

    def reader(self):
        """The transport ``ReadPausing`` pauses: the real socket's."""
        return self.wire

    # -- writing --------------------------------------------------------------------

    def write(self, msg: Message) -> None:
        if not self.wire.closing:
            self.wire.write(irc.encode_split(msg))

    def numeric(self, code: int, *params: str) -> None:
        """A numeric reply; a middle parameter that came from the client and
        cannot be one (``WHOIS :a b``) is sent as ``*``."""
        *middle, last = params
        middle = [p if p and " " not in p and not p.startswith(":") else "*" for p in middle]
        self.write(Message(f"{code:03d}", (self.me, *middle, last), SERVER_NAME))

    def notice(self, text: str, source: str = SERVICE_MASK) -> None:
        self.write(Message("NOTICE", (self.me, text), source))

    def privmsg_from(self, sender: str, text: str) -> None:
        self.write(Message("PRIVMSG", (self.me, text), f"{sender}!{sender}@{USER_HOST}"))

    def close_link(self, reason: str, text: str) -> None:
        """ERROR and close: the IRC end of a connection (a BYE)."""
        if not self.wire.closing:
            self.write(Message("ERROR", (f"Closing link: {self.host} ({reason}: {text})",)))
        self.conn.closed = True
        self._cancel_timers()
        self.wire.close()

    # -- the Peer interface the server's code uses ----------------------------------

    def send(self, event) -> None:
        """A selchat event for this user, from the registry, the hub, Logins
        or a Server handler: said in IRC."""
        if self.wire.closing:
            return
        handler = _EVENTS.get(type(event))
        if handler is not None:
            handler(self, event)

    def close(self, bye: ev.Bye | None = None) -> None:
        if bye is not None:
            self.close_link(bye.reason, bye.text)
        else:
            self.conn.closed = True
            self._cancel_timers()
            self.wire.close()

    def close_now(self) -> None:
        self.conn.closed = True
        self._cancel_timers()
        self.resume_feeders()
        self.wire.abort()

    def _cancel_timers(self) -> None:
        for timer in (self.deadline, self.stuck):
            if timer is not None:
                timer.cancel()
        self.deadline = self.stuck = None

    # -- selchat events -> IRC -------------------------------------------------------

    def _on_welcome(self, event: ev.Welcome) -> None:
        self.tokens = (event.chat_token, event.check_token)
        self.name = event.user
        if self.checking == "sasl":
            self.numeric(900, f"{self.name}!{self.name}@{USER_HOST}", self.name,
                         f"You are now logged in as {self.name}")
            self.numeric(903, "SASL authentication successful")
        self.checking = None
        # After Logins has finished with us (it resumes our reading next).
        self.server.reactor.call_soon(self._maybe_register)

    def _on_error(self, event: ev.Error) -> None:
        if event.verb in ("LOGIN", "REGISTER"):
            self._login_refused(event)
        elif event.verb == "WHO":
            self._who_answered(None)
        else:
            self.notice(f"{event.verb.lower()}: {event.text}")

    def _login_refused(self, event: ev.Error) -> None:
        how, self.checking = self.checking, None
        why = "Password incorrect" if event.code == "auth-failed" else f"Login refused ({event.code}): {event.text}"
        if how == "sasl":
            if event.code == "auth-failed":
                self.numeric(904, "SASL authentication failed")
            else:
                self.numeric(904, f"SASL authentication failed: {event.code}: {event.text}")
            self.server.reactor.call_soon(self._maybe_register)  # CAP END may have come meanwhile
        else:
            self.numeric(464, why)
            self.close_link("auth-failed" if event.code == "auth-failed" else event.code, why)

    def _on_ready(self, event: ev.Ready) -> None:
        name = self.name = event.user
        self.registered = True
        self.numeric(1, f"Welcome to selchat, {name}!{name}@{USER_HOST}")
        self.numeric(2, f"Your host is {SERVER_NAME}, running selchat {__version__}")
        self.numeric(3, "This server has direct chats only: /msg selchat help")
        self.write(Message("004", (name, SERVER_NAME, f"selchat-{__version__}", "i", "n"), SERVER_NAME))
        self.write(Message("005", (name, "CASEMAPPING=ascii", "CHANTYPES=#", "CHANLIMIT=#:0", f"NICKLEN={USERNAME_MAX}",
                                   "NETWORK=selchat", "are supported by this server"), SERVER_NAME))
        self.motd_lines = 0

    def _on_motd(self, event: ev.Motd) -> None:
        if self.motd_lines == 0:
            self.numeric(375, f"- {SERVER_NAME} Message of the day -")
        self.motd_lines += 1
        self.numeric(372, f"- {event.text}")

    def _send_motd(self) -> None:
        motd = self.server.motd
        if not motd:
            self.numeric(422, "MOTD File is missing")
            return
        self.numeric(375, f"- {SERVER_NAME} Message of the day -")
        for line in motd:
            self.numeric(372, f"- {line}")
        self.numeric(376, "End of /MOTD command.")

    def _on_request(self, event: ev.Request) -> None:
        self.notice(f"{event.user} wants to chat: /msg {SERVICE} yes (or no)")

    def _on_started(self, event: ev.Started) -> None:
        self.notice(f"chat with {event.user} started: /msg {event.user} (or /query {event.user}) to talk; "
                    f"/msg {SERVICE} quit ends it")

    def _on_declined(self, event: ev.Declined) -> None:
        self.notice(f"{event.user} declined your chat request")

    def _on_expired(self, event: ev.Expired) -> None:
        self.notice(f"the chat request between you and {event.user} expired (not answered in time)")

    def _on_cancelled(self, event: ev.Cancelled) -> None:
        self.notice(f"the chat request between you and {event.user} was cancelled")

    def _on_ended(self, event: ev.Ended) -> None:
        self.notice(f"chat with {event.user} ended ({event.reason}): {event.text}")

    def _on_away(self, event: ev.Away) -> None:
        self.notice(f"{event.user} is away (reconnecting): what you send is held for them until they are back")

    def _on_back(self, event: ev.Back) -> None:
        self.notice(f"{event.user} is back")

    def _on_incoming(self, event: ev.Incoming) -> None:
        self.privmsg_from(event.user, event.text)

    def _on_ok(self, event: ev.Ok) -> None:
        verb, info = event.verb, event.info
        if verb == "CHAT":
            self.notice(f"chat request sent to {info}; waiting for an answer (/msg {SERVICE} quit withdraws it)")
        elif verb == "DECLINE":
            self.notice(f"you declined {info}'s chat request")
        elif verb == "QUIT" and not self.quitting_chat:  # a chat's end is told by ENDED
            self.notice(f"you withdrew your chat request to {info}")
        elif verb == "WHO":
            entries, self.who_entries = self.who_entries, []
            self._who_answered(entries)
        elif verb == "PASSWORD":
            self.notice("your password is changed")
        elif verb == "UNREGISTER":
            self.notice(f"your account {info} is deleted")
        elif verb == "BLOCK":
            self.notice(f"you blocked {info}: their chat requests are declined for you")
        elif verb == "UNBLOCK":
            self.notice(f"you unblocked {info}")
        elif verb == "BLOCKS":  # its USER lines came first, as WHO's do
            entries, self.who_entries = self.who_entries, []
            self.notice("blocked: " + (", ".join(e.user for e in entries) or "nobody"))

    def _on_user_entry(self, event: ev.UserEntry) -> None:
        self.who_entries.append(event)

    def _on_nack(self, event: ev.Nack) -> None:
        """A relayed line that will never be delivered (its partner did not
        come back in time)."""
        back = self.conn.msg_seq - event.seq  # 0: the last line relayed
        line = f"'{self.relayed[-1 - back]}' " if 0 <= back < len(self.relayed) else ""
        self.notice(f"not delivered: {line}({event.text})")

    def _on_ping(self, event: ev.Ping) -> None:
        self.write(Message("PING", (event.data or SERVER_NAME,)))

    def _on_server_notice(self, event) -> None:  # Notice (operator broadcast), Shutdown
        self.notice(event.text, SERVER_NAME)

    def _on_bye(self, event: ev.Bye) -> None:
        self.close_link(event.reason, event.text)

    # -- registration ----------------------------------------------------------------

    def _maybe_register(self) -> None:
        """Once NICK and USER are in and CAP negotiation is over: log in with
        PASS (or wait for SASL's check), then attach the session."""
        if self.wire.closing or self.registered or self.nick is None or not self.user_given or self.cap_negotiating:
            return
        if self.checking is not None:
            return  # Logins is checking; its answer calls this again
        if self.tokens is not None:
            self._attach()
            return
        if self.session is not None:
            return
        if self.password is not None:
            self.checking = "pass"
            self.server.logins.on_login(self, ev.Login(self.nick, self.password))
            return
        self.numeric(464, "Password required: your selchat password as the server password, or SASL PLAIN")
        self.close_link("auth-failed", "password required")

    def _attach(self) -> None:
        """Attach the session as its chat and check sockets: READY and the
        MOTD come through ``send``; then the end of the MOTD."""
        session = self.session
        chat, check = self.tokens
        self.tokens = None
        if session is None or session.phase is not Phase.ATTACHING:
            return
        registry = self.server.registry
        registry.on_attach(self, ev.Attach(Role.CHAT, chat))
        registry.on_attach(self, ev.Attach(Role.CHECK, check))
        if not self.registered:
            return
        cfg = self.server.config
        self.cmd_bucket = bucket(cfg.cmd_rate, cfg.cmd_burst, self.server.reactor.clock())
        if self.motd_lines:
            self.numeric(376, "End of /MOTD command.")
        else:
            self.numeric(422, "MOTD File is missing")
        self.notice(f"logged in as {self.name}. Chat requests arrive here: answer /msg {SERVICE} yes or no; "
                    f"/msg {SERVICE} chat NAME asks someone; /msg {SERVICE} help lists the commands")

    # -- IRC commands ---------------------------------------------------------------

    def handle(self, msg: Message) -> bool:
        """Act on one message; True if it was a chat message (rate limited as one)."""
        command = msg.command
        if not self.registered and command not in _PRE_REGISTRATION:
            self.numeric(451, "You have not registered")
            return False
        handler = _COMMANDS.get(command)
        if handler is None:
            log.debug("%r: unknown IRC command %s", self, command)
            self.numeric(421, command, "Unknown command")
            return False
        return bool(handler(self, msg))

    def irc_cap(self, msg: Message) -> None:
        sub = msg.arg(0).upper()
        if sub == "LS":
            if not self.registered:
                self.cap_negotiating = True
            self.write(Message("CAP", (self.me, "LS", "sasl=PLAIN" if _cap_version(msg.arg(1)) >= 302 else "sasl"), SERVER_NAME))
        elif sub == "LIST":
            self.write(Message("CAP", (self.me, "LIST", " ".join(sorted(self.caps))), SERVER_NAME))
        elif sub == "REQ":
            if not self.registered:
                self.cap_negotiating = True
            wanted = msg.arg(1).split()
            if all(cap.lstrip("-") == "sasl" for cap in wanted) and wanted:
                for cap in wanted:
                    if cap.startswith("-"):
                        self.caps.discard("sasl")
                    else:
                        self.caps.add("sasl")
                self.write(Message("CAP", (self.me, "ACK", msg.arg(1)), SERVER_NAME))
            else:
                self.write(Message("CAP", (self.me, "NAK", msg.arg(1)), SERVER_NAME))
        elif sub == "END":
            if self.cap_negotiating:
                self.cap_negotiating = False
                self._maybe_register()
        else:
            self.numeric(410, sub or "*", "Invalid CAP command")

    def irc_pass(self, msg: Message) -> None:
        if self.registered or self.session is not None:
            self.numeric(462, "You may not reregister")
        elif not msg.params:
            self.numeric(461, "PASS", "Not enough parameters")
        else:
            self.password = msg.params[-1] if len(msg.params) == 1 else " ".join(msg.params)

    def irc_nick(self, msg: Message) -> None:
        nick = msg.arg(0)
        if not nick:
            self.numeric(431, "No nickname given")
            return
        if self.registered:
            if nick != self.name:
                self.numeric(447, nick, f"Cannot change nickname: your nick is your account name, {self.name}")
            return
        if nick.lower() == SERVICE:
            self.numeric(432, nick, f"Erroneous nickname: {SERVICE} is the service")
            return
        if not _NICK.fullmatch(nick):
            self.numeric(432, nick, f"Erroneous nickname: your nick is your selchat account name "
                                    f"(1-{USERNAME_MAX} of A-Z a-z 0-9 _ -)")
            return
        self.nick = nick
        self._maybe_register()

    def irc_user(self, msg: Message) -> None:
        if self.registered or self.user_given:
            self.numeric(462, "You may not reregister")
            return
        if len(msg.params) < 4:
            self.numeric(461, "USER", "Not enough parameters")
            return
        self.user_given = True
        self._maybe_register()

    def irc_authenticate(self, msg: Message) -> None:
        arg = msg.arg(0)
        if self.session is not None or self.registered:
            self.numeric(907, "You have already authenticated using SASL")
            return
        if self.checking is not None:
            return  # a check is running: its answer comes
        if arg == "*":
            self.sasl_mech, self.sasl_data = None, ""
            self.numeric(906, "SASL authentication aborted")
            return
        if self.sasl_mech is None:
            if arg.upper() != "PLAIN":
                self.numeric(908, "PLAIN", "are available SASL mechanisms")
                self.numeric(904, "SASL authentication failed")
                return
            self.sasl_mech = "PLAIN"
            self.write(Message("AUTHENTICATE", ("+",)))
            return
        if arg != "+":
            self.sasl_data += arg
        if len(self.sasl_data) > MAX_SASL:
            self.sasl_mech, self.sasl_data = None, ""
            self.numeric(905, "SASL message too long")
            return
        if len(arg) == 400:
            return  # more chunks follow
        data, self.sasl_mech, self.sasl_data = self.sasl_data, None, ""
        try:
            authzid, authcid, password = base64.b64decode(data, validate=True).decode("utf-8").split("\0")
        except (ValueError, UnicodeDecodeError):
            self.numeric(904, "SASL authentication failed")
            return
        if authzid and authzid != authcid:
            self.numeric(904, "SASL authentication failed: authorization identity must be the account")
            return
        if not authcid or not password or authcid.lower() == SERVICE:  # the service's nick is taken here
            self.numeric(904, "SASL authentication failed")
            return
        self.checking = "sasl"
        self.server.logins.on_login(self, ev.Login(authcid, password))

    def irc_ping(self, msg: Message) -> None:
        if not msg.params:
            self.numeric(409, "No origin specified")
            return
        self.write(Message("PONG", (SERVER_NAME, msg.params[-1]), SERVER_NAME))

    def irc_pong(self, msg: Message) -> None:
        pass  # any line is a sign of life (process)

    def irc_quit(self, msg: Message) -> None:
        session = self.session
        if session is None or session.phase is not Phase.ONLINE:
            self.close_link("quit", msg.arg(0) or "client quit")
            return
        self.server.on_exit(self, ev.Exit())

    def irc_privmsg(self, msg: Message, notice: bool = False) -> bool:
        if len(msg.params) < 2:
            if not notice:
                self.numeric(411 if not msg.params else 412,
                             "No recipient given (PRIVMSG)" if not msg.params else "No text to send")
            return False
        relayed = False
        for target in msg.params[0].split(","):
            if not target:
                continue
            relayed |= self._say(target, msg.params[1], notice)
        return relayed

    def irc_notice(self, msg: Message) -> bool:
        return self.irc_privmsg(msg, notice=True)

    def _say(self, target: str, text: str, notice: bool) -> bool:
        key = target.lower()
        session = self.session
        if key == SERVICE:
            if not notice:
                self._service(text)
            return False
        if key == session.key:  # to oneself, as IRC servers echo it
            self.write(Message("NOTICE" if notice else "PRIVMSG", (self.me, text), f"{self.me}!{self.me}@{USER_HOST}"))
            return False
        if target[0] in "#&+!":
            if not notice:
                self.numeric(404, target, "Cannot send to channel: selchat has no channels (/msg selchat help)")
            return False
        partner = session.partner
        if partner is None or partner.key != key:
            if not notice:
                self.numeric(404, target, f"Cannot send: you are not chatting with {target} "
                                          f"(/msg {SERVICE} chat {target} asks for a chat)")
            return False
        text = clean_text(text)
        if not text:
            if not notice:
                self.notice(f"not sent to {partner.name}: nothing left once formatting and CTCP are removed")
            return False
        self.conn.msg_seq += 1
        self.relayed.append(text)
        nack = self.server.hub.message(session, text, self.conn.msg_seq)
        if nack is not None:
            if not notice:
                self.notice(f"not delivered: {nack.text}")
            return True
        self.server.metrics.messages_relayed += 1
        session.partner.hold_back(self)  # the partner cannot take more now: read no more from us
        return True

    def _service(self, text: str) -> None:
        words = clean_text(text).split()
        verb = words[0].lower().lstrip("/") if words else "help"
        server = self.server
        if verb in ("yes", "y", "accept"):
            server.on_accept(self, ev.Accept())
        elif verb in ("no", "n", "decline"):
            server.on_decline(self, ev.Decline())
        elif verb == "chat":
            if len(words) != 2:
                self.notice(f"usage: /msg {SERVICE} chat NAME")
            elif not _NICK.fullmatch(words[1]):
                self.notice(f"there is no user {words[1]}")
            else:
                server.on_chat(self, ev.ChatRequest(words[1]))
        elif verb in ("quit", "end", "leave"):
            self.quitting_chat = self.session.partner is not None
            server.on_quit(self, ev.Quit())
        elif verb == "who":
            self._who(self._who_notice)
        elif verb == "unregister":  # the rest of the line is the password, as for LOGIN
            password = clean_text(text).lstrip().partition(" ")[2]
            if not password:
                self.notice(f"usage: /msg {SERVICE} unregister PASSWORD (deletes your account for good)")
            else:
                server.logins.on_unregister(self, ev.Unregister(password))
        elif verb in ("block", "unblock"):
            if len(words) != 2:
                self.notice(f"usage: /msg {SERVICE} {verb} NAME")
            elif not _NICK.fullmatch(words[1]):
                self.notice(f"there is no user {words[1]}")
            elif verb == "block":
                server.blocking.on_block(self, ev.Block(words[1]))
            else:
                server.blocking.on_unblock(self, ev.Unblock(words[1]))
        elif verb == "blocks":
            server.blocking.on_blocks(self, ev.Blocks())
        elif verb == "password":  # not split into words: a password may have spaces, a trailing one too
            try:
                old, new = codec.split_escaped("PASSWORD", clean_text(text).lstrip().partition(" ")[2],
                                               "password OLD NEW")
            except FrameError:
                self.notice(f"usage: /msg {SERVICE} password OLD NEW (in OLD, write a space as '\\ ' "
                            "and a backslash as '\\\\')")
            else:
                server.logins.on_password(self, ev.Password(old, new))
        elif verb == "help":
            for line in SERVICE_HELP:
                self.notice(line)
        else:
            self.notice(f"unknown command {verb!r}: /msg {SERVICE} help lists the commands")

    # -- WHO, WHOIS, ISON, USERHOST: from the hub's WHO -------------------------------

    def _who(self, then) -> None:
        """``then(entries)`` with the hub's list of UserEntry (None if it
        could not answer); through ``Server.on_who``, so a cluster's
        asynchronous answer keeps our later lines waiting, in order."""
        self.who_waiting.append(then)
        self.server.on_who(self, ev.Who())

    def _who_answered(self, entries) -> None:
        if self.who_waiting:
            self.who_waiting.pop(0)(entries)

    def _who_notice(self, entries) -> None:
        if entries is None:
            self.notice("who: the list is not available right now; try again shortly")
            return
        listed = ", ".join(f"{e.user} ({e.status})" for e in entries)
        self.notice(f"online: {listed}" if listed else "online: nobody")

    def irc_who(self, msg: Message) -> None:
        mask = msg.arg(0) or "*"
        pattern = "*" if mask == "0" else mask.lower()

        def answer(entries) -> None:
            for e in entries or ():
                if fnmatch.fnmatchcase(e.user.lower(), pattern):
                    flag = "G" if e.status == "busy" else "H"
                    self.numeric(352, "*", e.user, USER_HOST, SERVER_NAME, e.user, flag, f"0 {e.status}")
            if fnmatch.fnmatchcase(SERVICE, pattern):
                self.numeric(352, "*", "service", SERVER_NAME, SERVER_NAME, SERVICE, "H", "0 the selchat service")
            self.numeric(315, mask, "End of WHO list")

        self._who(answer)

    def irc_whois(self, msg: Message) -> None:
        if not msg.params:
            self.numeric(431, "No nickname given")
            return
        nicks = msg.params[-1]

        def answer(entries) -> None:
            online = {e.user.lower(): e for e in entries or ()}
            for nick in nicks.split(","):
                if not nick:
                    continue
                if nick.lower() == SERVICE:
                    self.numeric(311, SERVICE, "service", SERVER_NAME, "*", "the selchat service: /msg selchat help")
                    self.numeric(312, SERVICE, SERVER_NAME, "selchat")
                elif nick.lower() in online:
                    e = online[nick.lower()]
                    self.numeric(311, e.user, e.user, USER_HOST, "*", f"selchat user ({e.status})")
                    self.numeric(312, e.user, SERVER_NAME, "selchat")
                    if e.status == "busy":
                        self.numeric(301, e.user, "busy: in a chat, or answering a chat request")
                else:
                    self.numeric(401, nick, "No such nick")
                self.numeric(318, nick, "End of WHOIS list")

        self._who(answer)

    def irc_ison(self, msg: Message) -> None:
        asked = " ".join(msg.params).split()
        if not asked:
            self.numeric(461, "ISON", "Not enough parameters")
            return

        def answer(entries) -> None:
            online = {e.user.lower(): e.user for e in entries or ()}
            online[SERVICE] = SERVICE
            self.numeric(303, " ".join(online[n.lower()] for n in asked if n.lower() in online))

        self._who(answer)

    def irc_userhost(self, msg: Message) -> None:
        asked = " ".join(msg.params).split()[:5]
        if not asked:
            self.numeric(461, "USERHOST", "Not enough parameters")
            return

        def answer(entries) -> None:
            online = {e.user.lower(): e for e in entries or ()}
            replies = []
            for nick in asked:
                e = online.get(nick.lower())
                if e is not None:
                    replies.append(f"{e.user}={'-' if e.status == 'busy' else '+'}{e.user}@{USER_HOST}")
            self.numeric(302, " ".join(replies))

        self._who(answer)

    # -- the rest: what IRC has and selchat does not ------------------------------------

    def irc_mode(self, msg: Message) -> None:
        target = msg.arg(0)
        if not target:
            self.numeric(461, "MODE", "Not enough parameters")
        elif target.lower() != self.session.key:
            if target[0] in "#&+!":
                self.numeric(403, target, "No such channel: selchat has no channels")
            else:
                self.numeric(502, "Cannot change mode for other users")
        elif len(msg.params) == 1:
            self.numeric(221, "+")
        elif set(msg.params[1]) <= set("+-i"):
            pass  # +i: everyone here is invisible to channels there are none of
        else:
            self.numeric(501, "Unknown MODE flag")

    def irc_join(self, msg: Message) -> None:
        for channel in msg.arg(0).split(","):
            if channel and channel != "0":
                self.numeric(403, channel, f"No such channel: selchat has no channels; "
                                           f"/msg {SERVICE} chat NAME for a direct chat")

    def irc_part(self, msg: Message) -> None:
        for channel in msg.arg(0).split(","):
            if channel:
                self.numeric(403, channel, "No such channel: selchat has no channels")

    def irc_names(self, msg: Message) -> None:
        self.numeric(366, msg.arg(0) or "*", "End of /NAMES list")

    def irc_list(self, msg: Message) -> None:
        self.numeric(321, "Channel", "Users  Name")
        self.numeric(323, "End of /LIST: selchat has no channels")

    def irc_motd(self, msg: Message) -> None:
        self._send_motd()

    def irc_version(self, msg: Message) -> None:
        self.numeric(351, f"selchat-{__version__}.", SERVER_NAME, "the selchat IRC front end")


_COMMANDS = {
    "CAP": IrcConnection.irc_cap,
    "PASS": IrcConnection.irc_pass,
    "NICK": IrcConnection.irc_nick,
    "USER": IrcConnection.irc_user,
    "AUTHENTICATE": IrcConnection.irc_authenticate,
    "PING": IrcConnection.irc_ping,
    "PONG": IrcConnection.irc_pong,
    "QUIT": IrcConnection.irc_quit,
    "PRIVMSG": IrcConnection.irc_privmsg,
    "NOTICE": IrcConnection.irc_notice,
    "WHO": IrcConnection.irc_who,
    "WHOIS": IrcConnection.irc_whois,
    "ISON": IrcConnection.irc_ison,
    "USERHOST": IrcConnection.irc_userhost,
    "MODE": IrcConnection.irc_mode,
    "JOIN": IrcConnection.irc_join,
    "PART": IrcConnection.irc_part,
    "NAMES": IrcConnection.irc_names,
    "LIST": IrcConnection.irc_list,
    "MOTD": IrcConnection.irc_motd,
    "VERSION": IrcConnection.irc_version,
}

_EVENTS = {
    ev.Welcome: IrcConnection._on_welcome,
    ev.Error: IrcConnection._on_error,
    ev.Ready: IrcConnection._on_ready,
    ev.Motd: IrcConnection._on_motd,
    ev.Request: IrcConnection._on_request,
    ev.Started: IrcConnection._on_started,
    ev.Declined: IrcConnection._on_declined,
    ev.Expired: IrcConnection._on_expired,
    ev.Cancelled: IrcConnection._on_cancelled,
    ev.Ended: IrcConnection._on_ended,
    ev.Away: IrcConnection._on_away,
    ev.Back: IrcConnection._on_back,
    ev.Incoming: IrcConnection._on_incoming,
    ev.Ok: IrcConnection._on_ok,
    ev.UserEntry: IrcConnection._on_user_entry,
    ev.Nack: IrcConnection._on_nack,
    ev.Ping: IrcConnection._on_ping,
    ev.Notice: IrcConnection._on_server_notice,
    ev.Shutdown: IrcConnection._on_server_notice,
    ev.Bye: IrcConnection._on_bye,
    # Attached, and version 2's fates (never sent to a version 1 session): nothing to say.
}
