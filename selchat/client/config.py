"""The client's config file: ``$XDG_CONFIG_HOME/selchat/config.toml``.

It holds defaults for ``selchat connect`` options, one key per option::

    host = "chat.example.org"     # or several: "a.example.org,b.example.org:7200"
    port = 7117
    user = "alice"
    color = true
    timestamps = true
    timestamp_format = "%H:%M:%S"
    tls = true
    ca = "ca.pem"          # relative to the file's directory; ~ is expanded

``command.py`` hands the keys to click as ``default_map``, so a value on the
command line wins, then the option's environment variable, then the file,
then the built-in default. Reading is strict: an unknown key, a table, or a
password is an error that names the file, so a typo never passes silently.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STRING, INTEGER, NUMBER, BOOLEAN = (str,), (int,), (int, float), (bool,)
_WORDS = {STRING: "a string", INTEGER: "an integer", NUMBER: "a number", BOOLEAN: "true or false"}

#: Config keys: the option each sets, and the TOML value type it takes.
KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "host": ("--host", STRING),
    "port": ("--port", INTEGER),
    "user": ("--user", STRING),
    "retry": ("--retry", INTEGER),
    "reconnect": ("--reconnect/--no-reconnect", BOOLEAN),
    "ping_interval": ("--ping-interval", NUMBER),
    "ping_timeout": ("--ping-timeout", NUMBER),
    "color": ("--color/--no-color", BOOLEAN),
    "bell": ("--bell/--no-bell", BOOLEAN),
    "timestamps": ("--timestamps/--no-timestamps", BOOLEAN),
    "timestamp_format": ("--timestamp-format", STRING),
    "tls": ("--tls/--no-tls", BOOLEAN),
    "ca": ("--ca", STRING),
}
#: Keys that name a file: a relative one is taken from the config file's directory.
PATH_KEYS = frozenset({"ca"})


class ConfigError(Exception):
    """The config file cannot be used; the message says where and why."""


def default_path(environ=os.environ) -> Path:
    """``$XDG_CONFIG_HOME/selchat/config.toml``, or ``~/.config/...`` when unset
    (the XDG spec ignores a relative ``XDG_CONFIG_HOME``)."""
    base = environ.get("XDG_CONFIG_HOME", "")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "selchat" / "config.toml"


def read(path: Path, required: bool) -> dict:
    """The keys of the file at ``path``, checked; {} if it does not exist and
    is not ``required`` (the default path need not exist)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file") from None
        return {}
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    out = check(data, path)
    for key in PATH_KEYS & out.keys():
        out[key] = str(Path(path).parent / Path(out[key]).expanduser())   # an absolute one stays
    return out


def check(data: dict, path: Path | str = "config") -> dict:
    """``data`` with keys normalised (``timestamp-format`` is ``timestamp_format``)."""
    out = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key == "password":
            raise ConfigError(f"{path}: the password is not read from the config file; "
                              "set SELCHAT_PASSWORD or type it when asked")
        if key not in KEYS:
            known = ", ".join(KEYS)
            raise ConfigError(f"{path}: unknown key {raw_key!r} (known keys: {known})")
        option, types = KEYS[key]
        # bool is an int in Python; a number option must not take true/false
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{path}: {raw_key} must be {_WORDS[types]} (it sets {option})")
        out[key] = value
    return out
