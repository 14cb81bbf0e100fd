"""A cluster of real ``selchat serve --cluster`` processes on one real Redis, for the tests.

``Cluster(directory, nodes=3, *args)`` starts one ``redis-server``
(``tests.redisserver.RedisServer``: a free port, no persistence; the test is
skipped, saying how to install it, when redis-server is missing) and
``nodes`` servers (``tests.support.ServerProcess``), each with ``--cluster
redis://127.0.0.1:PORT/0``, ``--port 0``, the extra ``args`` and **one shared
SQLite account file**, then waits until each has logged ``cluster: joined``
(it takes cross-node traffic from then on)::

    c = Cluster(tmp_path, 3, "--request-timeout", "2")
    c.node(1).connect()          # a LineSocket to node 1 (HELLO already read)
    RawUser(c.node(2))           # tests.support helpers take a node as a server
    c.node_id(0)                 # the id it joined as (from its log)
    c.kill(0)                    # SIGKILL, and reaped
    c.start_node()               # one more node (joined), appended
    c.redis.pause(); c.redis.resume()   # SIGSTOP / SIGCONT of Redis
    c.stop()                     # every node and Redis; idempotent

Nothing is left running: ``stop`` sends SIGTERM to every node at once, kills
what has not exited after a few seconds, and kills Redis (continuing it
first if it was paused, so the nodes can say goodbye); a start that fails
half way stops what it had started. The fixtures below always call ``stop``,
also when the test failed. Each node also gets ``PR_SET_PDEATHSIG``
(SIGKILL) on Linux, so a pytest that is itself killed leaves no node behind.

Modes, for debugging the harness and the tests without a working cluster
(environment variable ``SELCHAT_TEST_CLUSTER_MODE``):

* ``cluster`` (default): as above;
* ``standalone``: no Redis, the nodes run without ``--cluster`` (each alone:
  cross-node tests fail; for debugging the harness itself);
* ``single``: no Redis, **one** server plays every node (``node(i)`` is the
  same server for every ``i``): the tests' own logic checked against the
  single-server behaviour the cluster must reproduce. Tests that need real
  nodes (killing one, losing Redis) call ``require_cluster()`` and skip.

Fixtures: ``cluster`` (module scope: 3 nodes with ``CLUSTER_ARGS``, shared by
a module's tests, each with its own user names) and ``make_cluster``
(function scope: ``make_cluster(nodes=3, *args)``, for tests that kill
nodes or Redis; stopped after the test). Import both into a test module.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.redisserver import RedisServer
from tests.support import DEADLINE, ServerProcess

MODE_ENV = "SELCHAT_TEST_CLUSTER_MODE"
MODES = ("cluster", "standalone", "single")

#: Options of the shared cluster (and of the reference server the tests
#: compare it with): every test connects from 127.0.0.1, so the per-address
#: limits are off (as tests/conftest.py's server has them); the command and
#: message rates are off so that WHO can be polled and thousands of messages
#: pass at once; and an unanswered request expires after 2 s.
CLUSTER_ARGS = ("--conn-rate", "0", "--max-per-address", "0", "--throttle-after", "0",
                "--cmd-rate", "0", "--msg-rate", "0", "--request-timeout", "2")

JOINED = "cluster: joined"
_JOINED_AS = re.compile(r"cluster: joined as node (\S+)")
#: How long ``stop`` waits for the nodes to exit after SIGTERM before SIGKILL.
STOP_GRACE = 5.0

#: Every cluster this process started (for the tests' failure reports).
ALL: list["Cluster"] = []


def mode() -> str:
    value = os.environ.get(MODE_ENV, "cluster").strip().lower() or "cluster"
    if value not in MODES:
        raise pytest.UsageError(f"{MODE_ENV}={value!r}: one of {', '.join(MODES)}")
    return value


def _die_with_parent():
    """preexec_fn for the nodes: SIGKILL when the process that started them
    dies (Linux's PR_SET_PDEATHSIG), so that a killed pytest leaves none
    behind. Resolved here, in the parent: the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sig = int(signal.SIGKILL)

    def preexec():
        prctl(pr_set_pdeathsig, sig, 0, 0, 0)

    return preexec


_PREEXEC = _die_with_parent()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort when pytest exits without the fixtures' teardown (an
    interrupted run): SIGKILL whatever is still running."""
    for c in ALL:
        for node in c.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
        if c.redis is not None and c.redis.running:
            c.redis.proc.kill()


def require_cluster_mode() -> None:
    """Skip the test unless clusters are real ones (before starting any)."""
    if mode() != "cluster":
        pytest.skip(f"needs real cluster nodes ({MODE_ENV}={mode()})")


class Cluster:
    """One Redis and ``nodes`` selchat nodes sharing it; see the module docstring."""

    def __init__(self, directory, nodes: int = 3, *args: str, mode_: str | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = tuple(args)
        self.mode = mode_ or mode()
        self.db = str(self.dir / "accounts.db")
        self.redis: RedisServer | None = None
        self.nodes: list[ServerProcess] = []
        self.ids: dict[int, str] = {}
        self.killed: set[int] = set()
        ALL.append(self)
        try:
            if self.mode == "cluster":
                self.redis = RedisServer(self.dir / "redis")
            started = [self._start(wait=False) for _ in range(nodes)]
            for index in started:
                self._wait_joined(index)
        except BaseException:  # pytest.skip too: nothing may be left running
            self.stop()
            raise

    # -- nodes ----------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        return self.redis.url() if self.redis is not None else None

    def node(self, index: int) -> ServerProcess:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def start_node(self) -> ServerProcess:
        """One more node, appended to ``nodes``; returned once it has joined."""
        index = self._start(wait=True)
        return self.nodes[index]

    def _start(self, wait: bool) -> int:
        index = len(self.nodes)
        if self.mode == "single" and self.nodes:
            self.nodes.append(self.nodes[0])  # one server plays every node
            return index
        cluster = ("--cluster", self.url) if self.mode == "cluster" else ()
        node = ServerProcess(self.dir, *cluster, *self.args, db=self.db, preexec_fn=_PREEXEC)
        self.nodes.append(node)
        if wait:
            self._wait_joined(index)
        return index

    def _wait_joined(self, index: int, timeout: float = DEADLINE) -> None:
        if self.mode != "cluster":
            return
        log = self.nodes[index].wait_for_log(JOINED, timeout)
        match = _JOINED_AS.search(log)
        self.ids[index] = match.group(1) if match else "?"

    def node_id(self, index: int) -> str:
        return self.ids.get(index, "?")

    def index_of(self, node: ServerProcess) -> int:
        return next(i for i, n in enumerate(self.nodes) if n is node)

    def require_cluster(self) -> None:
        """Skip the test unless the nodes are real cluster nodes."""
        if self.mode != "cluster":
            pytest.skip(f"needs real cluster nodes ({MODE_ENV}={self.mode})")

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` and reap it (its sockets are closed by the kernel:
        the clients see EOF or a reset, Redis sees its connections go)."""
        node = self.nodes[index]
        assert node.proc.poll() is None, f"node {index} is not running"
        node.stop(signal.SIGKILL)
        self.killed.add(index)

    def alive(self) -> list[ServerProcess]:
        seen, out = set(), []
        for node in self.nodes:
            if id(node) not in seen and node.proc.poll() is None:
                seen.add(id(node))
                out.append(node)
        return out

    # -- the end ----------------------------------------------------------------------------

    def stop(self, grace: float = STOP_GRACE) -> list[str]:
        """Stop every node and Redis; returns what needed force (for a report).
        Safe to call twice, and on a cluster that never finished starting."""
        problems = []
        if self.redis is not None and self.redis.running and self.redis.paused:
            self.redis.resume()  # a node shutting down may still talk to Redis
        unique = list({id(n): n for n in self.nodes}.values())
        for node in unique:
            if node.proc.poll() is None:
                try:
                    node.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for node in unique:
            try:
                node.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"node on port {node.port} ignored SIGTERM for {grace} s: killed")
            try:
                node.stop(signal.SIGKILL)  # kills it if still running; reaps it; closes its log
            except AssertionError as exc:  # pragma: no cover - SIGKILL cannot be ignored
                problems.append(str(exc))
        if self.redis is not None:
            self.redis.kill()
        leftovers = [n.proc.pid for n in unique if n.proc.poll() is None]
        if self.redis is not None and self.redis.running:
            leftovers.append(self.redis.proc.pid)
        assert not leftovers, f"processes still running after stop: {leftovers}"
        return problems

    # -- logs, for failure reports ----------------------------------------------------------

    def log_marks(self) -> dict[int, int]:
        """Where each node's log ends now (see ``logs_since``)."""
        marks = {}
        for i, node in enumerate(self.nodes):
            try:
                marks[i] = node.log_path.stat().st_size
            except OSError:
                marks[i] = 0
        return marks

    def logs_since(self, marks: dict[int, int] | None = None, max_lines: int = 60) -> str:
        """Each node's log from ``marks`` on (its last ``max_lines`` lines)."""
        out = []
        done = set()
        for i, node in enumerate(self.nodes):
            if id(node) in done:
                continue
            done.add(id(node))
            try:
                with open(node.log_path, errors="replace") as f:
                    f.seek((marks or {}).get(i, 0))
                    lines = f.read().splitlines()
            except OSError as exc:
                lines = [f"(cannot read {node.log_path}: {exc})"]
            state = "running" if node.proc.poll() is None else f"exited {node.proc.returncode}"
            cut = f" (last {max_lines} of {len(lines)} lines)" if len(lines) > max_lines else ""
            out.append(f"--- node {i} id {self.node_id(i)} port {node.port} {state}: {node.log_path}{cut}")
            out.extend(lines[-max_lines:])
        if self.redis is not None:
            out.append(f"--- {self.redis!r}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"<Cluster {self.mode} redis={self.redis!r} "
                f"nodes={[(n.port, n.proc.poll()) for n in self.nodes]}>")


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes with CLUSTER_ARGS, shared by the module's tests (use your
    own user names; leave the nodes and Redis running)."""
    c = Cluster(tmp_path_factory.mktemp("cluster"), 3, *CLUSTER_ARGS)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_cluster(tmp_path):
    """``make_cluster(nodes=3, *args)``: a cluster for one test (args default to
    CLUSTER_ARGS); everything started is stopped after the test."""
    started: list[Cluster] = []
    serial = iter(range(1, 1000))

    def start(nodes: int = 3, *args: str) -> Cluster:
        c = Cluster(tmp_path / f"cluster-{next(serial)}", nodes, *(args or CLUSTER_ARGS))
        started.append(c)
        return c

    try:
        yield start
    finally:
        errors = []
        for c in started:  # every one, even if stopping another failed
            try:
                c.stop(grace=2.0)
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
