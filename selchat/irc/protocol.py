"""The IRC wire protocol, without I/O: bytes in, messages out; messages in, bytes out.

A message is RFC 1459/2812's ``[:source] COMMAND param... [:trailing]``,
optionally led by IRCv3 message tags (``@key=value;key2 ...``), which are
parsed, unescaped and kept, so that a client that sends them is not refused
(selchat uses none of them). ``Decoder`` splits a byte stream into
messages whatever the chunks (``receive_data`` then ``next_event`` until
``NEED_DATA``); ``encode`` turns a ``Message`` into one line, and
``encode_split`` into as many lines as it takes to keep each within the
512-byte limit, cutting its last parameter (the text) at UTF-8 character
boundaries.

Lines end with CR, LF or CR LF (RFC 2812 says CR LF; clients and servers
accept either alone too), and empty lines are ignored. A line is at most
510 bytes before its CR LF, not counting its tags, which may take 8191 more
(IRCv3): a longer one is ``TOO_LONG`` (the server answers 417
ERR_INPUTTOOLONG) and dropped whole, and bytes past that without a line
ending are not kept. Text that is not valid UTF-8 is read as Latin-1, as
most servers and clients do. Nothing here raises on any input: anything
malformed comes out as a ``Malformed`` event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from selchat.protocol.codec import split_utf8

#: Longest line, CR LF included, not counting message tags (RFC 1459 2.3).
MAX_LINE = 512
#: Longest tags section, its '@' and the space after it included (IRCv3 message-tags).
MAX_TAGS = 8191
#: Longest run of bytes without a line ending that can still be a valid line.
MAX_UNTERMINATED = MAX_TAGS + MAX_LINE - 2

_COMMAND = re.compile(r"[A-Za-z]+|[0-9]{3}")
_EOL = re.compile(rb"[\r\n]")
_TAG_ESCAPES = {":": ";", "s": " ", "\\": "\\", "r": "\r", "n": "\n"}
_TAG_ESCAPE_OUT = str.maketrans({";": "\\:", " ": "\\s", "\\": "\\\\", "\r": "\\r", "\n": "\\n"})


class ParseError(ValueError):
    """A line that is not an IRC message (no command, a bad command...)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One IRC message. ``command`` is upper-cased (or three digits);
    ``params`` include the trailing one, without its ``:``; ``tags`` are
    (key, value) pairs, values unescaped, "" for a key without a value."""

    command: str
    params: tuple[str, ...] = ()
    source: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    def arg(self, index: int, default: str = "") -> str:
        return self.params[index] if index < len(self.params) else default


@dataclass(frozen=True, slots=True)
class Malformed:
    """A line that could not be parsed (or held NUL); ``reason`` says why."""

    reason: str


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Marker("NEED_DATA")
"""``Decoder.next_event()``: no complete line is buffered."""
TOO_LONG = _Marker("TOO_LONG")
"""``Decoder.next_event()``: a line over the limit was dropped."""
CLOSED = _Marker("CLOSED")
"""``Decoder.next_event()``: the peer closed, and every line before it was handed out."""


def _unescape_tag(value: str) -> str:
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\":
            if i + 1 < len(value):
                out.append(_TAG_ESCAPES.get(value[i + 1], value[i + 1]))
            i += 2  # a lone backslash at the end is dropped
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _parse_tags(text: str) -> tuple[tuple[str, str], ...]:
    tags: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key:
            tags[key] = _unescape_tag(value)  # a repeated key: the last one counts
    return tuple(tags.items())


def parse(line: str) -> Message:
    """One line, without its line ending, -> a Message; ParseError if it is none.

    Runs of spaces between the parts are tolerated, as are spaces at the end
    (outside a trailing parameter)."""
    if "\0" in line or "\r" in line or "\n" in line:
        raise ParseError("NUL, CR or LF inside a line")
    rest = line.lstrip(" ")
    tags: tuple = ()
    source = None
    if rest.startswith("@"):
        head, sep, rest = rest.partition(" ")
        if not sep:
            raise ParseError("tags without a command")
        tags = _parse_tags(head[1:])
        rest = rest.lstrip(" ")
    if rest.startswith(":"):
        head, sep, rest = rest.partition(" ")
        if not sep or len(head) < 2:
            raise ParseError("source without a command")
        source = head[1:]
        rest = rest.lstrip(" ")
    command, _, rest = rest.partition(" ")
    if not _COMMAND.fullmatch(command):
        raise ParseError("no command" if not command else "bad command")
    params = []
    rest = rest.lstrip(" ")
    while rest:
        if rest.startswith(":"):
            params.append(rest[1:])
            break
        param, _, rest = rest.partition(" ")
        params.append(param)
        rest = rest.lstrip(" ")
    return Message(command.upper(), tuple(params), source, tags)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class Decoder:
    """A byte stream -> messages. ``receive_data(b"")`` means EOF."""

    __slots__ = ("_buf", "_discarding", "_owed", "_eof")

    def __init__(self):
        self._buf = bytearray()
        self._discarding = False  # dropping an over-long line up to its end
        self._owed = False        # that line has ended: TOO_LONG is next
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            return
        if not data:
            self._eof = True
            return
        if self._discarding:
            m = _EOL.search(data)
            if m is None:
                return  # still inside the over-long line: keep nothing
            self._discarding = False
            self._owed = True
            data = data[m.start():]
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_event(self):
        """The next Message, ``Malformed``, ``TOO_LONG``, ``NEED_DATA`` or ``CLOSED``."""
        if self._owed:
            self._owed = False
            return TOO_LONG
        while True:
            buf = self._buf
            m = _EOL.search(buf)
            if m is None:
                if len(buf) > MAX_UNTERMINATED:
                    buf.clear()
                    self._discarding = True
                if self._eof:
                    if self._discarding:  # it ends here, unterminated
                        self._discarding = False
                        return TOO_LONG
                    if buf:  # an unterminated last line still counts
                        raw = bytes(buf)
                        buf.clear()
                        return self._line(raw)
                    return CLOSED
                return NEED_DATA
            end = m.start()
            raw = bytes(buf[:end])
            del buf[:end + 1]
            if not raw:
                continue  # an empty line, or the LF of a CR LF
            return self._line(raw)

    @staticmethod
    def _line(raw: bytes):
        if raw.startswith(b"@"):
            space = raw.find(b" ")
            tags_len = space + 1 if space >= 0 else len(raw)
        else:
            tags_len = 0
        if tags_len > MAX_TAGS or len(raw) - tags_len > MAX_LINE - 2:
            return TOO_LONG
        try:
            return parse(_decode(raw))
        except ParseError as exc:
            return Malformed(str(exc))


# -- out ---------------------------------------------------------------------------


def _head(msg: Message) -> str:
    """Everything of the line up to the last parameter's ``:`` included."""
    parts = []
    if msg.tags:
        parts.append("@" + ";".join(k if v == "" else f"{k}={v.translate(_TAG_ESCAPE_OUT)}"
                                    for k, v in msg.tags))
    if msg.source:
        parts.append(":" + msg.source)
    if not _COMMAND.fullmatch(msg.command):
        raise ValueError(f"bad command {msg.command!r}")
    parts.append(msg.command)
    for param in msg.params[:-1]:
        if not param or " " in param or param.startswith(":") or _bad_chars(param):
            raise ValueError(f"bad middle parameter {param!r}")
        parts.append(param)
    head = " ".join(parts)
    if msg.params:
        if _bad_chars(msg.params[-1]):
            raise ValueError("NUL, CR or LF in the last parameter")
        head += " :"
    return head


def _bad_chars(text: str) -> bool:
    return "\0" in text or "\r" in text or "\n" in text


def _tags_len(msg: Message, head: bytes) -> int:
    return head.index(b" ") + 1 if msg.tags else 0


def encode(msg: Message, limit: int = MAX_LINE) -> bytes:
    """The line of ``msg``, CR LF included. The last parameter always gets
    its ``:``. ValueError if a parameter cannot be sent or the line (tags
    not counted) would be over ``limit`` bytes."""
    head = _head(msg).encode("utf-8")
    line = head + (msg.params[-1].encode("utf-8") if msg.params else b"") + b"\r\n"
    if len(line) - _tags_len(msg, head) > limit:
        raise ValueError(f"line of {len(line)} bytes is over {limit}")
    return line


def encode_split(msg: Message, limit: int = MAX_LINE) -> bytes:
    """The lines of ``msg``: one, or if it would be over ``limit`` bytes,
    copies of it whose last parameters are consecutive pieces of the
    original, cut at UTF-8 character boundaries, each line within
    ``limit``. ValueError if the line without its last parameter already
    leaves no room for a character."""
    if not msg.params:
        return encode(msg, limit)
    head = _head(msg).encode("utf-8")
    text = msg.params[-1].encode("utf-8")
    room = limit - (len(head) - _tags_len(msg, head)) - 2
    if len(text) <= room:
        return head + text + b"\r\n"
    return b"".join(head + piece + b"\r\n" for piece in split_utf8(text, room))
