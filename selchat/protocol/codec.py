"""Frames <-> events.

A frame is one line of UTF-8 text ending in LF (a CR right before the LF is
dropped, so ``nc -C`` and telnet work). The first word is the verb, matched
case-insensitively; the rest are arguments separated by single spaces. The last
argument of some frames (a password, a message) is "the rest of the line" and
may contain spaces.

``decode_client`` / ``decode_server`` parse a line received from the client /
the server; ``encode`` turns any event into the bytes of its frame.
"""

from __future__ import annotations

import re

from selchat.protocol import events as ev
from selchat.protocol.errors import FrameError

#: Longest frame a client may send, in bytes, not counting the line ending.
MAX_FRAME = 4096
#: Longest frame the server may send: a client's ``MSG <text>`` is relayed as
#: ``MSG <sender> <text>``, longer by the sender's name (<= 32) and a space.
MAX_SERVER_FRAME = MAX_FRAME + 33

# Control characters other than TAB are refused anywhere in a frame: they
# would let one user garble another's terminal. C1 controls (U+0080-U+009F)
# too: some terminals read U+009B as ESC [.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def decode_text(line: bytes, verb: str = "-") -> str:
    """Bytes of a frame -> str, or FrameError(bad-encoding)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("bad-encoding", "frame is not valid UTF-8", verb) from None
    if _CONTROL.search(text):
        raise FrameError("bad-encoding", "frame contains control characters", verb)
    return text


_VERB = re.compile(rb"[A-Za-z]{1,16}")


def split_verb(line: bytes) -> tuple[str, bytes]:
    """``b"MSG hi there"`` -> ``("MSG", b"hi there")``. The verb is upper-cased.

    A verb is 1-16 letters; anything else is refused without echoing it, so an
    error reply can never carry the peer's garbage (or be longer than a frame).
    """
    verb, _, rest = line.partition(b" ")
    if _VERB.fullmatch(verb) is None:
        decode_text(line)  # bad bytes are reported as such
        if not verb:
            raise FrameError("bad-syntax", "empty frame")
        raise FrameError("unknown-command", "unknown command; send HELP for the list")
    return verb.decode("ascii").upper(), rest


def _args(verb: str, rest: str, count: int, usage: str) -> list[str]:
    """Split ``rest`` into exactly ``count`` arguments; the last takes the remainder."""
    if count == 0:
        if rest:
            raise FrameError("bad-syntax", f"usage: {usage}", verb)
        return []
    parts = rest.split(" ", count - 1)
    if len(parts) != count or not all(parts):
        raise FrameError("bad-syntax", f"usage: {usage}", verb)
    return parts


# --- client -> server --------------------------------------------------------

_CLIENT_NULLARY = {
    "ACCEPT": ev.Accept(),
    "DECLINE": ev.Decline(),
    "QUIT": ev.Quit(),
    "EXIT": ev.Exit(),
    "WHO": ev.Who(),
    "HELP": ev.Help(),
    "BLOCKS": ev.Blocks(),
}


def decode_client(line: bytes) -> ev.Event:
    """Parse one frame sent by a client (without its line ending)."""
    verb, raw = split_verb(line)
    rest = decode_text(raw, verb or "-")
    if verb == "MSG":
        if not rest:
            raise FrameError("empty", "empty message", verb)
        return ev.Message(rest)
    if verb in _CLIENT_NULLARY:
        _args(verb, rest, 0, verb)
        return _CLIENT_NULLARY[verb]
    if verb == "PING":
        return ev.Ping(rest)
    if verb == "PONG":
        return ev.Pong(rest)
    if verb == "CHAT":
        (user,) = _args(verb, rest, 1, "CHAT <user>")
        if " " in user:
            raise FrameError("bad-syntax", "usage: CHAT <user>", verb)
        return ev.ChatRequest(user)
    if verb in ("BLOCK", "UNBLOCK"):
        (user,) = _args(verb, rest, 1, f"{verb} <user>")
        if " " in user:
            raise FrameError("bad-syntax", f"usage: {verb} <user>", verb)
        return (ev.Block if verb == "BLOCK" else ev.Unblock)(user)
    if verb in ("LOGIN", "REGISTER"):
        user, password = _args(verb, rest, 2, f"{verb} <user> <password>")
        return (ev.Login if verb == "LOGIN" else ev.Register)(user, password)
    if verb == "PASSWORD":
        return ev.Password(*split_escaped(verb, rest, "PASSWORD <old> <new>"))
    if verb == "UNREGISTER":
        (password,) = _args(verb, rest, 1, "UNREGISTER <password>")
        return ev.Unregister(password)
    if verb == "ACK":
        (ident,) = _args(verb, rest, 1, "ACK <id>")
        return ev.Ack(_number(verb, ident, "ACK <id>"))
    if verb == "VERSION":
        (version,) = _args(verb, rest, 1, "VERSION <n>")
        return ev.Version(_number(verb, version, "VERSION <n>"))
    if verb == "RESUME":
        usage = "RESUME <token> <last-id> [<messages>]"
        token, numbers = _args(verb, rest, 2, usage)
        last_id, _, messages = numbers.partition(" ")
        if " " in messages:
            raise FrameError("bad-syntax", f"usage: {usage}", verb)
        return ev.Resume(token, _number(verb, last_id, usage), _number(verb, messages, usage) if messages else -1)
    if verb == "ATTACH":
        # A missing token is a wrong token (same reply, socket closed), not a syntax error.
        role, _, token = rest.partition(" ")
        role = role.upper()
        if role not in ("CHAT", "CHECK") or " " in token:
            raise FrameError("bad-syntax", "usage: ATTACH CHAT|CHECK <token>", verb)
        return ev.Attach(ev.Role(role), token)
    raise FrameError("unknown-command", f"unknown command {verb}; send HELP for the list", verb)


def escape_word(text: str) -> str:
    """``text`` as one argument that may contain spaces: a backslash before
    each space and each backslash (``PASSWORD``'s ``<old>``)."""
    return text.replace("\\", "\\\\").replace(" ", "\\ ")


def split_escaped(verb: str, rest: str, usage: str) -> tuple[str, str]:
    """``<first> <rest of the line>``, the first written with ``escape_word``."""
    first: list[str] = []
    i, size = 0, len(rest)
    while i < size and rest[i] != " ":
        char = rest[i]
        if char == "\\":
            if i + 1 == size or rest[i + 1] not in "\\ ":
                raise FrameError("bad-syntax", f"usage: {usage} (in <old>, write a space as '\\ ' "
                                               "and a backslash as '\\\\')", verb)
            char = rest[i + 1]
            i += 1
        first.append(char)
        i += 1
    second = rest[i + 1:]
    if not first or not second:
        raise FrameError("bad-syntax", f"usage: {usage}", verb)
    return "".join(first), second


#: Numbers on the wire (ids, seqs, versions): decimal ASCII, at most 20 digits
#: (so any of them fits in 64 bits whatever the other side is written in).
_MAX_DIGITS = 20


def _number(verb: str, text: str, usage: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS):
        raise FrameError("bad-syntax", f"usage: {usage}", verb)
    return int(text)


# --- server -> client --------------------------------------------------------

_SERVER_ONE_USER = {
    "REQUEST": ev.Request,
    "STARTED": ev.Started,
    "DECLINED": ev.Declined,
    "EXPIRED": ev.Expired,
    "CANCELLED": ev.Cancelled,
    "READY": ev.Ready,
    "AWAY": ev.Away,
    "BACK": ev.Back,
}


def decode_server(line: bytes) -> ev.Event:
    """Parse one frame sent by the server (without its line ending)."""
    verb, raw = split_verb(line)
    rest = decode_text(raw, verb or "-")
    if verb == "MSG":
        user, text = _args(verb, rest, 2, "MSG <user> <text>")
        return ev.Incoming(user, text)
    if verb in _SERVER_ONE_USER:
        (user,) = _args(verb, rest, 1, f"{verb} <user>")
        return _SERVER_ONE_USER[verb](user)
    if verb == "OK":
        what, _, info = rest.partition(" ")
        if not what:
            raise FrameError("bad-syntax", "usage: OK <verb> [info]", verb)
        if what == "ATTACH" and info in ("CHAT", "CHECK"):
            return ev.Attached(ev.Role(info))
        return ev.Ok(what, info)
    if verb == "ERR":
        what, code, text = _args(verb, rest, 3, "ERR <verb> <code> <text>")
        return ev.Error(what, code, text)
    if verb == "NACK":
        seq, code, text = _args(verb, rest, 3, "NACK <seq> <code> <text>")
        return ev.Nack(_number(verb, seq, "NACK <seq> <code> <text>"), code, text)
    if verb == "RECEIVED":
        (seq,) = _args(verb, rest, 1, "RECEIVED <seq>")
        return ev.Received(_number(verb, seq, "RECEIVED <seq>"))
    if verb == "DELIVERED":
        usage = "DELIVERED <first> <last>"
        first, last = _args(verb, rest, 2, usage)
        return ev.Delivered(_number(verb, first, usage), _number(verb, last, usage))
    if verb == "UNDELIVERED":
        usage = "UNDELIVERED <first> <last> <code> <text>"
        first, last, code, text = _args(verb, rest, 4, usage)
        return ev.Undelivered(_number(verb, first, usage), _number(verb, last, usage), code, text)
    if verb == "RESUMED":
        usage = "RESUMED <user> <accepted> <last-id> <chat-token> <check-token>"
        user, accepted, last_id, chat, check = _args(verb, rest, 5, usage)
        if " " in check:
            raise FrameError("bad-syntax", f"usage: {usage}", verb)
        return ev.Resumed(user, _number(verb, accepted, usage), _number(verb, last_id, usage), chat, check)
    if verb == "UNRESUMED":
        usage = "UNRESUMED <accepted> <reason> <text>"
        accepted, reason, text = _args(verb, rest, 3, usage)
        return ev.Unresumed(_number(verb, accepted, usage), reason, text)
    if verb == "USER":
        user, status = _args(verb, rest, 2, "USER <user> <status>")
        return ev.UserEntry(user, status)
    if verb == "ENDED":
        user, reason, text = _args(verb, rest, 3, "ENDED <user> <reason> <text>")
        return ev.Ended(user, reason, text)
    if verb == "WELCOME":
        # Version 2 adds the resume token.
        parts = rest.split(" ")
        if len(parts) not in (3, 4) or not all(parts):
            raise FrameError("bad-syntax", "usage: WELCOME <user> <chat-token> <check-token> [<resume-token>]", verb)
        return ev.Welcome(*parts)
    if verb == "HELLO":
        version, software = _args(verb, rest, 2, "HELLO <version> <software>")
        if not (version.isascii() and version.isdigit()):
            raise FrameError("bad-syntax", "usage: HELLO <version> <software>", verb)
        return ev.Hello(int(version), software)
    if verb == "BYE":
        reason, text = _args(verb, rest, 2, "BYE <reason> <text>")
        return ev.Bye(reason, text)
    if verb == "SHUTDOWN":
        return ev.Shutdown(rest)
    if verb == "NOTICE":
        return ev.Notice(rest)
    if verb == "MOTD":
        return ev.Motd(rest)
    if verb == "PING":
        return ev.Ping(rest)
    if verb == "PONG":
        return ev.Pong(rest)
    raise FrameError("unknown-command", f"unknown server frame {verb}", verb)


# --- events -> bytes ---------------------------------------------------------


def _frame(*parts: object) -> bytes:
    return (" ".join(str(p) for p in parts if p != "") + "\n").encode("utf-8")


_ENCODERS = {
    # client frames
    ev.Login: lambda e: _frame("LOGIN", e.user, e.password),
    ev.Register: lambda e: _frame("REGISTER", e.user, e.password),
    ev.Attach: lambda e: _frame("ATTACH", e.role.value, e.token),
    ev.ChatRequest: lambda e: _frame("CHAT", e.user),
    ev.Accept: lambda e: b"ACCEPT\n",
    ev.Decline: lambda e: b"DECLINE\n",
    ev.Quit: lambda e: b"QUIT\n",
    ev.Exit: lambda e: b"EXIT\n",
    ev.Who: lambda e: b"WHO\n",
    ev.Help: lambda e: b"HELP\n",
    ev.Block: lambda e: _frame("BLOCK", e.user),
    ev.Unblock: lambda e: _frame("UNBLOCK", e.user),
    ev.Blocks: lambda e: b"BLOCKS\n",
    ev.Password: lambda e: _frame("PASSWORD", escape_word(e.old), e.new),
    ev.Unregister: lambda e: _frame("UNREGISTER", e.password),
    ev.Message: lambda e: f"MSG {e.text}\n".encode("utf-8"),
    ev.Version: lambda e: _frame("VERSION", e.version),
    ev.Resume: lambda e: (_frame("RESUME", e.token, e.last_id, e.messages) if e.messages >= 0
                          else _frame("RESUME", e.token, e.last_id)),
    ev.Ack: lambda e: b"ACK %d\n" % e.id,
    # either side
    ev.Ping: lambda e: _frame("PING", e.data),
    ev.Pong: lambda e: _frame("PONG", e.data),
    # server frames
    ev.Hello: lambda e: _frame("HELLO", e.version, e.software),
    ev.Welcome: lambda e: _frame("WELCOME", e.user, e.chat_token, e.check_token, e.resume_token),
    ev.Resumed: lambda e: _frame("RESUMED", e.user, e.accepted, e.last_id, e.chat_token, e.check_token),
    ev.Unresumed: lambda e: _frame("UNRESUMED", e.accepted, e.reason, e.text),
    ev.Received: lambda e: b"RECEIVED %d\n" % e.seq,
    ev.Delivered: lambda e: b"DELIVERED %d %d\n" % (e.first, e.last),
    ev.Undelivered: lambda e: _frame("UNDELIVERED", e.first, e.last, e.code, e.text),
    ev.Away: lambda e: _frame("AWAY", e.user),
    ev.Back: lambda e: _frame("BACK", e.user),
    ev.Attached: lambda e: _frame("OK", "ATTACH", e.role.value),
    ev.Ready: lambda e: _frame("READY", e.user),
    ev.Ok: lambda e: _frame("OK", e.verb, e.info),
    ev.Error: lambda e: _frame("ERR", e.verb, e.code, e.text),
    ev.UserEntry: lambda e: _frame("USER", e.user, e.status),
    ev.Request: lambda e: _frame("REQUEST", e.user),
    ev.Started: lambda e: _frame("STARTED", e.user),
    ev.Declined: lambda e: _frame("DECLINED", e.user),
    ev.Expired: lambda e: _frame("EXPIRED", e.user),
    ev.Cancelled: lambda e: _frame("CANCELLED", e.user),
    ev.Ended: lambda e: _frame("ENDED", e.user, e.reason, e.text),
    ev.Incoming: lambda e: f"MSG {e.user} {e.text}\n".encode("utf-8"),
    ev.Nack: lambda e: _frame("NACK", e.seq, e.code, e.text),
    ev.Shutdown: lambda e: _frame("SHUTDOWN", e.text),
    # The operator's text, not a client's: made safe here, whoever sends it,
    # so that a stray newline or escape cannot forge a frame or cost every
    # client its connection.
    ev.Notice: lambda e: _frame("NOTICE", fit_text("NOTICE", e.text)),
    ev.Motd: lambda e: _frame("MOTD", fit_text("MOTD", e.text)),
    ev.Bye: lambda e: _frame("BYE", e.reason, e.text),
}


def fit_text(verb: str, text: str) -> str:
    """``text`` made sendable as the rest-of-line argument of the server frame
    ``verb``, for text that no client typed (a MOTD line read from a file, an
    operator's broadcast): control characters other than TAB become U+FFFD,
    and the text is cut at a character boundary so that the frame fits in
    MAX_SERVER_FRAME bytes. A client refuses a frame that breaks either rule
    as a protocol error and gives up the connection."""
    data = _CONTROL.sub("\ufffd", text).encode("utf-8", "replace")  # "replace": lone surrogates
    room = MAX_SERVER_FRAME - len(verb) - 1  # the verb and its space
    return data[:room].decode("utf-8", "ignore")  # "ignore": a character cut in two


def split_utf8(data: bytes, size: int, after: bytes = b"", within: int = 0) -> list[bytes]:
    """``data`` (valid UTF-8) in pieces of at most ``size`` bytes, each cut
    at a character boundary (so each is valid UTF-8 too); [b""] for b"".
    With ``after`` (one byte, say a space), a piece ends just after the
    last such byte among its last ``within`` bytes, if there is one."""
    if size < 4:
        raise ValueError("pieces must have room for one character (4 bytes)")
    pieces = []
    start = 0
    n = len(data)
    while True:
        end = start + size
        if end >= n:
            pieces.append(data[start:])
            return pieces
        while data[end] & 0xC0 == 0x80:  # a continuation byte: cut before its character
            end -= 1
        if after:
            found = data.rfind(after, max(start, end - within), end)
            if found >= 0:
                end = found + 1
        pieces.append(data[start:end])
        start = end


def relay_block(sender: bytes, block: bytes) -> bytes:
    """``MSG <text>`` frames joined by LF (from ``Connection.next_messages``)
    -> the ``MSG <sender> <text>`` frames the partner receives, LF-terminated.
    One C-level replace for the whole block, however many frames it holds."""
    head = b"MSG " + sender + b" "
    return head + block[4:].replace(b"\nMSG ", b"\n" + head) + b"\n"


def encode(event: ev.Event) -> bytes:
    """The frame of ``event``, line ending included."""
    return _ENCODERS[type(event)](event)
