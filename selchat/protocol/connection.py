"""One socket's protocol state, with no I/O: bytes in, events out; events in, bytes out.

    conn = Connection(SERVER)
    conn.receive_data(data)          # b"" means the peer closed
    while (event := conn.next_event()) is not NEED_DATA:
        ...                          # BadFrame carries the reply to send
    sock_bytes = conn.send(reply)    # checked against the state table

Nothing here reads a clock or touches a socket, so every behaviour can be
tested by feeding bytes.
"""

from __future__ import annotations

import enum
import operator
import re

from selchat.protocol import codec
from selchat.protocol import events as ev
from selchat.protocol.errors import FrameError, LocalProtocolError
from selchat.protocol.state import CLIENT_FRAMES, SERVER_FRAMES, State, next_state

#: An unterminated run longer than this closes the connection: the peer is not
#: speaking our protocol (or is trying to make us buffer without bound).
MAX_UNTERMINATED = 64 * 1024


class Side(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


CLIENT = Side.CLIENT
SERVER = Side.SERVER


class Connection:
    """The protocol state of one socket, seen from ``our_side``."""

    __slots__ = (
        "our_side", "_state", "_in_row", "_out_row", "_fast_from", "max_frame", "msg_seq",
        "_buf", "_pos", "_scan", "_discarding", "_discard_head", "_eof", "_decode", "_in_table", "_out_table",
    )

    def __init__(self, our_side: Side, max_frame: int | None = None):
        self.our_side = our_side
        if max_frame is None:
            max_frame = codec.MAX_FRAME if our_side is SERVER else codec.MAX_SERVER_FRAME
        self.max_frame = max_frame
        #: MSG frames counted on a chat socket, in the direction we receive
        #: (server) or send (client): NACK <seq> names the seq-th one.
        self.msg_seq = 0
        self._buf = bytearray()
        self._pos = 0               # start of the first unconsumed byte in _buf
        self._scan = 0              # bytes of _buf already known to hold no LF
        self._discarding = 0        # > 0: bytes dropped of an over-long frame so far
        self._discard_head = b""    # the start of the over-long frame (for its verb)
        self._eof = False
        self._fast_from = 0         # next_messages() will not look before this offset
        if our_side is SERVER:
            self._decode, self._in_table, self._out_table = codec.decode_client, CLIENT_FRAMES, SERVER_FRAMES
        else:
            self._decode, self._in_table, self._out_table = codec.decode_server, SERVER_FRAMES, CLIENT_FRAMES
        self.state = State.FRESH

    def _set_state(self, state: State) -> None:
        # The rows of the two tables for this state, looked up once per change
        # rather than once per frame.
        self._state = state
        self._in_row = self._in_table[state]
        self._out_row = self._out_table[state]

    #: Read through a C getter (no Python frame): the relay reads it per block.
    state = property(operator.attrgetter("_state"), _set_state)

    def can_send(self, event_type: type) -> bool:
        """Whether an event of this type may be sent now."""
        return event_type in self._out_row

    # -- inbound ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer. ``b""`` means the peer closed its side."""
        if self._eof:
            return  # after EOF or a fatal error nothing more is read
        if data:
            if self._pos:
                # Drop consumed lines once per read, not once per line: deleting
                # the head of a bytearray is a memmove of everything after it.
                del self._buf[: self._pos]
                self._scan -= self._pos
                self._fast_from = max(0, self._fast_from - self._pos)
                self._pos = 0
            self._buf += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return len(self._buf) - self._pos

    def next_event(self) -> ev.Event:
        """The next complete event, ``NEED_DATA``, ``BadFrame`` or ``ConnectionClosed``.

        Never raises for anything the peer sent.
        """
        while True:
            line = self._next_line()
            if line is None:
                if self._discarding > MAX_UNTERMINATED:
                    return self._fatal("too-long", f"no line ending within {MAX_UNTERMINATED} bytes")
                if self._eof:
                    self._buf.clear()
                    self._pos = self._scan = 0
                    self.state = State.CLOSED
                    return ev.ConnectionClosed()
                return ev.NEED_DATA
            if line is _OVERLONG:
                err = FrameError("too-long", f"frame longer than {self.max_frame} bytes")
                return self._refuse(err, self._discard_head)
            if not line:
                continue  # blank lines are ignored (nc users press Enter)
            try:
                event = self._decode(line)
            except FrameError as err:
                return self._refuse(err, line)
            nxt = self._in_row.get(type(event))
            if nxt is None:
                return self._refuse(self._wrong_state(event), line)
            if nxt is not self._state:
                self.state = next_state(self._in_table, self._state, event)
            if self.our_side is SERVER and type(event) is ev.Message:
                self.msg_seq += 1
            return event

    def next_messages(self, limit: int) -> tuple[bytes, int] | None:
        """The relay's fast path (server side, chat socket).

        If the next complete frames buffered (at most ``limit`` of them) are
        all plain ``MSG <text>`` (upper-case verb, text in UTF-8 without
        control characters other than TAB, within the length cap), consume
        them and return ``(block, count)``: the frames
        joined by LF, without the last LF. Otherwise return None
        and leave everything to ``next_event()``, which handles the general
        case frame by frame; the same bytes are not scanned again.

        Validating a whole read with a few C-level calls instead of decoding
        frame by frame is what lets one Python thread relay at the speed of
        a bare relay (docs/performance.md).
        """
        buf, pos = self._buf, self._pos
        if self._state is not State.CHAT or self._discarding or not buf.startswith(b"MSG ", pos):
            return None  # (an ACK ahead of the messages, say: next_ack takes it, then this runs again)
        end = buf.rfind(b"\n", max(pos, self._fast_from))
        if end < 0:
            return None
        if limit < 1:
            return None
        block = bytes(buf[pos:end])
        # The frames, if every one is a MSG (the first is; the others are checked below).
        count = block.count(b"\nMSG ") + 1
        if count > limit:
            # Take only as many frames as allowed; the rest wait their turn.
            rest = block.split(b"\n", limit)[-1]
            block = block[: len(block) - len(rest) - 1]
            end = pos + len(block)
            count = block.count(b"\nMSG ") + 1
        self._fast_from = end + 1  # win or lose, do not scan these bytes twice
        if (
            not (block.isascii() or _utf8_without_c1(block))
            # Deleting every control character and every LF deletes exactly
            # one byte per "\nMSG " only if there is no control character and
            # every LF starts a MSG frame: both checks in one C pass.
            or len(block) - len(block.translate(None, _CONTROLS)) != count - 1
            # An empty message ("MSG " alone): looser tests than the exact one
            # (a text that ends in "MSG " takes the general path too), and
            # two C calls instead of a Python function's four.
            or b"MSG \n" in block or block.endswith(b"MSG ")
            or (len(block) > self.max_frame and max(map(len, block.split(b"\n"))) > self.max_frame)
        ):
            return None
        if end + 1 == len(buf):
            buf.clear()
            self._pos = self._scan = self._fast_from = 0
        else:
            self._pos = self._scan = end + 1
        self.msg_seq += count
        return block, count

    def next_ack(self, low: int, high: int) -> int | None:
        """The fast path of ACK (server side, version 2).

        If the next frame is ``ACK <n>`` with ``low < n <= high`` (an
        acknowledgement of events not acknowledged yet), consume it and
        return ``n``; otherwise leave everything to ``next_event()``, which
        gives the same event. On the check socket the selchat client sends
        one ACK at a time; on the chat socket an ACK rides ahead of a chat
        message, which ``next_messages`` takes next.
        """
        state = self._state
        if (state is not State.CHECK and state is not State.CHAT) or self._discarding:
            return None
        buf, pos = self._buf, self._pos
        if not buf.startswith(b"ACK ", pos):
            return None
        m = _ACK_AT(buf, pos)
        if m is None:
            return None
        n = int(m.group(1))
        if not low < n <= high:
            return None
        end = m.end()
        if end == len(buf):
            buf.clear()
            self._pos = self._scan = self._fast_from = 0
        else:
            self._pos = self._scan = end
        return n

    def _next_line(self):
        """Pop one line from the buffer (without CR LF), or _OVERLONG, or None."""
        buf, pos = self._buf, self._pos
        nl = buf.find(b"\n", self._scan)
        if nl < 0:
            pending = len(buf) - pos
            if self._discarding or pending > self.max_frame + 1:  # +1: room for a CR
                if not self._discarding:
                    self._discard_head = bytes(buf[pos : pos + 8])
                self._discarding += pending
                buf.clear()
                self._pos = self._scan = 0
            else:
                self._scan = len(buf)
            return None
        end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
        if self._discarding or end - pos > self.max_frame:
            if not self._discarding:
                self._discard_head = bytes(buf[pos : pos + 8])
            self._discarding = 0
            line = _OVERLONG
        else:
            line = bytes(buf[pos:end])
        if nl + 1 == len(buf):
            buf.clear()
            self._pos = self._scan = 0
        else:
            self._pos = self._scan = nl + 1
        return line

    def _refuse(self, err: FrameError, line: bytes) -> ev.BadFrame:
        """Turn a FrameError into the reply for the peer. State is unchanged."""
        if err.fatal:
            return self._fatal(err.code, err.text)
        if self.our_side is SERVER and self.state is State.CHAT and _is_msg(line):
            # The client counts its MSG frames; a refused one still counts.
            self.msg_seq += 1
            return ev.BadFrame(ev.Nack(self.msg_seq, err.code, err.text))
        return ev.BadFrame(ev.Error(err.verb, err.code, err.text))

    def _wrong_state(self, event: ev.Event) -> FrameError:
        verb = codec.encode(event).split(b" ", 1)[0].strip().decode("ascii")
        where = {
            State.FRESH: "log in or attach first",
            State.AUTHENTICATING: "wait for the login reply",
            State.ATTACHING: "wait for the attach reply",
            State.LOGIN: "the login socket only receives; send commands on the chat socket",
            State.CHAT: "this is the chat socket",
            State.CHECK: "the check socket only carries PING, PONG and ACK",
            State.CLOSED: "the socket is closed",
        }[self.state]
        return FrameError("wrong-socket", f"{verb} is not valid here: {where}", verb)

    def _fatal(self, code: str, text: str) -> ev.BadFrame:
        """The stream cannot go on. The state stays as it is so the reply (a BYE)
        can still be sent; every later next_event() says ConnectionClosed."""
        self._buf.clear()
        self._pos = self._scan = self._discarding = 0
        self._eof = True
        return ev.BadFrame(ev.Bye(code, text), fatal=True)

    # -- outbound --------------------------------------------------------------

    def send(self, event: ev.Event) -> bytes:
        """The bytes of ``event``; raises LocalProtocolError if not valid now."""
        nxt = self._out_row.get(type(event))
        if nxt is None:
            raise LocalProtocolError(f"cannot send {type(event).__name__} in state {self._state.name}")
        if nxt is not self._state:
            self.state = next_state(self._out_table, self._state, event)
        if self.our_side is CLIENT and type(event) is ev.Message:
            self.msg_seq += 1
        return codec.encode(event)

    def __repr__(self) -> str:
        return f"<Connection {self.our_side.value} {self.state.name} buffered={len(self._buf)}>"


_OVERLONG = object()
_ACK_AT = re.compile(rb"ACK ([0-9]{1,20})\n").match

# The control characters (TAB is allowed), LF among them: a block of frames
# joined by LF holds LFs and no other (CR included, so CRLF input takes the
# slow path). Deleting them with translate() and comparing lengths is a single
# C pass, ten times faster than re.search.
_CONTROLS = bytes([c for c in range(32) if c != 9] + [127])
#: C1 control characters (U+0080-U+009F) in UTF-8: refused as codec._CONTROL refuses them.
_C1 = re.compile(rb"\xc2[\x80-\x9f]")


def _utf8_without_c1(block: bytes) -> bool:
    """A non-ASCII block may take the fast path too: if it is valid UTF-8
    (surrogates are not) with no C1 control character, exactly what
    ``codec.decode_text`` accepts beyond ASCII. Two C-level passes."""
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _C1.search(block) is None


def _is_msg(line: bytes) -> bool:
    return line[:3].upper() == b"MSG" and line[3:4] in (b" ", b"")
