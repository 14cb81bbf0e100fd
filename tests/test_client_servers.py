"""Several servers (``--host a,b``): the list, the failover policy, and how
the session and the first connection follow it. No sockets (the first
connection's are faked), no clocks (a fake one is passed in)."""

from __future__ import annotations

import errno
import ssl

import pytest
from click.testing import CliRunner

from selchat.client import app, command
from selchat.client.core import CHAT, CHECK, LOGIN, Backoff, ClientSession, Phase, Reconnect
from selchat.client.notices import JSON_FIELDS, STDERR_KINDS, Notice
from selchat.client.servers import STABLE_AFTER, Failover, Server, ServerListError, address, parse
from tests.test_client_core import frames, kinds, shown

A, B, C = Server("a", 7117), Server("b", 7200), Server("c", 7117)


# --- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, servers", [
    ("127.0.0.1", [("127.0.0.1", 7117)]),
    ("chat.example.org", [("chat.example.org", 7117)]),
    ("a:7000", [("a", 7000)]),
    ("a:7117,b:7200", [("a", 7117), ("b", 7200)]),
    ("a, b:7200 ,c", [("a", 7117), ("b", 7200), ("c", 7117)]),
    ("[::1]:7000", [("::1", 7000)]),
    ("[::1]", [("::1", 7117)]),
    ("::1", [("::1", 7117)]),                       # a bare IPv6 address is a host: no port
    ("2001:db8::7", [("2001:db8::7", 7117)]),
    ("[fe80::1%eth0]:7000,10.0.0.5", [("fe80::1%eth0", 7000), ("10.0.0.5", 7117)]),
    ("a:7117,a:7117", [("a", 7117), ("a", 7117)]),  # as given
])
def test_parse(text, servers):
    assert parse(text, 7117) == tuple(Server(h, p) for h, p in servers)


@pytest.mark.parametrize("text, error", [
    ("", "no server given"),
    ("  ", "no server given"),
    ("a,,b", "an empty entry in 'a,,b'"),
    ("a,", "an empty entry"),
    ("a:", "'a:': the port must be a number from 1 to 65535"),
    ("a:0", "the port must be a number"),
    ("a:65536", "the port must be a number"),
    ("a:x", "the port must be a number"),
    ("a:-1", "the port must be a number"),
    ("a:٣", "the port must be a number"),           # a digit, but not an ASCII one
    (":7117", "':7117': not a host name or address"),
    ("[]:7117", "not an IPv6 address in the brackets"),
    ("[a.example]:7117", "not an IPv6 address in the brackets"),
    ("[::1]:", "the port must be a number"),
    ("[::1]x", "not HOST, HOST:PORT or [IPv6]:PORT"),
    ("a:b:c", "'a:b:c': not HOST, HOST:PORT or [IPv6]:PORT"),
    ("a b:7117", "not a host name or address"),
    ("a]:7117", "not a host name or address"),
])
def test_parse_refuses(text, error):
    with pytest.raises(ServerListError) as err:
        parse(text, 7117)
    assert error in str(err.value)


def test_servers_are_written_as_they_are_given():
    assert str(Server("a", 7117)) == "a:7117" == address("a", 7117)
    assert str(Server("::1", 7000)) == "[::1]:7000"
    assert Server("a", 1) == ("a", 1)   # still a (host, port) pair for the socket calls


# --- the policy ----------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_rounds_go_in_the_given_order():
    f = Failover([A, B, C])
    assert f.target == A
    assert f.failed() is False and f.target == B
    assert f.failed() is False and f.target == C
    assert f.failed() is True and f.target == A          # a whole round: wait, then from the first again
    assert f.failed() is False and f.target == B


def test_the_client_sticks_to_the_server_that_answered():
    clock = Clock()
    f = Failover([A, B, C], clock)
    f.failed()
    f.connected()
    assert f.server == B
    f.online()
    clock.now += STABLE_AFTER
    assert f.lost() is True and f.target == B            # the same one first, at once
    assert f.failed() is False and f.target == C         # then the next ones, at once,
    assert f.failed() is False and f.target == A         # wrapping around
    assert f.failed() is True and f.target == B          # a round from the current server, after a wait


def test_a_connection_that_did_not_last_waits_before_its_first_attempt():
    clock = Clock()
    f = Failover([A, B], clock)
    f.connected()
    f.online()
    clock.now += STABLE_AFTER - 0.1
    assert f.lost() is False and f.target == A           # the backoff first: no loop without pause
    assert f.failed() is False and f.target == B         # the rest of the round still at once


def test_one_server_always_waits_as_before():
    clock = Clock()
    f = Failover([A], clock)
    f.connected()
    f.online()
    clock.now += 1000
    assert f.lost() is False and f.target == A
    assert f.failed() is True and f.target == A
    assert not f.several


def test_a_server_that_answered_but_gave_no_session_is_current_for_the_next_round():
    clock = Clock()
    f = Failover([A, B, C], clock)
    f.connected()
    f.online()
    clock.now += 60
    assert f.lost() and f.target == A
    assert not f.failed() and f.target == B
    f.connected()                                        # B's login socket opened...
    assert not f.failed() and f.target == C              # ...but no session ("busy"): on to C
    assert f.failed() and f.target == B                  # the next round starts at B, the last to answer


def test_no_servers_is_an_error():
    with pytest.raises(ValueError):
        Failover([])


# --- the session follows it ------------------------------------------------------------------------


def session_on(servers: Failover) -> tuple[ClientSession, list]:
    """A session (reconnecting on) whose first login socket went to
    ``servers.target``, online; and the effects of its ``start()``."""
    s = ClientSession("alice", "secret", reconnect=True, backoff=Backoff(rng=lambda: 0.0), servers=servers)
    effects = s.start()
    s.receive(LOGIN, frames("HELLO 1 x", "WELCOME alice ctok ktok"))
    s.receive(CHAT, frames("OK ATTACH CHAT"))
    s.receive(CHECK, frames("OK ATTACH CHECK"))
    s.receive(LOGIN, frames("READY alice"))
    assert s.online
    return s, effects


def reconnects(effects) -> list[Reconnect]:
    return [e for e in effects if isinstance(e, Reconnect)]


def log_in_again(s: ClientSession) -> list:
    effects = s.start()
    effects += s.receive(LOGIN, frames("HELLO 1 x", "WELCOME alice c2 k2"))
    effects += s.receive(CHAT, frames("OK ATTACH CHAT"))
    effects += s.receive(CHECK, frames("OK ATTACH CHECK"))
    effects += s.receive(LOGIN, frames("READY alice"))
    return effects


def test_a_node_that_dies_is_left_for_the_next_at_once():
    clock = Clock()
    f = Failover([A, B], clock)
    s, started = session_on(f)
    assert shown(started) == ["connected to a:7117"]
    clock.now += STABLE_AFTER
    effects = s.receive(LOGIN, b"")
    assert shown(effects) == ["connection lost: the server closed the login socket",
                              "reconnecting in 0.0 s (attempt 1): the server closed the login socket"]
    assert reconnects(effects) == [Reconnect(0.0, A)]           # the same node first, at once
    effects = s.reconnect_failed("Connection refused")
    assert shown(effects) == ["reconnecting in 0.0 s (attempt 2): a:7117: Connection refused"]
    assert reconnects(effects) == [Reconnect(0.0, B)]           # then the next, at once
    assert s.backoff.attempt == 0                                 # no backoff spent yet
    effects = log_in_again(s)
    assert shown(effects) == ["connected to b:7200", "reconnected: logged in as alice; not in a chat"]
    assert f.server == B and s.attempt == 0
    clock.now += STABLE_AFTER
    assert reconnects(s.receive(LOGIN, b"")) == [Reconnect(0.0, B)]   # sticks to B now


def test_the_backoff_is_waited_only_after_a_whole_round():
    clock = Clock()
    f = Failover([A, B, C], clock)
    s, _ = session_on(f)
    clock.now += STABLE_AFTER
    s.lost("login socket: reset")
    assert reconnects(s.reconnect_failed("refused")) == [Reconnect(0.0, B)]
    assert reconnects(s.reconnect_failed("refused")) == [Reconnect(0.0, C)]
    effects = s.reconnect_failed("refused")
    assert reconnects(effects) == [Reconnect(0.5, A)] and s.backoff.attempt == 1
    assert shown(effects) == ["reconnecting in 0.5 s (attempt 4): c:7117: refused"]
    assert reconnects(s.reconnect_failed("refused")) == [Reconnect(0.0, B)]
    assert reconnects(s.reconnect_failed("refused")) == [Reconnect(0.0, C)]
    assert reconnects(s.reconnect_failed("refused")) == [Reconnect(1.0, A)] and s.attempt == 7


def test_a_connection_lost_before_the_session_is_back_is_a_failed_attempt():
    clock = Clock()
    f = Failover([A, B], clock)
    s, _ = session_on(f)
    clock.now += STABLE_AFTER
    s.lost("reset")                                             # -> A at once
    s.start()                                                   # A's login socket opened...
    effects = s.receive(LOGIN, b"")                             # ...and closed before READY
    assert reconnects(effects) == [Reconnect(0.0, B)]
    s.start()
    effects = s.receive(LOGIN, b"")                             # B too: the round is over
    assert reconnects(effects) == [Reconnect(0.5, B)]           # B answered last: it is current


def test_a_server_that_says_not_now_is_left_for_the_next():
    clock = Clock()
    f = Failover([A, B], clock)
    s, _ = session_on(f)
    clock.now += STABLE_AFTER
    s.lost("reset")
    s.start()
    effects = s.receive(LOGIN, frames("HELLO 1 x", "ERR LOGIN busy the server is busy"))
    assert kinds(effects) == ["login-failed", "reconnecting"]
    assert reconnects(effects) == [Reconnect(0.0, B)]


def test_a_session_unknown_to_the_next_node_logs_in_afresh_there():
    clock = Clock()
    f = Failover([A, B], clock)
    s = ClientSession("alice", "secret", reconnect=True, backoff=Backoff(rng=lambda: 0.0), servers=f)
    s.start()
    s.receive(LOGIN, frames("HELLO 2 x", "OK VERSION 2", "WELCOME alice ctok ktok tok.en"))
    s.receive(CHAT, frames("OK ATTACH CHAT"))
    s.receive(CHECK, frames("OK ATTACH CHECK"))
    s.receive(LOGIN, frames("READY alice"))
    clock.now += STABLE_AFTER
    assert reconnects(s.receive(LOGIN, b"")) == [Reconnect(0.0, A)]
    assert reconnects(s.reconnect_failed("Connection refused")) == [Reconnect(0.0, B)]
    effects = s.start()
    assert shown(effects) == ["connected to b:7200"]
    effects = s.receive(LOGIN, frames("HELLO 2 x", "ERR RESUME unknown-session no such session"))
    assert [e.data for e in effects if hasattr(e, "data")] == [b"VERSION 2\n", b"LOGIN alice secret\n"]
    s.receive(LOGIN, frames("OK VERSION 2", "WELCOME alice c2 k2 tok.two"))
    s.receive(CHAT, frames("OK ATTACH CHAT"))
    s.receive(CHECK, frames("OK ATTACH CHECK"))
    effects = s.receive(LOGIN, frames("READY alice"))
    assert shown(effects) == ["reconnected: logged in as alice; not in a chat"]
    assert f.server == B and s.phase is Phase.IDLE


def test_with_one_server_nothing_changes():
    clock = Clock()
    f = Failover([A], clock)
    s, started = session_on(f)
    assert shown(started) == []                                 # no "connected" line
    clock.now += 1000
    effects = s.receive(LOGIN, b"")
    assert shown(effects)[-1] == "reconnecting in 0.5 s (attempt 1): the server closed the login socket"
    assert reconnects(effects) == [Reconnect(0.5, A)]
    effects = s.reconnect_failed("Connection refused")
    assert shown(effects) == ["reconnecting in 1.0 s (attempt 2): Connection refused"]   # no server named


def test_connected_is_documented_and_goes_to_stderr_in_scripted_mode():
    notice = Notice("connected", text="b:7200")
    assert notice.line() == "connected to b:7200" and notice.fields() == {"server": "b:7200"}
    assert "connected" in STDERR_KINDS and "connected" in JSON_FIELDS


# --- the first connection ---------------------------------------------------------------------------


class FakeSockets:
    """``socket.create_connection`` for ``open_login_socket``: each server's
    outcomes in turn (an exception, or "ok")."""

    def __init__(self, outcomes: dict[Server, list]):
        self.outcomes = {server: list(results) for server, results in outcomes.items()}
        self.calls: list = []

    def __call__(self, address, timeout=None):
        self.calls.append(tuple(address))
        result = self.outcomes[Server(*address)].pop(0)
        if isinstance(result, BaseException):
            raise result
        return f"socket to {Server(*address)}"


def refused() -> OSError:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


def first_connection(monkeypatch, servers, outcomes, retries=0, ask_retry=None, tls=None):
    fake = FakeSockets(outcomes)
    monkeypatch.setattr(app.socket, "create_connection", fake)
    shown_, slept = [], []
    f = Failover(servers)
    sock = app.open_login_socket(f, retries, shown_.append, ask_retry, sleep=slept.append, tls=tls)
    return sock, f, [n.line() for n in shown_], slept, fake.calls


def test_the_first_connection_passes_over_a_dead_server_at_once(monkeypatch):
    sock, f, lines, slept, calls = first_connection(monkeypatch, [A, B], {A: [refused()], B: ["ok"]})
    assert sock == "socket to b:7200" and f.target == B
    assert lines == ["cannot reach a:7117: Connection refused"] and slept == []
    assert calls == [("a", 7117), ("b", 7200)]


def test_retries_are_rounds_of_every_server(monkeypatch):
    sock, f, lines, slept, calls = first_connection(
        monkeypatch, [A, B], {A: [refused(), refused(), "ok"], B: [refused(), refused()]}, retries=2)
    assert sock == "socket to a:7117"
    assert calls == [("a", 7117), ("b", 7200)] * 2 + [("a", 7117)]
    assert slept == [1.0, 2.0]
    assert lines == ["cannot reach a:7117: Connection refused", "cannot reach b:7200: Connection refused",
                     "retrying in 1 s",
                     "cannot reach a:7117: Connection refused", "cannot reach b:7200: Connection refused",
                     "retrying in 2 s"]


def test_no_server_at_all_gives_up_after_the_rounds(monkeypatch):
    sock, _, lines, slept, calls = first_connection(monkeypatch, [A, B], {A: [refused()] * 2, B: [refused()] * 2},
                                                    retries=1)
    assert sock is None and slept == [1.0] and len(calls) == 4
    asked = []
    sock, *_ = first_connection(monkeypatch, [A, B], {A: [refused(), "ok"], B: [refused()]},
                                ask_retry=lambda: asked.append(1) or True)
    assert sock == "socket to a:7117" and asked == [1]


def test_a_tls_failure_on_one_server_passes_over_it_but_not_when_all_fail_so(monkeypatch):
    def untrusted() -> ssl.SSLError:
        err = ssl.SSLCertVerificationError(1, "certificate verify failed")
        err.verify_message = "unable to get local issuer certificate"
        return err

    handshakes = {}   # host -> outcomes of its handshakes, in turn

    def handshake(sock, ctx, host, timeout):
        result = handshakes[host].pop(0)
        if isinstance(result, BaseException):
            raise result
        return sock

    monkeypatch.setattr(app.clienttls, "handshake", handshake)
    handshakes.update(a=[untrusted()], b=["ok"])
    sock, _, lines, _, _ = first_connection(monkeypatch, [A, B], {A: ["ok"], B: ["ok"]}, retries=3, tls=object())
    assert sock == "socket to b:7200" and handshakes == {"a": [], "b": []}   # each checked for its own host
    assert lines == ["cannot reach a:7117: TLS: certificate verify failed: unable to get local issuer certificate"]
    handshakes.update(a=[untrusted()], b=[untrusted()])
    sock, _, lines, slept, calls = first_connection(monkeypatch, [A, B], {A: ["ok"], B: ["ok"]}, retries=3,
                                                    tls=object())
    assert sock is None and slept == [] and len(calls) == 2     # no retry mends that: exit 2 at once
    handshakes.update(a=[untrusted(), "ok"])
    sock, _, _, slept, _ = first_connection(monkeypatch, [A, B], {A: ["ok", "ok"], B: [refused()]},
                                            retries=3, tls=object())
    assert sock == "socket to a:7117" and slept == [1.0]          # B might come back: another round


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture
def connect(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(command.app, "run", lambda settings, ui, ask_retry=None: calls.append(settings) or 0)
    monkeypatch.setattr(command, "_is_interactive", lambda: False)

    def invoke(*args, env=None):
        base = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "SELCHAT_CONFIG": None,
                "SELCHAT_HOST": None, "SELCHAT_PORT": None, "SELCHAT_PASSWORD": "pw", "SELCHAT_USER": "alice"}
        calls.clear()
        result = CliRunner().invoke(command.connect, list(args), env={**base, **(env or {})})
        return result.exit_code, (calls[0] if calls else None), result.output

    invoke.config = tmp_path / "xdg" / "selchat" / "config.toml"
    return invoke


def test_host_lists_from_the_command_line_env_and_config(connect):
    _, settings, _ = connect("--host", "a:7117,b", "--port", "7200")
    assert settings.servers == (Server("a", 7117), Server("b", 7200)) and settings.host == "a:7117,b"
    _, settings, _ = connect(env={"SELCHAT_HOST": "[::1]:7000,c", "SELCHAT_PORT": "7001"})
    assert settings.servers == (Server("::1", 7000), Server("c", 7001))
    connect.config.parent.mkdir(parents=True)
    connect.config.write_text('host = "x.example:7300, y.example"\n')
    _, settings, _ = connect()
    assert settings.servers == (Server("x.example", 7300), Server("y.example", 7117))
    _, settings, _ = connect("--port", "7400")
    assert settings.servers == (Server("x.example", 7300), Server("y.example", 7400))
    _, settings, _ = connect()
    assert settings.server_list() == settings.servers


def test_one_host_is_one_server_as_before(connect):
    _, settings, _ = connect()
    assert (settings.host, settings.port, settings.servers) == ("127.0.0.1", 7117, (Server("127.0.0.1", 7117),))
    _, settings, _ = connect("--host", "::1")
    assert settings.servers == (Server("::1", 7117),)


def test_a_bad_host_list_is_a_usage_error(connect):
    code, settings, output = connect("--host", "a:7117,,b")
    assert code == 1 and settings is None
    assert output.strip() == "error: --host: an empty entry in 'a:7117,,b'"
    code, settings, output = connect(env={"SELCHAT_HOST": "a:99999"})
    assert code == 1 and settings is None and "the port must be a number from 1 to 65535" in output


def test_help_says_how_to_list_servers():
    output = " ".join(CliRunner().invoke(command.connect, ["--help"]).output.split())
    assert "--host HOST[,HOST...]" in output
    assert "comma-separated, each HOST, HOST:PORT or [IPv6]:PORT" in output
    assert "for --host entries without one" in output
    assert "With several servers" in output


def test_a_node_that_drops_clients_at_once_is_not_retried_in_a_loop():
    clock = Clock()
    f = Failover([A, B], clock)
    s, _ = session_on(f)
    assert reconnects(s.receive(LOGIN, b"")) == [Reconnect(0.5, A)]   # online for no time: the backoff first
    log_in_again(s)
    clock.now += 1.0
    assert reconnects(s.receive(LOGIN, b"")) == [Reconnect(0.5, A)]   # and again: never a loop without pause


# --- the terminal's status line ---------------------------------------------------------------------


class FakeClient:
    def __init__(self, server, wait=None):
        self.server, self.tls, self._wait = server, None, wait

    def reconnect_in(self):
        return self._wait


def test_the_status_line_names_the_server_in_use_and_the_next_one():
    from selchat.client.interactive import status_text

    clock = Clock()
    s, _ = session_on(Failover([Server("::1", 7000), B], clock))
    assert "connected to [::1]:7000 · idle" in status_text(s, FakeClient(Server("::1", 7000)), width=200)
    clock.now += STABLE_AFTER
    s.receive(LOGIN, b"")
    s.reconnect_failed("Connection refused")
    line = status_text(s, FakeClient(Server("::1", 7000), wait=None), width=200)
    assert "reconnecting to b:7200 (attempt 2)" in line
    single, _ = session_on(Failover([A]))
    single.receive(LOGIN, b"")
    assert "offline, reconnecting in 1 s (attempt 1)" in status_text(single, FakeClient(A, wait=0.4), width=200)
