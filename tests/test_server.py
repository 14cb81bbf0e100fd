"""The server over real loopback sockets, spoken to frame by frame as with nc."""

from __future__ import annotations

import signal
import threading


from tests.support import DEADLINE, RawUser, ServerProcess, rss_kib, start_chat, unique


def test_register_attach_ready_and_who(server):
    alice, bob = RawUser(server), RawUser(server)
    alice.chat.send("WHO")
    lines = []
    while not (line := alice.chat.line()).startswith("OK WHO"):
        lines.append(line)
    users = dict(entry.split()[1:] for entry in lines)
    assert users[alice.name] == "idle" and users[bob.name] == "idle"
    assert line == f"OK WHO {len(users)}"


def test_relay_in_order_both_ways_and_nothing_to_others(server):
    alice, bob, carol = RawUser(server), RawUser(server), RawUser(server)
    start_chat(alice, bob)
    alice.chat.send(*[f"MSG a{i}" for i in range(200)])
    bob.chat.send(*[f"MSG b{i} with  spaces " for i in range(200)])
    assert [bob.login.line() for _ in range(200)] == [f"MSG {alice.name} a{i}" for i in range(200)]
    assert [alice.login.line() for _ in range(200)] == [f"MSG {bob.name} b{i} with  spaces " for i in range(200)]
    # carol saw none of it: the next thing on her login socket is what we send now
    carol.chat.send(f"CHAT {alice.name}")
    assert carol.chat.line() == f"ERR CHAT busy {alice.name} is busy"


def test_quit_ends_chat_for_both_and_message_after_is_nacked(server):
    alice, bob = RawUser(server), RawUser(server)
    start_chat(alice, bob)
    bob.chat.send("QUIT", "MSG too late")
    assert bob.chat.line() == f"OK QUIT {alice.name}"
    assert bob.chat.line() == "NACK 1 not-in-chat you are not in a chat"
    assert alice.login.line() == f"ENDED {bob.name} quit {bob.name} ended the chat"
    assert bob.login.line() == f"ENDED {alice.name} quit you ended the chat"


def test_chat_refusals(server):
    alice, bob, carol = RawUser(server), RawUser(server), RawUser(server)
    offline = unique("off")
    RawUser(server, offline).chat.send("EXIT")
    alice.chat.send(f"CHAT {alice.name.upper()}", "CHAT nobody-has-this-name", f"CHAT {offline}")
    assert alice.chat.line() == "ERR CHAT self you cannot chat with yourself"
    assert alice.chat.line() == "ERR CHAT unknown-user there is no user nobody-has-this-name"
    assert alice.chat.line() == f"ERR CHAT offline {offline} is not online"
    alice.chat.send(f"CHAT {bob.name}")
    alice.chat.expect("OK CHAT")
    carol.chat.send(f"CHAT {bob.name}", f"CHAT {alice.name}")
    assert carol.chat.line() == f"ERR CHAT busy {bob.name} is busy"
    assert carol.chat.line() == f"ERR CHAT busy {alice.name} is busy"
    alice.chat.send(f"CHAT {carol.name}")
    assert alice.chat.line() == f"ERR CHAT pending you already have a pending chat request with {bob.name}"
    bob.chat.send("ACCEPT")
    bob.chat.expect("OK ACCEPT")
    alice.chat.send(f"CHAT {carol.name}")
    assert alice.chat.line() == f"ERR CHAT in-chat you are already chatting with {bob.name}; QUIT first"


def test_decline_and_no_request(server):
    alice, bob = RawUser(server), RawUser(server)
    bob.chat.send("ACCEPT")
    assert bob.chat.line() == "ERR ACCEPT no-request no chat request to answer"
    alice.chat.send(f"CHAT {bob.name}")
    alice.chat.expect("OK CHAT")
    bob.login.expect(f"REQUEST {alice.name}")
    bob.chat.send("DECLINE")
    assert bob.chat.line() == f"OK DECLINE {alice.name}"
    assert alice.login.line() == f"DECLINED {bob.name}"


def test_request_expires_for_both(make_server):
    srv = make_server("--request-timeout", "0.3")
    alice, bob = RawUser(srv), RawUser(srv)
    alice.chat.send(f"CHAT {bob.name}")
    alice.chat.expect("OK CHAT")
    bob.login.expect(f"REQUEST {alice.name}")
    assert alice.login.line() == f"EXPIRED {bob.name}"
    assert bob.login.line() == f"EXPIRED {alice.name}"
    bob.chat.send("ACCEPT")
    assert bob.chat.line() == "ERR ACCEPT no-request no chat request to answer"


def test_exit_closes_all_three_and_partner_is_told(server):
    alice, bob = RawUser(server), RawUser(server)
    start_chat(alice, bob)
    alice.chat.send("EXIT")
    assert alice.chat.expect_closed() == ["OK EXIT"]
    assert alice.login.expect_closed() == ["BYE exit goodbye"]
    assert alice.check.expect_closed() == []
    assert bob.login.line() == f"ENDED {alice.name} left {alice.name} logged out"


def test_wrong_password_and_unknown_user_look_the_same(server):
    alice = RawUser(server)
    sock = server.connect()
    sock.send(f"LOGIN {alice.name} wrong", "LOGIN nosuchuser whatever")
    assert sock.line() == "ERR LOGIN auth-failed invalid username or password"
    assert sock.line() == "ERR LOGIN auth-failed invalid username or password"
    sock.send(f"LOGIN {alice.name} wrong again")
    assert sock.expect_closed() == ["ERR LOGIN auth-failed invalid username or password",
                                    "BYE auth-failed too many failed logins"]


def test_help_before_login_lists_the_login_commands(server):
    """A user typing at a raw socket is told to send HELP: it must answer there
    too, with what can be sent first, and leave the socket ready to log in."""
    name = unique()
    sock = server.connect()
    sock.send("FROB", "HELP")
    assert sock.line() == "ERR FROB unknown-command unknown command FROB; send HELP for the list"
    help_line = sock.line()
    assert help_line.startswith("OK HELP LOGIN <user> <password> | REGISTER <user> <password> ")
    assert "ATTACH CHAT|CHECK <token>" in help_line
    sock.send(f"REGISTER {name} pw")
    sock.expect(f"WELCOME {name} ")
    sock.send("HELP")  # the login socket only receives
    assert sock.line().startswith("ERR HELP wrong-socket ")


def test_registration_refusals(server):
    name = unique()
    sock = server.connect()
    sock.send(f"REGISTER {name} pw", f"REGISTER {name.upper()} pw", "REGISTER bad!name pw",
              f"REGISTER {'x' * 33} pw")
    sock.expect(f"WELCOME {name} ")
    other = server.connect()
    other.send(f"REGISTER {name.upper()} pw", "REGISTER bad!name pw", f"REGISTER {'x' * 33} pw")
    assert other.line().startswith("ERR REGISTER taken ")
    assert other.line().startswith("ERR REGISTER bad-username ")
    assert other.line().startswith("ERR REGISTER bad-username ")


def test_registration_closed(make_server):
    srv = make_server("--no-registration")
    sock = srv.connect()
    sock.send("REGISTER someone pw")
    assert sock.line() == "ERR REGISTER registration-closed registration is closed on this server"


def test_tokens_bad_reused_wrong_role_and_expired(make_server):
    srv = make_server("--attach-timeout", "0.5")
    alice = RawUser(srv, check=False)
    for token in ("", "garbage", "1.", f"{alice.check_token}x", alice.chat_token):
        sock = srv.connect()
        sock.send(f"ATTACH CHECK {token}".rstrip())
        reply = sock.expect_closed()
        assert reply[0].startswith("ERR ATTACH "), (token, reply)
    # the chat token was already used; the check token still works on its own role only
    wrong_role = srv.connect()
    wrong_role.send(f"ATTACH CHAT {alice.check_token}")
    assert wrong_role.expect_closed() == ["ERR ATTACH bad-token invalid or expired token"]
    # nobody attaches the check socket in time: the session ends, the token dies
    assert alice.login.expect_closed() == ["BYE attach-timeout chat and check sockets not attached in time"]
    late = srv.connect()
    late.send(f"ATTACH CHECK {alice.check_token}")
    assert late.expect_closed() == ["ERR ATTACH bad-token invalid or expired token"]


def test_token_of_other_user_refused(server):
    alice = RawUser(server, check=False)
    bob = RawUser(server, check=False)
    sid, secret = alice.check_token.split(".")
    forged = f"{bob.check_token.split('.')[0]}.{secret}"
    sock = server.connect()
    sock.send(f"ATTACH CHECK {forged}")
    assert sock.expect_closed() == ["ERR ATTACH bad-token invalid or expired token"]


def test_frames_on_the_wrong_socket_are_refused_and_change_nothing(server):
    alice = RawUser(server)
    alice.login.send("WHO")
    assert alice.login.line().startswith("ERR WHO wrong-socket ")
    alice.check.send("CHAT someone")
    assert alice.check.line().startswith("ERR CHAT wrong-socket ")
    alice.chat.send("LOGIN x y", "PONG", "FROB", "MSG " + "x" * 5000, "CHAT")
    assert alice.chat.line().startswith("ERR LOGIN wrong-socket ")
    assert alice.chat.line().startswith("ERR PONG wrong-socket ")
    assert alice.chat.line() == "ERR FROB unknown-command unknown command FROB; send HELP for the list"
    assert alice.chat.line() == "NACK 1 too-long frame longer than 4096 bytes"
    assert alice.chat.line() == "ERR CHAT bad-syntax usage: CHAT <user>"
    alice.chat.send("WHO")
    alice.chat.expect("USER ")


def test_bad_encoding_reaches_nobody(server):
    alice, bob = RawUser(server), RawUser(server)
    start_chat(alice, bob)
    alice.chat.send_bytes(b"MSG caf\xc3\n" + b"MSG esc\x1b[2J\n" + b"MSG ok\n")
    assert alice.chat.line() == "NACK 1 bad-encoding frame is not valid UTF-8"
    assert alice.chat.line() == "NACK 2 bad-encoding frame contains control characters"
    assert bob.login.line() == f"MSG {alice.name} ok"


def test_check_socket_ping_pong(server):
    alice = RawUser(server)
    alice.check.send("PING hello 1")
    assert alice.check.line() == "PONG hello 1"


def test_silent_client_is_dropped_and_partner_told(make_server):
    srv = make_server("--ping-interval", "0.3", "--ping-timeout", "0.3")
    alice, bob = RawUser(srv), RawUser(srv)
    start_chat(alice, bob)
    # bob answers PINGs, alice does not
    assert alice.check.line() == "PING 1"
    line = bob.check.line()
    assert line.startswith("PING ")
    bob.check.send("PONG " + line.split()[1])
    assert alice.login.expect_closed() == ["BYE ping-timeout no answer to PING within 0.3 seconds"]
    assert bob.login.line() == f"ENDED {alice.name} dropped {alice.name} stopped answering heartbeats"
    bob.chat.send("WHO")
    assert bob.chat.line() == f"USER {bob.name} idle"


def test_killed_client_ends_chat_for_partner(server):
    alice, bob = RawUser(server), RawUser(server)
    start_chat(alice, bob)
    alice.chat.sock.close()  # any of the three sockets lost ends the session
    assert bob.login.line() == f"ENDED {alice.name} dropped {alice.name} lost connection"
    assert alice.login.expect_closed() == []


def test_second_login_takes_over(server):
    alice, bob = RawUser(server), RawUser(server)
    start_chat(alice, bob)
    again = RawUser(server, alice.name, register=False)
    assert alice.login.expect_closed() == ["BYE replaced logged in from another client"]
    assert alice.chat.expect_closed() == []
    assert bob.login.line() == f"ENDED {alice.name} dropped {alice.name} lost connection"
    bob.chat.send(f"CHAT {again.name}")
    assert bob.chat.line() == f"OK CHAT {again.name}"
    assert again.login.line() == f"REQUEST {bob.name}"


def test_login_deadline_not_extended_by_bytes(make_server):
    srv = make_server("--login-timeout", "0.5")
    sock = srv.connect()
    sock.send_bytes(b"LOG")  # a slowloris trickle does not extend the deadline
    assert sock.expect_closed() == ["BYE timeout no login within 0.5 seconds"]


def test_unterminated_flood_ends_only_that_session(server):
    alice, bob, mallory = RawUser(server), RawUser(server), RawUser(server)
    start_chat(alice, bob)
    try:
        mallory.chat.send_bytes(b"x" * (70 * 1024))
    except OSError:
        pass
    assert mallory.chat.expect_closed() == ["BYE too-long no line ending within 65536 bytes"]
    alice.chat.send("MSG still here")
    assert bob.login.line() == f"MSG {alice.name} still here"


def test_input_before_login_is_capped(server):
    partial = server.connect()
    partial.send_bytes(b"LOGIN x " + b"p" * 9000)  # no line ending yet, under the 64 KiB cap
    assert partial.expect_closed() == ["BYE too-much too much input before login"]
    chatty = server.connect()
    chatty.send(*["FOO"] * 11)
    seen = chatty.expect_closed()
    assert seen[-1] == "BYE too-much too many frames before login"
    assert len(seen) == 11  # ten refusals, then the BYE


def test_slow_reader_pauses_sender_without_loss(make_server):
    """A partner that does not read: the server stops reading from the sender
    instead of buffering without bound, and delivers everything once it reads."""
    server = make_server("--msg-rate", "0")
    alice, bob = RawUser(server), RawUser(server)
    start_chat(alice, bob)
    payload = "y" * 1000
    total = 20_000  # ~20 MB: far beyond socket buffers and the server's high-water mark
    data = b"".join(f"MSG {i} {payload}\n".encode() for i in range(total))
    rss_before = rss_kib(server.proc.pid)
    sender = threading.Thread(target=alice.chat.sock.sendall, args=(data,), daemon=True)
    sender.start()
    # Until bob reads, alice's sendall cannot finish: the server stopped reading her.
    sender.join(2.0)
    assert sender.is_alive(), "server swallowed 20 MB for a partner that does not read"
    grown = rss_kib(server.proc.pid) - rss_before
    assert grown < 8 * 1024, f"server grew by {grown} KiB buffering for a stuck reader"
    for i in range(total):
        line = bob.login.line()
        assert line == f"MSG {alice.name} {i} {payload}", line[:80]
    sender.join(DEADLINE)
    assert not sender.is_alive()


def test_sigterm_tells_everyone_and_exits_zero(make_server):
    srv = make_server()
    alice, bob = RawUser(srv), RawUser(srv)
    start_chat(alice, bob)
    fresh = srv.connect()
    assert srv.stop(signal.SIGTERM) == 0
    alice_seen = alice.login.expect_closed()
    bob_seen = bob.login.expect_closed()
    assert alice_seen == [
        "SHUTDOWN the server is shutting down",
        f"ENDED {bob.name} shutdown the server is shutting down",
        "BYE shutdown the server is shutting down",
    ]
    # Both partners are told the same thing, in the same order.
    assert [line.replace(alice.name, "X") for line in bob_seen] == \
        [line.replace(bob.name, "X") for line in alice_seen]
    assert fresh.expect_closed() == ["BYE shutdown the server is shutting down"]


def test_sigkill_restart_keeps_accounts(tmp_path):
    srv = ServerProcess(tmp_path)
    alice = RawUser(srv)
    srv.proc.kill()
    srv.proc.wait()
    srv2 = ServerProcess(tmp_path, db=srv.db)
    try:
        again = RawUser(srv2, alice.name, register=False)
        assert again.name == alice.name
    finally:
        srv2.stop()


def test_a_user_changes_their_password_with_the_one_they_have(server):
    """PASSWORD <old> <new> on the chat socket (a space in <old> written
    '\\ '): refused with a wrong old password or an unacceptable new one,
    and nothing changes; then the new one logs in and the old one no longer
    does. The session goes on meanwhile."""
    alice = RawUser(server, password="old pass")
    alice.chat.send("PASSWORD wrong new pass")
    alice.chat.expect("ERR PASSWORD auth-failed")
    alice.chat.send("PASSWORD old\\ pass " + "x" * 1025)
    alice.chat.expect("ERR PASSWORD bad-password")
    alice.chat.send("PASSWORD old pass new pass")  # the space ends <old>: "old" is not her password
    alice.chat.expect("ERR PASSWORD auth-failed")
    alice.chat.send("PASSWORD old\\ pass new pass", "WHO")
    alice.chat.expect("OK PASSWORD")
    alice.chat.expect("USER ")  # and the session goes on, in order
    old = server.connect()
    old.send(f"LOGIN {alice.name} old pass")
    old.expect("ERR LOGIN auth-failed")
    again = RawUser(server, alice.name, password="new pass", register=False)
    assert again.name == alice.name


def test_wrong_current_passwords_are_throttled_as_failed_logins_are(server):
    bob = RawUser(server)
    for _ in range(3):
        bob.chat.send("PASSWORD guess new")
        bob.chat.expect("ERR PASSWORD auth-failed")
    bob.chat.send("PASSWORD pw\\ secret new")  # the right one, but too late: not even checked
    bob.chat.expect("ERR PASSWORD throttled ")
    bob.chat.send("UNREGISTER pw secret")  # the same count: not deleted
    bob.chat.expect("ERR UNREGISTER throttled ")
    login = server.connect()
    login.send(f"LOGIN {bob.name} pw secret")
    login.expect("ERR LOGIN throttled ")  # the same count as LOGIN's, for this account from here
    bob.chat.send("WHO")
    bob.chat.expect("USER ")


def test_a_blocked_user_is_declined_across_logins_and_restarts(tmp_path):
    """BLOCK is kept in the account store: after the blocker logs in again,
    and after a restart, the blocked user's CHAT is answered OK, then, after
    a while, DECLINED, and nothing reaches the blocker (the next thing bob
    hears is someone else's request). Blocking a partner ends the chat, as QUIT."""
    srv = ServerProcess(tmp_path, "--request-timeout", "2")  # declined within 1.5 s
    alice, bob, carol = RawUser(srv), RawUser(srv), RawUser(srv)
    start_chat(alice, bob)
    bob.chat.send(f"BLOCK {alice.name.upper()}")
    bob.expect(f"ENDED {alice.name} quit ")
    bob.chat.expect(f"OK BLOCK {alice.name}")  # the registered spelling
    alice.expect(f"ENDED {bob.name} quit ")
    bob.close()
    srv.proc.kill()
    srv.proc.wait()
    srv = ServerProcess(tmp_path, "--request-timeout", "2", db=srv.db)
    try:
        alice = RawUser(srv, alice.name, register=False)
        bob = RawUser(srv, bob.name, register=False)
        carol = RawUser(srv, carol.name, register=False)
        alice.chat.send(f"CHAT {bob.name}")
        alice.chat.expect(f"OK CHAT {bob.name}")
        alice.expect(f"DECLINED {bob.name}")
        srv.wait_for_log(f"request-blocked user={alice.name} target={bob.name} ")  # for the operator
        carol.chat.send(f"CHAT {bob.name}")
        carol.chat.expect(f"OK CHAT {bob.name}")
        assert bob.login.line() == f"REQUEST {carol.name}"  # alice's never came
        bob.chat.send("DECLINE", "BLOCKS")
        bob.chat.expect("OK DECLINE")
        assert bob.chat.line() == f"USER {alice.name} blocked"
        bob.chat.expect("OK BLOCKS 1")
        bob.chat.send(f"UNBLOCK {alice.name}", "BLOCKS")
        bob.chat.expect(f"OK UNBLOCK {alice.name}")
        bob.chat.expect("OK BLOCKS 0")
        start_chat(alice, bob)
    finally:
        srv.stop()


def test_block_refusals(server):
    bob = RawUser(server)
    for line, reply in ((f"BLOCK {bob.name.upper()}", "ERR BLOCK self "),
                        (f"BLOCK {unique('ghost')}", "ERR BLOCK unknown-user "),
                        (f"UNBLOCK {unique('ghost')}", "ERR UNBLOCK not-blocked "),
                        ("BLOCK", "ERR BLOCK bad-syntax "),
                        ("BLOCK a b", "ERR BLOCK bad-syntax "),
                        ("BLOCKS now", "ERR BLOCKS bad-syntax ")):
        bob.chat.send(line)
        bob.chat.expect(reply)
    fresh = server.connect()
    fresh.send(f"BLOCK {bob.name}")
    fresh.expect("ERR BLOCK wrong-socket ")


def test_a_user_deletes_their_account_with_their_password(server):
    """UNREGISTER <password>: refused with a wrong one (the session goes on);
    with the right one the account is gone, the session ends (the partner
    hears that the user left), the name is unknown and then free again."""
    alice, bob = RawUser(server), RawUser(server)
    start_chat(alice, bob)
    alice.chat.send("UNREGISTER pw wrong", "UNREGISTER")
    alice.chat.expect("ERR UNREGISTER auth-failed ")
    alice.chat.expect("ERR UNREGISTER bad-syntax ")
    alice.chat.send("MSG still here")
    bob.expect(f"MSG {alice.name} still here")
    alice.chat.send("UNREGISTER pw secret")
    alice.chat.expect(f"OK UNREGISTER {alice.name}")
    assert alice.login.expect_closed() == ["BYE unregistered your account is deleted"]
    bob.expect(f"ENDED {alice.name} left {alice.name} left")
    bob.chat.send(f"CHAT {alice.name}")
    bob.chat.expect("ERR CHAT unknown-user ")
    sock = server.connect()
    sock.send(f"LOGIN {alice.name} pw secret")
    sock.expect("ERR LOGIN auth-failed ")
    again = RawUser(server, alice.name)  # registered anew: a new account
    assert again.name == alice.name


def test_a_login_racing_an_unregister_leaves_no_session_of_the_deleted_account(make_server):
    """UNREGISTER and a LOGIN of the same account from elsewhere, hashed at
    the same time: whichever finishes first, the account is gone and no
    session of it is left (the login is refused, or its session ends)."""
    srv = make_server("--scrypt-n", "16384")
    alice = RawUser(srv, password="pw")
    other = srv.connect()
    alice.chat.send("UNREGISTER pw")
    other.send(f"LOGIN {alice.name} pw")
    first = other.line()
    if first.startswith("WELCOME "):  # the login won: its session ends with the account
        assert other.expect_closed()[-1] == "BYE unregistered your account is deleted"
    else:
        assert first.startswith("ERR LOGIN auth-failed "), first
    login = srv.connect()
    login.send(f"LOGIN {alice.name} pw")
    login.expect("ERR LOGIN auth-failed ")
