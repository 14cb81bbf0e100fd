"""Prometheus metrics: counters bumped by the server, rendered at scrape time.

The hot path only ever adds integers: ``Metrics`` holds plain int attributes
and ``collections.Counter``s for the labelled counters
(``metrics.logins["ok"] += 1``). Everything that is a level rather than a
count (sessions online, chats, open sockets, the worker queue) is not
tracked at all but computed from the server's own state when Prometheus
asks, so it cannot drift from the truth. The loop lag comes from a 1 s timer
on the reactor (``LagProbe``).

``MetricsEndpoint`` serves the text exposition format 0.0.4 at ``/metrics``
from an ``HTTPServer`` on the same reactor. Every metric is listed, with its
meaning, in docs/operations.md ("Metrics").
"""

from __future__ import annotations

import collections
import logging
import time

from selchat import __version__
from selchat.reactor.httpd import HTTPServer
from selchat.reactor.listener import bind
from selchat.server.session import Phase

log = logging.getLogger("selchat.server")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Label values shown even at 0, so that rate() and alerts see a series from
# the start; any other value that is counted is shown too.
LOGIN_RESULTS = ("ok", "failed", "throttled", "refused", "error")
REFUSAL_REASONS = ("server-full", "too-many-connections", "too-fast", "shutdown")


class Metrics:
    """The counters, and the loop lag the probe last measured."""

    __slots__ = ("started", "messages_relayed", "logins", "refusals", "resumes", "lag", "lag_max")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.messages_relayed = 0                          # chat messages written to a partner
        self.logins: collections.Counter = collections.Counter()    # result -> LOGIN/REGISTER answers
        self.refusals: collections.Counter = collections.Counter()  # reason -> connections refused
        self.resumes = 0     # version 2 sessions taken back with RESUME
        self.lag = 0.0       # seconds, the probe's last measurement
        self.lag_max = 0.0   # seconds, the largest since the last scrape


class LagProbe:
    """A timer every ``interval`` seconds that records how late it ran.

    The timer wheel promises to run a timer before the end of the tick its
    deadline falls in; the lag is how much later than that it actually ran,
    that is how long the loop was busy elsewhere (a long handler, a slow
    turn) when the timer was due. 0 on a healthy loop.
    """

    __slots__ = ("reactor", "metrics", "interval", "timer")

    def __init__(self, reactor, metrics: Metrics, interval: float = 1.0):
        self.reactor = reactor
        self.metrics = metrics
        self.interval = interval
        self.timer = reactor.call_later(interval, self._fired)

    def _fired(self) -> None:
        tick = self.reactor.timers.tick
        promised = (self.timer.deadline // tick + 1) * tick
        lag = max(0.0, self.reactor.clock() - promised)
        m = self.metrics
        m.lag = lag
        if lag > m.lag_max:
            m.lag_max = lag
        self.timer.reset(self.interval)

    def close(self) -> None:
        self.timer.cancel()


def render(server) -> str:
    """The exposition text for ``server`` now (and restart the lag maximum)."""
    m = server.metrics
    online = server.hub.online.values()
    detached = sum(1 for s in server.registry.resumable.values() if s.phase is Phase.DETACHED)
    local = server.hub.online
    # A chat between two of our users counts from both sides, one with a user
    # of another node of a cluster from ours only.
    chatting = sum(1 if local.get(s.partner.key) is s.partner else 2 for s in online if s.partner is not None)
    requests = sum(1 for s in online if s.request is not None and s.request.source is s)
    families = [
        ("selchat_build_info", "gauge", "The selchat version serving (always 1).",
         [(_labels(version=__version__), 1)]),
        ("selchat_uptime_seconds", "gauge", "Seconds since the server started.",
         [("", round(time.monotonic() - m.started, 3))]),
        ("selchat_sessions_online", "gauge",
         "Sessions logged in and in the hub (detached version 2 sessions included).", [("", len(online))]),
        ("selchat_sessions_detached", "gauge",
         "Version 2 sessions that lost their connection and are kept for RESUME.", [("", detached)]),
        ("selchat_sessions_attaching", "gauge",
         "Sessions logged in whose chat and check sockets are not both attached yet.", [("", len(server.registry.by_sid))]),
        ("selchat_chats_active", "gauge", "Pairs of users chatting.", [("", chatting // 2)]),
        *([] if server.cluster is not None else [  # a cluster keeps its requests in Redis
            ("selchat_chat_requests_pending", "gauge", "Chat requests sent and not answered yet.", [("", requests)])]),
        ("selchat_sockets_open", "gauge", "Chat-protocol sockets open (a user has three).",
         [("", len(server.peers))]),
        ("selchat_worker_queue_depth", "gauge",
         "Jobs (password checks, database calls) handed to the worker threads and not finished yet.",
         [("", server.reactor.pending_jobs)]),
        ("selchat_password_checks_waiting", "gauge",
         "LOGIN and REGISTER password checks queued for a worker (fairly, by address).",
         [("", len(server.logins.queue))]),
        ("selchat_loop_lag_seconds", "gauge", "How late the 1 s probe timer last ran, past the timer tick.",
         [("", m.lag)]),
        ("selchat_loop_lag_max_seconds", "gauge", "The largest loop lag since the previous scrape.",
         [("", m.lag_max)]),
        ("selchat_messages_relayed_total", "counter", "Chat messages relayed to a partner.",
         [("", m.messages_relayed)]),
        ("selchat_resumes_total", "counter", "Version 2 sessions taken back with RESUME (no password check).",
         [("", m.resumes)]),
        ("selchat_logins_total", "counter", "Answers to LOGIN and REGISTER, by result.",
         [(_labels(result=r), n) for r, n in _with_zeros(m.logins, LOGIN_RESULTS)]),
        ("selchat_refusals_total", "counter", "New connections refused before any state was made, by reason.",
         [(_labels(reason=r), n) for r, n in _with_zeros(m.refusals, REFUSAL_REASONS)]),
    ]
    if server.cluster is not None:
        node = server.cluster
        families += [
            ("selchat_cluster_joined", "gauge",
             "1 while this node is a member of the cluster (its Redis links up, its lease renewed).",
             [("", 1 if node.up else 0)]),
            ("selchat_cluster_fences_total", "counter",
             "Times this node fenced itself (lost Redis, or its lease, or Redis lost its data) and ended its sessions.",
             [("", node.fences)]),
        ]
    m.lag_max = m.lag
    return "".join(_family(*family) for family in families)


def _family(name: str, kind: str, text: str, samples) -> str:
    lines = [f"# HELP {name} {text}\n# TYPE {name} {kind}\n"]
    lines += [f"{name}{labels} {value!r}\n" for labels, value in samples]
    return "".join(lines)


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _with_zeros(counter: collections.Counter, known: tuple) -> list:
    """The known labels first (0 if never counted), then any others, sorted."""
    return [(k, counter[k]) for k in known] + sorted((k, n) for k, n in counter.items() if k not in known)


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:9117"`` for IPv6) -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


class MetricsEndpoint:
    """``/metrics`` on its own listening socket, served from the server's reactor."""

    def __init__(self, server, address: str):
        self.server = server
        host, port = parse_address(address)
        self.http = HTTPServer(server.reactor, bind(host, port), self.handle)
        self.probe = LagProbe(server.reactor, server.metrics)
        host, port = self.http.address[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics", shown, port)

    @property
    def address(self) -> tuple:
        return self.http.address

    def handle(self, method: str, target: str):
        if target.partition("?")[0] != "/metrics":
            return 404, [("content-type", "text/plain")], b"not found; metrics are at /metrics\n"
        if method not in ("GET", "HEAD"):
            return 405, [("content-type", "text/plain"), ("allow", "GET, HEAD")], b"method not allowed\n"
        return 200, [("content-type", CONTENT_TYPE)], render(self.server).encode()

    def close(self) -> None:
        self.probe.close()
        self.http.close()
