"""`selchat serve --config`: the TOML file, its precedence and its errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from selchat.cli import main
from selchat.server.config import ServerConfig
from selchat.server.options import ConfigError, Loader
from tests.support import DEADLINE, LineSocket, ServerProcess
from tests.test_systemd import NotifySocket


def write(path, text: str):
    path.write_text(text)
    return path


# -- the Loader ----------------------------------------------------------------------

def test_precedence_is_flag_then_env_then_file_then_default(tmp_path):
    conf = write(tmp_path / "selchat.toml", "ping_interval = 5\nping_timeout = 7\nmax_per_address = 9\n")
    env = {"SELCHAT_PING_INTERVAL": "6", "SELCHAT_PING_TIMEOUT": "8"}
    config = Loader(conf, {"ping_interval": 4.0}, env).load()
    assert config.ping_interval == 4.0           # the flag beats the variable and the file
    assert config.ping_timeout == 8.0            # the variable beats the file
    assert config.max_per_address == 9           # the file beats the default
    assert config.request_timeout == ServerConfig().request_timeout
    assert config.config_file == str(conf)
    assert Loader(None, {}, {}).load() == ServerConfig()


def test_every_load_rereads_the_file(tmp_path):
    conf = write(tmp_path / "selchat.toml", "msg_rate = 5\n")
    loader = Loader(conf, {"port": 0}, {})
    assert loader.load().msg_rate == 5.0
    write(conf, "msg_rate = 7\nregistration = false\n")
    again = loader.load()
    assert (again.msg_rate, again.registration, again.port) == (7.0, False, 0)
    write(conf, "msg_rate = -1\n")
    with pytest.raises(ConfigError):
        loader.load()


def test_keys_may_use_dashes_and_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "etc").mkdir()
    conf = write(tmp_path / "etc" / "selchat.toml",
                 'ping-interval = 12\ndb = "data/accounts.db"\ntls_cert = "/abs/cert.pem"\nmetrics = ""\n')
    config = Loader(conf, {}, {}).load()
    assert config.ping_interval == 12.0
    assert config.db == str(tmp_path / "etc" / "data" / "accounts.db")
    assert config.tls_cert == "/abs/cert.pem"
    assert config.metrics is None     # "" leaves an optional setting off


@pytest.mark.parametrize("text, message", [
    ("pnig_interval = 90\n", 'unknown key "pnig_interval" (did you mean "ping_interval"?)'),
    ("[server]\nport = 1\n", 'unknown key "server"'),
    ('port = "7117"\n', 'key "port": must be an integer, not "7117"'),
    ("port = 70000\n", 'key "port": must be a port number'),
    ("registration = 1\n", 'key "registration": must be true or false'),
    ("max_per_address = true\n", 'key "max_per_address": must be an integer'),
    ("ping_timeout = -1\n", 'key "ping_timeout": must be greater than 0, not -1'),
    ("conn_rate = -0.5\n", 'key "conn_rate": must not be negative'),
    ("throttle_after = 2.5\n", 'key "throttle_after": must be an integer'),
    ('log_format = "xml"\n', 'key "log_format": must be one of text, json, not \'xml\''),
    ('metrics = "9117"\n', 'key "metrics": must be HOST:PORT'),
    ("workers = 0\n", 'key "workers": must be greater than 0'),
    ("config_file = 'x.toml'\n", 'unknown key "config_file"'),
    ('tls_key = "/k.pem"\n', 'key "tls_key": a TLS key needs a certificate'),
    ("port = \n", "not valid TOML"),
])
def test_bad_files_name_the_file_and_the_key(tmp_path, text, message):
    conf = write(tmp_path / "selchat.toml", text)
    with pytest.raises(ConfigError) as err:
        Loader(conf, {}, {}).load()
    assert str(err.value).startswith(f"{conf}: "), err.value
    assert message in str(err.value)


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        Loader(tmp_path / "nope.toml", {}, {}).load()
    with pytest.raises(ConfigError, match=r": cannot read it: Is a directory"):
        Loader(tmp_path, {}, {}).load()
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"port = 1\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin\.toml: not valid TOML"):
        Loader(binary, {}, {}).load()


def test_bad_environment_and_flag_values_name_their_source(tmp_path):
    with pytest.raises(ConfigError, match=r"^SELCHAT_PING_INTERVAL: must be a number, not \"soon\""):
        Loader(None, {}, {"SELCHAT_PING_INTERVAL": "soon"}).load()
    with pytest.raises(ConfigError, match=r"^--ping-interval: must be greater than 0"):
        Loader(None, {"ping_interval": 0.0}, {}).load()
    env = Loader(None, {}, {"SELCHAT_REGISTRATION": "off", "SELCHAT_WORKERS": "3", "SELCHAT_METRICS": ""}).load()
    assert (env.registration, env.workers, env.metrics) == (False, 3, None)


# -- selchat serve --config -------------------------------------------------------------

def serve(*args, env=None):
    """`selchat serve` in a real process that is expected to exit at once."""
    return subprocess.run([sys.executable, "-m", "selchat.cli", "serve", *args], capture_output=True, text=True,
                          timeout=DEADLINE, env=env)


def test_serve_refuses_a_bad_file_naming_file_and_key(tmp_path):
    conf = write(tmp_path / "selchat.toml", "pnig_interval = 90\n")
    result = serve("--config", str(conf), "--db", str(tmp_path / "a.db"))
    assert result.returncode == 1
    assert f'{conf}: unknown key "pnig_interval"' in result.stderr
    write(conf, "max_per_address = -3\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(conf), "--db", str(tmp_path / "a.db")])
    assert result.exit_code == 1
    assert f'{conf}: key "max_per_address": must not be negative, not -3' in result.output


def test_serve_takes_the_file_and_a_flag_outranks_it(tmp_path):
    conf = write(tmp_path / "selchat.toml", "max_per_address = 1\nconn_rate = 0\n")
    server = ServerProcess(tmp_path, "--config", str(conf))
    try:
        first = server.connect()
        second = LineSocket(server.host, server.port, hello=False)
        assert second.expect_closed() == ["BYE too-many-connections at most 1 connections from one address"]
        first.close()
    finally:
        server.stop()
    server = ServerProcess(tmp_path, "--config", str(conf), "--max-per-address", "2")
    try:
        sockets = [server.connect(), server.connect()]   # both greeted with HELLO
        third = LineSocket(server.host, server.port, hello=False)
        assert third.expect_closed()[0].startswith("BYE too-many-connections at most 2 ")
        for sock in sockets:
            sock.close()
    finally:
        server.stop()


def test_sighup_rereads_the_file_but_a_flag_stays(tmp_path, monkeypatch):
    """The server's reload calls the Loader again: the file's new values apply,
    the command line still outranks them; the renamed log file is reopened."""
    notify = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    conf = write(tmp_path / "selchat.toml", "max_per_address = 1\nconn_rate = 0\n")
    log_file = tmp_path / "selchat.log"
    server = ServerProcess(tmp_path, "--config", str(conf), "--log-file", str(log_file), "--msg-rate", "3")
    try:
        assert notify.receive()[0] == "READY=1"
        write(conf, "max_per_address = 2\nconn_rate = 0\nmsg_rate = 99\n")
        os.rename(log_file, tmp_path / "selchat.log.1")
        server.proc.send_signal(signal.SIGHUP)
        assert notify.receive()[0] == "RELOADING=1"
        assert notify.receive() == ["READY=1"]
        sockets = [server.connect(), server.connect()]   # two from one address now
        third = LineSocket(server.host, server.port, hello=False)
        assert third.expect_closed()[0].startswith("BYE too-many-connections at most 2 ")
        for sock in sockets:
            sock.close()
    finally:
        assert server.stop() == 0
        notify.close()
    # The reload's verdict went to the reopened file: max_per_address changed,
    # msg_rate did not (--msg-rate outranks the file); the old file got the rest.
    verdict = [line for line in log_file.read_text().splitlines() if "selchat.server: reloaded" in line]
    assert len(verdict) == 1 and "max_per_address" in verdict[0] and "msg_rate" not in verdict[0], verdict
    assert "descriptor limit" in (tmp_path / "selchat.log.1").read_text()
