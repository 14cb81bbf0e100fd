"""The relay's fast path (Connection.next_messages + codec.relay_block) must
give exactly what the frame-by-frame path gives, for any input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.protocol import codec
from selchat.protocol import events as ev
from selchat.protocol.connection import SERVER, Connection
from selchat.protocol.state import State

texts = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40),
    # beyond ASCII: letters, CJK, emoji (the fast path too), and near the C1 controls (not it)
    st.text(st.characters(min_codepoint=0xa0, max_codepoint=0x1f9ff, blacklist_categories=("Cs",)),
            min_size=1, max_size=20),
    st.text(st.characters(min_codepoint=0x78, max_codepoint=0xb0), min_size=1, max_size=8),
    st.text(min_size=0, max_size=20),  # anything, control characters included
    st.just("x" * 4100),  # over the cap
)
ack_frames = st.one_of(
    st.integers(0, 10**21).map(lambda n: b"ACK %d\n" % n),
    st.integers(0, 50).map(lambda n: b"ACK %d\r\n" % n),
    st.sampled_from([b"ACK\n", b"ACK x\n", b"ACK 1 2\n", b"ack 3\n", b"PING a\n", b"PONG\n", b"\n",
                     b"ACK 0012\n", b"ACK \xd9\xa3\n", b"ACK " + b"9" * 4100 + b"\n"]),
)
frames = st.one_of(
    texts.map(lambda t: b"MSG " + t.encode("utf-8", "surrogatepass") + b"\n"),
    texts.map(lambda t: b"msg " + t.encode("utf-8", "surrogatepass") + b"\r\n"),
    st.sampled_from([b"WHO\n", b"\n", b"MSG \n", b"MSG\n", b"QUIT\n", b"MSG \xff\n", b"MSG a\rb\n"]),
    ack_frames,  # version 2: an ACK may ride ahead of a chat message
)


def server_connection(state: State) -> Connection:
    conn = Connection(SERVER)
    conn.state = state
    return conn


def chat_connection() -> Connection:
    return server_connection(State.CHAT)


def frame_by_frame(conn: Connection, chunks) -> list:
    """Every event ``next_event()`` gives for ``chunks``, read one after the other."""
    out = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not ev.NEED_DATA:
            out.append(event)
    return out


def slow(chunks) -> list:
    conn = chat_connection()
    return frame_by_frame(conn, chunks), conn.msg_seq


def fast(chunks, limit, low=0, high=-1, state: State = State.CHAT) -> list:
    """What the server's Peer.process does: the fast path (a chat socket's
    only), else a leading ACK of new events (``low < n <= high``: version 2),
    else one event."""
    conn = server_connection(state)
    out = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            batch = conn.next_messages(limit)
            if batch is not None:
                block, count = batch
                lines = block.split(b"\n")
                assert len(lines) == count
                out.extend(ev.Message(line[4:].decode()) for line in lines)
                continue
            n = conn.next_ack(low, high)
            if n is not None:
                assert low < n <= high
                out.append(ev.Ack(n))
                continue
            event = conn.next_event()
            if event is ev.NEED_DATA:
                break
            out.append(event)
    return out, conn.msg_seq


@settings(max_examples=400, deadline=None)
@given(st.lists(frames, max_size=30), st.data(), st.integers(1, 40), st.integers(0, 30), st.integers(-1, 10**21))
def test_fast_path_gives_the_same_events_and_seq(frame_list, data, limit, low, high):
    stream = b"".join(frame_list)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    chunks = [chunk for chunk in chunks if chunk]  # b"" would mean EOF
    assert fast(chunks, limit, low, high) == slow(chunks)


def test_an_ack_ahead_of_messages_is_taken_and_the_messages_stay_one_block():
    conn = chat_connection()
    conn.receive_data(b"ACK 7\nMSG a\nMSG b\n")
    assert conn.next_ack(0, 10) == 7
    assert conn.next_messages(5) == (b"MSG a\nMSG b", 2)
    assert conn.buffered == 0 and conn.msg_seq == 2


@given(st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=50),
                min_size=1, max_size=20),
       st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True))
def test_relay_block_equals_encoding_each_message(messages, sender):
    block = b"\n".join(b"MSG " + m.encode() for m in messages)
    expected = b"".join(codec.encode(ev.Incoming(sender, m)) for m in messages)
    assert codec.relay_block(sender.encode(), block) == expected


def test_fast_path_counts_seq_across_both_paths():
    conn = chat_connection()
    conn.receive_data(b"msg a\nMSG b\nMSG c\n")
    assert conn.next_messages(5) is None  # a lower-case verb: frame by frame
    assert conn.next_event() == ev.Message("a")
    conn.receive_data(b"MSG d\n")
    assert conn.next_messages(5) == (b"MSG b\nMSG c\nMSG d", 3)
    assert conn.msg_seq == 4
    assert conn.buffered == 0


def test_fast_path_only_on_a_chat_socket():
    conn = Connection(SERVER)
    conn.receive_data(b"MSG a\n")
    assert conn.next_messages(10) is None


def test_fast_path_takes_at_most_limit_frames_and_leaves_the_rest():
    conn = chat_connection()
    conn.receive_data(b"MSG a\nMSG b\nMSG c\nMSG d\n")
    assert conn.next_messages(2) == (b"MSG a\nMSG b", 2)
    assert conn.next_messages(0) is None
    assert conn.next_messages(5) == (b"MSG c\nMSG d", 2)
    assert conn.msg_seq == 4 and conn.buffered == 0


# -- the check socket's fast path: one ACK of new events ------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(ack_frames, max_size=8), st.data(), st.integers(0, 30), st.integers(0, 10**21))
def test_the_ack_fast_path_gives_what_the_frame_by_frame_path_gives(frames_, data, low, high):
    stream = b"".join(frames_)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if b > a]  # b"" would be EOF
    events, _ = fast(chunks, 1 << 30, low, high, State.CHECK)
    assert events == frame_by_frame(server_connection(State.CHECK), chunks)


def test_utf8_messages_take_the_fast_path_and_c1_controls_or_bad_bytes_do_not():
    conn = chat_connection()
    conn.receive_data("MSG héllo 🎉\nMSG ünï\tcode\n".encode())
    assert conn.next_messages(32) == ("MSG héllo 🎉\nMSG ünï\tcode".encode(), 2)
    for bad in ("MSG a\u0085b\n".encode(), b"MSG \xed\xa0\x80\n", b"MSG \xc3\n", b"MSG \xff\n"):
        conn = chat_connection()
        conn.receive_data(bad)
        assert conn.next_messages(32) is None, bad   # the frame-by-frame path refuses it, as ever
        event = conn.next_event()
        assert isinstance(event, ev.BadFrame) and event.reply.code == "bad-encoding", (bad, event)
