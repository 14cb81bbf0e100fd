"""The client session, sans I/O: typed lines and received bytes in, effects out.

``ClientSession`` owns the three ``Connection(CLIENT)`` objects (login, chat,
check) and what the user sees: the phase of the session and the partner it is
about. Every public method returns a list of *effects* for the loop to carry
out, in order:

- ``Send(role, data)``: write these bytes on that socket;
- ``Connect(role)``: open that socket now (the ``Send``\\ s for it follow);
- ``Notice(kind, ...)``: show something to the user (``notices.FORMATS`` renders it);
- ``Close(code)``: the session is over; close every socket, exit with ``code``.
- ``Reconnect(delay, server)``: the connection is gone; close every socket, and after
  ``delay`` seconds open a new login socket to ``server`` (None: the one server
  there is) and call ``start()`` again (or ``reconnect_failed(why)`` if it
  cannot be opened);
- ``Roster(users)``: a fresh list of who is online (for tab completion);
- ``AckLater(delay)``: call ``ack_now()`` in ``delay`` seconds (version 2
  acknowledgements are batched: see ``ev.ACK_DELAY``; the last
  ``ev.ACK_GRACE`` of the delay, a chat message we send carries the ACK;
  after an ACK, a rest of about ``ev.ACK_SPACING`` less the delay before
  the next delay starts);
  ``AckLater(delay, confirm=True)``: call ``ack_confirm()`` (did the server
  read the ACK that rode with a message?).

Nothing here reads a clock or touches a socket. Time enters only through
``Heartbeat``, whose methods take ``now`` from the loop, and the clock passed
to ``servers.Failover``; chance only through ``Backoff``, whose random source
is passed in.

Reconnecting
------------
With ``reconnect=True``, a session that has once been online and then loses
its connection (EOF, a socket error, no heartbeat, or a ``BYE`` other than
``replaced``, ``kicked``, ``auth-failed``, ``exit`` or ``unregistered``) does not end: it says what was lost
(the chat or request, if any), enters ``Phase.RECONNECTING`` and asks the loop
to try again after a capped, jittered exponential delay (``Backoff``). The
next ``start()`` logs in with the same credentials (``LOGIN``, also when the
first time was ``REGISTER``); ``READY`` then says where the user stands now.
Protocol errors and refused logins still end the session.

With several servers (``--host a,b``) the session is given a
``servers.Failover``, which says where each attempt goes and whether it
waits: the same server at once after a loss, then the others one after the
other without waiting, the backoff only once a whole round has failed (that
module says exactly). Every attempt is counted (``attempt``, shown in
``reconnecting``), while the backoff doubles once per round. Each new login
socket is announced (``connected``: the server it reached), and a failed
attempt's reason names the server that failed.

Version 2: resuming, one fate per message
-----------------------------------------
With reconnecting on, ``start()`` pipelines ``VERSION 2`` before ``LOGIN``
(a server that answers ``ERR VERSION`` is spoken to in version 1). A
``WELCOME`` with a resume token makes the session version 2: every frame the
login socket brings after it (``BYE`` excepted) has the next id, and each read
that brought any is acknowledged on the check socket, batched: one ``ACK <id>``
within ``ev.ACK_DELAY`` of the first event not yet acknowledged but not
before about ``ev.ACK_SPACING`` after the previous timed one, or at once when
``ev.ACK_EVERY`` wait (and before EXIT).
Every ``MSG`` we send gets the next seq of the session and is kept (``_mine``)
until ``DELIVERED`` or ``UNDELIVERED`` names it; ``RECEIVED`` on the chat
socket says which of them the server has (``_received``).

A drop does not end the chat: its state is kept (``_standing``) and the next
``start()`` sends ``RESUME <token> <last id>``. ``RESUMED`` sets the id count
back to the server's, restores the chat state and says so (``resumed``);
replayed events then move it on as usual (an id already handled is skipped,
so nothing is shown twice). It attaches new chat and check sockets; once both are attached, every kept
message after ``accepted`` is sent again, in order, on the new chat socket.
Lines typed in a chat meanwhile are kept the same way (``queued``). If the
server no longer has the session (``ERR RESUME``, or ``UNRESUMED`` with the
fates it still has, then ``BYE``), each kept message gets its last word here:
``unconfirmed`` if the server had it, not delivered otherwise; then a new
``LOGIN``. Whenever the session ends with messages still without a fate, the
same is said of them.

Whose WHO
---------
Tab completion asks the server who is online with a WHO of its own
(``refresh_names()``). Replies on the chat socket come in the order the
commands went out, so a queue of "was it the user's?" flags, one per WHO
sent, tells each ``OK WHO`` apart: every one refreshes ``known_users`` (a
``Roster`` effect), only the user's own is shown.

``/blocks`` is answered the same way (``USER <name> blocked`` lines, then
``OK BLOCKS <count>``), and may be answered while such a WHO is on its way.
Replies stay in order, so the ``USER`` lines read since the last ``OK WHO``
or ``OK BLOCKS`` belong to whichever of the two comes next: it takes them
all, and the roster never sees a blocked name, nor the block list a WHO's.

The block list
--------------
``/block NAME`` (servers from 0.6.0): the server declines NAME's chat
requests for us from then on. A chat with NAME ends as if we had typed
``/quit`` (``ENDED NAME quit ...`` on the login socket, shown as any end of a
chat); a request between us is dropped with no event for us, so ``OK BLOCK``
says it (``you-withdrew`` or ``you-declined``) and the phase goes back to idle.
``blocked`` is the list as far as this session has seen it (``OK BLOCK``,
``OK UNBLOCK``, ``OK BLOCKS``), for completing ``/unblock``.

Three sockets, one order
------------------------
Replies to commands arrive on the chat socket, their consequences on the
login socket. Bytes on two TCP connections can be read in either order, so
``STARTED bob`` may be read before ``OK CHAT bob``. The rules that keep the
display right whatever the order:

- The login socket is the authority on chats and requests (REQUEST, STARTED,
  DECLINED, EXPIRED, CANCELLED, ENDED change the phase unconditionally or
  when they name the current partner).
- ``/chat NAME`` from the idle phase moves to "request out" *when it is sent*
  (optimistically), so an early STARTED/DECLINED finds the phase it expects;
  ``ERR CHAT`` undoes it, ``OK CHAT`` only confirms it.
- Your own ``/quit`` is shown once, as "you left the chat with bob", in either
  order: the server also sends the quitter ``ENDED bob quit ...``; read before
  ``OK QUIT`` it is held back, and shown only if the QUIT is refused after all
  (bob quit first, so his ENDED was the real news).
"""

from __future__ import annotations

import difflib
import enum
import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Callable

from selchat.client.notices import Notice
from selchat.client.servers import Failover, Server
from selchat.protocol import codec
from selchat.protocol import events as ev
from selchat.protocol.connection import CLIENT, Connection
from selchat.protocol.errors import FrameError
from selchat.protocol.state import State

Role = ev.Role
LOGIN, CHAT, CHECK = Role.LOGIN, Role.CHAT, Role.CHECK

#: Sent message texts kept by sequence number so that a NACK can name its text.
SENT_KEPT = 500
#: WHO entries listed at most in the "online:" line (the rest are counted, not listed).
WHO_LISTED = 200
#: User names kept from a WHO reply for completion (and for --json) at most.
NAMES_KEPT = 5000
#: Reconnecting: the first delay, and the cap of the doubling (seconds).
RECONNECT_FIRST, RECONNECT_CAP = 1.0, 30.0
#: The cap while a version 2 session waits to be resumed: the server keeps it
#: only for its resume window (120 s by default), and a RESUME costs it no
#: password hash, so come back soon after the network does.
RESUME_CAP = 8.0
#: The protocol version the client asks for (``VERSION 2`` before logging in).
ASK_VERSION = 2
#: BYE reasons after which reconnecting would be wrong: someone else logged in
#: to the account, an operator disconnected us (``selchat admin kick``: coming
#: straight back would undo it), the password is no longer accepted, we
#: asked to leave, or the account is deleted (``/unregister``).
FINAL_BYES = frozenset({"replaced", "kicked", "auth-failed", "exit", "unregistered"})
#: ERR LOGIN codes that say "not now" rather than "no": a reconnecting client
#: (its password worked before) waits and tries again instead of exiting.
#: Many clients behind one address reconnecting after a restart can meet
#: ``busy``; ``storage`` is the server's database; ``throttled`` someone
#: else's guessing from the same address; ``unavailable`` a node of a cluster
#: that cannot reach the cluster right now (another node may).
TRANSIENT_LOGIN_ERRORS = frozenset({"busy", "storage", "throttled", "unavailable"})
#: The data of the PING a version 2 client sends before EXIT (see ``_leave``).
EXIT_SYNC = "exit"
#: Exit codes of ``selchat connect``.
EXIT_OK, EXIT_LOGIN, EXIT_UNREACHABLE, EXIT_LOST = 0, 1, 2, 3

USERNAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_PASSWORD_BYTES = 1024

# --- What the loop does ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` on the socket of ``role``."""

    role: Role
    data: bytes


@dataclass(frozen=True, slots=True)
class Connect:
    """Open the socket of ``role`` (to the same address as the login socket)."""

    role: Role


@dataclass(frozen=True, slots=True)
class Close:
    """The session is over: close all sockets and exit with ``code``."""

    code: int


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The connection is gone: close all sockets; in ``delay`` s open a new login
    socket to ``server`` (None: the only server there is)."""

    delay: float
    server: Server | None = None


@dataclass(frozen=True, slots=True)
class Roster:
    """Who is online now, from a WHO reply (the user's own or a background one)."""

    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AckLater:
    """Version 2: call ``ack_now()`` after ``delay`` seconds (unless the
    connection is dropped first; a new one asks again); with ``confirm``,
    call ``ack_confirm()`` instead (a second timer, independent of the first)."""

    delay: float
    confirm: bool = False


#: Version 2: an ACK that rode with a chat message is sent again on the check
#: socket if that message has neither RECEIVED nor a fate this long after (the
#: server was not reading the chat socket, so it has not read the ACK either).
#: A RECEIVED can wait up to 1.25 ``RECEIVED_SPACING`` after the previous one.
ACK_CONFIRM = ev.RECEIVED_SPACING * 1.25 + 0.5


Effect = Send | Connect | Close | Notice | Reconnect | Roster | AckLater


class Phase(enum.Enum):
    """What the user is doing, as the prompt shows it."""

    CONNECTING = "connecting"
    LOGGING_IN = "logging in"
    ATTACHING = "attaching"
    IDLE = "idle"
    REQUEST_OUT = "request out"
    REQUEST_IN = "request in"
    CHATTING = "chatting"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


ONLINE = frozenset({Phase.IDLE, Phase.REQUEST_OUT, Phase.REQUEST_IN, Phase.CHATTING})
YES, NO = frozenset({"yes", "y"}), frozenset({"no", "n"})


#: The longest message one MSG frame carries, in bytes; a longer line is sent
#: as several messages, cut after a space within its last PIECE_SPACE bytes
#: if there is one, else at a character boundary.
MAX_TEXT = codec.MAX_FRAME - len("MSG ")
PIECE_SPACE = 200


def _pieces(text: str) -> list[str]:
    data = text.encode("utf-8")
    if len(data) <= MAX_TEXT:
        return [text]
    return [piece.decode("utf-8") for piece in codec.split_utf8(data, MAX_TEXT, b" ", PIECE_SPACE)]


def check_username(user: str) -> str | None:
    """None if ``user`` is a valid user name, else why not."""
    if USERNAME.fullmatch(user):
        return None
    return f"not a valid user name: {user!r} (1-32 letters, digits, _ or -)"


def check_password(password: str) -> str | None:
    """None if ``password`` can be sent in a LOGIN frame, else why not."""
    if not password:
        return "the password is empty"
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        return f"the password is longer than {MAX_PASSWORD_BYTES} bytes"
    return _control_error(password, "the password")


def _control_error(text: str, what: str) -> str | None:
    try:
        codec.decode_text(text.encode("utf-8"))
    except (FrameError, UnicodeEncodeError):
        return f"{what} contains control characters"
    return None


class Backoff:
    """Delays between reconnection attempts: capped exponential, with jitter.

    Attempt n waits a random time between half and all of
    ``min(cap, first * 2**(n-1))`` ("equal jitter"): never less than half the
    nominal delay, so a dead server is not hammered, and spread out so that
    the clients a restarted server dropped do not all come back in the same
    instant. ``rng`` returns a float in [0, 1); tests pass their own.
    """

    def __init__(self, first: float = RECONNECT_FIRST, cap: float = RECONNECT_CAP,
                 rng: Callable[[], float] = random.random):
        self.first, self.cap, self.rng = first, cap, rng
        self.attempt = 0

    def next(self, cap: float | None = None) -> float:
        """The delay before the next attempt (and count it); ``cap`` lowers the cap."""
        self.attempt += 1
        nominal = min(self.cap if cap is None else min(cap, self.cap), self.first * 2 ** min(self.attempt - 1, 32))
        return nominal / 2 + self.rng() * nominal / 2

    def reset(self) -> None:
        self.attempt = 0


class ClientSession:
    """One user's session over three sockets, with no I/O.

    Call ``start()`` once the login socket is open, then ``receive(role, data)``
    for bytes read (``b""`` at EOF), ``typed(line)`` for each line the user
    enters, ``exit()`` / ``interrupt()`` for end of input and Ctrl-C, ``ping()``
    and ``not_responding()`` from the heartbeat timer, ``lost(text)`` for a
    socket error, ``refresh_names()`` to ask the server who is online without
    showing it, ``reconnect_failed(text)`` when a login socket could not be
    opened again. Each returns the effects to carry out.

    ``servers``, a ``Failover`` (the loop's, which opened the first login
    socket with it), decides where reconnecting goes; without it there is one
    server and ``Reconnect`` names none.
    """

    def __init__(self, user: str, password: str, register: bool = False, reconnect: bool = False,
                 backoff: Backoff | None = None, version: int | None = None, ack_delay: float = ev.ACK_DELAY,
                 servers: Failover | None = None, rng: Callable[[], float] = random.random):
        self.user = user
        self.phase = Phase.CONNECTING
        self.partner: str | None = None   # whom the request or chat is with
        self.leaving = False              # EXIT sent (or about to be)
        self.exit_code: int | None = None
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.servers = servers
        self._attempts = 0                 # reconnection attempts since the session was last online
        self.known_users: tuple[str, ...] = ()  # from the last WHO, for completion
        self.blocked: tuple[str, ...] = ()  # whom we blocked, as far as we have seen: for completion
        # The protocol version to ask for (1: never ask). Version 2 only when
        # reconnecting: the server then holds a dropped session for its resume
        # window, which only a client that comes back to resume it should ask
        # of it; the partner of one that will not is told at once that it left.
        self.version = version if version is not None else (ASK_VERSION if reconnect else 1)
        self.partner_away = False          # AWAY read for the partner, and no BACK yet
        self.ack_delay = ack_delay         # 0: acknowledge every read at once (tests)
        self.rng = rng                     # [0, 1): spreads the rest after an ACK (tests pass their own)
        self._password = password
        self._register = register
        self._was_online = False           # READY has been seen once: reconnecting makes sense
        self._offline = False              # lost, and not yet READY again
        self._lost_chat = ""               # the partner of the chat the drop ended
        self._answering = False            # ACCEPT/DECLINE sent for the request in
        self._deleted = False              # OK UNREGISTER (or its BYE): the account is gone, we leave
        self._out: list[Effect] = []
        self._new_session()
        self._new_connection()

    def _new_session(self) -> None:
        """Forget the server's session: what version 2 keeps across reconnects."""
        self._token = ""                   # the resume token: set, the session can be resumed
        self._seen_id = 0                  # the highest login-socket event id handled
        self._acked = 0                    # the id in the last ACK (or RESUME) sent
        self._seq = 0                      # MSG frames of this session, kept ones included
        self._mine: dict[int, str] = {}    # seq -> text of our messages with no fate yet, by seq
        self._received = 0                 # the server has every message up to this seq
        self._got = 0                      # chat messages (MSG events) received in this session
        self._resume_plain = False         # the server wants RESUME without the message count (before 0.4)
        self._unshown: set[int] = set()    # kept while offline, not yet echoed as sent
        self._standing: tuple[Phase, str | None] = (Phase.IDLE, None)  # the chat state while offline
        self._standing_away = False        # and whether the partner was away

    def _new_connection(self) -> None:
        """Forget everything about the current sockets (a reconnect starts afresh)."""
        self._conns = {role: Connection(CLIENT) for role in Role}
        self._counting = False             # login-socket frames are numbered (after WELCOME, RESUMED)
        self._wire_id = 0                  # the id of the last frame read on this login socket
        self._chat_base = 0                # the seq before the first MSG on this chat socket
        self._ack_scheduled = False        # an AckLater is out (its timer goes with the connection)
        self._ack_ripe = False             # its last ACK_GRACE: a chat message of ours may carry the ACK
        self._ack_resting = False          # the AckLater out ends the ACK_SPACING after an ACK
        self._piggy_first = 0              # seq of the oldest message that carried an ACK, not confirmed
        self._piggy_last = 0               # seq of the newest such message
        self._confirm_scheduled = False    # an AckLater(confirm=True) is out
        self._resuming = False             # RESUME sent, no answer yet
        self._attaching = False            # RESUMED: the chat and check sockets not both attached
        self._unresumed = False            # UNRESUMED: the session is over; fates, then BYE, follow
        self._sent: dict[int, str] = {}   # MSG seq -> text, the last SENT_KEPT
        self._asks: deque[tuple[str, bool]] = deque()  # CHAT sent, reply pending: (user, optimistic)
        self._quits: deque[str] = deque()  # QUIT sent, reply pending: the chat partner then, or ""
        self._whos: deque[bool] = deque()  # WHO sent, reply pending: True if the user asked
        self._new_passwords: deque[str] = deque()  # PASSWORD sent, reply pending: the new password
        self._unregisters = 0              # UNREGISTER sent, reply pending
        self._held_end: ev.Ended | None = None  # ENDED that may be the echo of our own QUIT
        self._finished: set[Role] = set()  # while leaving: sockets that said their last
        self._eof: set[Role] = set()       # sockets the server has closed
        # USER lines since the last OK WHO or OK BLOCKS: the next of the two takes them.
        self._entries: list[tuple[str, str]] = []
        self._entries_more = 0
        self._pings = 0
        self._exit_waits = False           # leaving: EXIT waits for the PONG that syncs our ACKs

    # -- inputs ------------------------------------------------------------------

    def start(self) -> list[Effect]:
        """The login socket is open: resume the session if the server keeps one
        for us, else log in (or register; a reconnect logs in)."""
        if self.phase is Phase.CLOSED:
            return []
        if self.servers is not None:
            self.servers.connected()
            if self.servers.several:
                self._show("connected", text=str(self.servers.server))
        if self._token:
            self._resuming = True
            self._acked = self._seen_id   # RESUME acknowledges what it names
            self._send(LOGIN, ev.Resume(self._token, self._seen_id, -1 if self._resume_plain else self._got))
        else:
            self._log_in()
        self.phase = Phase.LOGGING_IN
        return self._flush()

    def _log_in(self) -> None:
        """VERSION 2 and LOGIN (or REGISTER), pipelined: the server answers
        VERSION first, and a server that only speaks version 1 refuses it and
        answers the LOGIN all the same."""
        if self.version >= 2:
            self._send(LOGIN, ev.Version(self.version))
        event = ev.Register if self._register else ev.Login
        self._send(LOGIN, event(self.user, self._password))

    def reconnect_failed(self, text: str) -> list[Effect]:
        """The login socket could not be opened again: the next server, or wait
        longer and try again."""
        if self.phase is Phase.RECONNECTING:
            if self.servers is not None and self.servers.several:
                text = f"{self.servers.target}: {text}"
            self._next_attempt(text, failed=True)
        return self._flush()

    @property
    def attempt(self) -> int:
        """Reconnection attempts since the session was last online (0: none)."""
        return self._attempts

    def refresh_names(self) -> list[Effect]:
        """Ask the server who is online, for completion: the reply is a ``Roster``
        and is not shown. At most one such WHO is outstanding at a time."""
        if self.online and not self.leaving and not self.refreshing:
            self._whos.append(False)
            self._send(CHAT, ev.Who())
        return self._flush()

    @property
    def refreshing(self) -> bool:
        """A background WHO is on its way."""
        return False in self._whos

    def receive(self, role: Role, data: bytes) -> list[Effect]:
        """Bytes read from the socket of ``role``; ``b""`` means the server closed it."""
        conn = self._conns[role]
        if role in self._eof or self.phase is Phase.RECONNECTING:
            return []   # closed already, or from a connection given up
        conn.receive_data(data)
        # Stop when the session ends, or when this connection was given up (a
        # reconnect replaced it): what is left in it is of the past.
        while self.phase is not Phase.CLOSED and self._conns[role] is conn:
            event = conn.next_event()
            if event is ev.NEED_DATA:
                break
            if type(event) is ev.ConnectionClosed:
                self._eof.add(role)  # next_event() would repeat it forever
                self._on_event(role, event)
                break
            if role is LOGIN and self._counting and type(event) not in _UNNUMBERED:
                self._wire_id += 1
                if self._wire_id <= self._seen_id:
                    continue  # replayed after a RESUME, and handled before the drop
                self._seen_id = self._wire_id
            self._on_event(role, event)
        if role is LOGIN:
            self._ack_soon()
        return self._flush()

    def ack_now(self) -> list[Effect]:
        """The timer asked for with ``AckLater`` is up. Three stages: the
        first makes the ACK ripe (for ``ACK_GRACE`` seconds a chat message we
        send carries it, in the same write); the second sends what is still
        unacknowledged on the check socket, and rests; the third ends the
        rest (on average ``ACK_SPACING`` after the first stage began, so that
        a stream is acknowledged about once a second) and starts the delay
        again for whatever came meanwhile. The rest is drawn between half
        and one and a half times its nominal length: clients that started
        together (the sessions a restarted server resumes, say) do not stay
        in step and acknowledge in the same instant every second."""
        if self._ack_resting:
            self._ack_scheduled = self._ack_resting = False
            self._ack_soon()
            return self._flush()
        if not self._ack_ripe and self.ack_delay > ev.ACK_GRACE and self._wire_id > self._acked:
            self._ack_ripe = True
            self._out.append(AckLater(ev.ACK_GRACE))
            return self._flush()
        self._ack_ripe = False
        self._acknowledge()
        if self._counting and ev.ACK_SPACING > self.ack_delay > 0:
            self._ack_resting = True
            self._out.append(AckLater(ev.ack_rest(self.ack_delay, self.rng())))
        else:
            self._ack_scheduled = False
        return self._flush()

    def ack_confirm(self) -> list[Effect]:
        """``ACK_CONFIRM`` after an ACK rode with a chat message: if the
        oldest such message still has neither RECEIVED nor a fate, the server
        has not read it, nor the ACK ahead of it (its chat socket is paused,
        perhaps until that very ACK arrives): say it again on the check
        socket."""
        self._confirm_scheduled = False
        if self._piggy_first and self._received < self._piggy_first:
            self._piggy_first = self._piggy_last = 0
            if self._counting and self._acked and self._conns[CHECK].state is State.CHECK \
                    and self.phase is not Phase.CLOSED:
                self._send(CHECK, ev.Ack(self._acked))
        elif self._piggy_last > self._received:
            self._piggy_first = self._piggy_last
            self._confirm_later()
        else:
            self._piggy_first = self._piggy_last = 0
        return self._flush()

    def typed(self, line: str) -> list[Effect]:
        """One line the user entered (a paste of several is taken line by line)."""
        for one in line.split("\n"):
            self._typed_one(one.rstrip("\r"))
        return self._flush()

    def _typed_one(self, line: str) -> None:
        if self.phase is Phase.CLOSED or self.leaving:
            return
        if not self.online:
            words = line.split()
            message = line.startswith("//") or not line.lstrip().startswith("/")
            if words and words[0].lower() in LOCAL_COMMANDS:
                self._command(words)  # /help and /exit need no server
            elif message and self._keeping():
                if line.strip():
                    self._keep(line[1:] if line.startswith("//") else line)
            elif self._offline:
                self._show("error", text="not connected (reconnecting); not sent")
            else:
                self._show("error", text="not logged in yet")
        elif line.startswith("//"):
            self._say(line[1:])
        elif line.lstrip().startswith("/"):
            self._command(line.split())
        elif not line.strip():
            pass  # an empty line says nothing
        elif self.phase is Phase.REQUEST_IN and line.strip().lower() in YES:
            self._cmd_accept()
        elif self.phase is Phase.REQUEST_IN and line.strip().lower() in NO:
            self._cmd_decline()
        else:
            self._say(line)

    def change_password(self, old: str, new: str) -> list[Effect]:
        """Ask the server to change our password (``/password``: the UI asks
        for both at a terminal, so that neither goes through ``typed`` or its
        history). Once the server says OK, a later login uses the new one."""
        problem = check_password(new)
        if problem:
            self._show("error", text=f"password not changed: {problem}")
        elif not self.online:
            self._show("error", text="password not changed: not connected")
        else:
            self._new_passwords.append(new)
            self._send(CHAT, ev.Password(old, new))
        return self._flush()

    def delete_account(self, password: str) -> list[Effect]:
        """Ask the server to delete our account (``/unregister``: the UI asks
        for the password at a terminal, and for the user name to confirm).
        Once the server says OK, the session ends as after ``/exit``, for good."""
        problem = check_password(password)
        if problem:
            self._show("error", text=f"account not deleted: {problem}")
        elif not self.online or self.leaving:
            self._show("error", text="account not deleted: not connected")
        else:
            self._unregisters += 1
            self._send(CHAT, ev.Unregister(password))
        return self._flush()

    def exit(self) -> list[Effect]:
        """Log out (``/exit``, end of input): send EXIT; the reply or the close ends it."""
        self._leave()
        return self._flush()

    def interrupt(self) -> list[Effect]:
        """Ctrl-C: leave the chat, withdraw the request or decline the one received;
        otherwise (or when the first Ctrl-C is still being answered) log out."""
        if self.leaving or not self.online:
            return self.exit()
        if self.phase in (Phase.CHATTING, Phase.REQUEST_OUT) and not self._quits:
            self._cmd_quit()
        elif self.phase is Phase.REQUEST_IN and not self._answering:
            self._answering = True
            self._send(CHAT, ev.Decline())
        else:
            self._leave()
        return self._flush()

    def exit_timed_out(self) -> list[Effect]:
        """The server did not answer EXIT in time: we leave anyway."""
        if self.phase is not Phase.CLOSED:
            if self._exit_waits:  # not even the PONG before it came: say EXIT all the same
                self._exit_waits = False
                self._send(CHAT, ev.Exit())
            self._show("logged-out")
            self._close(EXIT_OK)
        return self._flush()

    def ping(self) -> list[Effect]:
        """Heartbeat: ``PING <n>`` on the check socket (once it is attached)."""
        if self._conns[CHECK].state is State.CHECK and self.phase is not Phase.CLOSED:
            self._pings += 1
            self._send(CHECK, ev.Ping(str(self._pings)))
        return self._flush()

    def not_responding(self) -> list[Effect]:
        """Nothing arrived on the check socket for interval + timeout."""
        return self.lost("server not responding")

    def lost(self, text: str) -> list[Effect]:
        """A socket failed (reset, could not connect): the session is over,
        or (reconnecting) this connection is."""
        if self.phase not in (Phase.CLOSED, Phase.RECONNECTING):
            self._end_with("lost", text)
        return self._flush()

    def unreachable(self, address: str, text: str) -> list[Effect]:
        """The first login socket ended before the server sent a single byte:
        whatever answered at ``address`` is no selchat server we can talk to
        (a TLS port spoken to in plaintext, say). Exit as for a server that
        cannot be reached."""
        if self.phase is not Phase.CLOSED:
            self._show("unreachable", text=address, detail=text)
            self._close(EXIT_UNREACHABLE)
        return self._flush()

    # -- state, for the UI ---------------------------------------------------------

    @property
    def online(self) -> bool:
        """READY has arrived (or a resumed session has its sockets back), the chat
        socket is attached and the session is not over: the user may type."""
        return self.phase in ONLINE and not self._attaching and self._conns[CHAT].state is State.CHAT

    @property
    def standing(self) -> tuple[Phase, str | None]:
        """Where the user stands in the chat: the phase and partner when online,
        what they were before the connection dropped while it is being resumed."""
        if self.phase in ONLINE:
            return self.phase, self.partner
        return self._standing

    # -- received events -----------------------------------------------------------

    def _on_event(self, role: Role, event: ev.Event) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is None:  # the state tables let nothing else through
            self._fatal(f"unexpected {type(event).__name__} on the {role.value.lower()} socket")
        else:
            handler(self, role, event)

    def _on_hello(self, role: Role, event: ev.Hello) -> None:
        if event.version < 1:  # HELLO names the newest version; every server speaks 1
            self._fatal(f"the server speaks protocol version {event.version}, "
                        f"this client version {ev.PROTOCOL_VERSION}")

    def _on_welcome(self, role: Role, event: ev.Welcome) -> None:
        self.user = event.user  # the spelling the account was registered with
        self._register = False  # the account exists now: a reconnect logs in
        self.phase = Phase.ATTACHING
        self._report_unfated("the session ended before it was sent")  # none are left; to be sure
        self._new_session()     # a WELCOME is always a new session on the server
        if event.resume_token:  # version 2: from now on the login socket's frames are numbered
            self._token = event.resume_token
            self._counting = True
        self._attach(event.chat_token, event.check_token)

    def _attach(self, chat_token: str, check_token: str) -> None:
        for attach_role, token in ((CHAT, chat_token), (CHECK, check_token)):
            self._out.append(Connect(attach_role))
            self._send(attach_role, ev.Attach(attach_role, token))

    def _on_resumed(self, role: Role, event: ev.Resumed) -> None:
        """The server still had our session. It has our messages up to
        ``accepted``: the rest are sent again once the new sockets are attached.
        Its events after ``last_id`` follow; the chat is where it was."""
        problem = self._accepted_problem(event.accepted)
        if problem:
            self._fatal(f"RESUMED: {problem}")
            return
        self._resuming = False
        self.user = event.user
        self._received = self._chat_base = event.accepted
        self._wire_id = self._acked = event.last_id
        self._seen_id = max(self._seen_id, event.last_id)
        self._counting = True
        self.phase, self.partner = self._standing
        self.partner_away = self._standing_away and self.phase is Phase.CHATTING  # no AWAY again from its node
        self._attaching = True
        self._show_resumed()
        self._attach(event.chat_token, event.check_token)

    def _show_resumed(self) -> None:
        """``reconnected: <where you stand>``, as soon as RESUMED says the
        session is there: before the events it replays, which say what
        happened meanwhile (the chat may have ended, a request come)."""
        again = sum(1 for seq in self._mine if seq > self._received)
        partner = self.partner
        where = {
            Phase.CHATTING: f"still chatting with {partner}",
            Phase.REQUEST_OUT: f"still waiting for {partner} to answer your chat request",
            Phase.REQUEST_IN: f"{partner} asks for a chat: answer yes or no",
        }.get(self.phase, "not in a chat")
        if again:
            where += f"; {again} kept message{'s' if again > 1 else ''} sent now"
        self._show("resumed", user=self.user, text=where, count=again)

    def _accepted_problem(self, accepted: int) -> str | None:
        """Why ``accepted`` (a RESUMED's) cannot be right for the messages we kept, or None."""
        if accepted > self._seq:
            return f"the server has {accepted} messages of this session; this client sent {self._seq}"
        if accepted < self._received:
            return f"the server had received {self._received} messages of this session, now says {accepted}"
        if sum(1 for seq in self._mine if seq > accepted) != self._seq - accepted:
            return f"messages after {accepted} have a fate already"
        return None

    def _on_unresumed(self, role: Role, event: ev.Unresumed) -> None:
        """The session ended while we were away. Messages after ``accepted``
        never reached the server; the fates of the others follow, then BYE."""
        self._resuming = False
        self._unresumed = True
        for seq, text in self._fated(event.accepted + 1, self._seq):
            self._show("not-delivered", text=text, detail=f"not sent: {event.text}")
        self._received = min(event.accepted, self._seq)  # the rest wait for the fates that follow

    def _on_attached(self, role: Role, event: ev.Attached) -> None:
        # READY on the login socket says when both are attached; after RESUMED
        # there is no READY, and both OK ATTACH say it.
        if role is CHECK:
            self._acknowledge()  # events read before the check socket was there
        if self._attaching and self._conns[CHAT].state is State.CHAT and self._conns[CHECK].state is State.CHECK:
            self._resumed()

    def _resumed(self) -> None:
        """Back online after a RESUME: send again, in order, every message the
        server does not have (typed while offline, or lost on the way)."""
        self._attaching = self._offline = False
        if self.servers is not None:
            self.servers.online()
        self._back_online()
        again = [(seq, text) for seq, text in self._mine.items() if seq > self._received]
        for seq, text in again:
            self._send(CHAT, ev.Message(text))
            if seq in self._unshown:  # typed while offline: echoed now that it is sent
                self._unshown.discard(seq)
                self._show("sent", user=self.user, text=text)

    def _on_ready(self, role: Role, event: ev.Ready) -> None:
        self.user = event.user
        self.phase = Phase.IDLE
        self._was_online = True
        if self.servers is not None:
            self.servers.online()
        if self._offline:
            lost, self._lost_chat, self._offline = self._lost_chat, "", False
            self._back_online()
            state = "not in a chat"
            if lost:
                state += f" (the chat with {lost} ended when the connection was lost; /chat {lost} asks again)"
            self._show("reconnected", user=event.user, text=state, detail=lost)
        else:
            self._show("ready", user=event.user)

    def _on_request(self, role: Role, event: ev.Request) -> None:
        if self._is_with(Phase.REQUEST_IN, event.user):
            return  # said again by a node the session moved to: known
        self._enter(Phase.REQUEST_IN, event.user)
        self._learn(event.user)
        self._show("request-in", user=event.user)

    def _on_started(self, role: Role, event: ev.Started) -> None:
        if self._is_with(Phase.CHATTING, event.user):
            return  # said again by a node the session moved to: known
        self._enter(Phase.CHATTING, event.user)
        self._learn(event.user)
        self._show("started", user=event.user)

    def _on_request_over(self, role: Role, event: ev.Declined | ev.Expired | ev.Cancelled) -> None:
        if not (self._is_with(Phase.REQUEST_OUT, event.user) or self._is_with(Phase.REQUEST_IN, event.user)):
            return  # said again by a node the session moved to, or withdrawn meanwhile: nothing to tell
        self._enter(Phase.IDLE)
        kind = {ev.Declined: "declined", ev.Expired: "expired", ev.Cancelled: "cancelled"}[type(event)]
        self._show(kind, user=event.user)

    def _on_ended(self, role: Role, event: ev.Ended) -> None:
        if not self._is_with(Phase.CHATTING, event.user):
            return  # already over: OK QUIT came first
        self._enter(Phase.IDLE)
        if event.reason == "quit" and event.user.lower() in self._quits:
            self._held_end = event  # probably our own QUIT; OK QUIT will tell
        else:
            self._show("ended", user=event.user, detail=event.reason, text=event.text)

    def _on_incoming(self, role: Role, event: ev.Incoming) -> None:
        self._got += 1  # a RESUME says how many: a server that moved the session replays the rest
        self._show("message", user=event.user, text=event.text)

    def _on_ok(self, role: Role, event: ev.Ok) -> None:
        verb, user = event.verb.upper(), event.info
        if verb == "CHAT":
            self._chat_answered(ok=True, user=user)
        elif verb == "DECLINE":
            if self._is_with(Phase.REQUEST_IN, user):
                self._enter(Phase.IDLE)
            self._show("you-declined", user=user)
        elif verb == "QUIT":
            self._quit_answered(ok=True, user=user)
        elif verb == "WHO":
            self._who_answered()
        elif verb == "BLOCKS":
            self._blocks_answered()
        elif verb == "BLOCK":
            self._block_answered(user)
        elif verb == "UNBLOCK":
            self.blocked = tuple(name for name in self.blocked if name.lower() != user.lower())
            self._show("unblocked", user=user)
        elif verb == "EXIT":
            self._socket_done(CHAT)
        elif verb == "HELP":
            self._show("help")
        elif verb == "PASSWORD" and self._new_passwords:
            self._password = self._new_passwords.popleft()
            self._show("password-changed")
        elif verb == "UNREGISTER" and role is CHAT and self._unregisters:
            self._unregisters -= 1
            self._account_deleted(user or self.user)
            self._socket_done(CHAT)   # the server closes it: nothing more comes on it
        # OK ACCEPT: STARTED on the login socket says it. OK VERSION 2: the
        # resume token in WELCOME says it too.

    def _on_error(self, role: Role, event: ev.Error) -> None:
        verb = event.verb.upper()
        if role is LOGIN and verb == "VERSION":
            return  # the server speaks version 1 only: carry on with it
        if role is LOGIN and verb == "RESUME" and self._resuming:
            self._resume_refused(event)
            return
        if role is CHECK and verb == "ACK":
            return  # ACK beyond what was sent: our mistake, and the server ignores it
        if role is CHAT and verb == "ACK":  # ahead of a MSG: a server older than 0.3 refuses it there
            if self._counting and self._acked and self._conns[CHECK].state is State.CHECK:
                self._send(CHECK, ev.Ack(self._acked))
            return
        if role is LOGIN and self.phase is Phase.LOGGING_IN:
            kind = "register-failed" if self._register else "login-failed"
            text = event.text
            if event.code == "throttled":  # "<seconds> <text>": the text says the seconds too
                text = text.partition(" ")[2] or text
            self._show(kind, text=text)
            if event.code == "auth-failed" and not self._register and not self._was_online:
                self._show("hint-register")  # the server does not say which was wrong: the name may be new
            if event.code in TRANSIENT_LOGIN_ERRORS and self.reconnect and self._was_online:
                self._drop(text)  # the password was right before: try again later
            else:
                self._close(EXIT_LOGIN)
            return
        if role is not LOGIN and self.phase is Phase.ATTACHING:
            self._end_with("protocol-error", f"could not attach the {role.value.lower()} socket: {event.text}",
                           again=False)
            return
        if verb == "CHAT" and role is CHAT:
            self._chat_answered(ok=False, user="")
        if verb == "QUIT" and role is CHAT and self._quit_answered(ok=False, user=""):
            return
        if verb in ("ACCEPT", "DECLINE"):
            self._answering = False
        if verb == "PASSWORD" and role is CHAT and self._new_passwords:
            self._new_passwords.popleft()
            self._show("error", text=f"password not changed: {event.text}")
            return
        if verb == "UNREGISTER" and role is CHAT and self._unregisters:
            self._unregisters -= 1
            if event.code == "unknown-command":
                self._show("error", text="this server cannot delete accounts (it is older than selchat 0.6.0)")
            else:
                self._show("error", text=f"account not deleted: {event.text}")
            return
        if verb == "WHO" and role is CHAT and self._whos:
            self._entries, self._entries_more = [], 0
            if not self._whos.popleft():
                return  # a background WHO: nobody asked to see its fate
        text = event.text
        if verb in ("BLOCK", "UNBLOCK", "BLOCKS") and role is CHAT:
            if verb == "BLOCKS":
                self._entries, self._entries_more = [], 0
            if event.code == "unknown-command":
                text = "this server has no block list (it is older than selchat 0.6.0)"
        if verb == "CHAT" and event.code == "in-chat" and self.partner:
            text = f"you are already chatting with {self.partner}; /quit first"  # the server names its verb, QUIT
        self._show("error", text=text)

    def _resume_refused(self, event: ev.Error) -> None:
        """ERR RESUME: "not now" waits and tries again; anything else (above all
        ``unknown-session``: the server restarted) means the session is gone,
        so give the kept messages their last fate and log in on this socket."""
        if event.code == "bad-syntax" and not self._resume_plain:
            # A server before 0.4 takes no message count: ask again without it.
            self._resume_plain = True
            self._send(LOGIN, ev.Resume(self._token, self._seen_id))
            return
        self._resuming = False
        if event.code in TRANSIENT_LOGIN_ERRORS:
            self._drop(event.text)
            return
        self._session_lost("not sent: the server no longer had the session")
        self._log_in()

    def _session_lost(self, why: str) -> None:
        """The server's session is gone for good: report the messages that have
        no fate, say what went with the session, and start a new one."""
        self._report_unfated(why)
        phase, partner = self.standing
        if phase is Phase.CHATTING and partner:
            self._lost_chat = partner
            self._show("chat-dropped", user=partner)
        elif phase in (Phase.REQUEST_IN, Phase.REQUEST_OUT) and partner:
            self._show("request-dropped", user=partner)
        self._new_session()

    def _report_unfated(self, why: str) -> None:
        """The last word on every message with no fate: one that went out on a
        connection is "unconfirmed" (the server may have had it and delivered
        it: its RECEIVED can still have been on the way), one typed while
        offline and never sent is not delivered."""
        for seq, text in self._mine.items():
            if seq <= self._received or seq not in self._unshown:
                self._show("unconfirmed", text=text, count=seq)
            else:
                self._show("not-delivered", text=text, detail=why)
        self._mine.clear()
        self._unshown.clear()

    def _fated(self, first: int, last: int) -> list[tuple[int, str]]:
        """Take our messages ``first``..``last`` that had no fate yet out of the
        kept ones (in seq order). Seqs already fated are skipped: a fate that
        comes twice (replayed after UNRESUMED, say) is shown once."""
        found = []
        for seq in self._mine:   # in seq order: stop at the first past the range
            if seq > last:
                break
            if seq >= first:
                found.append(seq)
        for seq in found:
            self._unshown.discard(seq)
        return [(seq, self._mine.pop(seq)) for seq in found]

    def _on_received(self, role: Role, event: ev.Received) -> None:
        if event.seq > self._received:
            self._received = min(event.seq, self._seq)

    def _on_delivered(self, role: Role, event: ev.Delivered) -> None:
        self._had_up_to(event.last)
        for seq, text in self._fated(event.first, event.last):
            self._show("delivered", text=text, count=seq)

    def _had_up_to(self, seq: int) -> None:
        """A fate for our message ``seq``: the server takes messages in
        order, so it had every one up to there (it says no RECEIVED for them)."""
        if seq > self._received:
            self._received = min(seq, self._seq)

    def _on_undelivered(self, role: Role, event: ev.Undelivered) -> None:
        self._had_up_to(event.last)
        for seq, text in self._fated(event.first, event.last):
            self._show("not-delivered", text=text, detail=event.text)
        if event.code == "not-in-chat" and self.phase is Phase.CHATTING:
            # Its ENDED never came (lost with a node that died): the server knows best.
            partner = self.partner or ""
            self._enter(Phase.IDLE)
            self._show("chat-gone", user=partner)

    def _on_away(self, role: Role, event: ev.Away) -> None:
        if (self.partner or "").lower() == event.user.lower():
            if self.partner_away:
                return  # said again by a node the session moved to: known
            self.partner_away = True
        self._show("away", user=event.user)

    def _on_back(self, role: Role, event: ev.Back) -> None:
        if (self.partner or "").lower() == event.user.lower():
            self.partner_away = False
        self._show("back", user=event.user)

    def _on_nack(self, role: Role, event: ev.Nack) -> None:
        if self._token:  # version 2 refuses with UNDELIVERED; a NACK counts from this chat socket
            seq = self._chat_base + event.seq
            for _, text in self._fated(seq, seq):
                self._show("not-delivered", text=text, detail=event.text)
            return
        text = self._sent.get(event.seq)
        if text is None:
            self._show("not-delivered-old", text=str(event.seq), detail=event.text, count=event.seq)
        else:
            self._show("not-delivered", text=text, detail=event.text)

    def _on_user_entry(self, role: Role, event: ev.UserEntry) -> None:
        if len(self._entries) < NAMES_KEPT:
            self._entries.append((event.user, event.status))
        else:
            self._entries_more += 1

    def _on_ping(self, role: Role, event: ev.Ping) -> None:
        self._send(role, event.response())

    def _on_pong(self, role: Role, event: ev.Pong) -> None:
        # Any frame on the check socket is a sign of life; the loop notes it.
        if self._exit_waits and event.data == EXIT_SYNC:
            self._exit_waits = False
            self._send(CHAT, ev.Exit())

    def _on_shutdown(self, role: Role, event: ev.Shutdown) -> None:
        self._show("shutdown", text=event.text)

    def _on_motd(self, role: Role, event: ev.Motd) -> None:
        self._show("motd", text=event.text)

    def _on_notice(self, role: Role, event: ev.Notice) -> None:
        self._show("notice", text=event.text)

    def _on_bye(self, role: Role, event: ev.Bye) -> None:
        if self._unresumed:
            # The fates have come: what still has none is unconfirmed. Then a
            # new session, logged in with the password.
            self._session_lost(f"not sent: {event.text}")
            self.backoff.reset()
            self._attempts = 0
            self._drop(event.text, fresh=True)   # the server works: as after a loss, not a failure
            return
        if self.phase is Phase.LOGGING_IN and event.reason == "auth-failed":
            self._show("register-failed" if self._register else "login-failed", text=event.text)
            self._close(EXIT_LOGIN)
        elif event.reason == "unregistered" and (self._unregisters or self._deleted):
            # Our UNREGISTER worked: its OK on the chat socket may still be on
            # the way (two sockets, read in no set order). Leave as after /exit.
            self._account_deleted(self.user)
            self._socket_done(role)
        elif self.leaving:
            if event.reason != "exit":
                self._show("disconnected", text=event.text, detail=event.reason)
            self._socket_done(role)
        else:
            self._end_with("disconnected", event.text, detail=event.reason,
                           again=event.reason not in FINAL_BYES)

    def _on_closed(self, role: Role, event: ev.ConnectionClosed) -> None:
        if self.leaving:
            self._socket_done(role)
        else:
            self._end_with("lost", f"the server closed the {role.value.lower()} socket")

    def _on_bad_frame(self, role: Role, event: ev.BadFrame) -> None:
        reply = event.reply
        self._fatal(f"bad frame on the {role.value.lower()} socket: {getattr(reply, 'text', reply)}")

    # -- typed commands --------------------------------------------------------------

    def _command(self, words: list[str]) -> None:
        name, args = words[0].lower(), words[1:]
        command = COMMANDS.get(name)
        if command is None:
            self._show("error", text=unknown_command(words[0]))
            return
        if not command.arity[0] <= len(args) <= command.arity[1]:
            self._show("error", text=f"usage: {command.usage}")
            return
        command.method(self, *args)

    def _cmd_chat(self, user: str) -> None:
        problem = check_username(user)
        if problem:
            self._show("error", text=problem)
            return
        optimistic = self.phase is Phase.IDLE
        if optimistic:
            self._enter(Phase.REQUEST_OUT, user)
        self._asks.append((user, optimistic))
        self._send(CHAT, ev.ChatRequest(user))

    def _cmd_accept(self) -> None:
        self._answering = True
        self._send(CHAT, ev.Accept())

    def _cmd_decline(self) -> None:
        self._answering = True
        self._send(CHAT, ev.Decline())

    def _cmd_quit(self) -> None:
        chatting = self.phase is Phase.CHATTING and self.partner
        self._quits.append(self.partner.lower() if chatting else "")
        self._send(CHAT, ev.Quit())

    def _cmd_exit(self) -> None:
        self._leave()

    def _cmd_who(self) -> None:
        self._whos.append(True)
        self._send(CHAT, ev.Who())

    def _cmd_block(self, user: str) -> None:
        self._send_about(ev.Block, user)

    def _cmd_unblock(self, user: str) -> None:
        self._send_about(ev.Unblock, user)

    def _cmd_blocks(self) -> None:
        self._send(CHAT, ev.Blocks())

    def _send_about(self, event: type, user: str) -> None:
        """A command about ``user`` (BLOCK, UNBLOCK): sent if the name is one."""
        problem = check_username(user)
        if problem:
            self._show("error", text=problem)
        else:
            self._send(CHAT, event(user))

    def _cmd_password(self) -> None:
        self._show("error", text="/password asks for your passwords at a terminal; "
                                 "it cannot read them from a line (or a script)")

    def _cmd_unregister(self) -> None:
        self._show("error", text="/unregister asks for your password at a terminal; "
                                 "it cannot read it from a line (or a script)")

    def _cmd_help(self, name: str = "") -> None:
        if not name:
            self._show("help")
            return
        command = COMMANDS.get("/" + name.lower().lstrip("/"))
        if command is None:
            self._show("error", text=unknown_command(name if name.startswith("/") else "/" + name))
        else:
            self._show("help-command", text=command.usage, detail=command.help)

    def _say(self, text: str) -> None:
        """A chat message: sent when chatting, else a local hint."""
        if self.phase is not Phase.CHATTING:
            kind = {Phase.REQUEST_IN: "hint-request-in", Phase.REQUEST_OUT: "hint-request-out"}
            self._show(kind.get(self.phase, "hint-idle"), user=self.partner or "")
            return
        if self._refused_locally(text):
            return
        for piece in _pieces(text):
            self._say_one(piece)

    def _say_one(self, text: str) -> None:
        piggyback = self._ack_ripe and self._wire_id > self._acked and self._conns[CHAT].state is State.CHAT
        if piggyback:  # in the same write as the message: one read for the server
            self._acked = self._wire_id
            self._send(CHAT, ev.Ack(self._wire_id))
        self._send(CHAT, ev.Message(text))
        if self._token:  # version 2: kept until it has a fate
            self._seq += 1
            self._mine[self._seq] = text
            if piggyback:
                self._piggy_last = self._seq
                if not self._piggy_first:
                    self._piggy_first = self._seq
                self._confirm_later()
        else:
            seq = self._conns[CHAT].msg_seq
            self._sent[seq] = text
            self._sent.pop(seq - SENT_KEPT, None)
        self._show("sent", user=self.user, text=text)

    def _refused_locally(self, text: str) -> bool:
        """A message the server would refuse is not sent: say why (True).
        (One too long for a frame is sent as several: ``_pieces``.)"""
        problem = _control_error(text, "the message")
        if problem:
            self._show("error", text=f"{problem}; not sent")
        return problem is not None

    def _keeping(self) -> bool:
        """Offline, in a chat that the server keeps for us: lines typed are kept."""
        return bool(self._token) and self._offline and self.standing[0] is Phase.CHATTING

    def _keep(self, text: str) -> None:
        """A message typed while offline: it gets its seq now and is sent (and
        echoed) once the session is resumed."""
        if self._refused_locally(text):
            return
        for piece in _pieces(text):
            self._seq += 1
            self._mine[self._seq] = piece
            self._unshown.add(self._seq)
            self._show("queued", text=piece, count=self._seq)

    # -- helpers -------------------------------------------------------------------

    def _leave(self) -> None:
        if self.phase is Phase.CLOSED or self.leaving:
            return
        if self.online:
            self.leaving = True
            if self._counting and self._conns[CHECK].state is State.CHECK:
                # Version 2: the server must see our last ACK before the EXIT,
                # or the partner is told that the messages we showed were not
                # delivered. They go on two sockets, read in no set order; the
                # PONG on the (ordered) check socket says the ACK was read.
                self._exit_waits = True
                self._acknowledge()  # what is shown is acknowledged before we go
                self._send(CHECK, ev.Ping(EXIT_SYNC))
            else:
                self._send(CHAT, ev.Exit())
        elif self._offline:
            self._show("gave-up")  # the connection was lost and is not back
            self._close(EXIT_LOST)
        else:
            self._close(EXIT_OK)  # nothing to log out of yet

    def _account_deleted(self, user: str) -> None:
        """OK UNREGISTER or BYE unregistered, whichever is read first: say it
        once, and leave as after /exit (the server ends the session)."""
        if not self._deleted:
            self._deleted = True
            self._show("account-deleted", user=user)
        self.leaving = True
        self._exit_waits = False

    def _socket_done(self, role: Role) -> None:
        """While leaving: ``role`` has said its last. Done when login and chat have.

        Each socket is ordered, so once the chat socket gave OK EXIT (or EOF)
        and the login socket BYE (or EOF), nothing sent before is left unread:
        a WHO answer or a last message typed before the EXIT is still shown.
        """
        self._finished.add(role)
        if {LOGIN, CHAT} <= self._finished:
            self._show("logged-out")
            self._close(EXIT_OK)

    def _chat_answered(self, ok: bool, user: str) -> None:
        """The reply to our oldest outstanding CHAT: confirm or undo its optimism."""
        asked, optimistic = self._asks.popleft() if self._asks else (user, False)
        user = user or asked
        if ok:
            if self._is_with(Phase.REQUEST_OUT, user):
                self.partner = user  # the server's spelling of the name
                self._show("request-sent", user=user)
            elif not optimistic and self.phase is Phase.IDLE:
                self._enter(Phase.REQUEST_OUT, user)  # our view was stale; the server knows
                self._show("request-sent", user=user)
            # else: STARTED/DECLINED/EXPIRED was read first and already shown
        elif optimistic and self._is_with(Phase.REQUEST_OUT, asked):
            self._enter(Phase.IDLE)

    def _quit_answered(self, ok: bool, user: str) -> bool:
        """The reply to our oldest outstanding QUIT. True if it showed something."""
        left = self._quits.popleft() if self._quits else ""
        held, self._held_end = self._held_end, None
        if not ok:
            if held is not None:  # the partner quit first: that was the news
                self._show("ended", user=held.user, detail=held.reason, text=held.text)
                return True
            return False
        if self._is_with(Phase.CHATTING, user) or (held is not None and left == user.lower()):
            self._show("you-left", user=user)
        elif self._is_with(Phase.REQUEST_OUT, user):
            self._show("you-withdrew", user=user)
        else:
            return False  # the chat or request was already over, and shown
        if self.partner and self.partner.lower() == user.lower():
            self._enter(Phase.IDLE)
        return True

    def _who_answered(self) -> None:
        """OK WHO: the user's own is shown; every one refreshes the roster."""
        mine = self._whos.popleft() if self._whos else True
        entries, more = self._entries, self._entries_more
        self._entries, self._entries_more = [], 0
        self.known_users = tuple(name for name, _ in entries)
        self._out.append(Roster(self.known_users))
        if mine:
            listed = ", ".join(f"{name} ({status})" for name, status in entries[:WHO_LISTED]) or "nobody"
            unlisted = more + max(0, len(entries) - WHO_LISTED)
            if unlisted:
                listed += f" and {unlisted} more"
            # --json lists up to NAMES_KEPT users; "more" counts the rest
            self._show("who", text=listed, users=tuple(entries), count=more)

    def _blocks_answered(self) -> None:
        """OK BLOCKS: the USER lines before it are the block list (the server sorts it)."""
        entries, more = self._entries, self._entries_more
        self._entries, self._entries_more = [], 0
        self.blocked = tuple(name for name, _ in entries)
        listed = ", ".join(self.blocked) or "nobody"
        if more:
            listed += f" and {more} more"
        self._show("blocks", text=listed, users=tuple(entries))

    def _block_answered(self, user: str) -> None:
        """OK BLOCK: a chat with ``user`` ends with its own ENDED (as after
        QUIT); a request between us goes with no event for us, so say it here."""
        if self._is_with(Phase.REQUEST_OUT, user):
            self._enter(Phase.IDLE)
            self._show("you-withdrew", user=user)
        elif self._is_with(Phase.REQUEST_IN, user):
            self._enter(Phase.IDLE)
            self._show("you-declined", user=user)
        if user and user.lower() not in (name.lower() for name in self.blocked):
            self.blocked = tuple(sorted((*self.blocked, user), key=str.lower))
        self._show("blocked", user=user)

    def _learn(self, user: str) -> None:
        """A name seen in an event is online now: offer it for completion."""
        if user.lower() not in (name.lower() for name in self.known_users):
            self.known_users = (*self.known_users, user)[-NAMES_KEPT:]

    def _is_with(self, phase: Phase, user: str) -> bool:
        return self.phase is phase and (self.partner or "").lower() == user.lower()

    def _enter(self, phase: Phase, partner: str | None = None) -> None:
        self.phase, self.partner = phase, partner
        self._answering = False
        self.partner_away = False

    def _ack_soon(self) -> None:
        """Events were read: acknowledge them at once if many wait, else
        within ACK_DELAY (with whatever else arrives meanwhile)."""
        waiting = self._wire_id - self._acked
        if waiting <= 0 or not self._counting:
            return
        if waiting >= ev.ACK_EVERY or self.ack_delay <= 0:
            self._acknowledge()
        elif not self._ack_scheduled:
            self._ack_scheduled = True
            grace = ev.ACK_GRACE if self.ack_delay > ev.ACK_GRACE else 0.0
            self._out.append(AckLater(self.ack_delay - grace))

    def _confirm_later(self) -> None:
        if not self._confirm_scheduled:
            self._confirm_scheduled = True
            self._out.append(AckLater(ACK_CONFIRM, confirm=True))

    def _acknowledge(self) -> None:
        """ACK the last event read, on the check socket once it is attached."""
        if self._counting and self._wire_id > self._acked and self._conns[CHECK].state is State.CHECK \
                and self.phase is not Phase.CLOSED:
            self._acked = self._wire_id
            self._send(CHECK, ev.Ack(self._wire_id))

    def _send(self, role: Role, event: ev.Event) -> None:
        self._out.append(Send(role, self._conns[role].send(event)))

    def _show(self, kind: str, **fields) -> None:
        self._out.append(Notice(kind, **fields))

    def _fatal(self, text: str) -> None:
        self._end_with("protocol-error", text, again=False)

    def _end_with(self, kind: str, text: str, detail: str = "", again: bool = True) -> None:
        """Show why the connection ended; then reconnect (if on, ``again`` and we
        were online once), or exit 3, or 0 when we were leaving anyway."""
        self._show(kind, text=text, detail=detail)
        if self._unregisters and not self._deleted:
            self._show("error", text="the connection was lost before the server answered /unregister: "
                                     "your account may or may not be deleted")
        if self.leaving:
            self._close(EXIT_OK)
        elif again and self.reconnect and self._was_online:
            self._drop(text)
        else:
            self._close(EXIT_LOST)

    def _drop(self, why: str, fresh: bool = False) -> None:
        """The connection is gone: say what went with it, then try again later.
        A version 2 session is kept by the server: nothing went with it.

        Gone before the session was back online, it is one more failed attempt
        (the next server, or the backoff); else (or ``fresh``) a new start."""
        failed = self._offline and not fresh
        if self._token:
            self._keep_standing()
        elif self.phase is Phase.CHATTING and self.partner:
            self._lost_chat = self.partner
            self._show("chat-dropped", user=self.partner)
        elif self.phase in (Phase.REQUEST_IN, Phase.REQUEST_OUT) and self.partner:
            self._show("request-dropped", user=self.partner)
        self._enter(Phase.RECONNECTING)
        self._offline = True
        if self._new_passwords:
            self._show("error", text="the connection was lost before the server answered /password: "
                                     "your password may or may not be changed")
        self._new_connection()
        self._next_attempt(why, failed)

    def _keep_standing(self) -> None:
        """Remember the chat state for the resume (and say the chat is kept).

        A chat request sent but not yet answered by ``OK CHAT`` may never have
        reached the server: it is not kept (if it did arrive, the answer to it
        comes on the login socket all the same)."""
        phase, partner = self.standing
        asked = next((user for user, optimistic in self._asks if optimistic), None)
        if phase is Phase.REQUEST_OUT and asked is not None and asked.lower() == (partner or "").lower():
            self._show("error", text=f"the connection was lost before the server answered your chat request "
                                     f"to {partner}; /chat {partner} asks again")
            phase, partner = Phase.IDLE, None
        elif phase is Phase.CHATTING and self.phase in ONLINE:
            self._show("chat-kept", user=partner)
        if self.phase in ONLINE:
            self._standing_away = self.partner_away
        self._standing = (phase, partner)

    def _next_attempt(self, why: str, failed: bool) -> None:
        """Ask for the next attempt: where (``servers``) and after what delay.
        ``failed``: the last attempt failed (else the connection was lost)."""
        servers = self.servers
        if servers is None:
            wait = True
        elif failed:
            wait = servers.failed()
        else:
            wait = not servers.lost()
        delay = self.backoff.next(RESUME_CAP if self._token else None) if wait else 0.0
        self._attempts += 1
        self._show("reconnecting", text=why, detail=f"{delay:.1f}", count=self._attempts)
        self._out.append(Reconnect(delay, servers.target if servers is not None else None))

    def _back_online(self) -> None:
        self.backoff.reset()
        self._attempts = 0

    def _close(self, code: int) -> None:
        self._report_unfated("not sent: the session ended")
        self.phase, self.partner, self.exit_code = Phase.CLOSED, None, code
        self._out.append(Close(code))

    def _flush(self) -> list[Effect]:
        out, self._out = self._out, []
        return out


_HANDLERS = {
    ev.Hello: ClientSession._on_hello,
    ev.Welcome: ClientSession._on_welcome,
    ev.Attached: ClientSession._on_attached,
    ev.Ready: ClientSession._on_ready,
    ev.Request: ClientSession._on_request,
    ev.Started: ClientSession._on_started,
    ev.Declined: ClientSession._on_request_over,
    ev.Expired: ClientSession._on_request_over,
    ev.Cancelled: ClientSession._on_request_over,
    ev.Ended: ClientSession._on_ended,
    ev.Incoming: ClientSession._on_incoming,
    ev.Ok: ClientSession._on_ok,
    ev.Error: ClientSession._on_error,
    ev.Nack: ClientSession._on_nack,
    ev.UserEntry: ClientSession._on_user_entry,
    ev.Ping: ClientSession._on_ping,
    ev.Pong: ClientSession._on_pong,
    ev.Shutdown: ClientSession._on_shutdown,
    ev.Motd: ClientSession._on_motd,
    ev.Notice: ClientSession._on_notice,
    ev.Bye: ClientSession._on_bye,
    ev.ConnectionClosed: ClientSession._on_closed,
    ev.BadFrame: ClientSession._on_bad_frame,
    # version 2
    ev.Resumed: ClientSession._on_resumed,
    ev.Unresumed: ClientSession._on_unresumed,
    ev.Received: ClientSession._on_received,
    ev.Delivered: ClientSession._on_delivered,
    ev.Undelivered: ClientSession._on_undelivered,
    ev.Away: ClientSession._on_away,
    ev.Back: ClientSession._on_back,
}
#: Login-socket frames that have no event id: BYE (nothing follows it), and a
#: bad frame (which ends the session anyway).
_UNNUMBERED = (ev.Bye, ev.BadFrame)



@dataclass(frozen=True)
class Command:
    """A typed command: what runs it, how it is written, what /help says."""

    method: Callable
    usage: str
    help: str
    arity: tuple[int, int] = (0, 0)   # fewest and most arguments
    names: bool = False               # its argument is a user name (Tab completes it)


#: Typed commands, in the order /help and completion list them.
COMMANDS: dict[str, Command] = {
    "/chat": Command(ClientSession._cmd_chat, "/chat NAME", "ask NAME for a chat (Tab completes names)",
                     (1, 1), names=True),
    "/accept": Command(ClientSession._cmd_accept, "/accept", "accept the chat request you were sent (or: yes)"),
    "/decline": Command(ClientSession._cmd_decline, "/decline", "decline the chat request you were sent (or: no)"),
    "/quit": Command(ClientSession._cmd_quit, "/quit",
                     "leave the chat, or withdraw your chat request (also Ctrl-C)"),
    "/who": Command(ClientSession._cmd_who, "/who", "list who is online, and who is busy"),
    "/block": Command(ClientSession._cmd_block, "/block NAME",
                      "decline NAME's chat requests from now on, unseen (NAME is told \"declined\" after a"
                      " while), and end your chat or request with NAME", (1, 1), names=True),
    "/unblock": Command(ClientSession._cmd_unblock, "/unblock NAME", "take NAME off your block list",
                        (1, 1), names=True),
    "/blocks": Command(ClientSession._cmd_blocks, "/blocks", "list the users you have blocked"),
    "/password": Command(ClientSession._cmd_password, "/password",
                         "change your password (asks for the one you have, then the new one twice)"),
    "/unregister": Command(ClientSession._cmd_unregister, "/unregister",
                           "delete your account for good (asks for your password)"),
    "/help": Command(ClientSession._cmd_help, "/help [COMMAND]", "list the commands, or explain one", (0, 1)),
    "/exit": Command(ClientSession._cmd_exit, "/exit", "log out and leave (also Ctrl-D)"),
}
#: Commands that work without a connection.
LOCAL_COMMANDS = frozenset({"/help", "/exit"})


def unknown_command(word: str) -> str:
    """The error for a command that does not exist, naming the closest one."""
    name = word.lower()
    starting = [c for c in COMMANDS if c.startswith(name)] if len(name) > 1 else []
    close = starting if len(starting) == 1 else difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
    if close:
        return f"unknown command {word}; did you mean {close[0]}?"
    return f"unknown command {word}; /help lists the commands"


class Heartbeat:
    """When to PING and when to give up, from times the loop passes in.

    The client sends a PING every ``interval`` seconds, and gives up when
    nothing has arrived for ``interval + timeout`` seconds: the server answers
    a PING at once, so a live server is never silent that long. ``seen`` is
    called for every read and costs one assignment; the loop asks ``due`` only
    when its single timer reaches ``deadline()``.
    """

    PING, DEAD = "ping", "dead"

    def __init__(self, interval: float, timeout: float, now: float):
        self.interval, self.timeout = interval, timeout
        self.last_seen = now
        self.next_ping = now + interval

    def seen(self, now: float) -> None:
        self.last_seen = now

    def deadline(self) -> float:
        return min(self.next_ping, self.last_seen + self.interval + self.timeout)

    def due(self, now: float) -> str | None:
        """``DEAD``, ``PING`` (and the next one is scheduled), or None."""
        if now >= self.last_seen + self.interval + self.timeout:
            return self.DEAD
        if now >= self.next_ping:
            self.next_ping = now + self.interval
            return self.PING
        return None
