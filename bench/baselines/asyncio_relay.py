#!/usr/bin/env python3
"""A minimal chat relay on asyncio Protocols: the baseline ``selchat bench`` compares against.

It is what a careful programmer writes in an afternoon when all that matters
is relaying lines fast, and nothing selchat does beyond that: no passwords, no
per-frame validation, no sessions or heartbeats, no flow control.

Protocol (one socket per user, lines ending in LF)::

    C: LOGIN <name>          S: WELCOME <name>
    C: to <name> <text>      relayed to <name> as   S: from <sender> <text>

A message for a name nobody logged in as is answered with ``NOUSER <name>``.
Everything one ``data_received`` call produces for one destination leaves in
one ``transport.write`` (so 32 messages read in one ``recv`` cost one
``send``), as in selchat's reactor.

    python bench/baselines/asyncio_relay.py --host 127.0.0.1 --port 0

prints ``baseline asyncio relay listening on HOST:PORT`` once it accepts, and
stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

MAX_LINE = 64 * 1024  # a run without LF this long closes the socket


class Relay(asyncio.Protocol):
    """One user's socket."""

    __slots__ = ("users", "transport", "name", "prefix", "buf")

    def __init__(self, users: dict):
        self.users = users          # name -> Relay, shared by every connection
        self.transport = None
        self.name = None
        self.prefix = b""           # b"from <name> ", built once at login
        self.buf = b""

    def connection_made(self, transport) -> None:
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP sockets

    def connection_lost(self, exc) -> None:
        if self.name is not None and self.users.get(self.name) is self:
            del self.users[self.name]

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        if len(self.buf) > MAX_LINE:
            self.transport.close()
            return
        users = self.users
        out: dict = {}  # destination -> list of texts, written once below
        for line in lines:
            verb, _, rest = line.partition(b" ")
            if verb == b"to":
                dest, _, text = rest.partition(b" ")
                peer = users.get(dest)
                if peer is None:
                    self.transport.write(b"NOUSER " + dest + b"\n")
                elif peer in out:
                    out[peer].append(text)
                else:
                    out[peer] = [text]
            elif verb == b"LOGIN" and self.name is None and rest:
                self.name = rest
                self.prefix = b"from " + rest + b" "
                users[rest] = self
                self.transport.write(b"WELCOME " + rest + b"\n")
        if out:
            prefix = self.prefix
            joiner = b"\n" + prefix
            for peer, texts in out.items():
                peer.transport.write(prefix + joiner.join(texts) + b"\n")


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    users: dict = {}
    server = await loop.create_server(lambda: Relay(users), host, port, backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    address = server.sockets[0].getsockname()
    print(f"baseline asyncio relay listening on {address[0]}:{address[1]}", flush=True)
    await stop
    server.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7118)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
