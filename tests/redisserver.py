"""A real redis-server for the cluster tests, and a reactor on a thread to drive links.

``RedisServer`` starts ``redis-server`` on a free port of 127.0.0.1 in a
directory of its own, with no persistence and in the foreground, and waits
until it answers PING (with a deadline; the process exiting ends the wait
early, with its log in the message). It can be stopped, killed (SIGKILL),
paused and resumed (SIGSTOP/SIGCONT), and restarted on the same port.

Fixtures (import the ones you use into the test module, e.g.
``from tests.redisserver import make_redis, redis_server, loop  # noqa: F401``):

* ``redis_server``: a fresh server for one test;
* ``make_redis``: a factory, ``make_redis("--requirepass", "pw")``, for
  servers with options or several servers; all are killed after the test;
* ``module_redis``: one server shared by a module's tests (use distinct
  keys and channels, or ``call("FLUSHALL")``);
* ``loop``: a ``LoopThread``, a ``Reactor`` running on its own thread.

All of them skip the test, saying how to install it, when redis-server is
not on the machine.

Objects living on the reactor (links) must only be touched on its thread:
``loop.call(fn, *args)`` runs ``fn`` there and returns its result, and
``Events`` collects what callbacks report and lets the test wait for it,
with a deadline and without sleeping.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support import DEADLINE

SKIP_REASON = "redis-server not installed: apt-get install redis-server"
_serial = itertools.count(1)


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _encode(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServer:
    """One ``redis-server`` process; see the module docstring."""

    def __init__(self, directory: Path, *args: str, port: int | None = None):
        binary = redis_binary()
        if binary is None:
            pytest.skip(SKIP_REASON)
        self.binary = binary
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = tuple(args)
        self.password = args[args.index("--requirepass") + 1] if "--requirepass" in args else None
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self.log_path = self.dir / "redis.log"
        if port is not None:
            self.port = port
            self.start()
            return
        for attempt in range(3):  # the free port can be taken before redis binds it
            self.port = free_port()
            try:
                self.start()
                return
            except AssertionError:
                if "Address already in use" not in self.log() or attempt == 2:
                    raise

    # -- addresses ----------------------------------------------------------------------

    def url(self, db: int = 0, password: str | None = None) -> str:
        """``redis://[:password@]127.0.0.1:PORT/db``; the server's own password by default."""
        password = self.password if password is None else password
        auth = f":{password}@" if password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    # -- life -----------------------------------------------------------------------------

    def start(self, timeout: float = DEADLINE) -> None:
        """Start on ``self.port`` and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "",
               "--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir),
               "--logfile", "", *self.args]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.paused = False
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = DEADLINE) -> None:
        """Until a PING is answered (+PONG, or -NOAUTH with a password set)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                reply = self._raw(_encode("PING"), max(0.05, min(1.0, deadline - time.monotonic())))
                if reply in (b"+PONG", ) or reply.startswith(b"-NOAUTH"):
                    return
                last = reply
            except OSError as exc:
                last = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"redis-server on port {self.port} not ready within {timeout} s "
                                     f"({last!r}):\n{self.log()}")
            try:  # the polling interval, cut short if the server exits
                code = self.proc.wait(min(0.02, remaining))
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"redis-server exited with {code}:\n{self.log()}")

    def _raw(self, request: bytes, timeout: float) -> bytes:
        """Send ``request``, return the first line of the reply (for readiness)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(request)
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed without a reply")
                data += chunk
            return data.split(b"\r\n", 1)[0]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = DEADLINE) -> None:
        """SIGTERM and wait (SIGKILL past the deadline)."""
        if not self.running:
            return
        self.proc.terminate()
        if self.paused:
            self.resume()  # a stopped process handles SIGTERM only once continued
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"redis-server did not stop within {timeout} s")

    def kill(self) -> None:
        """SIGKILL (works on a paused server too) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the sockets stay open, nothing is answered."""
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self, timeout: float = DEADLINE) -> None:
        """Stop if running, then start again on the same port (empty: nothing is saved)."""
        self.stop()
        self.start(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    # -- a blocking client for the test's own checks ------------------------------------

    def call(self, *args, timeout: float = DEADLINE):
        """One command on a fresh connection (AUTH first if the server has a
        password); the reply as hiredis parses it. For checks and PUBLISH
        from outside the reactor."""
        import hiredis

        reader = hiredis.Reader()
        request = (_encode("AUTH", self.password) if self.password else b"") + _encode(*args)
        wanted = 2 if self.password else 1
        replies = []
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(request)
            while len(replies) < wanted:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("redis-server closed the connection")
                reader.feed(chunk)
                while (reply := reader.gets()) is not False:
                    replies.append(reply)
        return replies[-1]

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<RedisServer {self.host}:{self.port} {state}>"


# -- a reactor on a thread ------------------------------------------------------------------

class LoopThread:
    """A ``Reactor`` running on a daemon thread."""

    def __init__(self, **reactor_args):
        from selchat.reactor.loop import Reactor

        self.reactor = Reactor(**reactor_args)
        self.thread = threading.Thread(target=self.reactor.run, name="test-reactor", daemon=True)
        self.thread.start()

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the loop thread; its result, or its
        exception raised here. (No ``timeout`` argument of its own: keyword
        arguments all go to ``fn``; the wait is bounded by ``DEADLINE``.)"""
        timeout = DEADLINE
        done = threading.Event()
        box = {}

        def run():
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the test thread
                box["error"] = exc
            finally:
                done.set()

        self.reactor.call_soon_threadsafe(run)
        if not done.wait(timeout):
            raise AssertionError(f"{fn!r} did not run on the loop within {timeout} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def stop(self) -> None:
        if self.thread.is_alive():
            self.reactor.call_soon_threadsafe(self.reactor.stop)
            self.thread.join(DEADLINE)
            assert not self.thread.is_alive(), "the reactor did not stop"
        self.reactor.close()


class Events:
    """A callback that records what it is called with (one argument: that
    value; several: the tuple), and lets another thread wait for it."""

    def __init__(self, name: str = "events"):
        self.name = name
        self.items: list = []
        self._cond = threading.Condition()

    def __call__(self, *args) -> None:
        with self._cond:
            self.items.append(args[0] if len(args) == 1 else args)
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self.items)

    def snapshot(self) -> list:
        with self._cond:
            return list(self.items)

    def wait(self, count: int = 1, timeout: float = DEADLINE) -> list:
        """The items once there are at least ``count``; AssertionError past the deadline."""
        return self.wait_until(lambda items: len(items) >= count, timeout, f"{count} {self.name}")

    def wait_until(self, predicate, timeout: float = DEADLINE, what: str = "the condition") -> list:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.items), timeout):
                raise AssertionError(f"{what} not within {timeout} s; {self.name} so far "
                                     f"({len(self.items)}): {self.items[-5:]!r}")
            return list(self.items)


# -- fixtures -------------------------------------------------------------------------------

def _require_redis() -> None:
    if redis_binary() is None:
        pytest.skip(SKIP_REASON)


@pytest.fixture
def make_redis(tmp_path):
    """``make_redis(*args, port=None) -> RedisServer``; all killed after the test."""
    _require_redis()
    started: list[RedisServer] = []

    def start(*args: str, port: int | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{next(_serial)}", *args, port=port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server for this test (needs no other fixture imported)."""
    _require_redis()
    server = RedisServer(tmp_path / f"redis-{next(_serial)}")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory):
    """One redis-server for the whole module."""
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def loop():
    """A reactor running on a thread; stopped and closed after the test."""
    thread = LoopThread()
    yield thread
    thread.stop()
