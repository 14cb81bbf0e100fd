"""Tests for selchat.server.hub: the chat policy, driven without any I/O.

The hub works on real ``Session`` objects whose login socket is a recorder, and
schedules request expiry on a real ``TimerWheel`` running on a fake clock. The
first half checks every command outcome and error code by hand; the second
half is a hypothesis state machine that runs random command sequences against
the hub and against a plain model of the rules in docs/protocol.md.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from selchat.protocol import events as ev
from selchat.reactor.timerwheel import TimerWheel
from selchat.server.hub import Hub, quiet_delay
from selchat.server.session import PendingRequest, Session

TIMEOUT = 60.0
_sids = itertools.count(1)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Stands in for the login socket's Peer: keeps what was sent."""

    class conn:  # a login socket that may carry any user event
        @staticmethod
        def can_send(event_type) -> bool:
            return True

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, event) -> None:
        self.sent.append(event)


def make_session(name: str) -> Session:
    session = Session(next(_sids), name, tokens={})
    session.login = Recorder()
    return session


def take(session: Session) -> list:
    """The events the session was told since the last take()."""
    sent = session.login.sent
    out = list(sent)
    sent.clear()
    return out


class World:
    """A hub on a fake clock, plus helpers to bring users online."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.wheel = TimerWheel(tick=1.0, slots=8, clock=self.clock)
        self.hub = Hub(self.wheel.call_later, TIMEOUT, draw=lambda: 0.5)

    def user(self, name: str) -> Session:
        session = make_session(name)
        self.hub.join(session)
        return session

    def users(self, *names: str) -> list[Session]:
        return [self.user(n) for n in names]

    def advance_to(self, t: float) -> int:
        self.clock.now = t
        return self.wheel.advance()

    def chatting(self, a: Session, b: Session) -> None:
        """Make a and b partners through the public commands; clear their inboxes."""
        assert self.hub.chat(a, b.name) == ev.Ok("CHAT", b.name)
        assert self.hub.accept(b) == ev.Ok("ACCEPT", a.name)
        take(a), take(b)

    def requested(self, a: Session, b: Session) -> PendingRequest:
        assert self.hub.chat(a, b.name) == ev.Ok("CHAT", b.name)
        take(a), take(b)
        return a.request


@pytest.fixture
def w() -> World:
    return World()


def assert_free(*sessions: Session) -> None:
    for s in sessions:
        assert s.partner is None and s.request is None and not s.busy, s


def assert_partners(a: Session, b: Session) -> None:
    assert a.partner is b and b.partner is a
    assert a.request is None and b.request is None
    assert a.busy and b.busy


def assert_quiet(*sessions: Session) -> None:
    for s in sessions:
        assert take(s) == [], s


# --- presence and WHO --------------------------------------------------------


def test_who_on_empty_hub(w):
    assert w.hub.who() == [ev.Ok("WHO", "0")]


def test_who_lists_online_users_sorted_case_insensitively_with_status(w):
    carol, alice, bob, dave = w.users("carol", "Alice", "bob", "Dave")
    w.requested(alice, bob)
    assert w.hub.who() == [
        ev.UserEntry("Alice", "busy"),
        ev.UserEntry("bob", "busy"),
        ev.UserEntry("carol", "idle"),
        ev.UserEntry("Dave", "idle"),
        ev.Ok("WHO", "4"),
    ]
    w.hub.accept(bob)
    w.hub.leave(carol, "left", "carol logged out")
    assert w.hub.who() == [
        ev.UserEntry("Alice", "busy"),
        ev.UserEntry("bob", "busy"),
        ev.UserEntry("Dave", "idle"),
        ev.Ok("WHO", "3"),
    ]
    w.hub.quit(alice)
    assert w.hub.who()[:2] == [ev.UserEntry("Alice", "idle"), ev.UserEntry("bob", "idle")]


def test_join_tells_nobody_anything(w):
    alice, bob = w.users("alice", "bob")
    assert_quiet(alice, bob)


def test_leave_of_a_replaced_session_keeps_the_new_one_online(w):
    old = w.user("alice")
    new = make_session("alice")
    w.hub.join(new)  # the app replaced the session under the same key
    w.hub.leave(old, "dropped", "gone")
    assert w.hub.who() == [ev.UserEntry("alice", "idle"), ev.Ok("WHO", "1")]
    bob = w.user("bob")
    assert w.hub.chat(bob, "alice") == ev.Ok("CHAT", "alice")
    assert take(new) == [ev.Request("bob")]
    assert_quiet(old)


# --- CHAT -------------------------------------------------------------------


def test_chat_ok_sends_request_to_target_only(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    assert w.hub.chat(alice, "bob") == ev.Ok("CHAT", "bob")
    assert take(bob) == [ev.Request("alice")]
    assert_quiet(alice, carol)
    req = alice.request
    assert isinstance(req, PendingRequest)
    assert bob.request is req and req.source is alice and req.target is bob
    assert alice.partner is None and bob.partner is None
    assert alice.busy and bob.busy and not carol.busy
    assert len(w.wheel) == 1  # the expiry timer


def test_chat_names_are_case_insensitive(w):
    alice, bob = w.users("alice", "Bob")
    assert w.hub.chat(alice, "BOB") == ev.Ok("CHAT", "Bob")  # the target's own spelling
    assert take(bob) == [ev.Request("alice")]
    assert alice.request is bob.request is not None


@pytest.mark.parametrize("name", ["alice", "ALICE", "Alice"])
def test_chat_self(w, name):
    alice, bob = w.users("alice", "bob")
    reply = w.hub.chat(alice, name)
    assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == ("CHAT", "self")
    assert_free(alice, bob)
    assert_quiet(alice, bob)
    assert len(w.wheel) == 0


def test_chat_while_chatting_is_in_chat(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.chatting(alice, bob)
    for name in ("carol", "bob", "nobody"):
        reply = w.hub.chat(alice, name)
        assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == ("CHAT", "in-chat")
        assert "bob" in reply.text
    assert_partners(alice, bob)
    assert_free(carol)
    assert_quiet(alice, bob, carol)


def test_chat_with_request_out_is_pending(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    req = w.requested(alice, bob)
    for name in ("carol", "bob", "nobody"):
        reply = w.hub.chat(alice, name)
        assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == ("CHAT", "pending")
        assert "bob" in reply.text
    assert alice.request is req and bob.request is req
    assert_free(carol)
    assert_quiet(alice, bob, carol)
    assert len(w.wheel) == 1


def test_chat_with_request_in_is_pending(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    req = w.requested(alice, bob)
    for name in ("carol", "alice"):
        reply = w.hub.chat(bob, name)
        assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == ("CHAT", "pending")
        assert "alice" in reply.text
    assert alice.request is req and bob.request is req
    assert_free(carol)
    assert_quiet(alice, bob, carol)


def _assert_busy(reply, who: str) -> None:
    assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == ("CHAT", "busy")
    assert who in reply.text


def test_chat_target_chatting_is_busy(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.chatting(alice, bob)
    _assert_busy(w.hub.chat(carol, "alice"), "alice")
    _assert_busy(w.hub.chat(carol, "BOB"), "bob")
    assert_partners(alice, bob)
    assert_free(carol)
    assert_quiet(alice, bob, carol)


def test_chat_target_with_request_out_is_busy(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    req = w.requested(alice, bob)
    _assert_busy(w.hub.chat(carol, "alice"), "alice")
    assert alice.request is req and bob.request is req
    assert_free(carol)
    assert_quiet(alice, bob, carol)
    assert len(w.wheel) == 1


def test_chat_target_with_request_in_is_busy(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    req = w.requested(alice, bob)
    _assert_busy(w.hub.chat(carol, "bob"), "bob")
    assert alice.request is req and bob.request is req
    assert_free(carol)
    assert_quiet(alice, bob, carol)
    assert len(w.wheel) == 1


def test_chat_with_offline_user_returns_none(w):
    alice, bob = w.users("alice", "bob")
    assert w.hub.chat(alice, "nobody") is None
    w.hub.leave(bob, "left", "bye")
    assert w.hub.chat(alice, "bob") is None
    assert_free(alice)
    assert_quiet(alice, bob)
    assert len(w.wheel) == 0


def test_chat_checks_own_state_before_looking_the_target_up(w):
    alice, bob = w.users("alice", "bob")
    w.chatting(alice, bob)
    # "nobody" is offline, but alice's own state is the answer
    assert w.hub.chat(alice, "nobody").code == "in-chat"


# --- ACCEPT / DECLINE --------------------------------------------------------


def test_accept_starts_the_chat(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.requested(alice, bob)
    assert w.hub.accept(bob) == ev.Ok("ACCEPT", "alice")
    assert take(alice) == [ev.Started("bob")]
    assert take(bob) == [ev.Started("alice")]
    assert_quiet(carol)
    assert_partners(alice, bob)
    assert len(w.wheel) == 0  # expiry timer cancelled
    assert w.advance_to(10 * TIMEOUT) == 0
    assert_partners(alice, bob)
    assert_quiet(alice, bob)


def test_decline_tells_the_requester(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.requested(alice, bob)
    assert w.hub.decline(bob) == ev.Ok("DECLINE", "alice")
    assert take(alice) == [ev.Declined("bob")]
    assert_quiet(bob, carol)
    assert_free(alice, bob)
    assert len(w.wheel) == 0
    assert w.advance_to(10 * TIMEOUT) == 0
    assert_quiet(alice, bob)
    # both are free to chat again
    assert w.hub.chat(bob, "alice") == ev.Ok("CHAT", "alice")


@pytest.mark.parametrize("verb", ["ACCEPT", "DECLINE"])
def test_answer_without_any_request_is_no_request(w, verb):
    alice, bob = w.users("alice", "bob")
    answer = w.hub.accept if verb == "ACCEPT" else w.hub.decline
    reply = answer(alice)
    assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == (verb, "no-request")
    assert_free(alice, bob)
    assert_quiet(alice, bob)


@pytest.mark.parametrize("verb", ["ACCEPT", "DECLINE"])
def test_requester_cannot_answer_own_request(w, verb):
    alice, bob = w.users("alice", "bob")
    req = w.requested(alice, bob)
    answer = w.hub.accept if verb == "ACCEPT" else w.hub.decline
    reply = answer(alice)
    assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == (verb, "no-request")
    assert alice.request is req and bob.request is req
    assert alice.partner is None and bob.partner is None
    assert_quiet(alice, bob)
    assert len(w.wheel) == 1


@pytest.mark.parametrize("verb", ["ACCEPT", "DECLINE"])
def test_answer_while_chatting_is_no_request(w, verb):
    alice, bob = w.users("alice", "bob")
    w.chatting(alice, bob)
    answer = w.hub.accept if verb == "ACCEPT" else w.hub.decline
    for s in (alice, bob):
        reply = answer(s)
        assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == (verb, "no-request")
    assert_partners(alice, bob)
    assert_quiet(alice, bob)


@pytest.mark.parametrize("verb", ["ACCEPT", "DECLINE"])
def test_bystander_cannot_answer(w, verb):
    alice, bob, carol = w.users("alice", "bob", "carol")
    req = w.requested(alice, bob)
    answer = w.hub.accept if verb == "ACCEPT" else w.hub.decline
    assert answer(carol).code == "no-request"
    assert alice.request is req and bob.request is req and carol.request is None
    assert_quiet(alice, bob, carol)


# --- QUIT -------------------------------------------------------------------


@pytest.mark.parametrize("quitter", ["alice", "bob"])
def test_quit_ends_the_chat_for_both(w, quitter):
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.chatting(alice, bob)
    me, other = (alice, bob) if quitter == "alice" else (bob, alice)
    assert w.hub.quit(me) == ev.Ok("QUIT", other.name)
    [mine] = take(me)
    [theirs] = take(other)
    assert isinstance(mine, ev.Ended) and (mine.user, mine.reason) == (other.name, "quit")
    assert isinstance(theirs, ev.Ended) and (theirs.user, theirs.reason) == (me.name, "quit")
    assert_quiet(carol)
    assert_free(alice, bob)
    # and neither can message the other any more
    assert w.hub.message(other, "hello?", 3).code == "not-in-chat"
    assert_quiet(me)


def test_quit_withdraws_own_pending_request(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.requested(alice, bob)
    assert w.hub.quit(alice) == ev.Ok("QUIT", "bob")
    assert take(bob) == [ev.Cancelled("alice")]
    assert_quiet(alice, carol)
    assert_free(alice, bob)
    assert len(w.wheel) == 0
    assert w.advance_to(10 * TIMEOUT) == 0
    assert_quiet(alice, bob)
    assert w.hub.accept(bob).code == "no-request"


def test_a_blocked_request_is_pending_for_the_asker_only_then_declined(w):
    """A quiet request: the asker is told OK and is busy with it (a second
    CHAT is "pending"); the one who blocked hears nothing, is not busy and
    may be asked by others; after quiet_delay the asker hears DECLINED."""
    alice, bob, carol = w.users("alice", "bob", "carol")
    assert w.hub.chat(alice, "BOB", blocked=True) == ev.Ok("CHAT", "bob")
    assert_quiet(alice, bob)
    assert alice.busy and not bob.busy and bob.request is None
    assert w.hub.chat(alice, "carol").code == "pending"
    assert w.hub.accept(bob).code == "no-request" and w.hub.decline(bob).code == "no-request"
    w.requested(carol, bob)  # bob is free for others
    due = quiet_delay(TIMEOUT, 0.5)
    assert w.advance_to(due - 1.0) == 0
    assert_quiet(alice)
    w.advance_to(due + 1.0)
    assert take(alice) == [ev.Declined("bob")]
    assert_quiet(bob, carol)
    assert alice.request is None and bob.request is carol.request is not None
    assert not w.hub.quiet


def test_a_blocked_request_ends_as_a_request_would_when_withdrawn_or_when_its_target_leaves(w):
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.hub.chat(alice, "bob", blocked=True)
    assert w.hub.quit(alice) == ev.Ok("QUIT", "bob")  # withdrawn: bob is told nothing
    assert_quiet(alice, bob)
    w.hub.chat(alice, "bob", blocked=True)
    w.hub.chat(carol, "bob", blocked=True)
    w.hub.leave(bob, "left", "bob left")
    assert take(alice) == [ev.Cancelled("bob")] and take(carol) == [ev.Cancelled("bob")]
    assert_free(alice, carol)
    assert w.advance_to(10 * TIMEOUT) == 0 and not w.hub.quiet
    assert_quiet(alice, carol)


def test_the_quiet_delay_is_a_part_of_the_request_timeout_at_most_20_s():
    assert quiet_delay(60.0, 0.0) == 5.0 and quiet_delay(60.0, 0.999) < 15.0
    assert quiet_delay(2.0, 0.0) == 0.5 and quiet_delay(2.0, 0.5) == 1.0


@pytest.mark.parametrize("case", ["chatting", "their-request", "my-request"])
def test_part_ends_the_chat_or_request_with_that_user_only(w, case):
    alice, bob, carol, dave = w.users("alice", "bob", "carol", "dave")
    w.chatting(carol, dave)  # a chat of others: untouched
    if case == "chatting":
        w.chatting(alice, bob)
    elif case == "their-request":
        w.requested(bob, alice)
    else:
        w.requested(alice, bob)
    w.hub.part(alice, "carol")  # with someone else: nothing happens
    assert_quiet(alice, bob, carol, dave)
    w.hub.part(alice, "bob")
    mine, theirs = take(alice), take(bob)
    if case == "chatting":
        assert mine == [ev.Ended("bob", "quit", "you ended the chat")]
        assert theirs == [ev.Ended("alice", "quit", "alice ended the chat")]
    else:
        assert mine == []  # the BLOCK's reply says it
        assert theirs == [ev.Declined("alice") if case == "their-request" else ev.Cancelled("alice")]
    assert_free(alice, bob)
    assert_partners(carol, dave)
    assert_quiet(carol, dave)


def test_quit_when_idle_is_not_in_chat(w):
    (alice,) = w.users("alice")
    reply = w.hub.quit(alice)
    assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == ("QUIT", "not-in-chat")
    assert_quiet(alice)


def test_quit_by_the_target_of_a_request_is_not_in_chat(w):
    alice, bob = w.users("alice", "bob")
    req = w.requested(alice, bob)
    reply = w.hub.quit(bob)
    assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == ("QUIT", "not-in-chat")
    assert alice.request is req and bob.request is req
    assert_quiet(alice, bob)


# --- expiry -----------------------------------------------------------------


def test_request_expires_after_the_timeout(w):
    w.advance_to(5.0)
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.requested(alice, bob)
    assert w.advance_to(5.0 + TIMEOUT - 0.5) == 0
    assert alice.request is bob.request is not None
    assert_quiet(alice, bob)
    assert w.advance_to(5.0 + TIMEOUT) == 1
    assert take(alice) == [ev.Expired("bob")]
    assert take(bob) == [ev.Expired("alice")]
    assert_quiet(carol)
    assert_free(alice, bob)
    assert len(w.wheel) == 0
    # both are free again: a new request works and gets a fresh timer
    assert w.hub.chat(bob, "alice") == ev.Ok("CHAT", "alice")
    assert len(w.wheel) == 1


@pytest.mark.parametrize("verb", ["ACCEPT", "DECLINE"])
def test_answer_after_expiry_is_no_request(w, verb):
    alice, bob = w.users("alice", "bob")
    w.requested(alice, bob)
    w.advance_to(TIMEOUT + 1)
    take(alice), take(bob)
    answer = w.hub.accept if verb == "ACCEPT" else w.hub.decline
    reply = answer(bob)
    assert isinstance(reply, ev.Error) and (reply.verb, reply.code) == (verb, "no-request")
    assert w.hub.quit(alice).code == "not-in-chat"
    assert_free(alice, bob)
    assert_quiet(alice, bob)


def test_expiry_of_one_request_leaves_a_later_one_alone(w):
    a, b, c, d = w.users("a", "b", "c", "d")
    w.requested(a, b)
    w.advance_to(30.0)
    w.requested(c, d)
    assert w.advance_to(TIMEOUT) == 1
    assert take(a) == [ev.Expired("b")] and take(b) == [ev.Expired("a")]
    assert c.request is d.request is not None
    assert w.advance_to(30.0 + TIMEOUT) == 1
    assert take(c) == [ev.Expired("d")] and take(d) == [ev.Expired("c")]


def test_stale_expiry_callback_is_harmless():
    """Even if a timer cannot be cancelled, a request that was answered or
    withdrawn and then replaced by a new one must not be expired by it."""

    class Sticky:
        def cancel(self):
            pass

    calls = []

    def call_later(delay, cb, *args):
        calls.append((delay, cb, args))
        return Sticky()

    hub = Hub(call_later, TIMEOUT)
    alice, bob, carol = (make_session(n) for n in ("alice", "bob", "carol"))
    for s in (alice, bob, carol):
        hub.join(s)
    hub.chat(alice, "bob")
    hub.accept(bob)
    hub.quit(alice)
    hub.chat(carol, "alice")  # alice now has a new request, from carol
    hub.chat(bob, "alice")  # busy: no timer
    take(alice), take(bob), take(carol)
    assert [c[0] for c in calls] == [TIMEOUT, TIMEOUT]
    delay, cb, args = calls[0]
    cb(*args)  # the first request's timer fires late
    assert_quiet(alice, bob, carol)
    assert alice.request is carol.request is not None
    delay, cb, args = calls[1]
    cb(*args)
    assert take(alice) == [ev.Expired("carol")] and take(carol) == [ev.Expired("alice")]
    cb(*args)  # a second firing does nothing
    assert_quiet(alice, bob, carol)


# --- leaving ----------------------------------------------------------------


@pytest.mark.parametrize("reason", ["left", "dropped", "shutdown"])
def test_leave_during_chat_tells_partner_with_the_given_reason(w, reason):
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.chatting(alice, bob)
    w.hub.leave(alice, reason, "alice went away")
    assert take(bob) == [ev.Ended("alice", reason, "alice went away")]
    assert_quiet(alice, carol)
    assert_free(alice, bob)
    assert w.hub.who() == [ev.UserEntry("bob", "idle"), ev.UserEntry("carol", "idle"), ev.Ok("WHO", "2")]
    assert w.hub.chat(bob, "alice") is None


@pytest.mark.parametrize("leaver", ["source", "target"])
def test_leave_with_pending_request_cancels_it(w, leaver):
    alice, bob, carol = w.users("alice", "bob", "carol")
    w.requested(alice, bob)
    gone, stays = (alice, bob) if leaver == "source" else (bob, alice)
    w.hub.leave(gone, "left", "bye")
    assert take(stays) == [ev.Cancelled(gone.name)]
    assert_quiet(gone, carol)
    assert_free(alice, bob)
    assert len(w.wheel) == 0
    assert w.advance_to(10 * TIMEOUT) == 0
    assert_quiet(alice, bob)
    assert w.hub.chat(stays, gone.name) is None


def test_leave_when_idle_tells_nobody(w):
    alice, bob = w.users("alice", "bob")
    w.hub.leave(alice, "left", "bye")
    assert_quiet(alice, bob)
    assert w.hub.who() == [ev.UserEntry("bob", "idle"), ev.Ok("WHO", "1")]


# --- MSG --------------------------------------------------------------------


def test_message_is_relayed_to_the_partner_only(w):
    alice, bob, carol, dave = w.users("alice", "bob", "carol", "dave")
    w.chatting(alice, bob)
    w.chatting(carol, dave)
    assert w.hub.message(alice, "hi bob", 1) is None
    assert w.hub.message(bob, "hi alice", 1) is None
    assert w.hub.message(alice, "how are you", 2) is None
    assert take(bob) == [ev.Incoming("alice", "hi bob"), ev.Incoming("alice", "how are you")]
    assert take(alice) == [ev.Incoming("bob", "hi alice")]
    assert_quiet(carol, dave)


@pytest.mark.parametrize("state", ["idle", "requester", "requested"])
def test_message_outside_a_chat_is_nacked_with_the_seq(w, state):
    alice, bob = w.users("alice", "bob")
    if state == "requester":
        w.requested(alice, bob)
    elif state == "requested":
        w.requested(bob, alice)
    reply = w.hub.message(alice, "anyone?", 7)
    assert isinstance(reply, ev.Nack) and (reply.seq, reply.code) == (7, "not-in-chat")
    assert w.hub.message(alice, "anyone?", 8).seq == 8
    assert_quiet(alice, bob)


# --- the state machine -------------------------------------------------------

NAMES = ["alice", "Bob", "carol", "DAVE", "eve"]


def variants(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name.swapcase()])


def norm(event):
    """What the comparison looks at: the texts of errors and ENDED are for
    people (ENDED's text is checked exactly when it comes from leave())."""
    if isinstance(event, ev.Error):
        return ("ERR", event.verb, event.code)
    if isinstance(event, ev.Nack):
        return ("NACK", event.seq, event.code)
    if isinstance(event, ev.Ended) and event.reason == "quit":
        return ("ENDED", event.user, event.reason)
    return event


def err(verb: str, code: str):
    return ("ERR", verb, code)


class Model:
    """The rules of docs/protocol.md on plain dicts. Sessions are used only as
    identities (plus their name and key); their partner and request are never read."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.now = 0.0
        self.online: dict[str, Session] = {}  # key -> session
        self.partner: dict[Session, Session] = {}
        self.requests: dict[tuple[Session, Session], float] = {}  # (source, target) -> deadline
        self.inbox: dict[Session, list] = {}  # everything each user was told
        self.blocks: set[tuple[str, str]] = set()  # (key, key it has blocked): the account store's
        self.quiet: set[tuple[Session, Session]] = set()  # requests to one who blocked the asker

    def tell(self, s: Session, event) -> None:
        self.inbox[s].append(norm(event))

    def request_of(self, s: Session):
        """The request ``s`` has: asked, or asked of it (a quiet one is the asker's only)."""
        for pair in self.requests:
            if s is pair[0] or (s is pair[1] and pair not in self.quiet):
                return pair
        return None

    def busy(self, s: Session) -> bool:
        return s in self.partner or self.request_of(s) is not None

    def join(self, s: Session) -> None:
        self.online[s.key] = s
        self.inbox.setdefault(s, [])

    def leave(self, s: Session, reason: str, text: str) -> None:
        if self.online.get(s.key) is s:
            del self.online[s.key]
        pair = self.request_of(s)
        if pair is not None:
            del self.requests[pair]
            if pair in self.quiet:
                self.quiet.discard(pair)
            else:
                other = pair[1] if pair[0] is s else pair[0]
                self.tell(other, ev.Cancelled(s.name))
        for pair in [q for q in self.requests if q[1] is s and q in self.quiet]:
            del self.requests[pair]
            self.quiet.discard(pair)
            self.tell(pair[0], ev.Cancelled(s.name))
        p = self.partner.pop(s, None)
        if p is not None:
            del self.partner[p]
            self.tell(p, ev.Ended(s.name, reason, text))

    def chat(self, s: Session, name: str):
        key = name.lower()
        if key == s.key:
            return err("CHAT", "self")
        if s in self.partner:
            return err("CHAT", "in-chat")
        if self.request_of(s) is not None:
            return err("CHAT", "pending")
        t = self.online.get(key)
        if t is None:
            return None
        if self.busy(t):
            return err("CHAT", "busy")
        if (t.key, s.key) in self.blocks:  # quiet: the asker's only, declined after a while
            self.requests[(s, t)] = self.now + quiet_delay(self.timeout, 0.5)
            self.quiet.add((s, t))
            return ev.Ok("CHAT", t.name)
        self.requests[(s, t)] = self.now + self.timeout
        self.tell(t, ev.Request(s.name))
        return ev.Ok("CHAT", t.name)

    def _incoming(self, s: Session):
        pair = self.request_of(s)
        return pair if pair is not None and pair[1] is s else None

    def accept(self, s: Session):
        pair = self._incoming(s)
        if pair is None:
            return err("ACCEPT", "no-request")
        del self.requests[pair]
        src = pair[0]
        self.partner[s], self.partner[src] = src, s
        self.tell(src, ev.Started(s.name))
        self.tell(s, ev.Started(src.name))
        return ev.Ok("ACCEPT", src.name)

    def decline(self, s: Session):
        pair = self._incoming(s)
        if pair is None:
            return err("DECLINE", "no-request")
        del self.requests[pair]
        self.tell(pair[0], ev.Declined(s.name))
        return ev.Ok("DECLINE", pair[0].name)

    def quit(self, s: Session):
        p = self.partner.pop(s, None)
        if p is not None:
            del self.partner[p]
            self.tell(p, ev.Ended(s.name, "quit", ""))
            self.tell(s, ev.Ended(p.name, "quit", ""))
            return ev.Ok("QUIT", p.name)
        pair = self.request_of(s)
        if pair is not None and pair[0] is s:
            del self.requests[pair]
            if pair in self.quiet:
                self.quiet.discard(pair)
            else:
                self.tell(pair[1], ev.Cancelled(s.name))
            return ev.Ok("QUIT", pair[1].name)
        return err("QUIT", "not-in-chat")

    def block(self, s: Session, key: str) -> None:
        """BLOCK: on the list from now on; a chat or request with them ends."""
        self.blocks.add((s.key, key))
        p = self.partner.get(s)
        pair = self.request_of(s)
        if p is not None and p.key == key:
            self.quit(s)
        elif pair is not None and (pair[0] if pair[1] is s else pair[1]).key == key:
            (self.decline if pair[1] is s else self.quit)(s)

    def message(self, s: Session, text: str, seq: int):
        p = self.partner.get(s)
        if p is None:
            return ("NACK", seq, "not-in-chat")
        self.tell(p, ev.Incoming(s.name, text))
        return None

    def advance(self, dt: float) -> None:
        self.now += dt
        for (src, tgt), deadline in sorted(self.requests.items(), key=lambda kv: kv[1]):
            if deadline <= self.now:
                del self.requests[(src, tgt)]
                if (src, tgt) in self.quiet:
                    self.quiet.discard((src, tgt))
                    self.tell(src, ev.Declined(tgt.name))
                    continue
                self.tell(src, ev.Expired(tgt.name))
                self.tell(tgt, ev.Expired(src.name))

    def who(self) -> list:
        entries = [ev.UserEntry(s.name, "busy" if self.busy(s) else "idle")
                   for key, s in sorted(self.online.items())]
        return entries + [ev.Ok("WHO", str(len(entries)))]


class HubMachine(RuleBasedStateMachine):
    users = Bundle("users")  # exactly the sessions currently online

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)
        self.wheel = TimerWheel(tick=1.0, slots=8, clock=self.clock)  # 60 s = several rotations
        self.hub = Hub(self.wheel.call_later, TIMEOUT, draw=lambda: 0.5)
        self.model = Model(TIMEOUT)
        self.gone: list[Session] = []  # sessions that left
        self.seq: dict[Session, int] = {}  # MSG frames sent so far, per session
        self.checked: dict[Session, int] = {}  # events already vetted by incoming_from_partner

    def _new(self, name: str) -> Session:
        s = make_session(name)
        self.hub.join(s)
        self.model.join(s)
        return s

    def _do(self, verb: str, a: Session, *args):
        """Run one command on the hub and on the model; the replies must agree.
        A CHAT is told, as Blocking tells it, whether the one asked blocked the asker."""
        extra = ()
        if verb == "chat":
            extra = ((args[0].lower(), a.key) in self.model.blocks,)
        got = getattr(self.hub, verb)(a, *args, *extra)
        want = getattr(self.model, verb)(a, *args)
        assert norm(got) == want, (verb, a, args)

    def _leave(self, s: Session, reason: str, text: str) -> None:
        self.hub.leave(s, reason, text)
        self.model.leave(s, reason, text)
        self.gone.append(s)

    @initialize(target=users)
    def first_users(self):
        return multiple(*(self._new(n) for n in NAMES[:3]))

    # -- presence ----------------------------------------------------------------

    @precondition(lambda self: len(self.model.online) < len(NAMES))
    @rule(target=users, data=st.data())
    def join(self, data):
        offline = [n for n in NAMES if n.lower() not in self.model.online]
        return self._new(data.draw(st.sampled_from(offline), label="name"))

    @precondition(lambda self: len(self.model.online) > 2)
    @rule(s=consumes(users), reason=st.sampled_from(["left", "dropped", "shutdown"]))
    def leave(self, s, reason):
        self._leave(s, reason, f"{s.name} {reason}")

    @rule(target=users, old=consumes(users))
    def log_in_again(self, old):
        """The same account logs in again: the app ends the old session first."""
        self._leave(old, "dropped", "replaced")
        return self._new(old.name)

    @rule(a=users)
    def who(self, a):
        assert self.hub.who() == self.model.who()

    # -- commands from anyone: mostly refusals -------------------------------------

    @rule(a=users, b=users, data=st.data())
    def chat(self, a, b, data):
        self._do("chat", a, data.draw(variants(b.name), label="spelling"))

    @rule(a=users, name=st.sampled_from(NAMES + ["zed"]))
    def chat_by_name(self, a, name):
        self._do("chat", a, name)  # may be offline, or a user who left

    @rule(a=users)
    def accept(self, a):
        self._do("accept", a)

    @rule(a=users)
    def decline(self, a):
        self._do("decline", a)

    @rule(a=users)
    def quit(self, a):
        self._do("quit", a)

    @rule(a=users, name=st.sampled_from(NAMES), unblock=st.booleans())
    def block(self, a, name, unblock):
        """BLOCK (or UNBLOCK) name: what Blocking does around the hub, with
        the list kept where the store would keep it (here, the model's)."""
        key = name.lower()
        if key == a.key:
            return  # refused before the hub hears of it
        if unblock:
            self.model.blocks.discard((a.key, key))
            return
        self.model.block(a, key)
        self.hub.part(a, key)

    @precondition(lambda self: any(o in self.model.online and b in self.model.online and o != b
                                   for o, b in self.model.blocks))
    @rule(data=st.data())
    def blocked_user_asks(self, data):
        """Someone asks a user who has blocked them (a quiet request, if both are free)."""
        online = self.model.online
        pairs = sorted((o, b) for o, b in self.model.blocks if o in online and b in online and o != b)
        owner, blocked = data.draw(st.sampled_from(pairs), label="block")
        self._do("chat", online[blocked], online[owner].name)

    @rule(a=users, text=st.sampled_from(["hi", "ok", "bye"]))
    def message(self, a, text):
        self._say(a, text)

    def _say(self, a: Session, text: str) -> None:
        seq = self.seq[a] = self.seq.get(a, 0) + 1
        self._do("message", a, f"{text} {seq}", seq)

    # -- commands from users in the right state: mostly successes -------------------

    def _pick_request(self, data):
        return data.draw(st.sampled_from(list(self.model.requests)), label="request")

    def _pick_chatter(self, data):
        return data.draw(st.sampled_from(list(self.model.partner)), label="chatter")

    @precondition(lambda self: self.model.requests)
    @rule(data=st.data())
    def target_accepts(self, data):
        self._do("accept", self._pick_request(data)[1])

    @precondition(lambda self: self.model.requests)
    @rule(data=st.data())
    def target_declines(self, data):
        self._do("decline", self._pick_request(data)[1])

    @precondition(lambda self: self.model.requests)
    @rule(data=st.data())
    def source_withdraws(self, data):
        self._do("quit", self._pick_request(data)[0])

    @precondition(lambda self: self.model.partner)
    @rule(data=st.data())
    def chatter_quits(self, data):
        self._do("quit", self._pick_chatter(data))

    @precondition(lambda self: self.model.partner)
    @rule(data=st.data(), text=st.sampled_from(["hi", "ok", "bye"]))
    def chatter_says(self, data, text):
        self._say(self._pick_chatter(data), text)

    @rule(dt=st.sampled_from([1.0, 9.0, 10.0, 11.0, 29.0, TIMEOUT - 1, TIMEOUT, TIMEOUT + 1, 3 * TIMEOUT]))
    def expire(self, dt):
        self.clock.now += dt
        self.wheel.advance()
        self.model.advance(dt)

    # -- invariants --------------------------------------------------------------

    def everyone(self):
        return list(self.model.inbox)

    @invariant()
    def events_match_the_model(self):
        for s in self.everyone():
            assert [norm(e) for e in s.login.sent] == self.model.inbox[s], s

    @invariant()
    def state_matches_the_model(self):
        m = self.model
        assert self.hub.online == m.online
        for s in self.everyone():
            assert s.partner is m.partner.get(s), s
            pair = m.request_of(s)
            if pair is None:
                assert s.request is None, s
            else:
                assert s.request is not None and (s.request.source, s.request.target) == pair, s
            assert s.busy == m.busy(s)

    @invariant()
    def partner_relation_is_symmetric(self):
        for s in self.everyone():
            if s.partner is not None:
                assert s.partner is not s
                assert s.partner.partner is s

    @invariant()
    def nobody_both_chatting_and_requesting(self):
        for s in self.everyone():
            assert s.partner is None or s.request is None, s

    @invariant()
    def requests_are_shared_by_exactly_source_and_target(self):
        holders: dict[int, list] = {}
        reqs = {}
        for s in self.everyone():
            if s.request is not None:
                holders.setdefault(id(s.request), []).append(s)
                reqs[id(s.request)] = s.request
        for key, req in reqs.items():
            assert req.source is not req.target
            holding = [req.source] if req.quiet else [req.source, req.target]
            assert sorted(holders[key], key=id) == sorted(holding, key=id)
        # one live expiry timer per pending request, none left over
        assert len(self.wheel) == len(reqs) == len(self.model.requests)

    @invariant()
    def every_online_user_is_in_who(self):
        listed = self.hub.who()
        assert listed[-1] == ev.Ok("WHO", str(len(self.model.online)))
        names = [e.user for e in listed[:-1]]
        assert names == sorted(names, key=str.lower)
        assert sorted(names) == sorted(s.name for s in self.model.online.values())

    @invariant()
    def nobody_references_a_session_that_left(self):
        gone = {id(s) for s in self.gone}
        for s in self.gone:
            assert s.partner is None and s.request is None, s
        for s in self.everyone():
            assert id(s.partner) not in gone, s
            if s.request is not None:
                assert id(s.request.source) not in gone and id(s.request.target) not in gone, s
        for s in self.hub.online.values():
            assert id(s) not in gone, s

    @invariant()
    def incoming_comes_from_the_current_partner(self):
        for s in self.everyone():
            sent = s.login.sent
            for e in sent[self.checked.get(s, 0):]:
                if isinstance(e, ev.Incoming):
                    assert s.partner is not None and e.user == s.partner.name, (s, e)
            self.checked[s] = len(sent)


HubMachine.TestCase.settings = settings(max_examples=250, stateful_step_count=50, deadline=None)
test_hub_state_machine = HubMachine.TestCase


# --- shutdown ------------------------------------------------------------------


def test_end_all_tells_both_partners_the_same_and_ends_requests(w):
    alice, bob, carol, dave, erin = w.users("alice", "bob", "carol", "dave", "erin")
    w.chatting(alice, bob)
    w.requested(carol, dave)
    w.hub.end_all("shutdown", "the server is shutting down")
    assert take(alice) == [ev.Ended("bob", "shutdown", "the server is shutting down")]
    assert take(bob) == [ev.Ended("alice", "shutdown", "the server is shutting down")]
    assert take(carol) == [ev.Expired("dave")]
    assert take(dave) == [ev.Expired("carol")]
    assert_quiet(erin)
    assert_free(alice, bob, carol, dave, erin)
    assert len(w.wheel) == 0  # the request's expiry timer is cancelled
