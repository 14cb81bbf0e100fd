"""Tests for the sans-I/O protocol core: codec round trips, framing, limits, fuzzing.

In the style of h11's ``test_io.py`` and its fuzzers: the invariants are
checked by feeding bytes to a ``Connection`` and draining ``next_event()``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selchat.protocol import codec
from selchat.protocol import events as ev
from selchat.protocol.connection import CLIENT, MAX_UNTERMINATED, SERVER, Connection
from selchat.protocol.errors import FrameError
from selchat.protocol.state import CLIENT_FRAMES, SERVER_FRAMES, State, next_state

MAX_FRAME = codec.MAX_FRAME  # what the server accepts from a client
MAX_SERVER_FRAME = codec.MAX_SERVER_FRAME  # what the client accepts from the server

# --- helpers --------------------------------------------------------------------


def drain(conn: Connection, limit: int = 100_000) -> list[ev.Event]:
    """Every event up to NEED_DATA (excluded) or ConnectionClosed (included)."""
    out = []
    for _ in range(limit):
        event = conn.next_event()
        if event is ev.NEED_DATA:
            return out
        out.append(event)
        if type(event) is ev.ConnectionClosed:
            return out
    raise AssertionError("next_event() never returned NEED_DATA")


def connection(side, state: State = State.FRESH) -> Connection:
    conn = Connection(side)
    conn.state = state
    return conn


def feed(side, state: State, chunks, eof: bool = False) -> tuple[list[ev.Event], Connection]:
    """Feed ``chunks`` one by one, draining after each."""
    conn = connection(side, state)
    events = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events += drain(conn)
    if eof:
        conn.receive_data(b"")
        events += drain(conn)
    return events, conn


def decode_line(decode, frame: bytes) -> ev.Event:
    """Decode one encoded frame (which must end in exactly one LF)."""
    assert frame.endswith(b"\n")
    assert frame.count(b"\n") == 1
    return decode(frame[:-1])


def reply_roundtrips(reply: ev.Event) -> None:
    """A BadFrame reply is a server frame: it must decode back to itself."""
    assert decode_line(codec.decode_server, codec.encode(reply)) == reply


# --- strategies -----------------------------------------------------------------

# What a frame can carry: no control characters except TAB, no surrogates.
_CHAR = st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from(" \t")
_WORD_CHAR = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=" ") | st.just("\t")

NAME = st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True)
TOKEN = st.from_regex(r"[A-Za-z0-9_-]{1,43}", fullmatch=True)
WORD = st.text(_WORD_CHAR, min_size=1, max_size=16)
#: "Rest of the line" fields: spaces anywhere, leading and trailing included.
TEXT = st.text(_CHAR, min_size=1, max_size=40)
OPT_TEXT = st.text(_CHAR, max_size=40)
ROLE = st.sampled_from([ev.Role.CHAT, ev.Role.CHECK])

NULLARY_CLIENT = [ev.Accept(), ev.Decline(), ev.Quit(), ev.Exit(), ev.Who(), ev.Help(), ev.Blocks()]

chat_commands = st.one_of(
    st.builds(ev.ChatRequest, NAME),
    st.sampled_from(NULLARY_CLIENT),
    st.builds(ev.Message, TEXT),
    st.builds(ev.Password, TEXT, TEXT),   # <old> escaped: any text, spaces and backslashes too
    st.builds(ev.Block, NAME),
    st.builds(ev.Unblock, NAME),
    st.builds(ev.Unregister, TEXT),       # the rest of the line, as LOGIN's password
)
heartbeats = st.one_of(st.builds(ev.Ping, OPT_TEXT), st.builds(ev.Pong, OPT_TEXT))

client_events = st.one_of(
    st.builds(ev.Login, NAME, TEXT),
    st.builds(ev.Register, NAME, TEXT),
    st.builds(ev.Attach, ROLE, TOKEN),
    st.builds(ev.Version, st.integers(min_value=0, max_value=10**9)),
    st.builds(ev.Resume, TOKEN, st.integers(min_value=0, max_value=2**64 - 1)),
    st.builds(ev.Ack, st.integers(min_value=0, max_value=2**64 - 1)),
    chat_commands,
    heartbeats,
)

#: Ids and seqs: 64-bit on the wire.
SEQ = st.integers(min_value=0, max_value=2**64 - 1)

login_socket_events = st.one_of(
    st.builds(ev.Ready, NAME),
    st.builds(ev.Request, NAME),
    st.builds(ev.Started, NAME),
    st.builds(ev.Declined, NAME),
    st.builds(ev.Expired, NAME),
    st.builds(ev.Cancelled, NAME),
    st.builds(ev.Ended, NAME, st.sampled_from(["quit", "left", "dropped", "shutdown"]) | WORD, TEXT),
    st.builds(ev.Incoming, NAME, TEXT),
    st.builds(ev.Error, WORD, WORD, TEXT),
    st.builds(ev.Shutdown, OPT_TEXT),
    st.builds(ev.Notice, OPT_TEXT),
    st.builds(ev.Motd, OPT_TEXT),
    st.builds(ev.Delivered, SEQ, SEQ),
    st.builds(ev.Undelivered, SEQ, SEQ, WORD, TEXT),
    st.builds(ev.Away, NAME),
    st.builds(ev.Back, NAME),
)

# ``Ok("ATTACH", "CHAT")`` is the same frame as ``Attached(CHAT)``: the codec
# can only give one of them back, and it gives Attached. Ok never carries that.
ok_events = st.builds(ev.Ok, WORD, OPT_TEXT).filter(
    lambda e: not (e.verb == "ATTACH" and e.info in ("CHAT", "CHECK"))
)

chat_socket_replies = st.one_of(
    ok_events,
    st.builds(ev.Error, WORD, WORD, TEXT),
    st.builds(ev.UserEntry, NAME, st.sampled_from(["idle", "busy"]) | TEXT),
    st.builds(ev.Nack, SEQ, WORD, TEXT),
    st.builds(ev.Received, SEQ),
)

server_events = st.one_of(
    st.builds(ev.Hello, st.integers(min_value=0, max_value=10**9), TEXT),
    st.builds(ev.Welcome, NAME, TOKEN, TOKEN),
    st.builds(ev.Welcome, NAME, TOKEN, TOKEN, TOKEN),
    st.builds(ev.Resumed, NAME, SEQ, SEQ, TOKEN, TOKEN),
    st.builds(ev.Unresumed, SEQ, WORD, TEXT),
    st.builds(ev.Attached, ROLE),
    st.builds(ev.Bye, WORD, TEXT),
    login_socket_events,
    chat_socket_replies,
    heartbeats,
)

# --- codec round trips ----------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(client_events)
def test_client_event_roundtrip(event):
    frame = codec.encode(event)
    assert len(frame) - 1 <= MAX_FRAME
    assert decode_line(codec.decode_client, frame) == event
    # the verb is case-insensitive
    verb, sep, rest = frame.partition(b" ")
    assert decode_line(codec.decode_client, verb.lower() + sep + rest) == event
    # and the whole way through a Connection, in a state that accepts it
    state = next(s for s in State if type(event) in CLIENT_FRAMES[s])
    conn = connection(SERVER, state)
    conn.receive_data(frame)
    assert conn.next_event() == event
    assert conn.next_event() is ev.NEED_DATA


@settings(max_examples=400, deadline=None)
@given(server_events)
def test_server_event_roundtrip(event):
    frame = codec.encode(event)
    assert len(frame) - 1 <= MAX_FRAME
    assert decode_line(codec.decode_server, frame) == event
    verb, sep, rest = frame.partition(b" ")
    assert decode_line(codec.decode_server, verb.lower() + sep + rest) == event
    state = next(s for s in State if type(event) in SERVER_FRAMES[s])
    conn = connection(CLIENT, state)
    conn.receive_data(frame)
    assert conn.next_event() == event
    assert conn.next_event() is ev.NEED_DATA


@pytest.mark.parametrize(
    "event, frame",
    [
        (ev.Login("alice", "two words "), b"LOGIN alice two words \n"),
        (ev.Register("bob", " lead"), b"REGISTER bob  lead\n"),
        (ev.Password("my old\\one", " new pass"), b"PASSWORD my\\ old\\\\one  new pass\n"),
        (ev.Unregister(" my pass "), b"UNREGISTER  my pass \n"),
        (ev.Block("bob"), b"BLOCK bob\n"),
        (ev.Unblock("bob"), b"UNBLOCK bob\n"),
        (ev.Blocks(), b"BLOCKS\n"),
        (ev.Attach(ev.Role.CHECK, "tok-1_x"), b"ATTACH CHECK tok-1_x\n"),
        (ev.ChatRequest("bob"), b"CHAT bob\n"),
        (ev.Message("h\u00e9 there\t!"), "MSG h\u00e9 there\t!\n".encode()),
        (ev.Ping(""), b"PING\n"),
        (ev.Pong("7"), b"PONG 7\n"),
        (ev.Hello(1, "selchat/0.1.0"), b"HELLO 1 selchat/0.1.0\n"),
        (ev.Welcome("alice", "c", "k"), b"WELCOME alice c k\n"),
        (ev.Attached(ev.Role.CHAT), b"OK ATTACH CHAT\n"),
        (ev.Ok("EXIT"), b"OK EXIT\n"),
        (ev.Ok("WHO", "2"), b"OK WHO 2\n"),
        (ev.Error("CHAT", "busy", "bob is busy"), b"ERR CHAT busy bob is busy\n"),
        (ev.UserEntry("bob", "idle"), b"USER bob idle\n"),
        (ev.Ended("bob", "quit", "bob quit"), b"ENDED bob quit bob quit\n"),
        (ev.Incoming("bob", "hi  there"), b"MSG bob hi  there\n"),
        (ev.Nack(3, "empty", "empty message"), b"NACK 3 empty empty message\n"),
        (ev.Shutdown(""), b"SHUTDOWN\n"),
        (ev.Notice("back in 5 minutes"), b"NOTICE back in 5 minutes\n"),
        (ev.Motd("Welcome to  selchat "), b"MOTD Welcome to  selchat \n"),
        (ev.Motd(""), b"MOTD\n"),  # a blank line of the message of the day
        (ev.Bye("exit", "see you"), b"BYE exit see you\n"),
    ],
)
def test_encode_exact_bytes(event, frame):
    assert codec.encode(event) == frame


@pytest.mark.parametrize(
    "line",
    ["HELLO \u00b2 selchat", "HELLO \u0661 selchat", "NACK \u00b2 empty x", "NACK \u0663 empty x", "NACK -1 a b"],
)
def test_non_ascii_digits_are_bad_syntax_not_a_crash(line):
    # "²".isdigit() is True but int("²") raises ValueError: the codec must
    # refuse such numbers as bad-syntax rather than crash next_event().
    with pytest.raises(FrameError) as info:
        codec.decode_server(line.encode())
    assert info.value.code == "bad-syntax"
    events, _ = feed(CLIENT, State.CHAT, [line.encode() + b"\n"])
    assert events == [ev.BadFrame(ev.Error(line.split()[0], "bad-syntax", info.value.text))]


@pytest.mark.parametrize(
    "line, event",
    [
        (b"MOTD", ev.Motd("")),
        (b"MOTD ", ev.Motd("")),
        (b"motd  indented", ev.Motd(" indented")),
        (b"Motd a\tb ", ev.Motd("a\tb ")),
        (b"NOTICE the server restarts at 18:00", ev.Notice("the server restarts at 18:00")),
        (b"notice x", ev.Notice("x")),
        (b"NOTICE", ev.Notice("")),
    ],
)
def test_motd_and_notice_take_the_rest_of_the_line(line, event):
    events, conn = feed(CLIENT, State.LOGIN, [line + b"\r\n"])
    assert events == [event]
    assert conn.state is State.LOGIN


@pytest.mark.parametrize("verb, event", [("MOTD", ev.Motd), ("NOTICE", ev.Notice)])
@pytest.mark.parametrize(
    "text",
    [
        "plain",
        "",
        "tab\tkept, escape \x1b[2J, bell \x07, CR \r, C1 \x9b, lone surrogate \ud800",
        "two\nBYE kicked forged",
        "x" * 10_000,
        "\u00e9" * 3000,  # 2 bytes each: the cut must not split one
        "\u20ac" * 2000,  # 3 bytes each
    ],
)
def test_fit_text_makes_any_text_a_frame_the_client_accepts(verb, event, text):
    fitted = codec.fit_text(verb, text)
    frame = codec.encode(event(fitted))
    assert len(frame) - 1 <= MAX_SERVER_FRAME
    # the encoder does the same by itself: whatever text the server is given,
    # it sends one frame that the client takes, never a forged second one
    assert codec.encode(event(text)) == frame and frame.count(b"\n") == 1
    events, _ = feed(CLIENT, State.LOGIN, [frame])
    assert events == [event(fitted)]
    if text.isprintable() and len(text.encode()) < 4000:
        assert fitted == text  # what needs no change is not changed
    else:
        assert not {"\x1b", "\r", "\n", "\ud800"} & set(fitted)
        assert fitted.startswith(text[:3].replace("\x1b", "\ufffd"))
    assert "\t" in codec.fit_text(verb, "a\tb")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([ev.Motd, ev.Notice]), st.text(max_size=60) | st.text(min_size=4000, max_size=4200))
def test_any_operator_text_is_sent_as_one_acceptable_frame(event, text):
    conn = connection(CLIENT, State.LOGIN)
    conn.receive_data(connection(SERVER, State.LOGIN).send(event(text)))
    got = drain(conn)
    assert got == [event(codec.fit_text("MOTD" if event is ev.Motd else "NOTICE", text))]
    if all(c.isprintable() or c == "\t" for c in text) and len(text) < 1000:
        assert got[0].text == text  # text that is fine goes through unchanged


# --- split invariance -----------------------------------------------------------

# Streams that are entirely valid in one state, so every frame must come out.
STREAMS = [
    (SERVER, State.CHAT, chat_commands, codec.decode_client),
    (SERVER, State.CHECK, heartbeats, codec.decode_client),
    (CLIENT, State.LOGIN, login_socket_events, codec.decode_server),
    (CLIENT, State.CHAT, chat_socket_replies, codec.decode_server),
]


@st.composite
def stream_and_splits(draw):
    side, state, events_st, _ = draw(st.sampled_from(STREAMS))
    events = draw(st.lists(events_st, min_size=1, max_size=8))
    data = b"".join(codec.encode(e) for e in events)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return side, state, events, data, split_at(data, cuts)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts``, without empty pieces (``b""`` would mean EOF)."""
    cuts = sorted(set(cuts))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    return [p for p in pieces if p]


@settings(max_examples=150, deadline=None)
@given(stream_and_splits())
def test_split_invariance(case):
    side, state, events, data, chunks = case
    whole, conn = feed(side, state, [data])
    assert whole == events
    assert conn.state is state
    assert conn.buffered == 0
    split, _ = feed(side, state, chunks)
    assert split == events
    one_by_one, _ = feed(side, state, [data[i : i + 1] for i in range(len(data))])
    assert one_by_one == events
    # feeding everything before draining once is the same too
    conn = connection(side, state)
    for chunk in chunks:
        conn.receive_data(chunk)
    assert drain(conn) == events


@settings(max_examples=150, deadline=None)
@given(stream_and_splits())
def test_crlf_same_as_lf(case):
    side, state, events, data, chunks = case
    crlf = data.replace(b"\n", b"\r\n")
    assert crlf.count(b"\r\n") == len(events)
    assert feed(side, state, [crlf])[0] == events
    assert feed(side, state, [crlf[i : i + 1] for i in range(len(crlf))])[0] == events
    # a CR that ends one chunk and an LF that starts the next
    assert feed(side, state, [c for frame in crlf.split(b"\n")[:-1] for c in (frame, b"\n")])[0] == events


@settings(max_examples=150, deadline=None)
@given(stream_and_splits(), st.data())
def test_trailing_partial_frame_waits(case, data):
    side, state, events, stream, _ = case
    last = data.draw(STREAMS_BY_KEY[side, state])
    frame = codec.encode(last)
    cut = data.draw(st.integers(0, len(frame) - 1))
    conn = connection(side, state)
    conn.receive_data(stream + frame[:cut])
    assert drain(conn) == events
    assert conn.next_event() is ev.NEED_DATA
    assert conn.next_event() is ev.NEED_DATA
    assert conn.buffered == cut
    for i in range(cut, len(frame) - 1):  # the rest, byte by byte: still incomplete
        conn.receive_data(frame[i : i + 1])
        assert conn.next_event() is ev.NEED_DATA
    conn.receive_data(b"\n")
    assert conn.next_event() == last
    assert conn.next_event() is ev.NEED_DATA
    assert conn.buffered == 0


STREAMS_BY_KEY = {(side, state): strat for side, state, strat, _ in STREAMS}


# --- limits and framing ---------------------------------------------------------


def msg_of_size(n: int) -> bytes:
    """A MSG frame of exactly ``n`` bytes, without its line ending."""
    return b"MSG " + b"x" * (n - 4)


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
@pytest.mark.parametrize("chunk", [1, 5, 1000, 4096, 4097, 4098, 10_000])
def test_max_frame_accepted(ending, chunk):
    data = msg_of_size(MAX_FRAME) + ending + b"WHO\n"
    events, conn = feed(SERVER, State.CHAT, [data[i : i + chunk] for i in range(0, len(data), chunk)])
    assert events == [ev.Message("x" * (MAX_FRAME - 4)), ev.Who()]
    assert conn.msg_seq == 1
    assert conn.state is State.CHAT


def _too_long_text() -> str:
    return f"frame longer than {MAX_FRAME} bytes"


@pytest.mark.parametrize("size", [MAX_FRAME + 1, MAX_FRAME + 2, 3 * MAX_FRAME, MAX_UNTERMINATED - 1])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
@pytest.mark.parametrize("chunk", [1, 7, 100, 4096, 4097, 4098, 100_000])
def test_overlong_frame_refused_and_next_frame_parsed(size, ending, chunk):
    if chunk == 1 and size > MAX_FRAME + 2:
        pytest.skip("slow and covered by the other chunk sizes")
    data = msg_of_size(size) + ending + b"MSG after\n" + b"WHO\n"
    events, conn = feed(SERVER, State.CHAT, [data[i : i + chunk] for i in range(0, len(data), chunk)])
    assert events == [
        ev.BadFrame(ev.Nack(1, "too-long", _too_long_text())),
        ev.Message("after"),
        ev.Who(),
    ]
    assert conn.msg_seq == 2
    assert conn.state is State.CHAT
    assert conn.buffered == 0


def test_overlong_frame_not_drained_between_chunks():
    conn = connection(SERVER, State.FRESH)
    for _ in range(50):
        conn.receive_data(b"LOGIN alice " + b"p" * 100)
    conn.receive_data(b"\nLOGIN alice pw\n")
    assert drain(conn) == [
        ev.BadFrame(ev.Error("-", "too-long", _too_long_text())),
        ev.Login("alice", "pw"),
    ]
    assert conn.state is State.AUTHENTICATING


def test_overlong_frame_on_client_side():
    assert Connection(CLIENT).max_frame == MAX_SERVER_FRAME == MAX_FRAME + 33
    assert Connection(SERVER).max_frame == MAX_FRAME
    # a relayed MSG of the longest text and the longest name fits
    longest = ev.Incoming("u" * 32, "y" * (MAX_FRAME - 4))
    assert len(codec.encode(longest)) - 1 == MAX_SERVER_FRAME
    events, conn = feed(CLIENT, State.LOGIN, [codec.encode(longest).replace(b"\n", b"\r\n")])
    assert events == [longest]
    # one byte more does not
    line = b"MSG bob " + b"y" * (MAX_SERVER_FRAME - 7)
    assert len(line) == MAX_SERVER_FRAME + 1
    events, conn = feed(CLIENT, State.LOGIN, [line + b"\nREADY bob\n"])
    assert events == [
        ev.BadFrame(ev.Error("-", "too-long", f"frame longer than {MAX_SERVER_FRAME} bytes")),
        ev.Ready("bob"),
    ]
    assert conn.msg_seq == 0  # the client counts the MSG frames it sends, not these


@pytest.mark.parametrize("side", [SERVER, CLIENT])
@pytest.mark.parametrize("chunk", [1000, 4097, 65_536, MAX_UNTERMINATED + 1])
def test_unterminated_run_is_fatal(side, chunk):
    data = b"MSG " + b"z" * MAX_UNTERMINATED  # MAX_UNTERMINATED + 4 bytes, no LF
    conn = connection(side, State.CHAT)
    fed = 0
    while True:
        conn.receive_data(data[fed : fed + chunk])
        fed += chunk
        event = conn.next_event()
        if event is not ev.NEED_DATA:
            break
        assert fed <= MAX_UNTERMINATED  # not fatal before the limit is passed
    assert fed > MAX_UNTERMINATED
    assert event == ev.BadFrame(BYE_TOO_LONG, fatal=True)
    reply_roundtrips(event.reply)
    assert_closes_after_fatal(conn, State.CHAT)


BYE_TOO_LONG = ev.Bye("too-long", f"no line ending within {MAX_UNTERMINATED} bytes")


def assert_closes_after_fatal(conn: Connection, state: State) -> None:
    """After a fatal BadFrame: the state is kept so the BYE can be sent, nothing
    is buffered, and from then on the connection reads as closed."""
    assert conn.state is state
    assert conn.buffered == 0
    if conn.our_side is SERVER:
        assert conn.send(BYE_TOO_LONG) == f"BYE too-long no line ending within {MAX_UNTERMINATED} bytes\n".encode()
        assert conn.state is State.CLOSED
    conn.receive_data(b"WHO\nREADY bob\nPING\n")  # the peer keeps talking: ignored
    assert conn.next_event() == ev.ConnectionClosed()
    assert conn.state is State.CLOSED
    assert conn.next_event() == ev.ConnectionClosed()
    assert conn.buffered == 0


def test_unterminated_run_boundary():
    conn = connection(SERVER, State.CHAT)
    conn.receive_data(b"a" * MAX_UNTERMINATED)
    assert conn.next_event() is ev.NEED_DATA
    assert conn.state is State.CHAT
    assert conn.buffered <= MAX_FRAME + 1  # not buffered: discarded as it comes
    conn.receive_data(b"a")
    event = conn.next_event()
    assert event == ev.BadFrame(BYE_TOO_LONG, fatal=True)
    assert_closes_after_fatal(conn, State.CHAT)


def test_unterminated_run_after_valid_frames():
    conn = connection(SERVER, State.CHAT)
    conn.receive_data(b"WHO\nHELP\n" + b"q" * (MAX_UNTERMINATED + 1))
    assert conn.next_event() == ev.Who()
    assert conn.next_event() == ev.Help()
    assert conn.next_event() == ev.BadFrame(BYE_TOO_LONG, fatal=True)
    assert_closes_after_fatal(conn, State.CHAT)


@pytest.mark.parametrize("side, state", [(SERVER, State.FRESH), (SERVER, State.LOGIN), (CLIENT, State.CHECK)])
def test_unterminated_run_fatal_in_any_state(side, state):
    conn = connection(side, state)
    conn.receive_data(b"\xff" * (MAX_UNTERMINATED + 1))
    assert conn.next_event() == ev.BadFrame(BYE_TOO_LONG, fatal=True)
    assert_closes_after_fatal(conn, state)


@pytest.mark.parametrize(
    "line, verb, text",
    [
        (b"LOGIN alice \xff\xfe", "LOGIN", "frame is not valid UTF-8"),
        (b"LOGIN alice \xc3", "LOGIN", "frame is not valid UTF-8"),  # truncated sequence
        (b"LOGIN alice \xed\xa0\x80", "LOGIN", "frame is not valid UTF-8"),  # a surrogate
        (b"LOGIN alice pw\x00", "LOGIN", "frame contains control characters"),
        (b"LOGIN alice p\rw", "LOGIN", "frame contains control characters"),
        (b"LOGIN alice \x1b[2Jpw", "LOGIN", "frame contains control characters"),
        (b"LOGIN alice pw\x7f", "LOGIN", "frame contains control characters"),
        (b"LOG\xffIN alice pw", "-", "frame is not valid UTF-8"),
        # control characters in the verb itself must not be echoed back
        (b"\x1b[2J", "-", "frame contains control characters"),
        (b"\x00", "-", "frame contains control characters"),
        (b"\r\r", "-", "frame contains control characters"),  # stray CRs before the line ending
        (b"LO\rGIN alice pw", "-", "frame contains control characters"),
        # no verb at all: the reply says "-", not an empty verb that shifts its fields
        (b" \xff", "-", "frame is not valid UTF-8"),
        (b" a\x00", "-", "frame contains control characters"),
    ],
)
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_bad_encoding(line, verb, text, ending):
    events, conn = feed(SERVER, State.FRESH, [line + ending + b"LOGIN alice pw\n"])
    assert events == [ev.BadFrame(ev.Error(verb, "bad-encoding", text)), ev.Login("alice", "pw")]
    reply_roundtrips(events[0].reply)


def test_tab_is_allowed():
    events, _ = feed(SERVER, State.CHAT, [b"MSG a\tb\t\n"])
    assert events == [ev.Message("a\tb\t")]


@pytest.mark.parametrize(
    "line, reply",
    [
        (b"MSG \xff", ev.Nack(1, "bad-encoding", "frame is not valid UTF-8")),
        (b"MSG a\x1bb", ev.Nack(1, "bad-encoding", "frame contains control characters")),
        (b"MSG", ev.Nack(1, "empty", "empty message")),
        (b"MSG ", ev.Nack(1, "empty", "empty message")),
        (b"msg ", ev.Nack(1, "empty", "empty message")),
        (msg_of_size(MAX_FRAME + 1), ev.Nack(1, "too-long", _too_long_text())),
    ],
)
def test_invalid_msg_on_chat_socket_is_nacked(line, reply):
    events, conn = feed(SERVER, State.CHAT, [line + b"\n"])
    assert events == [ev.BadFrame(reply)]
    assert conn.msg_seq == 1
    assert conn.state is State.CHAT
    reply_roundtrips(reply)


def test_nack_seq_counts_every_msg_frame():
    frames = [
        b"MSG one",  # 1
        b"WHO",
        b"MSG",  # 2: empty
        b"msg two",  # 3
        b"",
        msg_of_size(MAX_FRAME + 10),  # 4: too long
        b"CHAT bob",
        b"MSG \xc3\x28",  # 5: bad UTF-8
        b"MsG three",  # 6
        b"MSGX four",  # not a MSG frame
        b"MSG a\x00",  # 7: control character
    ]
    events, conn = feed(SERVER, State.CHAT, [b"\r\n".join(frames) + b"\r\n"])
    assert events == [
        ev.Message("one"),
        ev.Who(),
        ev.BadFrame(ev.Nack(2, "empty", "empty message")),
        ev.Message("two"),
        ev.BadFrame(ev.Nack(4, "too-long", _too_long_text())),
        ev.ChatRequest("bob"),
        ev.BadFrame(ev.Nack(5, "bad-encoding", "frame is not valid UTF-8")),
        ev.Message("three"),
        ev.BadFrame(ev.Error("MSGX", "unknown-command", "unknown command MSGX; send HELP for the list")),
        ev.BadFrame(ev.Nack(7, "bad-encoding", "frame contains control characters")),
    ]
    assert conn.msg_seq == 7
    # the client's count of what it sent agrees with the server's
    client = connection(CLIENT, State.CHAT)
    for text in ["one", "x", "two", "y", "z", "three", "w"]:
        client.send(ev.Message(text))
    assert client.msg_seq == conn.msg_seq


def test_invalid_msg_outside_chat_is_an_error_not_a_nack():
    events, conn = feed(SERVER, State.CHECK, [b"MSG\nMSG hi\n"])
    assert events == [
        ev.BadFrame(ev.Error("MSG", "empty", "empty message")),
        ev.BadFrame(
            ev.Error("MSG", "wrong-socket", "MSG is not valid here: the check socket only carries PING, PONG and ACK")
        ),
    ]
    assert conn.msg_seq == 0


@pytest.mark.parametrize(
    "line, reply",
    [
        (b"FOO bar", ev.Error("FOO", "unknown-command", "unknown command FOO; send HELP for the list")),
        (b" leading", ev.Error("-", "bad-syntax", "empty frame")),
        (b"LOGIN alice", ev.Error("LOGIN", "bad-syntax", "usage: LOGIN <user> <password>")),
        (b"LOGIN alice ", ev.Error("LOGIN", "bad-syntax", "usage: LOGIN <user> <password>")),
        (b"ATTACH SOMETHING tok", ev.Error("ATTACH", "bad-syntax", "usage: ATTACH CHAT|CHECK <token>")),
        (b"ATTACH CHAT to k", ev.Error("ATTACH", "bad-syntax", "usage: ATTACH CHAT|CHECK <token>")),
        (b"WHO now", ev.Error("WHO", "bad-syntax", "usage: WHO")),
        (b"PASSWORD onlyone", ev.Error("PASSWORD", "bad-syntax", "usage: PASSWORD <old> <new>")),
        (b"PASSWORD old\\ ", ev.Error("PASSWORD", "bad-syntax", "usage: PASSWORD <old> <new>")),
        (b"PASSWORD  new", ev.Error("PASSWORD", "bad-syntax", "usage: PASSWORD <old> <new>")),
        (b"PASSWORD o\\ld new", ev.Error("PASSWORD", "bad-syntax", "usage: PASSWORD <old> <new> (in <old>, "
                                        "write a space as '\\ ' and a backslash as '\\\\')")),
    ],
)
def test_syntax_errors(line, reply):
    events, conn = feed(SERVER, State.FRESH, [line + b"\n"])
    assert events == [ev.BadFrame(reply)]
    assert conn.state is State.FRESH
    reply_roundtrips(reply)


@pytest.mark.parametrize("side, state", [(SERVER, State.CHAT), (CLIENT, State.LOGIN)])
def test_blank_lines_ignored(side, state):
    frame = b"WHO\n" if side is SERVER else b"READY bob\n"
    expected = ev.Who() if side is SERVER else ev.Ready("bob")
    events, conn = feed(side, state, [b"\n\r\n\n", frame, b"\n", b"\r", b"\n", frame, b"\r\n"])
    assert events == [expected, expected]
    assert conn.buffered == 0


@pytest.mark.parametrize("side", [SERVER, CLIENT])
def test_eof(side):
    frame = b"LOGIN alice pw\n" if side is SERVER else b"HELLO 1 selchat/0.1.0\n"
    conn = connection(side)
    conn.receive_data(frame + b"partial frame")
    conn.receive_data(b"")
    first = conn.next_event()
    assert type(first) is (ev.Login if side is SERVER else ev.Hello)
    assert conn.next_event() == ev.ConnectionClosed()  # the partial frame is dropped
    assert conn.state is State.CLOSED
    assert conn.buffered == 0
    assert conn.next_event() == ev.ConnectionClosed()


def test_eof_only():
    events, conn = feed(SERVER, State.CHAT, [], eof=True)
    assert events == [ev.ConnectionClosed()]
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    "line, event",
    [
        (b"login alice pw", ev.Login("alice", "pw")),
        (b"LoGiN alice Pw", ev.Login("alice", "Pw")),
        (b"register bob x y", ev.Register("bob", "x y")),
        (b"attach chat tok", ev.Attach(ev.Role.CHAT, "tok")),
        (b"Attach Check tok", ev.Attach(ev.Role.CHECK, "tok")),
        # a missing token is a wrong token, for the server to refuse (not bad-syntax)
        (b"ATTACH chat", ev.Attach(ev.Role.CHAT, "")),
    ],
)
def test_case_insensitive_verbs_server_side(line, event):
    events, _ = feed(SERVER, State.FRESH, [line + b"\n"])
    assert events == [event]


@pytest.mark.parametrize(
    "line, event",
    [
        (b"chat Bob", ev.ChatRequest("Bob")),
        (b"accept", ev.Accept()),
        (b"Decline", ev.Decline()),
        (b"quit", ev.Quit()),
        (b"eXiT", ev.Exit()),
        (b"who", ev.Who()),
        (b"help", ev.Help()),
        (b"msg Hi There", ev.Message("Hi There")),
    ],
)
def test_case_insensitive_verbs_chat_socket(line, event):
    events, _ = feed(SERVER, State.CHAT, [line + b"\n"])
    assert events == [event]


@pytest.mark.parametrize(
    "line, event",
    [
        (b"hello 1 selchat/0.1.0", ev.Hello(1, "selchat/0.1.0")),
        (b"ok ATTACH CHECK", ev.Attached(ev.Role.CHECK)),
        (b"Err - x y", ev.Error("-", "x", "y")),
    ],
)
def test_case_insensitive_verbs_client_side(line, event):
    conn = connection(CLIENT, State.ATTACHING)
    conn.receive_data(line + b"\n")
    assert conn.next_event() == event


# --- fuzzing --------------------------------------------------------------------

_LONG_SIZES = [MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1, MAX_FRAME + 2, 5000,
               MAX_SERVER_FRAME - 4, MAX_SERVER_FRAME - 3, MAX_SERVER_FRAME + 1,
               MAX_UNTERMINATED - 1, MAX_UNTERMINATED, MAX_UNTERMINATED + 1, 70_000]

valid_frames = st.one_of(client_events, server_events).map(codec.encode)

chunks = st.one_of(
    st.binary(max_size=40),
    valid_frames,
    valid_frames.map(lambda f: f.replace(b"\n", b"\r\n")),
    valid_frames.map(lambda f: f.lower()),
    st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b"\xff", b" ", b"MSG", b"MSG ", b"\x1b", b"\xc3"]),
    # junk after a verb, an empty verb or a known one
    st.builds(
        lambda verb, junk, end: verb + junk + end,
        st.sampled_from([b"", b" ", b"MSG ", b"LOGIN ", b"PING ", b"OK ", b"ERR ", b"X ", b"NACK ", b"HELLO ",
                         b"MOTD ", b"NOTICE "]),
        st.sampled_from([b"\xff", b"\x00", b"\x1b[0m", b"\r", b"a\x7f", b"\xc3", "\u00b2 a b".encode()]),
        st.sampled_from([b"\n", b"\r\n"]),
    ),
    # runs: with or without a line ending, starting like a frame or not
    st.builds(
        lambda head, size, fill, end: head + (fill * size)[:size] + end,
        st.sampled_from([b"", b"MSG ", b"msg ", b"LOGIN a ", b"PING "]),
        st.sampled_from(_LONG_SIZES),
        st.sampled_from([b"x", b"\xff", b"ab ", b"\r", b"\xe2\x82\xac"]),
        st.sampled_from([b"", b"\n", b"\r\n", b"\r"]),
    ),
    st.builds(lambda a, b: a + b, valid_frames, st.binary(max_size=10)),
)

_EVENT_TYPES = {
    SERVER: {t for table in CLIENT_FRAMES.values() for t in table},
    CLIENT: {t for table in SERVER_FRAMES.values() for t in table},
}


def check_fuzz(side, state: State, data: list[bytes], eof: bool) -> None:
    conn = connection(side, state)
    decode = codec.decode_client if side is SERVER else codec.decode_server
    in_table = CLIENT_FRAMES if side is SERVER else SERVER_FRAMES
    if eof:
        data = [*data, b""]
    eof_seen = closed = False
    for chunk in data:
        conn.receive_data(chunk)
        eof_seen |= chunk == b""
        for _ in range(100_000):
            before, seq_before = conn.state, conn.msg_seq
            event = conn.next_event()
            if closed:  # after ConnectionClosed or a fatal BadFrame, nothing else
                assert event == ev.ConnectionClosed()
            if event is ev.NEED_DATA:
                assert conn.state is before
                break
            assert isinstance(event, ev.Event)
            if type(event) is ev.ConnectionClosed:
                assert eof_seen or closed
                assert conn.state is State.CLOSED
                assert conn.buffered == 0
                closed = True
                break
            if type(event) is ev.BadFrame:
                reply = event.reply
                assert type(reply) in (ev.Error, ev.Nack, ev.Bye)
                assert event.fatal == (type(reply) is ev.Bye)
                reply_roundtrips(reply)
                assert conn.state is before
                if event.fatal:
                    assert reply == BYE_TOO_LONG
                    assert conn.buffered == 0
                    closed = True
                if type(reply) is ev.Nack:
                    assert side is SERVER and before is State.CHAT
                    assert reply.seq == conn.msg_seq == seq_before + 1
                else:
                    assert conn.msg_seq == seq_before
                continue
            # a real event: of the peer's kind, allowed here, and re-encodable
            assert type(event) in _EVENT_TYPES[side]
            assert next_state(in_table, before, event) is conn.state
            assert decode_line(decode, codec.encode(event)) == event
            expected_seq = seq_before + (side is SERVER and type(event) is ev.Message)
            assert conn.msg_seq == expected_seq
        else:
            raise AssertionError("next_event() never returned NEED_DATA")
        # after draining, at most one frame's worth is buffered
        assert conn.buffered <= conn.max_frame + 1


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from([SERVER, CLIENT]), st.sampled_from(State), st.lists(chunks, max_size=12), st.booleans())
def test_fuzz_never_raises(side, state, data, eof):
    check_fuzz(side, state, data, eof)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([SERVER, CLIENT]), st.sampled_from(State), st.binary(max_size=300), st.data())
def test_fuzz_random_bytes_split_invariance(side, state, blob, data):
    """Any bytes at all, split anywhere, give the same events as fed whole."""
    pieces = split_at(blob, data.draw(st.lists(st.integers(0, len(blob)), max_size=10)))
    whole, conn_whole = feed(side, state, split_at(blob, []), eof=True)
    split, conn_split = feed(side, state, pieces, eof=True)
    assert split == whole
    assert conn_split.state is conn_whole.state
    assert conn_split.msg_seq == conn_whole.msg_seq
    check_fuzz(side, state, pieces, eof=True)


# --- error replies ---------------------------------------------------------------


@pytest.mark.parametrize("verb, code, text", [
    (b"X" * (MAX_FRAME - 10), "unknown-command", "unknown command; send HELP for the list"),
    (b"caf\xc3\xa9", "unknown-command", "unknown command; send HELP for the list"),
    (b"\x01FOO", "bad-encoding", "frame contains control characters"),
    (b"FOO\x1b[2J", "bad-encoding", "frame contains control characters"),
])
def test_error_reply_never_echoes_a_bad_verb(verb, code, text):
    conn = connection(SERVER)
    conn.receive_data(verb + b" x\n")
    assert conn.next_event() == ev.BadFrame(ev.Error("-", code, text))


def test_error_reply_fits_in_a_frame():
    conn = connection(SERVER)
    conn.receive_data(b"X" * (MAX_FRAME - 10) + b"\n")
    event = conn.next_event()
    assert type(event) is ev.BadFrame
    client = connection(CLIENT, State.CHAT)
    client.receive_data(codec.encode(event.reply))
    assert client.next_event() == event.reply


def test_split_utf8_cuts_at_characters_and_after_a_space_when_asked():
    assert codec.split_utf8(b"", 10) == [b""]
    assert codec.split_utf8("ééé".encode(), 5) == ["éé".encode(), "é".encode()]
    with pytest.raises(ValueError):
        codec.split_utf8(b"abc", 3)
    assert codec.split_utf8(b"one two three", 10, b" ", 5) == [b"one two ", b"three"]
    assert codec.split_utf8(b"onetwothree four", 10, b" ", 5) == [b"onetwothre", b"e four"]  # none near the end


@given(st.text(_CHAR, max_size=300), st.integers(min_value=4, max_value=40), st.integers(min_value=0, max_value=40))
def test_split_utf8_pieces_fit_and_join_to_the_whole(text, size, within):
    data = text.encode()
    pieces = codec.split_utf8(data, size, b" ", within)
    assert b"".join(pieces) == data
    assert all(len(p) <= size for p in pieces)
    for piece in pieces:
        piece.decode()  # each one valid UTF-8 by itself
    assert all(pieces[:-1])  # no empty piece but a lone last one (of an empty text)
