"""The servers a bench drives: a spawned ``selchat serve``, the asyncio baseline,
a cluster (``redis-server`` and N ``selchat serve --cluster`` nodes sharing
one accounts database), or a server someone else started.

A spawned selchat gets a fresh database in a temporary directory with every
virtual user already registered, so that password hashing is not what the
relay benchmark measures (the login storm registers them with the real cost).
Its stderr (the server log) goes to a file, which is scanned for errors and
tracebacks after the run.
"""

from __future__ import annotations

import functools
import os
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from selchat.bench import BenchError, sysinfo
from selchat.store.accounts import AccountStore

START_TIMEOUT = 20.0
BASELINE_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "baselines" / "asyncio_relay.py"


#: Flood limits the server may have (docs/security.md). The bench measures
#: relaying, not limiting: it keeps their code on the path (a token bucket is
#: still charged per message) but never binding. Only the flags this server's
#: ``serve --help`` lists are passed.
LIMITS_NOT_BINDING = {"--msg-rate": "1e9", "--cmd-rate": "1e9", "--conn-rate": "1e9",
                      "--max-per-address": "0", "--registrations-per-hour": "0"}


class Server:
    """A server to measure: its address, and its pid when we know it."""

    def __init__(self, kind: str, host: str, port: int, pid: int | None):
        self.kind = kind            # "selchat" or "baseline"
        self.host, self.port, self.pid = host, port, pid

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds so far; needs the pid."""
        return sysinfo.cpu_times(self.pid)

    def cpu_seconds(self) -> float | None:
        return sysinfo.cpu_seconds(self.pid) if self.pid else None

    def memory_kib(self) -> dict[str, int]:
        return sysinfo.memory_kib(self.pid) if self.pid else {}

    def problems(self) -> list[str]:
        """Errors the server logged (none for a server we did not start)."""
        return []

    def cpu_sample(self) -> dict:
        """What a timed window reads before and after: the (user, system) CPU
        seconds of the server, of each of its processes, and of anything
        beside them that serves it (a cluster's Redis); needs the pid."""
        user, system = self.cpu_times()
        return {"user": user, "sys": system, "each": [user + system], "redis": None}

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}:{self.port}"

    def stop(self) -> None:
        pass


class SpawnedServer(Server):
    """A server process we started; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, kind: str, cmd: list[str], workdir: Path, cpus=None, nofile=None, name: str | None = None,
                 env: dict | None = None, cwd: Path | None = None):
        self.log_path = workdir / f"{name or kind}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                     text=True, preexec_fn=sysinfo.child_setup(cpus, nofile), env=env,
                                     cwd=cwd)
        line = _read_line(self.proc.stdout, START_TIMEOUT)
        if not line or "listening on " not in line:
            self.stop()
            raise BenchError(f"{kind} server did not start ({line!r}); its log:\n{self.log_path.read_text()[-2000:]}")
        host, port = line.split("listening on ")[1].split()[0].rsplit(":", 1)
        super().__init__(kind, host, int(port), self.proc.pid)

    def problems(self) -> list[str]:
        if not self._log.closed:
            self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if " ERROR " in line or " WARNING " in line or line.startswith("Traceback")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


def _read_line(stream, timeout: float) -> str | None:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return None
    finally:
        sel.close()
    return stream.readline().strip() or None


def prepare_accounts(db: Path, names: list[str], password: str, scrypt_n: int, tree: str | None = None) -> None:
    """Register ``names`` in a fresh database, all with ``password``.

    The first goes through ``AccountStore.add_user`` (so the schema and the
    hash format are the store's own: with ``tree``, that tree's store, whose
    server will open the file); the rest get a copy of its hash row in one
    transaction, which takes a second for 10,000 users instead of one scrypt
    and one fsync each. Sharing a salt does not change what verifying a
    login costs."""
    if tree is None:
        with AccountStore(str(db), scrypt_n=scrypt_n) as store:
            store.add_user(names[0], password)
    else:
        code = ("import sys; from selchat.store.accounts import AccountStore; "
                "AccountStore(sys.argv[1], scrypt_n=int(sys.argv[2])).add_user(sys.argv[3], sys.stdin.read())")
        done = subprocess.run([sys.executable, "-c", code, str(db), str(scrypt_n), names[0]], input=password,
                              capture_output=True, text=True, env=tree_env(tree), cwd="/", timeout=120)
        if done.returncode != 0:
            raise BenchError(f"--against {tree}: could not make the accounts: {done.stderr.strip()}")
    if len(names) == 1:
        return
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    conn = sqlite3.connect(str(db), isolation_level=None)
    try:
        (pwhash,) = conn.execute("SELECT pwhash FROM users WHERE name = ?", (names[0],)).fetchone()
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO users (name, pwhash, created) VALUES (?, ?, ?)",
                         ((name, pwhash, created) for name in names[1:]))
        conn.execute("COMMIT")
    finally:
        conn.close()


@functools.lru_cache(maxsize=None)
def serve_options(tree: str | None = None) -> frozenset:
    """The option names ``selchat serve`` accepts, this one's or ``tree``'s
    (it grows; we adapt)."""
    env, cwd = (tree_env(tree), "/") if tree else (None, None)
    out = subprocess.run([sys.executable, "-m", "selchat.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, env=env, cwd=cwd).stdout
    return frozenset(re.findall(r"--[a-z][a-z-]*", out))


def limit_flags(tree: str | None = None) -> list[str]:
    """``LIMITS_NOT_BINDING`` as arguments, for the options this server (or ``tree``'s) has."""
    known = serve_options(tree)
    return [arg for flag, value in LIMITS_NOT_BINDING.items() if flag in known for arg in (flag, value)]


def spawn_selchat(workdir: Path, users: list[str], password: str, *, scrypt_n: int | None = 16,
                  ping_interval: float | None = None, cpus=None, nofile: int | None = None,
                  extra: tuple[str, ...] = (), tree: str | None = None) -> SpawnedServer:
    """``selchat serve`` on a free loopback port with ``users`` pre-registered.

    ``scrypt_n=None`` keeps the server's real default cost (for the login storm).
    ``tree``: run the selchat of that source tree instead of this one (``--against``)."""
    from selchat.store.passwords import DEFAULT_SCRYPT_N

    db = workdir / "bench.db"
    started = time.monotonic()
    prepare_accounts(db, users, password, scrypt_n or DEFAULT_SCRYPT_N, tree)
    cmd = selchat_command(db, scrypt_n, ping_interval, tree) + list(extra)
    env = tree_env(tree) if tree else None  # run from workdir: python -m puts the cwd first on sys.path
    server = SpawnedServer("selchat", cmd, workdir, cpus=cpus, nofile=nofile, env=env, cwd=workdir if tree else None)
    server.prepare_seconds = time.monotonic() - started
    return server


def tree_env(tree: str) -> dict:
    """The environment that makes ``python -m selchat.cli`` run the selchat
    package of source tree ``tree`` (a git worktree of another commit, say):
    it goes first on PYTHONPATH. Checked, since a tree without the package
    would silently run this one."""
    tree = str(Path(tree).resolve())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])))
    # From "/", as the server runs from its own directory: python puts the cwd first on sys.path.
    found = subprocess.run([sys.executable, "-c", "import selchat, sys; sys.stdout.write(selchat.__file__)"],
                           capture_output=True, text=True, env=env, timeout=60, cwd="/").stdout
    if not found.startswith(tree + os.sep):
        raise BenchError(f"--against {tree}: no selchat package there (python imports {found or 'nothing'})")
    return env


def selchat_command(db: Path, scrypt_n: int | None, ping_interval: float | None,
                    tree: str | None = None) -> list[str]:
    """``selchat serve`` as the bench runs it: a free loopback port, ``db``,
    the flood limits never binding (those that ``tree``'s server has, with ``tree``)."""
    cmd = [sys.executable, "-m", "selchat.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--db", str(db)]
    if scrypt_n:
        cmd += ["--scrypt-n", str(scrypt_n)]
    if ping_interval:
        cmd += ["--ping-interval", str(ping_interval)]
    return cmd + limit_flags(tree)


def spawn_baseline(workdir: Path, script: Path | None = None, cpus=None, nofile: int | None = None) -> SpawnedServer:
    """The asyncio baseline relay on a free loopback port."""
    script = Path(script or BASELINE_SCRIPT)
    if not script.exists():
        raise BenchError(f"baseline relay not found at {script} (use --baseline-script or --no-baseline)")
    cmd = [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0"]
    return SpawnedServer("baseline", cmd, workdir, cpus=cpus, nofile=nofile)


def external_server(kind: str, host: str, port: int, pid: int | None) -> Server:
    """A server someone else started; its pid is looked up when it listens locally."""
    if pid is None and host.startswith("127."):
        pid = sysinfo.find_listener_pid(port)
    return Server(kind, host, port, pid)


def external_selchat(host: str, port: int, pid: int | None) -> Server:
    return external_server("selchat", host, port, pid)


# -- a cluster: N nodes on one Redis ----------------------------------------------------

#: A node takes cross-node traffic once its log says this.
JOINED = "cluster: joined"
REDIS_MISSING = "redis-server not found (apt-get install redis-server): --cluster needs it"


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """``redis-server`` on a free loopback port, without persistence
    (``--save "" --appendonly no``), in the foreground, logging to a file."""

    def __init__(self, workdir: Path, cpus=None):
        binary = redis_binary()
        if binary is None:
            raise BenchError(REDIS_MISSING)
        self.host = "127.0.0.1"
        self.log_path = workdir / "redis.log"
        for attempt in range(3):  # the free port can be taken before redis binds it
            self.port = _free_port()
            cmd = [binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                   "--daemonize", "no", "--dir", str(workdir), "--logfile", ""]
            with open(self.log_path, "a") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             preexec_fn=sysinfo.child_setup(cpus, None))
            if self._wait_ready(START_TIMEOUT):
                break
            self.stop()
            if attempt == 2 or "Address already in use" not in self.log_path.read_text(errors="replace"):
                raise BenchError(f"redis-server did not start; its log:\n{self.log_path.read_text()[-2000:]}")
        self.pid = self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def cpu_times(self) -> tuple[float, float]:
        return sysinfo.cpu_times(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class ClusterServers(Server):
    """N ``selchat serve --cluster`` nodes sharing one Redis and one accounts
    database, measured as one system: CPU summed over the nodes (Redis's
    apart), RSS summed over the nodes, errors from every node's log."""

    def __init__(self, nodes: list[SpawnedServer], redis: RedisProcess, cpus=None):
        self.nodes, self.redis = nodes, redis
        self.cpus = cpus  # the CPUs nodes and Redis were pinned to (all of them to the same), or None
        super().__init__("cluster", nodes[0].host, nodes[0].port, nodes[0].pid)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [node.address for node in self.nodes]

    def cpu_times(self) -> tuple[float, float]:
        times = [node.cpu_times() for node in self.nodes]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def cpu_sample(self) -> dict:
        times = [node.cpu_times() for node in self.nodes]
        return {"user": sum(t[0] for t in times), "sys": sum(t[1] for t in times),
                "each": [t[0] + t[1] for t in times], "redis": self.redis.cpu_times()}

    def memory_kib(self) -> dict[str, int]:
        found = [node.memory_kib() for node in self.nodes]
        redis = sysinfo.memory_kib(self.redis.pid)
        return {"rss": sum(m.get("rss", 0) for m in found), "peak": sum(m.get("peak", 0) for m in found),
                "redis_rss": redis.get("rss", 0)}

    def problems(self) -> list[str]:
        return [f"node {i}: {line}" for i, node in enumerate(self.nodes) for line in node.problems()]

    def describe(self) -> str:
        return (f"{len(self.nodes)} nodes (pids {', '.join(str(n.pid) for n in self.nodes)}) on "
                f"{', '.join(f'{n.host}:{n.port}' for n in self.nodes)}, redis-server pid {self.redis.pid} on "
                f"{self.redis.host}:{self.redis.port}")

    def stop(self) -> None:
        """The nodes first (a node that loses Redis logs an error), then Redis."""
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()
        self.redis.stop()


def spawn_cluster(workdir: Path, nodes: int, users: list[str], password: str, *, ping_interval: float | None = None,
                  cpus=None, redis_cpus=None, nofile: int | None = None) -> ClusterServers:
    """``redis-server`` and ``nodes`` x ``selchat serve --cluster redis://...``
    sharing one accounts database (``users`` pre-registered), each waited for
    until its log says it joined."""
    if redis_binary() is None:
        raise BenchError(REDIS_MISSING)
    db = workdir / "bench.db"
    prepare_accounts(db, users, password, 16)
    redis = RedisProcess(workdir, cpus=redis_cpus)
    started: list[SpawnedServer] = []
    try:
        cmd = selchat_command(db, 16, ping_interval) + ["--cluster", redis.url]
        for i in range(nodes):
            started.append(SpawnedServer("cluster", cmd, workdir, cpus=cpus, nofile=nofile, name=f"node{i}"))
        for i, node in enumerate(started):
            _wait_joined(node, i)
    except BaseException:
        for node in started:
            node.stop()
        redis.stop()
        raise
    return ClusterServers(started, redis, cpus if cpus and cpus == redis_cpus else None)


def _wait_joined(node: SpawnedServer, index: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        log = node.log_path.read_text(errors="replace")
        if JOINED in log:
            return
        if node.proc.poll() is not None or time.monotonic() > deadline:
            why = "exited" if node.proc.poll() is not None else f"did not join within {timeout:.0f} s"
            raise BenchError(f"cluster node {index} {why}; its log:\n{log[-2000:]}")
        time.sleep(0.05)
