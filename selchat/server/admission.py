"""Admission: whether a new connection may come in, before any state is made.

The socket cap (below the descriptor limit), the cap per source address and
the new-connection rate per address. ``Server.accept`` asks ``refusal()``
and reports each socket's open and close, so the counts stay true.
"""

from __future__ import annotations

import resource

from selchat.server.limits import bucket


class Admission:
    def __init__(self, server):
        self.server = server
        self.per_host: dict[str, int] = {}      # open sockets per source address
        self.host_rate: dict[str, object] = {}  # connection-rate bucket per address
        # Keep the socket cap below the descriptor limit, with room for the
        # listener, the database, the wake-up pipe and the log.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_room = max(16, soft - 64)
        self.max_connections = server.config.max_connections or self.fd_room

    def configure(self, config) -> None:
        """A reload: the new socket cap (the rest is read from the config each time)."""
        self.max_connections = config.max_connections or self.fd_room

    def opened(self, host: str) -> None:
        self.per_host[host] = self.per_host.get(host, 0) + 1

    def closed(self, host: str) -> None:
        left = self.per_host.get(host, 1) - 1
        if left > 0:
            self.per_host[host] = left
        else:
            self.per_host.pop(host, None)

    def refusal(self, host: str, open_sockets: int) -> str | None:
        """Why a new connection from ``host`` is refused, or None."""
        cfg = self.server.config
        if self.server.stopping:
            return "shutdown the server is shutting down"
        if self.max_connections and open_sockets >= self.max_connections:
            return "server-full the server has no room for more connections"
        if cfg.max_per_address and self.per_host.get(host, 0) >= cfg.max_per_address:
            return f"too-many-connections at most {cfg.max_per_address} connections from one address"
        if cfg.conn_rate > 0:
            now = self.server.reactor.clock()
            rate = self.host_rate.get(host)
            if rate is None:
                if len(self.host_rate) > 10_000:
                    self._prune_rates(now)
                rate = self.host_rate[host] = bucket(cfg.conn_rate, cfg.conn_burst, now)
            if not rate.take(now):
                return "too-fast too many new connections from one address; slow down"
        return None

    def _prune_rates(self, now: float) -> None:
        for host, rate in list(self.host_rate.items()):
            rate.refill(now)
            if rate.full:
                del self.host_rate[host]

