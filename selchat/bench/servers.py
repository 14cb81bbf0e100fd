"""The servers a bench drives: a spawned ``selchat serve``, the asyncio baseline,
or a server someone else started.

A spawned selchat gets a fresh database in a temporary directory with every
virtual user already registered, so that password hashing is not what the
relay benchmark measures (the login storm registers them with the real cost).
Its stderr (the server log) goes to a file, which is scanned for errors and
tracebacks after the run.
"""

from __future__ import annotations

import functools
import re
import selectors
import signal
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
                      "--max-per-address": "0"}


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

    def stop(self) -> None:
        pass


class SpawnedServer(Server):
    """A server process we started; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, kind: str, cmd: list[str], workdir: Path, cpus=None, nofile=None):
        self.log_path = workdir / f"{kind}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                     text=True, preexec_fn=sysinfo.child_setup(cpus, nofile))
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


def prepare_accounts(db: Path, names: list[str], password: str, scrypt_n: int) -> None:
    """Register ``names`` in a fresh database, all with ``password``.

    The first goes through ``AccountStore.add_user`` (so the schema and the
    hash format are the store's own); the rest get a copy of its hash row in
    one transaction, which takes a second for 10,000 users instead of one
    scrypt and one fsync each. Sharing a salt does not change what verifying
    a login costs."""
    with AccountStore(str(db), scrypt_n=scrypt_n) as store:
        store.add_user(names[0], password)
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
def serve_options() -> frozenset:
    """The option names ``selchat serve`` accepts (it grows; we adapt)."""
    out = subprocess.run([sys.executable, "-m", "selchat.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=60).stdout
    return frozenset(re.findall(r"--[a-z][a-z-]*", out))


def limit_flags() -> list[str]:
    """``LIMITS_NOT_BINDING`` as arguments, for the options this server has."""
    known = serve_options()
    return [arg for flag, value in LIMITS_NOT_BINDING.items() if flag in known for arg in (flag, value)]


def spawn_selchat(workdir: Path, users: list[str], password: str, *, scrypt_n: int | None = 16,
                  ping_interval: float | None = None, cpus=None, nofile: int | None = None,
                  extra: tuple[str, ...] = ()) -> SpawnedServer:
    """``selchat serve`` on a free loopback port with ``users`` pre-registered.

    ``scrypt_n=None`` keeps the server's real default cost (for the login storm)."""
    from selchat.store.passwords import DEFAULT_SCRYPT_N

    db = workdir / "bench.db"
    started = time.monotonic()
    prepare_accounts(db, users, password, scrypt_n or DEFAULT_SCRYPT_N)
    cmd = [sys.executable, "-m", "selchat.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--db", str(db)]
    if scrypt_n:
        cmd += ["--scrypt-n", str(scrypt_n)]
    if ping_interval:
        cmd += ["--ping-interval", str(ping_interval)]
    cmd += limit_flags() + list(extra)
    server = SpawnedServer("selchat", cmd, workdir, cpus=cpus, nofile=nofile)
    server.prepare_seconds = time.monotonic() - started
    return server


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
