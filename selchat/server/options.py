"""``selchat serve``'s settings from the command line, the environment and a TOML file.

A value comes from, first found: the command line, its ``SELCHAT_*``
environment variable, the config file, the default in
:class:`~selchat.server.config.ServerConfig`. The file's keys are the
``ServerConfig`` field names (``ping_interval = 90``; ``ping-interval`` is
accepted too)::

    host = "0.0.0.0"
    tls_cert = "/etc/selchat/fullchain.pem"   # relative paths: from the file's directory
    max_per_address = 30

:class:`Loader` re-reads the file on every :meth:`Loader.load`: the server
calls it again on SIGHUP, from a worker thread, so it keeps no state but what
it was given and touches nothing shared. Reading is strict: an unknown key or
a bad value is a :class:`ConfigError` that names the file and the key, so a
typo never passes silently (and a reload with one keeps the old config).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from selchat.server.config import ServerConfig
from selchat.store import is_postgres_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_DEFAULTS = ServerConfig()
_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}

#: Keys the file may set: every setting but the file itself.
FILE_KEYS = tuple(name for name in _FIELDS if name != "config_file")

#: Settings that ``selchat serve`` has an option (and so an environment
#: variable) for; the others (bursts, pre-login caps, the tick ...) only the
#: file sets. ``scrypt_n`` is a hidden option for tests, without a variable.
ENV_KEYS = (
    "host", "port", "db", "ping_interval", "ping_timeout", "request_timeout", "login_timeout",
    "attach_timeout", "registration", "registrations_per_hour", "stuck_timeout", "resume_window", "resume_buffer",
    "cluster", "max_connections",
    "max_per_address",
    "conn_rate", "cmd_rate", "msg_rate", "throttle_after", "tls_cert", "tls_key", "workers",
    "motd_file", "metrics", "admin_socket", "log_file", "log_format", "irc_port", "irc_tls_port",
)

#: Keys whose value names a file: relative ones are taken from the config file's directory
#: (but a ``db`` that is a postgresql:// URL is left as it is).
PATH_KEYS = frozenset({"db", "tls_cert", "tls_key", "motd_file", "log_file", "admin_socket"})

#: Numbers that must be above 0 (a zero deadline or tick cannot work); every
#: other number must be at least 0 (0 means "no limit" where a limit can be off).
POSITIVE = frozenset({
    "login_timeout", "attach_timeout", "ping_interval", "ping_timeout", "request_timeout",
    "stuck_timeout", "resume_window", "resume_buffer", "tls_handshake_timeout", "tick", "workers", "prelogin_bytes", "prelogin_frames",
    "max_login_failures", "cmd_burst", "msg_burst", "request_burst", "conn_burst", "max_hash_queue",
})

LOG_FORMATS = ("text", "json")

#: Settings off by default (None) whose value is not a string.
_OPTIONAL_KINDS = {"irc_port": int, "irc_tls_port": int}
#: Settings that are TCP port numbers.
_PORTS = frozenset({"port", "irc_port", "irc_tls_port"})


class ConfigError(Exception):
    """A setting cannot be used; the message says where it came from and why."""


def envvar(key: str) -> str:
    """The environment variable of setting ``key``: ``SELCHAT_PING_INTERVAL``."""
    return "SELCHAT_" + key.upper()


def option(key: str) -> str:
    """The command-line option of setting ``key``: ``--ping-interval``."""
    return "--" + key.replace("_", "-")


def _kind(key: str) -> type:
    """The type of setting ``key``: that of its default (for the optional ones, str
    unless _OPTIONAL_KINDS says otherwise)."""
    default = getattr(_DEFAULTS, key)
    return _OPTIONAL_KINDS.get(key, str) if default is None else type(default)


class Loader:
    """Builds a ``ServerConfig`` from ``path`` (a TOML file, or None), the
    values given on the command line (``cli``: field name -> value, only
    those the user gave) and ``environ``."""

    def __init__(self, path: str | os.PathLike | None = None, cli: Mapping | None = None,
                 environ: Mapping[str, str] | None = None):
        self.path = None if path is None else str(path)
        self.cli = dict(cli or {})
        self.environ = dict(os.environ if environ is None else environ)  # a copy: later changes are not ours
        unknown = set(self.cli) - set(FILE_KEYS)
        if unknown:
            raise ValueError(f"not ServerConfig fields: {sorted(unknown)}")

    def load(self) -> ServerConfig:
        """Read the file (again) and return a new config; ConfigError if anything is wrong."""
        values: dict = {}
        where: dict = {}   # key -> where its value came from, for error messages
        if self.path is not None:
            for key, value in self._read_file().items():
                values[key], where[key] = value, f'{self.path}: key "{key}"'
        for key in ENV_KEYS:
            text = self.environ.get(envvar(key))
            if text:  # an empty variable counts as unset, as click has it
                values[key], where[key] = _from_env(key, text), envvar(key)
        for key, value in self.cli.items():
            values[key], where[key] = value, option(key)
        for key, value in values.items():
            problem = _check(key, value)
            if problem:
                raise ConfigError(f"{where[key]}: {problem}")
        for key, value in values.items():
            if _kind(key) is float and isinstance(value, int):
                values[key] = float(value)   # `ping_interval = 90` in the file
        config = ServerConfig(**values, config_file=self.path)
        if config.tls_key and not config.tls_cert:
            raise ConfigError(f"{where['tls_key']}: a TLS key needs a certificate (tls_cert) too")
        if config.irc_tls_port is not None and not config.tls_cert:
            raise ConfigError(f"{where['irc_tls_port']}: IRC over TLS needs the server's certificate (tls_cert)")
        return config

    def _read_file(self) -> dict:
        path = self.path
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        out = {}
        for raw, value in data.items():
            key = raw.replace("-", "_")
            if key not in FILE_KEYS:
                close = difflib.get_close_matches(key, FILE_KEYS, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                raise ConfigError(f'{path}: unknown key "{raw}"{hint}')
            if key in out:
                raise ConfigError(f'{path}: key "{key}" is set twice')
            problem = _type_problem(key, value)
            if problem:
                raise ConfigError(f'{path}: key "{raw}": {problem}')
            if value == "" and getattr(_DEFAULTS, key) is None:
                value = None  # `tls_cert = ""`: off, as if not set
            elif key in PATH_KEYS and value and not (key == "db" and is_postgres_url(value)):
                value = str(Path(path).parent / Path(value).expanduser())  # an absolute one stays
            out[key] = value
        return out


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_problem(key: str, value) -> str | None:
    kind = _kind(key)
    ok = (isinstance(value, bool) if kind is bool
          else not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind))
    return None if ok else f"must be {_WORDS[kind]}, not {_toml_repr(value)}"


def _toml_repr(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _from_env(key: str, text: str):
    """An environment variable's text as setting ``key`` takes it (click's rules);
    text that does not parse is returned as is, for _check to refuse."""
    kind = _kind(key)
    text = text.strip() if kind is not str else text
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "t", "yes", "y", "on"):
                return True
            if lowered in ("0", "false", "f", "no", "n", "off"):
                return False
            return text
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        return text
    return text


def _check(key: str, value) -> str | None:
    """Why ``value`` cannot be setting ``key``, or None if it can."""
    if value is None and getattr(_DEFAULTS, key) is None:
        return None  # an optional setting left off
    problem = _type_problem(key, value)
    if problem:
        return problem
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            return f"must be a finite number, not {value}"
        if key in POSITIVE and value <= 0:
            return f"must be greater than 0, not {value}"
        if value < 0:
            return f"must not be negative, not {value}"
        if key in _PORTS and value > 65535:
            return f"must be a port number (0-65535), not {value}"
        if key == "workers" and value > 64:
            return f"must be at most 64, not {value}"
        if key == "scrypt_n" and (value < 2 or value & (value - 1)):
            return f"must be a power of 2 above 1, not {value}"
        return None
    if value == "":
        return "must not be empty"
    if key == "log_format" and value not in LOG_FORMATS:
        return f"must be one of {', '.join(LOG_FORMATS)}, not {value!r}"
    if key == "metrics" and value:
        from selchat.server.metrics import parse_address  # lazily: it brings the HTTP server

        try:
            parse_address(value)
        except ValueError:
            return f"must be HOST:PORT (\"127.0.0.1:9117\", \"[::1]:9117\"), not {value!r}"
    return None
