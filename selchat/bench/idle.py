"""Idle scale: N logged-in users (3N sockets) held with heartbeats running.

The spawned server gets a short ``--ping-interval`` so that two ping periods
pass in seconds, not minutes; the users answer every ``PING`` and send
nothing else, so the server's heartbeat work is all there is. Reported: time
to connect and log in everyone, RSS per user, server CPU per heartbeat round
(and what that is at the default ping interval), and drops, which must be 0.

CPU per round is the server's CPU over the whole hold divided by the rounds
in it, so it also carries the timer wheel's idle ticking: an upper bound.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

from selchat.bench import BenchError
from selchat.bench import servers as srv
from selchat.bench import sysinfo
from selchat.bench.progress import Progress
from selchat.bench.relay import PASSWORD, default_workers
from selchat.bench.vusers import sources_for
from selchat.bench.workers import WorkerPool, idle_worker
from selchat.server.config import ServerConfig


#: Descriptors the server needs besides its users' sockets (listener, database,
#: waker, logs, and the 64 the server keeps in reserve below its limit).
SERVER_SPARE_FDS = 128


def max_idle_users() -> int:
    """The most idle users a spawned server can hold on this machine, in hundreds."""
    return (sysinfo.reachable_nofile() - SERVER_SPARE_FDS) // 3 // 100 * 100


def run_idle(users: int, *, ping_interval: float = 5.0, hold: float | None = None, pin: bool = False,
             workers: int | None = None, sources: int | None = None, progress: Progress | None = None) -> dict:
    progress = progress or Progress(False)
    server_cpus, gen_cpus = sysinfo.split_cpus(pin)
    sockets = 3 * users
    server_nofile = sockets + SERVER_SPARE_FDS
    limit = sysinfo.reachable_nofile()
    if server_nofile > limit:
        raise BenchError(f"--idle {users}: {sysinfo.nofile_advice(server_nofile)}; "
                             f"or use --idle {max_idle_users()} or fewer")
    # Each worker process holds its share of the client sockets under the same limit.
    workers = min(max(workers or default_workers(gen_cpus), -(-sockets // (limit - 1024))), users)
    hold = hold or 2 * ping_interval + 1.0
    # ~20,000 client ports per source address leaves room for TIME_WAIT leftovers.
    concurrency = max(16, 256 // workers)
    sources = sources or sources_for(concurrency * workers, max(2, sockets // 20000 + 1))
    names = [f"i{i}" for i in range(users)]
    result = {"mode": "idle", "users": users, "sockets": sockets, "ping_interval": ping_interval,
              "default_ping_interval": ServerConfig().ping_interval, "workers": workers,
              "server_cpus": server_cpus, "generator_cpus": gen_cpus}
    with tempfile.TemporaryDirectory(prefix="selchat-bench-") as tmp, contextlib.ExitStack() as cleanup:
        server = srv.spawn_selchat(Path(tmp), names, PASSWORD, ping_interval=ping_interval, cpus=server_cpus,
                                   nofile=server_nofile)
        cleanup.callback(server.stop)
        empty = server.memory_kib()["rss"]
        progress.note(f"idle: server pid {server.pid} up ({empty / 1024:.1f} MiB); logging in {users:,} users "
                      f"over {sources} source addresses, {workers} worker(s)")
        specs = [{"names": names[i::workers], "address": server.address, "password": PASSWORD,
                  "sources": sysinfo.loopback_sources(server.host, sources), "cpus": gen_cpus,
                  "nofile": sockets // workers + 1024, "concurrency": concurrency}
                 for i in range(workers)]
        pool = WorkerPool(idle_worker, specs)
        cleanup.callback(pool.close)
        ready = pool.gather(timeout=900, tick=lambda: progress.live(f"idle: logging in {users:,} users ..."))
        connect = max(r["t_last"] for r in ready) - min(r["t_first"] for r in ready)
        rss = server.memory_kib()["rss"]
        progress.note(f"idle: {users:,} users logged in in {connect:.1f} s; holding {hold:g} s")

        pool.broadcast("hold")
        pool.gather(timeout=60)
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        while time.monotonic() - t0 < hold:
            progress.live(f"idle: holding {time.monotonic() - t0:.0f}/{hold:g} s")
            time.sleep(0.5)
        pool.broadcast("report")
        reports = pool.gather(timeout=60)
        cpu, held = server.cpu_seconds() - cpu0, time.monotonic() - t0
        memory = server.memory_kib()
        problems = server.problems()

    pings = sum(r["pings"] for r in reports)
    rounds = pings / users
    per_round = cpu / rounds if rounds else float("nan")
    result.update({
        "connect_seconds": round(connect, 2),
        "logins_per_s": round(users / connect) if connect else None,
        "rss_mib_empty": round(empty / 1024, 1),
        "rss_mib": round(rss / 1024, 1),
        "rss_mib_after_hold": round(memory["rss"] / 1024, 1),
        "peak_rss_mib": round(memory["peak"] / 1024, 1),
        "rss_kib_per_user": round((rss - empty) / users, 2),
        "hold_seconds": round(held, 1),
        "pings": pings,
        "heartbeat_rounds": round(rounds, 2),
        "hold_cpu_seconds": round(cpu, 3),
        "hold_cpu_pct": round(100 * cpu / held, 3),
        "cpu_ms_per_round": round(1000 * per_round, 2),
        "heartbeat_core_pct_at_default": round(100 * per_round / result["default_ping_interval"], 4),
        "heartbeat_core_pct_at_30s": round(100 * per_round / 30.0, 4),
        "drops": sum(r["dropped"] for r in reports),
        "server_log_problems": problems[:10],
    })
    failures = [p for r in reports for p in r["problems"]][:5]
    if result["drops"]:
        failures.insert(0, f"{result['drops']} users dropped while idle")
    if rounds < 2:
        failures.append(f"only {rounds:.2f} heartbeat rounds seen in {held:.1f} s (expected >= 2)")
    failures += [f"server log: {line}" for line in problems[:3]]
    result["failures"] = failures
    result["correct"] = not failures
    return result
