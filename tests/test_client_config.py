"""``selchat connect`` options: the config file, and where each value comes from.

In process, with click's CliRunner; ``app.run`` is replaced by a recorder, so
nothing connects: what is checked is what the client would run with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from selchat.client import command, config
from selchat.client.ui import JsonUI, ScriptedUI


@pytest.fixture
def run(monkeypatch, tmp_path):
    """Invoke ``connect`` with args and env; returns (result, settings, ui)."""
    calls = []

    def fake_run(settings, ui, ask_retry=None):
        calls.append((settings, ui))
        return 0

    monkeypatch.setattr(command.app, "run", fake_run)
    home = tmp_path / "home"
    home.mkdir()

    def invoke(*args, env=None, interactive=False):
        monkeypatch.setattr(command, "_is_interactive", lambda: interactive)
        base = {"HOME": str(home), "XDG_CONFIG_HOME": None, "SELCHAT_CONFIG": None, "SELCHAT_HOST": None,
                "SELCHAT_PORT": None, "SELCHAT_USER": None, "NO_COLOR": None, "SELCHAT_PASSWORD": "pw",
                "TERM": "xterm"}
        base.update(env or {})
        calls.clear()
        result = CliRunner().invoke(command.connect, list(args), env=base)
        settings, ui = calls[0] if calls else (None, None)
        return result, settings, ui

    invoke.home = home
    return invoke


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_default_path_honours_xdg_config_home(tmp_path):
    assert config.default_path({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "selchat" / "config.toml"
    home_default = Path("~/.config/selchat/config.toml").expanduser()
    assert config.default_path({}) == home_default
    assert config.default_path({"XDG_CONFIG_HOME": "relative/dir"}) == home_default


def test_the_config_file_gives_defaults(run):
    write(run.home / ".config" / "selchat" / "config.toml",
          'host = "chat.example"\nport = 7000\nuser = "carol"\nreconnect = true\ntimestamps = true\n'
          'timestamp-format = "%H:%M:%S"\nping_interval = 5\n')
    result, settings, ui = run()
    assert result.exit_code == 0, result.output
    assert (settings.host, settings.port, settings.user) == ("chat.example", 7000, "carol")
    assert settings.reconnect is True and settings.ping_interval == 5
    assert isinstance(ui, ScriptedUI) and ui.timestamp_format == "%H:%M:%S"


def test_command_line_beats_env_beats_file_beats_default(run, tmp_path):
    path = write(tmp_path / "x.toml", 'host = "from-file"\nport = 7001\nuser = "fileuser"\n')
    _, settings, _ = run("--config", str(path))
    assert (settings.host, settings.port, settings.user) == ("from-file", 7001, "fileuser")
    _, settings, _ = run("--config", str(path), env={"SELCHAT_HOST": "from-env", "SELCHAT_USER": "envuser"})
    assert (settings.host, settings.port, settings.user) == ("from-env", 7001, "envuser")
    _, settings, _ = run("--config", str(path), "--host", "from-cli", "--port", "7002",
                         env={"SELCHAT_HOST": "from-env", "SELCHAT_PORT": "7003"})
    assert (settings.host, settings.port) == ("from-cli", 7002)
    _, settings, _ = run("--user", "x")
    assert (settings.host, settings.port) == ("127.0.0.1", 7117)


def test_selchat_config_env_names_the_file(run, tmp_path):
    path = write(tmp_path / "y.toml", 'port = 7009\n')
    _, settings, _ = run("--user", "x", env={"SELCHAT_CONFIG": str(path)})
    assert settings.port == 7009


def test_xdg_config_home_is_where_the_file_is_looked_for(run, tmp_path):
    write(tmp_path / "xdg" / "selchat" / "config.toml", 'port = 7010\nuser = "xdguser"\n')
    _, settings, _ = run(env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert (settings.port, settings.user) == (7010, "xdguser")


@pytest.mark.parametrize("text, error", [
    ('prot = 7000\n', "unknown key 'prot'"),
    ('password = "hunter2"\n', "the password is not read from the config file"),
    ('port = "7000"\n', "port must be an integer (it sets --port)"),
    ('color = 1\n', "color must be true or false"),
    ('port = true\n', "port must be an integer"),
    ('ping_interval = "5"\n', "ping_interval must be a number"),
    ('[server]\nhost = "x"\n', "unknown key 'server'"),
    ('host = \n', "not valid TOML"),
])
def test_a_bad_config_file_is_an_error_that_names_it(run, tmp_path, text, error):
    path = write(tmp_path / "bad.toml", text)
    result, settings, _ = run("--user", "x", "--config", str(path))
    assert result.exit_code == 1 and settings is None
    assert error in result.output and str(path) in result.output


def test_a_missing_named_config_file_is_an_error_but_a_missing_default_is_not(run, tmp_path):
    result, settings, _ = run("--user", "x", "--config", str(tmp_path / "nope.toml"))
    assert result.exit_code == 1 and "no such file" in result.output
    result, settings, _ = run("--user", "x")
    assert result.exit_code == 0 and settings is not None


def test_reconnect_defaults_on_for_a_terminal_and_off_for_scripts(run):
    assert run("--user", "x")[1].reconnect is False
    assert run("--user", "x", "--reconnect")[1].reconnect is True
    assert run("--user", "x", interactive=True)[1].reconnect is True
    assert run("--user", "x", "--no-reconnect", interactive=True)[1].reconnect is False
    assert run("--user", "x", "--json", interactive=True)[1].reconnect is False


def test_json_is_scripted_even_on_a_terminal(run):
    _, _, ui = run("--user", "x", "--json", interactive=True)
    assert isinstance(ui, JsonUI)


def test_interactive_display_options(run, tmp_path):
    _, _, ui = run("--user", "x", interactive=True)
    assert (ui.color, ui.bell, ui.timestamp_format) == (True, True, "%H:%M")
    _, _, ui = run("--user", "x", "--no-color", "--no-bell", "--no-timestamps", interactive=True)
    assert (ui.color, ui.bell, ui.timestamp_format) == (False, False, None)
    _, _, ui = run("--user", "x", "--timestamp-format", "%T", interactive=True)
    assert ui.timestamp_format == "%T"
    _, _, ui = run("--user", "x", interactive=True, env={"TERM": "dumb"})
    assert ui.color is False


def test_no_color_outranks_the_file_and_the_command_line_outranks_no_color(run, tmp_path):
    path = write(tmp_path / "c.toml", "color = true\n")
    assert run("--user", "x", "--config", str(path), interactive=True)[2].color is True
    assert run("--user", "x", "--config", str(path), interactive=True, env={"NO_COLOR": "1"})[2].color is False
    assert run("--user", "x", interactive=True, env={"NO_COLOR": ""})[2].color is True   # empty: not set
    assert run("--user", "x", "--color", interactive=True, env={"NO_COLOR": "1"})[2].color is True
    off = write(tmp_path / "off.toml", "color = false\nbell = false\n")
    _, _, ui = run("--user", "x", "--config", str(off), interactive=True)
    assert ui.color is False and ui.bell is False

