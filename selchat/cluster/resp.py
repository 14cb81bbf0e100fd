"""RESP for the Redis link, without I/O: command encoding and ``redis://`` URLs.

Replies are parsed by ``hiredis.Reader`` (see ``redislink``); this module
only writes. It needs nothing outside the standard library: with hiredis
installed, ``encode`` lets ``hiredis.pack_command`` (C, about four times
faster) write the bytes, which are the same (the tests compare them).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import urllib.parse

try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis is in the cluster extra
    _pack = None

__all__ = ["RedisConfig", "encode", "encode_py", "parse_url"]

DEFAULT_PORT = 6379


def _arg(value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):  # an int, but True is rarely meant as b"1"
        raise TypeError("a bool is not a Redis argument; pass 1/0 or a string")
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode("ascii")  # round-trips; "inf" is Redis's too
    raise TypeError(f"a Redis argument is bytes, str, int or float, not {type(value).__name__}")


def encode(*args) -> bytes:
    """One command as a RESP array of bulk strings.

    ``bytes``-likes go as they are, ``str`` as UTF-8, ``int`` and ``float``
    in decimal (``repr`` for floats). ``encode("SET", "k", 1)`` is
    ``b"*3\\r\\n$3\\r\\nSET\\r\\n$1\\r\\nk\\r\\n$1\\r\\n1\\r\\n"``.
    """
    if not args:
        raise ValueError("a Redis command needs at least its name")
    if _pack is not None:
        try:
            return _pack(args)
        except TypeError:
            pass  # a bytearray (fine), a bool or None (not): _arg tells which
    return encode_py(*args)


def encode_py(*args) -> bytes:
    """``encode`` in Python alone (what it does without hiredis)."""
    parts = [b"*%d\r\n" % len(args)]
    for value in args:
        data = _arg(value)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@dataclasses.dataclass(frozen=True)
class RedisConfig:
    """Where a Redis is and how to log in to it (see ``parse_url``)."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    password: str | None = dataclasses.field(default=None, repr=False)
    username: str | None = None  # Redis 6 ACL user; AUTH with one argument if None

    @property
    def numeric_host(self) -> bool:
        """True if ``host`` is an IP address literal (no name lookup needed)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def redacted(self) -> str:
        """The URL without the password: safe for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = ""
        if self.username is not None or self.password is not None:
            auth = f"{self.username or ''}:***@" if self.password is not None else f"{self.username}@"
        return f"redis://{auth}{host}:{self.port}/{self.db}"

    def __str__(self) -> str:
        return self.redacted()


def parse_url(url: str) -> RedisConfig:
    """``redis://[[user]:password@]host[:port][/db]`` as a ``RedisConfig``.

    The port defaults to 6379 and the database to 0; the user name and the
    password are percent-decoded. Raises ``ValueError`` with a message fit for
    an operator for anything else: ``rediss://`` (TLS is not supported yet),
    ``unix://``, a query string, a bad port or database number.
    """
    if not isinstance(url, str):
        raise TypeError(f"a Redis URL is a str, not {type(url).__name__}")
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "rediss":
        raise ValueError(f"{_redact(url)}: rediss:// (Redis over TLS) is not supported yet; "
                         "use redis:// on a trusted network, or a TLS tunnel to it")
    if scheme != "redis":
        raise ValueError(f"{_redact(url)}: not a Redis URL; expected redis://[:password@]host:port/db")
    if parts.query or parts.fragment:
        raise ValueError(f"{_redact(url)}: options in the URL (?...) are not supported")
    host = parts.hostname
    if not host:
        raise ValueError(f"{_redact(url)}: no host; expected redis://[:password@]host:port/db")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{_redact(url)}: the port must be a number from 1 to 65535") from None
    if port is None:
        port = DEFAULT_PORT
    elif not 0 < port < 65536:
        raise ValueError(f"{_redact(url)}: the port must be a number from 1 to 65535")
    path = parts.path.strip("/")
    if not path:
        db = 0
    elif path.isdigit() and path.isascii():
        db = int(path)
    else:
        raise ValueError(f"{_redact(url)}: the database must be a number (redis://host:port/0), not {path!r}")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if password == "":
        password = None
    return RedisConfig(host=host, port=port, db=db, password=password, username=username)


def _redact(url: str) -> str:
    """``url`` with any password replaced, for error messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "the Redis URL"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))
