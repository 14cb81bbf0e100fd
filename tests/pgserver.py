"""A throwaway PostgreSQL server for the tests: its own cluster, port and socket directory.

    @pytest.fixture(scope="session")
    def pg():
        with PgServer.started() as server:   # skips if PostgreSQL is missing
            yield server

    def test_something(pg):
        url = pg.create_database()           # or pg.create_schema(): cheaper
        ...
        pg.stop(); pg.start()                # the same cluster, the same port

``initdb`` makes a cluster in a fresh temporary directory (password
authentication over TCP on 127.0.0.1, trust on the unix socket, which lives
in that directory too); ``postgres`` runs in the foreground as our child, so
stopping it is a signal and a wait. Readiness is a connection that succeeds,
polled against a deadline. The binaries are found on PATH or in
/usr/lib/postgresql/*/bin; without them (or without psycopg) the tests that
want a server are skipped, saying what to install.

PostgreSQL refuses to run as root: as root the cluster belongs to, and the
server runs as, the ``postgres`` user (the directory is made in /tmp, which
that user can reach, and handed to it).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DEADLINE = 30.0   # initdb and the first start on a loaded machine
SUPERUSER = "selchat"
_TOOLS = ("initdb", "postgres")
_NOT_INSTALLED = "postgres not installed: apt-get install postgresql"


def find_bindir() -> Path | None:
    """The directory holding initdb and postgres: PATH first, then the newest Debian one."""
    on_path = [shutil.which(tool) for tool in _TOOLS]
    if all(on_path):
        return Path(on_path[0]).parent
    def version(path: str) -> tuple:
        return tuple(int(n) for n in re.findall(r"\d+", path))
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(Path(bindir, tool), os.X_OK) for tool in _TOOLS):
            return Path(bindir)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL cluster in a temporary directory, on 127.0.0.1:``port``."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.password = "pw-" + secrets.token_hex(8)   # a secret that must never show in a message
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._run_as: dict = {}
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root, and there is no 'postgres' user to run PostgreSQL as")
            self._run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.dir = Path(tempfile.mkdtemp(prefix="selchat-pg-"))
        self.data = self.dir / "data"
        self.sockets = self.dir / "sock"
        self.sockets.mkdir()
        self.log_path = self.dir / "postgres.log"
        if self._run_as:
            for path in (self.dir, self.sockets):
                os.chown(path, self._run_as["user"], self._run_as["group"])
        self._initdb()

    # -- life cycle -------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def started(cls):
        """A running server, skipped if PostgreSQL or psycopg is missing; removed afterwards."""
        bindir = find_bindir()
        if bindir is None:
            pytest.skip(_NOT_INSTALLED)
        if importlib.util.find_spec("psycopg") is None:
            pytest.skip("psycopg not installed: pip install 'selchat[postgres]'")
        pg = cls(bindir)
        try:
            pg.start()
            yield pg
        finally:
            pg.destroy()

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self._run_as:
            env.update(HOME=str(self.dir), USER="postgres", LOGNAME="postgres")
        return env

    def _initdb(self) -> None:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            os.chown(pwfile, self._run_as["user"], self._run_as["group"])
        cmd = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
               f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
               "-E", "UTF8", "--locale=C", "--no-sync"]
        result = subprocess.run(cmd, cwd=self.dir, env=self._env(), capture_output=True, text=True,
                                timeout=DEADLINE * 2, **self._run_as)
        pwfile.unlink()
        if result.returncode != 0:
            raise AssertionError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self, timeout: float = DEADLINE) -> None:
        """Start the server (on the same port as before, if it ran before) and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        for _ in range(3):
            port = self.port or free_port()
            if self._launch(port, timeout):
                self.port = port
                return
            if self.port:   # restarting: the port is part of the URLs handed out
                break
        raise AssertionError(f"PostgreSQL did not start:\n{self.log()}")

    def _launch(self, port: int, timeout: float) -> bool:
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(port),
               "-h", "127.0.0.1", "-k", str(self.sockets),
               "-c", "fsync=off", "-c", "full_page_writes=off",
               # not synchronous_commit=off: a stop is SIGQUIT, and it would lose commits
               "-c", "shared_buffers=16MB", "-c", "max_connections=60", "-c", "logging_collector=off"]
        log = open(self.log_path, "a")
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, env=self._env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True, **self._run_as)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                return False      # could not start (a port taken meanwhile...): the log says why
            if self._answers(port):
                return True
            if time.monotonic() > deadline:
                self._kill()
                raise AssertionError(f"PostgreSQL did not answer within {timeout} s:\n{self.log()}")
            time.sleep(0.05)  # polling interval; the condition ends the wait

    def _answers(self, port: int) -> bool:
        import psycopg

        try:
            psycopg.connect(self._url("postgres", port), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self, timeout: float = DEADLINE) -> None:
        """Stop at once (SIGQUIT: PostgreSQL's immediate shutdown), as a crash would look to clients."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGQUIT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)   # its own session: the backends go too
            self.proc.wait()

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    # -- databases --------------------------------------------------------------

    def _url(self, dbname: str, port: int | None = None) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{port or self.port}/{dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """A URL for ``dbname``, with the password in it."""
        return self._url(dbname)

    def create_schema(self) -> str:
        """A new, empty schema in the ``postgres`` database; returns a URL that
        puts it first on the search path. Cheaper than a database (a few
        milliseconds, not a few hundred) for tests that want empty tables."""
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return self.url() + f"?options=-csearch_path%3D{name}"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        name = name or "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

