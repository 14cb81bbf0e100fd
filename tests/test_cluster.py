"""The cluster, ``selchat serve --cluster redis://...``, over real sockets and real processes.

Several nodes share one Redis (tests/clusterharness.py starts them); what a
user sees must not change: the protocol (docs/protocol.md) is the same, and
every reply and event is the one a single server gives. Most tests here say
that by running one **scenario** twice, once with its users spread over
the nodes of a cluster and once with all of them on one plain server (the
``reference``), and comparing what each user's sockets received, frame by
frame, with the user names replaced by roles. The scenario itself expects
each frame as it goes, so a cluster that goes wrong fails at the first
wrong frame, with its text.

Presence may take a moment to spread (a user who just got READY on one
node is not yet known to another); a scenario that asks for someone on
another node waits first, with a deadline, until WHO on the asking node
lists that user in the state the step needs. Nothing waits by sleeping: every
wait is for a condition, with a deadline; "nothing more arrives" is a bounded
quiet wait.

The module's shared cluster has three nodes (CLUSTER_ARGS: a request expires
after 2 s); the tests that kill a node or stop Redis start a cluster of
their own. SELCHAT_TEST_CLUSTER_MODE=single runs every test that does not
need real nodes against one plain server playing all of them (to check the
tests themselves); see tests/clusterharness.py.
"""

from __future__ import annotations

import itertools
import json
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request

import pytest

from tests.clusterharness import ALL, CLUSTER_ARGS, cluster, make_cluster, require_cluster_mode  # noqa: F401
from tests.test_admin import admin
from tests.support import DEADLINE, LineSocket, RawUser, ServerProcess, V2User, unique

PASSWORD = "pw secret"  # RawUser's and V2User's default

#: Spec: a killed node's users leave WHO elsewhere, and their partners hear
#: ENDED, within this (seconds, from the SIGKILL).
NODE_DEATH_LIMIT = 8.0
#: Spec: how long Redis stays stopped in the fencing test; the node's lease is 5 s.
REDIS_PAUSE = 10.0
#: A Redis lapse this much shorter than the lease must end no session.
SHORT_LAPSE = 1.5
#: Spec: after Redis is back, logins work again "within ~10 s".
RECOVERY_LIMIT = 12.0
#: Racing logins of one account.
RACERS = 100


# -- failure reports ----------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _node_logs_on_failure(request):
    """When a test fails, show what the nodes logged during it (straight to the
    terminal: the report of a failed call does not carry teardown output)."""
    marks = {id(c): c.log_marks() for c in ALL if c.alive()}
    before = len(ALL)
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        return
    shown = [c for c in ALL if id(c) in marks] + ALL[before:]
    text = "\n".join(f"\n=== {request.node.name}: {c!r}\n{c.logs_since(marks.get(id(c)))}" for c in shown)
    if not text:
        return
    capman = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capman.global_and_fixture_disabled():
            sys.stderr.write(text + "\n")
    except Exception:  # pragma: no cover - capture plugin off or changed
        sys.stderr.write(text + "\n")


# -- sockets --------------------------------------------------------------------------------

def quiet_line(sock: LineSocket, wait: float) -> str | None:
    """The next frame, or None if none comes within ``wait`` seconds."""
    try:
        return sock.line(timeout=wait)
    except AssertionError:
        return None


def silence(socks: dict[str, LineSocket], wait: float) -> list[str]:
    """What arrives on any of ``socks`` (label -> socket) within ``wait``
    seconds: [] if nothing, else the first frame seen (or ``<closed>``)."""
    deadline = time.monotonic() + wait
    for label, sock in socks.items():
        if sock.lines or sock.eof:
            return [f"{label}: {sock.line(0.1) or '<closed>'}"]
    sel = selectors.DefaultSelector()
    try:
        for label, sock in socks.items():
            if sock.sock.fileno() >= 0:
                sel.register(sock.sock, selectors.EVENT_READ, label)
        while (remaining := deadline - time.monotonic()) > 0 and sel.get_map():
            for key, _ in sel.select(remaining):
                label = key.data
                try:
                    line = socks[label].line(timeout=1.0)
                except AssertionError:
                    return [f"{label}: part of a frame {socks[label].buf!r}"]
                return [f"{label}: {line if line is not None else '<closed>'}"]
    finally:
        sel.close()
    return []


def who(chat: LineSocket) -> list[tuple[str, str]] | str:
    """WHO on a chat socket: [(name, state), ...] as listed, or the ERR line."""
    chat.send("WHO")
    entries = []
    while True:
        line = chat.line()
        assert line is not None, f"the chat socket closed during WHO (after {entries})"
        if line.startswith("USER "):
            _, name, state = line.split(" ")
            assert state in ("idle", "busy"), line
            entries.append((name, state))
        elif line.startswith("OK WHO "):
            count = int(line.split()[2])
            assert count == len(entries), f"{line!r} after {len(entries)} USER lines"
            keys = [name.lower() for name, _ in entries]
            assert keys == sorted(keys), f"WHO not sorted by name: {entries}"
            return entries
        elif line.startswith("ERR WHO "):
            return line
        else:
            raise AssertionError(f"{line!r} in a WHO reply (after {entries})")


def listed(entries, name: str) -> list[str]:
    """The states ``name`` is listed with (one per listing; [] if absent)."""
    return [state for n, state in entries if n == name]


_sources = itertools.count(1)


def fresh_source() -> str:
    """A loopback address not used before in this run (127.10.x.y): the
    server throttles logins per address and account, and counts a LOGIN
    as a failure while it waits."""
    n = next(_sources)
    return f"127.10.{n // 250}.{1 + n % 250}"


class Login:
    """A v1 session opened by hand, from a given source address (what RawUser
    does, without asserting on the answer)."""

    v2 = False

    def __init__(self, server: ServerProcess, name: str, source: str | None = None, timeout: float = DEADLINE,
                 attach: bool = True, node: int | None = None, label: str | None = None):
        self.name, self.node, self.label = name, node, label or name
        self.chat = self.check = None
        self.login = LineSocket(server.host, server.port, source=source)
        self.login.send(f"LOGIN {name} {PASSWORD}")
        self.answer = self.login.line(timeout)
        if not attach or self.answer is None or not self.answer.startswith("WELCOME "):
            return
        _, self.name, chat_token, check_token = self.answer.split()
        self.chat = LineSocket(server.host, server.port, source=source)
        self.chat.send(f"ATTACH CHAT {chat_token}")
        self.chat.expect("OK ATTACH CHAT")
        self.check = LineSocket(server.host, server.port, source=source)
        self.check.send(f"ATTACH CHECK {check_token}")
        self.check.expect("OK ATTACH CHECK")
        self.login.expect(f"READY {self.name}")

    @property
    def ok(self) -> bool:
        return self.chat is not None

    def close(self) -> None:
        for s in (self.login, self.chat, self.check):
            if s is not None:
                s.close()


# -- WHO as each node sees it ---------------------------------------------------------------

class View:
    """WHO as each node answers it: an idle version 1 watcher per node asks.
    ``servers`` is read at each call, so nodes added later are seen."""

    def __init__(self, servers: list):
        self.servers = servers
        self.watchers: dict[int, RawUser] = {}

    def who(self, node: int):
        watcher = self.watchers.get(node)
        if watcher is None:
            watcher = self.watchers[node] = RawUser(self.servers[node], name=unique("watch"))
        return who(watcher.chat)

    def until(self, check, nodes=None, timeout: float = DEADLINE, what: str = "the condition") -> dict:
        """Poll WHO on each of ``nodes`` (default: every node) until
        ``check(entries)`` holds there; the last lists, by node."""
        pending = set(range(len(self.servers)) if nodes is None else nodes)
        deadline = time.monotonic() + timeout
        last = {}
        while True:
            for node in sorted(pending):
                last[node] = entries = self.who(node)
                if not isinstance(entries, str) and check(entries):
                    pending.discard(node)
            if not pending:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not on node(s) {sorted(pending)} within {timeout} s; "
                                     f"last WHO by node: {last}")
            time.sleep(0.05)  # polling interval; the condition ends the wait

    def agree(self, timeout: float = DEADLINE) -> list:
        """Poll until every node gives the same WHO list; that list."""
        deadline = time.monotonic() + timeout
        while True:
            lists = [self.who(node) for node in range(len(self.servers))]
            if all(not isinstance(x, str) for x in lists) and all(x == lists[0] for x in lists):
                return lists[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"the nodes' WHO lists still differ after {timeout} s: {lists}")
            time.sleep(0.05)  # polling interval; the condition ends the wait

    def close(self) -> None:
        for watcher in self.watchers.values():
            watcher.close()


def shows(expected: dict[str, str | None]):
    """A WHO check: each name listed exactly once in its state (None: not listed)."""
    def check(entries) -> bool:
        return all(listed(entries, name) == ([] if state is None else [state])
                   for name, state in expected.items())
    return check


# -- scenarios: the same steps on a cluster and on one server -------------------------------

class Place:
    """Where a scenario runs: ``servers[i]`` is node i (the same plain server
    for every i, for the reference). Users made here are labelled with a
    role; what their sockets receive through ``expect``/``closed`` goes into
    ``seen``; ``transcript()`` gives it with each user name replaced by
    ``<role>``, so that the two runs compare."""

    def __init__(self, servers: list):
        self.servers = servers
        self.view = View(servers)
        self.users: list = []
        self.placeholders: dict[str, str] = {}   # user name -> "<role>"
        self.seen: list[str] = []

    # -- users --
    def name(self, role: str) -> str:
        """A fresh user name standing for ``role`` (no account is made)."""
        name = unique(role)
        self.placeholders[name] = f"<{role}>"
        return name

    def user(self, role: str, node: int, v2: bool = False, name: str | None = None,
             register: bool = True, label: str | None = None):
        """A user logged in on ``node`` (READY read), version 1 or 2; ``name``
        to log in to an existing account (another session of it: give a
        ``label`` to tell the sessions apart in the transcript)."""
        name = name or self.name(role)
        self.placeholders.setdefault(name, f"<{role}>")
        server = self.servers[node]
        user = V2User(server.connect, name=name, register=register) if v2 else \
            RawUser(server, name=name, register=register)
        user.node, user.v2, user.label = node, v2, label or role
        self.users.append(user)
        return user

    def account(self, role: str, node: int) -> str:
        """An account that exists but is not logged in (registered, then EXIT)."""
        user = self.user(role, node)
        user.chat.send("EXIT")
        self.expect(user, "chat", "OK EXIT")
        self.expect(user, "login", "BYE exit ")
        self.closed(user, "login")
        return user.name

    # -- what sockets receive --
    def _record(self, user, sock: str, line: str) -> None:
        self.seen.append(f"{user.label}.{sock}: {line}")

    def expect(self, user, sock: str, prefix: str, exact: str | None = None, timeout: float = DEADLINE) -> str:
        """The next frame on ``user``'s ``sock`` ("login", "chat", "check"), which
        must start with ``prefix`` (and be ``exact``, if given); recorded. A
        version 2 user's login frames are counted as events; its RECEIVED
        receipts on the chat socket come when the server's batching says, so
        they are skipped (and not recorded)."""
        if sock == "login" and user.v2:
            line = user.expect(prefix, timeout)
        else:
            s = getattr(user, sock)
            while True:
                line = s.expect("", timeout)
                if not (user.v2 and sock == "chat" and line.startswith("RECEIVED ")):
                    break
            assert line.startswith(prefix), f"{user.label}.{sock}: expected {prefix!r}, got {line!r}"
        if exact is not None:
            assert line == exact, f"{user.label}.{sock}: expected {exact!r}, got {line!r}"
        self._record(user, sock, line)
        return line

    def closed(self, user, sock: str, timeout: float = DEADLINE) -> None:
        """Read ``sock`` until the server closes it; records the frames on the way."""
        frames = getattr(user, sock).expect_closed(timeout)
        self._record(user, sock, f"closed after {frames}")

    def delivered(self, user, first: int, last: int) -> None:
        """A version 2 sender's DELIVERED receipts for ``first``..``last``:
        one or several ranges, in order, each following on (how a server
        splits them is its business); recorded as one."""
        upto = first - 1
        while upto < last:
            line = user.expect("DELIVERED ")
            a, b = map(int, line.split()[1:3])
            assert a == upto + 1 and b <= last, f"{user.label}: {line!r} after {upto} (want up to {last})"
            upto = b
        self._record(user, "login", f"DELIVERED {first}..{last}")

    def received(self, user, seq: int) -> None:
        """Read a version 2 user's chat socket until RECEIVED covers ``seq`` (not recorded)."""
        while True:
            line = user.chat.expect("RECEIVED ")
            if int(line.split()[1]) >= seq:
                return

    def note(self, text: str) -> None:
        self.seen.append(text)

    def quiet(self, *users, wait: float = 0.3) -> None:
        """Nothing more arrives on these users' login and chat sockets (a v2
        user's RECEIVED receipts aside) within ``wait``."""
        socks = {}
        for user in users:
            socks[f"{user.label}.login"] = user.login
            if not user.v2:
                socks[f"{user.label}.chat"] = user.chat
        extra = silence(socks, wait)
        assert extra == [], f"unexpected: {extra}"

    # -- presence --
    def visible(self, node: int, user, state: str = "idle") -> None:
        """Wait until WHO on ``node`` lists ``user`` once, in ``state``."""
        self.view.until(shows({user.name: state}), [node], what=f"{user.label} {state} on node {node}")

    def everywhere(self, expected: dict, nodes=None) -> dict:
        """Wait until WHO on every node (or ``nodes``) shows ``expected``
        (user or name -> state, None for "not listed")."""
        names = {getattr(k, "name", k): v for k, v in expected.items()}
        return self.view.until(shows(names), nodes, what=f"WHO showing {names}")

    # -- common steps --
    def chat(self, a, b) -> None:
        """``a`` asks ``b``, ``b`` accepts: both STARTED (recorded)."""
        self.visible(a.node, b)
        a.chat.send(f"CHAT {b.name}")
        self.expect(a, "chat", "OK CHAT ")
        self.expect(b, "login", "REQUEST ")
        b.chat.send("ACCEPT")
        self.expect(b, "chat", "OK ACCEPT ")
        self.expect(a, "login", "STARTED ")
        self.expect(b, "login", "STARTED ")

    def transcript(self) -> list[str]:
        if not self.placeholders:
            return list(self.seen)
        pattern = re.compile(r"(?<![A-Za-z0-9_-])(" + "|".join(
            re.escape(n) for n in sorted(self.placeholders, key=len, reverse=True)) + r")(?![A-Za-z0-9_-])")
        return [pattern.sub(lambda m: self.placeholders[m.group(1)], line) for line in self.seen]

    def close(self) -> None:
        """Log everyone out: EXIT for version 2 users (a dropped one would be
        kept for RESUME), closed sockets for the rest."""
        for user in self.users:
            try:
                if user.v2 and not user.login.eof:
                    user.chat.send("EXIT")
                    user.login.expect_closed(2.0)
            except (OSError, AssertionError):
                pass
            for s in (user.login, user.chat, user.check):
                if s is not None:
                    s.close()
        self.view.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One plain server (no --cluster) with the cluster's options: what a single server says."""
    srv = ServerProcess(tmp_path_factory.mktemp("reference"), *CLUSTER_ARGS)
    yield srv
    srv.stop()


@pytest.fixture
def spread(cluster):
    """A scenario's users on the nodes of the shared cluster."""
    place = Place(cluster.nodes)
    yield place
    place.close()


@pytest.fixture
def alone(reference):
    """The same scenario's users all on the reference server."""
    place = Place([reference] * 3)
    yield place
    place.close()


def same_as_one_server(scenario, spread, alone):
    """Run ``scenario`` on the cluster, then on the reference; the transcripts must match."""
    got = scenario(spread)
    want = scenario(alone)
    if got != want:
        diff = [f"{i}: cluster {g!r}\n{' ' * len(str(i))}  server  {w!r}"
                for i, (g, w) in enumerate(itertools.zip_longest(got, want)) if g != w]
        raise AssertionError("the cluster's frames differ from one server's:\n" + "\n".join(diff[:20]))
    return got


# -- WHO --------------------------------------------------------------------------------------

def test_who_on_every_node_lists_the_users_of_all_nodes_with_their_state(spread):
    p = spread
    alice, bob, carol, dave = p.user("alice", 0), p.user("bob", 1), p.user("carol", 2), p.user("dave", 0)
    p.everywhere({alice: "idle", bob: "idle", carol: "idle", dave: "idle"})
    assert p.view.agree()  # the same list, sorted by name, on every node
    p.chat(alice, bob)  # across nodes 0 and 1
    p.everywhere({alice: "busy", bob: "busy", carol: "idle", dave: "idle"})
    p.visible(2, dave)
    carol.chat.send(f"CHAT {dave.name}")  # a pending request makes both busy
    p.expect(carol, "chat", "OK CHAT ")
    p.expect(dave, "login", "REQUEST ")
    p.everywhere({alice: "busy", bob: "busy", carol: "busy", dave: "busy"})
    dave.chat.send("DECLINE")
    p.expect(dave, "chat", "OK DECLINE ")
    p.expect(carol, "login", "DECLINED ")
    p.everywhere({carol: "idle", dave: "idle"})
    alice.chat.send("QUIT")
    p.expect(alice, "chat", "OK QUIT ")
    p.everywhere({alice: "idle", bob: "idle"})
    dave.chat.send("EXIT")  # logged out: gone everywhere
    p.expect(dave, "chat", "OK EXIT")
    carol.login.close()  # dropped: gone everywhere
    p.everywhere({alice: "idle", bob: "idle", carol: None, dave: None})
    assert p.view.agree()


# -- requests, chats, messages (version 1) ----------------------------------------------------

def scenario_chat(p: Place) -> list[str]:
    alice, bob = p.user("alice", 0), p.user("bob", 1)
    p.visible(0, bob)
    alice.chat.send(f"CHAT {bob.name.upper()}")  # names are matched without case, on every node
    p.expect(alice, "chat", "OK CHAT ", exact=f"OK CHAT {bob.name}")
    p.expect(bob, "login", "REQUEST ", exact=f"REQUEST {alice.name}")
    bob.chat.send("ACCEPT")
    p.expect(bob, "chat", "OK ACCEPT ")
    p.expect(alice, "login", "STARTED ", exact=f"STARTED {bob.name}")
    p.expect(bob, "login", "STARTED ", exact=f"STARTED {alice.name}")
    count = 100
    alice.chat.send(*[f"MSG from alice {i}: ünïcødé ✓\ttab" for i in range(count)])
    bob.chat.send(*[f"MSG from bob {i}" for i in range(count)])
    for i in range(count):
        p.expect(bob, "login", "MSG ", exact=f"MSG {alice.name} from alice {i}: ünïcødé ✓\ttab")
        p.expect(alice, "login", "MSG ", exact=f"MSG {bob.name} from bob {i}")
    longest = "x" * (4096 - len("MSG "))  # a frame of 4096 bytes: the most a client may send
    alice.chat.send(f"MSG {longest}", f"MSG {longest}y", "MSG after the long ones")  # the second is too long
    p.expect(alice, "chat", "NACK ")
    p.expect(bob, "login", "MSG ", exact=f"MSG {alice.name} {longest}")
    p.expect(bob, "login", "MSG ", exact=f"MSG {alice.name} after the long ones")
    alice.chat.send("QUIT")
    p.expect(alice, "chat", "OK QUIT ")
    p.expect(alice, "login", "ENDED ")
    p.expect(bob, "login", "ENDED ")
    bob.chat.send("MSG too late")  # the chat is over on bob's node too
    p.expect(bob, "chat", "NACK ")
    p.quiet(alice, bob)
    return p.transcript()


def test_request_accept_messages_and_quit_across_nodes(spread, alone):
    same_as_one_server(scenario_chat, spread, alone)


def scenario_decline_withdraw(p: Place) -> list[str]:
    alice, bob = p.user("alice", 0), p.user("bob", 1)
    p.visible(0, bob)
    alice.chat.send(f"CHAT {bob.name}")
    p.expect(alice, "chat", "OK CHAT ")
    p.expect(bob, "login", "REQUEST ")
    bob.chat.send("DECLINE")
    p.expect(bob, "chat", "OK DECLINE ")
    p.expect(alice, "login", "DECLINED ")
    p.visible(0, bob, "idle")
    alice.chat.send(f"CHAT {bob.name}")
    p.expect(alice, "chat", "OK CHAT ")
    p.expect(bob, "login", "REQUEST ")
    alice.chat.send("QUIT")  # withdrawn
    p.expect(alice, "chat", "OK QUIT ")
    p.expect(bob, "login", "CANCELLED ")
    for command in ("QUIT", "DECLINE", "ACCEPT"):  # nothing left to answer, on either node
        bob.chat.send(command)
        p.expect(bob, "chat", f"ERR {command} ")
        alice.chat.send(command)
        p.expect(alice, "chat", f"ERR {command} ")
    p.visible(1, alice, "idle")
    p.chat(bob, alice)  # the other way round works too
    bob.chat.send("QUIT")
    p.expect(bob, "chat", "OK QUIT ")
    p.expect(bob, "login", "ENDED ")
    p.expect(alice, "login", "ENDED ")
    p.quiet(alice, bob)
    return p.transcript()


def test_decline_and_withdrawal_across_nodes(spread, alone):
    same_as_one_server(scenario_decline_withdraw, spread, alone)


def scenario_expiry(p: Place) -> tuple[list[str], float]:
    alice, bob = p.user("alice", 0), p.user("bob", 1)
    p.visible(0, bob)
    alice.chat.send(f"CHAT {bob.name}")
    p.expect(alice, "chat", "OK CHAT ")
    asked = time.monotonic()
    p.expect(bob, "login", "REQUEST ")
    p.expect(alice, "login", "EXPIRED ", timeout=DEADLINE)
    took = time.monotonic() - asked
    p.expect(bob, "login", "EXPIRED ")
    bob.chat.send("ACCEPT")  # too late
    p.expect(bob, "chat", "ERR ACCEPT ")
    p.everywhere({alice: "idle", bob: "idle"})
    p.quiet(alice, bob)
    return p.transcript(), took


def test_an_unanswered_request_expires_for_both_across_nodes(spread, alone):
    got, took = scenario_expiry(spread)
    want, _ = scenario_expiry(alone)
    assert got == want
    assert 1.5 <= took <= 2.0 + 5.0, f"a 2 s request expired after {took:.2f} s"


def scenario_refusals(p: Place) -> list[str]:
    alice, bob, carol = p.user("alice", 0), p.user("bob", 1), p.user("carol", 2)
    erin, frank = p.user("erin", 1), p.user("frank", 2)
    dora = p.account("dora", 2)  # an account, not logged in anywhere
    ghost = p.name("ghost")      # no account at all
    alice.chat.send(f"CHAT {alice.name}")
    p.expect(alice, "chat", "ERR CHAT self ")
    p.view.until(shows({dora: None}), [0], what="dora gone from node 0")
    alice.chat.send(f"CHAT {dora}")
    p.expect(alice, "chat", "ERR CHAT offline ")
    alice.chat.send(f"CHAT {ghost}")
    p.expect(alice, "chat", "ERR CHAT unknown-user ")
    p.chat(bob, carol)  # nodes 1 and 2
    p.visible(0, bob, "busy")
    p.visible(0, carol, "busy")
    for busy in (bob, carol):
        alice.chat.send(f"CHAT {busy.name}")
        p.expect(alice, "chat", "ERR CHAT busy ")
    bob.chat.send(f"CHAT {alice.name}")
    p.expect(bob, "chat", "ERR CHAT in-chat ")
    p.visible(0, erin)
    alice.chat.send(f"CHAT {erin.name}")
    p.expect(alice, "chat", "OK CHAT ")
    p.expect(erin, "login", "REQUEST ")
    p.visible(0, frank)
    alice.chat.send(f"CHAT {frank.name}")  # her own request is pending
    p.expect(alice, "chat", "ERR CHAT pending ")
    erin.chat.send(f"CHAT {frank.name}")   # erin has one to answer
    p.expect(erin, "chat", "ERR CHAT pending ")
    p.visible(2, erin, "busy")
    frank.chat.send(f"CHAT {erin.name}")   # a request makes both ends busy, seen from node 2
    p.expect(frank, "chat", "ERR CHAT busy ")
    frank.chat.send("ACCEPT")
    p.expect(frank, "chat", "ERR ACCEPT no-request ")
    erin.chat.send("ACCEPT")
    p.expect(erin, "chat", "OK ACCEPT ")
    p.expect(alice, "login", "STARTED ")
    p.expect(erin, "login", "STARTED ")
    p.quiet(alice, bob, carol, erin, frank)
    return p.transcript()


def test_chat_refusals_across_nodes(spread, alone):
    same_as_one_server(scenario_refusals, spread, alone)


def scenario_blocks(p: Place) -> list[str]:
    alice, bob, carol = p.user("alice", 0), p.user("bob", 1, v2=True), p.user("carol", 2)
    ghost = p.name("ghost")
    p.chat(alice, bob)
    bob.chat.send(f"BLOCK {alice.name}")  # ends the chat, as QUIT would
    p.expect(bob, "login", "ENDED ")
    p.expect(bob, "chat", "OK BLOCK ")
    p.expect(alice, "login", "ENDED ")
    p.visible(0, bob, "idle")
    alice.chat.send(f"CHAT {bob.name}")  # quiet: bob hears nothing; alice, after a while, a "no"
    p.expect(alice, "chat", "OK CHAT ")
    p.expect(alice, "login", "DECLINED ")
    p.visible(1, carol)
    carol.chat.send(f"CHAT {bob.name}")  # not blocked: asked as ever
    p.expect(carol, "chat", "OK CHAT ")
    p.expect(bob, "login", "REQUEST ")
    bob.chat.send(f"BLOCK {carol.name.upper()}")  # a pending request from them is declined
    p.expect(carol, "login", "DECLINED ")
    p.expect(bob, "chat", "OK BLOCK ")
    p.visible(2, bob, "idle")
    bob.chat.send(f"CHAT {carol.name}")  # one's own request to them is withdrawn
    p.expect(bob, "chat", "OK CHAT ")
    p.expect(carol, "login", "REQUEST ")
    bob.chat.send(f"BLOCK {carol.name}", "BLOCKS")
    p.expect(carol, "login", "CANCELLED ")
    p.expect(bob, "chat", "OK BLOCK ")
    for _ in range(2):
        p.expect(bob, "chat", "USER ")
    p.expect(bob, "chat", "OK BLOCKS 2")
    for line in (f"BLOCK {bob.name}", f"BLOCK {ghost}", f"UNBLOCK {ghost}"):
        bob.chat.send(line)
        p.expect(bob, "chat", "ERR ")
    bob.chat.send(f"UNBLOCK {alice.name}")
    p.expect(bob, "chat", "OK UNBLOCK ")
    p.chat(alice, bob)  # asked as ever again
    p.quiet(alice, bob, carol)
    return p.transcript()


def test_a_user_blocks_another_on_any_node(spread, alone):
    """BLOCK ends a chat or request with the user blocked; their requests are
    then declined after a while, from any node (the list is in the shared
    account store); UNBLOCK undoes it."""
    same_as_one_server(scenario_blocks, spread, alone)


def test_a_quiet_request_across_nodes_is_pending_for_the_asker_and_cancelled_when_its_target_leaves(make_cluster):
    """alice (node 0) asks bob (node 1), who has blocked her: she is busy
    with it (another CHAT is "pending"), he is free (carol's request reaches
    him); when he logs out it ends as a request to him would, CANCELLED,
    long before its "no" was due (5 s or more with a 60 s request timeout)."""
    cluster = make_cluster(2, *CLUSTER_ARGS, "--request-timeout", "60")
    p = Place(cluster.nodes)
    try:
        alice, bob, carol = p.user("alice", 0), p.user("bob", 1), p.user("carol", 0)
        bob.chat.send(f"BLOCK {alice.name}")
        p.expect(bob, "chat", "OK BLOCK ")
        p.visible(0, bob)
        alice.chat.send(f"CHAT {bob.name}", f"CHAT {carol.name}")
        p.expect(alice, "chat", f"OK CHAT {bob.name}")
        p.expect(alice, "chat", "ERR CHAT pending ")
        carol.chat.send(f"CHAT {bob.name}")
        p.expect(carol, "chat", f"OK CHAT {bob.name}")
        p.expect(bob, "login", f"REQUEST {carol.name}")  # not alice's: it never reaches him
        bob.chat.send("DECLINE", "EXIT")
        p.expect(bob, "chat", "OK DECLINE ")
        p.expect(carol, "login", f"DECLINED {bob.name}")
        p.expect(alice, "login", f"CANCELLED {bob.name}", timeout=3.0)
    finally:
        p.close()


def scenario_unregister(p: Place) -> list[str]:
    alice, bob = p.user("alice", 0), p.user("bob", 1)
    p.chat(alice, bob)
    alice.chat.send(f"UNREGISTER {PASSWORD}")
    p.expect(alice, "chat", "OK UNREGISTER ")
    p.closed(alice, "login")
    p.expect(bob, "login", "ENDED ")
    p.everywhere({alice: None})
    bob.chat.send(f"CHAT {alice.name}")
    p.expect(bob, "chat", "ERR CHAT unknown-user ")
    return p.transcript()


def test_an_account_deleted_on_one_node_is_gone_on_all(spread, alone):
    same_as_one_server(scenario_unregister, spread, alone)


def scenario_leaving(p: Place) -> list[str]:
    # EXIT in a chat: the partner on another node hears "left".
    alice, bob = p.user("alice", 0), p.user("bob", 1)
    p.chat(alice, bob)
    bob.chat.send("EXIT")
    p.expect(bob, "chat", "OK EXIT")
    p.expect(bob, "login", "BYE exit ")
    p.closed(bob, "login")
    p.expect(alice, "login", "ENDED ")
    # A lost login socket (version 1): the partner hears "dropped".
    carol, dave = p.user("carol", 2), p.user("dave", 0)
    p.chat(carol, dave)
    carol.login.close()
    p.expect(dave, "login", "ENDED ")
    p.closed(carol, "chat")
    # A lost check socket ends the session too.
    ivan, judy = p.user("ivan", 2), p.user("judy", 0)
    p.chat(ivan, judy)
    judy.check.close()
    p.expect(ivan, "login", "ENDED ")
    # A requester that drops: the target's request is cancelled.
    erin, frank = p.user("erin", 1), p.user("frank", 2)
    p.visible(1, frank)
    erin.chat.send(f"CHAT {frank.name}")
    p.expect(erin, "chat", "OK CHAT ")
    p.expect(frank, "login", "REQUEST ")
    erin.login.close()
    p.expect(frank, "login", "CANCELLED ")
    # A target that logs out: the requester's request is cancelled.
    gina, hank = p.user("gina", 0), p.user("hank", 1)
    p.visible(0, hank)
    gina.chat.send(f"CHAT {hank.name}")
    p.expect(gina, "chat", "OK CHAT ")
    p.expect(hank, "login", "REQUEST ")
    hank.chat.send("EXIT")
    p.expect(hank, "chat", "OK EXIT")
    p.expect(gina, "login", "CANCELLED ")
    p.everywhere({bob: None, carol: None, judy: None, erin: None, hank: None,
                  alice: "idle", dave: "idle", ivan: "idle", frank: "idle", gina: "idle"})
    p.quiet(alice, dave, ivan, frank, gina)
    return p.transcript()


def test_exit_and_drops_end_chats_and_requests_across_nodes(spread, alone):
    same_as_one_server(scenario_leaving, spread, alone)


# -- one session per account ------------------------------------------------------------------

def scenario_takeover(p: Place) -> list[str]:
    alice, bob = p.user("alice", 0), p.user("bob", 1)
    p.chat(alice, bob)
    again = p.user("bob", 2, name=bob.name, register=False, label="bob@2")  # logs in on another node
    p.expect(bob, "login", "BYE replaced ")
    p.closed(bob, "login")
    p.closed(bob, "chat")
    p.closed(bob, "check")
    p.expect(alice, "login", "ENDED ")  # the old session's partner: dropped
    p.everywhere({alice: "idle", bob: "idle"})  # once, on every node
    p.chat(again, alice)  # the new session works across nodes
    again.chat.send("MSG it is me again")
    p.expect(alice, "login", "MSG ")
    alice.chat.send("MSG welcome back")
    p.expect(again, "login", "MSG ")
    third = p.user("bob", 1, name=bob.name.upper(), register=False, label="bob@1")  # and back, in other case
    p.expect(again, "login", "BYE replaced ")
    p.closed(again, "login")
    p.expect(alice, "login", "ENDED ")
    p.everywhere({alice: "idle", bob: "idle"})
    p.quiet(alice, third)
    return p.transcript()


def test_a_login_on_another_node_replaces_the_session(spread, alone):
    same_as_one_server(scenario_takeover, spread, alone)


class Racer:
    """One of many logins of one account, on its own thread: LOGIN, then (on
    WELCOME) attach the chat and check sockets as a client does, then follow
    the login socket until it closes or the race is over."""

    def __init__(self, index: int, node: ServerProcess, node_index: int, name: str, race: "Race"):
        self.index, self.node, self.node_index, self.name = index, node, node_index, name
        self.race = race
        self.source = fresh_source()  # one address each: no per-address throttling or "busy"
        self.login = LineSocket(node.host, node.port, source=self.source)
        self.chat = self.check = None
        self.answer: str | None = None   # the reply to LOGIN ("<closed>" if none)
        self.attach: list[str] = []      # the replies to ATTACH CHAT / CHECK
        self.frames: list[str] = []      # login frames after WELCOME
        self.closed = False
        self.error: str | None = None

    @property
    def welcomed(self) -> bool:
        return self.answer is not None and self.answer.startswith("WELCOME ")

    @property
    def open(self) -> bool:
        return self.welcomed and not self.closed and self.error is None

    @property
    def ready(self) -> bool:
        return any(f.startswith("READY ") for f in self.frames)

    def _set(self, **changes) -> None:
        with self.race.cond:
            for key, value in changes.items():
                setattr(self, key, value)
            self.race.version += 1
            self.race.cond.notify_all()

    def run(self) -> None:
        race = self.race
        try:
            race.barrier.wait(DEADLINE)
            self.login.send(f"LOGIN {self.name} {PASSWORD}")
            answer = self.login.line(timeout=3 * DEADLINE)
            self._set(answer=answer if answer is not None else "<closed>")
            if answer is not None and answer.startswith("BYE "):  # ended before its WELCOME
                self.frames.extend(self.login.expect_closed())
                self._set(closed=True)
            if not self.welcomed:
                return
            _, _, chat_token, check_token = answer.split()
            self.chat = LineSocket(self.node.host, self.node.port, source=self.source)
            self.chat.send(f"ATTACH CHAT {chat_token}")
            reply = self.chat.line()
            self.attach.append(reply or "<closed>")
            if reply == "OK ATTACH CHAT":
                self.check = LineSocket(self.node.host, self.node.port, source=self.source)
                self.check.send(f"ATTACH CHECK {check_token}")
                self.attach.append(self.check.line() or "<closed>")
            while not race.stop.is_set():
                line = quiet_line(self.login, 0.1)
                if line is None and not self.login.eof:
                    continue
                if line is None:
                    self._set(closed=True)
                    return
                with race.cond:
                    self.frames.append(line)
                    race.version += 1
                    race.cond.notify_all()
        except BaseException:  # handed to the test thread
            self._set(error=traceback.format_exc())

    def close(self) -> None:
        for s in (self.login, self.chat, self.check):
            if s is not None:
                try:  # wakes this racer's thread if it is blocked reading
                    s.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def __repr__(self) -> str:
        return (f"<racer {self.index} node {self.node_index} answer={self.answer!r} attach={self.attach} "
                f"frames={self.frames} closed={self.closed}{' ERROR ' + self.error if self.error else ''}>")


class Race:
    """``count`` logins of account ``name`` at once, spread over the nodes."""

    def __init__(self, nodes: list, name: str, count: int):
        self.cond = threading.Condition()
        self.version = 0
        self.stop = threading.Event()
        self.barrier = threading.Barrier(count)
        self.racers: list[Racer] = []
        self.threads: list[threading.Thread] = []
        try:
            for i in range(count):
                node_index = i % len(nodes)
                spelled = name.upper() if i % 2 else name  # any case logs in to the one account
                self.racers.append(Racer(i, nodes[node_index], node_index, spelled, self))
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        for racer in self.racers:
            thread = threading.Thread(target=racer.run, name=f"racer-{racer.index}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def settled(self) -> bool:
        """Every login answered, every attempt that failed ended, at most one
        session left (READY, if one)."""
        if any(r.error for r in self.racers):
            return True
        if any(r.answer is None or (r.answer.startswith("BYE ") and not r.closed) for r in self.racers):
            return False
        alive = [r for r in self.racers if r.open]
        return len(alive) == 0 or (len(alive) == 1 and alive[0].ready)

    def summary(self) -> str:
        by = {}
        for r in self.racers:
            what = "WELCOME" if r.welcomed else (r.answer or "?").split(" ")[:3]
            by.setdefault((r.node_index, str(what)), 0)
            by[(r.node_index, str(what))] += 1
        return ", ".join(f"node {n} {w}: {c}" for (n, w), c in sorted(by.items()))

    def close(self) -> None:
        self.stop.set()
        for racer in self.racers:
            racer.close()
        for thread in self.threads:
            thread.join(DEADLINE)


def race_logins(cluster_nodes: list, view: View, count: int = RACERS) -> None:
    """Register an account, race ``count`` logins of it over the nodes; exactly
    one session survives (and only the losers were told ``replaced``), and
    WHO on every node lists the account once."""
    owner = RawUser(cluster_nodes[0])  # make the account, then log out
    name = owner.name
    owner.chat.send("EXIT")
    owner.login.expect("BYE exit")
    owner.close()
    view.until(shows({name: None}), what=f"{name} logged out")
    race = Race(cluster_nodes, name, count)
    try:
        race.start()
        with race.cond:
            settled = race.cond.wait_for(race.settled, timeout=2 * DEADLINE)
        if not settled:
            whos = {node: view.who(node) for node in range(len(cluster_nodes))}
            raise AssertionError(
                f"the race did not settle in {2 * DEADLINE} s: {race.summary()}\n" + "\n".join(
                    map(repr, (r for r in race.racers if r.open or r.answer is None or not r.closed
                               and r.answer.startswith("BYE ")))) +
                f"\nWHO lists {name} by node: { {n: w if isinstance(w, str) else listed(w, name) for n, w in whos.items()} }")
        errors = [r for r in race.racers if r.error]
        assert not errors, "\n".join(map(repr, errors))
        # Nothing changes once settled: the survivor stays (nothing ends it late).
        with race.cond:
            version = race.version
            changed = race.cond.wait_for(lambda: race.version != version, timeout=1.0)
        assert not changed, "something happened after the race settled:\n" + "\n".join(map(repr, race.racers))
        survivors = [r for r in race.racers if r.open]
        assert len(survivors) == 1, f"{len(survivors)} sessions survived ({race.summary()}): {survivors}"
        winner = survivors[0]
        assert winner.frames == [f"READY {name}"], winner
        assert winner.attach == ["OK ATTACH CHAT", "OK ATTACH CHECK"], winner
        for r in race.racers:
            if r is winner:
                continue
            if r.welcomed:  # a session that lost: told it was replaced, then closed
                assert r.closed and r.frames and r.frames[-1].startswith("BYE replaced "), r
                assert all(f == f"READY {name}" for f in r.frames[:-1]), r
            elif r.answer.startswith("BYE "):  # replaced before its WELCOME, then closed
                assert r.answer.startswith("BYE replaced ") and r.closed and r.frames == [], r
            else:  # or its login was refused (not for a wrong password)
                assert r.answer.startswith("ERR LOGIN ") and " auth-failed " not in r.answer, r
        # WHO on every node lists the account once: as soon as presence has
        # spread, and still a moment later.
        view.until(shows({name: "idle"}), what=f"{name} listed once")
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            for node in range(len(cluster_nodes)):
                entries = view.who(node)
                assert not isinstance(entries, str) and listed(entries, name) == ["idle"], (node, entries)
        # The survivor's session works: its own WHO, a heartbeat.
        assert listed(who(winner.chat), name) == ["idle"]
        winner.check.send("PING race")
        assert winner.check.expect("PONG") == "PONG race"
        print(f"{count} racing logins: {race.summary()}; the survivor was racer {winner.index} "
              f"on node {winner.node_index}")
    finally:
        race.close()


def test_racing_logins_of_one_account_on_three_nodes_leave_exactly_one_session(cluster, spread):
    race_logins(cluster.nodes, spread.view)


@pytest.mark.slow
def test_racing_logins_again_and_again(cluster, spread):
    for _ in range(10):
        race_logins(cluster.nodes, spread.view)


# -- version 2 ----------------------------------------------------------------------------------

def scenario_v2_resume(p: Place) -> list[str]:
    alice, bob = p.user("alice", 0, v2=True), p.user("bob", 1, v2=True)
    p.chat(alice, bob)
    alice.chat.send("MSG before")
    p.expect(bob, "login", "MSG ", exact=f"MSG {alice.name} before")
    bob.ack()
    p.delivered(alice, 1, 1)
    alice.ack()
    bob.chat.send("MSG reply")
    p.expect(alice, "login", "MSG ", exact=f"MSG {bob.name} reply")
    alice.ack()
    p.delivered(bob, 1, 1)
    bob.ack()
    bob.cut()  # bob's connection drops: his session is kept, the chat stays up
    p.expect(alice, "login", "AWAY ")
    alice.chat.send("MSG while away 1", "MSG while away 2")
    p.received(alice, 3)
    accepted = bob.resume()  # on his node
    p.note(f"bob resumed: the server had his messages up to {accepted}")
    p.expect(bob, "login", "MSG ", exact=f"MSG {alice.name} while away 1")
    p.expect(bob, "login", "MSG ", exact=f"MSG {alice.name} while away 2")
    p.expect(alice, "login", "BACK ")
    bob.ack()
    p.delivered(alice, 2, 3)
    alice.ack()
    bob.chat.send("MSG hello again")
    p.expect(alice, "login", "MSG ", exact=f"MSG {bob.name} hello again")
    alice.ack()
    p.delivered(bob, 2, 2)
    alice.chat.send("QUIT")
    p.expect(alice, "chat", "OK QUIT ")
    p.expect(alice, "login", "ENDED ")
    p.expect(bob, "login", "ENDED ")
    alice.ack()
    bob.ack()
    p.quiet(alice, bob)
    return p.transcript()


def test_v2_receipts_away_resume_and_back_across_nodes(spread, alone):
    same_as_one_server(scenario_v2_resume, spread, alone)


def scenario_v2_to_v1(p: Place) -> list[str]:
    alice, old = p.user("alice", 0, v2=True), p.user("old", 1)
    p.chat(alice, old)
    alice.chat.send("MSG to an old client", "MSG and another")
    p.expect(old, "login", "MSG ", exact=f"MSG {alice.name} to an old client")
    p.expect(old, "login", "MSG ", exact=f"MSG {alice.name} and another")
    p.delivered(alice, 1, 2)  # a version 1 client acknowledges nothing: written is delivered
    old.chat.send("MSG from the old one")
    p.expect(alice, "login", "MSG ", exact=f"MSG {old.name} from the old one")
    alice.ack()
    old.login.close()  # a version 1 session is never kept: its drop ends the chat
    p.expect(alice, "login", "ENDED ")
    alice.ack()
    p.quiet(alice)
    return p.transcript()


def test_v2_sender_and_v1_receiver_across_nodes(spread, alone):
    same_as_one_server(scenario_v2_to_v1, spread, alone)


class Pump:
    """One version 2 user's side of a bulk exchange: a sender thread sends
    ``count`` numbered messages in batches, keeping at most ``window`` without
    a receipt; a reader thread takes the login socket's events (the partner's
    messages, receipts for ours), acknowledging them as a client does."""

    def __init__(self, user: V2User, partner: str, tag: str, count: int, batch: int, window: int):
        self.user, self.partner, self.tag = user, partner, tag
        self.count, self.batch, self.window = count, batch, window
        self.cond = threading.Condition()
        self.sent = self.delivered = 0
        self.got: list[str] = []
        self.errors: list[str] = []
        self.done = threading.Event()

    def text(self, i: int) -> str:
        return f"{self.tag} {i} " + "pad" * (i % 17)

    def send_all(self) -> None:
        try:
            for first in range(1, self.count + 1, self.batch):
                last = min(first + self.batch - 1, self.count)
                with self.cond:
                    if not self.cond.wait_for(lambda: last - self.delivered <= self.window or self.done.is_set(),
                                              timeout=3 * DEADLINE):
                        raise AssertionError(f"{self.tag}: no receipts for {3 * DEADLINE} s "
                                             f"(sent {self.sent}, delivered {self.delivered})")
                    if self.done.is_set():
                        return
                    self.sent = last  # before they go: a receipt may beat this thread back
                self.user.chat.send(*[f"MSG {self.text(i)}" for i in range(first, last + 1)])
        except BaseException:
            self.errors.append(traceback.format_exc())
            self.done.set()

    def read_all(self, other: "Pump") -> None:
        prefix = f"MSG {self.partner} "
        try:
            while len(self.got) < other.count or self.delivered < self.count:
                line = self.user.event(timeout=DEADLINE)
                assert line is not None, f"{self.tag}: the login socket closed"
                if line.startswith(prefix):
                    text = line[len(prefix):]
                    want = other.text(len(self.got) + 1)
                    assert text == want, f"{self.tag}: message {len(self.got) + 1} is {text!r}, not {want!r}"
                    self.got.append(text)
                elif line.startswith("DELIVERED "):
                    first, last = map(int, line.split()[1:3])
                    with self.cond:
                        assert first == self.delivered + 1 and last <= self.sent, \
                            f"{self.tag}: {line!r} after {self.delivered} delivered, {self.sent} sent"
                        self.delivered = last
                        self.cond.notify_all()
                else:
                    raise AssertionError(f"{self.tag}: unexpected {line!r}")
                if not self.user.login.lines or self.user.last_id % 256 == 0:
                    self.user.ack()  # what has been read, as a client does
            self.user.ack()
        except BaseException:
            self.errors.append(traceback.format_exc())
        finally:
            self.done.set()
            with self.cond:
                self.cond.notify_all()


def test_v2_ten_thousand_messages_each_way_at_once_across_nodes(spread):
    count, batch, window = 10_000, 100, 600
    alice, bob = spread.user("alice", 0, v2=True), spread.user("bob", 1, v2=True)
    spread.chat(alice, bob)
    alice.ack()
    bob.ack()
    a = Pump(alice, bob.name, "a", count, batch, window)
    b = Pump(bob, alice.name, "b", count, batch, window)
    threads = [threading.Thread(target=a.send_all), threading.Thread(target=b.send_all),
               threading.Thread(target=a.read_all, args=(b,)), threading.Thread(target=b.read_all, args=(a,))]
    began = time.monotonic()
    for t in threads:
        t.daemon = True
        t.start()
    try:
        for t in threads:
            t.join(timeout=max(0.1, began + 60 - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        assert not stuck, (f"still running after 60 s: {stuck}; alice sent {a.sent} delivered {a.delivered} "
                           f"got {len(a.got)}; bob sent {b.sent} delivered {b.delivered} got {len(b.got)}")
    finally:
        a.done.set()
        b.done.set()
    assert not a.errors and not b.errors, "\n".join(a.errors + b.errors)
    took = time.monotonic() - began
    # Every message once, in order, and every one DELIVERED to its sender.
    assert a.got == [b.text(i) for i in range(1, count + 1)]
    assert b.got == [a.text(i) for i in range(1, count + 1)]
    assert a.delivered == b.delivered == count
    # Nothing more: no message twice, no late receipt.
    assert silence({"alice.login": alice.login, "bob.login": bob.login}, 0.5) == []
    for user in (alice, bob):  # the chat sockets carried only RECEIVED receipts
        while (line := quiet_line(user.chat, 0.05)) is not None:
            assert line.startswith("RECEIVED ") and int(line.split()[1]) <= count, line
    print(f"2 x {count} messages across nodes in {took:.2f} s")


# -- node death -------------------------------------------------------------------------------

def with_operator_node(make_cluster, tmp_path):
    """Two nodes; node 1 has the operator's admin socket (returned)."""
    c = make_cluster(1)
    admin_socket = tmp_path / "admin.sock"
    c.args = (*c.args, "--admin-socket", str(admin_socket))
    c.start_node()
    return c, admin_socket


def test_an_operator_on_one_node_kicks_and_locks_a_session_on_another(make_cluster, tmp_path):
    """selchat admin kick and lock, sent to node 1, end a session that node 0
    holds (its node says BYE kicked, its partner hears it); a user online
    nowhere is "not online"."""
    require_cluster_mode()
    c, admin_socket = with_operator_node(make_cluster, tmp_path)
    p = Place(c.nodes)
    try:
        mallory, bob = p.user("mallory", 0), p.user("bob", 0)
        p.chat(mallory, bob)
        kicked = admin(admin_socket, "kick", mallory.name, "calm", "down")
        assert kicked.returncode == 0, kicked
        assert kicked.stdout.strip() == f"kicked {mallory.name} on node {c.node_id(0)}"
        assert "BYE kicked calm down" in mallory.login.expect_closed()
        p.expect(bob, "login", f"ENDED {mallory.name} kicked ")
        again = p.user("mallory", 0, name=mallory.name, register=False, label="again")
        locked = admin(admin_socket, "lock", mallory.name, "spam")
        assert locked.stdout.strip() == f"locked {mallory.name} (session ended on node {c.node_id(0)})", locked
        assert "BYE kicked your account is locked: spam" in again.login.expect_closed()
        p.everywhere({mallory.name: None})
        nobody = admin(admin_socket, "kick", mallory.name)
        assert nobody.returncode == 1 and nobody.stderr.strip() == f"error: {mallory.name} is not online"
        sock = c.node(1).connect()
        sock.send(f"LOGIN {mallory.name} {PASSWORD}")
        assert sock.line() == "ERR LOGIN locked this account is locked: spam"
    finally:
        p.close()


def test_a_killed_node_s_users_leave_who_and_their_partners_hear_dropped(make_cluster):
    # Version 1 sessions die with their node. A version 2 session is kept
    # (detached) for its client to resume elsewhere (tests/test_cluster_resume.py):
    # it stays listed, and its version 1 partner hears nothing until its
    # resume window ends (docs/protocol.md, "Partners that speak version 1").
    require_cluster_mode()
    c = make_cluster(3)
    p = Place(c.nodes)
    try:
        alice, dave, hal = p.user("alice", 0), p.user("dave", 0), p.user("hal", 0)
        erin = p.user("erin", 0, v2=True)
        bob, frank, grace = p.user("bob", 1), p.user("frank", 2), p.user("grace", 2, v2=True)
        p.chat(alice, bob)   # nodes 0 and 1, version 1
        p.chat(erin, frank)  # nodes 0 and 2, a version 2 user with a version 1 partner
        p.chat(hal, grace)   # nodes 0 and 2, the other way round
        p.everywhere({alice: "busy", bob: "busy", dave: "idle", erin: "busy", frank: "busy",
                      hal: "busy", grace: "busy"}, [1, 2])
        victims = {alice.name, dave.name, hal.name}
        partners = {bob.name: (bob, alice), grace.name: (grace, hal)}
        ended: dict[str, float] = {}
        left: dict[int, float] = {}
        last = {}
        killed = time.monotonic()
        c.kill(0)
        deadline = killed + NODE_DEATH_LIMIT + 5
        while (len(ended) < len(partners) or len(left) < 2) and time.monotonic() < deadline:
            for name, (partner, gone) in partners.items():
                if name not in ended and (line := quiet_line(partner.login, 0.05)) is not None:
                    assert line.startswith(f"ENDED {gone.name} dropped "), f"{partner.label}: {line!r}"
                    ended[name] = time.monotonic() - killed
                    if partner.v2:
                        partner.last_id += 1  # an event like any other
            for node in (1, 2):
                if node not in left:
                    last[node] = entries = p.view.who(node)
                    if not isinstance(entries, str) and not victims & {n for n, _ in entries}:
                        left[node] = time.monotonic() - killed
        print(f"node killed: partners heard ENDED after {ended}, users left WHO after {left} (node: s)")
        assert len(ended) == len(partners), f"ENDED only for {ended} within {deadline - killed:.0f} s"
        assert len(left) == 2, f"the killed node's users still listed: {last}"
        assert max(ended.values()) < NODE_DEATH_LIMIT, f"ENDED after {ended} s"
        assert max(left.values()) < NODE_DEATH_LIMIT, f"left WHO after {left} s"
        # The rest of the cluster goes on; erin is kept, busy with frank, who heard nothing.
        p.everywhere({bob: "idle", frank: "busy", grace: "idle", erin: "busy", alice: None, dave: None,
                      hal: None}, [1, 2])
        assert silence({"frank.login": frank.login}, 0.2) == []
        p.chat(bob, grace)
        bob.chat.send("MSG still here")
        p.expect(grace, "login", "MSG ", exact=f"MSG {bob.name} still here")
        # The dead node's accounts log in elsewhere, and a new node sees everyone.
        back = p.user("alice", 2, name=alice.name, register=False, label="alice@2")
        c.start_node()  # node 3
        p.everywhere({back: "idle", bob: "busy", grace: "busy", frank: "busy", erin: "busy", dave: None,
                      hal: None}, [1, 2, 3])
        p.quiet(bob, frank, back)
    finally:
        p.close()


# -- Redis lost ----------------------------------------------------------------------------------

def test_a_node_that_loses_redis_fences_itself_then_comes_back(make_cluster):
    require_cluster_mode()
    c = make_cluster(2)
    p = Place(c.nodes)
    try:
        alice, bob = p.user("alice", 0), p.user("bob", 1)
        p.chat(alice, bob)
        vera, walt = p.user("vera", 0, v2=True), p.user("walt", 1)
        spare = [p.account("spare0", 0), p.account("spare1", 1)]  # to log in to later
        sessions = [alice, bob, vera, walt]
        p.everywhere({alice: "busy", bob: "busy", vera: "idle", walt: "idle"})
        every_socket = {f"{u.label}.{s}": getattr(u, s) for u in sessions for s in ("login", "chat", "check")}
        paused = time.monotonic()
        c.redis.pause()
        try:
            # A lapse well under the lease ends nothing.
            assert silence(every_socket, SHORT_LAPSE) == []
            # Past the lease, while Redis is still stopped, every session ends:
            # BYE cluster-lost; the version 2 one (vera) is let go of without a
            # word, to be resumed once the cluster is back.
            for user in sessions:
                try:
                    frames = user.login.expect_closed(timeout=max(0.1, paused + REDIS_PAUSE - time.monotonic()))
                except AssertionError as exc:
                    raise AssertionError(f"{user.label}'s session not ended {REDIS_PAUSE} s after Redis "
                                         f"stopped: {exc}") from None
                if user is vera:
                    assert frames == [], f"{user.label}: {frames}"
                else:
                    assert frames and frames[-1].startswith("BYE cluster-lost "), f"{user.label}: {frames}"
                for sock in (user.chat, user.check):
                    sock.expect_closed()
            fenced = time.monotonic() - paused
            # New logins are refused while Redis is stopped.
            refusals = 0
            while True:
                for node in (0, 1):
                    attempt = Login(c.node(node), spare[node], source=fresh_source(), timeout=5.0, attach=False)
                    attempt.close()
                    assert attempt.answer is not None and attempt.answer.startswith("ERR LOGIN unavailable "), \
                        f"node {node}, {time.monotonic() - paused:.1f} s after Redis stopped: {attempt.answer!r}"
                    refusals += 1
                if time.monotonic() >= paused + REDIS_PAUSE:
                    break
                time.sleep(0.25)  # polling interval, until the pause is over
        finally:
            c.redis.resume()
        resumed = time.monotonic()
        # Back: a login on each node works again (within the limit).
        back: dict[int, Login] = {}
        took: dict[int, float] = {}
        answers: dict[int, str | None] = {}
        while len(back) < 2:
            for node in (0, 1):
                if node in back:
                    continue
                attempt = Login(c.node(node), spare[node], source=fresh_source(), node=node, label=f"spare{node}")
                answers[node] = attempt.answer
                if attempt.ok:
                    back[node], took[node] = attempt, time.monotonic() - resumed
                else:
                    attempt.close()
                    assert attempt.answer is not None and attempt.answer.startswith("ERR LOGIN "), attempt.answer
            if len(back) < 2:
                assert time.monotonic() - resumed < RECOVERY_LIMIT, \
                    f"logins still refused {RECOVERY_LIMIT} s after Redis came back: {answers}"
                time.sleep(0.2)  # polling interval; the condition ends the wait
        print(f"sessions fenced {fenced:.1f} s after Redis stopped; {refusals} logins refused meanwhile; "
              f"logins worked again {took} s after it came back")
        # ... and the cluster with them: the fenced sessions are gone (WHO's
        # watchers too: new ones ask), the new ones chat across nodes.
        p.users.extend(back.values())  # closed at the end
        p.view.close()
        p.view = View(c.nodes)
        s0, s1 = back[0], back[1]
        # vera's session was kept: she resumes it, on the other node.
        vera.connect = c.node(1).connect
        vera.resume()
        p.everywhere({alice: None, bob: None, vera: "idle", walt: None, s0.name: "idle", s1.name: "idle"})
        p.chat(s0, s1)
        s0.chat.send("MSG after the storm")
        p.expect(s1, "login", "MSG ", exact=f"MSG {s0.name} after the storm")
        s1.chat.send("MSG calm again")
        p.expect(s0, "login", "MSG ", exact=f"MSG {s1.name} calm again")
    finally:
        p.close()


# -- without --cluster --------------------------------------------------------------------------

def test_without_cluster_servers_sharing_accounts_stay_apart(make_server, tmp_path):
    db = str(tmp_path / "shared.db")
    one, two = make_server(*CLUSTER_ARGS, db=db), make_server(*CLUSTER_ARGS, db=db)
    alice, bob = RawUser(one), RawUser(two)
    assert listed(who(alice.chat), bob.name) == [] and listed(who(bob.chat), alice.name) == []
    alice.chat.send(f"CHAT {bob.name}")  # his account is here, he is not
    assert alice.chat.expect("ERR CHAT offline ")
    again = RawUser(two, name=alice.name, register=False)  # the same account on the other server
    assert silence({"alice.login": alice.login, "alice.chat": alice.chat}, 0.5) == []  # not replaced
    assert listed(who(alice.chat), alice.name) == ["idle"]
    assert listed(who(again.chat), alice.name) == ["idle"]
    for server in (one, two):
        assert "cluster: joined" not in server.log()


def test_redis_restarted_empty_ends_every_session_and_the_cluster_starts_afresh(make_cluster):
    # Redis comes back without its data (no persistence): the cluster's state
    # is gone. No node may go on as if nothing happened (a silent gap): every
    # session ends with BYE cluster-lost, the nodes say "history lost", and
    # new logins make a new cluster that works across nodes.
    require_cluster_mode()
    c = make_cluster(2)
    p = Place(c.nodes)
    try:
        alice, bob = p.user("alice", 0, v2=True), p.user("bob", 1)
        p.chat(alice, bob)
        spare = [p.account("spare0", 0), p.account("spare1", 1)]
        c.redis.restart()
        # bob's version 1 session ends with BYE; alice's version 2 session is
        # let go of without a word (when the link drops, her node cannot yet
        # tell a restart from a lapse)...
        frames = bob.login.expect_closed()
        assert frames and frames[-1].startswith("BYE cluster-lost "), f"{bob.label}: {frames}"
        assert alice.login.expect_closed() == []
        for node in (0, 1):
            c.node(node).wait_for_log("history lost")
        # ...and her RESUME finds that the cluster has no such session any more.
        deadline = time.monotonic() + RECOVERY_LIMIT
        while True:
            sock = c.node(0).connect()
            sock.send(f"RESUME {alice.token} {alice.last_id} 0")
            answer = sock.line()
            sock.close()
            if not answer.startswith("ERR RESUME unavailable "):
                break
            assert time.monotonic() < deadline, "RESUME still unavailable after Redis came back"
            time.sleep(0.2)  # polling interval; the condition ends the wait
        assert answer.startswith("ERR RESUME unknown-session "), answer
        back = {}
        deadline = time.monotonic() + RECOVERY_LIMIT
        while len(back) < 2:
            for node in (0, 1):
                if node not in back:
                    attempt = Login(c.node(node), spare[node], source=fresh_source(), node=node, label=f"spare{node}")
                    if attempt.ok:
                        back[node] = attempt
                    else:
                        attempt.close()
            assert time.monotonic() < deadline, "logins refused after Redis came back empty"
            if len(back) < 2:
                time.sleep(0.2)  # polling interval; the condition ends the wait
        p.users.extend(back.values())
        p.view.close()
        p.view = View(c.nodes)
        p.chat(back[0], back[1])  # the new cluster works across nodes
    finally:
        p.close()



def _scrape(node) -> str:
    port = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", node.wait_for_log("metrics on ")).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as resp:
        return resp.read().decode()


def _gauge(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_metrics_say_whether_the_node_is_in_the_cluster_and_count_its_fences(make_cluster):
    # An operator's alert: joined goes to 0 and fences_total up while Redis is
    # away, and joined back to 1 once the node has joined again.
    require_cluster_mode()
    c = make_cluster(1, *CLUSTER_ARGS, "--metrics", "127.0.0.1:0")
    node = c.node(0)
    text = _scrape(node)
    assert _gauge(text, "selchat_cluster_joined") == 1 and _gauge(text, "selchat_cluster_fences_total") == 0
    assert "selchat_chat_requests_pending" not in text  # a cluster keeps requests in Redis
    c.redis.stop()
    deadline = time.monotonic() + DEADLINE
    while _gauge(text := _scrape(node), "selchat_cluster_joined") != 0:
        assert time.monotonic() < deadline, "still joined with Redis gone"
        time.sleep(0.1)  # polling interval; the condition ends the wait
    assert _gauge(text, "selchat_cluster_fences_total") == 1
    c.redis.start()
    while _gauge(text := _scrape(node), "selchat_cluster_joined") != 1:
        assert time.monotonic() < deadline + RECOVERY_LIMIT, "not joined again after Redis came back"
        time.sleep(0.1)  # polling interval; the condition ends the wait


def test_admin_status_names_the_node_and_its_redis(make_cluster, tmp_path):
    require_cluster_mode()
    sock = str(tmp_path / "admin.sock")
    c = make_cluster(1, *CLUSTER_ARGS, "--admin-socket", sock)
    out = subprocess.run([sys.executable, "-m", "selchat.cli", "admin", "--socket", sock, "--json", "status"],
                         capture_output=True, text=True, timeout=DEADLINE)
    cluster = json.loads(out.stdout)["cluster"]
    assert cluster["joined"] is True and cluster["fences"] == 0
    assert cluster["node"] == c.node_id(0) and cluster["redis"] == c.url
    text = subprocess.run([sys.executable, "-m", "selchat.cli", "admin", "--socket", sock, "status"],
                          capture_output=True, text=True, timeout=DEADLINE).stdout
    assert f"cluster:      {c.url}: node {c.node_id(0)}, fenced 0 times" in text, text


# -- limits the nodes count together ---------------------------------------------------------


def heard_by(c, index: int, user: V2User) -> None:
    """Everything published before now has reached node ``index``: a NOTICE
    sent to ``user`` (on that node) through Redis comes after it, on the same
    subscription."""
    key = user.name.lower()
    epoch = c.redis.call("HGET", f"selchat:u:{key}", "epoch").decode()
    c.redis.call("PUBLISH", f"selchat:n:{c.node_id(index)}", f"E {key} {epoch}\nNOTICE in sync")
    user.expect("NOTICE in sync")


def test_failed_logins_on_one_node_throttle_the_account_on_the_others(make_cluster):
    """Three wrong passwords for alice from one address on node 0: a fourth
    try from that address on node 1, even with the right password, is
    throttled as it would be on one server. Spreading guesses over the nodes
    gains nothing."""
    require_cluster_mode()
    c = make_cluster(2)
    alice = RawUser(c.node(0))
    alice.close()
    for _ in range(3):
        guess = c.node(0).connect()
        guess.send(f"LOGIN {alice.name} wrong-guess")
        assert guess.expect("ERR LOGIN ").startswith("ERR LOGIN auth-failed")
        guess.close()
    carol = V2User(c.node(1).connect)
    heard_by(c, 1, carol)
    again = c.node(1).connect()
    again.send(f"LOGIN {alice.name} pw secret")
    assert again.expect("ERR LOGIN ").startswith("ERR LOGIN throttled")


def test_accounts_made_on_one_node_count_against_the_address_on_the_others(make_cluster):
    """10 accounts at once from one address, counted across the cluster: the
    11th, on another node, is refused."""
    require_cluster_mode()
    c = make_cluster(2, *CLUSTER_ARGS, "--registrations-per-hour", "30")
    carol = V2User(c.node(1).connect)  # one account from this address, on node 1
    for _ in range(9):
        RawUser(c.node(0)).close()
    heard_by(c, 1, carol)
    late = c.node(1).connect()
    late.send(f"REGISTER {unique()} pw secret")
    assert late.expect("ERR REGISTER ").startswith("ERR REGISTER throttled")


def test_a_login_on_another_node_racing_an_unregister_leaves_no_session_of_the_deleted_account(make_cluster):
    """As on one server (test_server.py): UNREGISTER on node 0 and a LOGIN of
    the same account on node 1, hashed at the same time. Whichever finishes
    first, no session of the deleted account is left on any node."""
    require_cluster_mode()
    c = make_cluster(2, *CLUSTER_ARGS, "--scrypt-n", "16384")
    alice = RawUser(c.node(0), password="pw")
    other = c.node(1).connect()
    alice.chat.send("UNREGISTER pw")
    other.send(f"LOGIN {alice.name} pw")
    first = other.line()
    if first.startswith("WELCOME "):  # the login won, or its check began before the deletion
        assert other.expect_closed()[-1] == "BYE unregistered your account is deleted"
    else:
        assert first.startswith("ERR LOGIN auth-failed "), first
    for node in (0, 1):
        login = c.node(node).connect()
        login.send(f"LOGIN {alice.name} pw")
        login.expect("ERR LOGIN auth-failed ")


def test_an_operator_s_broadcast_on_one_node_reaches_the_users_of_every_node(make_cluster, tmp_path):
    require_cluster_mode()
    c, admin_socket = with_operator_node(make_cluster, tmp_path)
    alice, bob = V2User(c.node(0).connect), V2User(c.node(1).connect)
    told = admin(admin_socket, "broadcast", "back", "in", "5")
    assert alice.expect("NOTICE ") == "NOTICE back in 5"
    assert bob.expect("NOTICE ") == "NOTICE back in 5"
    assert told.returncode == 0, told
    assert told.stdout.strip() == "told 1 user here, and sent to the other nodes of the cluster"


def test_admin_status_on_a_node_counts_the_sessions_of_every_node(make_cluster, tmp_path):
    require_cluster_mode()
    c, admin_socket = with_operator_node(make_cluster, tmp_path)
    users = [V2User(c.node(0).connect), V2User(c.node(0).connect), V2User(c.node(1).connect)]  # kept open
    status = admin(admin_socket, "status")
    assert status.returncode == 0, status
    n0, n1 = c.node_id(0), c.node_id(1)
    each = ", ".join(f"{node}: {n}" for node, n in sorted({n0: 2, n1: 1}.items()))
    assert status.stdout.splitlines()[-1] == f"all nodes:    3 sessions ({each})", status.stdout
    for user in users:
        user.login.close()
