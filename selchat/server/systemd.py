"""sd_notify(3) without libsystemd: tell systemd READY=1, RELOADING=1, STOPPING=1.

A unit with ``Type=notify`` sets ``$NOTIFY_SOCKET`` to a Unix datagram socket
("@" at the start means the abstract namespace). Sending never blocks
(MSG_DONTWAIT) and never raises: without systemd it does nothing.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*states: str) -> bool:
    """Send ``states`` ("READY=1", ...) to $NOTIFY_SOCKET; True if sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not states:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    lines = list(states)
    if "RELOADING=1" in lines:  # systemd >= 253 wants the time the reload began
        lines.append("MONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, path)
    except OSError:
        return False
    return True
