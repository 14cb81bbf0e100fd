"""Password hashing with scrypt.

Hashes are self-describing text, ``scrypt$<n>$<r>$<p>$<salthex>$<hashhex>``,
so the cost parameters can change later and hashes made with older
parameters still verify (the parameters used are read back from the
encoded string; the key length is the length of the stored hash).

Standard library only: :func:`hashlib.scrypt` for the key derivation,
:mod:`secrets` for the per-password 16-byte salt and
:func:`hmac.compare_digest` for the comparison.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = [
    "MAX_PASSWORD_BYTES",
    "DEFAULT_SCRYPT_N",
    "DEFAULT_SCRYPT_R",
    "DEFAULT_SCRYPT_P",
    "DKLEN",
    "SALT_BYTES",
    "hash_password",
    "verify_password",
    "dummy_verify",
]

MAX_PASSWORD_BYTES = 1024
DEFAULT_SCRYPT_N = 2**14
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1
DKLEN = 32
SALT_BYTES = 16

_SCHEME = "scrypt"
# Refuse absurd parameters read back from storage (a corrupt or hostile row
# must not make verification allocate gigabytes or spin for minutes).
_MAX_N = 2**22
_MAX_R = 32
_MAX_P = 16
_MAX_DKLEN = 128


def _maxmem(n: int, r: int, p: int) -> int:
    # OpenSSL needs 128*r*(n+2) bytes for V plus 128*r*p for B; add slack.
    return 128 * r * (n + 2) + 128 * r * p + (1 << 20)


def _derive(pw: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        pw, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=_maxmem(n, r, p)
    )


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 2 or n & (n - 1):
        raise ValueError(f"scrypt n must be a power of two >= 2, got {n!r}")
    if n > _MAX_N:
        raise ValueError(f"scrypt n must be at most {_MAX_N}, got {n}")


def _encode_for_verify(password: object) -> bytes:
    """Bytes to feed scrypt when verifying; never raises.

    Lone surrogates are passed through (``surrogatepass``) so the same
    amount of work is spent; such bytes can never match a stored hash
    because :func:`hash_password` encodes strictly.  Overlong input is
    truncated so an attacker cannot make a single attempt arbitrarily
    expensive; the result cannot match either, since stored passwords are
    at most ``MAX_PASSWORD_BYTES``.
    """
    if isinstance(password, str):
        pw = password.encode("utf-8", "surrogatepass")
    elif isinstance(password, (bytes, bytearray)):
        pw = bytes(password)
    else:
        pw = b""
    return pw[: MAX_PASSWORD_BYTES + 1]


def hash_password(password: str, n: int = DEFAULT_SCRYPT_N) -> str:
    """Hash *password* with a fresh random salt; return the encoded string.

    The password is encoded as strict UTF-8 (a string with lone surrogates
    raises :class:`UnicodeEncodeError`, a :class:`ValueError`).  Shape
    rules (length, forbidden characters) are the caller's business; see
    :func:`selchat.store.accounts.check_password`.
    """
    _check_n(n)
    pw = password.encode("utf-8")
    salt = secrets.token_bytes(SALT_BYTES)
    r, p = DEFAULT_SCRYPT_R, DEFAULT_SCRYPT_P
    dk = _derive(pw, salt, n, r, p, DKLEN)
    return f"{_SCHEME}${n}${r}${p}${salt.hex()}${dk.hex()}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    try:
        scheme, n_s, r_s, p_s, salt_hex, hash_hex = encoded.split("$")
    except (AttributeError, ValueError):
        return None
    if scheme != _SCHEME:
        return None
    try:
        if not (n_s.isdigit() and r_s.isdigit() and p_s.isdigit()):
            return None
        n, r, p = int(n_s), int(r_s), int(p_s)
        salt = bytes.fromhex(salt_hex)
        expected = bytes.fromhex(hash_hex)
    except ValueError:
        return None
    if n < 2 or n & (n - 1) or n > _MAX_N:
        return None
    if not (1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        return None
    if not salt or not (1 <= len(expected) <= _MAX_DKLEN):
        return None
    return n, r, p, salt, expected


def verify_password(password: str, encoded: str) -> bool:
    """True if *password* matches *encoded* (as made by :func:`hash_password`).

    Uses the parameters stored in *encoded*.  A malformed *encoded* string
    yields False (after spending a default-cost dummy hash).
    """
    pw = _encode_for_verify(password)
    parsed = _parse(encoded)
    if parsed is None:
        dummy_verify(password)
        return False
    n, r, p, salt, expected = parsed
    try:
        dk = _derive(pw, salt, n, r, p, len(expected))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(dk, expected)


# Fixed salt and target for the dummy computation; their values do not matter.
_DUMMY_SALT = b"\x00" * SALT_BYTES
_DUMMY_TARGET = b"\x00" * DKLEN


def dummy_verify(password: str, n: int = DEFAULT_SCRYPT_N) -> None:
    """Spend the same work as a real verification and discard the result.

    Call this when there is no stored hash to check against (unknown user,
    malformed input) so response time does not reveal which part was wrong.
    """
    try:
        _check_n(n)
    except ValueError:
        n = DEFAULT_SCRYPT_N
    dk = _derive(
        _encode_for_verify(password),
        _DUMMY_SALT,
        n,
        DEFAULT_SCRYPT_R,
        DEFAULT_SCRYPT_P,
        DKLEN,
    )
    hmac.compare_digest(dk, _DUMMY_TARGET)
