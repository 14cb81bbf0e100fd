"""Login storm: many logins with real password hashing while one pair chats.

The server runs with its default scrypt cost, and the storm's users are
registered with it, so each login costs what it costs in production (tens of
ms on a worker thread). Meanwhile one pair sends a message each way every
1/rate seconds, open loop, and its latency is reported for a quiet second
before the storm and for the storm itself: hashing must not stall the loop.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

from selchat.bench import servers as srv
from selchat.bench import stats, sysinfo
from selchat.bench.progress import Progress
from selchat.bench.relay import PASSWORD, default_workers
from selchat.bench.vusers import sources_for
from selchat.bench.workers import WorkerPool, chat_pair_worker, storm_worker

QUIET = 1.0  # seconds of chatting before the storm, for comparison


def run_storm(logins: int, *, concurrency: int = 32, rate: float = 100.0, pin: bool = False,
              workers: int | None = None, progress: Progress | None = None) -> dict:
    progress = progress or Progress(False)
    server_cpus, gen_cpus = sysinfo.split_cpus(pin)
    workers = min(workers or default_workers(gen_cpus), logins)
    names = [f"s{i}" for i in range(logins)]
    pair = ("chat0a", "chat0b")
    result = {"mode": "storm", "logins": logins, "concurrency": concurrency, "rate": rate, "workers": workers,
              "server_cpus": server_cpus, "generator_cpus": gen_cpus}

    with tempfile.TemporaryDirectory(prefix="selchat-bench-") as tmp, contextlib.ExitStack() as cleanup:
        server = srv.spawn_selchat(Path(tmp), list(pair) + names, PASSWORD, scrypt_n=None, cpus=server_cpus,
                                   nofile=3 * logins + 1024)
        cleanup.callback(server.stop)
        sources = sysinfo.loopback_sources(server.host, sources_for(concurrency, 2))
        chatter = WorkerPool(chat_pair_worker, [{"pair": pair, "address": server.address, "password": PASSWORD,
                                                 "sources": sources, "size": 64, "rate": rate, "cpus": gen_cpus}])
        cleanup.callback(chatter.close)
        specs = [{"names": names[i::workers], "address": server.address, "password": PASSWORD,
                  "sources": sources, "concurrency": max(1, concurrency // workers), "cpus": gen_cpus,
                  "nofile": 3 * logins + 1024} for i in range(workers)]
        stormers = WorkerPool(storm_worker, specs)
        cleanup.callback(stormers.close)
        chatter.gather(timeout=60)
        stormers.gather(timeout=60)
        progress.note(f"login storm: server pid {server.pid} (real scrypt cost); pair chatting, quiet {QUIET:g} s")

        chatter.broadcast("phase", "quiet")
        time.sleep(QUIET)
        chatter.broadcast("phase", "storm")
        started = time.monotonic()
        stormers.broadcast("go")
        reports = stormers.gather(timeout=900, tick=lambda: progress.live(
            f"login storm: {logins:,} logins, {time.monotonic() - started:.0f} s"))
        chatter.broadcast("phase", "after")
        time.sleep(0.2)
        chatter.broadcast("finish")
        (chat,) = chatter.gather(timeout=60)
        problems = server.problems()

    starts = [t for r in reports for t in r["start"]]
    readies = [t for r in reports for t in r["ready"]]
    seconds = max(readies) - min(starts)
    result.update({
        "seconds": round(seconds, 2),
        "logins_per_s": round(logins / seconds, 1),
        "login_ms": stats.latency_summary([int((b - a) * 1e9) for a, b in zip(starts, readies)], unit=1e6),
        "chat": {
            "quiet": stats.latency_summary(stats.merge_latencies([chat["phases"].get("quiet", b"")]), unit=1e6),
            "storm": stats.latency_summary(stats.merge_latencies([chat["phases"].get("storm", b"")]), unit=1e6),
            "sent": chat["sent"], "lost": chat["lost"], "reordered": chat["reordered"] + chat["gaps"],
        },
        "server_log_problems": problems[:10],
    })
    progress.note(f"login storm: {logins:,} logins in {seconds:.1f} s")
    failures = []
    if chat["lost"] or chat["reordered"] or chat["gaps"]:
        failures.append(f"chatting pair: {chat['lost']} lost, {chat['reordered'] + chat['gaps']} reordered")
    failures += chat["problems"][:3] + [f"server log: {line}" for line in problems[:3]]
    result["failures"] = failures
    result["correct"] = not failures
    return result
