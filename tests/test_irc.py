"""The IRC front end (selchat serve --irc-port) over real sockets, spoken to
line by line as an IRC client would, next to users of the selchat protocol."""

from __future__ import annotations

import base64
import signal
import ssl
import subprocess
import sys

import pytest
import trustme

from selchat.irc.protocol import parse
from selchat.irc.frontend import SERVICE_HELP
from tests.ircsupport import IrcClient, IrcServer, irc_user_asks, make_account
from tests.support import DEADLINE, RawUser, V2User, start_chat, unique

MOTD = ["welcome to the test server", "", "be nice"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One server for the module; per-address limits off (everything comes
    from 127.0.0.1), as in conftest's ``server``."""
    tmp = tmp_path_factory.mktemp("irc")
    motd = tmp / "motd.txt"
    motd.write_text("\n".join(MOTD) + "\n")
    server = IrcServer(tmp, "--conn-rate", "0", "--max-per-address", "0", "--throttle-after", "0",
                       "--motd-file", str(motd))
    yield server
    server.stop()
    assert "Traceback" not in server.log_path.read_text()  # no IRC input made the server fail


@pytest.fixture
def make_irc_server(tmp_path):
    started = []

    def start(*args):
        server = IrcServer(tmp_path, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)
        assert "Traceback" not in server.log_path.read_text()


def raw_user(srv, *args, **kwargs) -> RawUser:
    """A selchat-protocol user of the module's server, past its MOTD."""
    user = RawUser(srv, *args, **kwargs)
    for line in MOTD:
        assert user.login.line() == f"MOTD {line}".rstrip()  # an empty line is "MOTD"
    return user


def irc_user(srv, name: str | None = None, sasl: bool = False) -> IrcClient:
    name = make_account(srv, name)
    client = srv.irc()
    if sasl:
        client.register_sasl(name)
    else:
        client.register(name)
    return client


# -- logging in -------------------------------------------------------------------------


def test_pass_login_registration_burst_and_motd(srv):
    name = make_account(srv)
    client = srv.irc()
    burst = client.register(name)
    commands = [m.command for m in burst]
    assert commands == ["001", "002", "003", "004", "005", "375", "372", "372", "372", "376", "NOTICE"]
    assert all(m.params[0] == name for m in burst)
    assert burst[0].params[1] == f"Welcome to selchat, {name}!{name}@selchat"
    assert {"CHANLIMIT=#:0", "CASEMAPPING=ascii"} <= set(burst[4].params)  # no channels to join
    assert [m.params[1] for m in burst[6:9]] == [f"- {line}" for line in MOTD]
    # the MOTD command sends it again
    client.send("MOTD")
    assert [client.msg().command for _ in range(5)] == ["375", "372", "372", "372", "376"]
    # it is online for the selchat side too
    raw = raw_user(srv)
    raw.chat.send("WHO")
    who = []
    while not (line := raw.chat.line()).startswith("OK WHO"):
        who.append(line)
    assert f"USER {name} idle" in who


def test_nick_spelling_comes_from_the_account(srv):
    name = make_account(srv, unique("Mixed"))
    client = srv.irc()
    burst = client.register(name.lower())
    assert burst[0].params[0] == name  # 001 tells the client its nick: the registered spelling


def test_sasl_plain_login(srv):
    name = make_account(srv)
    client = srv.irc()
    client.send("CAP LS 302", "NICK whatever", "USER x 0 * :real")
    assert client.expect("CAP").params == ("*", "LS", "sasl=PLAIN")  # answered before NICK is read
    client.send("CAP REQ :sasl multi-prefix")
    assert client.expect("CAP").params == ("whatever", "NAK", "sasl multi-prefix")
    client.send("CAP REQ :sasl")
    assert client.expect("CAP").params == ("whatever", "ACK", "sasl")
    client.send("AUTHENTICATE SCRAM-SHA-256")
    client.expect("908", "whatever", "PLAIN")
    client.expect("904")
    client.send("AUTHENTICATE PLAIN")
    client.expect("AUTHENTICATE", "+")
    client.send("AUTHENTICATE " + base64.b64encode(f"\0{name}\0pw secret".encode()).decode())
    logged_in = client.expect("900")
    assert logged_in.params[2] == name
    client.expect("903")
    client.send("CAP END")
    burst = client.welcome()
    assert burst[0].params[0] == name  # the nick is the account's, whatever NICK said


def test_sasl_wrong_password_then_right_one(srv):
    name = make_account(srv)
    client = srv.irc()
    client.send("CAP LS", "NICK " + name, "USER x 0 * :real")
    assert client.expect("CAP").params[2] == "sasl"  # no version 302: no mechanism list
    client.send("CAP REQ sasl", "AUTHENTICATE PLAIN")
    client.expect("CAP")
    client.expect("AUTHENTICATE", "+")
    b64 = base64.b64encode
    client.send("AUTHENTICATE " + b64(f"{name}\0{name}\0wrong".encode()).decode())
    client.expect("904", name, "SASL authentication failed")
    client.send("AUTHENTICATE PLAIN")
    client.expect("AUTHENTICATE", "+")
    client.send("AUTHENTICATE " + b64(f"{name}\0{name}\0pw secret".encode()).decode())
    client.expect("900")
    client.expect("903")
    client.send("CAP END")
    client.welcome()


def test_wrong_password_and_no_password(srv):
    name = make_account(srv)
    client = srv.irc()
    client.send("PASS wrong", f"NICK {name}", "USER x 0 * :real")
    client.expect("464", name, "Password incorrect")
    error = client.expect("ERROR")
    assert "auth-failed" in error.params[0]
    assert client.expect_closed() == []
    client = srv.irc()
    client.send(f"NICK {name}", "USER x 0 * :real")
    client.expect("464")
    client.expect("ERROR")
    assert client.msg() is None


def test_a_locked_account_is_refused_with_the_reason(srv):
    name = make_account(srv)
    locked = subprocess.run([sys.executable, "-m", "selchat.cli", "user", "--db", srv.db, "lock", name, "spam"],
                            capture_output=True, text=True, timeout=DEADLINE)
    assert locked.returncode == 0, locked.stderr
    client = srv.irc()
    client.send("PASS pw secret", f"NICK {name}", "USER x 0 * :real")
    client.expect("464", name, "Login refused (locked): this account is locked: spam")
    client.expect("ERROR")


def test_before_registration(srv):
    client = srv.irc()
    client.send("PRIVMSG selchat :who", "JOIN #x", "PING :tok")
    client.expect("451", "*", "You have not registered")
    client.expect("451")
    assert client.expect("PONG").params == ("irc.selchat", "tok")
    client.send("NICK selchat", "NICK bad.nick", "NICK " + "x" * 33)
    for _ in range(3):
        client.expect("432")
    client.send("QUIT :bye")
    client.expect("ERROR")
    assert client.msg() is None


def test_login_timeout(make_irc_server):
    server = make_irc_server("--login-timeout", "0.5")
    client = server.irc()
    client.send("NICK someone")
    assert "timeout" in client.expect("ERROR").params[0]
    assert client.msg() is None


# -- what IRC has and selchat does not ----------------------------------------------------


def test_refusals_and_numerics(srv):
    client = irc_user(srv)
    me = client.nick
    client.send("JOIN #general,#x")
    client.expect("403", me, "#general")
    client.expect("403", me, "#x")
    client.send("FROBNICATE now")
    client.expect("421", me, "FROBNICATE")
    client.send("PRIVMSG nobody-chatting :hi")
    assert "not chatting with nobody-chatting" in client.expect("404", me, "nobody-chatting").params[2]
    client.send("NICK other")
    client.expect("447", me, "other")
    client.send(f"MODE {me}")
    client.expect("221", me, "+")
    client.send("USER again 0 * :x")
    client.expect("462")
    client.send("PING :are-you-there")
    client.expect("PONG", "irc.selchat", "are-you-there")


def test_too_long_input_line_gets_417_and_is_dropped(srv):
    client = irc_user(srv)
    client.send_bytes(b"PRIVMSG selchat :" + b"x" * 600 + b"\r\nPING :after\r\n")
    client.expect("417", client.nick)
    client.expect("PONG", "irc.selchat", "after")


def test_who_whois_ison_userhost(srv):
    client = irc_user(srv)
    raw = raw_user(srv)
    me = client.nick
    client.send(f"WHO {raw.name}")
    reply = client.expect("352")
    assert reply.params == (me, "*", raw.name, "selchat", "irc.selchat", raw.name, "H", "0 idle")
    client.expect("315", me, raw.name)
    client.send(f"WHOIS {raw.name}")
    assert client.expect("311").params[:4] == (me, raw.name, raw.name, "selchat")
    client.expect("312")
    client.expect("318", me, raw.name)
    client.send("WHOIS nobody-here")
    client.expect("401", me, "nobody-here")
    client.expect("318", me, "nobody-here")
    client.send(f"ISON {raw.name} nobody-here {me} SELCHAT")
    assert client.expect("303").params == (me, f"{raw.name} {me} selchat")
    client.send(f"USERHOST {raw.name} nobody-here")
    assert client.expect("302").params == (me, f"{raw.name}=+{raw.name}@selchat")
    client.send("WHO *")
    _, seen = client.until("315")
    names = {m.params[5] for m in seen}
    assert {me, raw.name, "selchat"} <= names


def test_service_help_who_and_unknown(srv):
    client = irc_user(srv)
    client.send("PRIVMSG selchat :help")
    assert "direct chats" in client.notice()
    for _ in range(len(SERVICE_HELP) - 1):
        client.notice()
    client.send("PRIVMSG selchat :who")
    assert client.notice().startswith("online: ")
    client.send("PRIVMSG selchat :dance")
    assert "unknown command 'dance'" in client.notice()
    client.send("PRIVMSG selchat :chat nobody-has-this-name")
    assert client.notice() == "chat: there is no user nobody-has-this-name"
    client.send("PRIVMSG selchat :yes")
    assert client.notice() == "accept: no chat request to answer"


def test_an_irc_user_changes_their_password_through_the_service(srv):
    client = irc_user(srv)
    name = client.nick
    client.send("PRIVMSG selchat :password wrong new one")
    assert client.notice() == "password: that is not your current password"
    client.send("PRIVMSG selchat :password")
    assert client.notice().startswith("usage: /msg selchat password OLD NEW")
    client.send("PRIVMSG selchat :password pw\\ secret new one")
    assert client.notice() == "your password is changed"
    login = srv.connect()
    login.send(f"LOGIN {name} new one")
    login.expect(f"WELCOME {name} ")


def test_an_irc_user_blocks_a_selchat_user_through_the_service(make_irc_server):
    """block ends the chat with them; their requests are then declined after
    a while (nothing reaches the IRC user); blocks lists them; unblock undoes it."""
    srv = make_irc_server("--request-timeout", "2")  # declined within 1.5 s
    client = irc_user(srv)
    raw = RawUser(srv)  # this server has no MOTD
    irc_user_asks(client, client.nick, raw)
    client.send(f"PRIVMSG selchat :block {raw.name.upper()}")
    assert client.notice() == f"chat with {raw.name} ended (quit): you ended the chat"
    assert client.notice() == f"you blocked {raw.name}: their chat requests are declined for you"
    raw.login.expect(f"ENDED {client.nick} quit ")
    raw.chat.send(f"CHAT {client.nick}")
    raw.chat.expect(f"OK CHAT {client.nick}")
    raw.login.expect(f"DECLINED {client.nick}")
    client.send("PRIVMSG selchat :blocks", "PRIVMSG selchat :block", "PRIVMSG selchat :unblock nobody-here")
    assert client.notice() == f"blocked: {raw.name}"  # and no notice of raw's request came before it
    assert client.notice() == "usage: /msg selchat block NAME"
    assert client.notice() == "unblock: you have not blocked nobody-here"
    client.send(f"PRIVMSG selchat :unblock {raw.name}", "PRIVMSG selchat :blocks")
    assert client.notice() == f"you unblocked {raw.name}"
    assert client.notice() == "blocked: nobody"
    raw.chat.send(f"CHAT {client.nick}")
    raw.chat.expect(f"OK CHAT {client.nick}")
    assert client.notice() == f"{raw.name} wants to chat: /msg selchat yes (or no)"


def test_an_irc_user_deletes_their_account_through_the_service(srv):
    client = irc_user(srv)
    name = client.nick
    client.send("PRIVMSG selchat :unregister", "PRIVMSG selchat :unregister wrong one")
    assert client.notice().startswith("usage: /msg selchat unregister PASSWORD")
    assert client.notice() == "unregister: that is not your current password"
    client.send("PRIVMSG selchat :unregister pw secret")
    assert client.notice() == f"your account {name} is deleted"
    error = client.expect("ERROR")
    assert "unregistered: your account is deleted" in error.params[0]
    assert client.expect_closed() == []
    login = srv.connect()
    login.send(f"LOGIN {name} pw secret")
    login.expect("ERR LOGIN auth-failed ")


# -- chats --------------------------------------------------------------------------------


def test_selchat_user_asks_irc_user(srv):
    client = irc_user(srv)
    raw = raw_user(srv)
    raw.chat.send(f"CHAT {client.nick}")
    raw.chat.expect("OK CHAT")
    assert client.notice() == f"{raw.name} wants to chat: /msg selchat yes (or no)"
    client.send("PRIVMSG selchat :yes")
    raw.login.expect(f"STARTED {client.nick}")
    assert client.notice().startswith(f"chat with {raw.name} started")
    raw.chat.send("MSG hello from selchat", "MSG  two  spaces ")
    for text in ("hello from selchat", " two  spaces "):
        msg = client.expect("PRIVMSG")
        assert msg.source == f"{raw.name}!{raw.name}@selchat" and msg.params == (client.nick, text)
    client.send(f"PRIVMSG {raw.name} :hello from IRC", f"PRIVMSG {raw.name} :\x02bold\x02 \x0304red\x03",
                f"PRIVMSG {raw.name} :\x01ACTION waves\x01", f"PRIVMSG {raw.name} :\x01VERSION\x01")
    assert raw.login.line() == f"MSG {client.nick} hello from IRC"
    assert raw.login.line() == f"MSG {client.nick} bold red"
    assert raw.login.line() == f"MSG {client.nick} * waves"
    assert client.notice().startswith("not sent to")  # a CTCP other than ACTION has nothing to relay
    raw.chat.send("QUIT")
    raw.chat.expect("OK QUIT")
    assert client.notice() == f"chat with {raw.name} ended (quit): {raw.name} ended the chat"
    client.send(f"PRIVMSG {raw.name} :too late")
    client.expect("404", client.nick, raw.name)


def test_irc_user_asks_selchat_user_and_quits_the_chat(srv):
    client = irc_user(srv, sasl=True)
    raw = raw_user(srv)
    irc_user_asks(client, client.nick, raw)
    client.send(*[f"PRIVMSG {raw.name} :line {i}" for i in range(50)])
    assert [raw.login.line() for _ in range(50)] == [f"MSG {client.nick} line {i}" for i in range(50)]
    raw.chat.send(*[f"MSG back {i}" for i in range(50)])
    assert [client.expect("PRIVMSG").params[1] for _ in range(50)] == [f"back {i}" for i in range(50)]
    client.send("PRIVMSG selchat :quit")
    assert client.notice() == f"chat with {raw.name} ended (quit): you ended the chat"
    raw.login.expect(f"ENDED {client.nick} quit")
    # a request withdrawn, and one declined
    client.send(f"PRIVMSG selchat :chat {raw.name}")
    client.notice()
    raw.login.expect(f"REQUEST {client.nick}")
    client.send("PRIVMSG selchat :quit")
    assert client.notice() == f"you withdrew your chat request to {raw.name}"
    raw.login.expect(f"CANCELLED {client.nick}")
    raw.chat.send(f"CHAT {client.nick}")
    raw.chat.expect("OK CHAT")
    client.notice()
    client.send("PRIVMSG selchat :no")
    assert client.notice() == f"you declined {raw.name}'s chat request"
    raw.login.expect(f"DECLINED {client.nick}")


def v2_user_chatting_with(srv, client: IrcClient, motd=()) -> V2User:
    """A version 2 selchat user who asked the IRC user for a chat, accepted."""
    alice = V2User(srv.connect)
    for line in motd:
        alice.expect(f"MOTD {line}".rstrip())
    alice.chat.send(f"CHAT {client.nick}")
    assert client.notice() == f"{alice.name} wants to chat: /msg selchat yes (or no)"
    client.send("PRIVMSG selchat :yes")
    alice.expect(f"STARTED {client.nick}")
    assert client.notice().startswith(f"chat with {alice.name} started")
    return alice


def test_irc_user_hears_a_version_2_partner_go_away_and_come_back(srv):
    client = irc_user(srv)
    alice = v2_user_chatting_with(srv, client, MOTD)
    alice.cut()
    assert client.notice() == (f"{alice.name} is away (reconnecting): what you send is held for them "
                               "until they are back")
    client.send(f"PRIVMSG {alice.name} :sent while you were away")
    alice.resume()
    assert client.notice() == f"{alice.name} is back"
    assert alice.expect(f"MSG {client.nick} ") == f"MSG {client.nick} sent while you were away"
    alice.chat.send("MSG and here I am")
    assert client.expect("PRIVMSG").params == (client.nick, "and here I am")


def test_irc_user_is_told_which_lines_a_partner_that_never_came_back_missed(make_irc_server):
    srv = make_irc_server("--conn-rate", "0", "--max-per-address", "0", "--resume-window", "1")
    client = irc_user(srv)
    alice = v2_user_chatting_with(srv, client)
    alice.cut()
    assert client.notice().startswith(f"{alice.name} is away")
    client.send(f"PRIVMSG {alice.name} :one", f"PRIVMSG {alice.name} :two")
    # The window ends: the chat ends, and each held line is named as not delivered.
    assert client.notice(timeout=10).startswith(f"chat with {alice.name} ended (dropped)")
    why = f"{alice.name} lost connection and did not come back"
    assert [client.notice(), client.notice()] == [f"not delivered: 'one' ({why})", f"not delivered: 'two' ({why})"]


def test_an_irc_user_slowed_for_an_away_partner_is_not_dropped_for_its_unread_pongs(make_irc_server):
    """Past the partner's held-message bound the server stops reading the
    IRC user, PONGs included: that silence is the server's, not the
    client's, so it is not a ping timeout."""
    srv = make_irc_server("--conn-rate", "0", "--max-per-address", "0", "--resume-window", "2",
                          "--resume-buffer", "4", "--ping-interval", "0.5", "--ping-timeout", "0.5")
    client = irc_user(srv)
    alice = v2_user_chatting_with(srv, client)
    alice.cut()
    client.until("NOTICE", client.nick, timeout=DEADLINE)  # (answering PINGs until) the away notice
    client.send(*[f"PRIVMSG {alice.name} :line {i}" for i in range(10)])
    # The window ends; until then the client answers every PING, as IRC clients do.
    seen = []
    while not any(text.startswith(f"chat with {alice.name} ended") for text in seen):
        msg = client.msg()
        assert msg is not None and msg.command != "ERROR", f"dropped: {msg}; saw {seen}"
        if msg.command == "PING":
            client.send(f"PONG :{msg.params[-1]}")
        elif msg.command == "NOTICE":
            seen.append(msg.params[1])
    client.send("PING :still here")
    assert client.until("PONG")[0].params[-1] == "still here"


def test_two_irc_users_chat_and_quit_ends_it(srv):
    alice, bob = irc_user(srv), irc_user(srv, sasl=True)
    alice.send(f"PRIVMSG selchat :chat {bob.nick}")
    alice.notice()
    assert bob.notice().startswith(f"{alice.nick} wants to chat")
    bob.send("PRIVMSG selchat :y")
    assert bob.notice().startswith(f"chat with {alice.nick} started")
    assert alice.notice().startswith(f"chat with {bob.nick} started")
    alice.send(f"PRIVMSG {bob.nick.upper()} :hi bob")
    msg = bob.expect("PRIVMSG")
    assert msg.source.startswith(f"{alice.nick}!") and msg.params == (bob.nick, "hi bob")
    bob.send(f"NOTICE {alice.nick} :a notice is a message too")
    assert alice.expect("PRIVMSG").params[1] == "a notice is a message too"
    bob.send("WHO " + alice.nick)
    assert bob.expect("352").params[6] == "G"  # busy
    bob.expect("315")
    alice.send("QUIT :off I go")
    assert "exit" in alice.expect("ERROR").params[0]
    assert alice.msg() is None
    assert bob.notice() == f"chat with {alice.nick} ended (left): {alice.nick} logged out"


def test_long_messages_are_split_at_512_bytes_on_character_boundaries(srv):
    client = irc_user(srv)
    raw = raw_user(srv)
    client.send(f"PRIVMSG selchat :chat {raw.name}")
    client.notice()
    raw.login.expect("REQUEST")
    raw.chat.send("ACCEPT")
    client.notice()
    text = "é" * 1000 + "x" + "😀" * 400 + " end"  # 3605 bytes of UTF-8
    assert len(text.encode()) < 4096
    raw.chat.send("MSG " + text)
    pieces = []
    while "".join(pieces) != text:
        line = client.raw()
        assert len(line) + 2 <= 512
        parsed = parse(line.decode("utf-8"))  # each line valid UTF-8 on its own
        assert parsed.command == "PRIVMSG" and parsed.params[0] == client.nick
        pieces.append(parsed.params[1])
        assert len(pieces) < 20
    assert len(pieces) >= 8


# -- one session per account --------------------------------------------------------------


def test_irc_login_takes_over_a_selchat_session_and_back(srv):
    raw = raw_user(srv)
    friend = raw_user(srv)
    start_chat(raw, friend)
    client = srv.irc()
    client.register(raw.name)  # the same account, from IRC
    assert raw.login.line() == "BYE replaced logged in from another client"
    friend.login.expect(f"ENDED {raw.name} dropped")
    again = raw_user(srv, raw.name, register=False)  # and back to the selchat protocol
    error = client.expect("ERROR")
    assert "replaced" in error.params[0]
    assert client.msg() is None
    assert again.name == raw.name
    # and from IRC to IRC
    first = irc_user(srv)
    second = srv.irc()
    second.register(first.nick)
    assert "replaced" in first.expect("ERROR").params[0]


# -- heartbeats ---------------------------------------------------------------------------


def test_ping_pong_keeps_the_session_and_silence_ends_it(make_irc_server):
    server = make_irc_server("--ping-interval", "0.3", "--ping-timeout", "0.6")
    client = irc_user(server)
    friend = RawUser(server, check=True)
    friend.check.send("PING")  # keep the raw user alive by hand meanwhile
    client.send(f"PRIVMSG selchat :chat {friend.name}")
    client.notice()
    friend.login.expect("REQUEST")
    friend.chat.send("ACCEPT")
    client.notice()
    for _ in range(3):  # answered PINGs keep it going
        ping = client.expect("PING")
        client.send(f"PONG irc.selchat :{ping.params[0]}")
        friend.check.send("PING")
    client.expect("PING")  # not answered this time
    error = client.expect("ERROR")
    assert "ping-timeout" in error.params[0]
    assert client.msg() is None
    friend.login.expect(f"STARTED {client.nick}")
    friend.login.expect(f"ENDED {client.nick} dropped {client.nick} stopped answering heartbeats")


def test_shutdown_tells_irc_users(make_irc_server):
    server = make_irc_server()
    client = irc_user(server)
    server.proc.send_signal(signal.SIGTERM)
    msg = client.expect("NOTICE")
    assert msg.source == "irc.selchat" and "shutting down" in msg.params[1]
    assert "shutdown" in client.expect("ERROR").params[0]
    assert client.msg() is None
    assert server.stop() == 0


def test_irc_over_tls(make_irc_server, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    with open(chain, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    server = make_irc_server("--tls-cert", str(chain), "--tls-key", str(key), "--irc-tls-port", "0")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    server.client_tls = context  # for make_account's selchat-protocol socket
    name = make_account(server)
    client = IrcClient(server.host, server.irc_tls_port, tls=context)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    burst = client.register(name)
    assert burst[0].params[0] == name



# -- settings ------------------------------------------------------------------------------


def test_irc_settings_from_the_environment_and_the_file(tmp_path):
    from selchat.server.options import ConfigError, Loader

    assert Loader(None, {}, {}).load().irc_port is None
    assert Loader(None, {}, {"SELCHAT_IRC_PORT": "6667"}).load().irc_port == 6667
    conf = tmp_path / "selchat.toml"
    conf.write_text("irc_port = 6667\n")
    assert Loader(conf, {}, {}).load().irc_port == 6667
    conf.write_text("irc_port = 70000\n")
    with pytest.raises(ConfigError, match="port number"):
        Loader(conf, {}, {}).load()
    conf.write_text('irc_port = "6667"\n')
    with pytest.raises(ConfigError, match="must be an integer"):
        Loader(conf, {}, {}).load()
    with pytest.raises(ConfigError, match="needs the server's certificate"):
        Loader(None, {"irc_tls_port": 6697}, {}).load()


def test_irc_port_in_use_stops_the_server_at_start(tmp_path):
    import socket
    import subprocess
    import sys

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        done = subprocess.run([sys.executable, "-m", "selchat.cli", "serve", "--port", "0", "--irc-port", str(port),
                               "--db", str(tmp_path / "a.db"), "--scrypt-n", "16"],
                              capture_output=True, text=True, timeout=30)
    finally:
        taken.close()
    assert done.returncode == 1
    assert f"cannot listen on IRC port 127.0.0.1:{port}: Address already in use" in done.stderr


def test_garbage_harms_nobody(srv):
    alice, bob = irc_user(srv), raw_user(srv)
    alice.send(f"PRIVMSG selchat :chat {bob.name}")
    alice.notice()
    bob.login.expect("REQUEST")
    bob.chat.send("ACCEPT")
    bob.login.expect("STARTED")
    alice.notice()
    junk = srv.irc()
    junk.send_bytes(b"\x00\xff\xfe garbage\r\n:\r\n@\r\n" + b"\n" * 1000 + b"NICK \xc3\r\n" + b"x" * 600 + b"\r\n")
    junk.send_bytes(b"AUTHENTICATE PLAIN\r\nAUTHENTICATE ###\r\nCAP FOO\r\nCAP :A B\r\nNICK :a b\r\nNICK ::x\r\n")
    alice.send("WHOIS :a b", "JOIN ::x,#a", "WHO :x y", "MODE :x y")
    alice.expect("401", alice.nick, "*")
    alice.expect("318", alice.nick, "*")
    alice.expect("403", alice.nick, "*")
    alice.expect("403", alice.nick, "#a")
    alice.expect("315", alice.nick, "*")
    alice.expect("502")
    alice.send(f"PRIVMSG {bob.name} :still fine")
    assert bob.login.line() == f"MSG {alice.nick} still fine"
    # what the junk connection heard: numerics, never a crash
    junk.send("QUIT")
    seen = junk.expect_closed()
    assert seen[-1].command == "ERROR"
    assert {m.command for m in seen} <= {"417", "432", "AUTHENTICATE", "904", "410", "ERROR"}
