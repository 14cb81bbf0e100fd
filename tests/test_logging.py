"""`selchat serve`'s logs: text and JSON lines, the log file, reopening it, fail2ban."""

from __future__ import annotations

import ast
import datetime
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time

import pytest

from selchat import logsetup
from selchat.server import audit
from selchat.server.config import ServerConfig
from tests.support import DEADLINE, REPO_ROOT, RawUser, ServerProcess

TEXT_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")
FAIL2BAN_REGEX = "/usr/bin/fail2ban-regex"


# logsetup (and so `selchat serve` run in-process) configures the root logger.
pytestmark = pytest.mark.usefixtures("keep_root_logging")


@pytest.fixture
def far_from_utc(monkeypatch):
    """A local time zone 9 hours from UTC, so a local time in the logs shows."""
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_text_lines_carry_utc_time_level_logger_and_event(tmp_path, far_from_utc):
    log_file = tmp_path / "selchat.log"
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    logs = logsetup.setup(ServerConfig(log_file=str(log_file)))
    audit.emit("login-failed", logging.WARNING, user="bob", addr="127.0.0.1", reason="auth-failed")
    audit.emit("session-end", user="x y", addr="127.0.0.1", reason="kicked", text='say "hi"')
    logging.getLogger("selchat.server").debug("not at the default level")
    logs.close()
    after = datetime.datetime.now(datetime.timezone.utc)
    got = lines(log_file)
    assert len(got) == 2, got
    stamp, level, logger, message = TEXT_LINE.match(got[0]).groups()
    assert (level, logger, message) == ("WARNING", "selchat.events",
                                        "login-failed user=bob addr=127.0.0.1 reason=auth-failed")
    when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before <= when <= after                      # UTC, not the local zone 9 h away
    assert TEXT_LINE.match(got[1]).group(4) == \
        'session-end user="x y" addr=127.0.0.1 reason=kicked text="say \\"hi\\""'


def test_json_lines_have_the_event_fields_at_the_top(tmp_path):
    log_file = tmp_path / "selchat.log"
    logs = logsetup.setup(ServerConfig(log_file=str(log_file), log_format="json"), verbosity=2)
    audit.emit("throttled", logging.WARNING, user="bob", addr="::1", wait=2.5)
    logging.getLogger("selchat.server").debug("tick %d", 7)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("selchat.server").exception("handler failed")
    logs.close()
    objects = [json.loads(line) for line in lines(log_file)]
    assert len(objects) == 3
    event, debug, failed = objects
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
    assert {k: event[k] for k in ("level", "logger", "event", "user", "addr", "wait")} == {
        "level": "WARNING", "logger": "selchat.events", "event": "throttled", "user": "bob", "addr": "::1",
        "wait": 2.5}
    assert event["message"] == "throttled user=bob addr=::1 wait=2.5"
    assert (debug["level"], debug["message"]) == ("DEBUG", "tick 7") and "event" not in debug
    assert failed["message"] == "handler failed" and "RuntimeError: boom" in failed["exception"]


def test_apply_reopens_the_file_after_logrotate_renamed_it(tmp_path):
    log_file = tmp_path / "selchat.log"
    config = ServerConfig(log_file=str(log_file))
    logs = logsetup.setup(config)
    log = logging.getLogger("selchat.server")
    log.info("before the rotation")
    os.rename(log_file, tmp_path / "selchat.log.1")     # what logrotate does, before postrotate's HUP
    log.info("after the rename, before the reopen")    # still goes to the renamed file
    logs.apply(ServerConfig(log_file=str(log_file), log_format="json"))
    log.info("after the reopen")
    logs.close()
    old = lines(tmp_path / "selchat.log.1")
    assert [TEXT_LINE.match(line).group(4) for line in old] == [
        "before the rotation", "after the rename, before the reopen"]
    assert [json.loads(line)["message"] for line in lines(log_file)] == ["after the reopen"]


def test_apply_keeps_the_old_file_when_the_new_one_cannot_be_opened(tmp_path):
    log_file = tmp_path / "selchat.log"
    logs = logsetup.setup(ServerConfig(log_file=str(log_file)))
    with pytest.raises(OSError):
        logs.apply(ServerConfig(log_file=str(tmp_path / "no-dir" / "x.log"), log_format="json"))
    logging.getLogger("selchat.server").info("still here")
    logs.close()
    assert TEXT_LINE.match(lines(log_file)[-1]).group(4) == "still here"


def test_no_line_is_lost_or_torn_while_apply_rotates_under_load(tmp_path):
    """Four threads log while another rotates the file and flips the format 20 times."""
    log_file = tmp_path / "selchat.log"
    logs = logsetup.setup(ServerConfig(log_file=str(log_file)))
    per_thread, writers = 500, 4

    def write(n):
        log = logging.getLogger(f"selchat.t{n}")
        for i in range(per_thread):
            log.info("line %d of %d %s", i, n, "x" * 200)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for i in range(20):
        os.rename(log_file, tmp_path / f"selchat.log.{i}")
        logs.apply(ServerConfig(log_file=str(log_file), log_format="json" if i % 2 else "text"))
    for t in threads:
        t.join(DEADLINE)
    logs.close()
    seen = []
    for path in tmp_path.glob("selchat.log*"):
        for line in lines(path):
            if line.startswith("{"):
                obj = json.loads(line)
                seen.append((obj["logger"], obj["message"]))
            else:
                match = TEXT_LINE.match(line)
                assert match, line
                seen.append((match.group(3), match.group(4)))
    expected = [(f"selchat.t{n}", f"line {i} of {n} {'x' * 200}") for n in range(writers) for i in range(per_thread)]
    assert sorted(seen) == sorted(expected)


def test_logging_does_not_wait_for_a_stuck_writer(tmp_path):
    """The reactor logs from its one thread: a log call must return even while
    the writer is blocked (here: holding the handler's lock, as a slow disk would)."""
    logs = logsetup.setup(ServerConfig(log_file=str(tmp_path / "selchat.log")))
    try:
        with logs.handler.lock:            # the writer thread cannot write now
            started = time.monotonic()
            for i in range(1000):
                audit.emit("login", user=f"u{i}", addr="127.0.0.1", session=i)
            assert time.monotonic() - started < 1.0
    finally:
        logs.close()
    assert len(lines(tmp_path / "selchat.log")) == 1000


# -- from a real server ---------------------------------------------------------------

def failed_login(server: ServerProcess, user: str) -> None:
    sock = server.connect()
    sock.send(f"LOGIN {user} wrong-password")
    sock.expect("ERR LOGIN")
    sock.close()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_serve_logs_events_to_the_log_file(tmp_path, log_format):
    log_file = tmp_path / "selchat.log"
    server = ServerProcess(tmp_path, "--log-file", str(log_file), "--log-format", log_format)
    try:
        user = RawUser(server)
        failed_login(server, user.name)
        user.close()
    finally:
        assert server.stop() == 0
    assert server.log_path.read_text() == ""   # nothing on stderr: it all went to the file
    got = lines(log_file)
    if log_format == "json":
        events = [json.loads(line) for line in got]
        failed = [e for e in events if e.get("event") == "login-failed"]
        assert [(e["user"], e["addr"], e["reason"]) for e in failed] == [(user.name, "127.0.0.1", "auth-failed")]
        assert any(e.get("event") == "register" and e["user"] == user.name for e in events)
    else:
        messages = [TEXT_LINE.match(line).group(4) for line in got]
        assert f"login-failed user={user.name} addr=127.0.0.1 reason=auth-failed" in messages
        assert any(m.startswith(f"register user={user.name} addr=127.0.0.1") for m in messages)


# -- fail2ban ---------------------------------------------------------------------------

def doc_block(first_line: str) -> str:
    """The fenced block of docs/operations.md that starts with ``first_line``."""
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    for block in re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M):
        if block.startswith(first_line + "\n"):
            return block
    raise AssertionError(f"no block starting {first_line!r} in docs/operations.md")


@pytest.mark.skipif(not os.path.exists(FAIL2BAN_REGEX), reason="fail2ban-regex is not installed")
def test_the_documented_fail2ban_filter_matches_failed_and_throttled_logins(tmp_path):
    log_file = tmp_path / "selchat.log"
    logs = logsetup.setup(ServerConfig(log_file=str(log_file)))
    audit.emit("login-failed", logging.WARNING, user="bob", addr="203.0.113.7", reason="auth-failed")
    audit.emit("login", user="bob", addr="203.0.113.8", session=1)
    audit.emit("throttled", logging.WARNING, user="bob", addr="203.0.113.9", wait=3)
    # A user name chosen to smuggle in another address is quoted, so it cannot.
    audit.emit("login-failed", logging.WARNING, user="x addr=6.6.6.6", addr="198.51.100.1", reason="auth-failed")
    audit.emit("login-failed", logging.WARNING, user="eve", addr="2001:db8::1", reason="auth-failed")
    logs.close()
    stamps = [TEXT_LINE.match(line).group(1) for line in lines(log_file)]
    filter_path = tmp_path / "selchat.conf"
    filter_path.write_text(doc_block("# /etc/fail2ban/filter.d/selchat.conf"))
    # fail2ban reads times in its local zone unless they say theirs: make that far from UTC.
    env = {**os.environ, "TZ": "JST-9"}
    result = subprocess.run([FAIL2BAN_REGEX, "--out", "row", str(log_file), str(filter_path)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [ast.literal_eval(line.strip().rstrip(",")) for line in result.stdout.splitlines() if line.strip()]
    epoch = [int(datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()) for s in stamps]
    assert [(row[0], row[1]) for row in rows] == [
        ("203.0.113.7", epoch[0]), ("203.0.113.9", epoch[2]), ("198.51.100.1", epoch[3]), ("2001:db8::1", epoch[4])]


@pytest.mark.skipif(shutil.which("fail2ban-client") is None or not os.path.isdir("/etc/fail2ban"),
                    reason="fail2ban is not installed")
def test_the_documented_fail2ban_jail_passes_fail2bans_config_test(tmp_path):
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for other in (conf / "jail.d").iterdir():   # the distribution's jails (sshd) want their own logs
        other.unlink()
    (conf / "filter.d" / "selchat.conf").write_text(doc_block("# /etc/fail2ban/filter.d/selchat.conf"))
    jail = doc_block("# /etc/fail2ban/jail.d/selchat.conf")
    log_file = tmp_path / "selchat.log"
    log_file.write_text("")
    (conf / "jail.d" / "selchat.conf").write_text(jail.replace("/var/log/selchat/selchat.log", str(log_file)))
    result = subprocess.run(["fail2ban-client", "-c", str(conf), "-t"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[selchat]" in jail and "filter   = selchat" in jail
