"""Logging in: LOGIN and REGISTER, from the frame to the session; and the
commands the current password must back, PASSWORD and UNREGISTER.

Throttling of failed logins (per account and address, and per address),
the fair queue of password checks waiting for a worker thread, and the
verdict: a refusal, a failure that counts toward closing the socket, or a
new session (``Registry.start_session``). The hash itself runs on a worker
(``Accounts``); nothing here blocks the loop.

In a cluster the nodes count failed logins and accounts made together, and
learn of each other's deletions and locks (``shared``, ``ClusterNode.share``).

May touch: the peer being logged in (pause, resume, send, close), the
account store through its non-blocking calls, the metrics and the log
events; from the ``Server`` its config (swapped on reload) and ``stopping``,
the registry to end the session of an account just deleted, and the
cluster node's ``claim``, ``track`` and ``share``.
"""

from __future__ import annotations

import logging
import math

from selchat.protocol import events as ev
from selchat.server import audit
from selchat.server.limits import FailureTracker, FairQueue, TokenBucket
from selchat.server.peer import WAITING
from selchat.store.accounts import (
    MAX_PASSWORD_BYTES, AccountLocked, StorageUnavailable, StoreError, check_password,
)

log = logging.getLogger("selchat.server")

AUTH_FAILED = "invalid username or password"
WRONG_PASSWORD = "that is not your current password"
SHUTTING_DOWN = "the server is shutting down"
#: A login or command that needs the cluster (``--cluster``) while it is unreachable.
UNAVAILABLE = "the cluster is unreachable; try again shortly"
#: Password checks one address may have waiting for a worker; more are "busy".
HASHES_PER_ADDRESS = 8
#: Failed logins for one account from one address before further attempts
#: from that address are throttled (other addresses are not).
FREE_FAILURES_PER_ACCOUNT = 3


class Logins:
    def __init__(self, server):
        self.server = server
        self.reactor = server.reactor
        # Failed logins throttle further attempts from the same address: for
        # one account after 3, for any account after config.throttle_after
        # (many users may share an address; 0 = never). A fresh address is
        # never slowed.
        self.pair_failures = FailureTracker(free=FREE_FAILURES_PER_ACCOUNT)
        self.addr_failures = FailureTracker(free=server.config.throttle_after or None)
        self.queue = FairQueue()    # password checks waiting, per address
        self.registrations: dict[str, TokenBucket] = {}  # address -> accounts it may still create
        # key -> (when, "deleted" or "locked"): an UNREGISTER or an operator's
        # lock, for the logins of the account already under way then.
        self.revoked: dict[str, tuple[float, str]] = {}
        self.hashing = 0            # password checks on a worker

    def on_login(self, peer, event) -> None:
        """LOGIN or REGISTER: answer a throttled or hopeless attempt at once,
        else queue the password check for a worker; stop reading meanwhile.

        Failed logins throttle further attempts from the same address only
        (for one account after FREE_FAILURES_PER_ACCOUNT, for any account
        after config.throttle_after), so a guesser never locks the owner out
        from elsewhere. A LOGIN counts as a failure for its account from
        its address from the moment it is queued, so parallel guesses are
        throttled too; a success clears it.
        Checks wait in a FairQueue by address: one address's flood delays
        another address's login by at most one check per busy address.
        """
        register = type(event) is ev.Register
        verb = "REGISTER" if register else "LOGIN"
        if register and not self.server.config.registration:
            self._login_refused(peer, verb, "registration-closed", "registration is closed on this server")
            return
        if len(event.password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
            # Never hash it: a long password costs as much as many guesses.
            self._login_failed(peer, verb, event.user, "bad-password",
                               f"password must be at most {MAX_PASSWORD_BYTES} bytes of UTF-8")
            return
        host = peer.host
        pair = (event.user.lower(), host)
        now = self.reactor.clock()
        wait = max(self.pair_failures.delay(pair, now), self.addr_failures.delay(host, now))
        if wait > 0:
            seconds = math.ceil(wait)
            self.server.metrics.logins["throttled"] += 1
            audit.emit("throttled", logging.WARNING, user=event.user, addr=host, wait=seconds)
            self._login_failed(peer, verb, event.user, "throttled",
                               f"{seconds} too many failed logins; try again in {seconds} s", counted=False)
            return
        if len(self.queue) >= self.server.config.max_hash_queue or self.queue.queued(host) >= HASHES_PER_ADDRESS:
            self._login_refused(peer, verb, "busy", "the server is busy; try again in a moment")
            return
        if register:
            wait = self._registration_wait(host, now)
            if wait > 0:
                seconds = math.ceil(wait)
                self.server.metrics.logins["throttled"] += 1
                audit.emit("throttled", logging.WARNING, user=event.user, addr=host, wait=seconds)
                self._login_failed(peer, verb, event.user, "throttled",
                                   f"{seconds} too many accounts created from your address; try again in {seconds} s",
                                   counted=False)
                return
        else:
            self.pair_failures.failed(pair, now)
        peer.pause(WAITING)
        self.queue.push(host, (peer, event, verb, pair, now))
        self._run_hashes()

    def on_password(self, peer, event) -> None:
        """PASSWORD <old> <new> on a chat socket: the old password is checked
        and the new one hashed and stored on a worker, in the same queue as
        logins; reading the socket waits meanwhile. A wrong old password
        counts as a failed login for the account from that address (so it
        is throttled as guesses at LOGIN are), without closing anything."""
        try:
            check_password(event.new)
        except StoreError as exc:
            peer.send(ev.Error("PASSWORD", "bad-password", str(exc)))
            return
        self._with_password(peer, event, "PASSWORD", event.old)

    def on_unregister(self, peer, event) -> None:
        """UNREGISTER <password> on a chat socket: the account is deleted, if
        the password is right (checked as PASSWORD's old one is), and the
        session ends."""
        self._with_password(peer, event, "UNREGISTER", event.password)

    def _with_password(self, peer, event, verb: str, password: str) -> None:
        """A command of a logged-in user that the current ``password`` must
        back: checked on a worker, in the logins' fair queue, and throttled
        with them (a wrong one counts as a failed login for the account
        from that address)."""
        name = peer.session.name
        if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
            peer.send(ev.Error(verb, "auth-failed", WRONG_PASSWORD))
            return
        host = peer.host
        pair = (name.lower(), host)
        now = self.reactor.clock()
        wait = max(self.pair_failures.delay(pair, now), self.addr_failures.delay(host, now))
        if wait > 0:
            seconds = math.ceil(wait)
            audit.emit("throttled", logging.WARNING, user=name, addr=host, wait=seconds)
            peer.send(ev.Error(verb, "throttled", f"too many wrong passwords; try again in {seconds} s"))
            return
        if len(self.queue) >= self.server.config.max_hash_queue or self.queue.queued(host) >= HASHES_PER_ADDRESS:
            peer.send(ev.Error(verb, "busy", "the server is busy; try again in a moment"))
            return
        self.pair_failures.failed(pair, now)
        peer.pause(WAITING)
        self.queue.push(host, (peer, event, verb, pair, now))
        self._run_hashes()

    def _run_hashes(self) -> None:
        """Keep every worker busy with the next password check, fairly by address."""
        accounts = self.server.accounts
        while self.hashing < self.server.config.workers and self.queue:
            peer, event, verb, pair, queued = self.queue.pop()
            if peer.transport.closing:
                continue  # gave up waiting; its charge stands (it never proved the password)
            self.hashing += 1
            if verb == "PASSWORD":
                accounts.change_password(pair[0], event.old, event.new,
                                         done=lambda fut, p=peer, k=pair: self._checked(p, k, "PASSWORD", fut))
                continue
            if verb == "UNREGISTER":
                accounts.delete_account(pair[0], event.password,
                                        done=lambda fut, p=peer, k=pair: self._checked(p, k, "UNREGISTER", fut))
                continue
            call = accounts.register if verb == "REGISTER" else accounts.verify
            call(event.user, event.password,
                 done=lambda fut, p=peer, e=event, v=verb, k=pair, q=queued: self._login_done(p, e, v, k, q, fut))

    def _checked(self, peer, pair, verb: str, future) -> None:
        """PASSWORD or UNREGISTER is back from its worker."""
        self.hashing -= 1
        self._run_hashes()
        host = peer.host
        try:
            name = future.result()
        except StoreError as exc:
            self.pair_failures.refund(pair)
            if isinstance(exc, StorageUnavailable):
                audit.emit("storage-error", logging.ERROR, user=pair[0], addr=host, error=str(exc))
            reply = ev.Error(verb, exc.code, str(exc))
        except Exception as exc:
            log.exception("account store failed")
            self.pair_failures.refund(pair)
            audit.emit("storage-error", logging.ERROR, user=pair[0], addr=host, error=repr(exc))
            reply = ev.Error(verb, "storage", "the account store failed; try again later")
        else:
            if name is None:
                self.addr_failures.failed(host, self.reactor.clock())
                self._share("failed", pair)
                audit.emit("password-failed" if verb == "PASSWORD" else "unregister-failed", logging.WARNING,
                           user=pair[0], addr=host)
                reply = ev.Error(verb, "auth-failed", WRONG_PASSWORD)
            elif verb == "UNREGISTER":
                self._succeeded(pair)
                audit.emit("account-deleted", user=name, addr=host)
                self._unregistered(peer, name)
                return
            else:
                self._succeeded(pair)
                audit.emit("password-changed", user=name, addr=host)
                reply = ev.Ok("PASSWORD")
        if not peer.transport.closing:
            peer.send(reply)
            peer.resume(WAITING)

    def _unregistered(self, peer, name: str) -> None:
        """The account is gone: OK UNREGISTER, then the session ends as at
        EXIT (the partner hears that the user left). So does a session of
        the account that a login elsewhere started while the password was
        being checked (it took over from this one); a login whose check
        began before the deletion and ends after it is refused."""
        registry = self.server.registry
        self.revoke(name.lower(), "deleted")
        peer.send(ev.Ok("UNREGISTER", name))
        for session in (peer.session, registry.sessions.get(name.lower())):
            if session is not None:
                self._end_deleted(session)
        self._share("deleted", (name.lower(), peer.host))  # the same on the other nodes of a cluster

    def revoke(self, key: str, why: str) -> None:
        """The account was deleted (``why`` "deleted") or locked ("locked")
        just now: a login of it whose password check or claim is under way
        is refused when it ends, as if it had started after."""
        now = self.reactor.clock()
        if len(self.revoked) > 1000:  # only logins queued before it look here: they are soon done
            self.revoked = {k: v for k, v in self.revoked.items() if now - v[0] < 600}
        self.revoked[key] = (now, why)

    def _revoked(self, name: str, queued: float) -> str | None:
        """Why a login of ``name`` queued at ``queued`` may not go on, if it may not."""
        when, why = self.revoked.get(name.lower(), (-1.0, ""))
        return why if when >= queued else None

    def locked(self, name: str) -> None:
        """An operator locked the account (``selchat admin lock``)."""
        self.revoke(name.lower(), "locked")
        self._share("locked", (name.lower(), "-"))

    def _end_deleted(self, session) -> None:
        self.server.registry.end_session(session, "left", f"{session.name} left",
                                         ev.Bye("unregistered", "your account is deleted"), why="unregistered")

    def _login_done(self, peer, event, verb: str, pair, queued: float, future) -> None:
        self.hashing -= 1
        self._run_hashes()
        try:
            name = future.result()
        except StorageUnavailable as exc:
            self._refund(verb, pair)
            self.server.metrics.logins["error"] += 1
            audit.emit("storage-error", logging.ERROR, user=event.user, addr=peer.host, error=str(exc))
            self._login_refused(peer, verb, exc.code, str(exc), count=False)
            return
        except AccountLocked as exc:  # the right password, for an account an operator locked
            self._succeeded(pair)
            audit.emit("login-locked", logging.WARNING, user=event.user, addr=peer.host)
            self._login_refused(peer, verb, exc.code, str(exc))
            return
        except StoreError as exc:  # bad username, name taken: the client's mistake
            self._refund(verb, pair)
            self._login_refused(peer, verb, exc.code, str(exc))
            return
        except Exception as exc:
            log.exception("account store failed")
            self._refund(verb, pair)
            self.server.metrics.logins["error"] += 1
            audit.emit("storage-error", logging.ERROR, user=event.user, addr=peer.host, error=repr(exc))
            self._login_refused(peer, verb, "storage", "the account store failed; try again later", count=False)
            return
        revoked = self._revoked(name, queued) if name is not None and verb == "LOGIN" else None
        if revoked == "deleted":
            name = None  # its password was checked just before its owner deleted the account
        elif revoked == "locked":  # ... or before an operator locked it
            self._succeeded(pair)  # the right password, as for a lock the check saw
            self._refused_locked(peer, verb, event.user)
            return
        if name is None:  # logged even if the guesser hung up before the answer
            self.addr_failures.failed(peer.host, self.reactor.clock())
            self._share("failed", pair)
            self.server.metrics.logins["failed"] += 1
            audit.emit("login-failed", logging.WARNING, user=event.user, addr=peer.host, reason="auth-failed")
            if not peer.transport.closing:
                self._login_failed(peer, verb, event.user, "auth-failed", AUTH_FAILED, counted=False)
            return
        if verb == "LOGIN":
            self._succeeded(pair)
        else:
            self._share("registered", pair)
        if peer.transport.closing:
            return
        if self.server.stopping:
            peer.close(ev.Bye("shutdown", SHUTTING_DOWN))
            return
        cluster = self.server.cluster
        if cluster is None:
            self._welcome(peer, verb, name, "0")
            return

        def claimed(epoch) -> None:  # the cluster has made this node the account's holder, or could not
            if peer.transport.closing or self.server.stopping:
                if epoch is not None:
                    cluster.eval("leave", name.lower(), epoch, "dropped", f"{name} lost connection")
                return
            if epoch is None:
                self._login_refused(peer, verb, "unavailable", UNAVAILABLE, count=False)
                return
            revoked = self._revoked(name, queued) if verb == "LOGIN" else None
            if revoked is not None:  # deleted or locked while this login was claimed (also Logins.shared)
                cluster.eval("leave", name.lower(), epoch, "left", f"{name} left")
                if revoked == "deleted":
                    self._login_failed(peer, verb, event.user, "auth-failed", AUTH_FAILED, counted=False)
                else:
                    self._refused_locked(peer, verb, event.user)
                return
            current = self.server.registry.sessions.get(name.lower())
            if epoch == "superseded" or (current is not None and int(current.epoch) > int(epoch)):
                # a later login of the account won the race (here or on another node)
                peer.close(ev.Bye("replaced", "logged in from another client"))
                return
            self._welcome(peer, verb, name, epoch)

        cluster.claim(name, peer.version == 2, claimed)

    def _welcome(self, peer, verb: str, name: str, epoch: str) -> None:
        self.server.metrics.logins["ok"] += 1
        session = self.server.registry.start_session(peer, name, epoch)
        cluster = self.server.cluster
        if cluster is not None and session.outbox is not None:
            cluster.track(session, f"{session.sid}.{session.resume_secret}")
        audit.emit("register" if verb == "REGISTER" else "login", user=name, addr=peer.host, session=session.sid)
        peer.resume(WAITING)

    def _registration_wait(self, host: str, now: float) -> float:
        """0 and one account charged to ``host``, or how long it must wait
        to create another (config.registrations_per_hour, after a burst)."""
        cfg = self.server.config
        if cfg.registrations_per_hour <= 0:
            return 0.0
        rate = self.registrations.get(host)
        if rate is None:
            if len(self.registrations) > 10_000:
                for known, old in list(self.registrations.items()):
                    old.refill(now)
                    if old.full:
                        del self.registrations[known]
            rate = self.registrations[host] = TokenBucket(cfg.registrations_per_hour / 3600, cfg.registration_burst,
                                                          now)
        return 0.0 if rate.take(now) else rate.wait()

    # -- in a cluster, the other nodes count these too --------------------------

    def _succeeded(self, pair) -> None:
        self.pair_failures.succeeded(pair)
        self._share("succeeded", pair)

    def _share(self, kind: str, pair) -> None:
        cluster = self.server.cluster
        if cluster is not None:
            cluster.share(kind, *pair)

    def shared(self, kind: str, user: str = "", host: str = "", *_) -> None:
        """What another node of the cluster counted (``ClusterNode.share``):
        counted here too, so that spreading attempts over the nodes gains
        nothing. A failure counts for the account from that address and for
        the address; a success clears the former; an account made takes one
        from the address's allowance. A deleted account's session here
        ends, and a login of a deleted or locked account checked before the
        news is refused, as on the node where it happened."""
        now = self.reactor.clock()
        if kind == "failed":
            self.pair_failures.failed((user, host), now)
            self.addr_failures.failed(host, now)
        elif kind == "succeeded":
            self.pair_failures.succeeded((user, host))
        elif kind == "registered":
            self._registration_wait(host, now)
        elif kind == "deleted":
            self.revoke(user, kind)
            session = self.server.registry.sessions.get(user)
            if session is not None:
                self._end_deleted(session)
        elif kind == "locked":  # its session, wherever it is, the operator's node ends (kick_elsewhere)
            self.revoke(user, kind)

    def _refund(self, verb: str, pair) -> None:
        """The check never ran to a verdict (or, for REGISTER, made no account):
        take back what was charged in advance."""
        if verb == "LOGIN":
            self.pair_failures.refund(pair)
        elif verb == "REGISTER":
            rate = self.registrations.get(pair[1])
            if rate is not None:
                rate.tokens = min(rate.burst, rate.tokens + 1.0)

    def _refused_locked(self, peer, verb: str, user: str) -> None:
        audit.emit("login-locked", logging.WARNING, user=user, addr=peer.host)
        self._login_refused(peer, verb, "locked", "this account is locked")

    def _login_refused(self, peer, verb: str, code: str, text: str, count: bool = True) -> None:
        """An answer that is nobody's fault or not a guess: reading goes on."""
        if count:
            self.server.metrics.logins["refused"] += 1
        if not peer.transport.closing:
            peer.send(ev.Error(verb, code, text))
            peer.resume(WAITING)

    def _login_failed(self, peer, verb: str, user: str, code: str, text: str, counted: bool = True) -> None:
        """A failed attempt: answered, and it counts toward closing this socket."""
        if counted:
            self.server.metrics.logins["failed"] += 1
            audit.emit("login-failed", logging.WARNING, user=user, addr=peer.host, reason=code)
        peer.failures += 1
        peer.send(ev.Error(verb, code, text))
        if peer.failures >= self.server.config.max_login_failures:
            peer.close(ev.Bye("auth-failed", "too many failed logins"))
        else:
            peer.resume(WAITING)

    def resume_refused(self, peer, code: str, text: str) -> None:
        """A RESUME that found nothing to resume: the socket may LOGIN, but
        guessing tokens counts as failed logins do."""
        peer.failures += 1
        peer.send(ev.Error("RESUME", code, text))
        if peer.failures >= self.server.config.max_login_failures:
            peer.close(ev.Bye("auth-failed", "too many failed attempts"))
