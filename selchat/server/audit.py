"""Operator-facing events: one log record per thing an operator acts on.

Each record carries a stable event name (``login``, ``login-failed``,
``register``, ``session-end``, ``refused``, ``throttled``, ``storage-error``,
...) and flat key=value fields (``user``, ``addr``, ``reason``, ...). The
formatters (``selchat/logsetup.py``) render them as text or JSON; the names
and fields are listed in docs/operations.md, and fail2ban filters match them,
so they do not change lightly.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("selchat.events")


def emit(event: str, level: int = logging.INFO, **fields) -> None:
    """Log ``event`` with ``fields``; ``record.event`` and ``record.fields`` carry them."""
    if log.isEnabledFor(level):
        text = " ".join([event, *(f"{k}={_quote(v)}" for k, v in fields.items())])
        log.log(level, "%s", text, extra={"event": event, "fields": fields})


def _quote(value) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)  # quoted, with backslash escapes; ASCII only
    return text
