"""The IRC wire protocol (selchat/irc/protocol.py): parsing, encoding, the
512-byte limit and splitting at UTF-8 character boundaries. No sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.irc import protocol as irc
from selchat.irc.protocol import Message, parse


def events(data: bytes, chunks: list[int] | None = None, eof: bool = False) -> list:
    """Everything a Decoder hands out for ``data``, fed in pieces of the given sizes."""
    decoder = irc.Decoder()
    out = []
    pieces = []
    if chunks is None:
        pieces = [data]
    else:
        pos = 0
        for size in chunks:
            pieces.append(data[pos:pos + size])
            pos += size
        pieces.append(data[pos:])
    for piece in pieces:
        if piece:
            decoder.receive_data(piece)
        while (event := decoder.next_event()) is not irc.NEED_DATA:
            if event is irc.CLOSED:
                break
            out.append(event)
    if eof:
        decoder.receive_data(b"")
        while (event := decoder.next_event()) is not irc.CLOSED:
            assert event is not irc.NEED_DATA
            out.append(event)
    return out


# -- parsing --------------------------------------------------------------------------


def test_parse_rfc_forms():
    assert parse("NICK alice") == Message("NICK", ("alice",))
    assert parse("user alice 0 * :Alice Liddell") == Message("USER", ("alice", "0", "*", "Alice Liddell"))
    assert parse(":bob!b@host PRIVMSG alice :hi :) there") == Message(
        "PRIVMSG", ("alice", "hi :) there"), "bob!b@host")
    assert parse("PRIVMSG alice :") == Message("PRIVMSG", ("alice", ""))
    assert parse("PING") == Message("PING")
    assert parse(":irc.example 001 alice :Welcome") == Message("001", ("alice", "Welcome"), "irc.example")


def test_parse_tolerates_extra_spaces():
    assert parse("  PRIVMSG   bob    hello  ") == Message("PRIVMSG", ("bob", "hello"))
    assert parse(":src   NOTICE  bob  :  two  spaces ") == Message("NOTICE", ("bob", "  two  spaces "), "src")


def test_parse_message_tags_are_kept_and_unescaped():
    msg = parse(r"@time=2024-01-01T00:00:00.000Z;msgid=a\sb\:c\\d;+draft/flag :a!b@c PRIVMSG bob :hi")
    assert msg.command == "PRIVMSG" and msg.params == ("bob", "hi") and msg.source == "a!b@c"
    assert dict(msg.tags) == {"time": "2024-01-01T00:00:00.000Z", "msgid": "a b;c\\d", "+draft/flag": ""}
    assert dict(parse(r"@k=x\y\ TAGMSG bob").tags) == {"k": "xy"}  # unknown escape: the char; lone \ at end: dropped


@pytest.mark.parametrize("line", ["", "   ", ":src", ":src ", "@a=b", "@a=b :src", "12 x", "PRIV-MSG x", ": NICK a"])
def test_parse_refuses_what_is_no_message(line):
    with pytest.raises(irc.ParseError):
        parse(line)


def test_decoder_line_endings_and_empty_lines():
    data = b"NICK a\r\nUSER a 0 * :A\nPING x\r\r\n\n:s PONG s :x\rQUIT"
    assert events(data, eof=True) == [
        Message("NICK", ("a",)), Message("USER", ("a", "0", "*", "A")), Message("PING", ("x",)),
        Message("PONG", ("s", "x"), "s"), Message("QUIT"),
    ]


def test_decoder_latin1_fallback_and_malformed():
    out = events(b"PRIVMSG bob :caf\xe9\r\nPRIVMSG bob :caf\xc3\xa9\r\n:onlysource\r\nA\x00B\r\n")
    assert out[0] == Message("PRIVMSG", ("bob", "café")) and out[1] == Message("PRIVMSG", ("bob", "café"))
    assert type(out[2]) is irc.Malformed and type(out[3]) is irc.Malformed


def test_decoder_too_long_lines_are_dropped_whole():
    ok = b"PRIVMSG bob :" + b"x" * (510 - 13)
    assert len(ok) == 510
    assert events(ok + b"\r\n") == [Message("PRIVMSG", ("bob", "x" * 497))]
    out = events(ok + b"y\r\nPING after\r\n")
    assert out == [irc.TOO_LONG, Message("PING", ("after",))]
    # tags have their own 8191 bytes
    tagged = b"@k=" + b"v" * 8000 + b" " + ok + b"\r\n"
    assert events(tagged)[0].params[1] == "x" * 497
    assert events(b"@k=" + b"v" * 8200 + b" PING x\r\n") == [irc.TOO_LONG]
    # a huge unterminated run is not kept, and is one TOO_LONG when it ends
    huge = b"PRIVMSG bob :" + b"z" * 100_000
    assert events(huge + b"\nPING y\n", chunks=[1000] * 100) == [irc.TOO_LONG, Message("PING", ("y",))]
    assert events(huge, eof=True) == [irc.TOO_LONG]


def test_decoder_keeps_no_more_than_a_line():
    decoder = irc.Decoder()
    for _ in range(50):
        decoder.receive_data(b"a" * 1000)
        assert decoder.next_event() is irc.NEED_DATA
        assert decoder.buffered <= irc.MAX_UNTERMINATED + 1000


# -- encoding ---------------------------------------------------------------------------


def test_encode():
    assert irc.encode(Message("PRIVMSG", ("bob", "hi there"), "alice!alice@selchat")) == \
        b":alice!alice@selchat PRIVMSG bob :hi there\r\n"
    assert irc.encode(Message("PING", ("x",))) == b"PING :x\r\n"
    assert irc.encode(Message("QUIT")) == b"QUIT\r\n"
    assert irc.encode(Message("TAGMSG", ("bob",), tags=(("a", "x y;z"), ("b", "")))) == b"@a=x\\sy\\:z;b TAGMSG :bob\r\n"


@pytest.mark.parametrize("msg", [
    Message("PRIVMSG", ("bo b", "x")), Message("PRIVMSG", ("", "x")), Message("PRIVMSG", (":bob", "x")),
    Message("PRIVMSG", ("bob", "a\r\nQUIT")), Message("PRIV MSG", ("x",)), Message("12", ("x",)),
    Message("PRIVMSG", ("bob", "x" * 600)),
])
def test_encode_refuses(msg):
    with pytest.raises(ValueError):
        irc.encode(msg)


def test_encode_split_at_512_and_character_boundaries():
    head = ":alice!alice@selchat PRIVMSG bob :"
    text = "é" * 300 + "x" + "😀" * 100
    data = irc.encode_split(Message("PRIVMSG", ("bob", text), "alice!alice@selchat"))
    lines = data.split(b"\r\n")[:-1]
    assert len(lines) > 1
    pieces = []
    for line in lines:
        assert len(line) + 2 <= 512
        assert line.startswith(head.encode())
        pieces.append(line[len(head):].decode("utf-8"))  # each piece is valid UTF-8 by itself
    assert "".join(pieces) == text
    assert len(lines[0]) + 2 >= 509  # full lines, cut at most a character short




# -- properties -------------------------------------------------------------------------

_word = st.text(st.characters(blacklist_characters="\x00\r\n :", blacklist_categories=("Cs",)), min_size=1, max_size=20)
_text = st.text(st.characters(blacklist_characters="\x00\r\n", blacklist_categories=("Cs",)), max_size=80)
_tag_key = st.from_regex(r"\+?[a-z][a-z0-9/.-]{0,10}", fullmatch=True)
_messages = st.builds(
    Message,
    command=st.one_of(st.from_regex(r"[A-Z]{1,10}", fullmatch=True), st.from_regex(r"[0-9]{3}", fullmatch=True)),
    params=st.tuples(st.lists(_word, max_size=4), _text).map(lambda p: (*p[0], p[1])) | st.just(()),
    source=st.none() | _word,
    tags=st.dictionaries(_tag_key, _text, max_size=3).map(lambda d: tuple(d.items())),
)


@given(_messages)
def test_parse_inverts_encode(msg):
    line = irc.encode(msg, limit=10_000)
    assert line.endswith(b"\r\n")
    assert parse(line[:-2].decode("utf-8")) == msg


@given(st.lists(_messages, max_size=8), st.data())
@settings(max_examples=200)
def test_any_split_of_the_stream_gives_the_same_messages(msgs, data):
    stream = b"".join(irc.encode(m, limit=10_000) for m in msgs)
    sizes = data.draw(st.lists(st.integers(1, 40), max_size=60))
    assert events(stream, sizes) == events(stream) == msgs


@given(st.binary(max_size=3000), st.data())
@settings(max_examples=200)
def test_any_bytes_any_split_same_events_and_no_exception(blob, data):
    sizes = data.draw(st.lists(st.integers(1, 500), max_size=20))
    whole = events(blob, eof=True)
    assert events(blob, sizes, eof=True) == whole
    for event in whole:
        assert type(event) in (Message, irc.Malformed) or event is irc.TOO_LONG


@given(st.text(st.characters(blacklist_characters="\x00\r\n", blacklist_categories=("Cs",)), max_size=2000),
       st.sampled_from(["bob", "a" * 32]), st.sampled_from(["alice!alice@selchat", "x" * 100]))
def test_encode_split_properties(text, target, source):
    data = irc.encode_split(Message("PRIVMSG", (target, text), source))
    head = f":{source} PRIVMSG {target} :".encode()
    lines = data.split(b"\r\n")
    assert lines.pop() == b""
    pieces = []
    for line in lines:
        assert len(line) + 2 <= irc.MAX_LINE
        assert line.startswith(head)
        pieces.append(line[len(head):].decode("utf-8"))  # never cut inside a character
    assert "".join(pieces) == text
    assert all(pieces) or len(pieces) == 1  # no empty piece unless the text is empty
    # and read back by the decoder, the pieces are messages
    assert [m.params[1] for m in events(data)] == pieces
